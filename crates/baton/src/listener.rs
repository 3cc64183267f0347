//! The listening sockets baton owns for its whole life.
//!
//! Binding happens once, before any app starts; every generation receives
//! the same sockets, so a connection that arrives while no app accepts
//! (start, restart, cutover) waits in the kernel's accept queue. A
//! datagram socket (`udp:`) is bound, not listening: datagrams that arrive
//! while no app reads wait in its receive buffer.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use crate::config::{ListenAddr, ListenSpec};

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {name}={address}: {reason}")]
pub struct BindError {
    pub name: String,
    pub address: String,
    pub reason: String,
}

/// A bound, listening socket.
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    /// The bound address (with the OS-chosen port when 0 was asked for).
    pub address: ListenAddr,
    socket: Socket,
    /// A Unix socket file we created, with its inode: removed on drop only
    /// if it is still ours.
    unix_file: Option<(PathBuf, u64)>,
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl Listener {
    pub fn bind(spec: &ListenSpec, backlog: u32) -> Result<Self, BindError> {
        let err = |reason: String| BindError {
            name: spec.name.clone(),
            address: spec.address.to_string(),
            reason,
        };
        // The bound address: the OS-chosen port when 0 was asked for.
        let inet = |socket: Socket, addr: SocketAddr, kind: fn(SocketAddr) -> ListenAddr| {
            let local = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .unwrap_or(addr);
            Self {
                name: spec.name.clone(),
                address: kind(local),
                socket,
                unix_file: None,
            }
        };
        match &spec.address {
            ListenAddr::Tcp(addr) => {
                let socket = bind_tcp(*addr, backlog).map_err(|e| err(describe(&e)))?;
                Ok(inet(socket, *addr, ListenAddr::Tcp))
            }
            ListenAddr::Udp(addr) => {
                let socket = bind_udp(*addr).map_err(|e| err(describe(&e)))?;
                Ok(inet(socket, *addr, ListenAddr::Udp))
            }
            ListenAddr::Unix(path) => {
                let (socket, ino) = bind_unix(path, spec.mode, backlog).map_err(err)?;
                Ok(Self {
                    name: spec.name.clone(),
                    address: spec.address.clone(),
                    socket,
                    unix_file: Some((path.clone(), ino)),
                })
            }
        }
    }

    /// A bound, listening TCP socket made elsewhere (a steering group's
    /// first socket, when the kernel will not steer).
    pub(crate) fn from_tcp(name: String, address: SocketAddr, socket: Socket) -> Self {
        Self {
            name,
            address: ListenAddr::Tcp(address),
            socket,
            unix_file: None,
        }
    }

    /// Binds a private loopback listener for one generation's probes.
    pub fn bind_probe(name: &str) -> io::Result<Self> {
        let socket = bind_tcp(SocketAddr::from(([127, 0, 0, 1], 0)), 128)?;
        let local = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("probe listener has no inet address"))?;
        Ok(Self {
            name: name.to_owned(),
            address: ListenAddr::Tcp(local),
            socket,
            unix_file: None,
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, ino)) = &self.unix_file {
            // Don't delete a socket file someone else has since put there.
            if std::fs::symlink_metadata(path).is_ok_and(|m| inode(&m) == *ino) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn inode(m: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(m)
}

fn bind_tcp(addr: SocketAddr, backlog: u32) -> io::Result<Socket> {
    // socket2 creates the socket close-on-exec.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // [::]:80 means IPv6 only; add a separate 0.0.0.0 listener for v4.
        socket.set_only_v6(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket)
}

/// A bound datagram socket. No `SO_REUSEADDR`: for UDP it would let
/// another socket bind the same address and take datagrams meant for the
/// app.
fn bind_udp(addr: SocketAddr) -> io::Result<Socket> {
    // socket2 creates the socket close-on-exec.
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        // As for TCP: [::]:53 means IPv6 only.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn bind_unix(path: &Path, mode: Option<u32>, backlog: u32) -> Result<(Socket, u64), String> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A live socket answers; a stale one from a dead run refuses.
            match UnixStream::connect(path) {
                Ok(_) => return Err("a running process is listening there".into()),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)
                        .map_err(|e| format!("removing stale socket file: {}", describe(&e)))?;
                }
                Err(e) => return Err(format!("checking existing socket file: {}", describe(&e))),
            }
        }
        Ok(_) => return Err("the path exists and is not a socket".into()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(describe(&e)),
    }
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(|e| describe(&e))?;
    let addr = SockAddr::unix(path).map_err(|e| describe(&e))?;
    socket.bind(&addr).map_err(|e| describe(&e))?;
    let meta = std::fs::symlink_metadata(path).map_err(|e| describe(&e))?;
    let cleanup = |e: String| {
        let _ = std::fs::remove_file(path);
        e
    };
    if let Some(mode) = mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| cleanup(format!("setting mode {mode:o}: {}", describe(&e))))?;
    }
    socket
        .listen(backlog.min(i32::MAX as u32) as i32)
        .map_err(|e| cleanup(describe(&e)))?;
    Ok((socket, inode(&meta)))
}

/// The OS message without the "(os error N)" suffix.
pub(crate) fn describe(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_lowercase(),
        None => s,
    }
}

/// Binds every declared listener, in order; the first failure wins and the
/// ones already bound are closed (and their socket files removed).
pub fn bind_all(specs: &[ListenSpec], backlog: u32) -> Result<Vec<Listener>, BindError> {
    specs.iter().map(|s| Listener::bind(s, backlog)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_port_in_use_names_the_address() {
        let spec: ListenSpec = "http=127.0.0.1:0".parse().unwrap();
        let first = Listener::bind(&spec, 16).unwrap();
        let again = ListenSpec {
            address: first.address.clone(),
            ..spec
        };
        let err = Listener::bind(&again, 16).unwrap_err().to_string();
        assert!(err.contains(&first.address.to_string()), "{err}");
        assert!(err.contains("in use"), "{err}");
    }

    #[test]
    fn udp_binds_v4_and_v6_and_a_port_in_use_is_named() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let spec: ListenSpec = format!("dns=udp:{addr}").parse().unwrap();
            let l = Listener::bind(&spec, 16).unwrap();
            let ListenAddr::Udp(bound) = l.address else {
                panic!("{:?}", l.address)
            };
            assert_ne!(bound.port(), 0);
            let ty = socket2::SockRef::from(&l).r#type().unwrap();
            assert_eq!(ty, Type::DGRAM);
            // Datagrams wait in it while nobody reads.
            let client = std::net::UdpSocket::bind(if bound.is_ipv6() {
                "[::1]:0"
            } else {
                "127.0.0.1:0"
            })
            .unwrap();
            client.send_to(b"hello", bound).unwrap();
            let mut buf = [0u8; 16];
            let s = socket2::SockRef::from(&l);
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let n = std::net::UdpSocket::from(s.try_clone().unwrap())
                .recv(&mut buf)
                .unwrap();
            assert_eq!(&buf[..n], b"hello");
            let again = ListenSpec {
                address: l.address.clone(),
                ..spec
            };
            let err = Listener::bind(&again, 16).unwrap_err().to_string();
            assert!(err.contains(&l.address.to_string()), "{err}");
            assert!(err.contains("in use"), "{err}");
        }
    }

    #[test]
    fn unix_stale_replaced_live_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let spec: ListenSpec = format!("u=unix:{},mode=0600", path.display())
            .parse()
            .unwrap();
        // A stale file: bound, then its socket closed without unlinking.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let live = Listener::bind(&spec, 16).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = Listener::bind(&spec, 16).unwrap_err().to_string();
        assert!(err.contains("running process"), "{err}");
        drop(live);
        assert!(!path.exists(), "socket file removed on drop");
        std::fs::write(&path, b"not a socket").unwrap();
        let err = Listener::bind(&spec, 16).unwrap_err().to_string();
        assert!(err.contains("not a socket"), "{err}");
    }
}
