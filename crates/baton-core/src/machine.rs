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
use crate::state::{Check, Generation, Phase, Proc, Upgrade, UpgradePhase};
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
            Phase::Retiring { until, .. } => Some(until),
            _ => None,
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
            | UpgradePhase::Raising
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
            Input::Spawned { gen, pid } => self.on_spawned(gen, pid),
            Input::SpawnFailed { gen, error } => self.on_spawn_failed(gen, error),
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

    fn spawn(&mut self, gen: GenId, priority: CpuPriority) {
        if let Some(g) = self.gens.get_mut(&gen) {
            g.priority = priority;
        }
        self.out.push(Effect::Spawn { gen, priority });
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
                owns_sockets: true,
                priority: CpuPriority::Normal,
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
        self.traffic.active = Some(gen);
        self.publish_traffic();
        self.spawn(gen, CpuPriority::Normal);
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
                | UpgradePhase::Raising
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

    /// Drains the active generation's process so that it is restarted
    /// (same release, same sockets) once it has exited.
    fn restart_active(&mut self) -> Reply {
        if self.stopping {
            return Reply::Refused(Refusal::Stopping);
        }
        let Some(gen) = self.traffic.active else {
            return Reply::Refused(Refusal::NothingToPromote);
        };
        let pid = match self.gens.get(&gen).map(|g| g.phase.clone()) {
            Some(Phase::Serving { pid } | Phase::Starting { pid, .. }) => pid,
            // Restarting or being recycled already: the next process gets
            // the sockets as they are now.
            _ => return Reply::Restarting(gen),
        };
        let probing = self.gens.get(&gen).is_some_and(|g| {
            matches!(
                g.phase,
                Phase::Starting {
                    check: Check::Probe,
                    ..
                }
            )
        });
        if probing {
            self.out.push(Effect::StopProbe { gen });
        }
        if let Some(g) = self.gens.get_mut(&gen) {
            g.phase = Phase::Recycling { pid };
        }
        self.out.push(Effect::Note(Note::RestartRequested { gen }));
        self.signal_drain(gen, pid);
        Reply::Restarting(gen)
    }

    fn promote(&mut self) -> Reply {
        let Some(up) = &self.upgrade else {
            return Reply::Refused(Refusal::NothingToPromote);
        };
        let id = up.candidate;
        match up.phase {
            UpgradePhase::Canary { .. } => {
                let pid = self.gens.get(&id).and_then(Generation::main_pid);
                if let Some(pid) = pid {
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
                self.emit_in(gen, up, EventKind::UpgradeFailed { failure });
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
        self.spawn(gen, priority);
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
            let failure = match &up.phase {
                UpgradePhase::Reporting { failure, .. }
                | UpgradePhase::Restoring { failure, .. } => failure.clone(),
                _ => Failure::Stopping,
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
                EventKind::UpgradeFailed { failure },
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
                self.emit(gen, EventKind::Spawned { pid });
                if check == Check::Probe {
                    self.out.push(Effect::StartProbe { gen, pid });
                }
            }
            Phase::Draining { spawn_pending, .. } => {
                // Drained (stop, cutover) while it was being started.
                *spawn_pending = false;
                self.emit(gen, EventKind::Spawned { pid });
                self.signal_drain(gen, pid);
            }
            _ => {
                // No spawn was outstanding: drain the stray process.
                self.emit(gen, EventKind::Spawned { pid });
                self.signal_drain(gen, pid);
            }
        }
        self.end_restore(gen);
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
                // The new generation during its bake is the active one:
                // with nothing parked to go back to, a restart that could
                // not be spawned is retried like any active generation's
                // (as its crash was), not taken for a failed candidate.
                let baking = matches!(
                    self.upgrade.as_ref().map(|u| &u.phase),
                    Some(UpgradePhase::Baking { .. })
                );
                let candidate = self.is_candidate(gen) && !baking;
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
        let upgrade_phase = self
            .upgrade
            .as_ref()
            .filter(|u| u.candidate == gen)
            .map(|u| u.phase.clone());
        match upgrade_phase {
            // Report once its last stderr lines are in (a bounded wait);
            // the process is gone, so nothing can promote it meanwhile.
            Some(UpgradePhase::Starting | UpgradePhase::Raising) => {
                self.fail_upgrade(Failure::Exited(status), Some(pid))
            }
            // Without overlap: a start that failed brings the previous
            // release back. One drained on request (its socket was
            // replaced) is restarted, as the active generation it is.
            Some(UpgradePhase::Replacing { .. }) if was_starting => {
                self.fail_upgrade(Failure::Exited(status), Some(pid))
            }
            Some(UpgradePhase::Replacing { .. }) => self.restart_after(gen, uptime),
            // After it served: the traffic goes back where it was.
            Some(UpgradePhase::Canary { .. })
            | Some(UpgradePhase::Baking {
                parked: Some(_), ..
            }) => self.fail_upgrade(Failure::Died(status), Some(pid)),
            // Active, with nothing parked to go back to: restarted.
            Some(UpgradePhase::Baking { parked: None, .. }) => self.restart_after(gen, uptime),
            Some(UpgradePhase::Reporting { .. } | UpgradePhase::Restoring { .. }) => {
                self.end(gen, None)
            }
            None if self.traffic.active == Some(gen) && !self.stopping => {
                if probing {
                    self.out.push(Effect::StopProbe { gen });
                }
                self.restart_after(gen, uptime);
            }
            None if self.traffic.parked == Some(gen) => {
                // Nothing left to roll back to; the bake goes on.
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

    // ----- readiness and health ----------------------------------------------

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

    fn on_health(&mut self, gen: GenId, pid: Pid, result: Result<String, String>) {
        let current =
            self.gens.get(&gen).and_then(Generation::main_pid) == Some(pid) && self.running(pid);
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
            let lowered = self
                .gens
                .get(&gen)
                .is_some_and(|g| g.priority != CpuPriority::Normal);
            if lowered {
                // Back to full speed before the first client reaches it:
                // the traffic moves once the shell says it is done.
                if let Some(up) = self.upgrade.as_mut() {
                    up.phase = UpgradePhase::Raising;
                }
                self.out.push(Effect::RestorePriority { gen, pid });
            } else {
                self.take_traffic(gen, pid, health);
            }
        } else if self.traffic.active == Some(gen) {
            // First start, or a restart of the active generation.
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

    /// The ready candidate takes traffic: a canary share, or all of it.
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
    /// `gen`'s process `pid`. A candidate waiting for it takes the traffic
    /// now, restored or not: a slower app beats a failed upgrade.
    fn on_priority_restored(&mut self, gen: GenId, pid: Pid, restored: bool) {
        let running = self.running(pid);
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        if g.main_pid() != Some(pid) {
            // A process since replaced: its successor was spawned anew.
            return;
        }
        // Not restored: the shell has logged why, and status keeps showing
        // the lowered priority.
        if restored {
            g.priority = CpuPriority::Normal;
        }
        let health = self
            .gens
            .get(&gen)
            .is_some_and(|g| g.settings().health.is_some());
        let waiting = self
            .upgrade
            .as_ref()
            .is_some_and(|u| u.candidate == gen && u.phase == UpgradePhase::Raising);
        let serving = matches!(
            self.gens.get(&gen).map(|g| &g.phase),
            Some(Phase::Serving { pid: p }) if *p == pid
        );
        if waiting && serving && running {
            self.take_traffic(gen, pid, health);
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
        let previous = self.traffic.active.filter(|a| {
            *a != gen
                && matches!(
                    self.gens.get(a).map(|g| &g.phase),
                    Some(Phase::Serving { .. })
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
    /// and the failure is reported: now, or, when the candidate died
    /// (`dead`), once its stderr has ended.
    fn fail_upgrade(&mut self, failure: Failure, dead: Option<Pid>) {
        let Some(up) = &self.upgrade else {
            return;
        };
        let (gen, up_ref, phase) = (up.candidate, up.as_ref(), up.phase.clone());
        if let UpgradePhase::Replacing { previous } = phase {
            self.restore(previous, failure);
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
            UpgradePhase::Starting | UpgradePhase::Raising => {
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

    /// Without overlap, the candidate failed before it was ready (or was
    /// rolled back): the release that served before starts again as a new
    /// generation, which owns the sockets and their queued connections at
    /// once, and runs once nothing of the candidate does. The previous
    /// processes are gone, so this is the only way back.
    fn restore(&mut self, previous: GenId, failure: Failure) {
        let Some(up) = &self.upgrade else {
            return;
        };
        let (gen, up_ref) = (up.candidate, up.as_ref());
        let Some(spec) = self.gens.get(&previous).map(|g| g.spec.clone()) else {
            // Kept while the upgrade names it (see `prune`); if it were
            // gone, the upgrade would just fail.
            self.end(gen, Some(failure.clone()));
            self.upgrade = None;
            self.emit_in(gen, Some(up_ref), EventKind::UpgradeFailed { failure });
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
                restore,
            };
        }
        self.end(gen, Some(failure));
    }

    /// The restored generation's process was started (or could not be):
    /// the failed upgrade is over; from now on that generation is the
    /// active one like any other (restarted if it crashes).
    fn end_restore(&mut self, gen: GenId) {
        let restoring = matches!(
            &self.upgrade,
            Some(Upgrade { phase: UpgradePhase::Restoring { restore, .. }, .. }) if *restore == gen
        );
        if !restoring {
            return;
        }
        let Some(up) = self.upgrade.take() else {
            return;
        };
        let up_ref = up.as_ref();
        if let UpgradePhase::Restoring { failure, .. } = up.phase {
            self.emit_in(
                up_ref.id,
                Some(up_ref),
                EventKind::UpgradeFailed { failure },
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
            || self.gens.values().any(|g| {
                g.id != gen
                    && matches!(
                        g.phase,
                        Phase::Spawning
                            | Phase::Draining {
                                spawn_pending: true,
                                ..
                            }
                    )
            });
        if others_run {
            return;
        }
        if let Some(g) = self.gens.get_mut(&gen) {
            g.phase = Phase::Spawning;
        }
        // Nothing else runs: nobody to leave the CPU to.
        self.spawn(gen, CpuPriority::Normal);
    }

    fn after_upgrade(&mut self) {
        if std::mem::take(&mut self.follow_up) && !self.stopping {
            self.out.push(Effect::Note(Note::FollowUpUpgrade));
            self.out.push(Effect::RequestUpgrade);
        }
    }

    // ----- retiring and draining ---------------------------------------------

    /// `gen` gets no new connections any more. With steered traffic it
    /// keeps accepting what already waits in its sockets and is drained
    /// once they are empty; with a shared socket (whose queue is the next
    /// generation's too) it is drained at once.
    fn retire(&mut self, gen: GenId, upgrade: Option<UpgradeRef>, failure: Option<Failure>) {
        let until = self.now + RETIRE_WAIT;
        // Only a running process can accept what waits in its sockets.
        let keeps_accepting = self.steered()
            && self
                .gens
                .get(&gen)
                .and_then(Generation::main_pid)
                .is_some_and(|pid| self.running(pid));
        let Some(g) = self.gens.get_mut(&gen) else {
            return;
        };
        let pid = match g.phase {
            Phase::Serving { pid } | Phase::Starting { pid, .. } if keeps_accepting => pid,
            _ => {
                self.drain(gen, upgrade);
                if let Some(Generation {
                    phase: Phase::Draining { failure: f, .. },
                    ..
                }) = self.gens.get_mut(&gen)
                {
                    if f.is_none() {
                        *f = failure;
                    }
                }
                self.maybe_finish(gen);
                return;
            }
        };
        if upgrade.is_some() {
            g.upgrade = upgrade;
        }
        if matches!(
            g.phase,
            Phase::Starting {
                check: Check::Probe,
                ..
            }
        ) {
            self.out.push(Effect::StopProbe { gen });
        }
        g.phase = Phase::Retiring {
            pid,
            until,
            failure,
        };
        self.emit(gen, EventKind::Retiring { pid });
        self.out.push(Effect::WatchQueue { gen });
    }

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
        match g.phase.clone() {
            Phase::Starting { pid, check, .. } => {
                if check == Check::Probe {
                    self.out.push(Effect::StopProbe { gen });
                }
                self.set_draining(gen, None, false);
                self.signal_drain(gen, pid);
            }
            Phase::Retiring { pid, failure, .. } => {
                self.set_draining(gen, failure, false);
                self.signal_drain(gen, pid);
            }
            Phase::Serving { pid } | Phase::Recycling { pid } => {
                self.set_draining(gen, None, false);
                self.signal_drain(gen, pid);
            }
            Phase::Spawning => self.set_draining(gen, None, true),
            Phase::Restarting { .. } | Phase::Waiting => {
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
                // A generation with nothing running (waiting, restarting)
                // is finished by the drain already.
                if let Some(Generation {
                    phase:
                        Phase::Draining { failure: f, .. }
                        | Phase::Finished {
                            failure: f @ None, ..
                        },
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
                if self.mode == TrafficMode::Steered && g.owns_sockets {
                    self.out.push(Effect::FreeSockets { gen });
                }
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
                Phase::Retiring { until, .. } => now >= until,
                _ => false,
            })
            .map(|g| (g.id, g.phase.clone()))
            .collect();
        // Readiness first: a cutover in this tick ends a generation due to
        // restart, rather than restarting it only to drain it.
        let (starting, rest): (Vec<_>, Vec<_>) = due
            .into_iter()
            .partition(|(_, phase)| matches!(phase, Phase::Starting { .. }));
        for (gen, phase) in starting.into_iter().chain(rest) {
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
                        // The active generation: clients wait for it.
                        self.spawn(gen, CpuPriority::Normal);
                    } else {
                        self.drain(gen, None);
                    }
                }
                Phase::Retiring { .. } => {
                    self.out.push(Effect::Note(Note::QueueNotEmpty { gen }));
                    self.drain(gen, None);
                }
                _ => {}
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
