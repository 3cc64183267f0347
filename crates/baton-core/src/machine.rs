//! The lifecycle state machine: every decision about generations,
//! upgrades, readiness, cutover, drain, crash restarts and stop.
//!
//! The shell feeds [`Input`]s with the time they happened and performs the
//! [`Effect`]s it gets back, in order; it asks [`Machine::poll_timeout`]
//! when to call again with [`Input::Tick`]. Nothing here reads a clock,
//! touches a process or waits.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::traffic::TrafficPlan;
use crate::types::{
    ExitStatus, GenId, Pid, Readiness, Release, Report, Settings, Signal, Spec, Time, Trigger,
};

/// Finished generations kept for `status`; older ones are forgotten so
/// memory stays flat across any number of upgrades.
pub const FINISHED_KEPT: usize = 8;
/// Successful releases remembered for rollback.
pub const RELEASES_KEPT: usize = 16;
/// How long a failure report waits for a dead candidate's last stderr
/// lines (a grandchild may hold its stderr open forever).
pub const STDERR_GRACE: Duration = Duration::from_millis(200);

/// Identifies a request so its [`Effect::Reply`] reaches the asker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<P> {
    /// Start a new generation from `spec` and cut over to it once ready.
    /// `Err` says the shell could not even resolve the release (a missing
    /// program or directory): the upgrade gets its number and fails at
    /// once with that error, like a spawn that failed.
    Upgrade {
        trigger: Trigger,
        spec: Result<Spec<P>, String>,
    },
    /// Start the previous successful release and cut over to it.
    Rollback,
    /// Drain every generation; the machine is done once all have exited.
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The upgrade started; its candidate is this generation.
    Upgrading(GenId),
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
}

/// Why an upgrade cannot start a generation.
enum Unstartable {
    Refused(Refusal),
    Unresolved(String),
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
        pid: Pid,
    },
    /// [`Effect::Spawn`] could not start a process.
    SpawnFailed {
        gen: GenId,
        error: String,
    },
    /// A generation's main process exited. The shell keeps it unreaped, so
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
    /// A time given by [`Machine::poll_timeout`] has come.
    Tick,
}

/// What the shell must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Start a process for `gen` from its spec ([`Machine::spec`]); answer
    /// with [`Input::Spawned`] or [`Input::SpawnFailed`].
    Spawn {
        gen: GenId,
    },
    /// Run `gen`'s readiness check against `pid`; answer with
    /// [`Input::Probe`].
    StartProbe {
        gen: GenId,
        pid: Pid,
    },
    /// Abandon `gen`'s readiness check, if one runs.
    StopProbe {
        gen: GenId,
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
    },
    SpawnFailed {
        error: String,
    },
    Ready {
        pid: Pid,
        via: Via,
    },
    /// The generation receives new connections.
    Active {
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
        status: ExitStatus,
    },
    Restarting {
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
}

/// Why a generation was abandoned before it served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Its process could not be started.
    Spawn(String),
    /// Its main process exited before it was ready.
    Exited(ExitStatus),
    /// Not ready within the ready timeout.
    Timeout(Duration),
    /// The readiness check said no; its words.
    Check(String),
    /// baton began to stop.
    Stopping,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A notify datagram from a process of no generation.
    NotifyFromStranger { pid: Pid },
    /// A generation's main process exited while others in its group live:
    /// they are drained too.
    GroupOutlivesLeader { gen: GenId, pid: Pid },
    /// Members of an exited leader's group outstayed the drain timeout.
    KillingLeftovers { gen: GenId, pid: Pid },
    /// The active generation failed its readiness check and is drained to
    /// be restarted.
    Recycling { gen: GenId, failure: Failure },
    /// The upgrade requested by SIGHUP during the last one starts now.
    FollowUpUpgrade,
}

/// What a generation's main process is doing. Each phase holds exactly
/// the data valid in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// [`Effect::Spawn`] is out; its answer has not arrived.
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
    /// Told to finish; done once its process groups are gone and no spawn
    /// is outstanding. `failure` is why a candidate was abandoned.
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
pub enum Check {
    Notify,
    Probe,
    Delay { at: Time },
}

/// One generation: a release, started (and restarted) from one spec.
#[derive(Debug, Clone)]
pub struct Generation<P> {
    id: GenId,
    spec: Spec<P>,
    phase: Phase,
    /// The upgrade that started it, or later the one that drained it.
    upgrade: Option<UpgradeRef>,
    restarts: u32,
    backoff: Backoff,
    status_text: Option<String>,
    last_exit: Option<ExitStatus>,
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

    /// The main process the phase is about, while it runs.
    pub fn main_pid(&self) -> Option<Pid> {
        match self.phase {
            Phase::Starting { pid, .. } | Phase::Serving { pid } | Phase::Recycling { pid } => {
                Some(pid)
            }
            _ => None,
        }
    }

    fn settings(&self) -> &Settings {
        &self.spec.settings
    }
}

/// A process group the machine is responsible for: from [`Input::Spawned`]
/// until [`Effect::Release`].
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// An upgrade in progress (at most one, by construction).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub candidate: GenId,
    pub started: Time,
    pub trigger: Trigger,
    pub phase: UpgradePhase,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradePhase {
    /// The candidate is starting.
    Starting,
    /// The candidate died before it was ready; the failure is reported
    /// once its stderr has ended or at `at`, so its last lines are in.
    Reporting {
        failure: Failure,
        pid: Pid,
        at: Time,
    },
}

impl Upgrade {
    fn as_ref(&self) -> UpgradeRef {
        UpgradeRef {
            id: self.candidate,
            started: self.started,
        }
    }
}

/// The supervisor's state. `P` is the shell's per-generation payload.
#[derive(Debug, Clone)]
pub struct Machine<P> {
    gens: BTreeMap<GenId, Generation<P>>,
    procs: BTreeMap<Pid, Proc>,
    upgrade: Option<Upgrade>,
    traffic: TrafficPlan,
    /// Successful releases, oldest first.
    releases: Vec<Release>,
    next_gen: u64,
    /// A SIGHUP arrived during an upgrade: one more follows it, so the
    /// newest deploy always wins.
    follow_up: bool,
    stopping: bool,
    // Scratch for the step in progress.
    now: Time,
    out: Vec<Effect>,
}

impl<P: Clone> Default for Machine<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Clone> Machine<P> {
    pub fn new() -> Self {
        Self {
            gens: BTreeMap::new(),
            procs: BTreeMap::new(),
            upgrade: None,
            traffic: TrafficPlan::default(),
            releases: Vec::new(),
            next_gen: 1,
            follow_up: false,
            stopping: false,
            now: Time::ZERO,
            out: Vec::new(),
        }
    }

    // ----- queries ---------------------------------------------------------

    pub fn generations(&self) -> impl Iterator<Item = &Generation<P>> {
        self.gens.values()
    }

    pub fn generation(&self, gen: GenId) -> Option<&Generation<P>> {
        self.gens.get(&gen)
    }

    pub fn spec(&self, gen: GenId) -> Option<&Spec<P>> {
        self.gens.get(&gen).map(|g| &g.spec)
    }

    /// Every process group not yet released, by leader pid.
    pub fn procs(&self) -> &BTreeMap<Pid, Proc> {
        &self.procs
    }

    pub fn traffic(&self) -> &TrafficPlan {
        &self.traffic
    }

    pub fn upgrade(&self) -> Option<&Upgrade> {
        self.upgrade.as_ref()
    }

    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// Stopping, and nothing is left running or about to start.
    pub fn is_done(&self) -> bool {
        self.stopping
            && self.procs.is_empty()
            && !self.gens.values().any(|g| {
                matches!(
                    g.phase,
                    Phase::Spawning
                        | Phase::Draining {
                            spawn_pending: true,
                            ..
                        }
                )
            })
    }

    /// The earliest time at which [`Input::Tick`] has something to do.
    pub fn poll_timeout(&self) -> Option<Time> {
        let gens = self.gens.values().filter_map(|g| match g.phase {
            Phase::Starting {
                deadline, check, ..
            } => Some(match check {
                Check::Delay { at } => at.min(deadline),
                _ => deadline,
            }),
            Phase::Restarting { at } => Some(at),
            _ => None,
        });
        let kills = self
            .procs
            .values()
            .filter(|p| !p.killed)
            .filter_map(|p| p.kill_at);
        let report = match &self.upgrade {
            Some(Upgrade {
                phase: UpgradePhase::Reporting { at, .. },
                ..
            }) => Some(*at),
            _ => None,
        };
        gens.chain(kills).chain(report).min()
    }

    // ----- the step ----------------------------------------------------------

    /// Applies one input that happened at `now`; returns what to do.
    pub fn step(&mut self, input: Input<P>, now: Time) -> Vec<Effect> {
        // The clock never runs backwards, whatever the shell passes.
        self.now = self.now.max(now);
        match input {
            Input::Start { spec } => self.start(spec),
            Input::Command { id, command } => self.command(id, command),
            Input::Spawned { gen, pid } => self.on_spawned(gen, pid),
            Input::SpawnFailed { gen, error } => self.on_spawn_failed(gen, error),
            Input::Exited {
                pid,
                status,
                group_empty,
            } => self.on_exited(pid, status, group_empty),
            Input::GroupEmpty { pid } => self.on_group_empty(pid),
            Input::Probe { gen, pid, result } => self.on_probe(gen, pid, result),
            Input::Notify { pid, pgid, reports } => self.on_notify(pid, pgid, reports),
            Input::StderrClosed { pid } => self.on_stderr_closed(pid),
            Input::Tick => self.on_tick(),
        }
        self.prune();
        std::mem::take(&mut self.out)
    }

    fn emit(&mut self, gen: GenId, kind: EventKind) {
        let upgrade = self.gens.get(&gen).and_then(|g| g.upgrade);
        self.emit_in(gen, upgrade, kind);
    }

    fn emit_in(&mut self, gen: GenId, upgrade: Option<UpgradeRef>, kind: EventKind) {
        self.out.push(Effect::Event(Event { gen, upgrade, kind }));
    }

    fn set_active(&mut self, gen: GenId) {
        if self.traffic.active != Some(gen) {
            self.traffic.active = Some(gen);
            self.out.push(Effect::Traffic(self.traffic.clone()));
        }
    }

    fn is_candidate(&self, gen: GenId) -> bool {
        self.upgrade.as_ref().is_some_and(|u| u.candidate == gen)
    }

    fn new_generation(&mut self, spec: Spec<P>, upgrade: Option<UpgradeRef>) -> GenId {
        let id = GenId(self.next_gen);
        self.next_gen += 1;
        let backoff = Backoff::new(spec.settings.restart_backoff_max);
        self.gens.insert(
            id,
            Generation {
                id,
                spec,
                phase: Phase::Spawning,
                upgrade,
                restarts: 0,
                backoff,
                status_text: None,
                last_exit: None,
            },
        );
        id
    }

    // ----- commands ----------------------------------------------------------

    fn start(&mut self, spec: Spec<P>) {
        if self.next_gen != 1 || self.stopping {
            return;
        }
        let gen = self.new_generation(spec, None);
        self.emit(
            gen,
            EventKind::Requested {
                trigger: Trigger::Start,
            },
        );
        // The first generation owns the traffic from the start: connections
        // wait in its queue, and a crash restarts it.
        self.set_active(gen);
        self.out.push(Effect::Spawn { gen });
    }

    fn command(&mut self, id: RequestId, command: Command<P>) {
        let reply = match command {
            Command::Upgrade { trigger, spec } => {
                self.start_upgrade(trigger, spec.map_err(Unstartable::Unresolved))
            }
            Command::Rollback => {
                let prev = self
                    .releases
                    .len()
                    .checked_sub(2)
                    .map(|i| self.releases[i].clone());
                // Settings and payload of the generation now serving.
                let base = self
                    .traffic
                    .active
                    .and_then(|a| self.gens.get(&a))
                    .or_else(|| self.gens.values().next_back())
                    .map(|g| g.spec.clone());
                let spec = match (prev, base) {
                    (Some(release), Some(base)) => Ok(Spec { release, ..base }),
                    _ => Err(Unstartable::Refused(Refusal::NoPrevious)),
                };
                self.start_upgrade(Trigger::Rollback, spec)
            }
            Command::Stop => {
                self.stop();
                Reply::Stopping
            }
        };
        self.out.push(Effect::Reply { id, reply });
    }

    fn start_upgrade(&mut self, trigger: Trigger, spec: Result<Spec<P>, Unstartable>) -> Reply {
        if self.stopping {
            return Reply::Refused(Refusal::Stopping);
        }
        if let Some(up) = &self.upgrade {
            if trigger == Trigger::Signal {
                self.follow_up = true;
            }
            return Reply::Refused(Refusal::Busy(up.candidate));
        }
        // Everything that can refuse happens before a number is used, so a
        // refused request leaves no trace but its reply.
        let started = self.now;
        let up_ref = UpgradeRef {
            id: GenId(self.next_gen),
            started,
        };
        let spec = match spec {
            Ok(spec) => spec,
            Err(Unstartable::Refused(refusal)) => return Reply::Refused(refusal),
            Err(Unstartable::Unresolved(error)) => {
                // Numbered and reported like any upgrade, with no
                // generation to keep: nothing of it ever ran.
                let gen = up_ref.id;
                self.next_gen += 1;
                let up = Some(up_ref);
                self.emit_in(gen, up, EventKind::Requested { trigger });
                let spawn_error = EventKind::SpawnFailed {
                    error: error.clone(),
                };
                self.emit_in(gen, up, spawn_error);
                let failure = Failure::Spawn(error);
                self.emit_in(gen, up, EventKind::UpgradeFailed { failure });
                self.after_upgrade();
                return Reply::Upgrading(gen);
            }
        };
        let gen = self.new_generation(spec, Some(up_ref));
        self.upgrade = Some(Upgrade {
            candidate: gen,
            started,
            trigger,
            phase: UpgradePhase::Starting,
        });
        self.emit(gen, EventKind::Requested { trigger });
        self.out.push(Effect::Spawn { gen });
        Reply::Upgrading(gen)
    }

    fn stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        self.follow_up = false;
        // New clients are refused from now on rather than accepted into a
        // queue that nobody will serve.
        self.out.push(Effect::CloseListeners);
        if let Some(up) = &self.upgrade {
            let failure = match &up.phase {
                UpgradePhase::Reporting { failure, .. } => failure.clone(),
                UpgradePhase::Starting => Failure::Stopping,
            };
            self.fail_upgrade(failure, None);
        }
        let all: Vec<GenId> = self.gens.keys().copied().collect();
        for gen in all {
            self.drain(gen, None);
        }
    }

    // ----- processes ---------------------------------------------------------

    fn on_spawned(&mut self, gen: GenId, pid: Pid) {
        self.procs.insert(
            pid,
            Proc {
                gen,
                started: self.now,
                exit: None,
                kill_at: None,
                killed: false,
            },
        );
        let Some(g) = self.gens.get_mut(&gen) else {
            // Generations with a spawn outstanding are never forgotten, so
            // this cannot happen; if it did, the process must not run on.
            if let Some(p) = self.procs.get_mut(&pid) {
                p.kill_at = Some(self.now);
            }
            return;
        };
        let settings = *g.settings();
        let dir_event = EventKind::Spawned { pid };
        match &mut g.phase {
            Phase::Spawning => {
                let check = match settings.readiness {
                    Readiness::Notify => Check::Notify,
                    Readiness::Probe => Check::Probe,
                    Readiness::Delay(d) => Check::Delay { at: self.now + d },
                };
                g.phase = Phase::Starting {
                    pid,
                    deadline: self.now + settings.ready_timeout,
                    check,
                };
                g.status_text = None;
                self.emit(gen, dir_event);
                if check == Check::Probe {
                    self.out.push(Effect::StartProbe { gen, pid });
                }
            }
            Phase::Draining { spawn_pending, .. } => {
                // Drained (stop, cutover) while it was being started.
                *spawn_pending = false;
                self.emit(gen, dir_event);
                self.signal_drain(gen, pid);
            }
            _ => {
                // No spawn was outstanding: drain the stray process.
                self.emit(gen, dir_event);
                self.signal_drain(gen, pid);
            }
        }
    }

    fn on_spawn_failed(&mut self, gen: GenId, error: String) {
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        match &mut g.phase {
            Phase::Spawning => {
                self.emit(
                    gen,
                    EventKind::SpawnFailed {
                        error: error.clone(),
                    },
                );
                let candidate = self.is_candidate(gen);
                if !candidate && self.traffic.active == Some(gen) && !self.stopping {
                    self.restart_after(gen, Duration::ZERO);
                } else {
                    // Answered: nothing of it runs or will.
                    self.set_draining(gen, None, false);
                    if candidate {
                        self.fail_upgrade(Failure::Spawn(error), None);
                    } else {
                        self.end(gen, Some(Failure::Spawn(error)));
                    }
                }
            }
            Phase::Draining { spawn_pending, .. } if *spawn_pending => {
                *spawn_pending = false;
                self.emit(gen, EventKind::SpawnFailed { error });
                self.maybe_finish(gen);
            }
            _ => {}
        }
    }

    fn on_exited(&mut self, pid: Pid, status: ExitStatus, group_empty: bool) {
        let now = self.now;
        let Some(proc) = self.procs.get_mut(&pid) else {
            return;
        };
        if proc.exit.is_some() {
            return;
        }
        proc.exit = Some(status);
        let (gen, uptime, drained) = (proc.gen, now.since(proc.started), proc.kill_at.is_some());
        if let Some(g) = self.gens.get_mut(&gen) {
            g.last_exit = Some(status);
        }
        self.emit(gen, EventKind::Exited { pid, status });
        if group_empty {
            self.release(pid);
        } else if !drained {
            // Workers may outlive their leader: unless a drain already
            // covers them, they are drained like any generation.
            self.out
                .push(Effect::Note(Note::GroupOutlivesLeader { gen, pid }));
            self.signal_group(gen, pid);
        }

        let Some(g) = self.gens.get(&gen) else {
            return;
        };
        if g.main_pid() != Some(pid) {
            // An older process of this generation, or a draining one.
            self.maybe_finish(gen);
            return;
        }
        let was_starting = matches!(g.phase, Phase::Starting { .. });
        let probing = matches!(
            g.phase,
            Phase::Starting {
                check: Check::Probe,
                ..
            }
        );
        if self.is_candidate(gen) {
            // Report once its last stderr lines are in (a bounded wait);
            // the process is gone, so nothing can promote it meanwhile.
            self.fail_upgrade(Failure::Exited(status), Some(pid));
        } else if self.traffic.active == Some(gen) && !self.stopping {
            if probing {
                self.out.push(Effect::StopProbe { gen });
            }
            self.restart_after(gen, uptime);
        } else {
            let failure = (was_starting && self.traffic.active != Some(gen))
                .then_some(Failure::Exited(status));
            self.end(gen, failure);
        }
    }

    fn on_group_empty(&mut self, pid: Pid) {
        let Some(proc) = self.procs.get(&pid) else {
            return;
        };
        // Only a group whose leader has exited can be empty.
        if proc.exit.is_none() {
            return;
        }
        let gen = proc.gen;
        self.release(pid);
        self.maybe_finish(gen);
    }

    fn release(&mut self, pid: Pid) {
        if self.procs.remove(&pid).is_some() {
            self.out.push(Effect::Release { pid });
        }
    }

    /// Restarts the active generation after a process that ran for
    /// `uptime`, with backoff.
    fn restart_after(&mut self, gen: GenId, uptime: Duration) {
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        let delay = g.backoff.on_exit(uptime);
        g.restarts += 1;
        g.phase = Phase::Restarting {
            at: self.now + delay,
        };
        let restarts = g.restarts;
        self.emit(gen, EventKind::Restarting { delay, restarts });
    }

    // ----- readiness ---------------------------------------------------------

    fn on_probe(&mut self, gen: GenId, pid: Pid, result: Result<String, String>) {
        let current = self.gens.get(&gen).is_some_and(
            |g| matches!(g.phase, Phase::Starting { pid: p, check: Check::Probe, .. } if p == pid),
        );
        if !current || !self.running(pid) {
            return;
        }
        match result {
            Ok(via) => self.ready(gen, pid, Via::Probe(via)),
            Err(reason) => self.not_ready(gen, Failure::Check(reason)),
        }
    }

    fn on_notify(&mut self, pid: Pid, pgid: Option<Pid>, reports: Vec<Report>) {
        // A process counts for the generation whose running main process it
        // is, or whose group it belongs to; never by anything it says.
        let leader = [Some(pid), pgid]
            .into_iter()
            .flatten()
            .find(|p| self.running(*p));
        let Some(leader) = leader else {
            self.out
                .push(Effect::Note(Note::NotifyFromStranger { pid }));
            return;
        };
        let gen = self.procs[&leader].gen;
        for report in reports {
            match report {
                Report::Ready => {
                    let waiting = self.gens.get(&gen).is_some_and(|g| {
                        matches!(g.phase, Phase::Starting { pid: p, check: Check::Notify, .. } if p == leader)
                    });
                    if waiting {
                        self.ready(gen, leader, Via::Notify { from: pid });
                    }
                }
                Report::Status(text) => {
                    if let Some(g) = self.gens.get_mut(&gen) {
                        g.status_text = Some(text.clone());
                    }
                    self.emit(gen, EventKind::Status { text });
                }
                Report::Stopping => self.emit(gen, EventKind::Stopping { pid }),
            }
        }
    }

    fn running(&self, pid: Pid) -> bool {
        self.procs.get(&pid).is_some_and(|p| p.exit.is_none())
    }

    fn ready(&mut self, gen: GenId, pid: Pid, via: Via) {
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        if matches!(
            g.phase,
            Phase::Starting {
                check: Check::Probe,
                ..
            }
        ) {
            self.out.push(Effect::StopProbe { gen });
        }
        g.phase = Phase::Serving { pid };
        self.emit(gen, EventKind::Ready { pid, via });
        if self.is_candidate(gen) {
            self.cutover(gen, pid);
        } else if self.traffic.active == Some(gen) {
            // First start, or a restart of the active generation.
            self.emit(gen, EventKind::Active { pid });
            let release = self.gens[&gen].spec.release.clone();
            self.remember_release(release);
        } else {
            // Nobody wants it any more.
            self.drain(gen, None);
        }
    }

    fn not_ready(&mut self, gen: GenId, failure: Failure) {
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        let Phase::Starting { pid, check, .. } = g.phase else {
            return;
        };
        if self.is_candidate(gen) {
            self.fail_upgrade(failure, None);
        } else if self.traffic.active == Some(gen) && !self.stopping {
            // Drained; its exit restarts it with backoff.
            if check == Check::Probe {
                self.out.push(Effect::StopProbe { gen });
            }
            if let Some(g) = self.gens.get_mut(&gen) {
                g.phase = Phase::Recycling { pid };
            }
            self.out
                .push(Effect::Note(Note::Recycling { gen, failure }));
            self.signal_drain(gen, pid);
        } else {
            self.end(gen, Some(failure));
        }
    }

    /// The candidate is ready: it takes the traffic, then every older
    /// generation still in service is told to drain.
    fn cutover(&mut self, gen: GenId, pid: Pid) {
        let Some(up) = self.upgrade.take() else {
            return;
        };
        let up_ref = up.as_ref();
        self.set_active(gen);
        self.emit(gen, EventKind::Active { pid });
        let older: Vec<GenId> = self.gens.keys().copied().filter(|g| *g != gen).collect();
        for old in older {
            self.drain(old, Some(up_ref));
        }
        if up.trigger == Trigger::Rollback {
            self.releases.pop();
        } else {
            let release = self.gens[&gen].spec.release.clone();
            self.remember_release(release);
        }
        self.emit(gen, EventKind::UpgradeSucceeded);
        self.after_upgrade();
    }

    fn remember_release(&mut self, release: Release) {
        // An upgrade to the same release is no new step to roll back from.
        if self.releases.last() == Some(&release) {
            return;
        }
        self.releases.push(release);
        if self.releases.len() > RELEASES_KEPT {
            self.releases.remove(0);
        }
    }

    /// Abandons the upgrade in progress: its candidate is drained (it may
    /// already serve clients), and the failure is reported now, or, when
    /// the candidate died (`dead`), once its stderr has ended.
    fn fail_upgrade(&mut self, failure: Failure, dead: Option<Pid>) {
        let Some(gen) = self.upgrade.as_ref().map(|u| u.candidate) else {
            return;
        };
        // Drained first, so the outcome follows the drain it caused.
        self.end(gen, Some(failure.clone()));
        let at = self.now + STDERR_GRACE;
        match (dead, self.upgrade.as_mut()) {
            (Some(pid), Some(up)) if !self.stopping => {
                up.phase = UpgradePhase::Reporting { failure, pid, at };
            }
            _ => {
                let up = self.upgrade.take().map(|u| u.as_ref());
                self.emit_in(gen, up, EventKind::UpgradeFailed { failure });
                self.after_upgrade();
            }
        }
    }

    fn finish_report(&mut self) {
        let Some(Upgrade {
            phase: UpgradePhase::Reporting { failure, .. },
            ..
        }) = &self.upgrade
        else {
            return;
        };
        let failure = failure.clone();
        let up = self.upgrade.take().map(|u| u.as_ref());
        if let Some(up) = up {
            self.emit_in(up.id, Some(up), EventKind::UpgradeFailed { failure });
        }
        self.after_upgrade();
    }

    fn on_stderr_closed(&mut self, pid: Pid) {
        let reporting = matches!(
            &self.upgrade,
            Some(Upgrade { phase: UpgradePhase::Reporting { pid: p, .. }, .. }) if *p == pid
        );
        if reporting {
            self.finish_report();
        }
    }

    fn after_upgrade(&mut self) {
        if std::mem::take(&mut self.follow_up) && !self.stopping {
            self.out.push(Effect::Note(Note::FollowUpUpgrade));
            self.out.push(Effect::RequestUpgrade);
        }
    }

    // ----- draining ----------------------------------------------------------

    /// Tells `gen` to finish: its running process gets the drain signal, a
    /// pending spawn is drained when it arrives, a pending restart is
    /// dropped. `upgrade`, if given, is the upgrade the drain belongs to.
    fn drain(&mut self, gen: GenId, upgrade: Option<UpgradeRef>) {
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        if matches!(g.phase, Phase::Draining { .. } | Phase::Finished { .. }) {
            return;
        }
        if upgrade.is_some() {
            g.upgrade = upgrade;
        }
        match g.phase {
            Phase::Starting { pid, check, .. } => {
                if check == Check::Probe {
                    self.out.push(Effect::StopProbe { gen });
                }
                self.set_draining(gen, None, false);
                self.signal_drain(gen, pid);
            }
            Phase::Serving { pid } | Phase::Recycling { pid } => {
                self.set_draining(gen, None, false);
                self.signal_drain(gen, pid);
            }
            Phase::Spawning => self.set_draining(gen, None, true),
            Phase::Restarting { .. } => {
                self.set_draining(gen, None, false);
                self.maybe_finish(gen);
            }
            Phase::Draining { .. } | Phase::Finished { .. } => {}
        }
    }

    /// Ends `gen` for good (a failed candidate, or one nobody wants):
    /// drained if it runs, finished once nothing of it is left.
    fn end(&mut self, gen: GenId, failure: Option<Failure>) {
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        match g.phase {
            Phase::Draining {
                failure: ref mut f, ..
            } => {
                if f.is_none() {
                    *f = failure;
                }
            }
            Phase::Finished { .. } => {}
            _ => {
                self.drain(gen, None);
                if let Some(Generation {
                    phase: Phase::Draining { failure: f, .. },
                    ..
                }) = self.gens.get_mut(&gen)
                {
                    *f = failure;
                }
            }
        }
        self.maybe_finish(gen);
    }

    fn set_draining(&mut self, gen: GenId, failure: Option<Failure>, spawn_pending: bool) {
        if let Some(g) = self.gens.get_mut(&gen) {
            g.phase = Phase::Draining {
                failure,
                spawn_pending,
            };
        }
    }

    /// Sends the drain signal to the group led by `pid`, once: a group that
    /// already has its kill deadline is not told again, and the deadline
    /// never moves.
    fn signal_drain(&mut self, gen: GenId, pid: Pid) {
        if self.procs.get(&pid).is_some_and(|p| p.kill_at.is_none()) {
            self.signal_group(gen, pid);
            self.emit(gen, EventKind::Draining { pid });
        }
    }

    fn signal_group(&mut self, gen: GenId, pid: Pid) {
        let Some(timeout) = self.gens.get(&gen).map(|g| g.settings().drain_timeout) else {
            return;
        };
        let now = self.now;
        let Some(proc) = self.procs.get_mut(&pid) else {
            return;
        };
        proc.kill_at.get_or_insert(now + timeout);
        self.out.push(Effect::Signal {
            pid,
            signal: Signal::Drain,
        });
    }

    fn maybe_finish(&mut self, gen: GenId) {
        let left = self.procs.values().any(|p| p.gen == gen);
        let now = self.now;
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        if let Phase::Draining {
            failure,
            spawn_pending: false,
        } = &mut g.phase
        {
            if !left {
                g.phase = Phase::Finished {
                    failure: failure.take(),
                    at: now,
                };
            }
        }
    }

    // ----- time --------------------------------------------------------------

    fn on_tick(&mut self) {
        let now = self.now;
        let due: Vec<(GenId, Phase)> = self
            .gens
            .values()
            .filter(|g| match g.phase {
                Phase::Starting {
                    deadline, check, ..
                } => now >= deadline || matches!(check, Check::Delay { at } if now >= at),
                Phase::Restarting { at } => now >= at,
                _ => false,
            })
            .map(|g| (g.id, g.phase.clone()))
            .collect();
        // Readiness first: a cutover in this tick ends a generation due to
        // restart, rather than restarting it only to drain it.
        let (starting, restarting): (Vec<_>, Vec<_>) = due
            .into_iter()
            .partition(|(_, phase)| matches!(phase, Phase::Starting { .. }));
        for (gen, phase) in starting.into_iter().chain(restarting) {
            if self.gens.get(&gen).map(|g| &g.phase) != Some(&phase) {
                continue; // changed by an earlier decision in this tick
            }
            match phase {
                Phase::Starting {
                    pid,
                    check: Check::Delay { at },
                    deadline,
                } if at <= deadline && self.running(pid) => {
                    let via = match self.gens[&gen].settings().readiness {
                        Readiness::Delay(d) => Via::Delay(d),
                        _ => Via::Delay(Duration::ZERO),
                    };
                    self.ready(gen, pid, via);
                }
                Phase::Starting { .. } => {
                    let t = self.gens[&gen].settings().ready_timeout;
                    self.not_ready(gen, Failure::Timeout(t));
                }
                Phase::Restarting { .. } => {
                    if self.traffic.active == Some(gen) && !self.stopping {
                        if let Some(g) = self.gens.get_mut(&gen) {
                            g.phase = Phase::Spawning;
                        }
                        self.out.push(Effect::Spawn { gen });
                    } else {
                        self.drain(gen, None);
                    }
                }
                _ => {}
            }
        }
        let kills: Vec<Pid> = self
            .procs
            .iter()
            .filter(|(_, p)| !p.killed && p.kill_at.is_some_and(|k| now >= k))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in kills {
            let Some(proc) = self.procs.get_mut(&pid) else {
                continue;
            };
            proc.killed = true;
            let (gen, leader_running) = (proc.gen, proc.exit.is_none());
            self.out.push(Effect::Signal {
                pid,
                signal: Signal::Kill,
            });
            if leader_running {
                self.emit(gen, EventKind::Killed { pid });
            } else {
                self.out
                    .push(Effect::Note(Note::KillingLeftovers { gen, pid }));
            }
        }
        if matches!(
            &self.upgrade,
            Some(Upgrade { phase: UpgradePhase::Reporting { at, .. }, .. }) if now >= *at
        ) {
            self.finish_report();
        }
    }

    /// Forgets the oldest finished generations beyond [`FINISHED_KEPT`].
    fn prune(&mut self) {
        let mut finished: Vec<(Time, GenId)> = self
            .gens
            .values()
            .filter_map(|g| match g.phase {
                Phase::Finished { at, .. } => Some((at, g.id)),
                _ => None,
            })
            .collect();
        if finished.len() > FINISHED_KEPT {
            finished.sort();
            for (_, gen) in &finished[..finished.len() - FINISHED_KEPT] {
                self.gens.remove(gen);
            }
        }
    }
}
