//! The sd_notify socket apps find in `NOTIFY_SOCKET` (the parser for what
//! they send is `baton_protocol::notify`).
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

pub use baton_protocol::notify::{parse, NotifyMessage, MAX_DATAGRAM};

/// The most descriptors Linux passes in one message (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;

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

    /// The socket a previous baton image bound at `path` (a hand-over).
    pub fn handed_over(fd: std::os::fd::OwnedFd, path: &Path) -> io::Result<Self> {
        let socket = std::os::unix::net::UnixDatagram::from(fd);
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket: UnixDatagram::from_std(socket)?,
            path: path.to_owned(),
        })
    }

    /// A copy of the socket's descriptor, for a hand-over.
    pub fn try_clone_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.socket.as_fd().try_clone_to_owned()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the next datagram that carries credentials. Datagrams
    /// that cannot be read whole (longer than [`MAX_DATAGRAM`], too many
    /// passed fds, truncated control data) are dropped at once, as systemd
    /// drops them: parsed cut short, `READY=10` could read as `READY=1`,
    /// and one bad sender must not slow the rest.
    pub async fn recv(&self) -> io::Result<Received> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let got = self.socket.async_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut buf)];
                // Room for credentials and as many passed fds as one
                // datagram can carry (SCM_MAX_FD), so none is ever cut off
                // unseen (and left open): every one is closed below, since
                // baton keeps no fd store.
                let mut cmsg =
                    nix::cmsg_space!(nix::sys::socket::UnixCredentials, [RawFd; SCM_MAX_FD]);
                let msg = socket::recvmsg::<()>(
                    self.socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut pid = None;
                let mut passed_fds = Vec::new();
                let truncated = msg
                    .flags
                    .intersects(MsgFlags::MSG_CTRUNC | MsgFlags::MSG_TRUNC);
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
                Some(pid) => tracing::warn!(
                    pid,
                    "dropped a notify datagram longer than {MAX_DATAGRAM} bytes or with too much control data"
                ),
                None => tracing::debug!("dropped a notify datagram without credentials"),
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

    /// A datagram longer than the buffer is dropped, not parsed cut
    /// short: here the cut would turn `READY=10` into `READY=1`. The next
    /// datagram still arrives (positive control).
    #[tokio::test]
    async fn oversized_datagrams_are_dropped_not_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = NotifySocket::bind(&path).unwrap();
        let client = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let mut big = format!("STATUS={}\n", "x".repeat(MAX_DATAGRAM - 15));
        big.push_str("READY=10");
        assert_eq!(big.len(), MAX_DATAGRAM + 1);
        assert_eq!(
            parse(&big.as_bytes()[..MAX_DATAGRAM]).last(),
            Some(&NotifyMessage::Ready)
        );
        client.send_to(big.as_bytes(), &path).unwrap();
        client.send_to(b"STATUS=after", &path).unwrap();
        let got = sock.recv().await.unwrap();
        assert_eq!(got.messages, vec![NotifyMessage::Status("after".into())]);
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
