//! The plain values the machine reasons about. None of them refers to the
//! outside world: a [`Pid`] is just a number the shell reported, a
//! [`Time`] a reading of a clock the shell owns.

use std::fmt;
use std::ops::Add;
use std::path::PathBuf;
use std::time::Duration;

/// A generation's number: 1 for the first, then one more per upgrade or
/// rollback. Also names the upgrade that started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct GenId(pub u64);

impl fmt::Display for GenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A process id as the shell reported it. Every worker of a generation
/// leads its own process group, so the same number names the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Pid(pub i32);

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A reading of the shell's monotonic clock, as time since an epoch the
/// shell chose. The machine never reads a clock itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Time(Duration);

impl Time {
    pub const ZERO: Time = Time(Duration::ZERO);

    pub const fn from_duration(since_epoch: Duration) -> Self {
        Self(since_epoch)
    }

    pub const fn since_epoch(self) -> Duration {
        self.0
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(self.0.saturating_add(d))
    }
}

/// How a process ended: the real wait status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum ExitStatus {
    Code(i32),
    Signaled { signal: i32, core_dumped: bool },
}

/// How a generation proves it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Readiness {
    /// `READY=1` from the generation's own processes.
    Notify,
    /// A check the shell runs (HTTP, TCP, a command) and reports back.
    Probe,
    /// Ready once this long has passed since the process started.
    Delay(Duration),
}

/// The settings of one generation that decisions depend on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Settings {
    /// Processes per generation (at least 1), each its own process group
    /// on the generation's sockets.
    pub workers: u32,
    pub readiness: Readiness,
    pub ready_timeout: Duration,
    pub drain_timeout: Duration,
    pub restart_backoff_max: Duration,
    /// How long the previous generation stays parked after a cutover, ready
    /// to take the traffic back (steered traffic only; zero: no bake).
    pub bake: Duration,
    /// Health checks during a canary and a bake, if configured.
    pub health: Option<Health>,
    /// Whether an upgrade may run the new generation beside the old one.
    pub overlap: Overlap,
    /// The CPU priority an upgrade's candidate starts with, beside the
    /// generation serving; it gets the normal priority back once ready.
    #[cfg_attr(feature = "serde", serde(default))]
    pub candidate_priority: CpuPriority,
}

/// How much CPU a process may take from the others on the machine, as the
/// scheduler sees it. An upgrade's candidate starts beside the generation
/// serving the clients: starting a process (exec, linking, a runtime's
/// threads, warming caches) is a burst of CPU that, on a small machine,
/// delays the requests being served. Started at a lower priority, it takes
/// what the serving processes leave; it is set back to
/// [`Normal`](CpuPriority::Normal) before it takes any traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum CpuPriority {
    /// As baton itself runs: nothing is changed.
    #[default]
    Normal,
    /// `nice` raised by this much (1 to 19): a weight of about
    /// 1.25^-n of a normal process's.
    Nice(u8),
    /// `SCHED_BATCH`: the same share of CPU, but it never preempts a
    /// running process when it wakes up.
    Batch,
    /// `SCHED_IDLE`: runs only on CPU that nothing else wants (a weight of
    /// 3, against 1024 for a normal process).
    Idle,
}

/// Whether two generations of the app may run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Overlap {
    /// The new generation starts beside the old one and takes over once
    /// ready.
    #[default]
    Full,
    /// The app cannot run twice (an SQLite writer, a GPU-bound model, a
    /// singleton job runner): an upgrade drains the old generation first
    /// and starts the new one on the same sockets once nothing of the old
    /// one runs; connections wait in the kernel's queue meanwhile.
    None,
}

/// When health checks fail a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Health {
    /// Consecutive failed checks that count as unhealthy.
    pub failures: u32,
}

/// How new connections reach generations, fixed for the supervisor's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum TrafficMode {
    /// One socket per listener, shared by every generation: whichever
    /// process calls accept() gets the connection.
    #[default]
    Shared,
    /// A socket per generation, and the kernel picks one for each new
    /// connection by the traffic plan: dark candidates, canaries, parked
    /// generations.
    Steered,
}

/// What one upgrade request asks for, beyond the new spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct UpgradeOptions {
    /// Once ready, the candidate takes this percentage of new connections
    /// and the upgrade waits for `promote` (or rollback).
    pub canary: Option<u8>,
    /// Promote a healthy canary by itself after this long.
    pub canary_for: Option<Duration>,
    /// Overrides the spec's bake window.
    pub bake: Option<Duration>,
}

/// What a generation runs: resolved by the shell when the generation is
/// requested, then kept, so a crash restart runs the same release even if
/// a `current` symlink has moved meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Release {
    pub dir: PathBuf,
    pub program: PathBuf,
    pub argv: Vec<String>,
}

/// Everything needed to start a generation. `payload` is the shell's own
/// (its full configuration); the machine only carries it, so a rollback
/// can reuse the active generation's.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Spec<P> {
    pub release: Release,
    pub settings: Settings,
    pub payload: P,
}

/// What asked for a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Trigger {
    Start,
    Control,
    Signal,
    Rollback,
}

/// The signals the machine sends, always to a whole process group. The
/// shell maps `Drain` to the generation's configured signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Drain,
    Kill,
}

/// One thing an app reported over the notify socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Ready,
    Stopping,
    Status(String),
}
