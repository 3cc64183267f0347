//! What goes into the machine and what comes out: commands and their
//! replies, inputs, effects, and the events it publishes.

use std::time::Duration;

use crate::traffic::TrafficPlan;
use crate::types::{
    CpuPriority, ExitStatus, GenId, Pid, Report, Signal, Spec, Time, Trigger, UpgradeOptions,
};

/// Identifies a request so its [`Effect::Reply`] reaches the asker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

// One per request: the size of the spec it may carry costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<P> {
    /// Start a new generation from `spec` and cut over to it once ready.
    /// `Err` says the shell could not even resolve the release (a missing
    /// program or directory): the upgrade gets its number and fails at
    /// once with that error, like a spawn that failed.
    Upgrade {
        trigger: Trigger,
        spec: Result<Spec<P>, String>,
        options: UpgradeOptions,
    },
    /// During a canary or a bake: give the traffic back to the previous
    /// generation at once. Otherwise: start the previous successful release
    /// and cut over to it.
    Rollback,
    /// During a canary: cut over to the candidate. During a bake: end it
    /// now, the new generation kept.
    Promote,
    /// Restart the active generation's process (same release): the shell
    /// replaced the socket it was serving, which no running process holds.
    Restart,
    /// Drain every generation; the machine is done once all have exited.
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The upgrade (or cold rollback) started; its candidate is this
    /// generation, which also names the upgrade.
    Upgrading(GenId),
    /// The traffic went back to the parked (or old) generation; the upgrade
    /// it ended is named.
    RolledBack(GenId),
    /// The canary is cut over, or the bake ended; the upgrade is named.
    Promoting(GenId),
    /// The active generation is being restarted.
    Restarting(GenId),
    Refused(Refusal),
    /// Stop has begun (or had already).
    Stopping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Another upgrade is in progress; its candidate.
    Busy(GenId),
    Stopping,
    /// No earlier successful release to roll back to.
    NoPrevious,
    /// No canary or bake to promote.
    NothingToPromote,
    /// A canary needs steered traffic.
    NeedsSteering,
    /// A canary or a bake needs two generations running at once, which
    /// an upgrade without overlap never has.
    NeedsOverlap,
}

/// Everything the machine reacts to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input<P> {
    /// Start the first generation.
    Start {
        spec: Spec<P>,
    },
    Command {
        id: RequestId,
        command: Command<P>,
    },
    /// The process asked for by [`Effect::Spawn`] runs.
    Spawned {
        gen: GenId,
        worker: u32,
        pid: Pid,
    },
    /// [`Effect::Spawn`] could not start a process.
    SpawnFailed {
        gen: GenId,
        worker: u32,
        error: String,
    },
    /// A worker's process (its group's leader) exited. The shell keeps it unreaped, so
    /// its pid (and with it the process group id) cannot be reused until
    /// [`Effect::Release`]. `group_empty` says whether the group had no
    /// other member left when the exit was seen.
    Exited {
        pid: Pid,
        status: ExitStatus,
        group_empty: bool,
    },
    /// Every member of the group led by `pid` (which has exited) is gone.
    GroupEmpty {
        pid: Pid,
    },
    /// The readiness check started by [`Effect::StartProbe`] ended.
    Probe {
        gen: GenId,
        pid: Pid,
        result: Result<String, String>,
    },
    /// One health check started by [`Effect::StartHealth`] ended.
    Health {
        gen: GenId,
        pid: Pid,
        result: Result<String, String>,
    },
    /// A notify datagram, attributed by the kernel-verified sender `pid`
    /// and its process group at arrival.
    Notify {
        pid: Pid,
        pgid: Option<Pid>,
        reports: Vec<Report>,
    },
    /// The stderr of `pid` reached its end.
    StderrClosed {
        pid: Pid,
    },
    /// [`Effect::RestorePriority`] for the group led by `pid` is done:
    /// `restored` says whether every thread it found got the normal
    /// priority back. Not restored is no failure of the upgrade (the app
    /// runs, only slower): the generation takes the traffic either way, and
    /// that worker keeps showing its lowered priority.
    PriorityRestored {
        gen: GenId,
        pid: Pid,
        restored: bool,
    },
    /// Nothing waits in `gen`'s sockets any more ([`Effect::WatchQueue`]).
    QueueEmpty {
        gen: GenId,
    },
    /// A time given by [`Machine::poll_timeout`](crate::Machine::poll_timeout)
    /// has come.
    Tick,
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Start worker `worker` of `gen` from its spec
    /// ([`Machine::spec`](crate::Machine::spec)), in a process group of its
    /// own, with the generation's own sockets (every worker gets the same),
    /// at `priority` from its first instruction; answer with
    /// [`Input::Spawned`] or [`Input::SpawnFailed`].
    Spawn {
        gen: GenId,
        worker: u32,
        priority: CpuPriority,
    },
    /// Every thread of every process in the group led by `pid` (worker
    /// `worker` of `gen`), started at `from`, gets the normal CPU priority
    /// back: the generation is ready and takes traffic next. Answer with
    /// [`Input::PriorityRestored`]; the traffic waits for the answer about
    /// every worker started lower.
    RestorePriority {
        gen: GenId,
        worker: u32,
        pid: Pid,
        from: CpuPriority,
    },
    /// Run `gen`'s readiness check (one for the generation, whichever
    /// worker answers it); answer with [`Input::Probe`] carrying `pid`,
    /// which names this run of the check.
    StartProbe {
        gen: GenId,
        pid: Pid,
    },
    /// Abandon `gen`'s readiness check, if one runs.
    StopProbe {
        gen: GenId,
    },
    /// Run `gen`'s health check against `pid` at its interval, each result
    /// an [`Input::Health`], until [`Effect::StopHealth`].
    StartHealth {
        gen: GenId,
        pid: Pid,
    },
    StopHealth {
        gen: GenId,
    },
    /// `gen` gets no new connections any more: answer with
    /// [`Input::QueueEmpty`] once nothing waits in its sockets.
    WatchQueue {
        gen: GenId,
    },
    /// Nothing of `gen` runs any more: its sockets may go to another
    /// generation.
    FreeSockets {
        gen: GenId,
    },
    /// `to` takes `from`'s place (an upgrade without overlap): `from`'s
    /// sockets, with the connections waiting in them, become `to`'s.
    /// Nothing queued there may be lost or reset.
    PassSockets {
        from: GenId,
        to: GenId,
    },
    /// Send `signal` to the process group led by `pid`.
    Signal {
        pid: Pid,
        signal: Signal,
    },
    /// The group led by `pid` is gone: reap its leader and forget it.
    Release {
        pid: Pid,
    },
    /// New connections now go by this plan.
    Traffic(TrafficPlan),
    /// Stop taking new connections: baton is stopping.
    CloseListeners,
    /// Load the configuration again and upgrade, as a SIGHUP would: a
    /// SIGHUP arrived during the last upgrade.
    RequestUpgrade,
    Reply {
        id: RequestId,
        reply: Reply,
    },
    Event(Event),
    /// Something worth a log line that is no lifecycle event.
    Note(Note),
}

/// A lifecycle event, emitted once it is true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub gen: GenId,
    /// The upgrade this event belongs to.
    pub upgrade: Option<UpgradeRef>,
    pub kind: EventKind,
}

/// An upgrade, as events refer to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct UpgradeRef {
    /// The candidate's generation number.
    pub id: GenId,
    pub started: Time,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Requested {
        trigger: Trigger,
    },
    Spawned {
        pid: Pid,
        worker: u32,
    },
    SpawnFailed {
        error: String,
    },
    /// Every worker is ready; `pid` is the one that was last.
    Ready {
        pid: Pid,
        via: Via,
    },
    /// A worker restarted alone, while others served, is ready again.
    WorkerReady {
        worker: u32,
        pid: Pid,
        via: Via,
    },
    /// The generation receives new connections (all of them but a canary's
    /// share).
    Active {
        pid: Pid,
    },
    /// A ready candidate takes `share` percent of new connections; the
    /// upgrade waits for promote or rollback.
    CanaryStarted {
        share: u8,
    },
    /// The cutover is done; the previous generation stays parked until
    /// `until` (for `bake`), ready to take the traffic back.
    BakeStarted {
        parked: GenId,
        bake: Duration,
    },
    /// The traffic went back to `to` (parked, or the old generation of a
    /// canary); this generation, the upgrade's candidate, is retired.
    RolledBack {
        to: GenId,
        failure: Failure,
    },
    /// The generation gets no new connections; it is drained once its
    /// sockets' queues are empty.
    Retiring {
        pid: Pid,
    },
    /// The drain signal went to the group led by `pid`.
    Draining {
        pid: Pid,
    },
    /// The drain timeout expired; SIGKILL went to the group.
    Killed {
        pid: Pid,
    },
    Exited {
        pid: Pid,
        worker: u32,
        status: ExitStatus,
    },
    /// Worker `worker` starts again after `delay`; its `restarts`th restart.
    Restarting {
        worker: u32,
        delay: Duration,
        restarts: u32,
    },
    Status {
        text: String,
    },
    Stopping {
        pid: Pid,
    },
    UpgradeSucceeded,
    UpgradeFailed {
        failure: Failure,
        /// The worker whose death failed it, if one did (its stderr tells
        /// why).
        worker: Option<u32>,
    },
}

/// How a generation proved it was ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// `READY=1` from this process (the main one or one of its group).
    Notify {
        from: Pid,
    },
    /// The shell's check passed; its words.
    Probe(String),
    Delay(Duration),
    /// A worker restarted alone in a generation checked by a probe: a
    /// probe reaches whichever worker accepts, never this one in
    /// particular, so it counts once it runs.
    Running,
}

/// Why a generation was abandoned.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Failure {
    /// A process of it could not be started.
    Spawn(String),
    /// A worker exited before the generation was ready.
    Exited(ExitStatus),
    /// A worker exited during its canary or bake.
    Died(ExitStatus),
    /// Not ready within the ready timeout.
    Timeout(Duration),
    /// The readiness check said no; its words.
    Check(String),
    /// Consecutive health checks failed during its canary or bake; the
    /// last one's words.
    Unhealthy(String),
    /// Rolled back on request during its canary or bake.
    RolledBack,
    /// baton began to stop.
    Stopping,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A notify datagram from a process of no generation.
    NotifyFromStranger { pid: Pid },
    /// A worker's process exited while others in its group live: they are
    /// drained too.
    GroupOutlivesLeader { gen: GenId, pid: Pid },
    /// Members of an exited leader's group outstayed the drain timeout.
    KillingLeftovers { gen: GenId, pid: Pid },
    /// Workers of the active generation failed their readiness check and
    /// are drained to be restarted.
    Recycling { gen: GenId, failure: Failure },
    /// The upgrade requested by SIGHUP during the last one starts now.
    FollowUpUpgrade,
    /// The active generation is restarted on request (its socket was
    /// replaced).
    RestartRequested { gen: GenId },
    /// A retiring generation's queue did not empty in time: drained anyway.
    QueueNotEmpty { gen: GenId },
    /// The parked generation exited during the bake: nothing to roll back to.
    ParkedExited { gen: GenId },
    /// A health check failed (`failures` in a row).
    HealthFailed {
        gen: GenId,
        failures: u32,
        reason: String,
    },
}
