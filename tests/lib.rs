//! Helpers for baton's end-to-end tests: run the real `baton` binary in a
//! temp dir on OS-chosen loopback ports, wait on its log lines and events
//! (never on fixed sleeps), drive load against it, and print everything
//! useful when a test fails.
//!
//! Binaries are taken from the workspace's target directory. The first
//! call to [`bin`] in a test run builds them (`cargo build --workspace
//! --bins` with this test binary's profile and target directory), so a
//! test never runs a stale binary; when nothing changed that is a quick
//! no-op.
//!
//! Every failure prints what is needed to understand it: the command run,
//! its exit status, stdout and stderr, and (through `Baton`'s `Drop`, which
//! runs while a failing test unwinds) baton's whole log.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Upper bound for any single wait in the tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// Path of a workspace binary (`baton`, `hello`, `test-socketfd`), built
/// fresh once per test run.
pub fn bin(name: &str) -> PathBuf {
    // target/<profile>/deps/e2e-HASH -> target/<profile>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = BUILT.get_or_init(|| build_binaries(dir)) {
        panic!("{e}");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found after the build",
        path.display()
    );
    path
}

/// `cargo build --workspace --bins` into `profile_dir` (`target/<profile>`),
/// with the cargo that runs these tests.
fn build_binaries(profile_dir: &Path) -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .ok_or("cannot tell the profile from the test binary's path")?;
    let target_dir = profile_dir.parent().ok_or("no target directory")?;
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--workspace",
        "--bins",
        "--quiet",
        "--manifest-path",
    ])
    .arg(repo_path("Cargo.toml"))
    .arg("--target-dir")
    .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = run(&mut cmd);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building the binaries for the tests failed\n{}",
            describe_output(&out)
        ))
    }
}

/// A baton.toml running the fake app (`test-socketfd`) on one loopback
/// listener: `top` holds extra top-level lines (`ready = "tcp"`), `env`
/// extra `[env]` lines (`FAKE_NEVER_READY = "1"`).
pub fn fake_config(top: &str, env: &str) -> String {
    format!(
        r#"command = ["{}"]
ready_timeout = "3s"
drain_timeout = "5s"
{top}

[env]
FAKE_VERSION = "good"
{env}

[[listen]]
name = "http"
address = "127.0.0.1:0"
"#,
        bin("test-socketfd").display()
    )
}

/// [`fake_config`] for the fake app answering `version`, whose READY=1
/// waits until `gate` exists (so a test holds an upgrade open for as long
/// as it needs), with a ready timeout of 30 s.
pub fn gated_fake_config(version: &str, gate: &Path) -> String {
    fake_config("", &format!("FAKE_READY_GATE = \"{}\"", gate.display()))
        .replace(
            "FAKE_VERSION = \"good\"",
            &format!("FAKE_VERSION = \"{version}\""),
        )
        .replace("ready_timeout = \"3s\"", "ready_timeout = \"30s\"")
}

/// Path of a file in the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join(rel)
}

/// Locks, ignoring poisoning: a panicking test must still print logs.
fn relock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Lines captured from a child's output, with a way to wait for one.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Lines {
    fn capture(self, stream: impl Read + Send + 'static) -> JoinHandle<()> {
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let (lock, cv) = &*self.0;
                relock(lock).push(line);
                cv.notify_all();
            }
        })
    }

    pub fn all(&self) -> Vec<String> {
        relock(&self.0 .0).clone()
    }

    pub fn text(&self) -> String {
        self.all().join("\n")
    }

    /// Number of lines containing every one of `needles`.
    pub fn count(&self, needles: &[&str]) -> usize {
        self.all()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// Waits until `count(needles) >= n`; panics after `timeout`.
    pub fn wait_for(&self, needles: &[&str], n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.0;
        let mut guard = relock(lock);
        loop {
            let c = guard
                .iter()
                .filter(|l| needles.iter().all(|x| l.contains(x)))
                .count();
            if c >= n {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                let so_far = guard.join("\n");
                drop(guard);
                panic!(
                    "timed out waiting for {n} line(s) with {needles:?}; output so far:\n{so_far}"
                );
            }
            guard = cv
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// How a test's baton is started.
enum Launch<'a> {
    Direct,
    /// By a shell that opened a file as this descriptor and execs baton.
    HoldingFd(u32, &'a Path),
    /// By this program (and arguments), which runs this baton binary.
    Under(&'a [String], &'a Path),
    /// This baton binary instead of the workspace's.
    Binary(&'a Path),
}

/// A running `baton run`, killed (with everything it started) on drop.
pub struct Baton {
    pub dir: tempfile::TempDir,
    pub control: PathBuf,
    pub child: Option<Child>,
    pub args: Vec<String>,
    pub stdout: Lines,
    pub stderr: Lines,
    /// The threads reading stdout and stderr (done at end of stream).
    readers: Vec<JoinHandle<()>>,
}

impl Baton {
    /// Starts `baton run ARGS` in a fresh temp dir (which is also its cwd)
    /// and waits until generation 1 is active.
    pub fn start(args: &[&str]) -> Self {
        let b = Self::spawn(tempfile::tempdir().unwrap(), args);
        b.wait_active(1);
        b
    }

    /// Starts `baton run --config baton.toml FLAGS` with `config` written
    /// into a fresh temp dir, without waiting.
    pub fn with_config(config: &str, flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("baton.toml"), config).unwrap();
        let mut args = vec!["--config", "baton.toml"];
        args.extend_from_slice(flags);
        Self::spawn(dir, &args)
    }

    /// Rewrites the config file (read again at the next upgrade).
    pub fn reconfigure(&self, config: &str) {
        std::fs::write(self.path("baton.toml"), config).unwrap();
    }

    /// Starts `baton run ARGS` in `dir` without waiting.
    pub fn spawn(dir: tempfile::TempDir, args: &[&str]) -> Self {
        Self::spawn_with_env(dir, args, &[])
    }

    /// [`Baton::spawn`] with extra environment variables for baton itself.
    pub fn spawn_with_env(dir: tempfile::TempDir, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_inner(dir, args, env, Launch::Direct)
    }

    /// [`Baton::spawn`], with baton inheriting (not close-on-exec) `file`
    /// open as descriptor `fd`, as from a careless parent: a shell opens it
    /// and then execs baton, keeping the pid.
    pub fn spawn_holding_fd(dir: tempfile::TempDir, args: &[&str], fd: u32, file: &Path) -> Self {
        Self::spawn_inner(dir, args, &[], Launch::HoldingFd(fd, file))
    }

    /// [`Baton::spawn_with_env`], started by `launcher` (a program and its
    /// arguments, to which baton's command line is appended): a service
    /// manager. `child` is then the launcher, not baton.
    pub fn spawn_under(
        dir: tempfile::TempDir,
        launcher: &[String],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_inner(dir, args, env, Launch::Under(launcher, &bin("baton")))
    }

    /// [`Baton::spawn_under`] with the baton binary at `exe`.
    pub fn spawn_under_binary(
        dir: tempfile::TempDir,
        launcher: &[String],
        exe: &Path,
        args: &[&str],
    ) -> Self {
        Self::spawn_inner(dir, args, &[], Launch::Under(launcher, exe))
    }

    /// [`Baton::spawn`] running the baton binary at `exe` (a copy a test
    /// can replace, for baton's own upgrade).
    pub fn spawn_binary(dir: tempfile::TempDir, exe: &Path, args: &[&str]) -> Self {
        Self::spawn_inner(dir, args, &[], Launch::Binary(exe))
    }

    fn spawn_inner(
        dir: tempfile::TempDir,
        args: &[&str],
        env: &[(&str, &str)],
        launch: Launch<'_>,
    ) -> Self {
        let control = dir.path().join("ctl/control.sock");
        let mut full = vec![
            "--control".to_owned(),
            control.display().to_string(),
            "run".into(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        let mut cmd = match launch {
            Launch::Direct => Command::new(bin("baton")),
            Launch::HoldingFd(fd, file) => {
                let mut c = Command::new("/bin/sh");
                c.arg("-c")
                    .arg(format!("exec {fd}<\"$0\" && exec \"$@\""))
                    .arg(file)
                    .arg(bin("baton"));
                c
            }
            Launch::Binary(exe) => Command::new(exe),
            Launch::Under(launcher, exe) => {
                let mut c = Command::new(&launcher[0]);
                c.args(&launcher[1..]).arg(exe);
                c
            }
        };
        let mut child = cmd
            .args(&full)
            .current_dir(dir.path())
            .env("BATON_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = Lines::default();
        let stderr = Lines::default();
        let readers = vec![
            stdout.clone().capture(child.stdout.take().unwrap()),
            stderr.clone().capture(child.stderr.take().unwrap()),
        ];
        Self {
            dir,
            control,
            child: Some(child),
            args: full,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the log line saying generation `n` is active.
    pub fn wait_active(&self, n: u64) {
        self.stderr
            .wait_for(&["generation active", &format!("generation={n} ")], 1, WAIT);
    }

    /// Runs a CLI subcommand against this supervisor.
    pub fn cli(&self, args: &[&str]) -> CmdOutput {
        cli(&self.control, args)
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed:\n{}\n--- baton log:\n{}",
            describe_output(&out),
            self.stderr.text()
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status printed no JSON ({e}):\n{}", describe_output(&out)))
    }

    /// The address listener `name` shows in `status`.
    fn address(&self, name: &str) -> String {
        let s = self.status();
        let sock = s["sockets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .unwrap_or_else(|| panic!("no socket {name} in {s}"));
        sock["address"].as_str().unwrap().to_owned()
    }

    /// The bound address of listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.address(name).parse().unwrap()
    }

    /// The bound address of datagram listener `name` (`udp:IP:PORT`).
    pub fn udp_addr(&self, name: &str) -> SocketAddr {
        let address = self.address(name);
        address
            .strip_prefix("udp:")
            .unwrap_or_else(|| panic!("{name} is no datagram socket: {address}"))
            .parse()
            .unwrap()
    }

    /// Status of generation `n`.
    pub fn generation(&self, n: u64) -> serde_json::Value {
        let s = self.status();
        s["generations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["number"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("no generation {n} in {s}"))
    }

    /// Runs `baton upgrade` and asserts its exit code.
    pub fn upgrade_expect(&self, extra: &[&str], code: i32) -> CmdOutput {
        let mut args = vec!["upgrade"];
        args.extend_from_slice(extra);
        let out = self.cli(&args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "baton upgrade: expected exit {code}\n{}\n--- baton log:\n{}",
            describe_output(&out),
            self.stderr.text()
        );
        out
    }

    /// Waits for baton to exit and returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                // Let the readers take in the last lines (bounded: an app
                // baton started may still hold the pipes for a moment).
                let until = Instant::now() + Duration::from_secs(5);
                while !self.readers.iter().all(|r| r.is_finished()) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return st.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "baton did not exit in {timeout:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// [`wait_until`] whose failure message carries baton's log.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything baton printed, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "command: baton {}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.args.join(" "),
            self.stdout.text(),
            self.stderr.text()
        )
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                // SIGTERM drains (the apps exit via their drain); then make sure.
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(10);
                while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A command's output with the command line, for failure messages.
pub struct CmdOutput {
    pub command: String,
    pub output: Output,
}

impl std::ops::Deref for CmdOutput {
    type Target = Output;
    fn deref(&self) -> &Output {
        &self.output
    }
}

/// Runs `cmd` to completion, capturing its output.
pub fn run(cmd: &mut Command) -> CmdOutput {
    let command = format!("{cmd:?}");
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
    CmdOutput { command, output }
}

/// Waits for a spawned command (stdout and stderr piped) to finish.
pub fn finish(command: String, child: Child) -> CmdOutput {
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {command}: {e}"));
    CmdOutput { command, output }
}

pub fn cli(control: &Path, args: &[&str]) -> CmdOutput {
    run(Command::new(bin("baton"))
        .arg("--control")
        .arg(control)
        .args(args)
        .stdin(Stdio::null()))
}

pub fn describe_output(out: &CmdOutput) -> String {
    format!(
        "command: {}\nexit: {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
        out.command,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ----- HTTP client -----------------------------------------------------------

#[derive(Debug)]
pub enum HttpError {
    Connect(std::io::Error),
    /// The connection closed or failed before any byte of the response.
    BeforeResponse(std::io::Error),
    /// It failed in the middle of the response.
    Midway(String),
}

pub struct Response {
    pub status: u16,
    pub body: String,
    pub close: bool,
}

/// Sends `GET path` on `stream` and reads one response.
pub fn roundtrip(
    stream: &mut TcpStream,
    path: &str,
    keep_alive: bool,
) -> Result<Response, HttpError> {
    let conn = if keep_alive { "keep-alive" } else { "close" };
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: {conn}\r\n\r\n");
    stream
        .write_all(req.as_bytes())
        .map_err(HttpError::BeforeResponse)?;
    let mut reader = BufReader::new(&mut *stream);
    let mut status_line = String::new();
    match reader.read_line(&mut status_line) {
        Ok(0) => {
            return Err(HttpError::BeforeResponse(
                std::io::ErrorKind::UnexpectedEof.into(),
            ))
        }
        Ok(_) => {}
        Err(e) => return Err(HttpError::BeforeResponse(e)),
    }
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| HttpError::Midway(format!("bad status line {status_line:?}")))?;
    let mut len = 0usize;
    let mut close = !keep_alive;
    loop {
        let mut h = String::new();
        let n = reader
            .read_line(&mut h)
            .map_err(|e| HttpError::Midway(e.to_string()))?;
        if n == 0 {
            return Err(HttpError::Midway("eof in headers".into()));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("connection:") && lower.contains("close") {
            close = true;
        }
    }
    let mut body = vec![0u8; len];
    reader
        .read_exact(&mut body)
        .map_err(|e| HttpError::Midway(e.to_string()))?;
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        close,
    })
}

/// One `GET` on a fresh connection.
pub fn get(addr: SocketAddr, path: &str) -> Result<Response, HttpError> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(HttpError::Connect)?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    roundtrip(&mut s, path, false)
}

/// The `version=` field of a hello/fake response body.
pub fn version_of(body: &str) -> String {
    body.split_whitespace()
        .find_map(|f| f.strip_prefix("version="))
        .unwrap_or("")
        .to_owned()
}

/// `generation=N pid=P` of a fake app's `GET /` answer.
pub fn who(body: &str) -> (u64, i64) {
    let field = |name: &str| -> i64 {
        body.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {body:?}"))
    };
    (field("generation=") as u64, field("pid="))
}

/// Which generation answers `n` requests, each on a new connection.
pub fn census(addr: SocketAddr, n: usize) -> std::collections::BTreeMap<u64, usize> {
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let r = get(addr, "/").unwrap_or_else(|e| panic!("GET /: {e:?}"));
        *seen.entry(who(&r.body).0).or_default() += 1;
    }
    seen
}

/// One line of the fake app's `FAKE_LIFE_LOG` (see test-socketfd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Life {
    /// `start`, `accepting` or `exit`.
    pub event: String,
    pub gen: u64,
    /// Its `BATON_WORKER`.
    pub worker: u32,
    pub pid: i64,
    /// CLOCK_MONOTONIC, ns (compare with [`mono_ns`]).
    pub ns: u64,
    /// For `start`: earlier processes of other generations in the log
    /// still running then.
    pub alive: Vec<i64>,
}

/// Reads a `FAKE_LIFE_LOG` file (missing: empty).
pub fn life_log(path: &Path) -> Vec<Life> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let mut f = l.split_whitespace();
            let event = f.next().unwrap_or_default().to_owned();
            let mut life = Life {
                event,
                gen: 0,
                worker: 0,
                pid: 0,
                ns: 0,
                alive: Vec::new(),
            };
            for kv in f {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                match k {
                    "gen" => life.gen = v.parse().unwrap(),
                    "worker" => life.worker = v.parse().unwrap(),
                    "pid" => life.pid = v.parse().unwrap(),
                    "ns" => life.ns = v.parse().unwrap(),
                    "alive" => life.alive = v.split(',').filter_map(|p| p.parse().ok()).collect(),
                    _ => panic!("unknown field in life log line {l:?}"),
                }
            }
            life
        })
        .collect()
}

/// The `event` line of generation `gen` in `log`.
pub fn life_of<'a>(log: &'a [Life], event: &str, gen: u64) -> &'a Life {
    log.iter()
        .find(|l| l.event == event && l.gen == gen)
        .unwrap_or_else(|| panic!("no {event} of generation {gen} in the life log: {log:#?}"))
}

/// CLOCK_MONOTONIC now, ns: the clock the fake app's life log uses.
pub fn mono_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

// ----- load ------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A new connection for every request.
    NewConnection,
    /// Requests reuse a persistent connection.
    KeepAlive,
}

#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Requests re-sent because a reused keep-alive connection was closed
    /// by the server before answering: every HTTP client does this for
    /// idempotent requests (RFC 9112 section 9.3.1); not failures.
    retried: AtomicU64,
}

/// Background clients hammering `GET /` until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    errors: Arc<Mutex<Vec<String>>>,
    last_body: Arc<Mutex<String>>,
    threads: Vec<JoinHandle<()>>,
}

pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub retried: u64,
    pub errors: Vec<String>,
}

impl Load {
    /// Starts `clients` threads per mode. Each stops by itself after
    /// `max` even if never told to.
    pub fn start(addr: SocketAddr, modes: &[Mode], clients: usize, max: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let errors = Arc::new(Mutex::new(Vec::new()));
        let last_body = Arc::new(Mutex::new(String::new()));
        let mut threads = Vec::new();
        for &mode in modes {
            for _ in 0..clients {
                let (stop, counters, errors, last_body) = (
                    stop.clone(),
                    counters.clone(),
                    errors.clone(),
                    last_body.clone(),
                );
                threads.push(std::thread::spawn(move || {
                    client_loop(addr, mode, max, &stop, &counters, &errors, &last_body)
                }));
            }
        }
        let load = Self {
            stop,
            counters,
            errors,
            last_body,
            threads,
        };
        load.wait_requests(10);
        load
    }

    pub fn ok(&self) -> u64 {
        self.counters.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests have succeeded (proves traffic flows).
    pub fn wait_requests(&self, n: u64) {
        let target = self.ok() + n;
        let deadline = Instant::now() + WAIT;
        while self.ok() < target {
            assert!(
                Instant::now() < deadline,
                "load made no progress: {:?}",
                relock(&self.errors)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn last_body(&self) -> String {
        relock(&self.last_body).clone()
    }

    pub fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        LoadReport {
            ok: self.counters.ok.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
            retried: self.counters.retried.load(Ordering::Relaxed),
            errors: relock(&self.errors).clone(),
        }
    }
}

impl LoadReport {
    /// Connections refused or not established at all.
    pub fn connect_errors(&self) -> usize {
        self.errors
            .iter()
            .filter(|e| e.starts_with("connect:"))
            .count()
    }

    pub fn assert_no_failures(&self) {
        assert!(
            self.failed == 0,
            "{} of {} requests failed; first errors: {:?}",
            self.failed,
            self.ok + self.failed,
            &self.errors[..self.errors.len().min(10)]
        );
        assert!(self.ok > 0, "no request succeeded");
    }

    /// Prints what the load saw, as `what`, then asserts that no request
    /// failed and no connection was refused.
    pub fn assert_served_all(&self, what: &str) {
        eprintln!(
            "{what}: {} ok, {} failed, {} keep-alive retries",
            self.ok, self.failed, self.retried
        );
        assert_eq!(self.connect_errors(), 0, "{what}: {:?}", self.errors);
        self.assert_no_failures();
    }
}

fn client_loop(
    addr: SocketAddr,
    mode: Mode,
    max: Duration,
    stop: &AtomicBool,
    c: &Counters,
    errors: &Mutex<Vec<String>>,
    last_body: &Mutex<String>,
) {
    let deadline = Instant::now() + max;
    let mut conn: Option<TcpStream> = None;
    let record_err = |e: String| {
        c.failed.fetch_add(1, Ordering::Relaxed);
        // Wall-clock time, to line the error up with baton's log.
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut errs = relock(errors);
        if errs.len() < 100 {
            errs.push(format!(
                "{e} (at {}.{:06} {mode:?})",
                at.as_secs(),
                at.subsec_micros()
            ));
        }
    };
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let keep = mode == Mode::KeepAlive;
        let reused = conn.is_some();
        let mut stream = match conn.take() {
            Some(s) => s,
            None => match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    s
                }
                Err(e) => {
                    record_err(format!("connect: {e}"));
                    continue;
                }
            },
        };
        match roundtrip(&mut stream, "/", keep) {
            Ok(r) if r.status == 200 => {
                c.ok.fetch_add(1, Ordering::Relaxed);
                *relock(last_body) = r.body;
                if keep && !r.close {
                    conn = Some(stream);
                }
            }
            Ok(r) => record_err(format!("status {}: {}", r.status, r.body)),
            Err(HttpError::BeforeResponse(_)) if reused => {
                // Stale keep-alive connection: retry on a new one.
                c.retried.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => record_err(format!("{e:?}")),
        }
    }
}

// ----- processes -------------------------------------------------------------

/// Pids of live (non-zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    procs()
        .into_iter()
        .filter(|p| p.pgrp == pgid && p.state != 'Z')
        .map(|p| p.pid)
        .collect()
}

pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    pub pgrp: i32,
    pub state: char,
}

pub fn procs() -> Vec<ProcInfo> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        out.push(ProcInfo {
            pid,
            state: f[0].chars().next().unwrap_or('?'),
            ppid: f[1].parse().unwrap_or(0),
            pgrp: f[2].parse().unwrap_or(0),
        });
    }
    out
}

/// Zombie children of `pid`.
pub fn zombies_of(pid: i32) -> Vec<i32> {
    procs()
        .into_iter()
        .filter(|p| p.ppid == pid && p.state == 'Z')
        .map(|p| p.pid)
        .collect()
}

/// Waits until `cond` holds, polling; panics with `what` after `timeout`.
/// (A `Baton` in scope prints its log as the panic unwinds; see also
/// [`Baton::wait_until`].)
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes an executable shell script.
pub fn write_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Waits until process `pid` holds the server side of `client`'s TCP
/// connection (it has accept()ed it), by matching socket inodes in
/// /proc/net/tcp and /proc/PID/fd.
pub fn wait_accepted_by(pid: i32, client: &TcpStream) {
    let local = client.local_addr().unwrap();
    let peer = client.peer_addr().unwrap();
    // /proc/net/tcp shows ports in hex; the server side has local=peer.
    let key = format!(":{:04X} ", peer.port());
    let rem = format!(":{:04X} ", local.port());
    wait_until(&format!("pid {pid} to accept {local}"), WAIT, || {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let inode = table.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (l_addr, r_addr) = (format!("{} ", f.get(1)?), format!("{} ", f.get(2)?));
            (l_addr.ends_with(&key) && r_addr.ends_with(&rem))
                .then(|| f.get(9).map(|s| s.to_string()))?
        });
        let Some(inode) = inode else { return false };
        let target = format!("socket:[{inode}]");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten().any(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == target)
                })
            })
            .unwrap_or(false)
    });
}

// ----- root-only tests ------------------------------------------------------

/// For the tests that need root: they are compiled as ignored unless the
/// tests were built by root (`cfg(baton_root)`, see tests/build.rs), and
/// must then really run as root.
pub fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "built as root (cfg baton_root) but running as uid {}: rebuild the tests as this user",
        nix::unistd::geteuid()
    );
}

/// Creates (once) the unprivileged user and extra group the tests use.
pub fn test_user() -> (u32, u32, u32) {
    let run = |cmd: &[&str]| {
        let _ = std::process::Command::new(cmd[0]).args(&cmd[1..]).output();
    };
    run(&["groupadd", "--system", "baton-extra"]);
    run(&[
        "useradd",
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        "--user-group",
        "baton-test",
    ]);
    run(&["usermod", "-aG", "baton-extra", "baton-test"]);
    let user = nix::unistd::User::from_name("baton-test")
        .unwrap()
        .expect("user baton-test");
    let extra = nix::unistd::Group::from_name("baton-extra")
        .unwrap()
        .expect("group baton-extra");
    (user.uid.as_raw(), user.gid.as_raw(), extra.gid.as_raw())
}
