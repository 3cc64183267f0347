//! The machine's state: generations and their phases, the process groups
//! it answers for, and the upgrade in progress. Each phase holds exactly
//! the data valid in it.

use crate::backoff::Backoff;
use crate::io::{Failure, UpgradeRef};
use crate::types::{
    CpuPriority, ExitStatus, GenId, Pid, Settings, Spec, Time, Trigger, UpgradeOptions,
};

/// What a generation's main process is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Phase {
    /// Not started yet (an upgrade without overlap): it starts once no
    /// other generation has a process left or a spawn outstanding. It
    /// already owns the sockets, so new connections queue for it.
    Waiting,
    /// [`Effect::Spawn`](crate::Effect::Spawn) is out; its answer has not
    /// arrived.
    Spawning,
    /// Running, not yet ready; fails if not ready by `deadline`.
    Starting {
        pid: Pid,
        deadline: Time,
        check: Check,
    },
    /// Passed its readiness check; the traffic plan says what it gets.
    Serving {
        pid: Pid,
    },
    /// The active generation failed its readiness check: drained, and
    /// restarted once `pid` has exited.
    Recycling {
        pid: Pid,
    },
    /// The active generation's process died; the next one starts `at`.
    Restarting {
        at: Time,
    },
    /// Gets no new connections; still accepts what waits in its sockets,
    /// and is drained once they are empty, or at `until` regardless.
    /// `failure` is why it was abandoned, if it was (a rolled-back one).
    Retiring {
        pid: Pid,
        until: Time,
        failure: Option<Failure>,
    },
    /// Told to finish; done once its process groups are gone and no spawn
    /// is outstanding. `failure` is why it was abandoned, if it was.
    Draining {
        failure: Option<Failure>,
        spawn_pending: bool,
    },
    Finished {
        failure: Option<Failure>,
        at: Time,
    },
}

/// How a starting generation proves it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Check {
    Notify,
    Probe,
    Delay { at: Time },
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
    pub(crate) restarts: u32,
    pub(crate) backoff: Backoff,
    pub(crate) status_text: Option<String>,
    pub(crate) last_exit: Option<ExitStatus>,
    /// False once its sockets went to the generation that replaced it
    /// ([`Effect::PassSockets`](crate::Effect::PassSockets)): they are not
    /// its to free.
    pub(crate) owns_sockets: bool,
    /// The CPU priority its current process was started at, while not
    /// restored: [`CpuPriority::Normal`] unless it is (or was, if the
    /// restore failed) an upgrade's candidate started beside a serving
    /// generation.
    #[cfg_attr(feature = "serde", serde(default))]
    pub(crate) priority: CpuPriority,
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
    pub fn restarts(&self) -> u32 {
        self.restarts
    }
    pub fn status_text(&self) -> Option<&str> {
        self.status_text.as_deref()
    }
    pub fn last_exit(&self) -> Option<ExitStatus> {
        self.last_exit
    }
    pub fn upgrade(&self) -> Option<UpgradeRef> {
        self.upgrade
    }
    /// The CPU priority its process runs at, as baton set it:
    /// [`CpuPriority::Normal`] unless started lower and not restored.
    pub fn priority(&self) -> CpuPriority {
        self.priority
    }

    /// The main process the phase is about, while it runs.
    pub fn main_pid(&self) -> Option<Pid> {
        match self.phase {
            Phase::Starting { pid, .. }
            | Phase::Serving { pid }
            | Phase::Recycling { pid }
            | Phase::Retiring { pid, .. } => Some(pid),
            _ => None,
        }
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.spec.settings
    }
}

/// A process group the machine is responsible for: from
/// [`Input::Spawned`](crate::Input::Spawned) until
/// [`Effect::Release`](crate::Effect::Release).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Proc {
    pub gen: GenId,
    pub started: Time,
    /// `None` while the main process runs; its status once it has exited
    /// (other members of its group may still run).
    pub exit: Option<ExitStatus>,
    /// When the group gets SIGKILL; set by the first drain signal and
    /// never moved.
    pub kill_at: Option<Time>,
    pub killed: bool,
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
    /// The candidate is ready and was started at a lowered CPU priority:
    /// it gets the normal one back
    /// ([`Effect::RestorePriority`](crate::Effect::RestorePriority)) before
    /// any traffic moves to it.
    Raising,
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
    /// failure is reported once `restore`'s process has been started.
    Restoring { failure: Failure, restore: GenId },
    /// The candidate died; the failure is reported once its stderr has
    /// ended or at `at`, so its last lines are in.
    Reporting {
        failure: Failure,
        pid: Pid,
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
