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
        2 => (any::<bool>(), 0..3u8, 0..4u8, any::<bool>(), prop::bool::weighted(0.3), any::<bool>()).prop_map(|(signal, readiness, style, health, alone, low)| Op::Upgrade { signal, readiness, style, health, alone, low }),
        1 => Just(Op::Rollback),
        1 => Just(Op::Promote),
        1 => Just(Op::Restart),
        2 => n.clone().prop_map(|n| Op::QueueEmpty { n }),
        2 => (n.clone(), prop::bool::weighted(0.6)).prop_map(|(n, ok)| Op::Health { n, ok }),
        1 => Just(Op::Stop),
        4 => (n.clone(), prop::bool::weighted(0.85)).prop_map(|(n, ok)| Op::Resolve { n, ok }),
        3 => (n.clone(), any::<bool>(), 0..3i32).prop_map(|(n, group_empty, code)| Op::Exit { n, group_empty, code }),
        2 => n.clone().prop_map(|n| Op::GroupEmpty { n }),
        3 => (n.clone(), any::<bool>()).prop_map(|(n, member)| Op::Ready { n, member }),
        2 => (n.clone(), any::<bool>()).prop_map(|(n, ok)| Op::Probe { n, ok }),
        2 => Just(Op::ReadyCandidate),
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
    pending: Vec<GenId>,
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
    /// Generations whose last spawn asked for a lowered CPU priority.
    lowered: BTreeSet<GenId>,
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
            .chain(self.pending.iter().copied())
            .collect()
    }
}

struct Run {
    d: Driver,
    w: World,
    steps: usize,
}

impl Run {
    /// The first generation's configuration says whether it can run twice.
    fn starting(mode: TrafficMode, alone: bool) -> Self {
        let mut r = Self {
            d: Driver::with_mode(mode),
            w: World {
                next_pid: 100,
                ..World::default()
            },
            steps: 0,
        };
        let mut first = spec("v0", Readiness::Notify);
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
                let gen = self.w.pending.remove(n % self.w.pending.len());
                if ok {
                    let pid = Pid(self.w.next_pid);
                    self.w.next_pid += 1;
                    self.w.started.push((pid, gen));
                    if self.w.lowered.contains(&gen) {
                        self.w.low.insert(pid);
                        self.w.unanswered.insert(pid);
                    }
                    self.feed(Input::Spawned { gen, pid });
                } else {
                    self.feed(Input::SpawnFailed {
                        gen,
                        error: "no such file".into(),
                    });
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
                let starting = self.d.m.upgrade().and_then(|u| {
                    match self.d.m.generation(u.candidate)?.phase() {
                        Phase::Starting { pid, .. } => Some(*pid),
                        _ => None,
                    }
                });
                if let Some(pid) = starting {
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

    fn command(&mut self, command: Command<()>) {
        self.feed(Input::Command {
            id: RequestId(self.steps as u64),
            command,
        });
    }

    /// Which generation, if any, this READY or probe result may promote:
    /// one whose current main process is the sender's (or its group's)
    /// and is still running.
    fn promotable(&self, input: &Input<()>) -> Option<GenId> {
        let (candidates, probe): (Vec<Pid>, bool) = match input {
            Input::Notify { pid, pgid, reports } if reports.contains(&Report::Ready) => {
                ([Some(*pid), *pgid].into_iter().flatten().collect(), false)
            }
            Input::Probe {
                pid, result: Ok(_), ..
            } => (vec![*pid], true),
            _ => return None,
        };
        self.d.m.generations().find_map(|g| match g.phase() {
            Phase::Starting { pid, check, .. }
                if candidates.contains(pid)
                    && !self.w.exited.contains(pid)
                    && (*check == Check::Probe) == probe
                    && !matches!(check, Check::Delay { .. }) =>
            {
                Some(g.id())
            }
            _ => None,
        })
    }

    fn feed(&mut self, input: Input<()>) {
        self.steps += 1;
        let may_promote = self.promotable(&input);
        let is_tick = input == Input::Tick;
        let now = Time::from_duration(Duration::from_millis(self.w.now_ms));
        let before_active = self.d.m.traffic().active;
        let effects = self.d.m.step(input.clone(), now);
        let ctx = || format!("after {input:?}\neffects: {effects:#?}");

        for e in &effects {
            match e {
                Effect::Spawn { gen, priority } => {
                    // Lowered only beside another generation that serves.
                    if *priority == CpuPriority::Normal {
                        self.w.lowered.remove(gen);
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
                        self.w.lowered.insert(*gen);
                    }
                    // Spawning, or drained since (stop, cutover) with the
                    // spawn still owed an answer.
                    assert!(
                        matches!(
                            self.d.m.generation(*gen).map(|g| g.phase()),
                            Some(
                                Phase::Spawning
                                    | Phase::Draining {
                                        spawn_pending: true,
                                        ..
                                    }
                            )
                        ),
                        "spawn for a generation not spawning; {}",
                        ctx()
                    );
                    self.w.pending.push(*gen);
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
                Effect::RestorePriority { gen, pid } => {
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
        // it takes none before its restore is answered (and one whose
        // restore failed shows it). With shared sockets, taking traffic is
        // being active (the old generation drained).
        let plan = m.traffic().clone();
        for g in m.generations() {
            if let Phase::Serving { pid } = g.phase() {
                let id = g.id();
                let takes_traffic = plan.active == Some(id)
                    || plan.candidate.is_some_and(|c| c.gen == id && c.share > 0)
                    || plan.parked == Some(id);
                assert!(
                    !(takes_traffic && self.w.unanswered.contains(pid)),
                    "generation {id} takes traffic at a lowered priority; {}",
                    ctx()
                );
                assert_eq!(
                    g.priority() != CpuPriority::Normal,
                    self.w.low.contains(pid),
                    "generation {id} shows priority {:?}; {}",
                    g.priority(),
                    ctx()
                );
            }
        }
        if let Some(up) = m.upgrade() {
            if up.phase == UpgradePhase::Raising {
                let restoring = self.w.restoring.iter().any(|(g, _)| *g == up.candidate);
                assert!(restoring, "raising with no restore asked for; {}", ctx());
            }
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
                let raising = m
                    .upgrade()
                    .is_some_and(|u| u.candidate == id && u.phase == UpgradePhase::Raising);
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
        // A generation's main process is one it started and still runs.
        for g in m.generations() {
            if let Some(pid) = g.main_pid() {
                assert!(!self.w.exited.contains(&pid), "{}", ctx());
                assert_eq!(
                    m.procs().get(&pid).map(|p| p.gen),
                    Some(g.id()),
                    "{}",
                    ctx()
                );
            }
        }
    }

    /// Stops and lets everything end: the machine must get done.
    fn settle(&mut self) {
        self.command(Command::Stop);
        for _ in 0..100 {
            if self.d.m.is_done() {
                return;
            }
            while let Some(gen) = self.w.pending.pop() {
                let pid = Pid(self.w.next_pid);
                self.w.next_pid += 1;
                self.w.started.push((pid, gen));
                self.feed(Input::Spawned { gen, pid });
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
        alone in prop::bool::weighted(0.3),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mode = if steered { TrafficMode::Steered } else { TrafficMode::Shared };
        let mut run = Run::starting(mode, alone);
        for op in &ops {
            run.apply(op);
        }
        run.settle();
    }
}

impl Run {
    /// Steered; the first generation started and ready, then an upgrade
    /// requested; both configurations say whether the app can run twice.
    fn upgrading(alone: bool) -> Run {
        let mut run = Run::starting(TrafficMode::Steered, alone);
        run.apply(&Op::Resolve { n: 0, ok: true });
        run.apply(&Op::Ready {
            n: 0,
            member: false,
        });
        run.apply(&Op::Upgrade {
            signal: false,
            readiness: 0,
            style: 0,
            health: false,
            alone,
            low: false,
        });
        run
    }
}

/// Positive control for the harness: the sequence that promotes a
/// candidate does produce a Ready event, so the promotion check is live.
#[test]
fn the_harness_sees_a_promotion() {
    let mut run = Run::upgrading(false);
    run.apply(&Op::Resolve { n: 0, ok: true });
    run.apply(&Op::Ready { n: 1, member: true });
    assert_eq!(run.d.m.traffic().active, Some(GenId(2)));
    run.settle();
}

/// Positive control for the no-overlap check: with overlap two
/// generations are alive at once (so the check can see it), and without
/// it the new one is only asked for once the old one is gone.
#[test]
fn the_harness_sees_generations_alive_together() {
    for alone in [false, true] {
        let mut run = Run::upgrading(alone);
        assert_eq!(
            run.w.alive().len(),
            if alone { 1 } else { 2 },
            "alone: {alone}"
        );
        run.apply(&Op::Exit {
            n: 0,
            group_empty: true,
            code: 0,
        });
        assert_eq!(run.w.pending, [GenId(2)], "alone: {alone}");
        run.settle();
    }
}
