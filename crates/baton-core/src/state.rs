//! The machine's state: generations and their phases, the workers of each,
//! the process groups it answers for, and the upgrade in progress. Each
//! phase holds exactly the data valid in it.

use crate::backoff::Backoff;
use crate::io::{Failure, UpgradeRef};
use crate::types::{
    CpuPriority, ExitStatus, GenId, Pid, Settings, Spec, Time, Trigger, UpgradeOptions,
};

/// What a generation is doing. A generation runs `settings.workers`
/// processes (its workers), each its own process group, all on the
/// generation's sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Phase {
    /// Not started yet (an upgrade without overlap): it starts once no
    /// other generation has a process left or a spawn outstanding. It
    /// already owns the sockets, so new connections queue for it.
    Waiting,
    /// Not every worker is ready yet: at its start, or (the active
    /// generation) after it had no ready worker left. It becomes
    /// [`Phase::Serving`] once every worker is [`Worker::Up`]. `deadline`
    /// is when the workers starting now must be ready by: armed when the
    /// first of them runs, so the ready timeout applies to the generation.
    /// `probe` is the process a readiness check runs for (one per
    /// generation, once every worker runs), while one runs.
    Starting {
        workers: Vec<Worker>,
        deadline: Option<Time>,
        probe: Option<Pid>,
    },
    /// Every worker was ready; the traffic plan says what it gets. A
    /// worker that dies is restarted alone while at least one other is up.
    Serving {
        workers: Vec<Worker>,
    },
    /// Gets no new connections; its running workers still accept what
    /// waits in its sockets, and it is drained once they are empty, or at
    /// `until` regardless. `failure` is why it was abandoned, if it was (a
    /// rolled-back one). `spawning`: workers whose spawn is outstanding.
    Retiring {
        until: Time,
        failure: Option<Failure>,
        spawning: Vec<u32>,
    },
    /// Told to finish; done once its process groups are gone and no spawn
    /// (`spawning`, by worker) is outstanding. `failure` is why it was
    /// abandoned, if it was.
    Draining {
        failure: Option<Failure>,
        spawning: Vec<u32>,
    },
    Finished {
        failure: Option<Failure>,
        at: Time,
    },
}

/// One worker of a starting or serving generation, by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Worker {
    /// [`Effect::Spawn`](crate::Effect::Spawn) is out; its answer has not
    /// arrived.
    Spawning,
    /// Running, not yet ready; recycled (or, a candidate, failed) if not
    /// ready by `deadline`.
    Starting {
        pid: Pid,
        deadline: Time,
        check: Check,
    },
    /// Ready.
    Up { pid: Pid },
    /// Not ready in time (or its socket was replaced): drained, and
    /// restarted once `pid` has exited.
    Recycling { pid: Pid },
    /// Its process died; the next one starts `at`.
    Restarting { at: Time },
}

impl Worker {
    /// The worker's running process, if it has one.
    pub fn pid(&self) -> Option<Pid> {
        match *self {
            Worker::Starting { pid, .. } | Worker::Up { pid } | Worker::Recycling { pid } => {
                Some(pid)
            }
            Worker::Spawning | Worker::Restarting { .. } => None,
        }
    }
}

/// How a starting worker proves it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Check {
    /// `READY=1` from this worker's process (or its group).
    Notify,
    /// The generation's readiness check, which runs once every worker
    /// runs: a probe reaches whichever worker accepts, never one in
    /// particular.
    Probe,
    Delay {
        at: Time,
    },
}

/// What a worker keeps across its restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct WorkerRecord {
    pub restarts: u32,
    pub backoff: Backoff,
    pub last_exit: Option<ExitStatus>,
    /// The CPU priority its latest spawn asked for
    /// ([`Effect::Spawn`](crate::Effect::Spawn)); the process it brings
    /// starts there ([`Proc::priority`]).
    #[cfg_attr(feature = "serde", serde(default))]
    pub priority: CpuPriority,
}

/// One generation: a release, started (and restarted) from one spec.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Generation<P> {
    pub(crate) id: GenId,
    pub(crate) spec: Spec<P>,
    pub(crate) phase: Phase,
    /// The upgrade that started it, or later the one that retired it.
    pub(crate) upgrade: Option<UpgradeRef>,
    /// One per worker, by index.
    pub(crate) records: Vec<WorkerRecord>,
    pub(crate) status_text: Option<String>,
    pub(crate) last_exit: Option<ExitStatus>,
    /// False once its sockets went to the generation that replaced it
    /// ([`Effect::PassSockets`](crate::Effect::PassSockets)): they are not
    /// its to free.
    pub(crate) owns_sockets: bool,
}

impl<P> Generation<P> {
    pub fn id(&self) -> GenId {
        self.id
    }
    pub fn spec(&self) -> &Spec<P> {
        &self.spec
    }
    pub fn phase(&self) -> &Phase {
        &self.phase
    }
    /// Crash restarts of all its workers.
    pub fn restarts(&self) -> u32 {
        self.records.iter().map(|r| r.restarts).sum()
    }
    /// Each worker's restarts and last exit, by index.
    pub fn records(&self) -> &[WorkerRecord] {
        &self.records
    }
    pub fn status_text(&self) -> Option<&str> {
        self.status_text.as_deref()
    }
    /// The last exit of any of its processes.
    pub fn last_exit(&self) -> Option<ExitStatus> {
        self.last_exit
    }
    pub fn upgrade(&self) -> Option<UpgradeRef> {
        self.upgrade
    }

    /// Its workers, while it is starting or serving.
    pub fn workers(&self) -> Option<&[Worker]> {
        match &self.phase {
            Phase::Starting { workers, .. } | Phase::Serving { workers } => Some(workers),
            _ => None,
        }
    }

    pub(crate) fn workers_mut(&mut self) -> Option<&mut Vec<Worker>> {
        match &mut self.phase {
            Phase::Starting { workers, .. } | Phase::Serving { workers } => Some(workers),
            _ => None,
        }
    }

    /// The running process of worker `worker` while it is starting or
    /// serving.
    pub fn worker_pid(&self, worker: u32) -> Option<Pid> {
        self.workers()?.get(worker as usize)?.pid()
    }

    /// Spawns outstanding, by worker.
    pub fn spawning(&self) -> Vec<u32> {
        match &self.phase {
            Phase::Starting { workers, .. } | Phase::Serving { workers } => (0..)
                .zip(workers)
                .filter(|(_, w)| **w == Worker::Spawning)
                .map(|(i, _)| i)
                .collect(),
            Phase::Retiring { spawning, .. } | Phase::Draining { spawning, .. } => spawning.clone(),
            Phase::Waiting | Phase::Finished { .. } => Vec::new(),
        }
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.spec.settings
    }
}

/// A process group the machine is responsible for: from
/// [`Input::Spawned`](crate::Input::Spawned) until
/// [`Effect::Release`](crate::Effect::Release). Each worker leads its own.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Proc {
    pub gen: GenId,
    /// Which of the generation's workers it is.
    pub worker: u32,
    pub started: Time,
    /// `None` while the group's leader (the worker's process) runs; its
    /// status once it has exited (other members of its group may still
    /// run).
    pub exit: Option<ExitStatus>,
    /// When the group gets SIGKILL; set by the first drain signal and
    /// never moved.
    pub kill_at: Option<Time>,
    pub killed: bool,
    /// The CPU priority its processes run at as baton set it: the one it
    /// was started at ([`CpuPriority::Normal`] unless it is a worker of an
    /// upgrade's candidate started beside a serving generation), normal
    /// once restored ([`Input::PriorityRestored`](crate::Input::PriorityRestored)).
    /// A restore that failed leaves it lowered, for `status` to show.
    #[cfg_attr(feature = "serde", serde(default))]
    pub priority: CpuPriority,
}

/// An upgrade in progress (at most one, by construction). It lasts until
/// its outcome: through the candidate's start, a canary and a bake.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Upgrade {
    pub candidate: GenId,
    pub started: Time,
    pub trigger: Trigger,
    pub options: UpgradeOptions,
    pub phase: UpgradePhase,
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum UpgradePhase {
    /// The candidate is starting, dark.
    Starting,
    /// Every worker of the candidate is ready, and some were started at a
    /// lowered CPU priority: each of those gets the normal one back
    /// ([`Effect::RestorePriority`](crate::Effect::RestorePriority)) before
    /// any traffic moves to the candidate. `pending`: the workers' processes
    /// whose restore has not been answered yet; the traffic moves once none
    /// is left. `pid`: the worker that made the generation ready (its
    /// `Active` event names it).
    Raising { pid: Pid, pending: Vec<Pid> },
    /// The ready candidate takes `share` percent of new connections,
    /// until promoted (by request, or by itself at `promote_at`).
    Canary {
        share: u8,
        promote_at: Option<Time>,
        /// Consecutive failed health checks.
        failures: u32,
    },
    /// The candidate is active; the previous generation, `parked` (if it
    /// still runs), can take the traffic back until `until`.
    Baking {
        parked: Option<GenId>,
        until: Time,
        failures: u32,
    },
    /// Without overlap: `previous` (the generation serving when the upgrade
    /// began) is drained and the candidate, owning the sockets, starts once
    /// nothing else runs. If it fails before it is ready, `previous`'s
    /// release is started again.
    Replacing { previous: GenId },
    /// Without overlap, the candidate failed (`failure`, or a rollback):
    /// it is drained, and `restore`, a new generation of the previous
    /// release owning the sockets, starts once nothing of it runs. The
    /// failure is reported once every worker of `restore` has been
    /// started (or could not be). `worker`: the candidate's worker whose
    /// death failed it, if one did.
    Restoring {
        failure: Failure,
        worker: Option<u32>,
        restore: GenId,
    },
    /// A worker of the candidate died; the failure is reported once that
    /// process's stderr has ended or at `at`, so its last lines are in.
    Reporting {
        failure: Failure,
        pid: Pid,
        worker: u32,
        at: Time,
    },
}

impl Upgrade {
    pub(crate) fn as_ref(&self) -> UpgradeRef {
        UpgradeRef {
            id: self.candidate,
            started: self.started,
        }
    }
}
