//! A driver for the machine in tests: injected time, specs with short
//! timeouts, and effects rendered as short words so a test reads as the
//! list of inputs and the effects expected.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use baton_core::*;

pub fn g(n: u64) -> GenId {
    GenId(n)
}

pub fn p(n: i32) -> Pid {
    Pid(n)
}

pub fn release(name: &str) -> Release {
    Release {
        dir: format!("/srv/{name}").into(),
        program: format!("/srv/{name}/server").into(),
        argv: vec!["./server".into()],
    }
}

pub fn settings(readiness: Readiness) -> Settings {
    Settings {
        workers: 1,
        readiness,
        ready_timeout: Duration::from_secs(3),
        drain_timeout: Duration::from_secs(5),
        restart_backoff_max: Duration::from_secs(1),
        bake: Duration::ZERO,
        health: None,
        overlap: Overlap::Full,
        candidate_priority: CpuPriority::Normal,
    }
}

/// [`spec`] for an app that cannot run twice.
pub fn alone(name: &str, readiness: Readiness) -> Spec<()> {
    let mut s = spec(name, readiness);
    s.settings.overlap = Overlap::None;
    s
}

pub fn spec(name: &str, readiness: Readiness) -> Spec<()> {
    Spec {
        release: release(name),
        settings: settings(readiness),
        payload: (),
    }
}

pub struct Driver {
    pub m: Machine<()>,
    pub now: Time,
    next_req: u64,
}

impl Default for Driver {
    fn default() -> Self {
        Self::new()
    }
}

impl Driver {
    /// Shared sockets: the traffic plan steers nothing.
    pub fn new() -> Self {
        Self::with_mode(TrafficMode::Shared)
    }

    pub fn steered() -> Self {
        Self::with_mode(TrafficMode::Steered)
    }

    pub fn with_mode(mode: TrafficMode) -> Self {
        Self {
            m: Machine::new(mode),
            now: Time::ZERO,
            next_req: 1,
        }
    }

    /// Moves the clock to `ms` milliseconds.
    pub fn at(&mut self, ms: u64) -> &mut Self {
        self.now = Time::from_duration(Duration::from_millis(ms));
        self
    }

    pub fn step(&mut self, input: Input<()>) -> Vec<String> {
        self.m.step(input, self.now).iter().map(show).collect()
    }

    /// Ticks at `ms`, as the shell would at the machine's next timeout.
    pub fn tick_at(&mut self, ms: u64) -> Vec<String> {
        self.at(ms);
        self.step(Input::Tick)
    }

    pub fn command(&mut self, command: Command<()>) -> Vec<String> {
        let id = RequestId(self.next_req);
        self.next_req += 1;
        self.step(Input::Command { id, command })
    }

    pub fn upgrade(&mut self, name: &str, readiness: Readiness) -> Vec<String> {
        self.upgrade_with(name, readiness, UpgradeOptions::default())
    }

    pub fn upgrade_with(
        &mut self,
        name: &str,
        readiness: Readiness,
        options: UpgradeOptions,
    ) -> Vec<String> {
        self.command(Command::Upgrade {
            trigger: Trigger::Control,
            spec: Ok(spec(name, readiness)),
            options,
        })
    }

    pub fn sighup(&mut self, name: &str) -> Vec<String> {
        self.command(Command::Upgrade {
            trigger: Trigger::Signal,
            spec: Ok(spec(name, Readiness::Notify)),
            options: UpgradeOptions::default(),
        })
    }

    /// Worker 0 of `gen` runs as `pid`.
    pub fn spawned(&mut self, gen: u64, pid: i32) -> Vec<String> {
        self.spawned_worker(gen, 0, pid)
    }

    pub fn spawned_worker(&mut self, gen: u64, worker: u32, pid: i32) -> Vec<String> {
        self.step(Input::Spawned {
            gen: g(gen),
            worker,
            pid: p(pid),
        })
    }

    pub fn spawn_failed(&mut self, gen: u64, worker: u32, error: &str) -> Vec<String> {
        self.step(Input::SpawnFailed {
            gen: g(gen),
            worker,
            error: error.into(),
        })
    }

    pub fn ready(&mut self, pid: i32) -> Vec<String> {
        self.notify(pid, Some(pid), vec![Report::Ready])
    }

    pub fn notify(&mut self, pid: i32, pgid: Option<i32>, reports: Vec<Report>) -> Vec<String> {
        self.step(Input::Notify {
            pid: p(pid),
            pgid: pgid.map(p),
            reports,
        })
    }

    /// The shell answers [`Effect::RestorePriority`] for `gen`'s `pid`.
    pub fn restored(&mut self, gen: u64, pid: i32, restored: bool) -> Vec<String> {
        self.step(Input::PriorityRestored {
            gen: g(gen),
            pid: p(pid),
            restored,
        })
    }

    pub fn exited(&mut self, pid: i32, code: i32) -> Vec<String> {
        self.step(Input::Exited {
            pid: p(pid),
            status: ExitStatus::Code(code),
            group_empty: true,
        })
    }

    /// The first generation (release "v1", notify) started as pid 100
    /// and ready.
    pub fn serving() -> Self {
        Self::serving_in(TrafficMode::Shared)
    }

    pub fn serving_in(mode: TrafficMode) -> Self {
        Self::serving_spec(mode, spec("v1", Readiness::Notify))
    }

    /// The first generation, from `first`, started as pid 100 and ready.
    pub fn serving_spec(mode: TrafficMode, first: Spec<()>) -> Self {
        let mut d = Self::with_mode(mode);
        d.step(Input::Start { spec: first });
        d.spawned(1, 100);
        d.ready(100);
        d
    }

    /// An upgrade to `spec` requested over the control socket.
    pub fn upgrade_spec(&mut self, spec: Spec<()>, options: UpgradeOptions) -> Vec<String> {
        self.command(Command::Upgrade {
            trigger: Trigger::Control,
            spec: Ok(spec),
            options,
        })
    }

    /// The main process `pid` exits with others of its group still alive.
    pub fn exited_leaving_group(&mut self, pid: i32, code: i32) -> Vec<String> {
        self.step(Input::Exited {
            pid: p(pid),
            status: ExitStatus::Code(code),
            group_empty: false,
        })
    }

    pub fn phase(&self, gen: u64) -> Phase {
        self.m.generation(g(gen)).unwrap().phase().clone()
    }

    /// The workers of a starting or serving generation.
    pub fn workers(&self, gen: u64) -> Vec<Worker> {
        self.m
            .generation(g(gen))
            .unwrap()
            .workers()
            .unwrap_or_default()
            .to_vec()
    }
}

/// A serving generation whose workers are `pids`, all ready.
pub fn serving(pids: &[i32]) -> Phase {
    Phase::Serving {
        workers: pids.iter().map(|&pid| Worker::Up { pid: p(pid) }).collect(),
    }
}

/// ` wN` for workers after the first, so single-worker lists read as before.
fn w(worker: u32) -> String {
    if worker == 0 {
        String::new()
    } else {
        format!(" w{worker}")
    }
}

/// ` idle`, ` batch`, ` nice N` for a lowered priority; nothing for the
/// normal one.
fn lowered(priority: CpuPriority) -> String {
    match priority {
        CpuPriority::Normal => String::new(),
        CpuPriority::Nice(n) => format!(" nice {n}"),
        CpuPriority::Batch => " batch".into(),
        CpuPriority::Idle => " idle".into(),
    }
}

/// One effect in a few words.
pub fn show(e: &Effect) -> String {
    match e {
        Effect::Spawn {
            gen,
            worker,
            priority,
        } => format!("spawn {gen}{}{}", w(*worker), lowered(*priority)),
        Effect::RestorePriority {
            gen,
            worker,
            pid,
            from,
        } => format!(
            "restore-priority {gen} {pid}{}{}",
            w(*worker),
            lowered(*from)
        ),
        Effect::StartProbe { gen, pid } => format!("probe {gen} {pid}"),
        Effect::StopProbe { gen } => format!("stop-probe {gen}"),
        Effect::StartHealth { gen, pid } => format!("health {gen} {pid}"),
        Effect::StopHealth { gen } => format!("stop-health {gen}"),
        Effect::WatchQueue { gen } => format!("watch-queue {gen}"),
        Effect::FreeSockets { gen } => format!("free-sockets {gen}"),
        Effect::PassSockets { from, to } => format!("pass-sockets {from} {to}"),
        Effect::Signal { pid, signal } => match signal {
            Signal::Drain => format!("signal-drain {pid}"),
            Signal::Kill => format!("signal-kill {pid}"),
        },
        Effect::Release { pid } => format!("release {pid}"),
        Effect::Traffic(plan) => {
            let mut t = match plan.active {
                Some(a) => format!("traffic {a}"),
                None => "traffic none".into(),
            };
            if let Some(c) = plan.candidate {
                t.push_str(&format!(" candidate {}@{}", c.gen, c.share));
            }
            if let Some(p) = plan.parked {
                t.push_str(&format!(" parked {p}"));
            }
            t
        }
        Effect::CloseListeners => "close-listeners".into(),
        Effect::RequestUpgrade => "request-upgrade".into(),
        Effect::Reply { reply, .. } => match reply {
            Reply::Upgrading(gen) => format!("reply upgrading {gen}"),
            Reply::Refused(Refusal::Busy(gen)) => format!("reply busy {gen}"),
            Reply::Refused(Refusal::Stopping) => "reply refused-stopping".into(),
            Reply::Refused(Refusal::NoPrevious) => "reply no-previous".into(),
            Reply::Refused(Refusal::NothingToPromote) => "reply nothing-to-promote".into(),
            Reply::Refused(Refusal::NeedsSteering) => "reply needs-steering".into(),
            Reply::Refused(Refusal::NeedsOverlap) => "reply needs-overlap".into(),
            Reply::RolledBack(gen) => format!("reply rolled-back {gen}"),
            Reply::Promoting(gen) => format!("reply promoting {gen}"),
            Reply::Restarting(gen) => format!("reply restarting {gen}"),
            Reply::Stopping => "reply stopping".into(),
        },
        Effect::Event(ev) => {
            let gen = ev.gen;
            match &ev.kind {
                EventKind::Requested { trigger } => format!("{gen} requested {trigger:?}"),
                EventKind::Spawned { pid, worker } => format!("{gen} spawned {pid}{}", w(*worker)),
                EventKind::SpawnFailed { error } => format!("{gen} spawn-failed {error}"),
                EventKind::Ready { pid, .. } => format!("{gen} ready {pid}"),
                EventKind::WorkerReady { worker, pid, via } => {
                    format!("{gen} worker-ready {pid}{} {via:?}", w(*worker))
                }
                EventKind::Active { pid } => format!("{gen} active {pid}"),
                EventKind::CanaryStarted { share } => format!("{gen} canary {share}"),
                EventKind::BakeStarted { parked, bake } => {
                    format!("{gen} bake {}ms parked {parked}", bake.as_millis())
                }
                EventKind::RolledBack { to, failure } => {
                    format!("{gen} rolled-back to {to} {failure:?}")
                }
                EventKind::Retiring { pid } => format!("{gen} retiring {pid}"),
                EventKind::Draining { pid } => format!("{gen} draining {pid}"),
                EventKind::Killed { pid } => format!("{gen} killed {pid}"),
                EventKind::Exited { pid, worker, .. } => {
                    format!("{gen} exited {pid}{}", w(*worker))
                }
                EventKind::Restarting {
                    worker,
                    delay,
                    restarts,
                } => {
                    format!(
                        "{gen} restarting {}ms #{restarts}{}",
                        delay.as_millis(),
                        w(*worker)
                    )
                }
                EventKind::Status { text } => format!("{gen} status {text}"),
                EventKind::Stopping { pid } => format!("{gen} stopping {pid}"),
                EventKind::UpgradeSucceeded => format!("{gen} succeeded"),
                EventKind::UpgradeFailed { failure, worker } => match worker {
                    Some(n) if *n > 0 => format!("{gen} failed {failure:?} w{n}"),
                    _ => format!("{gen} failed {failure:?}"),
                },
            }
        }
        Effect::Note(n) => match n {
            Note::NotifyFromStranger { pid } => format!("note stranger {pid}"),
            Note::GroupOutlivesLeader { pid, .. } => format!("note outlives {pid}"),
            Note::KillingLeftovers { pid, .. } => format!("note leftovers {pid}"),
            Note::Recycling { gen, .. } => format!("note recycling {gen}"),
            Note::FollowUpUpgrade => "note follow-up".into(),
            Note::RestartRequested { gen } => format!("note restart {gen}"),
            Note::QueueNotEmpty { gen } => format!("note queue-not-empty {gen}"),
            Note::ParkedExited { gen } => format!("note parked-exited {gen}"),
            Note::HealthFailed { gen, failures, .. } => format!("note unhealthy {gen} #{failures}"),
        },
    }
}
