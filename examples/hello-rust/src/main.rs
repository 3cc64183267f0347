//! `hello`: the reference app for baton.
//!
//! Serves HTTP/1.1 on every socket-activation fd it receives (fds 3.. per
//! LISTEN_FDS, TCP or Unix stream), reports READY=1 on NOTIFY_SOCKET, and on
//! SIGTERM/SIGINT drains: stops accepting, answers the first request of any
//! connection accepted just before the signal, answers every request from
//! then on with `Connection: close` (so a busy keep-alive client moves to a
//! new connection after its next response, and never sees a connection
//! closed under a request), closes a keep-alive connection only once it has
//! been idle for a short grace, lets in-flight requests finish, exits 0.
//!
//! Usage: `hello [--version-tag TAG] [--listen ADDR] [--delay-ready MS] [--idle-grace MS]`
//! - `--listen` is only used when no fds were passed (default 127.0.0.1:8080).
//! - `--delay-ready` sleeps before serving and sending READY=1 (slow start).
//! - `--idle-grace` (default 500): while draining, how long a keep-alive
//!   connection must have been idle before it is closed. 0 closes idle
//!   connections at once (the old behaviour: a client that sends just then
//!   meets the close and must retry).
//!
//! Endpoints: `GET /` -> `version=.. generation=.. pid=..`, `GET /healthz` -> `ok`.
//!
//! `HELLO_STAMPS=<path>` (opt-in, for baton-bench): append one line per
//! lifecycle moment to `<path>`, `<event> <generation> <pid> <ns>` where `ns`
//! is CLOCK_MONOTONIC in nanoseconds (comparable across processes):
//! - `start`: read first thing in `main`.
//! - `ready`: read right before READY=1 is sent; the line is written just
//!   after the send, so the write does not delay READY.
//! - `drain`: read as soon as the app's signal listener wakes for its drain
//!   signal (SIGTERM/SIGINT), before anything else of the drain.
//! - `exit`: read once the drain is done, right before the process exits.
//!
//! Each line is one `write` on an `O_APPEND` file, so lines from several
//! processes never interleave. Nothing else is written: no per-request cost.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::fs::File;
use std::future::ready;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use listenfd::ListenFd;
use nix::time::{clock_gettime, ClockId};
use sd_notify::NotifyState;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, Notify};

/// Upper bound on how long a drain may wait for in-flight requests.
const DRAIN_CAP: Duration = Duration::from_secs(60);
/// How long a connection accepted just before the drain may take to send
/// its first request. Its client cannot know we are leaving: closing it
/// unanswered would be a failed request, not a keep-alive race.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);
/// While draining, how long a keep-alive connection must have been idle
/// before it is closed (`--idle-grace`).
const IDLE_GRACE: Duration = Duration::from_millis(500);

/// What every connection task holds: the drain flag, and a sender whose
/// drop tells the main task this connection is finished.
#[derive(Clone)]
struct Drain {
    draining: watch::Receiver<bool>,
    _live: mpsc::Sender<()>,
}

struct Args {
    version_tag: Option<String>,
    listen: String,
    delay_ready: Duration,
    idle_grace: Duration,
}

/// Where `HELLO_STAMPS` asked for lifecycle stamps (see the crate docs).
struct Stamps {
    file: Option<File>,
    generation: String,
    pid: u32,
}

impl Stamps {
    /// Opens `$HELLO_STAMPS` for appending, if set. A file that cannot be
    /// opened is reported and the app runs without stamps: measuring must
    /// not stop it from serving.
    fn from_env(generation: &str, pid: u32) -> Stamps {
        let file = std::env::var_os("HELLO_STAMPS").and_then(|path| {
            File::options()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| eprintln!("hello: cannot open HELLO_STAMPS {path:?}: {e}"))
                .ok()
        });
        Stamps {
            file,
            generation: generation.to_owned(),
            pid,
        }
    }

    /// CLOCK_MONOTONIC now, in ns; only read when stamps were asked for.
    fn now(&self) -> Option<u64> {
        self.file.as_ref()?;
        mono_ns()
    }

    /// Appends `<event> <generation> <pid> <ns>` in one write.
    fn write(&self, event: &str, ns: Option<u64>) {
        let (Some(mut file), Some(ns)) = (self.file.as_ref(), ns) else {
            return;
        };
        let line = stamp_line(event, &self.generation, self.pid, ns);
        if let Err(e) = file.write_all(line.as_bytes()) {
            eprintln!("hello: writing HELLO_STAMPS: {e}");
        }
    }
}

fn mono_ns() -> Option<u64> {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).ok()?;
    Some(u64::try_from(t.tv_sec()).ok()? * 1_000_000_000 + u64::try_from(t.tv_nsec()).ok()?)
}

fn stamp_line(event: &str, generation: &str, pid: u32, ns: u64) -> String {
    format!("{event} {generation} {pid} {ns}\n")
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        version_tag: None,
        listen: "127.0.0.1:8080".to_string(),
        delay_ready: Duration::ZERO,
        idle_grace: IDLE_GRACE,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--version-tag" => args.version_tag = Some(value()?),
            "--listen" => args.listen = value()?,
            "--delay-ready" => {
                let ms = value()?;
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| format!("bad --delay-ready {ms:?}"))?;
                args.delay_ready = Duration::from_millis(ms);
            }
            "--idle-grace" => {
                let ms = value()?;
                let ms: u64 = ms.parse().map_err(|_| format!("bad --idle-grace {ms:?}"))?;
                args.idle_grace = Duration::from_millis(ms);
            }
            _ => return Err(format!("unknown argument {flag:?}")),
        }
    }
    Ok(args)
}

/// `--version-tag`, else $APP_VERSION, else ./VERSION, else "dev".
fn version(tag: Option<String>) -> String {
    let non_empty = |s: String| (!s.trim().is_empty()).then(|| s.trim().to_string());
    tag.or_else(|| std::env::var("APP_VERSION").ok().and_then(non_empty))
        .or_else(|| std::fs::read_to_string("VERSION").ok().and_then(non_empty))
        .unwrap_or_else(|| "dev".to_string())
}

enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// Takes every inherited fd. Must run before any thread exists: listenfd
/// removes LISTEN_PID/LISTEN_FDS from the environment.
fn take_listeners(fallback: &str) -> std::io::Result<Vec<StdListener>> {
    let mut fds = ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(vec![StdListener::Tcp(std::net::TcpListener::bind(
            fallback,
        )?)]);
    }
    let mut out = Vec::new();
    for i in 0..fds.len() {
        if let Ok(Some(l)) = fds.take_tcp_listener(i) {
            out.push(StdListener::Tcp(l));
        } else if let Ok(Some(l)) = fds.take_unix_listener(i) {
            out.push(StdListener::Unix(l));
        } else {
            eprintln!(
                "hello: fd {} is not a TCP or Unix stream listener, skipping",
                3 + i
            );
        }
    }
    Ok(out)
}

/// Registers the std listener with tokio (needs a runtime context).
fn to_tokio(l: StdListener) -> std::io::Result<Listener> {
    // Inherited sockets are blocking; tokio requires non-blocking ones.
    Ok(match l {
        StdListener::Tcp(l) => {
            l.set_nonblocking(true)?;
            Listener::Tcp(tokio::net::TcpListener::from_std(l)?)
        }
        StdListener::Unix(l) => {
            l.set_nonblocking(true)?;
            Listener::Unix(tokio::net::UnixListener::from_std(l)?)
        }
    })
}

fn respond(req: &Request<Incoming>, root: &Bytes) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => (StatusCode::OK, root.clone()),
        (&Method::GET, "/healthz") => (StatusCode::OK, Bytes::from_static(b"ok\n")),
        _ => (StatusCode::NOT_FOUND, Bytes::from_static(b"not found\n")),
    };
    // Full has an exact size hint, so hyper writes Content-Length itself.
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}

fn serve_conn<S>(stream: S, drain: Drain, root: Bytes, idle_grace: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Notified at every request: the first one, and activity while draining.
    let request = Arc::new(Notify::new());
    let mut seen_request = false;
    let svc = {
        let request = request.clone();
        let draining = drain.draining.clone();
        service_fn(move |req| {
            request.notify_one();
            let mut resp = respond(&req, &root);
            if *draining.borrow() {
                // The client learns from this response that the connection
                // ends, and takes a new one for its next request: it never
                // meets a close under a request it has sent.
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            ready(Ok::<_, Infallible>(resp))
        })
    };
    // keep-alive is on by default; the timer enables hyper's header read timeout.
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), svc);
    tokio::spawn(async move {
        // Bind the whole struct: an `async move` block that only touched
        // `drain.draining` would capture just that field (edition 2021),
        // drop `_live` early, and let the process exit under this request.
        let mut drain = drain;
        tokio::pin!(conn);
        // Per-connection errors are client resets/timeouts: nothing to do.
        loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = request.notified(), if !seen_request => seen_request = true,
                _ = drain.draining.wait_for(|d| *d) => break,
            }
        }
        if !seen_request {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = request.notified() => {}
                _ = tokio::time::sleep(FIRST_REQUEST_GRACE) => {}
            }
        } else if !idle_grace.is_zero() {
            // A busy connection ends with the `Connection: close` response
            // to its next request; one idle for the grace is closed here.
            loop {
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = request.notified() => {}
                    _ = tokio::time::sleep(idle_grace) => break,
                }
            }
        }
        // Finishes an in-flight request (with `Connection: close`), or
        // closes an idle keep-alive connection now.
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    });
}

async fn accept_loop(listener: Listener, drain: Drain, root: Bytes, idle_grace: Duration) {
    loop {
        let res = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true); // small responses: don't wait on Nagle
                serve_conn(s, drain.clone(), root.clone(), idle_grace);
            }),
            Listener::Unix(l) => l
                .accept()
                .await
                .map(|(s, _)| serve_conn(s, drain.clone(), root.clone(), idle_grace)),
        };
        if let Err(e) = res {
            // e.g. EMFILE: back off instead of spinning.
            eprintln!("hello: accept error: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn run(
    listeners: Vec<StdListener>,
    args: Args,
    root: Bytes,
    banner: String,
    stamps: Stamps,
) -> std::io::Result<()> {
    // Register handlers first so an early SIGTERM drains instead of killing us.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    tokio::pin!(stop);

    if !args.delay_ready.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(args.delay_ready) => {}
            _ = &mut stop => {
                eprintln!("hello: signalled before ready, exiting");
                return Ok(());
            }
        }
    }

    let (start_drain, draining) = watch::channel(false);
    let (live, mut all_done) = mpsc::channel::<()>(1);
    let drain = Drain {
        draining,
        _live: live,
    };
    let mut tasks = Vec::new();
    for l in listeners {
        tasks.push(tokio::spawn(accept_loop(
            to_tokio(l)?,
            drain.clone(),
            root.clone(),
            args.idle_grace,
        )));
    }
    drop(drain);
    eprintln!("{banner} serving {} listeners", tasks.len());
    let ready_at = stamps.now();
    // Errors only mean NOTIFY_SOCKET is unusable, e.g. running standalone.
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status("serving")]);
    stamps.write("ready", ready_at);

    stop.await;
    stamps.write("drain", stamps.now());
    eprintln!("hello: draining");
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
    // Stop accepting: aborting the loops drops the listeners (and their Arcs).
    for t in &tasks {
        t.abort();
    }
    for t in tasks {
        let _ = t.await;
    }
    let _ = start_drain.send(true);
    eprintln!("hello: stopped accepting; finishing open connections");
    // recv() returns None once every connection task has dropped its sender.
    if tokio::time::timeout(DRAIN_CAP, all_done.recv())
        .await
        .is_err()
    {
        eprintln!("hello: drain cap reached, exiting with connections open");
    }
    eprintln!("hello: drained, exiting");
    stamps.write("exit", stamps.now());
    Ok(())
}

fn main() -> ExitCode {
    // Cheap, and only written if stamps were asked for.
    let started = mono_ns();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hello: {e}");
            return ExitCode::from(2);
        }
    };
    let listeners = match take_listeners(&args.listen) {
        Ok(l) if !l.is_empty() => l,
        Ok(_) => {
            eprintln!("hello: no usable listeners");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("hello: cannot bind {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };

    let version = version(args.version_tag.clone());
    let generation = std::env::var("BATON_GENERATION").unwrap_or_else(|_| "0".to_string());
    let pid = std::process::id();
    // The `/` body never changes, so build it once and share it.
    let root = Bytes::from(format!(
        "version={version} generation={generation} pid={pid}\n"
    ));
    let banner = format!("hello: version={version} generation={generation} pid={pid}");
    let stamps = Stamps::from_env(&generation, pid);
    stamps.write("start", started);

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hello: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(listeners, args, root, banner, stamps)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hello: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_lines_are_one_line_of_four_fields() {
        assert_eq!(
            stamp_line("ready", "7", 4242, 123_456_789),
            "ready 7 4242 123456789\n"
        );
    }
}
