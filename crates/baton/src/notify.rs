//! The sd_notify side: a datagram socket apps find in `NOTIFY_SOCKET`, and
//! the parser for what they send.
//!
//! A message is attributed to a generation by the sender's pid as the
//! kernel reports it (SO_PASSCRED / SCM_CREDENTIALS), never by anything in
//! the payload, so one process cannot speak for another.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags};
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// One state change an app reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyMessage {
    Ready,
    Stopping,
    Reloading,
    Status(String),
    /// `MAINPID=`: accepted only from the generation's own process group.
    MainPid(i32),
}

/// Parses one datagram: newline-separated `KEY=VALUE` assignments. Unknown
/// keys (WATCHDOG=, ERRNO=, FDSTORE=, …) are ignored, as systemd does with
/// keys it does not act on. Invalid UTF-8 is replaced rather than dropped.
pub fn parse(datagram: &[u8]) -> Vec<NotifyMessage> {
    let text = String::from_utf8_lossy(datagram);
    text.split('\n')
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            match key {
                "READY" if value == "1" => Some(NotifyMessage::Ready),
                "STOPPING" if value == "1" => Some(NotifyMessage::Stopping),
                "RELOADING" if value == "1" => Some(NotifyMessage::Reloading),
                "STATUS" => Some(NotifyMessage::Status(truncate(value, 512))),
                "MAINPID" => value
                    .parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .map(NotifyMessage::MainPid),
                _ => None,
            }
        })
        .collect()
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

/// The supervisor's notify socket.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

/// A datagram with the sender's kernel-verified pid.
#[derive(Debug)]
pub struct Received {
    pub pid: i32,
    /// The sender's process group, looked up on arrival: a helper that
    /// sends and exits at once (`systemd-notify --ready`) is still found.
    pub pgid: Option<i32>,
    pub messages: Vec<NotifyMessage>,
}

impl NotifySocket {
    /// Binds at `path`. The file is world-writable so apps running as
    /// another user can send; credentials, not the file mode, decide whom
    /// a message counts for.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let socket = UnixDatagram::bind(path)?;
        socket::setsockopt(&socket, sockopt::PassCred, &true)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        Ok(Self {
            socket,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next datagram that carries credentials. Datagrams
    /// that cannot be read whole (too many passed fds, truncated control
    /// data) are dropped at once: one bad sender must not slow the rest.
    pub async fn recv(&self) -> io::Result<Received> {
        // sd_notify datagrams are small; systemd accepts up to ~4 KiB too.
        let mut buf = vec![0u8; 4096];
        loop {
            let got = self.socket.async_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut buf)];
                // Room for credentials and a few passed fds (FDSTORE=1),
                // which we close: baton keeps no fd store.
                let mut cmsg = nix::cmsg_space!(nix::sys::socket::UnixCredentials, [RawFd; 16]);
                let msg = socket::recvmsg::<()>(
                    self.socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut pid = None;
                let mut passed_fds = Vec::new();
                let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        match c {
                            ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
                            ControlMessageOwned::ScmRights(fds) => passed_fds.extend(fds),
                            _ => {}
                        }
                    }
                }
                Ok((msg.bytes, pid, passed_fds, truncated))
            });
            let (len, pid, passed_fds, truncated) = got.await?;
            for fd in passed_fds {
                let _ = nix::unistd::close(fd);
            }
            match pid {
                Some(pid) if !truncated => {
                    let pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid)))
                        .ok()
                        .map(|p| p.as_raw());
                    return Ok(Received {
                        pid,
                        pgid,
                        messages: parse(&buf[..len]),
                    });
                }
                _ => tracing::debug!("dropped a notify datagram without readable credentials"),
            }
        }
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_assignments() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=warming up\nWATCHDOG=1\n"),
            vec![
                NotifyMessage::Ready,
                NotifyMessage::Status("warming up".into())
            ]
        );
        assert_eq!(parse(b"STOPPING=1"), vec![NotifyMessage::Stopping]);
        assert_eq!(parse(b"READY=0\nREADY\n=1\n"), vec![]);
        assert_eq!(
            parse(b"MAINPID=42\nMAINPID=-1\nMAINPID=x"),
            vec![NotifyMessage::MainPid(42)]
        );
        assert_eq!(
            parse(b"STATUS=caf\xc3\xa9"),
            vec![NotifyMessage::Status("café".into())]
        );
        assert_eq!(parse(b"\xff\xfe"), vec![]);
        let long = format!("STATUS={}", "x".repeat(2000));
        assert_eq!(
            parse(long.as_bytes()),
            vec![NotifyMessage::Status("x".repeat(512))]
        );
    }

    #[tokio::test]
    async fn attributes_by_kernel_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = NotifySocket::bind(&path).unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        client.send_to(b"READY=1", &path).unwrap();
        let got = sock.recv().await.unwrap();
        assert_eq!(got.pid, std::process::id() as i32);
        assert_eq!(got.messages, vec![NotifyMessage::Ready]);
    }
}
