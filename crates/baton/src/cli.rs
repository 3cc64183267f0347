//! Command-line interface: `baton run` starts a supervisor; `upgrade`,
//! `rollback`, `status` and `stop` talk to one over its control socket.
//!
//! Exit codes (stable, for scripts): 0 success; 1 the operation failed
//! (the upgrade failed and the old generation still serves, another
//! upgrade is running, nothing to roll back to); 2 usage, configuration or
//! environment error (bad flag, bad config, address in use, supervisor
//! unreachable).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, ConfigSource, ListenSpec, Overrides, ReadySpec, SignalSpec};
use crate::control;
use crate::listener;
use crate::notify::NotifySocket;
use crate::protocol::{ErrorKind, EventKind, GenState, Reply, Request, Status};
use crate::supervisor::{error_chain, Supervisor};

pub const EXIT_OK: u8 = 0;
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about = "Zero-downtime socket-handoff supervisor"
)]
pub struct Cli {
    /// Control socket of the supervisor
    /// [default: $XDG_RUNTIME_DIR/baton/control.sock, /run/baton/control.sock as root, else /tmp/baton-$UID/control.sock]
    #[arg(long, global = true, env = "BATON_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
// Parsed once per process; boxing `Run` would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Cmd {
    /// Bind the sockets, start the app and supervise it
    Run(RunArgs),
    /// Start a new generation from the current configuration and cut over
    Upgrade(UpgradeArgs),
    /// Start the previous successful release and cut over to it
    Rollback(UpgradeArgs),
    /// Show the supervisor, its sockets and generations
    Status {
        /// Print JSON for scripts
        #[arg(long)]
        json: bool,
    },
    /// Drain every generation, then exit the supervisor
    Stop,
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Return as soon as the new generation is active, without waiting for
    /// the old one to finish draining
    #[arg(long)]
    pub no_wait_drain: bool,
    /// Print the raw event stream (NDJSON)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML); flags override its values
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Listener NAME=ADDRESS (IP:PORT, [IPv6]:PORT, unix:/path[,mode=0660]); repeatable, in fd order
    #[arg(long = "listen", value_name = "NAME=ADDRESS")]
    pub listen: Vec<ListenSpec>,
    /// Readiness check: notify, http:/PATH, tcp, exec:COMMAND, delay:DURATION [default: notify]
    #[arg(long, value_name = "CHECK")]
    pub ready: Option<ReadySpec>,
    /// How long a new generation may take to become ready [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    pub ready_timeout: Option<Duration>,
    /// Signal telling a generation to drain [default: SIGTERM]
    #[arg(long, value_name = "SIGNAL")]
    pub drain_signal: Option<SignalSpec>,
    /// Time a draining generation gets before SIGKILL [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    pub drain_timeout: Option<Duration>,
    /// Working directory of the app, resolved (symlinks followed) at every start
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// Extra environment variable for the app; repeatable
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Start the app with only --env/config variables, not baton's environment
    #[arg(long)]
    pub env_clear: bool,
    /// Listen backlog of every socket [default: 4096]
    #[arg(long, value_name = "N")]
    pub backlog: Option<u32>,
    /// Run the app as this user (baton must be root)
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Run the app with this group (default: the user's primary group)
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// The app's command; `{fd:NAME}` becomes that listener's fd number
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!(
            "bad environment assignment {s:?}: expected KEY=VALUE"
        )),
    }
}

pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Runs a parsed command line to completion.
pub fn run(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton: error: starting the runtime: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let code = runtime.block_on(async move {
        match cli.command {
            Cmd::Run(args) => run_supervisor(args, cli.control).await,
            Cmd::Upgrade(args) => upgrade(control_path(cli.control), false, args).await,
            Cmd::Rollback(args) => upgrade(control_path(cli.control), true, args).await,
            Cmd::Status { json } => status(control_path(cli.control), json).await,
            Cmd::Stop => stop(control_path(cli.control)).await,
        }
    });
    // Don't wait for lingering blocking tasks (none should remain).
    runtime.shutdown_timeout(Duration::from_millis(100));
    ExitCode::from(code)
}

fn control_path(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(config::default_control_path)
}

fn fail(code: u8, e: &(dyn std::error::Error + 'static)) -> u8 {
    eprintln!("baton: error: {}", error_chain(e));
    code
}

async fn run_supervisor(args: RunArgs, control: Option<PathBuf>) -> u8 {
    let base_dir = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => return fail(EXIT_USAGE, &e),
    };
    let source = ConfigSource {
        file: args.config.clone(),
        overrides: Overrides {
            listen: args.listen,
            command: args.command,
            cwd: args.cwd,
            env: args.env,
            env_clear: args.env_clear,
            ready: args.ready,
            ready_timeout: args.ready_timeout,
            drain_signal: args.drain_signal,
            drain_timeout: args.drain_timeout,
            control,
            backlog: args.backlog,
            user: args.user,
            group: args.group,
        },
        base_dir,
    };
    let config = match source.load() {
        Ok(c) => c,
        Err(e) => return fail(EXIT_USAGE, &e),
    };
    // Everything that can be checked is checked before the first bind, so
    // a bad invocation starts nothing.
    if let Err(e) = crate::supervisor::resolve_release(&config) {
        return fail(EXIT_USAGE, &e);
    }
    if (config.user.is_some() || config.group.is_some()) && !nix::unistd::geteuid().is_root() {
        eprintln!("baton: error: --user/--group need baton to run as root");
        return EXIT_USAGE;
    }
    let listeners = match listener::bind_all(&config.listen, config.backlog) {
        Ok(l) => l,
        Err(e) => return fail(EXIT_USAGE, &e),
    };
    for l in &listeners {
        tracing::info!(name = %l.name, address = %l.address, "listening");
    }
    let control_listener =
        match control::bind(&config.control, !config.control_allow_uids.is_empty()) {
            Ok(l) => l,
            Err(e) => return fail(EXIT_USAGE, &e),
        };
    let runtime_dir = match notify_dir(config.user.is_some() || config.group.is_some()) {
        Ok(d) => d,
        Err(e) => return fail(EXIT_USAGE, &e),
    };
    let notify = match NotifySocket::bind(&runtime_dir.path().join("notify.sock")) {
        Ok(n) => n,
        Err(e) => return fail(EXIT_USAGE, &e),
    };
    let control_path = config.control.clone();
    let allowed = config.control_allow_uids.clone();
    let supervisor = Supervisor::new(source, config, listeners, notify);
    let handle = supervisor.handle();
    tracing::info!(control = %control_path.display(), pid = std::process::id(), "supervisor started");
    let connections = control::Connections::default();
    let server = tokio::spawn(control::serve(
        control_listener,
        handle.clone(),
        allowed,
        connections.clone(),
    ));
    let signals = tokio::spawn(handle_signals(handle));
    let result = supervisor.run(std::future::pending()).await;
    server.abort();
    signals.abort();
    // Let replies in flight (`stop`'s own) reach their clients.
    connections.drained(Duration::from_secs(1)).await;
    let _ = std::fs::remove_file(&control_path);
    drop(runtime_dir);
    match result {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("baton: error: cannot start the app: {e}");
            EXIT_USAGE
        }
    }
}

/// A private directory for the notify socket, reachable (0711) by apps
/// that run as another user. With `--user`, `$XDG_RUNTIME_DIR` (a 0700
/// per-user directory) would be out of the app's reach, so the system
/// runtime dir (or the temp dir) is used instead.
fn notify_dir(other_user: bool) -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let base = if other_user {
        Some(PathBuf::from("/run")).filter(|d| d.is_dir())
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
    }
    .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new().prefix("baton-").tempdir_in(base)?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
    Ok(dir)
}

/// SIGHUP upgrades; SIGTERM and SIGINT stop.
async fn handle_signals(handle: crate::supervisor::Handle) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: upgrade requested");
                if let Err(e) = handle.upgrade(crate::protocol::Trigger::Signal, false).await {
                    tracing::info!("SIGHUP: {}", e.message);
                }
            }
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); handle.stop().await; }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); handle.stop().await; }
        }
    }
}

fn error_exit_code(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Busy | ErrorKind::Stopping | ErrorKind::NoPrevious => EXIT_FAILED,
        ErrorKind::BadRequest | ErrorKind::Config | ErrorKind::Forbidden => EXIT_USAGE,
    }
}

async fn upgrade(path: PathBuf, rollback: bool, args: UpgradeArgs) -> u8 {
    let wait_drain = !args.no_wait_drain;
    let req = if rollback {
        Request::Rollback { wait_drain }
    } else {
        Request::Upgrade { wait_drain }
    };
    let what = if rollback { "rollback" } else { "upgrade" };
    let mut code = None;
    let res = control::request(&path, &req, |reply| {
        if args.json {
            if let Ok(s) = serde_json::to_string(&reply) {
                println!("{s}");
            }
        }
        match reply {
            Reply::Event(ev) => {
                if !args.json {
                    println!(
                        "{:>9}  {}",
                        format!("+{:.3}s", ev.elapsed_us.unwrap_or(0) as f64 / 1e6),
                        describe_event(ev.generation, &ev.kind)
                    );
                }
            }
            Reply::Done(o) => {
                if !args.json {
                    let secs = o.elapsed_us as f64 / 1e6;
                    if o.success {
                        println!(
                            "{what} succeeded: generation {} is active ({secs:.3}s)",
                            o.upgrade
                        );
                    } else {
                        println!(
                            "{what} failed: {}; generation {} still serves",
                            o.reason.as_deref().unwrap_or("unknown reason"),
                            o.active.map_or("none".into(), |a| a.to_string())
                        );
                        if !o.stderr_tail.is_empty() {
                            println!("last lines of generation {}'s stderr:", o.upgrade);
                            for l in &o.stderr_tail {
                                println!("  | {l}");
                            }
                        }
                    }
                }
                code = Some(match (o.success, o.config_error) {
                    (true, _) => EXIT_OK,
                    (false, true) => EXIT_USAGE,
                    (false, false) => EXIT_FAILED,
                });
            }
            Reply::Error(e) => {
                eprintln!("baton: error: {what} refused: {}", e.message);
                code = Some(error_exit_code(e.kind));
            }
            Reply::Status(_) | Reply::Stopping => {}
        }
    })
    .await;
    match (res, code) {
        (Err(e), _) => fail(EXIT_USAGE, &e),
        (Ok(()), Some(c)) => c,
        (Ok(()), None) => {
            eprintln!("baton: error: the supervisor closed the stream before the {what} ended");
            EXIT_FAILED
        }
    }
}

fn describe_event(gen: u64, kind: &EventKind) -> String {
    match kind {
        EventKind::UpgradeRequested { trigger } => {
            format!("generation {gen} requested ({trigger:?})").to_lowercase()
        }
        EventKind::Spawned { pid, dir } => format!("generation {gen} started: pid {pid} in {dir}"),
        EventKind::SpawnFailed { error } => format!("generation {gen} could not start: {error}"),
        EventKind::Ready { via, .. } => format!("generation {gen} ready ({via})"),
        EventKind::Active { .. } => format!("generation {gen} active"),
        EventKind::Draining { pid, signal } => {
            format!("generation {gen} draining ({signal} to pid {pid})")
        }
        EventKind::Killed { pid } => {
            format!("generation {gen} killed after drain timeout (pid {pid})")
        }
        EventKind::Exited { pid, status } => {
            format!("generation {gen} exited: pid {pid}, {status}")
        }
        EventKind::Restarting { delay_ms, restarts } => {
            format!("generation {gen} restarting in {delay_ms}ms (restart {restarts})")
        }
        EventKind::Status { text } => format!("generation {gen} status: {text}"),
        EventKind::Stopping { pid } => format!("generation {gen} stopping (pid {pid})"),
        EventKind::UpgradeSucceeded => format!("generation {gen} took over"),
        EventKind::UpgradeFailed { reason, .. } => format!("generation {gen} failed: {reason}"),
    }
}

async fn status(path: PathBuf, json: bool) -> u8 {
    let mut got: Option<Status> = None;
    let mut err = None;
    let res = control::request(&path, &Request::Status, |reply| match reply {
        Reply::Status(s) => got = Some(s),
        Reply::Error(e) => err = Some(e),
        _ => {}
    })
    .await;
    if let Err(e) = res {
        return fail(EXIT_USAGE, &e);
    }
    if let Some(e) = err {
        eprintln!("baton: error: {}", e.message);
        return error_exit_code(e.kind);
    }
    let Some(s) = got else {
        eprintln!("baton: error: no status in the supervisor's reply");
        return EXIT_FAILED;
    };
    if json {
        match serde_json::to_string_pretty(&s) {
            Ok(t) => println!("{t}"),
            Err(e) => return fail(EXIT_FAILED, &e),
        }
    } else {
        print!("{}", format_status(&s));
    }
    EXIT_OK
}

fn fmt_ms(ms: u64) -> String {
    let d = Duration::from_secs(ms / 1000);
    if d.is_zero() {
        format!("{ms}ms")
    } else {
        humantime::format_duration(d).to_string().replace(' ', "")
    }
}

/// The human-readable `status` table.
pub fn format_status(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "baton {} (pid {}), up {}{}",
        s.version,
        s.pid,
        fmt_ms(s.uptime_ms),
        if s.stopping { ", stopping" } else { "" }
    );
    let _ = writeln!(out, "\nSOCKET   FD  ADDRESS");
    for sock in &s.sockets {
        let _ = writeln!(out, "{:<8} {:<3} {}", sock.name, sock.fd, sock.address);
    }
    let _ = writeln!(
        out,
        "\nGEN  STATE     PID      UPTIME    RESTARTS  DIR  (STATUS)"
    );
    for g in s.generations.iter().rev() {
        let state = match g.state {
            GenState::Starting => "starting",
            GenState::Ready => "ready",
            GenState::Active => "active",
            GenState::Draining => "draining",
            GenState::Exited => "exited",
            GenState::Failed => "failed",
        };
        let pid = g.pid.map_or("-".to_owned(), |p| {
            if g.pids.len() > 1 {
                format!("{p}+{}", g.pids.len() - 1)
            } else {
                p.to_string()
            }
        });
        let _ = write!(
            out,
            "{:<4} {:<9} {:<8} {:<9} {:<9} {}",
            g.number,
            state,
            pid,
            g.uptime_ms.map_or("-".into(), fmt_ms),
            g.restarts,
            g.dir
        );
        match (g.pid, &g.status_text, &g.last_exit) {
            (None, _, Some(exit)) => {
                let _ = write!(out, "  ({exit})");
            }
            (Some(_), Some(text), _) => {
                let _ = write!(out, "  ({text})");
            }
            _ => {}
        }
        out.push('\n');
    }
    if let Some(u) = s.upgrading {
        let _ = writeln!(out, "\nupgrade to generation {u} in progress");
    }
    out
}

async fn stop(path: PathBuf) -> u8 {
    let res = control::request(&path, &Request::Stop, |_| {}).await;
    match res {
        // Stop is idempotent: if the reply was cut short because the
        // supervisor finished first, its disappearing is the answer.
        Ok(()) | Err(control::ControlError::Http(_)) => {
            // Wait until the supervisor has gone (its socket stops answering).
            for _ in 0..6000 {
                if tokio::net::UnixStream::connect(&path).await.is_err() {
                    println!("stopped");
                    return EXIT_OK;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            eprintln!("baton: error: the supervisor is still draining after 5 minutes");
            EXIT_FAILED
        }
        Err(e) => fail(EXIT_USAGE, &e),
    }
}
