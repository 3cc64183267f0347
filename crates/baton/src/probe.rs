//! Active readiness checks (`http:`, `tcp`, `exec:`, `delay:`). `notify`
//! needs no task: the supervisor reacts to `READY=1` itself.
//!
//! `http` and `tcp` go to the generation's private probe listener (fd named
//! `baton-probe`), which only that generation holds, so a probe can never
//! be answered by the old generation sharing the public sockets.

use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Pause between attempts.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// One attempt's limit.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive non-2xx HTTP answers that fail the candidate: the app is
/// up and says it is unhealthy, so waiting for the full timeout is moot.
pub const HTTP_FAILURE_THRESHOLD: u32 = 3;

/// Probes `GET path` until a 2xx (Ok) or `HTTP_FAILURE_THRESHOLD`
/// consecutive non-2xx answers (Err). Connection errors just retry: the
/// overall ready timeout bounds the wait.
pub async fn http(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut bad = 0;
    loop {
        match tokio::time::timeout(ATTEMPT_TIMEOUT, http_once(addr, path)).await {
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
) -> Result<u16, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(addr).await?;
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

/// Ready once the app has accepted a connection on the probe listener:
/// the kernel completes the handshake by itself, so a successful connect
/// proves nothing; the listener's accept queue emptying does.
pub async fn tcp(addr: SocketAddr, listener: BorrowedFd<'_>) -> Result<String, String> {
    // An empty queue right after connect() may only mean the handshake's
    // last ACK has not been processed yet; past this, it means accepted.
    const SETTLE: Duration = Duration::from_millis(50);
    loop {
        // Held open until the app accepts it.
        if let Ok(Ok(_stream)) =
            tokio::time::timeout(ATTEMPT_TIMEOUT, TcpStream::connect(addr)).await
        {
            let connected = tokio::time::Instant::now();
            let mut queued = false;
            loop {
                match baton_sys::tcp_accept_queue_len(listener) {
                    Ok(0) if queued || connected.elapsed() >= SETTLE => {
                        return Ok("tcp accept".into())
                    }
                    Ok(0) => {}
                    Ok(_) => queued = true,
                    Err(e) => return Err(format!("reading probe listener state: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// Runs `sh -c COMMAND` until it exits 0. The command gets
/// `BATON_GENERATION`, `BATON_PID` and, when there is one,
/// `BATON_PROBE_ADDR`.
pub async fn exec(command: &str, env: &[(String, String)]) -> Result<String, String> {
    loop {
        let mut cmd = tokio::process::Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(command)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        match cmd.status().await {
            Ok(s) if s.success() => return Ok(format!("exec {command:?} exited 0")),
            Ok(_) => {}
            Err(e) => return Err(format!("cannot run readiness command {command:?}: {e}")),
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
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
        assert!(http(serve_status(204).await, "/healthz").await.is_ok());
        let err = http(serve_status(500).await, "/healthz").await.unwrap_err();
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
        let mut probe = tokio::spawn(async move { tcp(addr, copy.as_fd()).await });
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
}
