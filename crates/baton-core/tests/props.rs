//! Random sequences of inputs (commands, spawn answers, exits, group
//! reports, READY and probe results from current, exited and unknown
//! processes, stderr ends, the passing of time) in any order, with the
//! machine's invariants checked after every step.
//!
//! CI runs proptest's default number of cases; a long run:
//! `PROPTEST_CASES=100000 cargo test --release -p baton-core --test props`
//! (recorded in docs/guarantees.md).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use baton_core::*;
use common::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Upgrade {
        signal: bool,
        readiness: u8,
        /// 0: plain; 1: a bake; 2: a canary; 3: a canary promoting itself.
        style: u8,
        health: bool,
        /// Workers per generation: 1 to 3.
        workers: u32,
        /// The new configuration says the app cannot run twice.
        alone: bool,
        /// The new configuration starts candidates at idle priority.
        low: bool,
    },
    Rollback,
    Promote,
    Restart,
    Stop,
    /// Answer the n-th outstanding spawn.
    Resolve {
        n: usize,
        ok: bool,
    },
    /// Start every process asked for: a generation's workers all run, so
    /// the paths after every worker's readiness get visited often.
    ResolveAll,
    /// The n-th process ever spawned exits (again, if it already did).
    Exit {
        n: usize,
        group_empty: bool,
        code: i32,
    },
    GroupEmpty {
        n: usize,
    },
    /// READY from the n-th process ever spawned, or a member of its group.
    Ready {
        n: usize,
        member: bool,
    },
    Probe {
        n: usize,
        ok: bool,
    },
    /// READY from the upgrade's candidate, if it is starting: the paths
    /// after a candidate's readiness get visited often.
    ReadyCandidate,
    Status {
        n: usize,
    },
    StderrClosed {
        n: usize,
    },
    /// The n-th process's generation's queue is reported empty.
    QueueEmpty {
        n: usize,
    },
    /// A health check result for the n-th process.
    Health {
        n: usize,
        ok: bool,
    },
    /// Answer the n-th outstanding priority restore (or, with none
    /// outstanding, repeat an answer about the n-th process, not lowered).
    Restored {
        n: usize,
        ok: bool,
    },
    /// A message from a process baton never started.
    Stranger,
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..8usize;
    prop_oneof![
        2 => (any::<bool>(), 0..3u8, 0..4u8, any::<bool>(), 1..=3u32, prop::bool::weighted(0.3), any::<bool>()).prop_map(|(signal, readiness, style, health, workers, alone, low)| Op::Upgrade { signal, readiness, style, health, workers, alone, low }),
        1 => Just(Op::Rollback),
        1 => Just(Op::Promote),
        1 => Just(Op::Restart),
        2 => n.clone().prop_map(|n| Op::QueueEmpty { n }),
        2 => (n.clone(), prop::bool::weighted(0.6)).prop_map(|(n, ok)| Op::Health { n, ok }),
        1 => Just(Op::Stop),
        4 => (n.clone(), prop::bool::weighted(0.85)).prop_map(|(n, ok)| Op::Resolve { n, ok }),
        2 => Just(Op::ResolveAll),
        3 => (n.clone(), any::<bool>(), 0..3i32).prop_map(|(n, group_empty, code)| Op::Exit { n, group_empty, code }),
        2 => n.clone().prop_map(|n| Op::GroupEmpty { n }),
        3 => (n.clone(), any::<bool>()).prop_map(|(n, member)| Op::Ready { n, member }),
        2 => (n.clone(), any::<bool>()).prop_map(|(n, ok)| Op::Probe { n, ok }),
        3 => Just(Op::ReadyCandidate),
        1 => n.clone().prop_map(|n| Op::Status { n }),
        1 => n.clone().prop_map(|n| Op::StderrClosed { n }),
        2 => (n.clone(), prop::bool::weighted(0.8)).prop_map(|(n, ok)| Op::Restored { n, ok }),
        1 => Just(Op::Stranger),
        3 => prop_oneof![0..50u64, 50..1500u64, 1500..8000u64].prop_map(|ms| Op::Advance { ms }),
    ]
}

/// What the outside world knows: what it was asked to spawn, which
/// processes it started, which it saw exit, which groups it reported empty.
#[derive(Default)]
struct World {
    now_ms: u64,
    /// Spawns asked for and not answered yet: generation and worker.
    pending: Vec<(GenId, u32)>,
    /// Every process ever started, in order, with its generation.
    started: Vec<(Pid, GenId)>,
    exited: BTreeSet<Pid>,
    /// Released by the machine: known gone.
    gone: BTreeSet<Pid>,
    kill_at: BTreeMap<Pid, Time>,
    next_pid: i32,
    versions: u32,
    /// Each generation asked for, and whether it cannot run twice.
    alone: BTreeMap<GenId, bool>,
    /// Generations whose sockets went to the one replacing them.
    passed: BTreeSet<GenId>,
    /// Workers whose last spawn asked for a lowered CPU priority.
    lowered: BTreeSet<(GenId, u32)>,
    /// Processes started at a lowered priority and not restored since
    /// (including those whose restore failed).
    low: BTreeSet<Pid>,
    /// Processes started lowered whose restore has not been answered
    /// (asked for or not): they must take no traffic.
    unanswered: BTreeSet<Pid>,
    /// Restores asked for and not answered yet.
    restoring: Vec<(GenId, Pid)>,
}

impl World {
    /// Generations with a process not yet released, or a spawn outstanding.
    fn alive(&self) -> BTreeSet<GenId> {
        self.started
            .iter()
            .filter(|(p, _)| !self.gone.contains(p))
            .map(|(_, g)| *g)
            .chain(self.pending.iter().map(|(g, _)| *g))
            .collect()
    }
}

struct Run {
    d: Driver,
    w: World,
    steps: usize,
}

impl Run {
    /// The first generation's configuration says how many workers it runs
    /// and whether it can run twice.
    fn starting(mode: TrafficMode, workers: u32, alone: bool) -> Self {
        let mut r = Self {
            d: Driver::with_mode(mode),
            w: World {
                next_pid: 100,
                ..World::default()
            },
            steps: 0,
        };
        let mut first = spec("v0", Readiness::Notify);
        first.settings.workers = workers;
        if alone {
            first.settings.overlap = Overlap::None;
        }
        r.feed(Input::Start { spec: first });
        r
    }

    fn nth(&self, n: usize) -> Option<(Pid, GenId)> {
        (!self.w.started.is_empty()).then(|| self.w.started[n % self.w.started.len()])
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Upgrade {
                signal,
                readiness,
                style,
                health,
                workers,
                alone,
                low,
            } => {
                self.w.versions += 1;
                let readiness = match readiness {
                    0 => Readiness::Notify,
                    1 => Readiness::Probe,
                    _ => Readiness::Delay(Duration::from_millis(20)),
                };
                let trigger = if signal {
                    Trigger::Signal
                } else {
                    Trigger::Control
                };
                // Few distinct releases, so "same release" paths are hit.
                let name = format!("v{}", self.w.versions % 3);
                // Now and then a release that cannot be resolved.
                let spec = if self.w.versions % 7 == 0 {
                    Err("program not found".to_owned())
                } else {
                    let mut s = spec(&name, readiness);
                    s.settings.health = health.then_some(Health { failures: 2 });
                    s.settings.workers = workers;
                    if alone {
                        s.settings.overlap = Overlap::None;
                    }
                    if low {
                        s.settings.candidate_priority = CpuPriority::Idle;
                    }
                    Ok(s)
                };
                let options = match style {
                    0 => UpgradeOptions::default(),
                    1 => UpgradeOptions {
                        bake: Some(Duration::from_millis(3000)),
                        ..UpgradeOptions::default()
                    },
                    2 => UpgradeOptions {
                        canary: Some(10),
                        ..UpgradeOptions::default()
                    },
                    _ => UpgradeOptions {
                        canary: Some(50),
                        canary_for: Some(Duration::from_millis(2000)),
                        bake: Some(Duration::from_millis(1000)),
                    },
                };
                self.command(Command::Upgrade {
                    trigger,
                    spec,
                    options,
                });
            }
            Op::Rollback => self.command(Command::Rollback),
            Op::Promote => self.command(Command::Promote),
            Op::Restart => self.command(Command::Restart),
            Op::QueueEmpty { n } => {
                let Some((_, gen)) = self.nth(n) else { return };
                self.feed(Input::QueueEmpty { gen });
            }
            Op::Health { n, ok } => {
                let Some((pid, gen)) = self.nth(n) else {
                    return;
                };
                let result = if ok {
                    Ok("200".into())
                } else {
                    Err("answered 503".into())
                };
                self.feed(Input::Health { gen, pid, result });
            }
            Op::Stop => self.command(Command::Stop),
            Op::Resolve { n, ok } => {
                if self.w.pending.is_empty() {
                    return;
                }
                let (gen, worker) = self.w.pending.remove(n % self.w.pending.len());
                if ok {
                    self.spawned(gen, worker);
                } else {
                    self.feed(Input::SpawnFailed {
                        gen,
                        worker,
                        error: "no such file".into(),
                    });
                }
            }
            Op::ResolveAll => {
                // Those asked for now; one at a time, each answered spawn
                // leaving what is owed.
                for (gen, worker) in self.w.pending.clone() {
                    self.w.pending.retain(|p| *p != (gen, worker));
                    self.spawned(gen, worker);
                }
            }
            Op::Exit {
                n,
                group_empty,
                code,
            } => {
                let Some((pid, _)) = self.nth(n) else { return };
                // The world reports each real exit once; a repeat is junk
                // the machine must shrug off.
                self.w.exited.insert(pid);
                self.feed(Input::Exited {
                    pid,
                    status: ExitStatus::Code(code),
                    group_empty,
                });
            }
            Op::GroupEmpty { n } => {
                let Some((pid, _)) = self.nth(n) else { return };
                // Only an exited leader's group can be empty.
                if self.w.exited.contains(&pid) {
                    self.feed(Input::GroupEmpty { pid });
                }
            }
            Op::Ready { n, member } => {
                let Some((pid, _)) = self.nth(n) else { return };
                let (sender, pgid) = if member {
                    (Pid(pid.0 + 50_000), Some(pid))
                } else {
                    (pid, Some(pid))
                };
                self.feed(Input::Notify {
                    pid: sender,
                    pgid,
                    reports: vec![Report::Ready],
                });
            }
            Op::ReadyCandidate => {
                // Every worker of the candidate that waits for its READY,
                // else of any generation (the first one, a restore).
                let waiting = |g: &Generation<()>| -> Vec<Pid> {
                    g.workers()
                        .into_iter()
                        .flatten()
                        .filter_map(|w| match *w {
                            Worker::Starting {
                                pid,
                                check: Check::Notify,
                                ..
                            } => Some(pid),
                            _ => None,
                        })
                        .collect()
                };
                let m = &self.d.m;
                let candidate = m
                    .upgrade()
                    .and_then(|u| m.generation(u.candidate))
                    .map(waiting)
                    .unwrap_or_default();
                let starting = if candidate.is_empty() {
                    m.generations().flat_map(waiting).collect()
                } else {
                    candidate
                };
                for pid in starting {
                    self.feed(Input::Notify {
                        pid,
                        pgid: Some(pid),
                        reports: vec![Report::Ready],
                    });
                }
            }
            Op::Probe { n, ok } => {
                let Some((pid, gen)) = self.nth(n) else {
                    return;
                };
                let result = if ok {
                    Ok("tcp accept".into())
                } else {
                    Err("answered 500".into())
                };
                self.feed(Input::Probe { gen, pid, result });
            }
            Op::Status { n } => {
                let Some((pid, _)) = self.nth(n) else { return };
                self.feed(Input::Notify {
                    pid,
                    pgid: Some(pid),
                    reports: vec![Report::Status("busy".into()), Report::Stopping],
                });
            }
            Op::StderrClosed { n } => {
                let Some((pid, _)) = self.nth(n) else { return };
                self.feed(Input::StderrClosed { pid });
            }
            Op::Restored { n, ok } => {
                if self.w.restoring.is_empty() {
                    // A stale repeat about a process that is not lowered.
                    let Some((pid, gen)) = self.nth(n) else {
                        return;
                    };
                    if !self.w.low.contains(&pid) {
                        self.feed(Input::PriorityRestored {
                            gen,
                            pid,
                            restored: ok,
                        });
                    }
                    return;
                }
                let (gen, pid) = self.w.restoring.remove(n % self.w.restoring.len());
                self.w.unanswered.remove(&pid);
                if ok {
                    self.w.low.remove(&pid);
                }
                self.feed(Input::PriorityRestored {
                    gen,
                    pid,
                    restored: ok,
                });
            }
            Op::Stranger => self.feed(Input::Notify {
                pid: Pid(7),
                pgid: Some(Pid(7)),
                reports: vec![Report::Ready],
            }),
            Op::Advance { ms } => {
                self.w.now_ms += ms;
                self.feed(Input::Tick);
            }
        }
    }

    /// The world starts worker `worker` of `gen`, at the priority its
    /// spawn asked for.
    fn spawned(&mut self, gen: GenId, worker: u32) {
        let pid = Pid(self.w.next_pid);
        self.w.next_pid += 1;
        self.w.started.push((pid, gen));
        if self.w.lowered.contains(&(gen, worker)) {
            self.w.low.insert(pid);
            self.w.unanswered.insert(pid);
        }
        self.feed(Input::Spawned { gen, worker, pid });
    }

    fn command(&mut self, command: Command<()>) {
        self.feed(Input::Command {
            id: RequestId(self.steps as u64),
            command,
        });
    }

    /// Which generation, if any, this READY or probe result may make
    /// ready, and which worker of a serving generation it may make ready
    /// again: a READY counts only from a starting worker's own running
    /// process (or its group), and makes its generation ready only if every
    /// other worker already is; a probe result only for the current run of
    /// the generation's check.
    fn promotable(&self, input: &Input<()>) -> (Option<GenId>, Option<(GenId, u32)>) {
        let senders: Vec<Pid> = match input {
            Input::Notify { pid, pgid, reports } if reports.contains(&Report::Ready) => {
                [Some(*pid), *pgid].into_iter().flatten().collect()
            }
            Input::Probe {
                gen,
                pid,
                result: Ok(_),
            } => {
                let current = self.d.m.generation(*gen).is_some_and(
                    |g| matches!(g.phase(), Phase::Starting { probe: Some(p), .. } if p == pid),
                ) && !self.w.exited.contains(pid);
                return (current.then_some(*gen), None);
            }
            _ => return (None, None),
        };
        for g in self.d.m.generations() {
            let Some(workers) = g.workers() else { continue };
            for (i, w) in (0u32..).zip(workers) {
                let Worker::Starting {
                    pid,
                    check: Check::Notify,
                    ..
                } = w
                else {
                    continue;
                };
                if !senders.contains(pid) || self.w.exited.contains(pid) {
                    continue;
                }
                return match g.phase() {
                    Phase::Starting { .. } => {
                        let others_up = (0u32..)
                            .zip(workers)
                            .all(|(j, o)| j == i || matches!(o, Worker::Up { .. }));
                        (others_up.then_some(g.id()), None)
                    }
                    _ => (None, Some((g.id(), i))),
                };
            }
        }
        (None, None)
    }

    fn feed(&mut self, input: Input<()>) {
        self.steps += 1;
        let (may_promote, may_rejoin) = self.promotable(&input);
        let is_tick = input == Input::Tick;
        let is_spawned = matches!(input, Input::Spawned { .. });
        let now = Time::from_duration(Duration::from_millis(self.w.now_ms));
        let before_active = self.d.m.traffic().active;
        let effects = self.d.m.step(input.clone(), now);
        let ctx = || format!("after {input:?}\neffects: {effects:#?}");

        for e in &effects {
            match e {
                Effect::Spawn {
                    gen,
                    worker,
                    priority,
                } => {
                    // Lowered only beside another generation that serves,
                    // and only as an upgrade's candidate starting: never a
                    // worker restarted alone, nor one of a generation that
                    // serves.
                    if *priority == CpuPriority::Normal {
                        self.w.lowered.remove(&(*gen, *worker));
                    } else {
                        let others_serve =
                            self.d.m.generations().any(|g| {
                                g.id() != *gen && matches!(g.phase(), Phase::Serving { .. })
                            });
                        assert!(
                            others_serve,
                            "a lowered spawn with nobody else serving; {}",
                            ctx()
                        );
                        let starting_candidate = self.d.m.upgrade().is_some_and(|u| {
                            u.candidate == *gen && u.phase == UpgradePhase::Starting
                        }) && matches!(
                            self.d.m.generation(*gen).map(|g| g.phase()),
                            Some(Phase::Starting { .. })
                        );
                        assert!(
                            starting_candidate,
                            "a lowered spawn of a generation that is not a starting candidate; {}",
                            ctx()
                        );
                        self.w.lowered.insert((*gen, *worker));
                    }
                    // Spawning, or drained since (stop, cutover) with the
                    // spawn still owed an answer; never twice at once.
                    assert!(
                        self.d
                            .m
                            .generation(*gen)
                            .is_some_and(|g| g.spawning().contains(worker)),
                        "spawn for a worker not spawning; {}",
                        ctx()
                    );
                    assert!(
                        !self.w.pending.contains(&(*gen, *worker)),
                        "a second spawn for one worker; {}",
                        ctx()
                    );
                    self.w.pending.push((*gen, *worker));
                    let alone = self.d.m.spec(*gen).unwrap().settings.overlap == Overlap::None;
                    self.w.alone.insert(*gen, alone);
                }
                Effect::Signal { pid, .. } => {
                    assert!(
                        self.w.started.iter().any(|(p, _)| p == pid),
                        "signal to a group never started: {pid}; {}",
                        ctx()
                    );
                    assert!(
                        !self.w.gone.contains(pid),
                        "signal to a group known empty: {pid}; {}",
                        ctx()
                    );
                }
                // What queues in handed-over sockets is the next
                // generation's: never reset by freeing them.
                Effect::FreeSockets { gen } => {
                    assert!(
                        !self.w.passed.contains(gen),
                        "freeing sockets generation {gen} handed over; {}",
                        ctx()
                    );
                }
                Effect::PassSockets { from, to } => {
                    assert!(
                        !self.w.started.iter().any(|(_, g)| g == to),
                        "sockets handed to a generation that already ran; {}",
                        ctx()
                    );
                    self.w.passed.insert(*from);
                }
                Effect::RestorePriority {
                    gen,
                    worker,
                    pid,
                    from,
                } => {
                    assert_eq!(
                        self.d.m.procs().get(pid).map(|p| (p.worker, p.priority)),
                        Some((*worker, *from)),
                        "restoring {pid} as another worker or from another priority; {}",
                        ctx()
                    );
                    assert_eq!(*from, CpuPriority::Idle, "{}", ctx());
                    assert!(
                        self.w.unanswered.contains(pid),
                        "restoring a process that is not lowered: {pid}; {}",
                        ctx()
                    );
                    assert!(
                        !self.w.restoring.iter().any(|(_, p)| p == pid),
                        "restoring {pid} twice; {}",
                        ctx()
                    );
                    assert!(
                        self.w.started.contains(&(*pid, *gen)),
                        "restoring {pid} for a generation it is not of; {}",
                        ctx()
                    );
                    self.w.restoring.push((*gen, *pid));
                }
                Effect::Release { pid } => {
                    assert!(
                        self.w.exited.contains(pid),
                        "released before exit; {}",
                        ctx()
                    );
                    assert!(self.w.gone.insert(*pid), "released twice; {}", ctx());
                }
                // Delay readiness promotes on a tick, by time alone.
                Effect::Event(Event {
                    gen,
                    kind: EventKind::Ready { .. },
                    ..
                }) if !is_tick => {
                    assert_eq!(
                        may_promote,
                        Some(*gen),
                        "promoted by a READY or probe result that was not its current process's; {}",
                        ctx()
                    );
                }
                // A worker restarted alone is ready by its own READY (or its
                // delay), or, checked by a probe, once it runs.
                Effect::Event(Event {
                    gen,
                    kind: EventKind::WorkerReady { worker, via, .. },
                    ..
                }) if !is_tick => {
                    let by_spawn = is_spawned && *via == Via::Running;
                    assert!(
                        by_spawn || may_rejoin == Some((*gen, *worker)),
                        "worker made ready by someone else's READY; {}",
                        ctx()
                    );
                }
                _ => {}
            }
        }
        self.check(before_active, &ctx);
    }

    fn check(&mut self, before_active: Option<GenId>, ctx: &dyn Fn() -> String) {
        let m = &self.d.m;
        // A generation that cannot run twice never has a process alive
        // (or a spawn outstanding) while another generation has one.
        let alive = self.w.alive();
        if alive.len() > 1 {
            for g in &alive {
                assert!(
                    !self.w.alone[g],
                    "generation {g} cannot run twice, but {alive:?} are alive together; {}",
                    ctx()
                );
            }
        }
        // Waiting to start only as the new generation of an upgrade
        // without overlap (or the restore of one), which then owns the
        // traffic.
        for g in m.generations() {
            if *g.phase() == Phase::Waiting {
                let owner = match m.upgrade().map(|u| &u.phase) {
                    Some(UpgradePhase::Replacing { .. }) => m.upgrade().map(|u| u.candidate),
                    Some(UpgradePhase::Restoring { restore, .. }) => Some(*restore),
                    _ => None,
                };
                assert_eq!(
                    owner,
                    Some(g.id()),
                    "waiting outside its upgrade; {}",
                    ctx()
                );
                assert_eq!(m.traffic().active, Some(g.id()), "{}", ctx());
            }
        }
        // A generation with traffic is never at a lowered CPU priority:
        // no process of it (any worker) takes traffic before its restore is
        // answered (and one whose restore failed shows it). With shared
        // sockets, taking traffic is being active (the old generation
        // drained).
        let plan = m.traffic().clone();
        for (pid, proc) in m.procs() {
            if proc.exit.is_some() {
                continue;
            }
            let id = proc.gen;
            let takes_traffic = plan.active == Some(id)
                || plan.candidate.is_some_and(|c| c.gen == id && c.share > 0)
                || plan.parked == Some(id);
            assert!(
                !(takes_traffic && self.w.unanswered.contains(pid)),
                "generation {id} takes traffic with worker {} ({pid}) at a lowered priority; {}",
                proc.worker,
                ctx()
            );
            assert_eq!(
                proc.priority != CpuPriority::Normal,
                self.w.low.contains(pid),
                "process {pid} of generation {id} shows priority {:?}; {}",
                proc.priority,
                ctx()
            );
        }
        // Raising: waiting for restores asked for and not answered, and
        // only for those.
        if let Some(Upgrade {
            candidate,
            phase: UpgradePhase::Raising { pending, .. },
            ..
        }) = m.upgrade()
        {
            assert!(!pending.is_empty(), "raising for nothing; {}", ctx());
            let asked: BTreeSet<Pid> = self
                .w
                .restoring
                .iter()
                .filter(|(g, _)| g == candidate)
                .map(|(_, p)| *p)
                .collect();
            let pending: BTreeSet<Pid> = pending.iter().copied().collect();
            assert_eq!(pending, asked, "raising for other restores; {}", ctx());
        }
        // At most one upgrade, and its candidate exists.
        if let Some(up) = m.upgrade() {
            assert!(m.generation(up.candidate).is_some(), "{}", ctx());
        }
        // Only the active generation serves; while one serves, the active
        // one does.
        // Only generations in the traffic plan serve: the active one, a
        // canary, a parked one. The plan is consistent with the upgrade.
        let active = plan.active;
        for g in m.generations() {
            let id = g.id();
            if matches!(g.phase(), Phase::Serving { .. }) {
                // With shared sockets a candidate whose priority is being
                // restored serves (it is ready) before it is in the plan.
                let raising = m.upgrade().is_some_and(|u| {
                    u.candidate == id && matches!(u.phase, UpgradePhase::Raising { .. })
                });
                let in_plan = active == Some(id)
                    || plan.candidate.is_some_and(|c| c.gen == id)
                    || plan.parked == Some(id)
                    || raising;
                assert!(
                    in_plan,
                    "generation {id} serves outside the plan; {}",
                    ctx()
                );
            }
            let gone = matches!(
                g.phase(),
                Phase::Retiring { .. } | Phase::Draining { .. } | Phase::Finished { .. }
            );
            if gone {
                assert!(
                    plan.candidate.is_none_or(|c| c.gen != id) && plan.parked != Some(id),
                    "a retired generation is still in the plan; {}",
                    ctx()
                );
                assert!(
                    m.stopping() || active != Some(id),
                    "the active generation was retired; {}",
                    ctx()
                );
            }
        }
        if m.mode() == TrafficMode::Shared {
            assert!(
                plan.candidate.is_none() && plan.parked.is_none(),
                "steering with shared sockets; {}",
                ctx()
            );
        }
        if let Some(c) = plan.candidate {
            assert_ne!(Some(c.gen), active, "{}", ctx());
            assert_eq!(
                m.upgrade().map(|u| u.candidate),
                Some(c.gen),
                "a candidate without its upgrade; {}",
                ctx()
            );
        }
        if let Some(p) = plan.parked {
            assert_ne!(Some(p), active, "{}", ctx());
            let baking = matches!(
                m.upgrade().map(|u| &u.phase),
                Some(UpgradePhase::Baking { parked: Some(q), .. }) if *q == p
            );
            assert!(baking, "parked outside a bake; {}", ctx());
        }
        if let Some(a) = active {
            assert!(
                m.generation(a).is_some() || m.stopping(),
                "active generation forgotten; {}",
                ctx()
            );
        }
        assert!(
            before_active.is_none() || active.is_some(),
            "traffic plan emptied; {}",
            ctx()
        );
        // Every process started and not released is accounted for.
        let live: BTreeSet<Pid> = self
            .w
            .started
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| !self.w.gone.contains(p))
            .collect();
        let held: BTreeSet<Pid> = m.procs().keys().copied().collect();
        assert_eq!(live, held, "processes not accounted for; {}", ctx());
        // A kill deadline, once set, never moves.
        for (pid, proc) in m.procs() {
            if let Some(k) = proc.kill_at {
                let first = *self.w.kill_at.entry(*pid).or_insert(k);
                assert_eq!(first, k, "kill deadline of {pid} moved; {}", ctx());
            }
        }
        // A starting or serving generation has exactly its N workers, each
        // a process it started that still runs, except while one is being
        // (re)started; it runs no other process. Serving means at least one
        // is ready; starting, not all.
        for g in m.generations() {
            let Some(workers) = g.workers() else { continue };
            let n = g.spec().settings.workers as usize;
            assert_eq!(workers.len(), n, "worker count of {}; {}", g.id(), ctx());
            assert_eq!(g.records().len(), n, "{}", ctx());
            let mut pids = BTreeSet::new();
            for (i, w) in (0u32..).zip(workers) {
                if let Some(pid) = w.pid() {
                    assert!(!self.w.exited.contains(&pid), "{}", ctx());
                    let proc = m.procs().get(&pid);
                    assert_eq!(
                        proc.map(|p| (p.gen, p.worker)),
                        Some((g.id(), i)),
                        "worker {i} of {}; {}",
                        g.id(),
                        ctx()
                    );
                    pids.insert(pid);
                }
            }
            let running: BTreeSet<Pid> = m
                .procs()
                .iter()
                .filter(|(_, p)| p.gen == g.id() && p.exit.is_none())
                .map(|(pid, _)| *pid)
                .collect();
            assert_eq!(
                running,
                pids,
                "processes beside the workers of {}; {}",
                g.id(),
                ctx()
            );
            let up = workers
                .iter()
                .filter(|w| matches!(w, Worker::Up { .. }))
                .count();
            match g.phase() {
                Phase::Serving { .. } => assert!(up >= 1, "serving with none ready; {}", ctx()),
                _ => assert!(up < n, "starting with all ready; {}", ctx()),
            }
        }
        // Drain reaches every worker: each running process of a draining
        // generation (and, once stopping, of any) has had its signal.
        for (pid, proc) in m.procs() {
            let draining = matches!(
                m.generation(proc.gen).map(|g| g.phase()),
                Some(Phase::Draining { .. } | Phase::Finished { .. }) | None
            );
            if proc.exit.is_none() && (draining || m.stopping()) {
                assert!(
                    proc.kill_at.is_some(),
                    "process {pid} of a draining generation never told; {}",
                    ctx()
                );
            }
        }
        // The spawns the machine waits for are exactly those outstanding.
        let owed: BTreeSet<(GenId, u32)> = m
            .generations()
            .flat_map(|g| g.spawning().into_iter().map(move |w| (g.id(), w)))
            .collect();
        let pending: BTreeSet<(GenId, u32)> = self.w.pending.iter().copied().collect();
        assert_eq!(owed, pending, "spawns owed; {}", ctx());
    }

    /// Stops and lets everything end: the machine must get done.
    fn settle(&mut self) {
        self.command(Command::Stop);
        for _ in 0..100 {
            if self.d.m.is_done() {
                return;
            }
            while let Some((gen, worker)) = self.w.pending.pop() {
                self.spawned(gen, worker);
            }
            let live: Vec<Pid> = self.d.m.procs().keys().copied().collect();
            for pid in live {
                if !self.w.exited.contains(&pid) {
                    self.w.exited.insert(pid);
                    self.feed(Input::Exited {
                        pid,
                        status: ExitStatus::Code(0),
                        group_empty: false,
                    });
                }
                self.feed(Input::GroupEmpty { pid });
            }
            self.w.now_ms += 60_000;
            self.feed(Input::Tick);
        }
        panic!("never done after stop: {:#?}", self.d.m);
    }
}

proptest! {
    // 512 cases unless PROPTEST_CASES says otherwise.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512),
        ..ProptestConfig::default()
    })]

    #[test]
    fn invariants_hold_after_every_step(
        steered in any::<bool>(),
        workers in 1..=3u32,
        alone in prop::bool::weighted(0.3),
        served in any::<bool>(),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mode = if steered { TrafficMode::Steered } else { TrafficMode::Shared };
        let mut run = Run::starting(mode, workers, alone);
        if served {
            // Half the cases start from a first generation whose workers
            // all run and are ready: upgrades beside a serving generation
            // (a lowered candidate, a canary, a bake) are the common case.
            run.apply(&Op::ResolveAll);
            run.apply(&Op::ReadyCandidate);
        }
        for op in &ops {
            run.apply(op);
        }
        run.settle();
    }
}

impl Run {
    /// Steered; the first generation started with `workers` workers and
    /// ready, then an upgrade requested; both configurations say whether
    /// the app can run twice.
    fn upgrading(workers: u32, alone: bool) -> Run {
        Self::upgrading_at(workers, alone, false)
    }

    /// [`Run::upgrading`], the candidate at idle priority if `low`.
    fn upgrading_at(workers: u32, alone: bool, low: bool) -> Run {
        let mut run = Run::starting(TrafficMode::Steered, workers, alone);
        for _ in 0..workers {
            run.apply(&Op::Resolve { n: 0, ok: true });
        }
        for n in 0..workers as usize {
            run.apply(&Op::Ready { n, member: false });
        }
        assert_eq!(run.d.m.traffic().active, Some(GenId(1)));
        run.apply(&Op::Upgrade {
            signal: false,
            readiness: 0,
            style: 0,
            health: false,
            workers,
            alone,
            low,
        });
        run
    }
}

/// Positive control for the harness: the sequence that promotes a
/// candidate does produce a Ready event, so the promotion check is live.
#[test]
fn the_harness_sees_a_promotion() {
    let mut run = Run::upgrading(1, false);
    run.apply(&Op::Resolve { n: 0, ok: true });
    run.apply(&Op::Ready { n: 1, member: true });
    assert_eq!(run.d.m.traffic().active, Some(GenId(2)));
    run.settle();
}

/// Positive control for the no-overlap check: with overlap two
/// generations are alive at once (so the check can see it), and without
/// it the new one's workers are only asked for once every worker of the
/// old one is gone.
#[test]
fn the_harness_sees_generations_alive_together() {
    for workers in [1, 3] {
        for alone in [false, true] {
            let mut run = Run::upgrading(workers, alone);
            let ctx = format!("workers: {workers}, alone: {alone}");
            assert_eq!(run.w.alive().len(), if alone { 1 } else { 2 }, "{ctx}");
            for n in 0..workers as usize {
                assert!(run.w.pending.is_empty() || !alone, "{ctx}");
                run.apply(&Op::Exit {
                    n,
                    group_empty: true,
                    code: 0,
                });
            }
            let new: Vec<(GenId, u32)> = (0..workers).map(|w| (GenId(2), w)).collect();
            assert_eq!(run.w.pending, new, "{ctx}");
            run.settle();
        }
    }
}

/// Positive control for the priority checks: with workers, every worker of
/// a lowered candidate is known lowered and unanswered once spawned, each
/// gets its restore asked for once all are ready, and only the last answer
/// moves the traffic.
#[test]
fn the_harness_sees_every_worker_lowered_until_answered() {
    let mut run = Run::upgrading_at(3, false, true);
    for _ in 0..3 {
        run.apply(&Op::Resolve { n: 0, ok: true });
    }
    assert_eq!(run.w.unanswered.len(), 3);
    run.apply(&Op::ReadyCandidate);
    assert_eq!(run.w.restoring.len(), 3);
    for left in [2, 1] {
        run.apply(&Op::Restored {
            n: 0,
            ok: left == 2,
        });
        assert_eq!(run.w.unanswered.len(), left);
        assert_eq!(run.d.m.traffic().active, Some(GenId(1)));
    }
    run.apply(&Op::Restored { n: 0, ok: true });
    assert!(run.w.unanswered.is_empty());
    assert_eq!(run.d.m.traffic().active, Some(GenId(2)));
    // The one whose restore failed is still known lowered.
    assert_eq!(run.w.low.len(), 1);
    run.settle();
}
