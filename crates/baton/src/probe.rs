//! Active checks: readiness (`http:`, `tcp`, `exec:`; `delay:` and
//! `notify` need no task) and the health checks of a canary or a bake.
//!
//! They must reach one generation and no other. With shared sockets,
//! `http` and `tcp` go to the generation's private probe listener (fd named
//! `baton-probe`), which only that generation holds. With steered traffic
//! they go to the real listening address from a source port in baton's
//! reserved range on loopback ([`Source`]); the kernel's program sends
//! exactly those connections to the probe target (see `steer::program`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

use crate::config::ReadySpec;
use crate::steer::program::PortRange;

/// Pause between attempts.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// One attempt's limit.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive non-2xx HTTP answers that fail the candidate: the app is
/// up and says it is unhealthy, so waiting for the full timeout is moot.
pub const HTTP_FAILURE_THRESHOLD: u32 = 3;

/// Where a probe connects from.
#[derive(Clone, Default)]
pub struct Source(Option<Arc<Ports>>);

struct Ports {
    range: PortRange,
    next: AtomicU32,
}

impl Source {
    /// Any source: the probe goes to a listener only its target holds.
    pub fn any() -> Self {
        Self(None)
    }

    /// A loopback source port from `range`, in turn, so a port's last
    /// connection has long gone when it comes round again.
    pub fn reserved(range: PortRange) -> Self {
        Self(Some(Arc::new(Ports {
            range,
            next: AtomicU32::new(0),
        })))
    }
}

/// Connects to `addr` from `source`.
pub async fn connect(addr: SocketAddr, source: &Source) -> io::Result<TcpStream> {
    let Some(ports) = &source.0 else {
        return TcpStream::connect(addr).await;
    };
    let loopback: IpAddr = if addr.is_ipv4() {
        Ipv4Addr::LOCALHOST.into()
    } else {
        Ipv6Addr::LOCALHOST.into()
    };
    let mut last = None;
    // A port still in use (a previous probe's connection, another
    // process) is skipped for the next one.
    for _ in 0..ports.range.len().min(16) {
        let n = ports.next.fetch_add(1, Ordering::Relaxed) as usize % ports.range.len();
        let port = ports.range.first + n as u16;
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        if let Err(e) = socket.bind(SocketAddr::new(loopback, port)) {
            last = Some(e);
            continue;
        }
        match socket.connect(addr).await {
            Ok(stream) => {
                // Closed with a reset, not TIME_WAIT: the port is soon
                // reused for the same address.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                return Ok(stream);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable
                ) =>
            {
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no probe port available")))
}

/// Probes `GET path` until a 2xx (Ok) or `HTTP_FAILURE_THRESHOLD`
/// consecutive non-2xx answers (Err). Connection errors just retry: the
/// overall ready timeout bounds the wait.
pub async fn http(addr: SocketAddr, path: &str, source: &Source) -> Result<String, String> {
    let mut bad = 0;
    loop {
        match tokio::time::timeout(ATTEMPT_TIMEOUT, http_once(addr, path, source)).await {
            Ok(Ok(code)) if (200..300).contains(&code) => return Ok(format!("http {path} {code}")),
            Ok(Ok(code)) => {
                bad += 1;
                if bad >= HTTP_FAILURE_THRESHOLD {
                    return Err(format!(
                        "health check GET {path} answered {code} {bad} times in a row"
                    ));
                }
            }
            Ok(Err(_)) | Err(_) => bad = 0,
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

async fn http_once(
    addr: SocketAddr,
    path: &str,
    source: &Source,
) -> Result<u16, Box<dyn std::error::Error + Send + Sync>> {
    let stream = connect(addr, source).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::USER_AGENT, "baton-probe")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let res = sender.send_request(req).await;
    conn.abort();
    Ok(res?.status().as_u16())
}

/// Ready once the app has accepted a connection on `listener` (its own
/// socket, which baton holds too): the kernel completes the handshake by
/// itself, so a successful connect proves nothing; the accept queue
/// emptying does.
pub async fn tcp(
    addr: SocketAddr,
    listener: BorrowedFd<'_>,
    source: &Source,
) -> Result<String, String> {
    loop {
        if let Ok(result) =
            tokio::time::timeout(ATTEMPT_TIMEOUT, tcp_once(addr, listener, source)).await
        {
            match result {
                Ok(words) => return Ok(words),
                Err(TcpError::Watch(e)) => return Err(e),
                Err(TcpError::Connect) => {}
            }
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

enum TcpError {
    Connect,
    Watch(String),
}

async fn tcp_once(
    addr: SocketAddr,
    listener: BorrowedFd<'_>,
    source: &Source,
) -> Result<String, TcpError> {
    // An empty queue right after connect() may only mean the handshake's
    // last ACK has not been processed yet; past this, it means accepted.
    const SETTLE: Duration = Duration::from_millis(50);
    // Held open until the app accepts it.
    let _stream = connect(addr, source).await.map_err(|_| TcpError::Connect)?;
    let connected = tokio::time::Instant::now();
    let mut queued = false;
    loop {
        match baton_sys::tcp_accept_queue_len(listener) {
            Ok(0) if queued || connected.elapsed() >= SETTLE => return Ok("tcp accept".into()),
            Ok(0) => {}
            Ok(_) => queued = true,
            Err(e) => {
                return Err(TcpError::Watch(format!(
                    "reading the listener's state: {e}"
                )))
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs `sh -c COMMAND` until it exits 0. The command gets
/// `BATON_GENERATION`, `BATON_PID` and, when there is one,
/// `BATON_PROBE_ADDR` (and with steered traffic `BATON_PROBE_PORTS`, the
/// source ports that reach the generation: `curl --local-port`).
pub async fn exec(command: &str, env: &[(String, String)]) -> Result<String, String> {
    loop {
        match exec_once(command, env).await {
            Ok(words) => return Ok(words),
            Err(ExecError::Spawn(e)) => return Err(e),
            Err(ExecError::Failed) => {}
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

enum ExecError {
    Spawn(String),
    Failed,
}

async fn exec_once(command: &str, env: &[(String, String)]) -> Result<String, ExecError> {
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match cmd.status().await {
        Ok(s) if s.success() => Ok(format!("exec {command:?} exited 0")),
        Ok(_) => Err(ExecError::Failed),
        Err(e) => Err(ExecError::Spawn(format!(
            "cannot run the check command {command:?}: {e}"
        ))),
    }
}

/// One health check: `Ok` with what passed, or `Err` with why not. Each
/// is bounded by [`ATTEMPT_TIMEOUT`].
pub async fn health_once(
    spec: &ReadySpec,
    addr: Option<SocketAddr>,
    listener: Option<BorrowedFd<'_>>,
    source: &Source,
    env: &[(String, String)],
) -> Result<String, String> {
    let attempt = async {
        match (spec, addr) {
            (ReadySpec::Http(path), Some(addr)) => match http_once(addr, path, source).await {
                Ok(code) if (200..300).contains(&code) => Ok(format!("GET {path} answered {code}")),
                Ok(code) => Err(format!("GET {path} answered {code}")),
                Err(e) => Err(format!("GET {path}: {e}")),
            },
            (ReadySpec::Tcp, Some(addr)) => match listener {
                Some(fd) => tcp_once(addr, fd, source).await.map_err(|e| match e {
                    TcpError::Connect => "connect failed".to_owned(),
                    TcpError::Watch(e) => e,
                }),
                None => Err("no listener to watch".into()),
            },
            (ReadySpec::Exec(cmd), _) => exec_once(cmd, env).await.map_err(|e| match e {
                ExecError::Spawn(e) => e,
                ExecError::Failed => format!("{cmd:?} failed"),
            }),
            _ => Err("the check has no address to reach".into()),
        }
    };
    tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {}",
                humantime::format_duration(ATTEMPT_TIMEOUT)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn serve_status(code: u16) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let resp =
                    format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_ok_and_unhealthy() {
        let any = Source::any();
        assert!(http(serve_status(204).await, "/healthz", &any)
            .await
            .is_ok());
        let err = http(serve_status(500).await, "/healthz", &any)
            .await
            .unwrap_err();
        assert!(err.contains("500"), "{err}");
    }

    /// Whether a client connection to `port` on 127.0.0.1 is established,
    /// per the kernel's table (client side: remote port = `port`).
    fn connected_to(port: u16) -> bool {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let remote = format!("0100007F:{port:04X}");
        table.lines().skip(1).any(|row| {
            let f: Vec<&str> = row.split_whitespace().collect();
            // rem_address is column 2, st column 3 (01 = ESTABLISHED).
            f.get(2) == Some(&remote.as_str()) && f.get(3) == Some(&"01")
        })
    }

    /// The tcp probe finishes only once its connection has been accepted:
    /// with the connection established and waiting in the accept queue
    /// for many times the probe's settle time, it must still be waiting;
    /// once accepted, it must finish.
    #[tokio::test]
    async fn tcp_waits_for_accept() {
        /// Far longer than the probe's 50 ms settle time.
        const NOT_ACCEPTED: Duration = Duration::from_millis(500);
        const BOUND: Duration = Duration::from_secs(10);
        let std_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std_l.local_addr().unwrap();
        let copy = std_l.try_clone().unwrap();
        use std::os::fd::AsFd;
        let mut probe = tokio::spawn(async move { tcp(addr, copy.as_fd(), &Source::any()).await });
        // Positive control: the probe really connected (it is waiting on a
        // queued connection, not on something else).
        let deadline = tokio::time::Instant::now() + BOUND;
        while !connected_to(addr.port()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the probe never connected"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Nobody accepts: the probe must not finish.
        let early = tokio::time::timeout(NOT_ACCEPTED, &mut probe).await;
        assert!(
            early.is_err(),
            "probe finished without an accept: {early:?}"
        );
        std_l.set_nonblocking(true).unwrap();
        let (_conn, _) = std_l
            .accept()
            .expect("the probe's connection was waiting in the queue");
        let done = tokio::time::timeout(BOUND, probe)
            .await
            .expect("probe did not finish after the accept")
            .unwrap();
        assert_eq!(done, Ok("tcp accept".to_owned()));
    }

    #[tokio::test]
    async fn exec_until_zero() {
        assert!(exec("test \"$X\" = 1", &[("X".into(), "1".into())])
            .await
            .is_ok());
    }

    /// With steered traffic a probe comes from the reserved range on
    /// loopback, which is what the kernel's program recognises; ports
    /// rotate, and a busy one is skipped.
    #[tokio::test]
    async fn reserved_source_ports_on_loopback() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let range = PortRange {
            first: 61900,
            last: 61903,
        };
        // Someone else holds the first port.
        let squatter = std::net::TcpListener::bind("127.0.0.1:61900");
        let source = Source::reserved(range);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let s = connect(addr, &source).await.unwrap();
            let (_conn, peer) = l.accept().unwrap();
            assert!(peer.ip().is_loopback(), "{peer}");
            assert!(range.contains(peer.port()), "{peer}");
            assert_eq!(s.local_addr().unwrap(), peer);
            seen.push(peer.port());
        }
        if squatter.is_ok() {
            assert!(!seen.contains(&61900), "{seen:?}");
        }
        seen.dedup();
        assert_eq!(seen.len(), 3, "ports rotate: {seen:?}");
    }
}
