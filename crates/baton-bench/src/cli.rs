//! Command line. `quick` and `full` run the whole comparison (the app
//! alone, under baton, the naive deploy, HAProxy); `load` drives load at
//! one target, optionally upgrading a running baton meanwhile.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::load::ConnMode;

#[derive(Debug, Parser)]
#[command(
    name = "baton-bench",
    version,
    about = "Measures baton's cutovers under HTTP load, against the app alone, a naive deploy and HAProxy"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// The comparison in about a minute (a few cutovers per connection mode and traffic mode, 5 rollbacks, a 2 000-connection canary)
    Quick(ScenarioArgs),
    /// The full scenario: 200 cutovers per connection mode and traffic mode, 20 rollbacks, a 10 000-connection canary and every comparison (about 10 minutes)
    Full(ScenarioArgs),
    /// Drive load at one target; with --control, upgrade that baton meanwhile
    Load(LoadArgs),
    /// Upgrades without overlap (`baton run --overlap none`): the pause
    /// clients see while no app process runs, and that no request fails
    NoOverlap(NoOverlapArgs),
    /// Real servers under baton (gunicorn, uvicorn, Node, the Rust example),
    /// each upgraded again and again under load with steered traffic
    Servers(ServersArgs),
    /// The candidate's CPU priority (`--candidate-priority`), setting
    /// against setting: p99 in cutover windows vs steady, and the cost,
    /// its time to ready
    Priority(PriorityArgs),
    /// The soak: 1 000 cutovers of one baton under keep-alive load (over a
    /// million requests): nothing may fail or be retried, and baton's RSS,
    /// descriptors and CPU per cutover must stay flat
    Soak(SoakArgs),
    /// Each server's own reload (gunicorn's SIGHUP, PM2's cluster reload)
    /// against the same app under baton, steered and shared
    Tools(ToolsArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ToolsArgs {
    /// Print one JSON object on stdout (the readable summary goes to stderr)
    #[arg(long)]
    pub json: bool,
    /// Exit 1 if a contender was skipped or a deploy did not complete
    #[arg(long)]
    pub strict: bool,
    /// Directory for logs, tools.json and tools.txt
    #[arg(long, value_name = "DIR", default_value = "bench-out")]
    pub out: PathBuf,
    /// Contenders to run, in this order: naive, haproxy-reload, nginx-reload, baton-rust, baton-rust-shared, gunicorn-hup, baton-gunicorn, baton-gunicorn-shared, pm2-reload, baton-node, baton-node-shared
    #[arg(long, value_delimiter = ',', default_values_t = crate::tools::TOOLS.map(String::from))]
    pub tools: Vec<String>,
    /// The baton binary [default: next to baton-bench]
    #[arg(long, value_name = "PATH")]
    pub baton: Option<PathBuf>,
    /// The example app (hello) [default: next to baton-bench]
    #[arg(long, value_name = "PATH")]
    pub app: Option<PathBuf>,
    /// The haproxy binary [default: found on PATH]
    #[arg(long, value_name = "PATH")]
    pub haproxy: Option<PathBuf>,
    /// The nginx binary [default: found on PATH]
    #[arg(long, value_name = "PATH")]
    pub nginx: Option<PathBuf>,
    /// HAProxy threads and nginx worker processes
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub proxy_workers: usize,
    /// The virtualenv with gunicorn [default: target/bench-venv, made by benches/setup.sh]
    #[arg(long, value_name = "DIR")]
    pub venv: Option<PathBuf>,
    /// The node binary [default: found on PATH]
    #[arg(long, value_name = "PATH")]
    pub node: Option<PathBuf>,
    /// The pm2 binary [default: target/bench-node/node_modules/.bin/pm2, made by benches/setup.sh]
    #[arg(long, value_name = "PATH")]
    pub pm2: Option<PathBuf>,
    /// Where app.py and server.js are [default: benches/servers in the source tree]
    #[arg(long, value_name = "DIR")]
    pub servers_dir: Option<PathBuf>,
    /// Deploys per contender, connection mode and round
    #[arg(long, value_name = "N", default_value_t = 12)]
    pub deploys: u32,
    /// Runs of every contender, in turn (the order reversed every other
    /// round); the summary takes the median over them, because a single
    /// run's p99 moves with whatever else the machine does
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub rounds: u32,
    /// Time between deploys
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "1s")]
    pub interval: Duration,
    /// Open-loop rate, requests per second (well below every contender's ceiling)
    #[arg(long, value_name = "N", default_value_t = 500.0)]
    pub rate: f64,
    /// Connection modes to measure
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [ConnMode::KeepAlive, ConnMode::Close])]
    pub modes: Vec<ConnMode>,
    /// Concurrent connections (workers) of the load generator
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub concurrency: usize,
    /// Per-request timeout
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "5s")]
    pub timeout: Duration,
    /// No live progress line
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SoakArgs {
    /// Print one JSON object on stdout (the readable summary goes to stderr)
    #[arg(long)]
    pub json: bool,
    /// Exit 1 unless it held: every cutover ok, 0 failed, 0 retried, baton flat
    #[arg(long)]
    pub strict: bool,
    /// Directory for the log, soak.json, soak.txt and the timelines
    #[arg(long, value_name = "DIR", default_value = "bench-out")]
    pub out: PathBuf,
    /// Also draw baton's RSS, descriptors and CPU over the soak here (e.g. docs/bench-soak.svg)
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// The baton binary [default: next to baton-bench]
    #[arg(long, value_name = "PATH")]
    pub baton: Option<PathBuf>,
    /// The example app binary (`hello`) [default: next to baton-bench]
    #[arg(long, value_name = "PATH")]
    pub app: Option<PathBuf>,
    /// Cutovers
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub cutovers: u32,
    /// Time between upgrades (from one's start to the next, or right after
    /// the previous one if it took longer)
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "500ms")]
    pub interval: Duration,
    /// Open-loop rate, requests per second
    #[arg(long, value_name = "N", default_value_t = 2500.0)]
    pub rate: f64,
    /// Connection mode
    #[arg(long, value_enum, default_value_t = ConnMode::KeepAlive)]
    pub conn: ConnMode,
    /// Concurrent connections (workers) of the load generator
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub concurrency: usize,
    /// Per-request timeout
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "5s")]
    pub timeout: Duration,
    /// No live progress line
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ServersArgs {
    /// Print one JSON object on stdout (the readable summary goes to stderr)
    #[arg(long)]
    pub json: bool,
    /// Exit 1 if a request failed, a cutover failed or a server was skipped
    #[arg(long)]
    pub strict: bool,
    /// Directory for logs, servers.json and servers.txt
    #[arg(long, value_name = "DIR", default_value = "bench-out")]
    pub out: PathBuf,
    /// Servers to run, in this order: rust, gunicorn, uvicorn, node
    #[arg(long, value_delimiter = ',', default_values_t = crate::servers::SERVERS.map(String::from))]
    pub servers: Vec<String>,
    /// The baton binary [default: next to baton-bench]
    #[arg(long, value_name = "PATH")]
    pub baton: Option<PathBuf>,
    /// The Rust example app (`hello`) [default: next to baton-bench]
    #[arg(long, value_name = "PATH")]
    pub app: Option<PathBuf>,
    /// The virtualenv with gunicorn and uvicorn [default: target/bench-venv, made by benches/setup.sh]
    #[arg(long, value_name = "DIR")]
    pub venv: Option<PathBuf>,
    /// The node binary [default: found on PATH]
    #[arg(long, value_name = "PATH")]
    pub node: Option<PathBuf>,
    /// Where app.py and server.js are [default: benches/servers in the source tree]
    #[arg(long, value_name = "DIR")]
    pub servers_dir: Option<PathBuf>,
    /// Upgrades per server and connection mode
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub cutovers: u32,
    /// Time between upgrades
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "500ms")]
    pub interval: Duration,
    /// Open-loop rate, requests per second (well below the slowest server's ceiling)
    #[arg(long, value_name = "N", default_value_t = 500.0)]
    pub rate: f64,
    /// Connection modes to measure
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [ConnMode::KeepAlive, ConnMode::Close])]
    pub modes: Vec<ConnMode>,
    /// Concurrent connections (workers) of the load generator
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub concurrency: usize,
    /// Per-request timeout
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "5s")]
    pub timeout: Duration,
    /// No live progress line
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PriorityArgs {
    /// Print one JSON object on stdout (the readable summary goes to stderr)
    #[arg(long)]
    pub json: bool,
    /// Exit 1 if a request failed
    #[arg(long)]
    pub strict: bool,
    /// Directory for logs, the apps' stamps, priority.json and priority.txt
    #[arg(long, value_name = "DIR", default_value = "bench-out")]
    pub out: PathBuf,
    /// The baton binary [default: next to baton-bench]
    #[arg(long, value_name = "PATH")]
    pub baton: Option<PathBuf>,
    /// The example app binary (`hello`) [default: next to baton-bench]
    #[arg(long, value_name = "PATH")]
    pub app: Option<PathBuf>,
    /// Candidate priorities to compare (`baton run --candidate-priority`)
    #[arg(long, value_name = "P", value_delimiter = ',', default_values_t = ["normal".to_owned(), "idle".to_owned()])]
    pub priorities: Vec<String>,
    /// Traffic modes (`steered`, `shared`)
    #[arg(long, value_name = "MODE", value_delimiter = ',', default_values_t = ["steered".to_owned(), "shared".to_owned()])]
    pub traffic: Vec<String>,
    /// Connection modes to measure
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [ConnMode::KeepAlive, ConnMode::Close])]
    pub modes: Vec<ConnMode>,
    /// Upgrades per run
    #[arg(long, value_name = "N", default_value_t = 40)]
    pub cutovers: u32,
    /// Time between upgrades
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "500ms")]
    pub interval: Duration,
    /// Runs of every setting, in turn (the order reversed every other round)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub rounds: u32,
    /// Open-loop rate, requests per second [default: --rate-fraction of the app alone's measured ceiling]
    #[arg(long, value_name = "N")]
    pub rate: Option<f64>,
    /// Open-loop rate as a fraction of the app's measured ceiling
    #[arg(long, value_name = "F", default_value_t = 0.5)]
    pub rate_fraction: f64,
    /// Concurrent connections (workers) of the load generator
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub concurrency: usize,
    /// Per-request timeout
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "2s")]
    pub timeout: Duration,
    /// No live progress line
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct NoOverlapArgs {
    /// Print one JSON object on stdout (the readable summary goes to stderr)
    #[arg(long)]
    pub json: bool,
    /// Exit 1 if a request failed
    #[arg(long)]
    pub strict: bool,
    /// Directory for logs, the apps' stamps, no-overlap.json and no-overlap.txt
    #[arg(long, value_name = "DIR", default_value = "bench-out")]
    pub out: PathBuf,
    /// The baton binary [default: next to baton-bench]
    #[arg(long, value_name = "PATH")]
    pub baton: Option<PathBuf>,
    /// The example app binary (`hello`) [default: next to baton-bench]
    #[arg(long, value_name = "PATH")]
    pub app: Option<PathBuf>,
    /// Upgrades per connection mode
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub cutovers: u32,
    /// Time between upgrades
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "1s")]
    pub interval: Duration,
    /// Open-loop rate, requests per second
    #[arg(long, value_name = "N", default_value_t = 2000.0)]
    pub rate: f64,
    /// Connection modes to measure
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [ConnMode::KeepAlive, ConnMode::Close])]
    pub modes: Vec<ConnMode>,
    /// Concurrent connections (workers) of the load generator
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub concurrency: usize,
    /// Per-request timeout
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "5s")]
    pub timeout: Duration,
    /// The app sleeps this long before it serves and says READY=1 (a slow
    /// start: the pause grows by it)
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub delay_ready: u64,
    /// No live progress line
    #[arg(long)]
    pub quiet: bool,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("bad duration {s:?}: {e}"))
}

/// Options common to `quick` and `full`; unset ones take the scenario's
/// defaults (shown as [quick | full]).
#[derive(Debug, Clone, Args)]
pub struct ScenarioArgs {
    /// Print one JSON object on stdout (the readable summary goes to stderr)
    #[arg(long)]
    pub json: bool,
    /// Exit 1 if a request failed under baton (cutovers in either traffic mode, rollbacks) or a target was missed
    #[arg(long)]
    pub strict: bool,
    /// Directory for logs, report.json, summary.txt and the timelines
    #[arg(long, value_name = "DIR", default_value = "bench-out")]
    pub out: PathBuf,
    /// Also write the first --plot-span of the cutover timeline here (e.g.
    /// docs/bench-timeline.svg; the second connection mode gets FILE-MODE.svg)
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// How much of the run --plot shows (100 ms buckets stay readable)
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "20s")]
    pub plot_span: Duration,
    /// The baton binary [default: next to baton-bench]
    #[arg(long, value_name = "PATH")]
    pub baton: Option<PathBuf>,
    /// The example app binary (`hello`) [default: next to baton-bench]
    #[arg(long, value_name = "PATH")]
    pub app: Option<PathBuf>,
    /// The haproxy binary [default: found on PATH]
    #[arg(long, value_name = "PATH")]
    pub haproxy: Option<PathBuf>,
    /// Skip the HAProxy comparison
    #[arg(long)]
    pub no_haproxy: bool,
    /// Cutovers per connection mode under each baton (steered and shared traffic) [quick: 8 | full: 200]
    #[arg(long, value_name = "N")]
    pub cutovers: Option<u32>,
    /// Time between cutovers [quick: 500ms | full: 500ms]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub interval: Option<Duration>,
    /// Open-loop rate as a fraction of the app's measured ceiling
    #[arg(long, value_name = "F", default_value_t = 0.5)]
    pub rate_fraction: f64,
    /// Concurrent connections (workers) of the load generator
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub concurrency: usize,
    /// Threads of the load generator (1 = current-thread runtime)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub client_threads: usize,
    /// Per-request timeout
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "2s")]
    pub timeout: Duration,
    /// Connection modes to measure
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [ConnMode::KeepAlive, ConnMode::Close])]
    pub modes: Vec<ConnMode>,
    /// HAProxy threads (nbthread)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub haproxy_threads: usize,
    /// No live progress line
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Address to load (loopback only: 127.0.0.0/8 or ::1)
    #[arg(long, value_name = "IP:PORT")]
    pub target: SocketAddr,
    /// Open loop at this many requests per second; without it, closed loop
    #[arg(long, value_name = "N")]
    pub rate: Option<f64>,
    /// Connection mode
    #[arg(long, value_enum, default_value_t = ConnMode::KeepAlive)]
    pub conn: ConnMode,
    /// Concurrent connections (workers)
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub concurrency: usize,
    /// Run length without cutovers
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "10s")]
    pub duration: Duration,
    /// Per-request timeout
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "2s")]
    pub timeout: Duration,
    /// Threads of the load generator (1 = current-thread runtime)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub client_threads: usize,
    /// Control socket of a running baton to upgrade during the load
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Number of upgrades (with --control)
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub cutovers: u32,
    /// Time between upgrades (with --control)
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "1s")]
    pub interval: Duration,
    /// File the app stamps READY=1 and its drain signal into, for the
    /// cutover latency (with --control; the example app writes it when
    /// baton runs with HELLO_STAMPS=FILE in its environment)
    #[arg(long, value_name = "FILE")]
    pub stamps: Option<PathBuf>,
    /// Print the report as JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// Write the timeline SVG here
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// No live progress line
    #[arg(long)]
    pub quiet: bool,
}
