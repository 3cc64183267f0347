//! baton upgrading itself (`baton upgrade --self`, SIGUSR2): the running
//! baton re-executes its binary in place, in the same process, and hands
//! the new image everything it holds, so its pid (systemd's MAINPID), its
//! children and their process groups stay as they are:
//!
//! - the lifecycle machine's whole state, and the clock it runs on;
//! - the configuration it started with, and where it reads it from;
//! - every listening socket (each generation's, the steering groups'
//!   layout, the traffic plan), the control socket, the apps' notify
//!   socket and the metrics listener, as open descriptors;
//! - for every worker's process: its pidfd (which keeps an exited leader
//!   unreaped, so its group id cannot be reused), its stderr pipe and its
//!   worker index; each worker's restarts, last exit and restart backoff
//!   are in the machine's state.
//!
//! The descriptors survive `execve` because their close-on-exec flag is
//! cleared just before it; the document ([`State`], JSON, versioned by
//! [`FORMAT`]) travels in a memfd and names them by number. The new image
//! takes each number once ([`baton_sys::take_handed_over_fd`]) and marks it
//! close-on-exec again.
//!
//! Before anything is committed the new binary is run once as
//! `baton __handover-check` with the document on its stdin: a binary that
//! is missing, not executable, does not start, or does not read this
//! format is refused there, and the old baton keeps running. The exec
//! itself is done by the main thread, which forked every app: an `execve`
//! from another thread would end the main thread and, through the
//! parent-death signal, every app.
//!
//! A hand-over happens only when nothing is in flight: no upgrade, no
//! generation starting, no worker starting or waiting to restart, no spawn
//! or configuration load pending. What is not handed over: event streams
//! of connected clients (they end), the last stderr lines kept for failure
//! reports, the metrics' counters (they restart from zero, which
//! Prometheus reads as a counter reset), and a generation's private probe
//! listener (shared sockets with an `http` or `tcp` check; its workers keep
//! theirs, and one started later gets a new one, which is all a check of a
//! generation starting again needs: its workers are all started anew).
//!
//! Any change to a type in [`State`] changes the format: bump [`FORMAT`].
//! `handover::tests::the_format_is_pinned` fails when the document's shape
//! changes without it.

use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use baton_core::Machine;
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigSource};
use crate::steer::SocketsState;

/// The hand-over document's format. Bump it with any change to [`State`]
/// or a type in it; a binary reads only its own.
pub const FORMAT: u32 = 1;

/// A descriptor, by number, open in the new image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FdNum(pub RawFd);

impl FdNum {
    pub fn of(fd: BorrowedFd<'_>) -> Self {
        Self(fd.as_raw_fd())
    }

    /// Takes the descriptor (once) in the new image.
    pub fn take(self) -> std::io::Result<OwnedFd> {
        baton_sys::take_handed_over_fd(self.0)
    }
}

/// Everything a baton hands to the binary that replaces it.
#[derive(Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    /// The version that wrote it.
    pub from_version: String,
    /// Self-upgrades so far, this one included.
    pub handovers: u64,
    /// How baton was started (its `argv[0]`), to find its binary again.
    pub argv0: PathBuf,
    /// The machine's clock at the hand-over, in microseconds since its
    /// epoch: the new image's clock continues from it.
    pub clock_us: u64,
    pub machine: Machine<Arc<Config>>,
    pub source: ConfigSource,
    /// The configuration baton started with (its fixed settings hold).
    pub initial: Config,
    pub sockets: SocketsState,
    pub control: FdNum,
    pub notify: NotifyState,
    pub metrics: Option<FdNum>,
    pub procs: Vec<ProcState>,
    /// Whether systemd was told READY=1.
    pub systemd_ready: bool,
}

#[derive(Serialize, Deserialize)]
pub struct NotifyState {
    pub fd: FdNum,
    pub path: PathBuf,
    /// The private directory it lives in, removed when baton exits.
    pub dir: PathBuf,
}

/// A process the machine answers for: a worker's process, the leader of
/// its own process group (whose id is `pid`).
#[derive(Serialize, Deserialize)]
pub struct ProcState {
    pub pid: i32,
    pub gen: u64,
    /// Which of its generation's workers it is.
    pub worker: u32,
    pub pidfd: FdNum,
    /// Read end of its stderr pipe, while it is open.
    pub stderr: Option<FdNum>,
    /// Its exit was reported to the machine (it waits for its group).
    pub exit_reported: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("reading the hand-over document")]
    Io(#[from] std::io::Error),
    #[error("the hand-over document is not JSON: {0}")]
    Json(String),
    #[error(
        "the hand-over document is format {found}, this binary reads format {FORMAT}: \
         restart baton instead (its sockets stay in systemd's fd store)"
    )]
    Format { found: u64 },
    #[error("the hand-over document does not match format {FORMAT}: {0}")]
    Shape(String),
}

impl State {
    /// The document in a memfd, read from its start.
    pub fn to_memfd(&self) -> std::io::Result<OwnedFd> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        let fd = nix::sys::memfd::memfd_create(
            c"baton-handover",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&json)?;
        file.rewind()?;
        Ok(file.into())
    }

    /// Reads and checks a document: its format first, for a clear error.
    pub fn read(mut from: impl Read) -> Result<Self, HandoverError> {
        let mut bytes = Vec::new();
        from.read_to_end(&mut bytes)?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| HandoverError::Json(e.to_string()))?;
        let found = value.get("format").and_then(|f| f.as_u64()).unwrap_or(0);
        if found != u64::from(FORMAT) {
            return Err(HandoverError::Format { found });
        }
        serde_json::from_value(value).map_err(|e| HandoverError::Shape(e.to_string()))
    }

    /// Every descriptor the document names, to keep open across `execve`.
    pub fn fds(&self) -> Vec<FdNum> {
        let mut fds = self.sockets.fds();
        fds.push(self.control);
        fds.push(self.notify.fd);
        fds.extend(self.metrics);
        for p in &self.procs {
            fds.push(p.pidfd);
            fds.extend(p.stderr);
        }
        fds
    }
}

/// Clears (or sets back) close-on-exec on `fds`, which the caller holds.
pub fn set_inheritable(fds: &[BorrowedFd<'_>], inheritable: bool) -> std::io::Result<()> {
    for fd in fds {
        baton_sys::set_inheritable(fd.as_fd(), inheritable)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::path::Path;
    use std::time::Duration;

    use baton_core::{
        Command, ExitStatus, GenId, Input, Pid, Release, Report, RequestId, Spec, Time,
        TrafficMode, Trigger,
    };
    use serde_json::Value;

    use crate::config::{FileConfig, Overrides};
    use crate::listener::InheritedSockets;
    use crate::steer::Sockets;

    /// A document with two generations of two workers each (one serving,
    /// with a worker restarted once; one retiring after an upgrade), real
    /// sockets and made-up descriptor numbers.
    fn sample() -> State {
        let overrides = Overrides {
            command: vec!["/bin/true".into()],
            listen: vec!["http=127.0.0.1:0".parse().unwrap()],
            workers: Some(2),
            control: Some("/run/baton/control.sock".into()),
            // A lowered candidate, so the document carries a priority.
            candidate_priority: Some(baton_core::CpuPriority::Idle),
            ..Default::default()
        };
        let config = Config::merge(FileConfig::default(), &overrides, Path::new("/srv")).unwrap();
        let sockets = Sockets::bind(
            &config.listen,
            64,
            TrafficMode::Steered,
            config.probe_ports,
            &mut InheritedSockets::default(),
        )
        .unwrap();
        let spec = Spec {
            release: Release {
                dir: "/srv".into(),
                program: "/bin/true".into(),
                argv: vec!["/bin/true".into()],
            },
            settings: config.settings(),
            payload: Arc::new(config.clone()),
        };
        let t = |ms| Time::from_duration(Duration::from_millis(ms));
        let mut m = Machine::new(TrafficMode::Steered);
        let ready = |pid| Input::Notify {
            pid: Pid(pid),
            pgid: Some(Pid(pid)),
            reports: vec![Report::Ready],
        };
        m.step(Input::Start { spec: spec.clone() }, t(0));
        // Two workers each: pids 100, 101, then 200, 201.
        let spawned = |gen, worker, pid| Input::Spawned {
            gen: GenId(gen),
            worker,
            pid: Pid(pid),
        };
        m.step(spawned(1, 0, 100), t(1));
        m.step(spawned(1, 1, 101), t(1));
        m.step(ready(100), t(2));
        m.step(ready(101), t(2));
        let upgrade = Command::Upgrade {
            trigger: Trigger::Control,
            spec: Ok(spec),
            options: Default::default(),
        };
        m.step(
            Input::Command {
                id: RequestId(1),
                command: upgrade,
            },
            t(3),
        );
        m.step(spawned(2, 0, 200), t(4));
        m.step(spawned(2, 1, 201), t(4));
        m.step(ready(200), t(5));
        m.step(ready(201), t(5));
        // Started at the idle priority, each worker is
        // restored (worker 0's restore failed: it stays lowered, and its
        // process says so); then it takes over.
        let restored = |pid, restored| Input::PriorityRestored {
            gen: GenId(2),
            pid: Pid(pid),
            restored,
        };
        m.step(restored(200, false), t(5));
        m.step(restored(201, true), t(5));
        // Worker 1 of generation 2 crashed and was restarted (its restart
        // count, last exit and backoff are handed over), and is ready again.
        let exited = Input::Exited {
            pid: Pid(201),
            status: ExitStatus::Code(1),
            group_empty: true,
        };
        m.step(exited, t(6));
        m.step(Input::Tick, t(1_000));
        m.step(spawned(2, 1, 202), t(1_000));
        m.step(ready(202), t(1_001));
        let (sockets, _) = sockets.hand_over();
        State {
            format: FORMAT,
            from_version: "0.1.0".into(),
            handovers: 1,
            argv0: "/usr/local/bin/baton".into(),
            clock_us: 5_000,
            machine: m,
            source: ConfigSource {
                file: None,
                overrides,
                base_dir: "/srv".into(),
            },
            initial: config,
            sockets,
            control: FdNum(10),
            notify: NotifyState {
                fd: FdNum(11),
                path: "/run/baton-x/notify.sock".into(),
                dir: "/run/baton-x".into(),
            },
            metrics: Some(FdNum(12)),
            procs: vec![ProcState {
                pid: 202,
                gen: 2,
                worker: 1,
                pidfd: FdNum(13),
                stderr: Some(FdNum(14)),
                exit_reported: false,
            }],
            systemd_ready: true,
        }
    }

    /// The document's shape: every field path with the type of its value
    /// (map keys that are data, like generation numbers, as `*`; unit enum
    /// variants by name).
    fn shape(v: &Value, path: &str, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    let k = if k.parse::<i64>().is_ok() { "*" } else { k };
                    shape(v, &format!("{path}.{k}"), out);
                }
            }
            Value::Array(items) => {
                for v in items {
                    shape(v, &format!("{path}[]"), out);
                }
            }
            Value::String(s)
                if s.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                    && s.chars().all(|c| c.is_ascii_alphabetic()) =>
            {
                out.insert(format!("{path} = {s}"));
            }
            other => {
                let kind = match other {
                    Value::Null => "null",
                    Value::Bool(_) => "bool",
                    Value::Number(_) => "number",
                    _ => "string",
                };
                out.insert(format!("{path}: {kind}"));
            }
        }
    }

    /// The shape of format 1, pinned: a change to any type in the document
    /// changes it, and must come with a new [`FORMAT`] (a binary reads
    /// only its own, so a new shape under the old number would be misread
    /// by a baton of the other version). `BATON_BLESS=1` rewrites the file
    /// after such a bump.
    #[test]
    fn the_format_is_pinned() {
        let json = serde_json::to_value(sample()).unwrap();
        let mut keys = BTreeSet::new();
        shape(&json, "", &mut keys);
        let text: String = keys.into_iter().map(|k| k + "\n").collect();
        let file = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("src/handover-format-{FORMAT}.shape"));
        if std::env::var_os("BATON_BLESS").is_some() {
            std::fs::write(&file, &text).unwrap();
        }
        let pinned = std::fs::read_to_string(&file).unwrap_or_default();
        assert!(
            text == pinned,
            "the hand-over document's shape changed: bump handover::FORMAT, then run with \
             BATON_BLESS=1 to write {}\n--- now:\n{text}",
            file.display()
        );
    }

    /// Written and read back, the document is the same; another format
    /// number is refused, naming both.
    #[test]
    fn round_trip_and_other_formats_refused() {
        let state = sample();
        let fd = state.to_memfd().unwrap();
        let back = State::read(std::fs::File::from(fd)).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&state).unwrap()
        );
        let mut other = serde_json::to_value(&state).unwrap();
        other["format"] = (FORMAT + 1).into();
        let err = State::read(other.to_string().as_bytes()).err().unwrap();
        assert!(
            matches!(err, HandoverError::Format { found } if found == u64::from(FORMAT) + 1),
            "{err}"
        );
        assert!(
            err.to_string().contains(&format!("reads format {FORMAT}")),
            "{err}"
        );
        let err = State::read(&b"{\"format\": 1, \"machine\": 3}"[..])
            .err()
            .unwrap();
        assert!(matches!(err, HandoverError::Shape(_)), "{err}");
        let err = State::read(&b"not json"[..]).err().unwrap();
        assert!(matches!(err, HandoverError::Json(_)), "{err}");
    }
}
