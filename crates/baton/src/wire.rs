//! From the machine's values to the control protocol's: events, status,
//! and the words users read (signal names, durations, failure reasons).
//! The internal state is not the wire type; this is the one place that
//! maps one to the other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use baton_core::{
    CpuPriority, EventKind as Core, ExitStatus, Failure, GenId, Generation, Machine, Phase, Time,
    TrafficMode, TrafficPlan, Via, Worker,
};

use crate::config::Config;
use crate::process::StderrTail;
use crate::protocol::{
    Event, EventKind, GenState, GenerationStatus, ReleasesStatus, Role, SocketStatus, Status,
    Trigger, WorkerState, WorkerStatus,
};

pub fn core_trigger(t: Trigger) -> baton_core::Trigger {
    match t {
        Trigger::Start => baton_core::Trigger::Start,
        Trigger::Control => baton_core::Trigger::Control,
        Trigger::Signal => baton_core::Trigger::Signal,
        Trigger::Rollback => baton_core::Trigger::Rollback,
    }
}

fn wire_trigger(t: baton_core::Trigger) -> Trigger {
    match t {
        baton_core::Trigger::Start => Trigger::Start,
        baton_core::Trigger::Control => Trigger::Control,
        baton_core::Trigger::Signal => Trigger::Signal,
        baton_core::Trigger::Rollback => Trigger::Rollback,
    }
}

/// "exit status 3", "killed by SIGKILL (core dumped)".
pub fn status_words(status: ExitStatus) -> String {
    match status {
        ExitStatus::Code(c) => format!("exit status {c}"),
        ExitStatus::Signaled {
            signal,
            core_dumped,
        } => {
            let name = nix::sys::signal::Signal::try_from(signal)
                .map_or_else(|_| format!("signal {signal}"), |s| s.as_str().to_owned());
            format!(
                "killed by {name}{}",
                if core_dumped { " (core dumped)" } else { "" }
            )
        }
    }
}

fn duration_words(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Why generation `gen` was abandoned, in a sentence.
pub fn failure_words(gen: GenId, failure: &Failure) -> String {
    match failure {
        Failure::Spawn(e) => format!("cannot start generation {gen}: {e}"),
        Failure::Exited(status) => format!(
            "generation {gen} exited before it was ready ({})",
            status_words(*status)
        ),
        Failure::Timeout(d) => format!("not ready within {}", duration_words(*d)),
        Failure::Check(reason) => reason.clone(),
        Failure::Died(status) => format!("generation {gen} exited ({})", status_words(*status)),
        Failure::Unhealthy(reason) => {
            format!("generation {gen} failed its health checks: {reason}")
        }
        Failure::RolledBack => "rolled back on request".into(),
        Failure::Stopping => "the supervisor is stopping".into(),
    }
}

fn via_words(via: &Via) -> String {
    match via {
        Via::Notify { from } => format!("notify READY=1 from pid {from}"),
        Via::Probe(words) => words.clone(),
        Via::Delay(d) => format!("delay {}", duration_words(*d)),
        Via::Running => "running (a probe cannot single out one worker)".into(),
    }
}

/// The wire form of a machine event that happened at `now`. `tails` are
/// the stderr tails of each worker's latest process.
pub fn event(
    ev: &baton_core::Event,
    machine: &Machine<Arc<Config>>,
    tails: &BTreeMap<(GenId, u32), StderrTail>,
    now: Time,
) -> Event {
    let gen = ev.gen;
    let spec = machine.spec(gen);
    // Worker numbers are shown only where there is more than one worker.
    let several = spec.is_some_and(|s| s.settings.workers > 1);
    let worker = |w: u32| several.then_some(w);
    let kind = match &ev.kind {
        Core::Requested { trigger } => EventKind::UpgradeRequested {
            trigger: wire_trigger(*trigger),
        },
        Core::Spawned { pid, worker: w } => EventKind::Spawned {
            pid: pid.0,
            dir: spec.map_or_else(String::new, |s| s.release.dir.display().to_string()),
            worker: worker(*w),
        },
        Core::SpawnFailed { error } => EventKind::SpawnFailed {
            error: error.clone(),
        },
        Core::Ready { pid, via } => EventKind::Ready {
            pid: pid.0,
            via: via_words(via),
        },
        Core::WorkerReady { worker, pid, via } => EventKind::WorkerReady {
            worker: *worker,
            pid: pid.0,
            via: via_words(via),
        },
        Core::Active { pid } => EventKind::Active { pid: Some(pid.0) },
        Core::CanaryStarted { share } => EventKind::Canary { share: *share },
        Core::BakeStarted { parked, bake } => EventKind::Bake {
            parked: parked.0,
            bake_ms: bake.as_millis() as u64,
        },
        Core::RolledBack { to, failure } => EventKind::RolledBack {
            to: to.0,
            reason: failure_words(gen, failure),
        },
        Core::Retiring { pid } => EventKind::Retiring { pid: pid.0 },
        Core::Draining { pid } => EventKind::Draining {
            pid: pid.0,
            signal: spec
                .map_or("SIGTERM", |s| s.payload.drain_signal.0.as_str())
                .to_owned(),
        },
        Core::Killed { pid } => EventKind::Killed { pid: pid.0 },
        Core::Exited {
            pid,
            status,
            worker: w,
        } => EventKind::Exited {
            pid: pid.0,
            status: status_words(*status),
            worker: worker(*w),
        },
        Core::Restarting {
            worker: w,
            delay,
            restarts,
        } => EventKind::Restarting {
            delay_ms: delay.as_millis() as u64,
            restarts: *restarts,
            worker: worker(*w),
        },
        Core::Status { text } => EventKind::Status { text: text.clone() },
        Core::Stopping { pid } => EventKind::Stopping { pid: pid.0 },
        Core::UpgradeSucceeded => EventKind::UpgradeSucceeded,
        Core::UpgradeFailed { failure, worker } => EventKind::UpgradeFailed {
            reason: failure_words(gen, failure),
            // The worker that died, else the first.
            stderr_tail: tails
                .get(&(gen, worker.unwrap_or(0)))
                .map(StderrTail::lines)
                .unwrap_or_default(),
        },
    };
    Event {
        time_us: crate::supervisor::wall_us(),
        generation: gen.0,
        upgrade: ev.upgrade.map(|u| u.id.0),
        elapsed_us: ev.upgrade.map(|u| now.since(u.started).as_micros() as u64),
        kind,
    }
}

/// The releases root as the serving generation's configuration has it
/// (the file is re-read at every upgrade), else the newest one's.
fn releases_status(machine: &Machine<Arc<Config>>) -> Option<ReleasesStatus> {
    let spec = machine
        .traffic()
        .active
        .and_then(|a| machine.spec(a))
        .or_else(|| machine.generations().last().map(|g| g.spec()))?;
    let config = &spec.payload;
    config.releases_dir.as_ref().map(|dir| ReleasesStatus {
        dir: dir.display().to_string(),
        keep: config.keep_releases,
    })
}

/// The supervisor's state as `baton status` shows it. `pids` (the live
/// members of each worker's group) are filled in by the caller, off the
/// loop.
pub fn status(
    machine: &Machine<Arc<Config>>,
    sockets: &[SocketStatus],
    now: Time,
    uptime: Duration,
) -> Status {
    let plan = machine.traffic();
    let active = plan.active;
    Status {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        binary: Default::default(),
        handovers: 0,
        self_upgrade_error: None,
        uptime_ms: uptime.as_millis() as u64,
        stopping: machine.stopping(),
        sockets: sockets.to_vec(),
        traffic: match machine.mode() {
            TrafficMode::Steered => "steered",
            TrafficMode::Shared => "shared",
        }
        .to_owned(),
        active: active.map(|g| g.0),
        upgrading: machine.upgrade().map(|u| u.candidate.0),
        releases: releases_status(machine),
        rollback_to: machine
            .rollback_release()
            .map(|r| r.dir.display().to_string()),
        generations: machine
            .generations()
            .map(|g| {
                let workers = workers(machine, g, now);
                // The first running worker, whatever the phase (a draining
                // generation's too).
                let running = workers.iter().find(|w| w.pid.is_some());
                let state = gen_state(g, active);
                let spec = g.spec();
                let (role, share) = role_share(plan, g.id());
                let priority = workers.iter().find_map(|w| w.priority.clone());
                GenerationStatus {
                    number: g.id().0,
                    state,
                    pid: running.and_then(|w| w.pid),
                    pids: Vec::new(),
                    dir: spec.release.dir.display().to_string(),
                    command: spec.release.argv.clone(),
                    uptime_ms: running.and_then(|w| w.uptime_ms),
                    status_text: g.status_text().map(str::to_owned),
                    restarts: g.restarts(),
                    last_exit: g.last_exit().map(status_words),
                    workers,
                    role,
                    share,
                    priority,
                }
            })
            .collect(),
    }
}

/// Each worker of `g`: its state and running process (from the machine's
/// process groups once the generation no longer restarts workers), as
/// `baton status` (and the metrics) show them.
pub fn workers<P: Clone>(machine: &Machine<P>, g: &Generation<P>, now: Time) -> Vec<WorkerStatus> {
    let running = |i: u32| {
        machine
            .procs()
            .iter()
            .find(|(_, p)| p.gen == g.id() && p.worker == i && p.exit.is_none())
    };
    (0u32..)
        .zip(g.records())
        .map(|(i, record)| {
            let proc = running(i);
            let state = match (g.phase(), g.workers().and_then(|w| w.get(i as usize))) {
                (_, Some(Worker::Spawning | Worker::Starting { .. })) => WorkerState::Starting,
                (_, Some(Worker::Up { .. })) => WorkerState::Ready,
                (_, Some(Worker::Recycling { .. })) => WorkerState::Draining,
                (_, Some(Worker::Restarting { .. })) => WorkerState::Restarting,
                (Phase::Waiting, _) => WorkerState::Waiting,
                (Phase::Retiring { .. }, _) if proc.is_some_and(|(_, p)| p.kill_at.is_none()) => {
                    WorkerState::Retiring
                }
                _ if proc.is_some() => WorkerState::Draining,
                _ => WorkerState::Exited,
            };
            WorkerStatus {
                index: i,
                state,
                pid: proc.map(|(pid, _)| pid.0),
                uptime_ms: proc.map(|(_, p)| now.since(p.started).as_millis() as u64),
                restarts: record.restarts,
                last_exit: record.last_exit.map(status_words),
                priority: proc
                    .map(|(_, p)| p.priority)
                    .filter(|p| *p != CpuPriority::Normal)
                    .map(crate::config::candidate_priority_name),
            }
        })
        .collect()
}

/// A generation's state as `baton status` (and the metrics) name it.
pub fn gen_state<P>(g: &Generation<P>, active: Option<GenId>) -> GenState {
    match g.phase() {
        Phase::Waiting => GenState::Waiting,
        Phase::Starting { .. } => GenState::Starting,
        Phase::Retiring { .. } => GenState::Retiring,
        Phase::Serving { .. } if active == Some(g.id()) => GenState::Active,
        Phase::Serving { .. } => GenState::Ready,
        Phase::Draining { .. } => GenState::Draining,
        Phase::Finished { failure: None, .. } => GenState::Exited,
        Phase::Finished {
            failure: Some(_), ..
        } => GenState::Failed,
    }
}

/// Generation `id`'s part in the traffic plan, and its percent of new
/// connections.
pub fn role_share(plan: &TrafficPlan, id: GenId) -> (Option<Role>, Option<u8>) {
    if plan.active == Some(id) {
        let taken = plan.candidate.map_or(0, |c| c.share);
        (Some(Role::Active), Some(100 - taken.min(100)))
    } else if let Some(c) = plan.candidate.filter(|c| c.gen == id) {
        (Some(Role::Candidate), Some(c.share))
    } else if plan.parked == Some(id) {
        (Some(Role::Parked), Some(0))
    } else {
        (None, None)
    }
}

/// One log line per event, with the generation as a field.
pub fn log_event(ev: &Event) {
    use tracing::{info, warn};
    let gen = ev.generation;
    match &ev.kind {
        EventKind::UpgradeRequested { trigger } => {
            info!(generation = gen, ?trigger, "generation requested")
        }
        EventKind::Spawned { pid, dir, worker } => {
            info!(generation = gen, pid, dir, worker, "generation started")
        }
        EventKind::SpawnFailed { error } => {
            warn!(generation = gen, "generation failed to start: {error}")
        }
        EventKind::Ready { pid, via } => info!(generation = gen, pid, via, "generation ready"),
        EventKind::WorkerReady { worker, pid, via } => {
            info!(generation = gen, worker, pid, via, "worker ready again")
        }
        EventKind::Active { pid } => info!(generation = gen, pid, "generation active"),
        EventKind::Canary { share } => info!(generation = gen, share, "canary started"),
        EventKind::Bake { parked, bake_ms } => {
            info!(generation = gen, parked, bake_ms, "bake started")
        }
        EventKind::RolledBack { to, reason } => {
            warn!(generation = gen, to, "rolled back: {reason}")
        }
        EventKind::Traffic {
            active,
            candidate,
            share,
            parked,
        } => info!(
            generation = gen,
            // Recorded only when there is one: plain numbers in JSON logs.
            active = *active,
            candidate = *candidate,
            share,
            parked = *parked,
            "traffic"
        ),
        EventKind::Retiring { pid } => info!(generation = gen, pid, "generation retiring"),
        EventKind::Draining { pid, signal } => {
            info!(generation = gen, pid, signal, "generation draining")
        }
        EventKind::Killed { pid } => {
            warn!(generation = gen, pid, "drain timeout: generation killed")
        }
        EventKind::Exited {
            pid,
            status,
            worker,
        } => {
            info!(generation = gen, pid, status, worker, "generation exited")
        }
        EventKind::Restarting {
            delay_ms,
            restarts,
            worker,
        } => {
            warn!(
                generation = gen,
                delay_ms, restarts, worker, "restarting generation"
            )
        }
        EventKind::Status { text } => info!(generation = gen, status = text, "generation status"),
        EventKind::Stopping { pid } => {
            info!(generation = gen, pid, "generation reports STOPPING=1")
        }
        EventKind::UpgradeSucceeded => info!(generation = gen, "upgrade succeeded"),
        EventKind::UpgradeFailed { reason, .. } => {
            warn!(generation = gen, "upgrade failed: {reason}")
        }
    }
}
