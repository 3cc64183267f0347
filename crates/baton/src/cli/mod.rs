//! The command line: `baton run` starts a supervisor; `upgrade`,
//! `rollback`, `status` and `stop` talk to one over its control socket;
//! `deploy` and `releases` manage releases side by side and then talk to
//! it the same way.
//!
//! Exit codes (stable, for scripts): 0 success; 1 the operation failed
//! (the upgrade failed and the old generation still serves, another
//! upgrade is running, nothing to roll back to); 2 usage, configuration or
//! environment error (bad flag, bad config, address in use, supervisor
//! unreachable). [`CliError::exit_code`] is the one place errors map to them.

mod client;
mod deploy;
mod docs;
mod report;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use baton::config::{self, ListenSpec, ReadySpec, SignalSpec};
use baton::listener::InheritedSockets;
use baton::protocol::{ErrorKind, ErrorReply};
use clap::{Args, Parser, Subcommand};

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
    Upgrade(UpgradeCmd),
    /// During a canary or bake: give the traffic back to the previous
    /// generation at once. Otherwise: start the previous successful release
    /// and cut over to it
    Rollback(StreamArgs),
    /// Cut a canary over to all traffic, or end a bake now
    Promote(PromoteArgs),
    /// Show the supervisor, its sockets and generations
    Status {
        /// Print JSON for scripts
        #[arg(long)]
        json: bool,
    },
    /// Drain every generation, then exit the supervisor
    Stop,
    /// Print a shell completion script to stdout
    Completions {
        /// The shell to complete for
        #[arg(value_enum)]
        shell: clap_complete::aot::Shell,
    },
    /// Print baton's man page (roff) to stdout
    Man,
    /// (internal) Continue a baton that is upgrading itself: the previous
    /// image re-executes the binary with this
    #[command(name = "__handover", hide = true)]
    Handover {
        #[arg(long)]
        state_fd: i32,
    },
    /// (internal) Check a hand-over document on stdin: exit 0 if this
    /// binary can take it over
    #[command(name = "__handover-check", hide = true)]
    HandoverCheck,
    /// Unpack an artifact into a new release beside the others, point
    /// `current` at it and upgrade to it (`current` goes back if the
    /// upgrade fails)
    Deploy(DeployArgs),
    /// List the releases: which is active, parked, previous or failed, and
    /// when each was deployed
    Releases(ReleasesArgs),
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// A .tar.gz, .tar.zst or .tar archive, or a directory
    #[arg(value_name = "ARTIFACT")]
    pub artifact: PathBuf,
    /// Name of the release [default: the artifact's file name without
    /// .tar.gz/.tar.zst, else a timestamp]
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Releases root, if the supervisor does not report one (it does when
    /// started with --releases-dir)
    #[arg(long, value_name = "DIR")]
    pub releases_dir: Option<PathBuf>,
    /// Unpack and point `current` at the release without upgrading: a
    /// first install before `baton run`, or staging for the next upgrade
    #[arg(long, conflicts_with_all = ["canary", "canary_for", "bake", "no_wait"])]
    pub no_upgrade: bool,
    #[command(flatten)]
    pub upgrade: UpgradeArgs,
}

#[derive(Debug, Args)]
pub struct ReleasesArgs {
    /// Releases root, if the supervisor does not report one (or is not
    /// running)
    #[arg(long, value_name = "DIR")]
    pub releases_dir: Option<PathBuf>,
    /// Print JSON for scripts
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StreamArgs {
    /// Return once the outcome is known, without waiting for the old
    /// generation to finish draining
    #[arg(long)]
    pub no_wait_drain: bool,
    /// Print one JSON object with the outcome at the end (outcome,
    /// generation, release, phases, reason; see docs/fleet.md), and
    /// nothing else on stdout
    #[arg(long, conflicts_with = "events")]
    pub json: bool,
    /// Print the raw event stream (NDJSON), as the control socket sends it
    #[arg(long)]
    pub events: bool,
}

#[derive(Debug, Args)]
pub struct UpgradeCmd {
    #[command(flatten)]
    pub args: UpgradeArgs,
    /// Upgrade baton itself: re-execute its binary (the path it was
    /// started from, looked up again) in place, same pid, handing over
    /// every socket and process; the apps are untouched
    #[arg(long = "self", conflicts_with_all = ["no_wait", "canary", "canary_for", "bake", "json", "events"])]
    pub self_: bool,
}

#[derive(Debug, Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    pub stream: StreamArgs,
    /// Return as soon as the new generation is active, without waiting
    /// for its bake (or the old generation's drain)
    #[arg(long)]
    pub no_wait: bool,
    /// Canary: once ready, the new generation takes PCT percent of new
    /// connections and the upgrade waits for `baton promote` or `baton
    /// rollback` (steered traffic only); returns once the canary runs
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u8).range(0..=100))]
    pub canary: Option<u8>,
    /// Promote a canary that stayed healthy this long
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration, requires = "canary")]
    pub canary_for: Option<Duration>,
    /// This upgrade's bake window (overrides the configured one)
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    pub bake: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    #[command(flatten)]
    pub stream: StreamArgs,
    /// Return as soon as the new generation is active, without waiting for
    /// its bake
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (TOML); flags override its values
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (IP:PORT; port 0
    /// takes a free port, logged at start)
    #[arg(long, value_name = "ADDR", value_parser = config::parse_metrics_addr)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Log format on stderr: text or json (one object per line, the apps'
    /// stderr lines included) [default: text]
    #[arg(long, value_name = "FORMAT", value_parser = config::parse_log_format)]
    pub log_format: Option<config::LogFormat>,
    /// Listener NAME=ADDRESS (IP:PORT, [IPv6]:PORT, udp:IP:PORT,
    /// unix:/path[,mode=0660]), or
    /// NAME alone for the socket of that name passed by systemd (LISTEN_FDS);
    /// repeatable, in fd order
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
    /// steered (a socket per generation; the kernel sends each new
    /// connection where the traffic plan says) or shared [default: steered]
    #[arg(long, value_name = "MODE", value_parser = config::parse_traffic)]
    pub traffic: Option<config::TrafficMode>,
    /// How long the previous generation stays parked after a cutover,
    /// ready to take the traffic back [default: 0s, no bake]
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    pub bake: Option<Duration>,
    /// Health check during a canary and a bake: http:/PATH, tcp or
    /// exec:COMMAND; failing ones roll back
    #[arg(long, value_name = "CHECK")]
    pub health: Option<config::HealthSpec>,
    /// Time between health checks [default: 1s]
    #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
    pub health_interval: Option<Duration>,
    /// Consecutive failed health checks that roll back [default: 3]
    #[arg(long, value_name = "N")]
    pub health_failures: Option<u32>,
    /// Loopback source ports of baton's probes, which the kernel sends to
    /// a dark candidate [default: 61000-61999]
    #[arg(long, value_name = "FIRST-LAST")]
    pub probe_ports: Option<config::PortRange>,
    /// Processes per generation, each given the generation's sockets and
    /// restarted alone if it crashes [default: 1]
    #[arg(long, value_name = "N")]
    pub workers: Option<u32>,
    /// Releases root for `baton deploy`: releases in DIR/releases/NAME,
    /// and the app runs in DIR/current unless --cwd is given
    #[arg(long, value_name = "DIR")]
    pub releases_dir: Option<PathBuf>,
    /// Releases `baton deploy` keeps, besides the active and previous ones
    /// [default: 5]
    #[arg(long, value_name = "N")]
    pub keep_releases: Option<u32>,
    /// full (the new generation starts beside the old one) or none (the
    /// app cannot run twice: the old one drains and exits first, then the
    /// new one starts; connections wait meanwhile) [default: full]
    #[arg(long, value_name = "MODE", value_parser = config::parse_overlap)]
    pub overlap: Option<config::Overlap>,
    /// CPU priority of an upgrade's new generation until it is ready:
    /// idle (SCHED_IDLE), batch (SCHED_BATCH), nice:N or normal; a lowered
    /// one gets baton's own priority back before it takes traffic
    /// [default: normal]
    #[arg(long, value_name = "PRIORITY", value_parser = config::parse_candidate_priority)]
    pub candidate_priority: Option<config::CpuPriority>,
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

/// Everything that can go wrong in a command, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("checking the app's command")]
    Resolve(#[from] baton::process::ResolveError),
    #[error(transparent)]
    Bind(#[from] baton::listener::BindError),
    #[error(transparent)]
    Metrics(#[from] baton::metrics::BindError),
    #[error("writing to stdout")]
    Stdout(#[source] std::io::Error),
    #[error(transparent)]
    Control(#[from] baton::control::ControlError),
    #[error("{what}")]
    Setup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("taking the sockets passed by the service manager")]
    ListenFds(#[from] baton_sys::ListenFdsError),
    #[error("reaching the service manager")]
    Systemd(#[from] baton::systemd::NotifySetupError),
    #[error("taking over from the previous baton")]
    Handover(#[from] baton::handover::HandoverError),
    #[error("baton did not come back from its self-upgrade within {0:?}")]
    SelfUpgradeLost(Duration),
    #[error("--user/--group need baton to run as root")]
    NeedsRoot,
    #[error("cannot start the app: {0}")]
    StartApp(String),
    #[error("{what} refused: {}", .reply.message)]
    Refused {
        what: &'static str,
        reply: ErrorReply,
    },
    #[error("the supervisor closed the stream before the {0} ended")]
    StreamEnded(&'static str),
    #[error("no status in the supervisor's reply")]
    NoStatus,
    #[error("the supervisor is still draining after 5 minutes")]
    StillDraining,
    #[error("printing JSON")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Release(#[from] baton::releases::ReleaseError),
    #[error("no releases directory: the supervisor was not started with --releases-dir (or `releases_dir`); pass --releases-dir")]
    NoReleasesDir,
    #[error("no release deployed yet: {} does not exist; deploy one first with `baton deploy --no-upgrade --releases-dir {} ARTIFACT`", .current.display(), .root.display())]
    NoRelease { current: PathBuf, root: PathBuf },
}

impl CliError {
    /// The one place errors map to exit codes.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Refused { reply, .. } => match reply.kind {
                ErrorKind::Busy
                | ErrorKind::Stopping
                | ErrorKind::NoPrevious
                | ErrorKind::NothingToPromote
                | ErrorKind::NeedsSteering
                | ErrorKind::SelfUpgrade
                | ErrorKind::NeedsOverlap => EXIT_FAILED,
                ErrorKind::BadRequest | ErrorKind::Config | ErrorKind::Forbidden => EXIT_USAGE,
            },
            Self::StreamEnded(_)
            | Self::NoStatus
            | Self::StillDraining
            | Self::Json(_)
            | Self::Stdout(_)
            | Self::Handover(_)
            | Self::SelfUpgradeLost(_) => EXIT_FAILED,
            Self::Release(e) if e.is_usage() => EXIT_USAGE,
            Self::Release(_) => EXIT_FAILED,
            Self::NoReleasesDir | Self::NoRelease { .. } => EXIT_USAGE,
            Self::Config(_)
            | Self::Resolve(_)
            | Self::Bind(_)
            | Self::Metrics(_)
            | Self::Control(_)
            | Self::Setup { .. }
            | Self::ListenFds(_)
            | Self::Systemd(_)
            | Self::NeedsRoot
            | Self::StartApp(_) => EXIT_USAGE,
        }
    }
}

/// Logs go to stderr through a non-blocking writer: a slow or stuck log
/// reader must never delay a cutover or a kill timer. Lines that do not
/// fit its buffer are dropped. The guard flushes (boundedly) when dropped.
/// JSON lines carry `timestamp`, `level`, `message` and the event's fields
/// at the top level (docs/operations.md lists them).
pub fn init_tracing(format: config::LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = stderr_writer("baton-log");
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_target(false);
    match format {
        config::LogFormat::Text => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            logs.with_ansi(ansi).init();
        }
        config::LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    guard
}

/// A writer to baton's stderr that never blocks: lines go through a
/// bounded buffer to a thread of its own, and are dropped if it is full.
/// 8 192 lines: enough for any burst baton or an app writes, and the
/// buffer is allocated whole up front (the default, 128 000, cost 4 MB
/// of RSS per writer).
pub fn stderr_writer(
    thread: &str,
) -> (
    tracing_appender::non_blocking::NonBlocking,
    tracing_appender::non_blocking::WorkerGuard,
) {
    tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(8192)
        .lossy(true)
        .thread_name(thread)
        .finish(std::io::stderr())
}

/// Runs a parsed command line; `Ok` carries the exit code of a command
/// that reported its own outcome (an upgrade that failed exits 1).
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Cmd::Completions { shell } => return docs::completions(shell).map(ExitCode::from),
        Cmd::Man => return docs::man().map(ExitCode::from),
        Cmd::HandoverCheck => {
            return baton::handover::State::read(std::io::stdin().lock())
                .map(|_| ExitCode::from(EXIT_OK))
                .map_err(CliError::Handover)
        }
        _ => {}
    }
    // Sockets from a service manager are taken first, before anything else
    // opens descriptors: they are known by number until then.
    let inherited = match &cli.command {
        Cmd::Run(_) => InheritedSockets::new(baton_sys::take_listen_fds()?),
        _ => InheritedSockets::default(),
    };
    // `run` sets its logs up once its configuration (which names the
    // format) is loaded.
    let _logs = (!matches!(cli.command, Cmd::Run(_) | Cmd::Handover { .. }))
        .then(|| init_tracing(config::LogFormat::Text));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| CliError::Setup {
            what: "starting the runtime",
            source,
        })?;
    let result = match cli.command {
        Cmd::Run(args) => {
            // The supervisor runs on the runtime's threads; this (main)
            // thread forks every app, until the supervisor is done.
            let (spawner, forks) = baton::process::Spawner::new();
            let task = runtime.spawn(run::supervise(args, cli.control, inherited, spawner));
            forks.run();
            runtime.block_on(task).unwrap_or_else(|e| {
                Err(CliError::StartApp(format!(
                    "the supervisor task failed: {e}"
                )))
            })
        }
        Cmd::Handover { state_fd } => {
            let (spawner, forks) = baton::process::Spawner::new();
            let task = runtime.spawn(run::resume(state_fd, spawner));
            forks.run();
            runtime.block_on(task).unwrap_or_else(|e| {
                Err(CliError::StartApp(format!(
                    "the supervisor task failed: {e}"
                )))
            })
        }
        command => runtime.block_on(async move {
            match command {
                Cmd::Run(_) | Cmd::Handover { .. } => unreachable!("handled above"),
                Cmd::Upgrade(cmd) if cmd.self_ => {
                    client::upgrade_self(control_path(cli.control)).await
                }
                Cmd::Upgrade(cmd) => client::upgrade(control_path(cli.control), cmd.args).await,
                Cmd::Rollback(args) => client::rollback(control_path(cli.control), args).await,
                Cmd::Promote(args) => client::promote(control_path(cli.control), args).await,
                Cmd::Status { json } => client::status(control_path(cli.control), json).await,
                Cmd::Stop => client::stop(control_path(cli.control)).await,
                Cmd::Deploy(args) => deploy::deploy(control_path(cli.control), args).await,
                Cmd::Releases(args) => deploy::releases(control_path(cli.control), args).await,
                Cmd::Completions { .. } | Cmd::Man | Cmd::HandoverCheck => Ok(EXIT_OK),
            }
        }),
    };
    // Don't wait for lingering blocking tasks (none should remain).
    runtime.shutdown_timeout(Duration::from_millis(100));
    result.map(ExitCode::from)
}

fn control_path(flag: Option<PathBuf>) -> PathBuf {
    flag.unwrap_or_else(config::default_control_path)
}
