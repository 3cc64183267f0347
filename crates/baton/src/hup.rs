//! Noticing, without polling, that a listening socket stopped listening.
//!
//! An app that calls `shutdown()` on its copy of a listener stops it for
//! every holder ([`crate::steer::Sockets::recover_detached`] replaces it).
//! The kernel then reports the socket as hung up (`EPOLLHUP`, which epoll
//! always reports, whatever events were asked for), and nothing else: new
//! connections on a listener are `EPOLLIN`, which is not asked for, so a
//! busy listener never wakes baton. Baton used to look every 100 ms, which
//! kept an idle baton waking ten times a second.
//!
//! The watched set lives in an epoll instance of its own, registered in
//! tokio's. Epoll keys a registration on the open file, not the descriptor:
//! a socket baton closed but an app still holds would stay registered. So
//! the instance is not edited but rebuilt, whole, whenever the set of
//! sockets changes ([`Sockets::version`](crate::steer::Sockets::version)).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use tokio::io::unix::AsyncFd;

use crate::steer::Sockets;

/// Wakes when one of the watched sockets hangs up.
pub struct HupWatch {
    epoll: Option<AsyncFd<OwnedFd>>,
    /// The [`Sockets::version`] the instance was built for.
    version: Option<u64>,
}

impl HupWatch {
    pub fn new() -> Self {
        Self {
            epoll: None,
            version: None,
        }
    }

    /// Watches `sockets`' listening TCP sockets, rebuilding the instance if
    /// they changed since the last call.
    pub fn sync(&mut self, sockets: &Sockets) -> io::Result<()> {
        if self.version == Some(sockets.version()) {
            return Ok(());
        }
        // Dropped first: its registrations go with it.
        self.epoll = None;
        self.version = None;
        self.epoll = Some(build(&sockets.tcp_listeners())?);
        self.version = Some(sockets.version());
        Ok(())
    }

    /// Resolves when a watched socket has hung up; never, if nothing is
    /// watched. Cancel-safe. A socket that stays hung up does not wake it
    /// again until the set is rebuilt.
    pub async fn hung_up(&self) -> io::Result<()> {
        let Some(epoll) = &self.epoll else {
            return std::future::pending().await;
        };
        let mut guard = epoll.readable().await?;
        guard.clear_ready();
        Ok(())
    }
}

fn build(fds: &[BorrowedFd<'_>]) -> io::Result<AsyncFd<OwnedFd>> {
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    for fd in fds {
        // No events asked for: hang-ups and errors are reported anyway.
        epoll.add(fd.as_fd(), EpollEvent::new(EpollFlags::empty(), 0))?;
    }
    // The instance is readable while a registered socket has hung up.
    baton_sys::async_fd(epoll.0)
}

#[cfg(test)]
mod tests {
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::time::Duration;

    use super::*;

    /// A hang-up wakes the watch; a connection arriving does not.
    #[tokio::test]
    async fn a_shutdown_wakes_it_and_a_connection_does_not() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let epoll = build(&[l.as_fd()]).unwrap();
        let watch = HupWatch {
            epoll: Some(epoll),
            version: Some(0),
        };
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(200), watch.hung_up()).await;
        assert!(quiet.is_err(), "a queued connection woke the watch");
        // What an app's shutdown() does to every holder of the socket.
        let copy = std::net::TcpStream::from(l.as_fd().try_clone_to_owned().unwrap());
        copy.shutdown(Shutdown::Both).unwrap();
        tokio::time::timeout(Duration::from_secs(10), watch.hung_up())
            .await
            .expect("the hang-up did not wake the watch")
            .unwrap();
    }
}
