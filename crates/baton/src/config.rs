//! Configuration: the `baton.toml` file, the `run` flags that override it,
//! and the parsers for addresses, readiness checks, signals and durations.
//!
//! Flags win over the file. `--listen` flags, when given, replace the
//! file's `[[listen]]` tables as a whole (they are one ordered list: order
//! decides fd numbers). The file is re-read at every upgrade, so a deploy
//! can change the command, environment, readiness check or drain settings;
//! listeners cannot change without restarting baton, and an upgrade whose
//! file changes them is refused.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// Default listen backlog: large enough that a burst arriving while no
/// generation accepts (restart, slow start) waits instead of being dropped.
pub const DEFAULT_BACKLOG: u32 = 4096;
/// Most workers a generation may run: a typo (`workers = 1000000`) should
/// be an error, not a fork storm.
pub const MAX_WORKERS: u32 = 1024;
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_HEALTH_FAILURES: u32 = 3;
/// Source ports of baton's probes: above Linux's default ephemeral range
/// (32768-60999), so no ordinary client on the machine uses them.
pub const DEFAULT_PROBE_PORTS: PortRange = PortRange {
    first: 61000,
    last: 61999,
};

pub use crate::steer::program::PortRange;
pub use baton_core::{CpuPriority, Overlap, TrafficMode};

/// The CPU priority an upgrade's candidate starts at unless configured:
/// `normal`, chosen by measurement (docs/benchmarks.md, "The candidate's
/// CPU priority"): on the 2-core bench machine `idle` did not lower p99
/// in cutover windows measurably, doubled the time to ready, and under a
/// saturated CPU starved the candidate for seconds (a UDP test saw 11 s
/// to start). `idle`, `batch` and `nice:N` stay one setting away.
pub const DEFAULT_CANDIDATE_PRIORITY: CpuPriority = CpuPriority::Normal;
pub use baton_protocol::app::{PROBE_FD_NAME, PROTOCOL_ENV};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// A listening socket's address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// No address: the socket of this name that baton was started with
    /// (socket activation, `LISTEN_FDS`), whatever it is bound to.
    Inherited,
    /// A datagram socket (`udp:IP:PORT`): bound, not listening, and
    /// always shared by every generation.
    Udp(SocketAddr),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Inherited => f.write_str("(inherited)"),
            Self::Udp(a) => write!(f, "udp:{a}"),
        }
    }
}

impl From<ListenAddr> for String {
    fn from(a: ListenAddr) -> Self {
        a.to_string()
    }
}

impl TryFrom<String> for ListenAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "(inherited)" => Ok(Self::Inherited),
            _ => s.parse(),
        }
    }
}

/// The `try_from = "String"` half of the types written as strings.
macro_rules! try_from_string {
    ($($t:ty),*) => {$(
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }
    )*};
}
try_from_string!(ReadySpec, HealthSpec, SignalSpec);

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!("bad address {s:?}: empty unix socket path"));
            }
            if !path.starts_with('/') {
                return Err(format!(
                    "bad address {s:?}: unix socket path must be absolute"
                ));
            }
            // sun_path holds 108 bytes including the NUL.
            if path.len() > 107 {
                return Err(format!(
                    "bad address {s:?}: unix socket path longer than 107 bytes"
                ));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("udp:") {
            return addr.parse::<SocketAddr>().map(Self::Udp).map_err(|_| {
                format!("bad address {s:?}: expected udp:IP:PORT or udp:[IPv6]:PORT")
            });
        }
        s.parse::<SocketAddr>().map(Self::Tcp).map_err(|_| {
            format!("bad address {s:?}: expected IP:PORT, [IPv6]:PORT, udp:IP:PORT or unix:/path")
        })
    }
}

/// One declared listener: `NAME=ADDR[,mode=0660]`, or `NAME` alone for the
/// inherited socket of that name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenSpec {
    pub name: String,
    pub address: ListenAddr,
    /// File mode of a Unix socket (ignored for TCP).
    pub mode: Option<u32>,
}

impl FromStr for ListenSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((name, rest)) = s.split_once('=') else {
            // A name alone: the socket of that name baton inherits.
            validate_name(s)?;
            return Ok(ListenSpec {
                name: s.to_owned(),
                address: ListenAddr::Inherited,
                mode: None,
            });
        };
        let (addr, opts) = match rest.split_once(',') {
            Some((a, o)) => (a, Some(o)),
            None => (rest, None),
        };
        let mut spec = ListenSpec {
            name: name.to_owned(),
            address: addr.parse()?,
            mode: None,
        };
        if let Some(opts) = opts {
            for opt in opts.split(',') {
                match opt.split_once('=') {
                    Some(("mode", m)) => spec.mode = Some(parse_mode(m)?),
                    _ => return Err(format!("bad listener option {opt:?} in {s:?}")),
                }
            }
        }
        validate_name(&spec.name)?;
        Ok(spec)
    }
}

fn parse_mode(m: &str) -> Result<u32, String> {
    u32::from_str_radix(m, 8)
        .ok()
        .filter(|v| *v <= 0o777)
        .ok_or_else(|| format!("bad file mode {m:?}: expected octal like 0660"))
}

/// Names travel in `LISTEN_FDNAMES`, which is `:`-separated.
fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b':' && b != b'=' && b != b',');
    if !ok {
        return Err(format!(
            "bad listener name {name:?}: use 1-255 printable ASCII characters without ':', '=' or ','"
        ));
    }
    if name == PROBE_FD_NAME {
        return Err(format!("listener name {name:?} is reserved for baton"));
    }
    Ok(())
}

/// How a new generation proves it is ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum ReadySpec {
    /// `READY=1` over sd_notify.
    Notify,
    /// `GET PATH` over the private probe listener answers 2xx.
    Http(String),
    /// The app accepted a connection on the private probe listener.
    Tcp,
    /// `sh -c COMMAND` exits 0.
    Exec(String),
    /// Ready after a fixed time, if still running.
    Delay(Duration),
}

impl ReadySpec {
    /// Whether the generation gets the private probe listener.
    pub fn needs_probe_listener(&self) -> bool {
        matches!(self, Self::Http(_) | Self::Tcp)
    }
}

impl fmt::Display for ReadySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Notify => f.write_str("notify"),
            Self::Http(p) => write!(f, "http:{p}"),
            Self::Tcp => f.write_str("tcp"),
            Self::Exec(c) => write!(f, "exec:{c}"),
            Self::Delay(d) => write!(f, "delay:{}", humantime::format_duration(*d)),
        }
    }
}

impl From<ReadySpec> for String {
    fn from(r: ReadySpec) -> Self {
        r.to_string()
    }
}

/// A check run during a canary and a bake: `http:/PATH`, `tcp` or
/// `exec:COMMAND` (the readiness syntax, without `notify` and `delay`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct HealthSpec(pub ReadySpec);

impl From<HealthSpec> for String {
    fn from(h: HealthSpec) -> Self {
        h.0.to_string()
    }
}

impl FromStr for HealthSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.parse::<ReadySpec>() {
            Ok(r @ (ReadySpec::Http(_) | ReadySpec::Tcp | ReadySpec::Exec(_))) => Ok(Self(r)),
            _ => Err(format!(
                "bad health check {s:?}: expected http:/PATH, tcp or exec:COMMAND"
            )),
        }
    }
}

/// `overlap = "full" | "none"`.
pub fn parse_overlap(s: &str) -> Result<Overlap, String> {
    match s.trim() {
        "full" => Ok(Overlap::Full),
        "none" => Ok(Overlap::None),
        _ => Err(format!("bad overlap {s:?}: expected full or none")),
    }
}

/// `candidate_priority = "normal" | "batch" | "idle" | "nice:N"` (N 1-19).
pub fn parse_candidate_priority(s: &str) -> Result<CpuPriority, String> {
    let bad =
        || format!("bad candidate priority {s:?}: expected normal, batch, idle or nice:N (N 1-19)");
    match s.trim() {
        "normal" => Ok(CpuPriority::Normal),
        "batch" => Ok(CpuPriority::Batch),
        "idle" => Ok(CpuPriority::Idle),
        other => {
            let n: u8 = other
                .strip_prefix("nice:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(bad)?;
            if (1..=19).contains(&n) {
                Ok(CpuPriority::Nice(n))
            } else {
                Err(bad())
            }
        }
    }
}

/// The words [`parse_candidate_priority`] reads.
pub fn candidate_priority_name(p: CpuPriority) -> String {
    match p {
        CpuPriority::Normal => "normal".into(),
        CpuPriority::Batch => "batch".into(),
        CpuPriority::Idle => "idle".into(),
        CpuPriority::Nice(n) => format!("nice:{n}"),
    }
}

/// `traffic = "steered" | "shared"`.
pub fn parse_traffic(s: &str) -> Result<TrafficMode, String> {
    match s.trim() {
        "steered" => Ok(TrafficMode::Steered),
        "shared" => Ok(TrafficMode::Shared),
        _ => Err(format!(
            "bad traffic mode {s:?}: expected steered or shared"
        )),
    }
}

/// How baton writes its logs on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; the apps' stderr passes through unchanged.
    #[default]
    Text,
    /// One JSON object per line, the apps' stderr lines included.
    Json,
}

/// `log_format = "text" | "json"`.
pub fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s.trim() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("bad log format {s:?}: expected text or json")),
    }
}

/// `metrics = "IP:PORT"`: where `/metrics` is served (port 0: any free
/// port, logged at start).
pub fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|_| {
        format!("bad metrics address {s:?}: expected IP:PORT or [IPv6]:PORT, e.g. 127.0.0.1:9100")
    })
}

impl FromStr for ReadySpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        match (kind, arg) {
            ("notify", None) => Ok(Self::Notify),
            ("tcp", None) => Ok(Self::Tcp),
            ("http", Some(p)) if p.starts_with('/') && !p.contains(char::is_whitespace) => {
                Ok(Self::Http(p.to_owned()))
            }
            ("http", _) => Err(format!(
                "bad readiness check {s:?}: expected http:/PATH, e.g. http:/healthz"
            )),
            ("exec", Some(c)) if !c.trim().is_empty() => Ok(Self::Exec(c.to_owned())),
            ("delay", Some(d)) => parse_duration(d).map(Self::Delay),
            _ => Err(format!(
                "bad readiness check {s:?}: expected notify, http:/PATH, tcp, exec:COMMAND or delay:DURATION"
            )),
        }
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("bad duration {s:?}: {e} (expected e.g. 500ms, 30s, 2m)"))
}

/// A signal given by name (`SIGTERM`, `TERM`) or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct SignalSpec(pub nix::sys::signal::Signal);

impl From<SignalSpec> for String {
    fn from(s: SignalSpec) -> Self {
        s.0.as_str().to_owned()
    }
}

impl FromStr for SignalSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use nix::sys::signal::Signal;
        let upper = s.trim().to_ascii_uppercase();
        let sig = if let Ok(n) = upper.parse::<i32>() {
            Signal::try_from(n).ok()
        } else if upper.starts_with("SIG") {
            Signal::from_str(&upper).ok()
        } else {
            Signal::from_str(&format!("SIG{upper}")).ok()
        };
        match sig {
            Some(Signal::SIGKILL | Signal::SIGSTOP) | None => Err(format!(
                "bad signal {s:?}: expected a catchable signal name like SIGTERM or SIGQUIT"
            )),
            Some(sig) => Ok(Self(sig)),
        }
    }
}

/// Deserializes any `FromStr` type from a TOML string, so the file and the
/// flags share one parser and its messages.
fn from_str_de<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn opt_from_str_de<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = String>,
{
    from_str_de(d).map(Some)
}

fn opt_duration_de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn opt_traffic_de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<TrafficMode>, D::Error> {
    let s = String::deserialize(d)?;
    parse_traffic(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn opt_log_format_de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<LogFormat>, D::Error> {
    let s = String::deserialize(d)?;
    parse_log_format(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn opt_metrics_de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    parse_metrics_addr(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn opt_priority_de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<CpuPriority>, D::Error> {
    let s = String::deserialize(d)?;
    parse_candidate_priority(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn opt_overlap_de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Overlap>, D::Error> {
    let s = String::deserialize(d)?;
    parse_overlap(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn opt_mode_de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let s = String::deserialize(d)?;
    parse_mode(&s).map(Some).map_err(serde::de::Error::custom)
}

/// `[[listen]]` in the file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListen {
    name: String,
    /// Absent: the inherited socket of this name.
    #[serde(default, deserialize_with = "opt_from_str_de")]
    address: Option<ListenAddr>,
    #[serde(default, deserialize_with = "opt_mode_de")]
    mode: Option<u32>,
}

/// Which of the supervisor's environment variables the app inherits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum EnvInherit {
    /// `true`: all of them (the default); `false`: none.
    All(bool),
    /// Only the listed names.
    Only(Vec<String>),
}

impl Default for EnvInherit {
    fn default() -> Self {
        Self::All(true)
    }
}

/// The file, as written: every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    listen: Vec<FileListen>,
    #[serde(default, deserialize_with = "opt_metrics_de")]
    metrics: Option<SocketAddr>,
    #[serde(default, deserialize_with = "opt_log_format_de")]
    log_format: Option<LogFormat>,
    command: Option<Vec<String>>,
    cwd: Option<PathBuf>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    env_inherit: Option<EnvInherit>,
    #[serde(default, deserialize_with = "opt_from_str_de")]
    ready: Option<ReadySpec>,
    #[serde(default, deserialize_with = "opt_duration_de")]
    ready_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_from_str_de")]
    drain_signal: Option<SignalSpec>,
    #[serde(default, deserialize_with = "opt_duration_de")]
    drain_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration_de")]
    restart_backoff_max: Option<Duration>,
    control: Option<PathBuf>,
    backlog: Option<u32>,
    user: Option<String>,
    group: Option<String>,
    #[serde(default)]
    control_allow_uids: Vec<u32>,
    #[serde(default, deserialize_with = "opt_traffic_de")]
    traffic: Option<TrafficMode>,
    #[serde(default, deserialize_with = "opt_duration_de")]
    bake: Option<Duration>,
    #[serde(default, deserialize_with = "opt_from_str_de")]
    health: Option<HealthSpec>,
    #[serde(default, deserialize_with = "opt_duration_de")]
    health_interval: Option<Duration>,
    health_failures: Option<u32>,
    #[serde(default, deserialize_with = "opt_from_str_de")]
    probe_ports: Option<PortRange>,
    workers: Option<u32>,
    releases_dir: Option<PathBuf>,
    keep_releases: Option<u32>,
    #[serde(default, deserialize_with = "opt_overlap_de")]
    overlap: Option<Overlap>,
    #[serde(default, deserialize_with = "opt_priority_de")]
    candidate_priority: Option<CpuPriority>,
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses the file's text; errors name the key and line.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| {
            // toml's message is multi-line (with a caret drawing); keep it to
            // one line: "line L, column C: message".
            let msg = e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(": ");
            match e.span() {
                Some(span) => {
                    let (line, col) = line_col(text, span.start);
                    format!("line {line}, column {col}: {msg}")
                }
                None => msg,
            }
        })
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// Values given as `run` flags; each overrides the file's.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Overrides {
    pub listen: Vec<ListenSpec>,
    pub metrics: Option<SocketAddr>,
    pub log_format: Option<LogFormat>,
    pub command: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub env_clear: bool,
    pub ready: Option<ReadySpec>,
    pub ready_timeout: Option<Duration>,
    pub drain_signal: Option<SignalSpec>,
    pub drain_timeout: Option<Duration>,
    pub control: Option<PathBuf>,
    pub backlog: Option<u32>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub traffic: Option<TrafficMode>,
    pub bake: Option<Duration>,
    pub health: Option<HealthSpec>,
    pub health_interval: Option<Duration>,
    pub health_failures: Option<u32>,
    pub probe_ports: Option<PortRange>,
    pub workers: Option<u32>,
    pub releases_dir: Option<PathBuf>,
    pub keep_releases: Option<u32>,
    pub overlap: Option<Overlap>,
    #[serde(default)]
    pub candidate_priority: Option<CpuPriority>,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub listen: Vec<ListenSpec>,
    /// Where Prometheus metrics are served, if anywhere.
    pub metrics: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub command: Vec<String>,
    /// Working directory as configured (may be a symlink; resolved at spawn).
    pub cwd: PathBuf,
    pub env: BTreeMap<String, String>,
    pub env_inherit: EnvInherit,
    pub ready: ReadySpec,
    pub ready_timeout: Duration,
    pub drain_signal: SignalSpec,
    pub drain_timeout: Duration,
    pub restart_backoff_max: Duration,
    pub control: PathBuf,
    pub backlog: u32,
    pub user: Option<String>,
    pub group: Option<String>,
    pub control_allow_uids: Vec<u32>,
    /// Per-generation sockets steered by the kernel, or one shared socket.
    pub traffic: TrafficMode,
    /// How long the previous generation stays parked after a cutover.
    pub bake: Duration,
    pub health: Option<HealthSpec>,
    pub health_interval: Duration,
    pub health_failures: u32,
    pub probe_ports: PortRange,
    /// Processes per generation, each its own process group.
    pub workers: u32,
    /// The releases root for `baton deploy` (`DIR/releases/NAME`,
    /// `DIR/current`); the default working directory is `DIR/current`.
    pub releases_dir: Option<PathBuf>,
    /// Releases `baton deploy` keeps (besides the active and previous).
    pub keep_releases: u32,
    /// Whether an upgrade may run the new generation beside the old one.
    pub overlap: Overlap,
    /// The CPU priority an upgrade's candidate starts at, until ready.
    #[serde(default)]
    pub candidate_priority: CpuPriority,
}

impl Config {
    /// The settings lifecycle decisions depend on.
    pub fn settings(&self) -> baton_core::Settings {
        baton_core::Settings {
            workers: self.workers,
            readiness: match self.ready {
                ReadySpec::Notify => baton_core::Readiness::Notify,
                ReadySpec::Delay(d) => baton_core::Readiness::Delay(d),
                ReadySpec::Http(_) | ReadySpec::Tcp | ReadySpec::Exec(_) => {
                    baton_core::Readiness::Probe
                }
            },
            ready_timeout: self.ready_timeout,
            drain_timeout: self.drain_timeout,
            restart_backoff_max: self.restart_backoff_max,
            bake: self.bake,
            health: self.health.as_ref().map(|_| baton_core::Health {
                failures: self.health_failures,
            }),
            overlap: self.overlap,
            candidate_priority: self.candidate_priority,
        }
    }

    /// Which settings an upgrade changes that are fixed for baton's
    /// lifetime (the sockets, the control socket and who may use it, the
    /// metrics address and the log format).
    pub fn fixed_change(&self, next: &Config) -> Option<&'static str> {
        [
            ("listeners", self.listen != next.listen),
            ("backlog", self.backlog != next.backlog),
            ("control socket", self.control != next.control),
            (
                "allowed control uids",
                self.control_allow_uids != next.control_allow_uids,
            ),
            ("traffic mode", self.traffic != next.traffic),
            ("probe ports", self.probe_ports != next.probe_ports),
            ("metrics address", self.metrics != next.metrics),
            ("log format", self.log_format != next.log_format),
        ]
        .into_iter()
        .find_map(|(what, changed)| changed.then_some(what))
    }
}

/// Where the configuration comes from; kept so upgrades can re-read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    pub overrides: Overrides,
    /// Directory relative paths are resolved against (baton's start dir).
    pub base_dir: PathBuf,
}

impl ConfigSource {
    /// The effective configuration; a candidate priority baton could not
    /// undo is an error.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let file = match &self.file {
            Some(p) => FileConfig::load(p)?,
            None => FileConfig::default(),
        };
        let explicit = self
            .overrides
            .candidate_priority
            .or(file.candidate_priority);
        let mut config = Config::merge(file, &self.overrides, &self.base_dir)?;
        let rights = crate::process::NiceRights::of_self(config.user.is_some());
        config.candidate_priority = crate::process::usable_candidate_priority(explicit, rights)
            .map_err(ConfigError::Invalid)?;
        Ok(config)
    }
}

impl Config {
    pub fn merge(
        file: FileConfig,
        flags: &Overrides,
        base_dir: &Path,
    ) -> Result<Self, ConfigError> {
        let listen = if flags.listen.is_empty() {
            file.listen
                .into_iter()
                .map(|l| {
                    validate_name(&l.name).map_err(ConfigError::Invalid)?;
                    Ok(ListenSpec {
                        name: l.name,
                        address: l.address.unwrap_or(ListenAddr::Inherited),
                        mode: l.mode,
                    })
                })
                .collect::<Result<Vec<_>, ConfigError>>()?
        } else {
            flags.listen.clone()
        };
        let command = if flags.command.is_empty() {
            file.command.unwrap_or_default()
        } else {
            flags.command.clone()
        };
        if command.is_empty() || command[0].is_empty() {
            return Err(ConfigError::Invalid(
                "no command given: pass it after `--` or set `command` in the config file".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for l in &listen {
            if !seen.insert(l.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "listener name {:?} is declared twice",
                    l.name
                )));
            }
        }
        check_fd_placeholders(&command, &listen)?;
        let mut env = file.env;
        for (k, v) in &flags.env {
            env.insert(k.clone(), v.clone());
        }
        for k in env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(ConfigError::Invalid(format!(
                    "bad environment variable name {k:?}"
                )));
            }
            if PROTOCOL_ENV.contains(&k.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "environment variable {k} is set by baton and cannot be configured"
                )));
            }
        }
        let env_inherit = if flags.env_clear {
            EnvInherit::All(false)
        } else {
            file.env_inherit.unwrap_or_default()
        };
        let releases_dir = flags
            .releases_dir
            .clone()
            .or(file.releases_dir)
            .map(|d| base_dir.join(d));
        // With a releases root the app runs in whatever `current` points to.
        let cwd = flags
            .cwd
            .clone()
            .or(file.cwd)
            .or_else(|| releases_dir.as_ref().map(|d| d.join("current")))
            .unwrap_or_else(|| ".".into());
        let keep_releases = flags
            .keep_releases
            .or(file.keep_releases)
            .unwrap_or(crate::releases::DEFAULT_KEEP_RELEASES);
        if keep_releases == 0 {
            return Err(ConfigError::Invalid(
                "keep_releases must be at least 1".into(),
            ));
        }
        let control = flags
            .control
            .clone()
            .or(file.control)
            .unwrap_or_else(default_control_path);
        let backlog = flags.backlog.or(file.backlog).unwrap_or(DEFAULT_BACKLOG);
        if backlog == 0 {
            return Err(ConfigError::Invalid("backlog must be at least 1".into()));
        }
        let overlap = flags.overlap.or(file.overlap).unwrap_or_default();
        let bake = flags.bake.or(file.bake).unwrap_or(Duration::ZERO);
        if overlap == Overlap::None && !bake.is_zero() {
            // A bake keeps the previous generation running beside the new one.
            return Err(ConfigError::Invalid(
                "bake needs two generations at once, which overlap = \"none\" never runs: \
                 drop one of them"
                    .into(),
            ));
        }
        Ok(Config {
            listen,
            metrics: flags.metrics.or(file.metrics),
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
            command,
            cwd: base_dir.join(cwd),
            env,
            env_inherit,
            ready: flags
                .ready
                .clone()
                .or(file.ready)
                .unwrap_or(ReadySpec::Notify),
            ready_timeout: flags
                .ready_timeout
                .or(file.ready_timeout)
                .unwrap_or(DEFAULT_READY_TIMEOUT),
            drain_signal: flags
                .drain_signal
                .or(file.drain_signal)
                .unwrap_or(SignalSpec(nix::sys::signal::Signal::SIGTERM)),
            drain_timeout: flags
                .drain_timeout
                .or(file.drain_timeout)
                .unwrap_or(DEFAULT_DRAIN_TIMEOUT),
            restart_backoff_max: file
                .restart_backoff_max
                .unwrap_or(DEFAULT_RESTART_BACKOFF_MAX),
            control: base_dir.join(control),
            backlog,
            user: flags.user.clone().or(file.user),
            group: flags.group.clone().or(file.group),
            control_allow_uids: file.control_allow_uids,
            traffic: flags
                .traffic
                .or(file.traffic)
                .unwrap_or(TrafficMode::Steered),
            bake,
            health: flags.health.clone().or(file.health),
            health_interval: {
                let i = flags
                    .health_interval
                    .or(file.health_interval)
                    .unwrap_or(DEFAULT_HEALTH_INTERVAL);
                if i.is_zero() {
                    return Err(ConfigError::Invalid(
                        "health_interval must be more than zero".into(),
                    ));
                }
                i
            },
            health_failures: {
                let n = flags
                    .health_failures
                    .or(file.health_failures)
                    .unwrap_or(DEFAULT_HEALTH_FAILURES);
                if n == 0 {
                    return Err(ConfigError::Invalid(
                        "health_failures must be at least 1".into(),
                    ));
                }
                n
            },
            probe_ports: flags
                .probe_ports
                .or(file.probe_ports)
                .unwrap_or(DEFAULT_PROBE_PORTS),
            workers: {
                let n = flags.workers.or(file.workers).unwrap_or(1);
                if !(1..=MAX_WORKERS).contains(&n) {
                    return Err(ConfigError::Invalid(format!(
                        "workers must be between 1 and {MAX_WORKERS}, not {n}"
                    )));
                }
                n
            },
            releases_dir,
            keep_releases,
            overlap,
            candidate_priority: flags
                .candidate_priority
                .or(file.candidate_priority)
                .unwrap_or(DEFAULT_CANDIDATE_PRIORITY),
        })
    }
}

/// `{fd:NAME}` in the command must name a declared listener.
fn check_fd_placeholders(command: &[String], listen: &[ListenSpec]) -> Result<(), ConfigError> {
    for arg in command {
        let mut rest = arg.as_str();
        while let Some(start) = rest.find("{fd:") {
            let after = &rest[start + 4..];
            let end = after.find('}').ok_or_else(|| {
                ConfigError::Invalid(format!("unterminated {{fd:…}} in argument {arg:?}"))
            })?;
            let name = &after[..end];
            if !listen.iter().any(|l| l.name == name) {
                return Err(ConfigError::Invalid(format!(
                    "argument {arg:?} names listener {name:?}, which is not declared"
                )));
            }
            rest = &after[end + 1..];
        }
    }
    Ok(())
}

/// Replaces every `{fd:NAME}` with that listener's fd number (3 + index).
pub fn substitute_fds(arg: &str, names: &[&str]) -> String {
    let mut out = arg.to_owned();
    for (i, name) in names.iter().enumerate() {
        out = out.replace(&format!("{{fd:{name}}}"), &(3 + i).to_string());
    }
    out
}

/// `$BATON_CONTROL` is handled by the CLI; this is the fallback:
/// `$XDG_RUNTIME_DIR/baton/control.sock`, `/run/baton/control.sock` for
/// root, otherwise `/tmp/baton-$UID/control.sock`.
pub fn default_control_path() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("baton/control.sock");
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        PathBuf::from("/run/baton/control.sock")
    } else {
        PathBuf::from(format!("/tmp/baton-{uid}/control.sock"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags_with_cmd() -> Overrides {
        Overrides {
            command: vec!["./server".into()],
            ..Default::default()
        }
    }

    #[test]
    fn listen_specs() {
        let l: ListenSpec = "http=127.0.0.1:8080".parse().unwrap();
        assert_eq!(
            l.address,
            ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap())
        );
        let l: ListenSpec = "api=[::1]:9000".parse().unwrap();
        assert_eq!(l.address.to_string(), "[::1]:9000");
        let l: ListenSpec = "dns=udp:127.0.0.1:5353".parse().unwrap();
        assert_eq!(
            l.address,
            ListenAddr::Udp("127.0.0.1:5353".parse().unwrap())
        );
        assert_eq!(l.address.to_string(), "udp:127.0.0.1:5353");
        let l: ListenSpec = "dns6=udp:[::1]:53".parse().unwrap();
        assert_eq!(l.address.to_string(), "udp:[::1]:53");
        let l: ListenSpec = "admin=unix:/run/app/admin.sock,mode=0600".parse().unwrap();
        assert_eq!(l.address, ListenAddr::Unix("/run/app/admin.sock".into()));
        assert_eq!(l.mode, Some(0o600));
        // A name alone: the inherited socket of that name.
        let l: ListenSpec = "http".parse().unwrap();
        assert_eq!(
            (l.name.as_str(), l.address),
            ("http", ListenAddr::Inherited)
        );
        for bad in [
            "",
            "a:b",
            "baton-probe",
            "=127.0.0.1:80",
            "a:b=127.0.0.1:80",
            "http=localhost:80",
            "http=127.0.0.1",
            "x=unix:",
            "x=unix:rel/path",
            "x=unix:/p,mode=999",
            "x=unix:/p,color=red",
            "baton-probe=127.0.0.1:1",
            "dns=udp:",
            "dns=udp:localhost:53",
            "dns=udp:127.0.0.1",
            "dns=udp:/run/x",
        ] {
            assert!(
                bad.parse::<ListenSpec>().is_err(),
                "{bad} should be rejected"
            );
        }
        let err = "http=256.0.0.1:80".parse::<ListenSpec>().unwrap_err();
        assert!(err.contains("256.0.0.1:80"), "{err}");
    }

    #[test]
    fn ready_specs() {
        assert_eq!("notify".parse::<ReadySpec>().unwrap(), ReadySpec::Notify);
        assert_eq!(
            "http:/healthz".parse::<ReadySpec>().unwrap(),
            ReadySpec::Http("/healthz".into())
        );
        assert_eq!("tcp".parse::<ReadySpec>().unwrap(), ReadySpec::Tcp);
        assert_eq!(
            "exec:curl -f localhost".parse::<ReadySpec>().unwrap(),
            ReadySpec::Exec("curl -f localhost".into())
        );
        assert_eq!(
            "delay:1500ms".parse::<ReadySpec>().unwrap(),
            ReadySpec::Delay(Duration::from_millis(1500))
        );
        for bad in ["", "http", "http:healthz", "exec:", "delay:soon", "ping"] {
            assert!(
                bad.parse::<ReadySpec>().is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn signals() {
        use nix::sys::signal::Signal;
        assert_eq!("SIGTERM".parse::<SignalSpec>().unwrap().0, Signal::SIGTERM);
        assert_eq!("quit".parse::<SignalSpec>().unwrap().0, Signal::SIGQUIT);
        assert_eq!("10".parse::<SignalSpec>().unwrap().0, Signal::SIGUSR1);
        assert!("SIGKILL".parse::<SignalSpec>().is_err());
        assert!("SIGNOPE".parse::<SignalSpec>().is_err());
    }

    #[test]
    fn file_errors_name_key_and_line() {
        let err = FileConfig::parse("command = [\"x\"]\n\ncolour = \"blue\"\n").unwrap_err();
        assert!(err.starts_with("line 3,"), "{err}");
        assert!(err.contains("colour"), "{err}");
        let err = FileConfig::parse("drain_timeout = \"30 parsecs\"\n").unwrap_err();
        assert!(err.starts_with("line 1,"), "{err}");
        assert!(err.contains("30 parsecs"), "{err}");
        let err = FileConfig::parse("[[listen]]\nname = \"h\"\naddress = \"nope\"\n").unwrap_err();
        assert!(err.starts_with("line 3,"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn flags_override_file() {
        let file = FileConfig::parse(
            r#"
command = ["./old"]
ready = "http:/up"
drain_timeout = "5s"
[env]
A = "file"
B = "file"
[[listen]]
name = "http"
address = "127.0.0.1:1"
"#,
        )
        .unwrap();
        let flags = Overrides {
            env: vec![("B".into(), "flag".into())],
            drain_timeout: Some(Duration::from_secs(7)),
            ..flags_with_cmd()
        };
        let c = Config::merge(file, &flags, Path::new("/base")).unwrap();
        assert_eq!(c.command, vec!["./server"]);
        assert_eq!(c.ready, ReadySpec::Http("/up".into()));
        assert_eq!(c.drain_timeout, Duration::from_secs(7));
        assert_eq!(c.env["A"], "file");
        assert_eq!(c.env["B"], "flag");
        assert_eq!(c.listen.len(), 1);
        assert_eq!(c.cwd, Path::new("/base/."));
        assert_eq!(c.backlog, DEFAULT_BACKLOG);
        assert_eq!(c.ready_timeout, DEFAULT_READY_TIMEOUT);
    }

    #[test]
    fn rejects_duplicates_and_unknown_fd_names() {
        let flags = Overrides {
            listen: vec![
                "a=127.0.0.1:1".parse().unwrap(),
                "a=127.0.0.1:2".parse().unwrap(),
            ],
            ..flags_with_cmd()
        };
        let err = Config::merge(FileConfig::default(), &flags, Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("declared twice"));
        let flags = Overrides {
            listen: vec!["a=127.0.0.1:1".parse().unwrap()],
            command: vec!["srv".into(), "--fd={fd:b}".into()],
            ..Default::default()
        };
        let err = Config::merge(FileConfig::default(), &flags, Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("\"b\""), "{err}");
        let flags = Overrides {
            env: vec![("NOTIFY_SOCKET".into(), "/tmp/x".into())],
            ..flags_with_cmd()
        };
        let err = Config::merge(FileConfig::default(), &flags, Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("NOTIFY_SOCKET"), "{err}");
        let err = Config::merge(FileConfig::default(), &Overrides::default(), Path::new("/"))
            .unwrap_err();
        assert!(err.to_string().contains("no command"));
    }

    #[test]
    fn workers_default_to_one_and_are_bounded() {
        let c = Config::merge(FileConfig::default(), &flags_with_cmd(), Path::new("/")).unwrap();
        assert_eq!((c.workers, c.settings().workers), (1, 1));
        let file = FileConfig::parse("workers = 4\n").unwrap();
        let c = Config::merge(file, &flags_with_cmd(), Path::new("/")).unwrap();
        assert_eq!(c.settings().workers, 4);
        // The flag wins over the file.
        let file = FileConfig::parse("workers = 4\n").unwrap();
        let flags = Overrides {
            workers: Some(2),
            ..flags_with_cmd()
        };
        assert_eq!(
            Config::merge(file, &flags, Path::new("/")).unwrap().workers,
            2
        );
        for bad in [0, MAX_WORKERS + 1] {
            let flags = Overrides {
                workers: Some(bad),
                ..flags_with_cmd()
            };
            let err = Config::merge(FileConfig::default(), &flags, Path::new("/"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("workers") && err.contains(&bad.to_string()),
                "{err}"
            );
            assert!(!err.contains('\n'), "{err}");
        }
        let err = FileConfig::parse("workers = -1\n").unwrap_err();
        // Like every key: the line and column of the bad value.
        assert!(
            err.starts_with("line 1, column 11") && err.contains("-1"),
            "{err}"
        );
        // BATON_WORKER is baton's to set.
        let flags = Overrides {
            env: vec![("BATON_WORKER".into(), "7".into())],
            ..flags_with_cmd()
        };
        let err = Config::merge(FileConfig::default(), &flags, Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("BATON_WORKER"), "{err}");
    }

    #[test]
    fn metrics_and_log_format_keys() {
        let file = FileConfig::parse(
            "command = [\"./server\"]\nmetrics = \"127.0.0.1:9100\"\nlog_format = \"json\"\n",
        )
        .unwrap();
        let c = Config::merge(file, &Overrides::default(), Path::new("/")).unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Json);
        // Defaults: no metrics, text logs; flags win over the file.
        let c = Config::merge(FileConfig::default(), &flags_with_cmd(), Path::new("/")).unwrap();
        assert_eq!((c.metrics, c.log_format), (None, LogFormat::Text));
        let flags = Overrides {
            metrics: Some("[::1]:0".parse().unwrap()),
            log_format: Some(LogFormat::Text),
            ..flags_with_cmd()
        };
        let file = FileConfig::parse("metrics = \"127.0.0.1:1\"\nlog_format = \"json\"\n").unwrap();
        let c = Config::merge(file, &flags, Path::new("/")).unwrap();
        assert_eq!(c.metrics, Some("[::1]:0".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Text);
        // Bad values name the key's line and the value, on one line.
        let err = FileConfig::parse("command = [\"x\"]\nmetrics = \"localhost\"\n").unwrap_err();
        assert!(
            err.starts_with("line 2,") && err.contains("localhost"),
            "{err}"
        );
        let err = FileConfig::parse("log_format = \"xml\"\n").unwrap_err();
        assert!(err.starts_with("line 1,") && err.contains("xml"), "{err}");
        // Both are fixed for baton's lifetime.
        let a = Config::merge(FileConfig::default(), &flags_with_cmd(), Path::new("/")).unwrap();
        let b = Config {
            log_format: LogFormat::Json,
            ..a.clone()
        };
        assert_eq!(a.fixed_change(&b), Some("log format"));
        let b = Config {
            metrics: Some("127.0.0.1:1".parse().unwrap()),
            ..a.clone()
        };
        assert_eq!(a.fixed_change(&b), Some("metrics address"));
        assert_eq!(a.fixed_change(&a.clone()), None, "positive control");
    }

    #[test]
    fn releases_dir_sets_the_default_cwd() {
        let flags = Overrides {
            releases_dir: Some("srv/app".into()),
            ..flags_with_cmd()
        };
        let c = Config::merge(FileConfig::default(), &flags, Path::new("/base")).unwrap();
        assert_eq!(c.releases_dir.as_deref(), Some(Path::new("/base/srv/app")));
        assert_eq!(c.cwd, Path::new("/base/srv/app/current"));
        assert_eq!(c.keep_releases, crate::releases::DEFAULT_KEEP_RELEASES);
        // An explicit cwd wins.
        let file = FileConfig::parse("cwd = \"/elsewhere\"\nkeep_releases = 3\n").unwrap();
        let c = Config::merge(file, &flags, Path::new("/base")).unwrap();
        assert_eq!(c.cwd, Path::new("/elsewhere"));
        assert_eq!(c.keep_releases, 3);
        let file = FileConfig::parse("keep_releases = 0\n").unwrap();
        let err = Config::merge(file, &flags, Path::new("/base")).unwrap_err();
        assert!(err.to_string().contains("keep_releases"), "{err}");
    }

    #[test]
    fn overlap_is_full_or_none_and_none_refuses_a_bake() {
        let c = Config::merge(FileConfig::default(), &flags_with_cmd(), Path::new("/")).unwrap();
        assert_eq!(c.overlap, Overlap::Full);
        assert_eq!(c.settings().overlap, Overlap::Full);
        let file = FileConfig::parse("overlap = \"none\"\n").unwrap();
        let c = Config::merge(file, &flags_with_cmd(), Path::new("/")).unwrap();
        assert_eq!(c.settings().overlap, Overlap::None);
        let err = FileConfig::parse("overlap = \"half\"\n").unwrap_err();
        assert!(err.starts_with("line 1,") && err.contains("half"), "{err}");
        let file = FileConfig::parse("overlap = \"none\"\nbake = \"1m\"\n").unwrap();
        let err = Config::merge(file, &flags_with_cmd(), Path::new("/")).unwrap_err();
        assert!(err.to_string().contains("bake"), "{err}");
        // The flag wins over the file, either way.
        let file = FileConfig::parse("overlap = \"none\"\nbake = \"1m\"\n").unwrap();
        let flags = Overrides {
            overlap: Some(Overlap::Full),
            ..flags_with_cmd()
        };
        assert!(Config::merge(file, &flags, Path::new("/")).is_ok());
    }

    #[test]
    fn fd_substitution() {
        assert_eq!(substitute_fds("--fd={fd:api}", &["http", "api"]), "--fd=4");
        assert_eq!(substitute_fds("fd://{fd:http}", &["http"]), "fd://3");
        assert_eq!(substitute_fds("plain", &["http"]), "plain");
    }
}
