//! A deliberately small HTTP/1.1 client for load generation.
//!
//! The load generator shares two cores with the app and the supervisor, so
//! every microsecond it spends is taken from what it measures. This client
//! does one thing: `GET` with a prebuilt request, parse the status line and
//! the few headers that decide framing (`Content-Length`, `Connection`),
//! read the body, and classify what went wrong. Its buffer is reused, so a
//! keep-alive request allocates nothing.
//!
//! Keep-alive follows what real clients do (RFC 9112 §9.3.1): when a
//! *reused* connection is closed or reset before any byte of the response
//! arrives, the server may simply have closed an idle connection as the
//! request was sent, so the request is sent again on a new connection and
//! counted as retried. Everything else is a failure, by cause.
//!
//! The first response on each new connection is also read for the
//! `generation=N` the example app puts in its body: a connection belongs
//! to one app process, so that is where the generation can change, and a
//! keep-alive request pays nothing for it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a request failed. The order is the order of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// The connection was refused: nothing was listening.
    Refused,
    /// The connection was reset (RST), during connect or the exchange.
    Reset,
    /// No complete response within the request timeout.
    Timeout,
    /// A fresh connection was closed before any byte of the response.
    ClosedBeforeResponse,
    /// The connection was closed in the middle of the response.
    Truncated,
    /// The server answered with a status other than 2xx.
    Non2xx,
    /// The response could not be parsed (or uses chunked encoding, which
    /// this client does not implement; the example app never sends it).
    BadResponse,
    /// A local error of the load generator (e.g. out of ephemeral ports).
    Client,
}

impl Cause {
    pub const ALL: [Cause; 8] = [
        Cause::Refused,
        Cause::Reset,
        Cause::Timeout,
        Cause::ClosedBeforeResponse,
        Cause::Truncated,
        Cause::Non2xx,
        Cause::BadResponse,
        Cause::Client,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cause::Refused => "refused",
            Cause::Reset => "reset",
            Cause::Timeout => "timeout",
            Cause::ClosedBeforeResponse => "closed_before_response",
            Cause::Truncated => "truncated",
            Cause::Non2xx => "non_2xx",
            Cause::BadResponse => "bad_response",
            Cause::Client => "client",
        }
    }

    /// Maps a socket error to a cause.
    pub fn of_io(e: &io::Error) -> Cause {
        use io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Cause::Refused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Cause::Reset,
            K::TimedOut | K::WouldBlock => Cause::Timeout,
            K::UnexpectedEof => Cause::ClosedBeforeResponse,
            _ => Cause::Client,
        }
    }
}

/// The result of one request, after any retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed(Cause),
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLen {
    Exact(usize),
    /// No length: the body ends when the server closes (HTTP/1.0 style).
    UntilClose,
}

/// The parsed status line and framing headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// Bytes up to and including the blank line.
    pub head_len: usize,
    pub body: BodyLen,
    /// The server will close the connection after this response.
    pub close: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("bad status line")]
    StatusLine,
    #[error("bad header line")]
    Header,
    #[error("bad Content-Length")]
    ContentLength,
    #[error("chunked transfer coding is not supported")]
    Chunked,
    #[error("response head larger than {MAX_HEAD} bytes")]
    TooLarge,
}

/// Larger response heads are refused: the targets send a few hundred bytes.
pub const MAX_HEAD: usize = 8 * 1024;

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |p| p + 1);
    &s[start..end.max(start)]
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| trim(t).eq_ignore_ascii_case(token))
}

/// Parses a response head from the start of `buf`: `Ok(None)` until the
/// blank line has arrived.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, ParseError> {
    let Some(head_len) = find_head_end(buf) else {
        return if buf.len() > MAX_HEAD {
            Err(ParseError::TooLarge)
        } else {
            Ok(None)
        };
    };
    let mut lines = buf[..head_len - 4]
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lines.next().ok_or(ParseError::StatusLine)?;
    // "HTTP/1.1 200 OK"
    let http11 = match status_line.get(..9) {
        Some(b"HTTP/1.1 ") => true,
        Some(b"HTTP/1.0 ") => false,
        _ => return Err(ParseError::StatusLine),
    };
    let code = status_line.get(9..12).ok_or(ParseError::StatusLine)?;
    if !code.iter().all(u8::is_ascii_digit) || status_line.get(12).is_some_and(|b| *b != b' ') {
        return Err(ParseError::StatusLine);
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    let mut length: Option<usize> = None;
    let mut close = !http11;
    for line in lines {
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or(ParseError::Header)?;
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"content-length") {
            let text = std::str::from_utf8(value).map_err(|_| ParseError::ContentLength)?;
            let n: usize = text.parse().map_err(|_| ParseError::ContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(ParseError::ContentLength);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"connection") {
            if has_token(value, b"close") {
                close = true;
            } else if has_token(value, b"keep-alive") {
                close = false;
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") && !value.is_empty() {
            return Err(ParseError::Chunked);
        }
    }
    let body = if matches!(status, 100..=199 | 204 | 304) {
        BodyLen::Exact(0)
    } else {
        match length {
            Some(n) => BodyLen::Exact(n),
            None => {
                close = true;
                BodyLen::UntilClose
            }
        }
    };
    Ok(Some(Head {
        status,
        head_len,
        body,
        close,
    }))
}

/// Builds the request bytes once: `GET / HTTP/1.1` with `Host`, and
/// `Connection: close` when connections are not reused.
pub fn request_bytes(addr: SocketAddr, path: &str, keep_alive: bool) -> Arc<[u8]> {
    let conn = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: baton-bench\r\n{conn}\r\n")
        .into_bytes()
        .into()
}

/// What went wrong in one exchange on one connection.
enum Fail {
    /// A reused connection closed before any response byte: retry.
    Unanswered,
    Failed(Cause),
}

/// One load-generating connection slot: at most one connection at a time.
pub struct Client {
    addr: SocketAddr,
    request: Arc<[u8]>,
    keep_alive: bool,
    timeout: Duration,
    buf: Vec<u8>,
    conn: Option<TcpStream>,
    retried: bool,
    /// `generation=N` from the first response on the current connection.
    generation: Option<u64>,
}

impl Client {
    pub fn new(addr: SocketAddr, request: Arc<[u8]>, keep_alive: bool, timeout: Duration) -> Self {
        Client {
            addr,
            request,
            keep_alive,
            timeout,
            buf: Vec::with_capacity(4096),
            conn: None,
            retried: false,
            generation: None,
        }
    }

    /// The app generation that answered the last successful request, if its
    /// body said (`generation=N`, as the example app's `GET /` does).
    pub fn generation(&self) -> Option<u64> {
        self.generation
    }

    /// Sends one request; returns its outcome and whether it was retried
    /// on a new connection. The timeout covers the whole request, retry
    /// included.
    pub async fn get(&mut self) -> (Outcome, bool) {
        self.retried = false;
        let outcome = match tokio::time::timeout(self.timeout, self.get_inner()).await {
            Ok(o) => o,
            Err(_) => {
                // The stream (if any) was dropped with the future.
                self.conn = None;
                Outcome::Failed(Cause::Timeout)
            }
        };
        (outcome, self.retried)
    }

    async fn get_inner(&mut self) -> Outcome {
        if let Some(mut stream) = self.conn.take() {
            match self.exchange(&mut stream, true).await {
                Ok(keep) => {
                    if keep {
                        self.conn = Some(stream);
                    }
                    return Outcome::Ok;
                }
                Err(Fail::Failed(c)) => return Outcome::Failed(c),
                Err(Fail::Unanswered) => self.retried = true,
            }
        }
        self.generation = None;
        let mut stream = match TcpStream::connect(self.addr).await {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(Cause::of_io(&e)),
        };
        let _ = stream.set_nodelay(true);
        match self.exchange(&mut stream, false).await {
            Ok(true) => {
                self.conn = Some(stream);
                Outcome::Ok
            }
            Ok(false) => {
                self.linger_for_close(&mut stream).await;
                Outcome::Ok
            }
            Err(Fail::Failed(c)) => Outcome::Failed(c),
            Err(Fail::Unanswered) => Outcome::Failed(Cause::ClosedBeforeResponse),
        }
    }

    /// When the server announced it will close, wait briefly for its FIN
    /// so that the server, not us, holds the TIME_WAIT state: otherwise a
    /// new-connection-per-request load runs out of ephemeral ports on
    /// kernels without loopback TIME_WAIT reuse. Not part of the latency.
    async fn linger_for_close(&mut self, stream: &mut TcpStream) {
        let mut byte = [0u8; 1];
        let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await;
    }

    /// Writes the request and reads one response. `Ok(keep)` says whether
    /// the connection may be reused.
    async fn exchange(&mut self, stream: &mut TcpStream, reused: bool) -> Result<bool, Fail> {
        let early = |e: &io::Error| {
            if reused {
                Fail::Unanswered
            } else {
                Fail::Failed(Cause::of_io(e))
            }
        };
        if let Err(e) = stream.write_all(&self.request).await {
            return Err(early(&e));
        }
        self.buf.clear();
        let mut head: Option<Head> = None;
        loop {
            let n = match stream.read_buf(&mut self.buf).await {
                Ok(n) => n,
                Err(e) if self.buf.is_empty() => return Err(early(&e)),
                Err(e) => return Err(Fail::Failed(Cause::of_io(&e))),
            };
            if n == 0 {
                // EOF.
                if self.buf.is_empty() {
                    return Err(if reused {
                        Fail::Unanswered
                    } else {
                        Fail::Failed(Cause::ClosedBeforeResponse)
                    });
                }
                return match head {
                    Some(h) if h.body == BodyLen::UntilClose => {
                        if !reused {
                            self.generation = generation_of(&self.buf[h.head_len..]);
                        }
                        Ok(finish(h, false)?)
                    }
                    _ => Err(Fail::Failed(Cause::Truncated)),
                };
            }
            if head.is_none() {
                head = parse_head(&self.buf).map_err(|_| Fail::Failed(Cause::BadResponse))?;
            }
            if let Some(h) = head {
                if let BodyLen::Exact(len) = h.body {
                    let want = h.head_len + len;
                    if self.buf.len() >= want {
                        if !reused {
                            self.generation = generation_of(&self.buf[h.head_len..want]);
                        }
                        return finish(h, self.keep_alive);
                    }
                    // Make room for the rest of the body in one go.
                    self.buf.reserve(want - self.buf.len());
                }
            }
        }
    }
}

/// The `N` of the first `generation=N` in a response body.
pub fn generation_of(body: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"generation=";
    let at = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&body[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Decides the outcome of a complete response.
fn finish(h: Head, keep_alive: bool) -> Result<bool, Fail> {
    if !(200..300).contains(&h.status) {
        return Err(Fail::Failed(Cause::Non2xx));
    }
    Ok(keep_alive && !h.close)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str) -> Result<Option<Head>, ParseError> {
        parse_head(s.as_bytes())
    }

    #[test]
    fn parses_content_length_and_keep_alive() {
        let r = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 12\r\n\r\nhello world\n";
        let h = head(r).expect("parses").expect("complete");
        assert_eq!(h.status, 200);
        assert_eq!(h.body, BodyLen::Exact(12));
        assert_eq!(h.head_len, r.len() - 12);
        assert!(!h.close);
    }

    #[test]
    fn incomplete_head_waits() {
        assert_eq!(head("HTTP/1.1 200 OK\r\ncontent-len"), Ok(None));
        assert_eq!(head(""), Ok(None));
    }

    #[test]
    fn connection_close_and_http10() {
        let h =
            head("HTTP/1.1 200 OK\r\nConnection: Keep-Alive, close\r\nContent-Length: 0\r\n\r\n")
                .expect("parses")
                .expect("complete");
        assert!(h.close);
        let h = head("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
            .expect("parses")
            .expect("complete");
        assert!(h.close, "HTTP/1.0 closes by default");
        let h = head("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
            .expect("parses")
            .expect("complete");
        assert!(!h.close);
    }

    #[test]
    fn no_length_means_until_close() {
        let h = head("HTTP/1.1 503 Service Unavailable\r\n\r\n")
            .expect("parses")
            .expect("complete");
        assert_eq!(h.status, 503);
        assert_eq!(h.body, BodyLen::UntilClose);
        assert!(h.close);
        let h = head("HTTP/1.1 204 No Content\r\n\r\n")
            .expect("parses")
            .expect("complete");
        assert_eq!(h.body, BodyLen::Exact(0));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(head("HTTP/2 200\r\n\r\n"), Err(ParseError::StatusLine));
        assert_eq!(head("HTTP/1.1 2x0 OK\r\n\r\n"), Err(ParseError::StatusLine));
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nno colon\r\n\r\n"),
            Err(ParseError::Header)
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
            Err(ParseError::ContentLength)
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(ParseError::ContentLength)
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(ParseError::Chunked)
        );
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert_eq!(head(&huge), Err(ParseError::TooLarge));
    }

    #[test]
    fn generation_from_the_body() {
        assert_eq!(
            generation_of(b"version=dev generation=12 pid=345\n"),
            Some(12)
        );
        assert_eq!(generation_of(b"generation=0"), Some(0));
        assert_eq!(generation_of(b"version=dev pid=345\n"), None);
        assert_eq!(generation_of(b"generation=x"), None);
        assert_eq!(generation_of(b""), None);
    }

    #[test]
    fn status_without_reason() {
        let h = head("HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n")
            .expect("parses")
            .expect("complete");
        assert_eq!(h.status, 200);
    }

    #[test]
    fn request_has_host_and_close() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let ka = request_bytes(addr, "/", true);
        assert_eq!(
            &*ka,
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: baton-bench\r\n\r\n"
        );
        let close = String::from_utf8(request_bytes(addr, "/", false).to_vec()).expect("utf8");
        assert!(close.ends_with("Connection: close\r\n\r\n"));
    }

    #[test]
    fn non_2xx_is_a_failure_and_close_is_not_reused() {
        let h = |status, close| Head {
            status,
            head_len: 0,
            body: BodyLen::Exact(0),
            close,
        };
        assert!(matches!(finish(h(200, false), true), Ok(true)));
        assert!(matches!(finish(h(200, true), true), Ok(false)));
        assert!(matches!(finish(h(200, false), false), Ok(false)));
        assert!(matches!(
            finish(h(502, false), true),
            Err(Fail::Failed(Cause::Non2xx))
        ));
    }

    /// End to end against a scripted server on loopback: a reused
    /// connection closed before the response is retried, not failed.
    #[test]
    fn reused_connection_closed_is_retried() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server = tokio::spawn(async move {
                const OK1: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\ngeneration=1";
                const OK2: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\ngeneration=2";
                // First connection: answer one request, then close it
                // without answering the second.
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = vec![0u8; 1024];
                let _ = s.read(&mut buf).await;
                s.write_all(OK1).await.expect("write");
                let _ = s.read(&mut buf).await;
                drop(s);
                // Second connection (another app process): answer. Third:
                // read the request and close without answering (a fresh
                // connection: a failure).
                let (mut s, _) = listener.accept().await.expect("accept");
                let _ = s.read(&mut buf).await;
                s.write_all(OK2).await.expect("write");
                let (mut s3, _) = listener.accept().await.expect("accept");
                let _ = s3.read(&mut buf).await;
                drop(s3);
                drop(s);
            });
            let req = request_bytes(addr, "/", true);
            let mut c = Client::new(addr, req, true, Duration::from_secs(5));
            assert_eq!(c.get().await, (Outcome::Ok, false));
            assert_eq!(c.generation(), Some(1));
            assert_eq!(
                c.get().await,
                (Outcome::Ok, true),
                "retried on a new connection"
            );
            assert_eq!(c.generation(), Some(2), "read on the new connection");
            c.conn = None; // force a fresh connection
            assert_eq!(
                c.get().await,
                (Outcome::Failed(Cause::ClosedBeforeResponse), false)
            );
            assert_eq!(c.generation(), None, "no answer, no generation");
            server.await.expect("server");
        });
    }
}
