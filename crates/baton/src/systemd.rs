//! baton as a systemd service: what it tells its own service manager over
//! `NOTIFY_SOCKET` (readiness, reloads, stopping, the watchdog, its fd
//! store). The sockets it inherits from one (`LISTEN_FDS`) are taken in
//! [`baton_sys::take_listen_fds`] and adopted in [`crate::listener`].
//!
//! [`Reporter`] decides what to say, from what the supervisor observes
//! after each step (pure, so its rules are unit-tested);
//! [`ServiceManager`] says it. Sends never block the supervisor's loop: a
//! datagram the manager's socket cannot take at once is dropped with a
//! warning (systemd's own socket is large; a full one means the manager is
//! wedged).
//!
//! Hand-written over `nix` rather than the `sd-notify` crate: baton needs
//! abstract socket addresses (`@name`, which that crate does not handle),
//! non-blocking sends from the event loop, and `NOTIFY_SOCKET` read once at
//! start rather than at every message.

use std::io::{self, IoSlice};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// The service manager baton reports to, when started by one.
pub struct ServiceManager {
    socket: OwnedFd,
    addr: UnixAddr,
    /// What `NOTIFY_SOCKET` said, for messages.
    name: String,
    watchdog: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifySetupError {
    #[error("NOTIFY_SOCKET={0:?} is not an absolute path or an @abstract name")]
    BadAddress(String),
    #[error("creating a socket to reach NOTIFY_SOCKET")]
    Socket(#[source] io::Error),
}

impl ServiceManager {
    /// From baton's environment: `NOTIFY_SOCKET`, and `WATCHDOG_USEC` when
    /// `WATCHDOG_PID` is baton's (or absent). `None` when not started by a
    /// service manager.
    pub fn from_env() -> Result<Option<Self>, NotifySetupError> {
        let Some(path) = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|p| !p.is_empty())
        else {
            return Ok(None);
        };
        let own = std::process::id();
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0)
            .filter(|_| {
                std::env::var("WATCHDOG_PID")
                    .ok()
                    .and_then(|p| p.trim().parse::<u32>().ok())
                    .is_none_or(|p| p == own)
            })
            .map(Duration::from_micros);
        Self::new(&path, watchdog).map(Some)
    }

    /// Reports to `path` (a socket path, or `@name` in the abstract
    /// namespace).
    pub fn new(path: &str, watchdog: Option<Duration>) -> Result<Self, NotifySetupError> {
        let bad = || NotifySetupError::BadAddress(path.to_owned());
        let addr = if let Some(name) = path.strip_prefix('@').filter(|n| !n.is_empty()) {
            UnixAddr::new_abstract(name.as_bytes())
        } else if path.starts_with('/') {
            UnixAddr::new(path)
        } else {
            return Err(bad());
        }
        .map_err(|_| bad())?;
        let socket = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(|e| NotifySetupError::Socket(e.into()))?;
        Ok(Self {
            socket,
            addr,
            name: path.to_owned(),
            watchdog,
        })
    }

    /// How often to send `WATCHDOG=1`: half the manager's timeout, as
    /// sd_watchdog_enabled(3) advises.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|t| t / 2)
    }

    /// Sends one message (lines of `KEY=VALUE`), with `fds` attached.
    pub fn send(&self, message: &str, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let iov = [IoSlice::new(message.as_bytes())];
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        socket::sendmsg(
            self.socket.as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            Some(&self.addr),
        )
        .map(drop)
        .map_err(io::Error::from)
    }

    /// [`ServiceManager::send`], a failure logged (once per message: the
    /// supervisor goes on either way).
    pub fn tell(&self, message: &str, fds: &[BorrowedFd<'_>]) {
        if let Err(e) = self.send(message, fds) {
            tracing::warn!(
                notify_socket = %self.name,
                "telling the service manager {:?}: {e}",
                message.lines().next().unwrap_or("")
            );
        }
    }

    /// Puts a listening socket in the manager's fd store under `name`, so
    /// that a baton restarted after a crash gets it back (`LISTEN_FDS`) and
    /// connections arriving meanwhile wait in its queue. Needs
    /// `FileDescriptorStoreMax=` in the unit; without it systemd drops it.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) {
        self.tell(&format!("FDSTORE=1\nFDNAME={name}\n"), &[fd]);
    }

    /// Removes every socket stored under `name` (one being replaced).
    pub fn unstore(&self, name: &str) {
        self.tell(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), &[]);
    }

    pub fn socket_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// What the manager should know of the supervisor, observed after each
/// step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    /// The generation that gets the traffic, and its release.
    pub active: Option<(u64, String)>,
    /// The active generation is ready and running (not starting, nor
    /// restarting after a crash).
    pub serving: bool,
    /// An upgrade is under way and its candidate does not serve all the
    /// traffic yet.
    pub upgrading: Option<Upgrading>,
    /// The outcome of the last upgrade, in words, for `STATUS=`.
    pub last_outcome: Option<String>,
    pub stopping: bool,
}

/// How far an upgrade is, while it counts as a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrading {
    /// Its configuration is being loaded.
    Preparing,
    /// Its candidate (this generation) is starting, or is a canary.
    Starting(u64),
}

/// Decides the messages to send: `READY=1` (with `MAINPID=`) once the
/// first generation is active; `RELOADING=1` with `MONOTONIC_USEC=` when
/// an upgrade begins and `READY=1` again once it ends; `STOPPING=1` on
/// stop; `STATUS=` whenever the words change.
#[derive(Debug, Default)]
pub struct Reporter {
    ready: bool,
    reloading: bool,
    stopping: bool,
    status: String,
}

impl Reporter {
    /// Taking over from a previous baton image that had told the manager
    /// `READY=1` (or not); the status words are said again.
    pub fn resumed(ready: bool) -> Self {
        Self {
            ready,
            ..Self::default()
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// The words are said again at the next observation.
    pub fn forget_status(&mut self) {
        self.status.clear();
    }
    /// The message to send for `now` (none if nothing changed).
    /// `monotonic_us` is CLOCK_MONOTONIC, for `MONOTONIC_USEC=`.
    pub fn observe(&mut self, now: &Observed, pid: u32, monotonic_us: u64) -> Option<String> {
        if self.stopping {
            return None;
        }
        let mut lines = Vec::new();
        if now.stopping {
            self.stopping = true;
            lines.push("STOPPING=1".to_owned());
        } else if !self.ready {
            if now.active.is_some() && now.serving {
                self.ready = true;
                lines.push("READY=1".to_owned());
                lines.push(format!("MAINPID={pid}"));
            }
        } else if now.upgrading.is_some() && !self.reloading {
            self.reloading = true;
            lines.push("RELOADING=1".to_owned());
            lines.push(format!("MONOTONIC_USEC={monotonic_us}"));
        } else if now.upgrading.is_none() && self.reloading {
            self.reloading = false;
            lines.push("READY=1".to_owned());
        }
        let status = status_words(now);
        if status != self.status {
            lines.push(format!("STATUS={status}"));
            self.status = status;
        }
        (!lines.is_empty()).then(|| {
            let mut m = lines.join("\n");
            m.push('\n');
            m
        })
    }
}

fn status_words(now: &Observed) -> String {
    if now.stopping {
        return "stopping: draining every generation".into();
    }
    let mut s = match (&now.active, now.serving) {
        (Some((gen, release)), true) => format!("generation {gen} active ({release})"),
        (Some((gen, release)), false) => format!("generation {gen} starting ({release})"),
        (None, _) => "no generation runs".into(),
    };
    match now.upgrading {
        Some(Upgrading::Starting(gen)) => s.push_str(&format!("; upgrading to generation {gen}")),
        Some(Upgrading::Preparing) => s.push_str("; upgrading (loading the configuration)"),
        None => {
            if let Some(outcome) = &now.last_outcome {
                s.push_str(&format!("; last upgrade: {outcome}"));
            }
        }
    }
    s
}

/// CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC=` wants it.
pub fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(gen: u64) -> Option<(u64, String)> {
        Some((gen, format!("/srv/app/v{gen}")))
    }

    fn step(r: &mut Reporter, o: Observed) -> Option<String> {
        r.observe(&o, 42, 1_000)
    }

    /// The whole life of a service: the exact messages, in order, and
    /// silence when nothing changed.
    #[test]
    fn ready_reloading_ready_stopping() {
        let mut r = Reporter::default();
        let starting = Observed {
            active: active(1),
            ..Default::default()
        };
        assert_eq!(
            step(&mut r, starting.clone()).as_deref(),
            Some("STATUS=generation 1 starting (/srv/app/v1)\n")
        );
        assert_eq!(step(&mut r, starting), None, "nothing changed");
        let one = Observed {
            active: active(1),
            serving: true,
            ..Default::default()
        };
        assert_eq!(
            step(&mut r, one.clone()).as_deref(),
            Some("READY=1\nMAINPID=42\nSTATUS=generation 1 active (/srv/app/v1)\n")
        );
        assert_eq!(step(&mut r, one.clone()), None);
        let upgrading = Observed {
            upgrading: Some(Upgrading::Starting(2)),
            ..one
        };
        assert_eq!(
            step(&mut r, upgrading.clone()).as_deref(),
            Some(
                "RELOADING=1\nMONOTONIC_USEC=1000\n\
                 STATUS=generation 1 active (/srv/app/v1); upgrading to generation 2\n"
            )
        );
        assert_eq!(step(&mut r, upgrading), None);
        let two = Observed {
            active: active(2),
            serving: true,
            last_outcome: Some("succeeded".into()),
            ..Default::default()
        };
        assert_eq!(
            step(&mut r, two.clone()).as_deref(),
            Some("READY=1\nSTATUS=generation 2 active (/srv/app/v2); last upgrade: succeeded\n")
        );
        let stopping = Observed {
            stopping: true,
            ..two
        };
        assert_eq!(
            step(&mut r, stopping.clone()).as_deref(),
            Some("STOPPING=1\nSTATUS=stopping: draining every generation\n")
        );
        assert_eq!(step(&mut r, stopping), None, "said once");
        assert_eq!(
            step(&mut r, Observed::default()),
            None,
            "nothing after STOPPING=1"
        );
    }

    /// No READY=1 while the first generation is only starting, though it
    /// already holds the traffic (connections queue for it); and a crash
    /// restart of the active generation later is no new start.
    #[test]
    fn ready_only_once_the_first_generation_serves() {
        let mut r = Reporter::default();
        let starting = Observed {
            active: active(1),
            ..Default::default()
        };
        assert!(!step(&mut r, starting.clone()).unwrap().contains("READY"));
        let serving = Observed {
            serving: true,
            ..starting.clone()
        };
        assert!(step(&mut r, serving.clone())
            .unwrap()
            .starts_with("READY=1\n"));
        assert_eq!(
            step(&mut r, starting).as_deref(),
            Some("STATUS=generation 1 starting (/srv/app/v1)\n"),
            "restarting after a crash: only the words change"
        );
        assert_eq!(
            step(&mut r, serving).as_deref(),
            Some("STATUS=generation 1 active (/srv/app/v1)\n")
        );
    }

    /// An upgrade asked for before the first generation is ready is no
    /// reload: the service is still starting, and READY=1 comes once.
    #[test]
    fn no_reloading_before_ready() {
        let mut r = Reporter::default();
        let o = Observed {
            upgrading: Some(Upgrading::Starting(2)),
            ..Default::default()
        };
        assert!(!step(&mut r, o).unwrap().contains("RELOADING"));
        let o = Observed {
            active: active(2),
            serving: true,
            ..Default::default()
        };
        let m = step(&mut r, o).unwrap();
        assert!(m.starts_with("READY=1\nMAINPID=42\n"), "{m}");
    }

    /// A failed upgrade still ends the reload: the old generation serves.
    #[test]
    fn a_failed_upgrade_ends_the_reload() {
        let mut r = Reporter::default();
        let one = Observed {
            active: active(1),
            serving: true,
            ..Default::default()
        };
        step(&mut r, one.clone());
        step(
            &mut r,
            Observed {
                upgrading: Some(Upgrading::Starting(2)),
                ..one.clone()
            },
        );
        let m = step(
            &mut r,
            Observed {
                last_outcome: Some("failed: not ready within 1s".into()),
                ..one
            },
        )
        .unwrap();
        assert_eq!(
            m,
            "READY=1\nSTATUS=generation 1 active (/srv/app/v1); last upgrade: failed: not ready within 1s\n"
        );
    }

    #[test]
    fn abstract_and_path_addresses() {
        // Positive control: a path and an abstract name are taken.
        for ok in ["/run/systemd/notify", "@baton-test"] {
            assert!(ServiceManager::new(ok, None).is_ok(), "{ok}");
        }
        for bad in ["relative/path", "", "@"] {
            let e = ServiceManager::new(bad, None).err();
            assert!(
                matches!(e, Some(NotifySetupError::BadAddress(ref p)) if p == bad),
                "{bad:?}: {e:?}"
            );
        }
    }

    /// A message with a descriptor arrives whole, with the descriptor, at
    /// an abstract address (what a test's recording manager uses).
    #[test]
    fn sends_to_an_abstract_socket_with_fds() {
        use std::os::unix::net::UnixDatagram;
        let name = format!("baton-test-{}", std::process::id());
        let addr = UnixAddr::new_abstract(name.as_bytes()).unwrap();
        let rx = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::bind(rx.as_raw_fd(), &addr).unwrap();
        let rx = UnixDatagram::from(rx);
        let m = ServiceManager::new(&format!("@{name}"), None).unwrap();
        let file = tempfile::tempfile().unwrap();
        m.send("FDSTORE=1\nFDNAME=http\n", &[file.as_fd()]).unwrap();
        let mut buf = [0u8; 64];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            rx.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .unwrap();
        let fds: Vec<RawFd> = msg
            .cmsgs()
            .unwrap()
            .flat_map(|c| match c {
                socket::ControlMessageOwned::ScmRights(f) => f,
                _ => Vec::new(),
            })
            .collect();
        let len = msg.bytes;
        assert_eq!(fds.len(), 1, "the descriptor came along");
        for fd in fds {
            let _ = nix::unistd::close(fd);
        }
        assert_eq!(&buf[..len], b"FDSTORE=1\nFDNAME=http\n");
    }
}
