//! The listening sockets baton owns for its whole life.
//!
//! Binding happens once, before any app starts; every generation receives
//! the same sockets, so a connection that arrives while no app accepts
//! (start, restart, cutover) waits in the kernel's accept queue. A
//! datagram socket (`udp:`) is bound, not listening: datagrams that arrive
//! while no app reads wait in its receive buffer.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
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
    /// Passed in by a service manager, which keeps its own copy.
    pub(crate) inherited: bool,
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
                inherited: false,
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
                    inherited: false,
                })
            }
            ListenAddr::Inherited => Err(err(
                "no socket of that name was inherited (see LISTEN_FDNAMES)".into(),
            )),
        }
    }

    /// A socket inherited for `spec` (socket activation), checked by
    /// [`adopt`]. Its Unix socket file, if any, is never removed: it
    /// belongs to whoever created it.
    pub(crate) fn inherited(spec: &ListenSpec, adopted: Adopted) -> Self {
        Self {
            name: spec.name.clone(),
            address: adopted.address,
            socket: adopted.socket,
            unix_file: None,
            inherited: true,
        }
    }

    /// The socket file this listener created (and removes on drop), with
    /// its inode, for the hand-over to a new baton image.
    pub(crate) fn unix_file(&self) -> Option<&(PathBuf, u64)> {
        self.unix_file.as_ref()
    }

    /// A listener handed over by the previous baton image, as it was.
    pub(crate) fn handed_over(
        name: String,
        address: ListenAddr,
        socket: Socket,
        unix_file: Option<(PathBuf, u64)>,
        inherited: bool,
    ) -> Self {
        Self {
            name,
            address,
            socket,
            unix_file,
            inherited,
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
            inherited: false,
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
            inherited: false,
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

/// The sockets baton was started with by a service manager (systemd
/// socket activation, or its fd store after a restart), by name, until a
/// declared listener takes each.
#[derive(Debug, Default)]
pub struct InheritedSockets {
    sockets: Vec<(String, OwnedFd)>,
    /// Whether baton was started with `LISTEN_FDS` at all.
    activated: bool,
}

impl InheritedSockets {
    pub fn new(sockets: Option<Vec<(String, OwnedFd)>>) -> Self {
        Self {
            activated: sockets.is_some(),
            sockets: sockets.unwrap_or_default(),
        }
    }

    /// Takes the socket named `spec.name`. Two of that name are an error:
    /// which one is meant cannot be told (give each its own
    /// `FileDescriptorName=`).
    pub fn take(&mut self, spec: &ListenSpec) -> Result<Option<Socket>, BindError> {
        let mut found = self
            .sockets
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| *n == spec.name)
            .map(|(i, _)| i);
        let (Some(i), None) = (found.next(), found.next()) else {
            if self.sockets.iter().any(|(n, _)| *n == spec.name) {
                return Err(BindError {
                    name: spec.name.clone(),
                    address: spec.address.to_string(),
                    reason: format!(
                        "more than one inherited socket is named {}; give each its own name \
                         (FileDescriptorName= in the .socket unit)",
                        spec.name
                    ),
                });
            }
            return match spec.address {
                ListenAddr::Inherited => Err(BindError {
                    name: spec.name.clone(),
                    address: spec.address.to_string(),
                    reason: self.missing(&spec.name),
                }),
                _ => Ok(None),
            };
        };
        Ok(Some(Socket::from(self.sockets.remove(i).1)))
    }

    fn missing(&self, name: &str) -> String {
        if !self.activated {
            return format!(
                "no address given, and baton was not started with sockets (LISTEN_FDS) to \
                 take one named {name} from"
            );
        }
        let names: Vec<&str> = self.sockets.iter().map(|(n, _)| n.as_str()).collect();
        format!(
            "no inherited socket is named {name} (the unclaimed ones are named: {})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        )
    }

    /// Closes the sockets no listener took, saying so: a `.socket` unit
    /// keeps its own copy, so nothing is refused because of it.
    pub fn close_unclaimed(&mut self) {
        for (name, _) in self.sockets.drain(..) {
            tracing::warn!(
                name = %name,
                "ignoring an inherited socket that no listener names (declare --listen {name})"
            );
        }
    }
}

/// An inherited socket checked against its declared listener.
pub(crate) struct Adopted {
    pub address: ListenAddr,
    pub socket: Socket,
}

/// Checks an inherited socket for `spec`: a stream socket, bound where
/// `spec` says (when it says), listening (`listen()` is called if it is
/// not yet).
pub(crate) fn adopt(spec: &ListenSpec, socket: Socket, backlog: u32) -> Result<Adopted, BindError> {
    let err = |reason: String| BindError {
        name: spec.name.clone(),
        address: spec.address.to_string(),
        reason,
    };
    let inherited = format!("the inherited socket named {}", spec.name);
    let datagram = match socket.r#type() {
        Ok(t) if t == Type::STREAM => false,
        Ok(t) if t == Type::DGRAM => true,
        Ok(_) => {
            return Err(err(format!(
                "{inherited} is neither a stream nor a datagram socket"
            )))
        }
        Err(e) => return Err(err(format!("{inherited}: {}", describe(&e)))),
    };
    let local = socket
        .local_addr()
        .map_err(|e| err(format!("{inherited}: {}", describe(&e))))?;
    let address = if let Some(addr) = local.as_socket() {
        if datagram {
            ListenAddr::Udp(addr)
        } else {
            ListenAddr::Tcp(addr)
        }
    } else if datagram {
        return Err(err(format!(
            "{inherited} is a Unix datagram socket, which baton does not hand over"
        )));
    } else if let Some(path) = local.as_pathname() {
        ListenAddr::Unix(path.to_owned())
    } else {
        return Err(err(format!(
            "{inherited} is not bound to an IP address or a Unix socket path"
        )));
    };
    let matches = match (&spec.address, &address) {
        (ListenAddr::Inherited, _) => true,
        (ListenAddr::Tcp(want), ListenAddr::Tcp(got))
        | (ListenAddr::Udp(want), ListenAddr::Udp(got)) => {
            want.ip() == got.ip() && (want.port() == got.port() || want.port() == 0)
        }
        (ListenAddr::Unix(want), ListenAddr::Unix(got)) => want == got,
        _ => false,
    };
    if !matches {
        return Err(err(format!("{inherited} is bound to {address}")));
    }
    let listening = datagram
        || nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::AcceptConn)
            .map_err(|e| err(format!("{inherited}: {e}")))?;
    if !listening {
        socket
            .listen(backlog.min(i32::MAX as u32) as i32)
            .map_err(|e| err(format!("listening on {inherited}: {}", describe(&e))))?;
    }
    Ok(Adopted { address, socket })
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
