//! The lifecycle state machine: every decision about generations,
//! upgrades, readiness, traffic, cutover, bake, rollback, drain, crash
//! restarts and stop.
//!
//! The shell feeds [`Input`]s with the time they happened and performs the
//! [`Effect`]s it gets back, in order; it asks [`Machine::poll_timeout`]
//! when to call again with [`Input::Tick`]. Nothing here reads a clock,
//! touches a process or waits.
//!
//! An upgrade, with steered traffic:
//! 1. the candidate starts dark: only baton's probes reach it;
//! 2. once ready, it takes a canary share (and waits for promote), or all
//!    new connections;
//! 3. the previous generation stays parked for the bake window, ready to
//!    take the traffic back at once (rollback by request, or automatically
//!    if the new one dies or fails its health checks);
//! 4. a generation that no longer gets connections is *retired*: it keeps
//!    accepting what already waits in its sockets, and is drained once
//!    they are empty, so nothing queued is lost.
//!
//! With one shared socket there is nothing to steer: the candidate serves
//! from its first accept(), there is no canary or bake, and an old
//! generation is drained at cutover.
//!
//! Without overlap (an app that cannot run twice), an upgrade drains the
//! serving generation first; the candidate owns the sockets (and what
//! queues in them) from the start, and starts once no other generation has
//! a process left. If it fails before it is ready, the previous release is
//! started again the same way, as a new generation.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::io::{
    Command, Effect, Event, EventKind, Failure, Input, Note, Refusal, Reply, RequestId, UpgradeRef,
    Via,
};
use crate::state::{Check, Generation, Phase, Proc, Upgrade, UpgradePhase, Worker, WorkerRecord};
use crate::traffic::{Candidate, TrafficPlan};
use crate::types::{
    CpuPriority, ExitStatus, GenId, Overlap, Pid, Readiness, Release, Report, Settings, Signal,
    Spec, Time, TrafficMode, Trigger, UpgradeOptions,
};

/// Finished generations kept for `status`; older ones are forgotten so
/// memory stays flat across any number of upgrades.
pub const FINISHED_KEPT: usize = 8;
/// Successful releases remembered for rollback.
pub const RELEASES_KEPT: usize = 16;
/// How long a failure report waits for a dead candidate's last stderr
/// lines (a grandchild may hold its stderr open forever).
pub const STDERR_GRACE: Duration = Duration::from_millis(200);
/// How long a retiring generation may take to accept what waits in its
/// sockets before it is drained regardless (an app that stopped accepting
/// would otherwise hold it forever).
pub const RETIRE_WAIT: Duration = Duration::from_secs(5);

/// Why an upgrade cannot start a generation.
enum Unstartable {
    Refused(Refusal),
    Unresolved(String),
}

/// The supervisor's state. `P` is the shell's per-generation payload.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Machine<P> {
    mode: TrafficMode,
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
    #[cfg_attr(feature = "serde", serde(skip))]
    out: Vec<Effect>,
}

impl<P: Clone> Machine<P> {
    pub fn new(mode: TrafficMode) -> Self {
        Self {
            mode,
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

    pub fn mode(&self) -> TrafficMode {
        self.mode
    }

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

    /// The release a cold `rollback` starts: the previous successful one.
    pub fn rollback_release(&self) -> Option<&Release> {
        self.releases
            .len()
            .checked_sub(2)
            .and_then(|i| self.releases.get(i))
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
            && self.gens.values().all(|g| g.spawning().is_empty())
    }

    /// The earliest time at which [`Input::Tick`] has something to do.
    pub fn poll_timeout(&self) -> Option<Time> {
        let gens = self.gens.values().flat_map(|g| {
            let mut times = Vec::new();
            match &g.phase {
                Phase::Starting { workers, .. } | Phase::Serving { workers } => {
                    for w in workers {
                        match *w {
                            Worker::Starting {
                                deadline, check, ..
                            } => times.push(match check {
                                Check::Delay { at } => at.min(deadline),
                                _ => deadline,
                            }),
                            Worker::Restarting { at } => times.push(at),
                            _ => {}
                        }
                    }
                }
                Phase::Retiring { until, .. } => times.push(*until),
                _ => {}
            }
            times
        });
        let kills = self
            .procs
            .values()
            .filter(|p| !p.killed)
            .filter_map(|p| p.kill_at);
        let upgrade = self.upgrade.as_ref().and_then(|u| match u.phase {
            UpgradePhase::Reporting { at, .. } => Some(at),
            UpgradePhase::Canary { promote_at, .. } => promote_at,
            UpgradePhase::Baking { until, .. } => Some(until),
            UpgradePhase::Starting
            | UpgradePhase::Raising { .. }
            | UpgradePhase::Replacing { .. }
            | UpgradePhase::Restoring { .. } => None,
        });
        gens.chain(kills).chain(upgrade).min()
    }

    // ----- the step ----------------------------------------------------------

    /// Applies one input that happened at `now`; returns what to do.
    pub fn step(&mut self, input: Input<P>, now: Time) -> Vec<Effect> {
        // The clock never runs backwards, whatever the shell passes.
        self.now = self.now.max(now);
        match input {
            Input::Start { spec } => self.start(spec),
            Input::Command { id, command } => self.command(id, command),
            Input::Spawned { gen, worker, pid } => self.on_spawned(gen, worker, pid),
            Input::SpawnFailed { gen, worker, error } => self.on_spawn_failed(gen, worker, error),
            Input::Exited {
                pid,
                status,
                group_empty,
            } => self.on_exited(pid, status, group_empty),
            Input::GroupEmpty { pid } => self.on_group_empty(pid),
            Input::Probe { gen, pid, result } => self.on_probe(gen, pid, result),
            Input::Health { gen, pid, result } => self.on_health(gen, pid, result),
            Input::Notify { pid, pgid, reports } => self.on_notify(pid, pgid, reports),
            Input::StderrClosed { pid } => self.on_stderr_closed(pid),
            Input::PriorityRestored { gen, pid, restored } => {
                self.on_priority_restored(gen, pid, restored)
            }
            Input::QueueEmpty { gen } => {
                if matches!(
                    self.gens.get(&gen).map(|g| &g.phase),
                    Some(Phase::Retiring { .. })
                ) {
                    self.drain(gen, None);
                }
            }
            Input::Tick => self.on_tick(),
        }
        self.start_waiting();
        self.prune();
        std::mem::take(&mut self.out)
    }

    fn steered(&self) -> bool {
        self.mode == TrafficMode::Steered
    }

    fn emit(&mut self, gen: GenId, kind: EventKind) {
        let upgrade = self.gens.get(&gen).and_then(|g| g.upgrade);
        self.emit_in(gen, upgrade, kind);
    }

    fn emit_in(&mut self, gen: GenId, upgrade: Option<UpgradeRef>, kind: EventKind) {
        self.out.push(Effect::Event(Event { gen, upgrade, kind }));
    }

    fn publish_traffic(&mut self) {
        self.out.push(Effect::Traffic(self.traffic.clone()));
    }

    fn is_candidate(&self, gen: GenId) -> bool {
        self.upgrade.as_ref().is_some_and(|u| u.candidate == gen)
    }

    /// Asks for worker `worker` of `gen` at `priority`, which its record
    /// keeps for the process the answer brings.
    fn spawn_worker(&mut self, gen: GenId, worker: u32, priority: CpuPriority) {
        if let Some(r) = self
            .gens
            .get_mut(&gen)
            .and_then(|g| g.records.get_mut(worker as usize))
        {
            r.priority = priority;
        }
        self.out.push(Effect::Spawn {
            gen,
            worker,
            priority,
        });
    }

    /// The priority an upgrade's candidate starts at: its setting while
    /// another generation serves the clients (it would take CPU from
    /// them), the normal one when none does (it is what they wait for).
    fn candidate_priority(&self, gen: GenId) -> CpuPriority {
        let others_serve = self
            .gens
            .values()
            .any(|g| g.id != gen && matches!(g.phase, Phase::Serving { .. }));
        match self.gens.get(&gen) {
            Some(g) if others_serve => g.settings().candidate_priority,
            _ => CpuPriority::Normal,
        }
    }

    fn new_generation(&mut self, spec: Spec<P>, upgrade: Option<UpgradeRef>) -> GenId {
        let id = GenId(self.next_gen);
        self.next_gen += 1;
        let n = spec.settings.workers.max(1) as usize;
        let record = WorkerRecord {
            restarts: 0,
            backoff: Backoff::new(spec.settings.restart_backoff_max),
            last_exit: None,
            priority: CpuPriority::Normal,
        };
        self.gens.insert(
            id,
            Generation {
                id,
                spec,
                phase: Phase::Starting {
                    workers: vec![Worker::Spawning; n],
                    deadline: None,
                    probe: None,
                },
                upgrade,
                records: vec![record; n],
                status_text: None,
                last_exit: None,
                owns_sockets: true,
            },
        );
        id
    }

    /// Asks for every worker of a new generation, each at `priority`.
    fn spawn_all(&mut self, gen: GenId, priority: CpuPriority) {
        let n = self.gens.get(&gen).map_or(0, |g| g.records.len() as u32);
        for worker in 0..n {
            self.spawn_worker(gen, worker, priority);
        }
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
        self.traffic.active = Some(gen);
        self.publish_traffic();
        self.spawn_all(gen, CpuPriority::Normal);
    }

    fn command(&mut self, id: RequestId, command: Command<P>) {
        let reply = match command {
            Command::Upgrade {
                trigger,
                spec,
                options,
            } => {
                let alone = self.no_overlap(spec.as_ref().ok().map(|s| &s.settings));
                let bake = options.bake.is_some_and(|b| !b.is_zero());
                if alone && (options.canary.is_some() || bake) {
                    Reply::Refused(Refusal::NeedsOverlap)
                } else if options.canary.is_some() && !self.steered() {
                    Reply::Refused(Refusal::NeedsSteering)
                } else {
                    let spec = spec.map_err(Unstartable::Unresolved);
                    self.start_upgrade(trigger, spec, options)
                }
            }
            Command::Rollback => self.rollback(),
            Command::Promote => self.promote(),
            Command::Restart => self.restart_active(),
            Command::Stop => {
                self.stop();
                Reply::Stopping
            }
        };
        self.out.push(Effect::Reply { id, reply });
    }

    fn rollback(&mut self) -> Reply {
        if self.stopping {
            return Reply::Refused(Refusal::Stopping);
        }
        match self.upgrade.as_ref().map(|u| (u.candidate, &u.phase)) {
            // The upgrade in progress is abandoned: the traffic goes back
            // to where it was, at once.
            // Without overlap, before the candidate is ready: it is
            // abandoned and the previous release started again.
            Some((
                id,
                UpgradePhase::Starting
                | UpgradePhase::Raising { .. }
                | UpgradePhase::Canary { .. }
                | UpgradePhase::Replacing { .. },
            )) => {
                self.fail_upgrade(Failure::RolledBack, None);
                Reply::RolledBack(id)
            }
            Some((
                id,
                UpgradePhase::Baking {
                    parked: Some(_), ..
                },
            )) => {
                self.fail_upgrade(Failure::RolledBack, None);
                Reply::RolledBack(id)
            }
            Some((id, _)) => Reply::Refused(Refusal::Busy(id)),
            // A cold rollback: the previous successful release, started
            // and cut over to like any upgrade.
            None => {
                let prev = self.rollback_release().cloned();
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
                self.start_upgrade(Trigger::Rollback, spec, UpgradeOptions::default())
            }
        }
    }

    /// Drains the active generation's workers so that each is restarted
    /// (same release, same sockets) once it has exited.
    fn restart_active(&mut self) -> Reply {
        if self.stopping {
            return Reply::Refused(Refusal::Stopping);
        }
        let Some(gen) = self.traffic.active else {
            return Reply::Refused(Refusal::NothingToPromote);
        };
        // Workers restarting or being recycled already: their next
        // process gets the sockets as they are now.
        let running = self.accepting(gen);
        if running.is_empty() {
            return Reply::Restarting(gen);
        }
        self.stop_probe(gen);
        if let Some(workers) = self.gens.get_mut(&gen).and_then(Generation::workers_mut) {
            for &(i, pid) in &running {
                workers[i as usize] = Worker::Recycling { pid };
            }
        }
        self.settle(gen);
        self.out.push(Effect::Note(Note::RestartRequested { gen }));
        for (_, pid) in running {
            self.signal_drain(gen, pid);
        }
        Reply::Restarting(gen)
    }

    fn promote(&mut self) -> Reply {
        let Some(up) = &self.upgrade else {
            return Reply::Refused(Refusal::NothingToPromote);
        };
        let id = up.candidate;
        match up.phase {
            UpgradePhase::Canary { .. } => {
                if let Some(&(_, pid)) = self.accepting(id).first() {
                    self.stop_health(id);
                    self.cutover(id, pid);
                }
                Reply::Promoting(id)
            }
            UpgradePhase::Baking { .. } => {
                self.end_bake();
                Reply::Promoting(id)
            }
            _ => Reply::Refused(Refusal::NothingToPromote),
        }
    }

    fn start_upgrade(
        &mut self,
        trigger: Trigger,
        spec: Result<Spec<P>, Unstartable>,
        options: UpgradeOptions,
    ) -> Reply {
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
                let failed = EventKind::UpgradeFailed {
                    failure,
                    worker: None,
                };
                self.emit_in(gen, up, failed);
                self.after_upgrade();
                return Reply::Upgrading(gen);
            }
        };
        let replacing = self
            .no_overlap(Some(&spec.settings))
            .then_some(self.traffic.active)
            .flatten();
        let gen = self.new_generation(spec, Some(up_ref));
        if let Some(previous) = replacing {
            // The app cannot run twice: the generation serving now drains
            // first; the candidate takes its sockets and its traffic at once
            // (connections queue for it) and starts once nothing else runs.
            if let Some(g) = self.gens.get_mut(&gen) {
                g.phase = Phase::Waiting;
            }
            self.upgrade = Some(Upgrade {
                candidate: gen,
                started,
                trigger,
                options,
                phase: UpgradePhase::Replacing { previous },
            });
            self.emit(gen, EventKind::Requested { trigger });
            self.hand_over(previous, gen);
            self.drain(previous, Some(up_ref));
            return Reply::Upgrading(gen);
        }
        let priority = self.candidate_priority(gen);
        self.upgrade = Some(Upgrade {
            candidate: gen,
            started,
            trigger,
            options,
            phase: UpgradePhase::Starting,
        });
        self.emit(gen, EventKind::Requested { trigger });
        // Every worker at the same priority: the candidate is lowered as
        // a whole, and gets the normal priority back as a whole.
        self.spawn_all(gen, priority);
        if self.steered() {
            // Dark: only baton's probes reach it until it is ready.
            self.traffic.candidate = Some(Candidate { gen, share: 0 });
            self.publish_traffic();
        }
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
        if let Some(up) = self.upgrade.take() {
            let (failure, worker) = match &up.phase {
                UpgradePhase::Reporting {
                    failure, worker, ..
                } => (failure.clone(), Some(*worker)),
                UpgradePhase::Restoring {
                    failure, worker, ..
                } => (failure.clone(), *worker),
                _ => (Failure::Stopping, None),
            };
            if matches!(
                up.phase,
                UpgradePhase::Canary { .. } | UpgradePhase::Baking { .. }
            ) {
                self.stop_health(up.candidate);
            }
            self.emit_in(
                up.candidate,
                Some(up.as_ref()),
                EventKind::UpgradeFailed { failure, worker },
            );
        }
        self.traffic.candidate = None;
        self.traffic.parked = None;
        let all: Vec<GenId> = self.gens.keys().copied().collect();
        for gen in all {
            self.drain(gen, None);
        }
    }

    // ----- processes ---------------------------------------------------------

    fn on_spawned(&mut self, gen: GenId, worker: u32, pid: Pid) {
        // It runs at what its spawn asked for.
        let priority = self
            .gens
            .get(&gen)
            .and_then(|g| g.records.get(worker as usize))
            .map_or(CpuPriority::Normal, |r| r.priority);
        self.procs.insert(
            pid,
            Proc {
                gen,
                worker,
                started: self.now,
                exit: None,
                kill_at: None,
                killed: false,
                priority,
            },
        );
        let now = self.now;
        let Some(g) = self.gens.get_mut(&gen) else {
            // Generations with a spawn outstanding are never forgotten, so
            // this cannot happen; if it did, the process must not run on.
            if let Some(p) = self.procs.get_mut(&pid) {
                p.kill_at = Some(now);
            }
            return;
        };
        let settings = *g.settings();
        let check = match settings.readiness {
            Readiness::Notify => Check::Notify,
            Readiness::Probe => Check::Probe,
            Readiness::Delay(d) => Check::Delay { at: now + d },
        };
        let i = worker as usize;
        match &mut g.phase {
            Phase::Starting {
                workers, deadline, ..
            } if workers.get(i) == Some(&Worker::Spawning) => {
                if deadline.is_none() {
                    // A fresh start: what the previous processes said is
                    // no longer true.
                    g.status_text = None;
                }
                let deadline = *deadline.get_or_insert(now + settings.ready_timeout);
                workers[i] = Worker::Starting {
                    pid,
                    deadline,
                    check,
                };
                self.emit(gen, EventKind::Spawned { pid, worker });
                if check == Check::Probe {
                    self.maybe_start_probe(gen, pid);
                }
            }
            Phase::Serving { workers } if workers.get(i) == Some(&Worker::Spawning) => {
                // Restarted alone while the others serve.
                if check == Check::Probe {
                    workers[i] = Worker::Up { pid };
                    self.emit(gen, EventKind::Spawned { pid, worker });
                    let via = Via::Running;
                    self.emit(gen, EventKind::WorkerReady { worker, pid, via });
                } else {
                    let deadline = now + settings.ready_timeout;
                    workers[i] = Worker::Starting {
                        pid,
                        deadline,
                        check,
                    };
                    self.emit(gen, EventKind::Spawned { pid, worker });
                }
            }
            Phase::Retiring { spawning, .. } | Phase::Draining { spawning, .. }
                if spawning.contains(&worker) =>
            {
                // Drained (stop, cutover) while it was being started.
                spawning.retain(|w| *w != worker);
                self.emit(gen, EventKind::Spawned { pid, worker });
                self.signal_drain(gen, pid);
            }
            _ => {
                // No spawn was outstanding: drain the stray process.
                self.emit(gen, EventKind::Spawned { pid, worker });
                self.signal_drain(gen, pid);
            }
        }
        self.end_restore(gen);
    }

    /// Starts the generation's readiness check once every worker runs:
    /// `pid`, the last to start, names this run of it.
    fn maybe_start_probe(&mut self, gen: GenId, pid: Pid) {
        let Some(Phase::Starting { workers, probe, .. }) =
            self.gens.get_mut(&gen).map(|g| &mut g.phase)
        else {
            return;
        };
        let all_run = workers.iter().all(|w| {
            matches!(
                w,
                Worker::Starting {
                    check: Check::Probe,
                    ..
                }
            )
        });
        if all_run && probe.is_none() {
            *probe = Some(pid);
            self.out.push(Effect::StartProbe { gen, pid });
        }
    }

    /// Abandons `gen`'s readiness check, if one runs.
    fn stop_probe(&mut self, gen: GenId) {
        if let Some(Phase::Starting { probe, .. }) = self.gens.get_mut(&gen).map(|g| &mut g.phase) {
            if probe.take().is_some() {
                self.out.push(Effect::StopProbe { gen });
            }
        }
    }

    fn on_spawn_failed(&mut self, gen: GenId, worker: u32, error: String) {
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        match &mut g.phase {
            Phase::Starting { workers, .. } | Phase::Serving { workers }
                if workers.get(worker as usize) == Some(&Worker::Spawning) =>
            {
                self.emit(
                    gen,
                    EventKind::SpawnFailed {
                        error: error.clone(),
                    },
                );
                // The active generation restarts its workers, also a
                // candidate baking with nothing parked to go back to; not
                // one replacing another (without overlap), which has the
                // traffic before it was ever ready: it fails.
                let candidate = self.is_candidate(gen);
                let replacing = candidate
                    && matches!(
                        self.upgrade.as_ref().map(|u| &u.phase),
                        Some(UpgradePhase::Replacing { .. })
                    );
                if self.traffic.active == Some(gen) && !self.stopping && !replacing {
                    self.restart_worker(gen, worker, Duration::ZERO);
                } else {
                    // Answered: nothing of this worker runs or will.
                    self.drain(gen, None);
                    if let Some(Phase::Draining { spawning, .. }) =
                        self.gens.get_mut(&gen).map(|g| &mut g.phase)
                    {
                        spawning.retain(|w| *w != worker);
                    }
                    if candidate {
                        self.fail_upgrade(Failure::Spawn(error), None);
                    } else {
                        self.end(gen, Some(Failure::Spawn(error)));
                    }
                }
            }
            Phase::Retiring { spawning, .. } | Phase::Draining { spawning, .. }
                if spawning.contains(&worker) =>
            {
                spawning.retain(|w| *w != worker);
                self.emit(gen, EventKind::SpawnFailed { error });
                self.maybe_finish(gen);
            }
            _ => {}
        }
        self.end_restore(gen);
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
        let (gen, worker) = (proc.gen, proc.worker);
        let (uptime, drained) = (now.since(proc.started), proc.kill_at.is_some());
        if let Some(g) = self.gens.get_mut(&gen) {
            g.last_exit = Some(status);
            if let Some(r) = g.records.get_mut(worker as usize) {
                r.last_exit = Some(status);
            }
        }
        self.emit(
            gen,
            EventKind::Exited {
                pid,
                worker,
                status,
            },
        );
        if group_empty {
            self.release(pid);
        } else if !drained {
            // Its own children may outlive it: unless a drain already
            // covers them, they are drained like any worker.
            self.out
                .push(Effect::Note(Note::GroupOutlivesLeader { gen, pid }));
            self.signal_group(gen, pid);
        }

        let Some(g) = self.gens.get(&gen) else {
            return;
        };
        if g.worker_pid(worker) != Some(pid) {
            // An older process of this generation, or one of a generation
            // that restarts nothing any more. A retiring generation with no
            // process left to accept what waits is drained.
            if matches!(g.phase, Phase::Retiring { .. }) && self.accepting_procs(gen) == 0 {
                self.end(gen, None);
            } else {
                self.maybe_finish(gen);
            }
            return;
        }
        let was_starting = matches!(g.phase, Phase::Starting { .. });
        let recycled = matches!(
            g.workers().and_then(|w| w.get(worker as usize)),
            Some(Worker::Recycling { .. })
        );
        let upgrade_phase = self
            .upgrade
            .as_ref()
            .filter(|u| u.candidate == gen)
            .map(|u| u.phase.clone());
        let dead = Some((pid, worker));
        match upgrade_phase {
            // Report once its last stderr lines are in (a bounded wait);
            // the process is gone, so nothing can promote it meanwhile.
            Some(UpgradePhase::Starting | UpgradePhase::Raising { .. }) => {
                self.fail_upgrade(Failure::Exited(status), dead)
            }
            // Without overlap: a start that failed brings the previous
            // release back. A worker drained on request (its socket was
            // replaced) is restarted, the candidate being the active
            // generation already.
            Some(UpgradePhase::Replacing { .. }) if !recycled => {
                self.fail_upgrade(Failure::Exited(status), dead)
            }
            Some(UpgradePhase::Replacing { .. }) => self.restart_worker(gen, worker, uptime),
            // After it served: the traffic goes back where it was.
            Some(UpgradePhase::Canary { .. })
            | Some(UpgradePhase::Baking {
                parked: Some(_), ..
            }) => self.fail_upgrade(Failure::Died(status), dead),
            // Active, with nothing parked to go back to: restarted.
            Some(UpgradePhase::Baking { parked: None, .. }) => {
                self.restart_worker(gen, worker, uptime)
            }
            Some(UpgradePhase::Reporting { .. } | UpgradePhase::Restoring { .. }) => {
                self.end(gen, None)
            }
            None if self.traffic.active == Some(gen) && !self.stopping => {
                self.restart_worker(gen, worker, uptime);
            }
            None if self.traffic.parked == Some(gen) => {
                // A parked generation is a way back to exactly what served
                // before: one that lost a worker is no longer that, and
                // nothing restarts old code that serves nobody.
                self.traffic.parked = None;
                if let Some(Upgrade {
                    phase: UpgradePhase::Baking { parked, .. },
                    ..
                }) = &mut self.upgrade
                {
                    *parked = None;
                }
                self.out.push(Effect::Note(Note::ParkedExited { gen }));
                self.publish_traffic();
                self.end(gen, None);
            }
            None => {
                let failure = (was_starting && self.traffic.active != Some(gen))
                    .then_some(Failure::Exited(status));
                self.end(gen, failure);
            }
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

    /// Restarts worker `worker` of the active generation, whose process
    /// ran for `uptime`, alone and with its own backoff. A readiness check
    /// in progress counted on it, so it is abandoned.
    fn restart_worker(&mut self, gen: GenId, worker: u32, uptime: Duration) {
        self.stop_probe(gen);
        let now = self.now;
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        let Some(record) = g.records.get_mut(worker as usize) else {
            return;
        };
        let delay = record.backoff.on_exit(uptime);
        record.restarts += 1;
        let restarts = record.restarts;
        let Some(slot) = g.workers_mut().and_then(|w| w.get_mut(worker as usize)) else {
            return;
        };
        *slot = Worker::Restarting { at: now + delay };
        self.settle(gen);
        self.emit(
            gen,
            EventKind::Restarting {
                worker,
                delay,
                restarts,
            },
        );
    }

    /// Keeps a generation's phase true to its workers: one serving with no
    /// ready worker left is starting again (and announces itself ready
    /// once all are); a start with no worker running yet has no deadline.
    fn settle(&mut self, gen: GenId) {
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        match &mut g.phase {
            Phase::Serving { workers }
                if !workers.iter().any(|w| matches!(w, Worker::Up { .. })) =>
            {
                g.phase = Phase::Starting {
                    workers: std::mem::take(workers),
                    deadline: None,
                    probe: None,
                };
            }
            Phase::Starting {
                workers, deadline, ..
            } if !workers
                .iter()
                .any(|w| matches!(w, Worker::Spawning | Worker::Starting { .. })) =>
            {
                *deadline = None;
            }
            _ => {}
        }
    }

    /// The running, accepting (starting or ready) workers of `gen` while
    /// it starts or serves, by index. A worker whose exit is being handled
    /// is not among them.
    fn accepting(&self, gen: GenId) -> Vec<(u32, Pid)> {
        let Some(workers) = self.gens.get(&gen).and_then(Generation::workers) else {
            return Vec::new();
        };
        (0..)
            .zip(workers)
            .filter_map(|(i, w)| match *w {
                Worker::Starting { pid, .. } | Worker::Up { pid } => Some((i, pid)),
                _ => None,
            })
            .filter(|(_, pid)| self.running(*pid))
            .collect()
    }

    /// Processes of `gen` still running that were never told to drain.
    fn accepting_procs(&self, gen: GenId) -> usize {
        self.procs
            .values()
            .filter(|p| p.gen == gen && p.exit.is_none() && p.kill_at.is_none())
            .count()
    }

    /// The running processes of `gen`, by worker.
    fn running_procs(&self, gen: GenId) -> Vec<Pid> {
        let mut pids: Vec<(u32, Pid)> = self
            .procs
            .iter()
            .filter(|(_, p)| p.gen == gen && p.exit.is_none())
            .map(|(pid, p)| (p.worker, *pid))
            .collect();
        pids.sort();
        pids.into_iter().map(|(_, pid)| pid).collect()
    }

    // ----- readiness and health ----------------------------------------------

    fn on_probe(&mut self, gen: GenId, pid: Pid, result: Result<String, String>) {
        let current = self
            .gens
            .get(&gen)
            .is_some_and(|g| matches!(g.phase, Phase::Starting { probe: Some(p), .. } if p == pid));
        if !current || !self.running(pid) {
            return;
        }
        match result {
            Ok(via) => {
                // The generation answered: every worker counts as ready.
                if let Some(workers) = self.gens.get_mut(&gen).and_then(Generation::workers_mut) {
                    for w in workers.iter_mut() {
                        if let Worker::Starting { pid, .. } = *w {
                            *w = Worker::Up { pid };
                        }
                    }
                }
                self.ready(gen, pid, Via::Probe(via));
            }
            Err(reason) => self.not_ready(gen, Failure::Check(reason)),
        }
    }

    fn on_health(&mut self, gen: GenId, _pid: Pid, result: Result<String, String>) {
        // A check of the generation, whichever worker answered it.
        let current = matches!(
            self.gens.get(&gen).map(|g| &g.phase),
            Some(Phase::Serving { .. })
        );
        let threshold = self
            .gens
            .get(&gen)
            .and_then(|g| g.settings().health)
            .map_or(u32::MAX, |h| h.failures.max(1));
        let Some(up) = self.upgrade.as_mut().filter(|u| u.candidate == gen) else {
            return;
        };
        let (failures, can_roll_back) = match &mut up.phase {
            UpgradePhase::Canary { failures, .. } => (failures, true),
            UpgradePhase::Baking {
                failures, parked, ..
            } => {
                let back = parked.is_some();
                (failures, back)
            }
            _ => return,
        };
        if !current {
            return;
        }
        match result {
            Ok(_) => *failures = 0,
            Err(reason) => {
                *failures += 1;
                let n = *failures;
                self.out.push(Effect::Note(Note::HealthFailed {
                    gen,
                    failures: n,
                    reason: reason.clone(),
                }));
                if n >= threshold && can_roll_back {
                    self.fail_upgrade(Failure::Unhealthy(reason), None);
                }
            }
        }
    }

    fn on_notify(&mut self, pid: Pid, pgid: Option<Pid>, reports: Vec<Report>) {
        // A process counts for the worker whose running process it is, or
        // whose group it belongs to; never by anything it says.
        let leader = [Some(pid), pgid]
            .into_iter()
            .flatten()
            .find(|p| self.running(*p));
        let Some(leader) = leader else {
            self.out
                .push(Effect::Note(Note::NotifyFromStranger { pid }));
            return;
        };
        let (gen, worker) = (self.procs[&leader].gen, self.procs[&leader].worker);
        for report in reports {
            match report {
                Report::Ready => {
                    let waiting = self.gens.get(&gen).and_then(Generation::workers).is_some_and(|w| {
                        matches!(w.get(worker as usize), Some(Worker::Starting { pid: p, check: Check::Notify, .. }) if *p == leader)
                    });
                    if waiting {
                        self.worker_ready(gen, worker, leader, Via::Notify { from: pid });
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

    /// Worker `worker` of `gen` passed its own check (notify, delay). The
    /// generation is ready once every worker is; a worker restarted alone
    /// just serves again.
    fn worker_ready(&mut self, gen: GenId, worker: u32, pid: Pid, via: Via) {
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        let Some(slot) = g.workers_mut().and_then(|w| w.get_mut(worker as usize)) else {
            return;
        };
        *slot = Worker::Up { pid };
        match &g.phase {
            Phase::Starting { workers, .. } => {
                if workers.iter().all(|w| matches!(w, Worker::Up { .. })) {
                    self.ready(gen, pid, via);
                }
            }
            _ => self.emit(gen, EventKind::WorkerReady { worker, pid, via }),
        }
    }

    /// Every worker of `gen` is ready, `pid` the last of them.
    fn ready(&mut self, gen: GenId, pid: Pid, via: Via) {
        self.stop_probe(gen);
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        let Phase::Starting { workers, .. } = &mut g.phase else {
            return;
        };
        g.phase = Phase::Serving {
            workers: std::mem::take(workers),
        };
        let health = g.settings().health.is_some();
        self.emit(gen, EventKind::Ready { pid, via });
        // A candidate becoming ready for the first time (not one restarted
        // during its bake, which is already active).
        let first_ready = self
            .upgrade
            .as_ref()
            .is_some_and(|u| u.candidate == gen && u.phase == UpgradePhase::Starting);
        let replaced = self.upgrade.as_ref().is_some_and(|u| {
            u.candidate == gen && matches!(u.phase, UpgradePhase::Replacing { .. })
        });
        if replaced {
            // Without overlap the candidate has owned the traffic since the
            // upgrade began, and nothing else runs: it has taken over.
            self.emit(gen, EventKind::Active { pid });
            self.succeed();
        } else if first_ready {
            let lowered = self.lowered_workers(gen);
            if lowered.is_empty() {
                self.take_traffic(gen, pid, health);
            } else {
                // Back to full speed, every worker, before the first client
                // reaches any: the traffic moves once the shell has
                // answered for each.
                if let Some(up) = self.upgrade.as_mut() {
                    up.phase = UpgradePhase::Raising {
                        pid,
                        pending: lowered.iter().map(|&(_, p, _)| p).collect(),
                    };
                }
                for (worker, pid, from) in lowered {
                    self.out.push(Effect::RestorePriority {
                        gen,
                        worker,
                        pid,
                        from,
                    });
                }
            }
        } else if self.traffic.active == Some(gen) {
            // First start, or the active generation whole again.
            self.emit(gen, EventKind::Active { pid });
            let release = self.gens[&gen].spec.release.clone();
            if self.upgrade.is_none() {
                self.remember_release(release);
            }
        } else {
            // Nobody wants it any more.
            self.drain(gen, None);
        }
    }

    /// The running workers of `gen` at a lowered CPU priority, by index:
    /// worker, process, and the priority it runs at.
    fn lowered_workers(&self, gen: GenId) -> Vec<(u32, Pid, CpuPriority)> {
        let Some(workers) = self.gens.get(&gen).and_then(Generation::workers) else {
            return Vec::new();
        };
        (0..)
            .zip(workers)
            .filter_map(|(i, w)| {
                let pid = w.pid()?;
                let p = self.procs.get(&pid).filter(|p| p.exit.is_none())?;
                (p.priority != CpuPriority::Normal).then_some((i, pid, p.priority))
            })
            .collect()
    }

    /// The ready candidate takes traffic: a canary share, or all of it.
    /// `pid`: the worker that made it ready.
    fn take_traffic(&mut self, gen: GenId, pid: Pid, health: bool) {
        let options = self.upgrade.as_ref().map(|u| u.options).unwrap_or_default();
        match options.canary {
            Some(share) if self.steered() => {
                let promote_at = options.canary_for.map(|d| self.now + d);
                if let Some(up) = self.upgrade.as_mut() {
                    up.phase = UpgradePhase::Canary {
                        share,
                        promote_at,
                        failures: 0,
                    };
                }
                self.traffic.candidate = Some(Candidate { gen, share });
                self.publish_traffic();
                self.emit(gen, EventKind::CanaryStarted { share });
                if health {
                    self.out.push(Effect::StartHealth { gen, pid });
                }
            }
            _ => self.cutover(gen, pid),
        }
    }

    /// The shell has restored (or failed to restore) the CPU priority of
    /// the group led by `pid`, a worker of `gen`. A candidate waiting for
    /// it takes the traffic once it has heard about every worker started
    /// lower, restored or not: a slower app beats a failed upgrade.
    fn on_priority_restored(&mut self, gen: GenId, pid: Pid, restored: bool) {
        let Some(proc) = self.procs.get_mut(&pid).filter(|p| p.gen == gen) else {
            // Not a process of that generation (or one long gone).
            return;
        };
        // Not restored: the shell has logged why, and status keeps showing
        // the lowered priority.
        if restored {
            proc.priority = CpuPriority::Normal;
        }
        let Some(Upgrade {
            candidate,
            phase:
                UpgradePhase::Raising {
                    pid: ready,
                    pending,
                },
            ..
        }) = self.upgrade.as_mut()
        else {
            return;
        };
        if *candidate != gen || !pending.contains(&pid) {
            return;
        }
        pending.retain(|p| *p != pid);
        if !pending.is_empty() {
            return;
        }
        let ready = *ready;
        // Every worker still runs (an exit during the restore fails the
        // upgrade), so the generation still serves; checked all the same.
        let serving = matches!(
            self.gens.get(&gen).map(|g| &g.phase),
            Some(Phase::Serving { .. })
        );
        if serving && self.running(ready) {
            let health = self
                .gens
                .get(&gen)
                .is_some_and(|g| g.settings().health.is_some());
            self.take_traffic(gen, ready, health);
        }
    }

    /// `gen`, starting, did not become ready (its workers' deadline, or the
    /// generation's check said no).
    fn not_ready(&mut self, gen: GenId, failure: Failure) {
        let Some(Phase::Starting { .. }) = self.gens.get(&gen).map(|g| &g.phase) else {
            return;
        };
        if self.is_candidate(gen) {
            self.fail_upgrade(failure, None);
        } else if self.traffic.active == Some(gen) && !self.stopping {
            // The workers not ready are drained; each exit restarts one
            // with backoff.
            self.stop_probe(gen);
            let stuck: Vec<(u32, Pid)> = self
                .accepting(gen)
                .into_iter()
                .filter(|(i, _)| {
                    !matches!(
                        self.gens[&gen].workers().and_then(|w| w.get(*i as usize)),
                        Some(Worker::Up { .. })
                    )
                })
                .collect();
            if let Some(Phase::Starting {
                workers, deadline, ..
            }) = self.gens.get_mut(&gen).map(|g| &mut g.phase)
            {
                for &(i, pid) in &stuck {
                    workers[i as usize] = Worker::Recycling { pid };
                }
                // The next worker to run starts a new deadline.
                *deadline = None;
            }
            self.out
                .push(Effect::Note(Note::Recycling { gen, failure }));
            for (_, pid) in stuck {
                self.signal_drain(gen, pid);
            }
        } else {
            self.end(gen, Some(failure));
        }
    }

    /// A worker restarted alone was not ready by its deadline: drained,
    /// and restarted with backoff once it has exited.
    fn recycle_worker(&mut self, gen: GenId, worker: u32, failure: Failure) {
        let Some(slot) = self
            .gens
            .get_mut(&gen)
            .and_then(Generation::workers_mut)
            .and_then(|w| w.get_mut(worker as usize))
        else {
            return;
        };
        let Worker::Starting { pid, .. } = *slot else {
            return;
        };
        *slot = Worker::Recycling { pid };
        self.out
            .push(Effect::Note(Note::Recycling { gen, failure }));
        self.signal_drain(gen, pid);
    }

    // ----- cutover, bake, rollback -------------------------------------------

    /// The candidate takes the traffic. With a bake window (steered), the
    /// previous generation is parked and the upgrade waits it out; every
    /// other older generation is retired.
    fn cutover(&mut self, gen: GenId, pid: Pid) {
        let Some(up) = &self.upgrade else {
            return;
        };
        let up_ref = up.as_ref();
        let bake = match (self.steered(), up.options.bake) {
            (false, _) => Duration::ZERO,
            (true, Some(b)) => b,
            (true, None) => self
                .gens
                .get(&gen)
                .map_or(Duration::ZERO, |g| g.settings().bake),
        };
        // Only a whole generation (every worker ready) is parked: one that
        // is restarting a worker is no longer exactly what served, like a
        // parked one that loses a worker.
        let previous = self.traffic.active.filter(|a| {
            *a != gen
                && matches!(
                    self.gens.get(a).map(|g| &g.phase),
                    Some(Phase::Serving { workers })
                        if workers.iter().all(|w| matches!(w, Worker::Up { .. }))
                )
        });
        let parked = previous.filter(|_| !bake.is_zero());
        self.traffic.active = Some(gen);
        self.traffic.candidate = None;
        self.traffic.parked = parked;
        self.publish_traffic();
        self.emit(gen, EventKind::Active { pid });
        let older: Vec<GenId> = self
            .gens
            .keys()
            .copied()
            .filter(|g| *g != gen && Some(*g) != parked)
            .collect();
        for old in older {
            self.retire(old, Some(up_ref), None);
        }
        match parked {
            Some(parked) => {
                let health = self
                    .gens
                    .get(&gen)
                    .is_some_and(|g| g.settings().health.is_some());
                if let Some(up) = self.upgrade.as_mut() {
                    up.phase = UpgradePhase::Baking {
                        parked: Some(parked),
                        until: self.now + bake,
                        failures: 0,
                    };
                }
                self.emit(gen, EventKind::BakeStarted { parked, bake });
                if health {
                    self.out.push(Effect::StartHealth { gen, pid });
                }
            }
            None => self.succeed(),
        }
    }

    /// The bake is over (its time, or a promote): the parked generation is
    /// retired and the upgrade has succeeded.
    fn end_bake(&mut self) {
        let Some(Upgrade {
            phase: UpgradePhase::Baking { parked, .. },
            ..
        }) = &self.upgrade
        else {
            return;
        };
        let up_ref = self.upgrade.as_ref().map(Upgrade::as_ref);
        if let Some(parked) = *parked {
            self.traffic.parked = None;
            self.publish_traffic();
            self.retire(parked, up_ref, None);
        }
        if let Some(up) = up_ref {
            self.stop_health(up.id);
        }
        self.succeed();
    }

    /// Stops `gen`'s health checks, if it has any (they run during its
    /// canary and bake).
    fn stop_health(&mut self, gen: GenId) {
        if self
            .gens
            .get(&gen)
            .is_some_and(|g| g.settings().health.is_some())
        {
            self.out.push(Effect::StopHealth { gen });
        }
    }

    /// The upgrade in progress has succeeded.
    fn succeed(&mut self) {
        let Some(up) = self.upgrade.take() else {
            return;
        };
        let gen = up.candidate;
        if up.trigger == Trigger::Rollback {
            self.releases.pop();
        } else if let Some(g) = self.gens.get(&gen) {
            let release = g.spec.release.clone();
            self.remember_release(release);
        }
        self.emit_in(gen, Some(up.as_ref()), EventKind::UpgradeSucceeded);
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

    /// Abandons the upgrade in progress. The traffic goes back first (to
    /// the parked generation during a bake, off the candidate during a
    /// canary), then the candidate is retired (if it served) or drained,
    /// and the failure is reported: now, or, when a worker of the
    /// candidate died (`dead`), once that process's stderr has ended.
    fn fail_upgrade(&mut self, failure: Failure, dead: Option<(Pid, u32)>) {
        let Some(up) = &self.upgrade else {
            return;
        };
        let (gen, up_ref, phase) = (up.candidate, up.as_ref(), up.phase.clone());
        if let UpgradePhase::Replacing { previous } = phase {
            self.restore(previous, failure, dead.map(|(_, worker)| worker));
            return;
        }
        let served = match phase {
            UpgradePhase::Baking {
                parked: Some(parked),
                ..
            } => {
                self.traffic.active = Some(parked);
                self.traffic.parked = None;
                self.publish_traffic();
                let to = parked;
                let f = failure.clone();
                self.emit_in(gen, Some(up_ref), EventKind::RolledBack { to, failure: f });
                self.stop_health(gen);
                true
            }
            UpgradePhase::Canary { .. } => {
                self.traffic.candidate = None;
                self.publish_traffic();
                if let Some(to) = self.traffic.active {
                    let f = failure.clone();
                    self.emit_in(gen, Some(up_ref), EventKind::RolledBack { to, failure: f });
                }
                self.stop_health(gen);
                true
            }
            UpgradePhase::Starting | UpgradePhase::Raising { .. } => {
                if self.traffic.candidate.is_some_and(|c| c.gen == gen) {
                    self.traffic.candidate = None;
                    self.publish_traffic();
                }
                false
            }
            UpgradePhase::Baking { parked: None, .. }
            | UpgradePhase::Reporting { .. }
            | UpgradePhase::Replacing { .. }
            | UpgradePhase::Restoring { .. } => false,
        };
        // Drained first, so the outcome follows the drain it caused.
        if served {
            self.retire(gen, None, Some(failure.clone()));
        } else {
            self.end(gen, Some(failure.clone()));
        }
        let at = self.now + STDERR_GRACE;
        match (dead, self.upgrade.as_mut()) {
            (Some((pid, worker)), Some(up)) if !self.stopping => {
                up.phase = UpgradePhase::Reporting {
                    failure,
                    pid,
                    worker,
                    at,
                };
            }
            _ => {
                let up = self.upgrade.take().map(|u| u.as_ref());
                let worker = None;
                self.emit_in(gen, up, EventKind::UpgradeFailed { failure, worker });
                self.after_upgrade();
            }
        }
    }

    fn finish_report(&mut self) {
        let Some(Upgrade {
            phase: UpgradePhase::Reporting {
                failure, worker, ..
            },
            ..
        }) = &self.upgrade
        else {
            return;
        };
        let (failure, worker) = (failure.clone(), Some(*worker));
        let up = self.upgrade.take().map(|u| u.as_ref());
        if let Some(up) = up {
            self.emit_in(
                up.id,
                Some(up),
                EventKind::UpgradeFailed { failure, worker },
            );
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

    /// Without overlap, the candidate failed before it was ready (or was
    /// rolled back): the release that served before starts again as a new
    /// generation, which owns the sockets and their queued connections at
    /// once, and runs once nothing of the candidate does. The previous
    /// processes are gone, so this is the only way back.
    fn restore(&mut self, previous: GenId, failure: Failure, worker: Option<u32>) {
        let Some(up) = &self.upgrade else {
            return;
        };
        let (gen, up_ref) = (up.candidate, up.as_ref());
        let Some(spec) = self.gens.get(&previous).map(|g| g.spec.clone()) else {
            // Kept while the upgrade names it (see `prune`); if it were
            // gone, the upgrade would just fail.
            self.end(gen, Some(failure.clone()));
            self.upgrade = None;
            self.emit_in(
                gen,
                Some(up_ref),
                EventKind::UpgradeFailed { failure, worker },
            );
            self.after_upgrade();
            return;
        };
        let restore = self.new_generation(spec, Some(up_ref));
        if let Some(g) = self.gens.get_mut(&restore) {
            g.phase = Phase::Waiting;
        }
        self.emit(
            restore,
            EventKind::Requested {
                trigger: Trigger::Rollback,
            },
        );
        // The sockets move before the candidate ends, so that ending it
        // never frees (and resets) what waits in them.
        self.hand_over(gen, restore);
        let to = restore;
        let f = failure.clone();
        self.emit_in(gen, Some(up_ref), EventKind::RolledBack { to, failure: f });
        if let Some(up) = self.upgrade.as_mut() {
            up.phase = UpgradePhase::Restoring {
                failure: failure.clone(),
                worker,
                restore,
            };
        }
        self.end(gen, Some(failure));
    }

    /// Every worker of the restored generation was started (or could not
    /// be): the failed upgrade is over; from now on that generation is the
    /// active one like any other (a worker that crashes is restarted).
    fn end_restore(&mut self, gen: GenId) {
        let restoring = matches!(
            &self.upgrade,
            Some(Upgrade { phase: UpgradePhase::Restoring { restore, .. }, .. }) if *restore == gen
        );
        let started = self
            .gens
            .get(&gen)
            .is_some_and(|g| g.phase != Phase::Waiting && g.spawning().is_empty());
        if !restoring || !started {
            return;
        }
        let Some(up) = self.upgrade.take() else {
            return;
        };
        let up_ref = up.as_ref();
        if let UpgradePhase::Restoring {
            failure, worker, ..
        } = up.phase
        {
            self.emit_in(
                up_ref.id,
                Some(up_ref),
                EventKind::UpgradeFailed { failure, worker },
            );
        }
        self.after_upgrade();
    }

    /// Without overlap: `to` takes `from`'s place before it runs: its
    /// sockets, with whatever waits in them, and its traffic.
    fn hand_over(&mut self, from: GenId, to: GenId) {
        if self.steered() {
            self.out.push(Effect::PassSockets { from, to });
        }
        if let Some(g) = self.gens.get_mut(&from) {
            g.owns_sockets = false;
        }
        self.traffic.active = Some(to);
        self.traffic.candidate = None;
        self.traffic.parked = None;
        self.publish_traffic();
    }

    /// Whether an upgrade with `settings` must not run beside the
    /// generation serving now: either of them says the app cannot run
    /// twice.
    fn no_overlap(&self, settings: Option<&Settings>) -> bool {
        let active = self.traffic.active.and_then(|a| self.gens.get(&a));
        settings.is_some_and(|s| s.overlap == Overlap::None)
            || active.is_some_and(|g| g.settings().overlap == Overlap::None)
    }

    /// Starts the generation waiting to replace another once no other
    /// generation has a process left or a spawn outstanding: never two
    /// generations at once.
    fn start_waiting(&mut self) {
        if self.stopping {
            return;
        }
        let Some(gen) = self
            .gens
            .values()
            .find(|g| g.phase == Phase::Waiting)
            .map(|g| g.id)
        else {
            return;
        };
        let others_run = self.procs.values().any(|p| p.gen != gen)
            || self
                .gens
                .values()
                .any(|g| g.id != gen && !g.spawning().is_empty());
        if others_run {
            return;
        }
        if let Some(g) = self.gens.get_mut(&gen) {
            g.phase = Phase::Starting {
                workers: vec![Worker::Spawning; g.records.len()],
                deadline: None,
                probe: None,
            };
        }
        // Nothing else runs: nobody to leave the CPU to.
        self.spawn_all(gen, CpuPriority::Normal);
    }

    fn after_upgrade(&mut self) {
        if std::mem::take(&mut self.follow_up) && !self.stopping {
            self.out.push(Effect::Note(Note::FollowUpUpgrade));
            self.out.push(Effect::RequestUpgrade);
        }
    }

    // ----- retiring and draining ---------------------------------------------

    /// `gen` gets no new connections any more. With steered traffic its
    /// running workers keep accepting what already waits in its sockets
    /// and it is drained once they are empty; with a shared socket (whose
    /// queue is the next generation's too) it is drained at once.
    fn retire(&mut self, gen: GenId, upgrade: Option<UpgradeRef>, failure: Option<Failure>) {
        if matches!(
            self.gens.get(&gen).map(|g| &g.phase),
            Some(Phase::Retiring { .. })
        ) {
            // Retired already (a cutover right after another): it keeps
            // its wait for its queue, now on behalf of this upgrade too, so
            // that one waits for its drain as well.
            if let (Some(up), Some(&pid)) = (upgrade, self.running_procs(gen).first()) {
                if let Some(g) = self.gens.get_mut(&gen) {
                    g.upgrade = Some(up);
                }
                self.emit(gen, EventKind::Retiring { pid });
            }
            return;
        }
        let until = self.now + RETIRE_WAIT;
        // Only a running worker can accept what waits in its sockets.
        let accepting = self.accepting(gen);
        let Some(&(_, pid)) = accepting.first().filter(|_| self.steered()) else {
            self.drain_with(gen, upgrade, failure);
            return;
        };
        self.stop_probe(gen);
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        if upgrade.is_some() {
            g.upgrade = upgrade;
        }
        let spawning = g.spawning();
        g.phase = Phase::Retiring {
            until,
            failure,
            spawning,
        };
        self.emit(gen, EventKind::Retiring { pid });
        self.out.push(Effect::WatchQueue { gen });
    }

    /// Tells `gen` to finish: its running processes get the drain signal,
    /// a pending spawn is drained when it arrives, a pending restart is
    /// dropped. `upgrade`, if given, is the upgrade the drain belongs to.
    fn drain(&mut self, gen: GenId, upgrade: Option<UpgradeRef>) {
        self.drain_with(gen, upgrade, None);
    }

    /// [`Self::drain`], with `failure` as the reason unless the generation
    /// already has one.
    fn drain_with(&mut self, gen: GenId, upgrade: Option<UpgradeRef>, failure: Option<Failure>) {
        self.stop_probe(gen);
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        let own = match &g.phase {
            Phase::Draining { .. } | Phase::Finished { .. } => return,
            Phase::Retiring { failure, .. } => failure.clone(),
            Phase::Waiting | Phase::Starting { .. } | Phase::Serving { .. } => None,
        };
        if upgrade.is_some() {
            g.upgrade = upgrade;
        }
        g.phase = Phase::Draining {
            failure: own.or(failure),
            spawning: g.spawning(),
        };
        for pid in self.running_procs(gen) {
            self.signal_drain(gen, pid);
        }
        self.maybe_finish(gen);
    }

    /// Ends `gen` for good (a failed candidate, or one nobody wants):
    /// drained if it runs, finished once nothing of it is left.
    fn end(&mut self, gen: GenId, failure: Option<Failure>) {
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        match &mut g.phase {
            Phase::Draining { failure: f, .. } => {
                if f.is_none() {
                    *f = failure;
                }
            }
            Phase::Finished { .. } => {}
            // A generation with nothing running (waiting, restarting
            // every worker) is finished by the drain at once.
            _ => self.drain_with(gen, None, failure),
        }
        self.maybe_finish(gen);
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
        if let Phase::Draining { failure, spawning } = &mut g.phase {
            if !left && spawning.is_empty() {
                g.phase = Phase::Finished {
                    failure: failure.take(),
                    at: now,
                };
                if self.mode == TrafficMode::Steered && g.owns_sockets {
                    self.out.push(Effect::FreeSockets { gen });
                }
            }
        }
    }

    // ----- time --------------------------------------------------------------

    fn on_tick(&mut self) {
        let now = self.now;
        // Readiness first: a cutover in this tick ends a generation due to
        // restart, rather than restarting it only to drain it.
        let mut starting = Vec::new();
        let mut restarting = Vec::new();
        let mut retiring = Vec::new();
        for g in self.gens.values() {
            match &g.phase {
                Phase::Starting { workers, .. } | Phase::Serving { workers } => {
                    for (i, w) in (0u32..).zip(workers) {
                        match *w {
                            Worker::Starting {
                                deadline, check, ..
                            } if now >= deadline
                                || matches!(check, Check::Delay { at } if now >= at) =>
                            {
                                starting.push((g.id, i, *w))
                            }
                            Worker::Restarting { at } if now >= at => {
                                restarting.push((g.id, i, *w))
                            }
                            _ => {}
                        }
                    }
                }
                Phase::Retiring { until, .. } if now >= *until => retiring.push(g.id),
                _ => {}
            }
        }
        for (gen, i, state) in starting.into_iter().chain(restarting) {
            let Some(g) = self.gens.get(&gen) else {
                continue;
            };
            if g.workers().and_then(|w| w.get(i as usize)) != Some(&state) {
                continue; // changed by an earlier decision in this tick
            }
            let serving = matches!(g.phase, Phase::Serving { .. });
            match state {
                Worker::Starting {
                    pid,
                    check: Check::Delay { at },
                    deadline,
                } if at <= deadline && self.running(pid) => {
                    let via = match g.settings().readiness {
                        Readiness::Delay(d) => Via::Delay(d),
                        _ => Via::Delay(Duration::ZERO),
                    };
                    self.worker_ready(gen, i, pid, via);
                }
                Worker::Starting { .. } => {
                    let failure = Failure::Timeout(g.settings().ready_timeout);
                    if serving {
                        self.recycle_worker(gen, i, failure);
                    } else {
                        // The deadline is the generation's.
                        self.not_ready(gen, failure);
                    }
                }
                Worker::Restarting { .. } => {
                    if self.traffic.active == Some(gen) && !self.stopping {
                        if let Some(slot) = self
                            .gens
                            .get_mut(&gen)
                            .and_then(Generation::workers_mut)
                            .and_then(|w| w.get_mut(i as usize))
                        {
                            *slot = Worker::Spawning;
                        }
                        // The active generation, restarted alone or
                        // whole: clients wait for it.
                        self.spawn_worker(gen, i, CpuPriority::Normal);
                    } else {
                        self.drain(gen, None);
                    }
                }
                _ => {}
            }
        }
        for gen in retiring {
            if matches!(
                self.gens.get(&gen).map(|g| &g.phase),
                Some(Phase::Retiring { .. })
            ) {
                self.out.push(Effect::Note(Note::QueueNotEmpty { gen }));
                self.drain(gen, None);
            }
        }
        self.tick_upgrade(now);
        self.tick_kills(now);
    }

    fn tick_upgrade(&mut self, now: Time) {
        let Some(up) = &self.upgrade else {
            return;
        };
        match up.phase {
            UpgradePhase::Reporting { at, .. } if now >= at => self.finish_report(),
            UpgradePhase::Canary {
                promote_at: Some(at),
                ..
            } if now >= at => {
                self.promote();
            }
            UpgradePhase::Baking { until, .. } if now >= until => self.end_bake(),
            _ => {}
        }
    }

    fn tick_kills(&mut self, now: Time) {
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
    }

    /// Forgets the oldest finished generations beyond [`FINISHED_KEPT`].
    fn prune(&mut self) {
        // The release an upgrade without overlap would bring back is kept.
        let needed = match &self.upgrade {
            Some(Upgrade {
                phase: UpgradePhase::Replacing { previous },
                ..
            }) => Some(*previous),
            _ => None,
        };
        let mut finished: Vec<(Time, GenId)> = self
            .gens
            .values()
            .filter(|g| Some(g.id) != needed)
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
