//! `test-socketfd`: a fake baton child for end-to-end tests. It reports exactly
//! what it received and can misbehave on request.
//!
//! At start it builds a JSON report (pid, ppid, pgid, sid, uid, gid, groups,
//! cwd, argv, env, listen_fds/listen_fdnames/listen_pid, and every open fd with
//! its readlink target, cloexec flag and socket info). Then it serves HTTP on
//! every LISTEN_FDS fd (TCP or Unix; only when LISTEN_PID is its own pid):
//! `GET /` -> `version=.. generation=.. pid=.. worker=..`, `GET /healthz`, `GET /report`
//! (the start-up report, when TEST_SOCKETFD_REPORT asked for one; else `{}`), `GET /slow`,
//! `GET /after-drain` (prints `fake: /after-drain waiting for the drain`, answers
//! `answered after drain` only once the drain signal has arrived; 503 if it
//! never does within 20 s).
//!
//! Environment:
//! - `TEST_SOCKETFD_REPORT=<path>`: write the report there (atomically, via `<path>.tmp`);
//!   `{worker}` in it becomes `BATON_WORKER`, so each worker writes its own.
//! - `FAKE_MISBEHAVE_WORKER=<i>`: the misbehaviours below (`FAKE_EXIT_AT_START`,
//!   `FAKE_NEVER_READY`, `FAKE_CRASH_AFTER_READY_MS`) apply only to worker `i`.
//! - `FAKE_VERSION=<v>`: version shown by `GET /` (default `fake`).
//! - `FAKE_STDERR_LINES=<n>`: print `fake: stderr line i` for i in 1..=n at start.
//! - `FAKE_EXIT_AT_START=<code>`: exit with `code` right after the report, before serving.
//! - `FAKE_HEALTH_STATUS=<code>`: status of `GET /healthz` (default 200).
//! - `FAKE_SLOW_MS=<ms>`: `GET /slow` sleeps that long, then answers `slow done` (default 0).
//! - `FAKE_READY_DELAY_MS=<ms>`: wait before sending READY=1 (default 0).
//! - `FAKE_READY_GATE=<path>`: send READY=1 only once `<path>` exists (checked
//!   every 10 ms), so a test can hold an upgrade open as long as it needs;
//!   `{worker}` in it becomes `BATON_WORKER`, a gate for each worker.
//! - `FAKE_STATUS=<s>`: STATUS= sent with READY=1 (default `fake serving`).
//! - `FAKE_NEVER_READY=1`: serve, but never send READY=1.
//! - `FAKE_CRASH_AFTER_READY_MS=<ms>`: exit(3) that long after READY=1.
//! - `FAKE_IGNORE_TERM=1`: ignore SIGTERM (keep serving until SIGKILL).
//! - `FAKE_SIGNAL_LOG=<path>`: append `TERM` to `<path>` when SIGTERM arrives,
//!   so a test can tell a drained process from a killed one.
//! - `FAKE_SKIP_PROBE_FD=1`: do not serve the fd named `baton-probe` (the
//!   private probe listener), as an app that only serves its own names.
//! - `FAKE_NO_ACCEPT=1`: hold the listeners but never accept on any of
//!   them (a wedged app: connections queue and are never served).
//! - `FAKE_RUDE_DRAIN=1`: on the drain signal, close at once every
//!   connection whose first request has not been read (as hyper's graceful
//!   shutdown does), instead of giving it a grace to send one.
//! - `FAKE_SERVE_DELAY_MS=<ms>`: start reading an accepted connection only
//!   that long after accepting it (a busy app), so "accepted, not read
//!   yet" is a window tests can hit.
//! - `FAKE_SHUTDOWN_LISTENER=1`: call `shutdown(SHUT_RD)` on every listener
//!   at start (which stops a socket listening for every holder), then
//!   accept nothing.
//! - `FAKE_NOTIFY_FORGE=1`: first spawn a copy of itself (`FAKE_ROLE=forger`)
//!   in a new process group, which sends `READY=1` to NOTIFY_SOCKET from its
//!   own pid, prints `fake: forger pid=<pid> sent READY=1` on stderr and stays
//!   alive (until this process drains, dies, or 60 s pass) so its pid and
//!   group are real when the supervisor looks at them. Only after the forger
//!   reports its datagram sent does this process go on with its own
//!   readiness (so the forged datagram is queued first), as set by the
//!   other variables (`FAKE_NEVER_READY=1` for none).
//! - `FAKE_START_DELAY_MS=<ms>`: accept nothing (and send no READY=1) for
//!   that long after starting: a slow start, during which connections can
//!   only wait in the kernel's queue.
//! - `FAKE_LIFE_LOG=<path>`: append one line per lifecycle moment, each a
//!   single `O_APPEND` write: `start gen=G worker=W pid=P ns=N alive=PIDS`
//!   first thing in `main` (`alive`: the comma-separated pids of processes
//!   of other generations that logged `start` before and still run, as this
//!   process sees them; empty when none), `accepting gen=G worker=W pid=P
//!   ns=N` right before the first accept, and `exit gen=G worker=W pid=P
//!   ns=N` right before exiting (after a
//!   drain, or at start with `FAKE_EXIT_AT_START`). `ns` is CLOCK_MONOTONIC, which every process shares.
//! - `FAKE_THREADS=<n>`: start n extra threads at start (each parked until
//!   the process exits), in this process and in every worker.
//! - `FAKE_WORKERS=<n>`: before READY=1 (and before waiting for a gate),
//!   start n worker processes (copies of itself, `FAKE_ROLE=worker`) in
//!   this process's group, as a pre-forking server does; each starts its
//!   `FAKE_THREADS` threads, prints `up` on its stdout (read by this
//!   process, which sends READY=1 only once every worker is up), and stays
//!   until this process drains or dies (at most 60 s). They serve nothing.
//! - `FAKE_LATE_THREADS=<n>`: start n more threads right before sending
//!   READY=1 (after any gate), racing whatever the supervisor does on it.
//! - `FAKE_UDP_ECHO=1`: answer every datagram received on a datagram
//!   socket (`SOCK_DGRAM` in LISTEN_FDS) with `<payload> generation=G
//!   pid=P`. Without it such sockets are held and never read, so datagrams
//!   queue in them. On the drain signal the echo stops reading (a datagram
//!   already read is always answered) and leaves the rest queued.
//!
//! On SIGTERM (unless ignored): print `fake: draining`, stop accepting, let
//! in-flight requests finish (cap 30 s), exit 0.

use std::collections::HashMap;
use std::convert::Infallible;
use std::env;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
use nix::unistd;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, Notify};

const DRAIN_CAP: Duration = Duration::from_secs(30);

fn env_num<T: FromStr>(key: &str) -> Option<T> {
    env::var(key).ok().and_then(|v| v.trim().parse().ok())
}

fn env_flag(key: &str) -> bool {
    env::var(key).is_ok_and(|v| v == "1")
}

/// Whether the misbehaviour knobs apply to this process: always, or only
/// to the worker `FAKE_MISBEHAVE_WORKER` names.
fn misbehaves() -> bool {
    match env::var("FAKE_MISBEHAVE_WORKER") {
        Ok(w) => env::var("BATON_WORKER").is_ok_and(|mine| mine == w),
        Err(_) => true,
    }
}

/// Hand-rolled sd_notify: one datagram to NOTIFY_SOCKET ('@' = abstract name).
fn notify(msg: &str) {
    let Some(path) = env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let send = || -> std::io::Result<usize> {
        let sock = UnixDatagram::unbound()?;
        match path.as_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(msg.as_bytes(), &addr)
            }
            None => sock.send_to(msg.as_bytes(), &path),
        }
    };
    if let Err(e) = send() {
        eprintln!("fake: notify failed: {e}");
    }
}

/// Socket facts from /proc/self/net: inode -> (table: tcp, udp or unix,
/// listening). nix's getsockopt(SO_ACCEPTCONN) needs an `AsFd`, which an
/// arbitrary inherited fd number cannot give without unsafe code; the
/// kernel tables say the same.
fn sock_tables() -> HashMap<u64, (&'static str, bool)> {
    let mut out = HashMap::new();
    for (file, table) in [
        ("tcp", "tcp"),
        ("tcp6", "tcp"),
        ("udp", "udp"),
        ("udp6", "udp"),
        ("unix", "unix"),
    ] {
        let inet = table != "unix";
        let text = std::fs::read_to_string(format!("/proc/self/net/{file}")).unwrap_or_default();
        for row in text.lines().skip(1) {
            let r: Vec<&str> = row.split_whitespace().collect();
            // Column 3 is `st` for tcp (0A = LISTEN) and `Flags` for unix
            // (0x10000 = __SO_ACCEPTCON); the inode is column 9 resp. 6.
            let listening = r.get(3).is_some_and(|v| match table {
                "tcp" => *v == "0A",
                "udp" => false,
                _ => u32::from_str_radix(v, 16).is_ok_and(|f| f & 0x10000 != 0),
            });
            if let Some(Ok(inode)) = r.get(if inet { 9 } else { 6 }).map(|i| i.parse()) {
                out.insert(inode, (table, listening));
            }
        }
    }
    out
}

fn socket_info(fd: i32, target: &str, tables: &HashMap<u64, (&'static str, bool)>) -> Value {
    let inode = target
        .strip_prefix("socket:[")
        .and_then(|s| s.strip_suffix(']'));
    let (table, listening) = inode
        .and_then(|i| tables.get(&i.parse().ok()?).copied())
        .unwrap_or(("", false));
    let addr = getsockname::<SockaddrStorage>(fd).ok();
    let kind = match (addr.as_ref().and_then(|a| a.family()), table) {
        (Some(AddressFamily::Inet | AddressFamily::Inet6), "tcp" | "udp") => table,
        (Some(AddressFamily::Unix), _) => "unix",
        _ => "other",
    };
    let local_addr = addr.map(|a| a.to_string());
    json!({ "kind": kind, "local_addr": local_addr, "listening": listening })
}

fn fd_list() -> Vec<Value> {
    let tables = sock_tables();
    // Collect the listing first so the directory's own fd is closed before we
    // inspect entries; its number then fails readlink and is skipped.
    let mut fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(rd) => rd
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    fds.sort_unstable();
    fds.into_iter()
        .filter_map(|fd| {
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
            let target = target.to_string_lossy().into_owned();
            let cloexec = fcntl(fd, FcntlArg::F_GETFD)
                .ok()
                .map(|f| FdFlag::from_bits_truncate(f).contains(FdFlag::FD_CLOEXEC));
            let socket = target
                .starts_with("socket:")
                .then(|| socket_info(fd, &target, &tables));
            Some(json!({ "fd": fd, "target": target, "socket": socket, "cloexec": cloexec }))
        })
        .collect()
}

fn build_report() -> Value {
    let lossy = |s: std::ffi::OsString| s.to_string_lossy().into_owned();
    let env_map: serde_json::Map<String, Value> = env::vars_os()
        .map(|(k, v)| (lossy(k), Value::String(lossy(v))))
        .collect();
    let groups: Vec<u32> = unistd::getgroups()
        .map(|g| g.iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default();
    json!({
        "pid": unistd::getpid().as_raw(),
        "ppid": unistd::getppid().as_raw(),
        "pgid": unistd::getpgid(None).ok().map(|p| p.as_raw()),
        "sid": unistd::getsid(None).ok().map(|p| p.as_raw()),
        "uid": unistd::getuid().as_raw(),
        "gid": unistd::getgid().as_raw(),
        "groups": groups,
        "cwd": env::current_dir().ok().map(|p| p.to_string_lossy().into_owned()),
        "argv": env::args_os().map(lossy).collect::<Vec<_>>(),
        "env": env_map,
        "listen_fds": env::var("LISTEN_FDS").ok(),
        "listen_fdnames": env::var("LISTEN_FDNAMES").ok(),
        "listen_pid": env::var("LISTEN_PID").ok(),
        "fds": fd_list(),
    })
}

fn write_atomic(path: &str, data: &str) -> std::io::Result<()> {
    let tmp = format!("{path}.tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

/// What the app received: stream listeners, and datagram sockets.
#[derive(Default)]
struct Received {
    listeners: Vec<Listener>,
    datagrams: Vec<tokio::net::UdpSocket>,
}

/// CLOCK_MONOTONIC now, in ns: one clock for every process here.
fn mono_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
    })
}

/// `FAKE_LIFE_LOG`: one line per lifecycle moment (see the crate docs).
fn life(event: &str, extra: &str) {
    let Ok(path) = env::var("FAKE_LIFE_LOG") else {
        return;
    };
    let gen = env::var("BATON_GENERATION").unwrap_or_else(|_| "0".into());
    let worker = env::var("BATON_WORKER").unwrap_or_else(|_| "0".into());
    let line = format!(
        "{event} gen={gen} worker={worker} pid={} ns={}{extra}\n",
        std::process::id(),
        mono_ns()
    );
    use std::io::Write;
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("fake: cannot write the life log {path}: {e}");
    }
}

/// Pids of other generations that logged `start` in the life log before
/// and still run (the same program, not a zombie): what this process sees
/// of other generations. Its own generation's other workers are not
/// counted.
fn still_running_predecessors() -> Vec<u32> {
    let Ok(path) = env::var("FAKE_LIFE_LOG") else {
        return Vec::new();
    };
    let me = std::fs::read_link("/proc/self/exe").ok();
    let own_gen = format!("gen={}", env::var("BATON_GENERATION").unwrap_or_default());
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("start "))
        .filter(|l| !l.split_whitespace().any(|f| f == own_gen))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("pid="))?
                .parse::<u32>()
                .ok()
        })
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].trim().chars().next());
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            state.is_some_and(|s| s != 'Z') && exe.is_some() && exe == me
        })
        .collect()
}

/// Takes the LISTEN_FDS sockets, but only when LISTEN_PID names this process
/// (listenfd alone would also accept a missing LISTEN_PID). Needs a runtime
/// context; inherited sockets are blocking, tokio needs non-blocking ones.
fn take_listeners() -> std::io::Result<Received> {
    let mut out = Received::default();
    if env_num::<u32>("LISTEN_PID") != Some(std::process::id()) {
        return Ok(out);
    }
    let names: Vec<String> = env::var("LISTEN_FDNAMES")
        .unwrap_or_default()
        .split(':')
        .map(str::to_owned)
        .collect();
    let skip_probe = env_flag("FAKE_SKIP_PROBE_FD");
    let mut fds = listenfd::ListenFd::from_env();
    for i in 0..fds.len() {
        if skip_probe && names.get(i).is_some_and(|n| n == "baton-probe") {
            eprintln!("fake: not serving fd {} (baton-probe)", 3 + i);
            continue;
        }
        if let Ok(Some(l)) = fds.take_tcp_listener(i) {
            l.set_nonblocking(true)?;
            out.listeners
                .push(Listener::Tcp(tokio::net::TcpListener::from_std(l)?));
        } else if let Ok(Some(l)) = fds.take_unix_listener(i) {
            l.set_nonblocking(true)?;
            out.listeners
                .push(Listener::Unix(tokio::net::UnixListener::from_std(l)?));
        } else if let Ok(Some(s)) = fds.take_udp_socket(i) {
            s.set_nonblocking(true)?;
            out.datagrams.push(tokio::net::UdpSocket::from_std(s)?);
        } else {
            eprintln!("fake: fd {} is not a socket it knows, skipping", 3 + i);
        }
    }
    Ok(out)
}

struct State {
    root: Bytes,
    report: Bytes,
    health: StatusCode,
    slow: Duration,
    /// Becomes true when the drain signal arrives.
    term: watch::Receiver<bool>,
}

/// How long `GET /after-drain` waits for the drain signal.
const AFTER_DRAIN_CAP: Duration = Duration::from_secs(20);

async fn handle(
    req: Request<Incoming>,
    st: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = |status, body: &'static [u8]| (status, "text/plain", Bytes::from_static(body));
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => (StatusCode::OK, "text/plain", st.root.clone()),
        (&Method::GET, "/healthz") if st.health == StatusCode::OK => text(st.health, b"ok\n"),
        (&Method::GET, "/healthz") => text(st.health, b"unhealthy\n"),
        (&Method::GET, "/report") => (StatusCode::OK, "application/json", st.report.clone()),
        (&Method::GET, "/slow") => {
            tokio::time::sleep(st.slow).await;
            text(StatusCode::OK, b"slow done\n")
        }
        (&Method::GET, "/after-drain") => {
            eprintln!("fake: /after-drain waiting for the drain");
            let mut term = st.term.clone();
            let drained = tokio::time::timeout(AFTER_DRAIN_CAP, term.wait_for(|t| *t))
                .await
                .is_ok_and(|r| r.is_ok());
            if drained {
                tokio::time::sleep(st.slow).await;
                text(StatusCode::OK, b"answered after drain\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, b"the drain never came\n")
            }
        }
        _ => text(StatusCode::NOT_FOUND, b"not found\n"),
    };
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    Ok(resp)
}

/// How long a connection accepted just before the drain may take to send
/// its first request: hyper's graceful shutdown closes a connection it has
/// not read from yet, even if the request is already in the socket.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// Held by every connection task: the drain flag, and a sender whose drop
/// tells `run` this connection is finished.
#[derive(Clone)]
struct Drain {
    draining: watch::Receiver<bool>,
    _live: mpsc::Sender<()>,
}

fn serve_conn<S>(stream: S, drain: Drain, st: Arc<State>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let first = Arc::new(Notify::new());
    let svc = {
        let first = first.clone();
        service_fn(move |req| {
            first.notify_one();
            handle(req, st.clone())
        })
    };
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), svc);
    tokio::spawn(async move {
        // The whole struct, so `_live` lives as long as this task.
        let mut drain = drain;
        if let Some(ms) = env_num::<u64>("FAKE_SERVE_DELAY_MS") {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                _ = drain.draining.wait_for(|d| *d) => {
                    if env_flag("FAKE_RUDE_DRAIN") {
                        return; // accepted, never read: closed unanswered
                    }
                }
            }
        }
        tokio::pin!(conn);
        let mut seen = false;
        loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = first.notified(), if !seen => seen = true,
                _ = drain.draining.wait_for(|d| *d) => break,
            }
        }
        if !seen {
            if env_flag("FAKE_RUDE_DRAIN") {
                return; // closed unanswered
            }
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = first.notified() => {}
                _ = tokio::time::sleep(FIRST_REQUEST_GRACE) => {}
            }
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    });
}

async fn accept_loop(l: Listener, drain: Drain, st: Arc<State>) {
    loop {
        let res = match &l {
            Listener::Tcp(l) => l
                .accept()
                .await
                .map(|(s, _)| serve_conn(s, drain.clone(), st.clone())),
            Listener::Unix(l) => l
                .accept()
                .await
                .map(|(s, _)| serve_conn(s, drain.clone(), st.clone())),
        };
        if let Err(e) = res {
            eprintln!("fake: accept error: {e}"); // e.g. EMFILE: back off, don't spin
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// How long the forger stays alive at most.
const FORGER_CAP: Duration = Duration::from_secs(60);

/// Starts a copy of this program as `role` (`FAKE_ROLE`, with
/// `FAKE_PARENT` set to this pid, none of the sockets or the report file),
/// in its own process group if `own_group`, and waits up to 10 s for its
/// first line on stdout, which must be `said`. Returns it, to be killed at
/// drain (or dropped).
async fn spawn_copy(role: &str, own_group: bool, said: &str) -> Option<tokio::process::Child> {
    use tokio::io::AsyncBufReadExt;
    let exe = match env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fake: cannot find own exe: {e}");
            return None;
        }
    };
    let mut cmd = tokio::process::Command::new(exe);
    cmd.env("FAKE_ROLE", role)
        .env("FAKE_PARENT", std::process::id().to_string())
        .env_remove("TEST_SOCKETFD_REPORT")
        .env_remove("FAKE_LIFE_LOG")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    if own_group {
        cmd.process_group(0);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fake: cannot spawn a {role}: {e}");
            return None;
        }
    };
    let stdout = child.stdout.take()?;
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(stdout);
    let read = tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line)).await;
    if !matches!(read, Ok(Ok(_))) || line.trim() != said {
        eprintln!("fake: the {role} did not say {said:?}: {read:?} {line:?}");
    }
    Some(child)
}

/// Starts the forger (a copy of this program in its own process group) and
/// waits until it has sent its datagram: it prints `sent` once its
/// datagram is in the supervisor's socket queue; ours, sent after that,
/// queues behind it. Returns it, to be killed at drain.
async fn spawn_forger() -> Option<tokio::process::Child> {
    spawn_copy("forger", true, "sent").await
}

/// Whether this copy's parent is still the process that started it (a
/// copy started by `spawn_copy` leaves with it).
fn parent_alive() -> bool {
    // Leave with the parent; exit at once if it is already gone.
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    env_num::<i32>("FAKE_PARENT") == Some(unistd::getppid().as_raw())
}

/// The forger's whole life: send READY=1 from this pid, report, linger.
fn forger_main() -> ExitCode {
    if !parent_alive() {
        return ExitCode::FAILURE;
    }
    notify("READY=1\nSTATUS=forged\n");
    eprintln!("fake: forger pid={} sent READY=1", std::process::id());
    println!("sent");
    std::thread::sleep(FORGER_CAP);
    ExitCode::SUCCESS
}

/// How long a worker stays at most.
const WORKER_CAP: Duration = Duration::from_secs(60);

/// Starts `n` threads that do nothing until the process exits.
fn start_threads(n: u32, what: &str) {
    for i in 0..n {
        let spawned = std::thread::Builder::new()
            .name(format!("fake-{what}-{i}"))
            .spawn(|| loop {
                std::thread::park();
            });
        if let Err(e) = spawned {
            eprintln!("fake: cannot start a thread: {e}");
        }
    }
}

/// Starts `FAKE_WORKERS` copies of itself in this process group and waits
/// until each says it is up. Returns them, to be killed at drain.
async fn spawn_workers() -> Vec<tokio::process::Child> {
    let mut workers = Vec::new();
    for _ in 0..env_num::<u32>("FAKE_WORKERS").unwrap_or(0) {
        if let Some(w) = spawn_copy("worker", false, "up").await {
            eprintln!("fake: worker pid={:?} up", w.id());
            workers.push(w);
        }
    }
    workers
}

/// A worker's whole life: its threads, `up`, then wait to be ended.
fn worker_main() -> ExitCode {
    if !parent_alive() {
        return ExitCode::FAILURE;
    }
    start_threads(env_num("FAKE_THREADS").unwrap_or(0), "worker");
    println!("up");
    std::thread::sleep(WORKER_CAP);
    ExitCode::SUCCESS
}

/// Sends READY=1 (after a forger, workers, a delay, a gate) or never, per
/// the FAKE_* variables. A forger and workers are handed over so the drain
/// ends them.
async fn readiness(
    sent_ready: Arc<AtomicBool>,
    forger: Arc<tokio::sync::Mutex<Option<tokio::process::Child>>>,
    workers: Arc<tokio::sync::Mutex<Vec<tokio::process::Child>>>,
) {
    if env_flag("FAKE_NOTIFY_FORGE") {
        *forger.lock().await = spawn_forger().await;
    }
    *workers.lock().await = spawn_workers().await;
    if env_flag("FAKE_NEVER_READY") && misbehaves() {
        eprintln!("fake: never sending READY=1");
        return;
    }
    let delay = Duration::from_millis(env_num("FAKE_READY_DELAY_MS").unwrap_or(0));
    tokio::time::sleep(delay).await;
    if let Ok(gate) = env::var("FAKE_READY_GATE") {
        let gate = gate.replace("{worker}", &env::var("BATON_WORKER").unwrap_or_default());
        eprintln!("fake: waiting for {gate} before READY=1");
        while !std::path::Path::new(&gate).exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    start_threads(env_num("FAKE_LATE_THREADS").unwrap_or(0), "late");
    let status = env::var("FAKE_STATUS").unwrap_or_else(|_| "fake serving".to_string());
    notify(&format!("READY=1\nSTATUS={status}\n"));
    sent_ready.store(true, Ordering::SeqCst);
    eprintln!("fake: ready");
    if let Some(ms) = env_num("FAKE_CRASH_AFTER_READY_MS").filter(|_| misbehaves()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        eprintln!("fake: crashing with exit code 3");
        std::process::exit(3);
    }
}

/// Answers every datagram with its payload and who answered, until the
/// drain: then it stops reading, leaving what is queued in the socket for
/// the next reader. A datagram it has read is always answered.
async fn udp_echo(sock: tokio::net::UdpSocket, drain: Drain, tag: String) {
    let mut draining = drain.draining.clone();
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            biased;
            // A block, so the watch guard never lives across the reply's await.
            () = async { let _ = draining.wait_for(|d| *d).await; } => return,
            // Cancel-safe: if the drain wins, no datagram was taken.
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    let mut reply = buf[..n].to_vec();
                    reply.extend_from_slice(tag.as_bytes());
                    if let Err(e) = sock.send_to(&reply, from).await {
                        eprintln!("fake: udp reply to {from}: {e}");
                    }
                }
                Err(e) => {
                    eprintln!("fake: udp receive: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn run(
    received: Received,
    st: Arc<State>,
    term_seen: watch::Sender<bool>,
) -> std::io::Result<()> {
    let Received {
        listeners,
        datagrams,
    } = received;
    let mut term = signal(SignalKind::terminate())?;
    if let Some(ms) = env_num::<u64>("FAKE_START_DELAY_MS") {
        eprintln!("fake: starting slowly: accepting nothing for {ms} ms");
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
            _ = term.recv() => {
                eprintln!("fake: drain signal while starting, exiting");
                life("exit", "");
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
    let pid = std::process::id();
    eprintln!("fake: pid={pid} serving {} listeners", listeners.len());
    let mut tasks = Vec::new();
    let mut held = Vec::new();
    for l in listeners {
        if env_flag("FAKE_SHUTDOWN_LISTENER") {
            use std::os::fd::AsRawFd;
            let fd = match &l {
                Listener::Tcp(l) => l.as_raw_fd(),
                Listener::Unix(l) => l.as_raw_fd(),
            };
            let res = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Read);
            eprintln!("fake: shut down listener fd {fd}: {res:?}");
            held.push(l);
            continue;
        }
        if env_flag("FAKE_NO_ACCEPT") {
            held.push(l);
            continue;
        }
        if tasks.is_empty() {
            life("accepting", "");
        }
        tasks.push(tokio::spawn(accept_loop(l, drain.clone(), st.clone())));
    }
    if !held.is_empty() {
        eprintln!("fake: holding {} listeners, accepting nothing", held.len());
    }
    let mut held_datagrams = Vec::new();
    for sock in datagrams {
        if env_flag("FAKE_UDP_ECHO") {
            let tag = format!(
                " generation={} pid={pid}",
                env::var("BATON_GENERATION").unwrap_or_else(|_| "0".into())
            );
            eprintln!(
                "fake: pid={pid} echoing datagrams on {:?}",
                sock.local_addr()
            );
            tokio::spawn(udp_echo(sock, drain.clone(), tag));
        } else {
            eprintln!("fake: pid={pid} holding a datagram socket, reading nothing");
            held_datagrams.push(sock);
        }
    }
    drop(drain);
    start_threads(env_num("FAKE_THREADS").unwrap_or(0), "main");
    let sent_ready = Arc::new(AtomicBool::new(false));
    let forger = Arc::default();
    let workers = Arc::default();
    tokio::spawn(readiness(
        sent_ready.clone(),
        Arc::clone(&forger),
        Arc::clone(&workers),
    ));

    loop {
        term.recv().await;
        if let Ok(path) = env::var("FAKE_SIGNAL_LOG") {
            use std::io::Write;
            let logged = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(b"TERM\n"));
            if let Err(e) = logged {
                eprintln!("fake: cannot log the signal to {path}: {e}");
            }
        }
        if !env_flag("FAKE_IGNORE_TERM") {
            break;
        }
        eprintln!("fake: ignoring SIGTERM");
    }
    eprintln!("fake: draining");
    let _ = term_seen.send(true);
    if let Some(mut f) = forger.lock().await.take() {
        let _ = f.kill().await;
    }
    for mut w in std::mem::take(&mut *workers.lock().await) {
        let _ = w.kill().await;
    }
    if sent_ready.load(Ordering::SeqCst) {
        notify("STOPPING=1\n");
    }
    for t in &tasks {
        t.abort(); // drops the listener: stop accepting
    }
    for t in tasks {
        let _ = t.await;
    }
    let _ = start_drain.send(true);
    // None once every connection task has dropped its sender.
    if tokio::time::timeout(DRAIN_CAP, all_done.recv())
        .await
        .is_err()
    {
        eprintln!("fake: drain cap reached");
    }
    eprintln!("fake: drained, exiting");
    drop(held_datagrams);
    life("exit", "");
    Ok(())
}

fn main() -> ExitCode {
    if env::var("FAKE_ROLE").is_ok_and(|r| r == "forger") {
        return forger_main();
    }
    if env::var("FAKE_ROLE").is_ok_and(|r| r == "worker") {
        return worker_main();
    }
    if env::var_os("FAKE_LIFE_LOG").is_some() {
        let alive: Vec<String> = still_running_predecessors()
            .iter()
            .map(u32::to_string)
            .collect();
        life("start", &format!(" alive={}", alive.join(",")));
    }

    // Before anything opens fds or touches the environment. Only when a
    // test asks: scanning /proc/self/net under heavy connection churn
    // (tens of thousands of TIME_WAIT entries) can take seconds.
    let report = match env::var("TEST_SOCKETFD_REPORT") {
        Ok(path) => {
            let worker = env::var("BATON_WORKER").unwrap_or_default();
            let path = path.replace("{worker}", &worker);
            let report = build_report().to_string();
            if let Err(e) = write_atomic(&path, &report) {
                eprintln!("fake: cannot write report to {path}: {e}");
            }
            report
        }
        Err(_) => "{}".to_string(),
    };
    for i in 1..=env_num::<u32>("FAKE_STDERR_LINES").unwrap_or(0) {
        eprintln!("fake: stderr line {i}");
    }
    if let Some(code) = env_num::<i32>("FAKE_EXIT_AT_START").filter(|_| misbehaves()) {
        eprintln!("fake: exiting at start with {code}");
        life("exit", "");
        std::process::exit(code);
    }

    let pid = std::process::id();
    let version = env::var("FAKE_VERSION").unwrap_or_else(|_| "fake".to_string());
    let generation = env::var("BATON_GENERATION").unwrap_or_else(|_| "0".to_string());
    let worker = env::var("BATON_WORKER").unwrap_or_else(|_| "-".to_string());
    let health = env_num::<u16>("FAKE_HEALTH_STATUS")
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::OK);
    let (term_seen, term) = watch::channel(false);
    let st = Arc::new(State {
        root: Bytes::from(format!(
            "version={version} generation={generation} pid={pid} worker={worker}\n"
        )),
        report: Bytes::from(report),
        health,
        slow: Duration::from_millis(env_num("FAKE_SLOW_MS").unwrap_or(0)),
        term,
    });
    // Single-threaded: listenfd edits the environment, which is only sound
    // while no other thread runs; one thread is plenty for tests anyway.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fake: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Taking the fds marks them cloexec, so the forger cannot inherit them.
    let res = rt.block_on(async { run(take_listeners()?, st, term_seen).await });
    if let Err(e) = res {
        eprintln!("fake: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
