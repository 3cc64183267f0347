//! Generations of several workers, input by input: ready when all are, one
//! deadline for the generation, a crashed worker restarted alone with its
//! own backoff, drain and stop reaching every worker's group.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use baton_core::*;
use common::*;

fn ms(n: u64) -> Time {
    Time::from_duration(Duration::from_millis(n))
}

fn spec_n(name: &str, readiness: Readiness, workers: u32) -> Spec<()> {
    let mut s = spec(name, readiness);
    s.settings.workers = workers;
    s
}

/// Generation 1 (`workers` workers, pids 100, 101, …) started, not ready.
fn started(mode: TrafficMode, workers: u32, readiness: Readiness) -> Driver {
    let mut d = Driver::with_mode(mode);
    d.step(Input::Start {
        spec: spec_n("v1", readiness, workers),
    });
    for i in 0..workers {
        d.spawned_worker(1, i, 100 + i as i32);
    }
    d
}

/// Generation 1 serving with `workers` workers, pids 100, 101, ….
fn serving_n(mode: TrafficMode, workers: u32) -> Driver {
    let mut d = started(mode, workers, Readiness::Notify);
    for i in 0..workers {
        d.ready(100 + i as i32);
    }
    assert!(matches!(d.phase(1), Phase::Serving { .. }));
    d
}

/// An upgrade to `workers` workers of release v2, spawned as 200, 201, ….
fn candidate_n(d: &mut Driver, workers: u32, options: UpgradeOptions) {
    d.command(Command::Upgrade {
        trigger: Trigger::Control,
        spec: Ok(spec_n("v2", Readiness::Notify, workers)),
        options,
    });
    for i in 0..workers {
        d.spawned_worker(2, i, 200 + i as i32);
    }
}

fn bake_60s() -> UpgradeOptions {
    UpgradeOptions {
        bake: Some(Duration::from_secs(60)),
        ..UpgradeOptions::default()
    }
}

fn up(pids: &[i32]) -> Vec<Worker> {
    pids.iter().map(|&pid| Worker::Up { pid: p(pid) }).collect()
}

#[test]
fn every_worker_is_spawned_and_the_generation_is_ready_when_all_are() {
    let mut d = Driver::new();
    assert_eq!(
        d.step(Input::Start {
            spec: spec_n("v1", Readiness::Notify, 3)
        }),
        [
            "1 requested Start",
            "traffic 1",
            "spawn 1",
            "spawn 1 w1",
            "spawn 1 w2"
        ]
    );
    assert_eq!(d.spawned_worker(1, 0, 100), ["1 spawned 100"]);
    assert_eq!(d.spawned_worker(1, 2, 102), ["1 spawned 102 w2"]);
    assert_eq!(d.spawned_worker(1, 1, 101), ["1 spawned 101 w1"]);
    // Two of three: not yet.
    assert_eq!(d.ready(100), Vec::<String>::new());
    assert_eq!(d.ready(102), Vec::<String>::new());
    assert!(matches!(d.phase(1), Phase::Starting { .. }));
    // Positive control: the last one makes it ready, named by that one.
    assert_eq!(d.ready(101), ["1 ready 101", "1 active 101"]);
    assert_eq!(d.phase(1), serving(&[100, 101, 102]));
    assert_eq!(d.m.procs()[&p(101)].worker, 1);
}

/// A `READY=1` counts for the worker whose process (or group) sent it,
/// and only once: the same worker saying it twice readies nobody else.
#[test]
fn a_ready_counts_for_its_own_worker_only() {
    let mut d = started(TrafficMode::Shared, 2, Readiness::Notify);
    assert_eq!(d.ready(100), Vec::<String>::new());
    assert_eq!(d.ready(100), Vec::<String>::new(), "worker 0 again");
    // A member of worker 1's group speaks for worker 1.
    assert_eq!(
        d.notify(150, Some(101), vec![Report::Ready]),
        ["1 ready 101", "1 active 101"]
    );
}

/// The ready timeout is the generation's: counted from its first worker's
/// start, the same deadline for the workers that start later.
#[test]
fn the_ready_timeout_applies_to_the_generation() {
    let mut d = Driver::serving();
    d.command(Command::Upgrade {
        trigger: Trigger::Control,
        spec: Ok(spec_n("v2", Readiness::Notify, 3)),
        options: UpgradeOptions::default(),
    });
    d.at(0);
    d.spawned_worker(2, 0, 200);
    d.at(500);
    d.spawned_worker(2, 1, 201);
    d.at(1000);
    d.spawned_worker(2, 2, 202);
    assert_eq!(d.m.poll_timeout(), Some(ms(3000)));
    d.ready(200);
    d.ready(202);
    assert_eq!(d.tick_at(2999), Vec::<String>::new());
    assert_eq!(
        d.tick_at(3000),
        [
            "signal-drain 200",
            "2 draining 200",
            "signal-drain 201",
            "2 draining 201",
            "signal-drain 202",
            "2 draining 202",
            "2 failed Timeout(3s)"
        ]
    );
    assert_eq!(d.m.traffic().active, Some(g(1)));
    assert_eq!(d.phase(1), serving(&[100]));
}

/// A worker of a candidate that exits before the generation is ready
/// fails the upgrade like a single process would; the others are drained;
/// the failure names that worker, whose stderr tells why.
#[test]
fn a_candidate_worker_exiting_during_startup_fails_the_upgrade() {
    let mut d = Driver::serving();
    candidate_n(&mut d, 3, UpgradeOptions::default());
    d.ready(200);
    assert_eq!(
        d.exited(201, 3),
        [
            "2 exited 201 w1",
            "release 201",
            "signal-drain 200",
            "2 draining 200",
            "signal-drain 202",
            "2 draining 202"
        ]
    );
    assert_eq!(
        d.step(Input::StderrClosed { pid: p(201) }),
        ["2 failed Exited(Code(3)) w1"]
    );
    assert_eq!(d.m.traffic().active, Some(g(1)));
    d.exited(200, 0);
    assert!(matches!(d.phase(2), Phase::Draining { .. }));
    d.exited(202, 0);
    assert!(matches!(
        d.phase(2),
        Phase::Finished {
            failure: Some(Failure::Exited(ExitStatus::Code(3))),
            ..
        }
    ));
}

/// One worker of the serving generation crashes: it alone is restarted,
/// with its own backoff; the others keep their processes and the
/// generation stays active; the restarted one rejoins once ready.
#[test]
fn a_crashed_worker_of_the_active_generation_is_restarted_alone() {
    let mut d = serving_n(TrafficMode::Shared, 3);
    d.at(50);
    assert_eq!(
        d.exited(101, 1),
        ["1 exited 101 w1", "release 101", "1 restarting 100ms #1 w1"]
    );
    assert_eq!(
        d.workers(1),
        [
            Worker::Up { pid: p(100) },
            Worker::Restarting { at: ms(150) },
            Worker::Up { pid: p(102) }
        ]
    );
    assert!(matches!(d.phase(1), Phase::Serving { .. }), "still serving");
    assert_eq!(d.m.traffic().active, Some(g(1)));
    assert_eq!(d.tick_at(150), ["spawn 1 w1"]);
    assert_eq!(d.spawned_worker(1, 1, 103), ["1 spawned 103 w1"]);
    assert_eq!(d.m.poll_timeout(), Some(ms(3150)), "its own ready deadline");
    // Ready again: no new activation, the generation never stopped.
    assert_eq!(
        d.ready(103),
        ["1 worker-ready 103 w1 Notify { from: Pid(103) }"]
    );
    assert_eq!(d.workers(1), up(&[100, 103, 102]));
    // Backoff is per worker: worker 1 again doubles, worker 2 starts at
    // the first step.
    d.at(200);
    assert_eq!(
        d.exited(103, 1),
        ["1 exited 103 w1", "release 103", "1 restarting 200ms #2 w1"]
    );
    assert_eq!(
        d.exited(102, 1),
        ["1 exited 102 w2", "release 102", "1 restarting 100ms #1 w2"]
    );
    let g1 = d.m.generation(g(1)).unwrap();
    assert_eq!(g1.restarts(), 3);
    assert_eq!(
        g1.records().iter().map(|r| r.restarts).collect::<Vec<_>>(),
        [0, 2, 1]
    );
    assert_eq!(d.m.spec(g(1)).unwrap().release, release("v1"));
}

/// A worker restarted alone that is not ready by its own deadline is
/// drained and restarted again with backoff; the others serve on.
#[test]
fn a_restarted_worker_that_never_becomes_ready_is_recycled() {
    let mut d = serving_n(TrafficMode::Shared, 2);
    d.exited(101, 1);
    d.tick_at(100);
    d.spawned_worker(1, 1, 102);
    assert_eq!(
        d.tick_at(3100),
        ["note recycling 1", "signal-drain 102", "1 draining 102"]
    );
    assert_eq!(d.ready(102), Vec::<String>::new(), "told to drain");
    assert_eq!(
        d.exited(102, 0),
        ["1 exited 102 w1", "release 102", "1 restarting 200ms #2 w1"]
    );
    assert_eq!(d.workers(1)[0], Worker::Up { pid: p(100) });
}

/// With no worker left ready, the active generation is starting again,
/// and is active again (one `active` event) once every worker is back.
#[test]
fn the_active_generation_with_no_worker_left_starts_again() {
    let mut d = serving_n(TrafficMode::Shared, 2);
    d.exited(100, 1);
    assert!(matches!(d.phase(1), Phase::Serving { .. }));
    d.exited(101, 1);
    assert!(matches!(d.phase(1), Phase::Starting { .. }));
    assert_eq!(d.tick_at(100), ["spawn 1", "spawn 1 w1"]);
    d.spawned_worker(1, 0, 102);
    d.spawned_worker(1, 1, 103);
    assert_eq!(d.ready(102), Vec::<String>::new());
    assert_eq!(d.ready(103), ["1 ready 103", "1 active 103"]);
}

/// Drain (here at cutover) signals every worker's group; each gets its
/// kill deadline; the generation is finished only when all have exited.
#[test]
fn drain_signals_every_worker_and_finishes_when_all_have_exited() {
    let mut d = serving_n(TrafficMode::Shared, 3);
    candidate_n(&mut d, 1, UpgradeOptions::default());
    d.at(1000);
    assert_eq!(
        d.ready(200),
        [
            "2 ready 200",
            "traffic 2",
            "2 active 200",
            "signal-drain 100",
            "1 draining 100",
            "signal-drain 101",
            "1 draining 101",
            "signal-drain 102",
            "1 draining 102",
            "2 succeeded"
        ]
    );
    for pid in [100, 101, 102] {
        assert_eq!(d.m.procs()[&p(pid)].kill_at, Some(ms(6000)));
    }
    // A drained worker that exits is not restarted.
    assert_eq!(d.exited(100, 0), ["1 exited 100", "release 100"]);
    d.exited(102, 0);
    assert!(matches!(d.phase(1), Phase::Draining { .. }));
    // The one left is killed at the deadline, alone.
    assert_eq!(d.tick_at(6000), ["signal-kill 101", "1 killed 101"]);
    d.step(Input::Exited {
        pid: p(101),
        status: ExitStatus::Signaled {
            signal: 9,
            core_dumped: false,
        },
        group_empty: true,
    });
    assert!(matches!(d.phase(1), Phase::Finished { failure: None, .. }));
}

#[test]
fn stop_drains_every_worker_and_drops_pending_restarts() {
    let mut d = serving_n(TrafficMode::Shared, 3);
    d.exited(101, 1);
    assert_eq!(
        d.command(Command::Stop),
        [
            "close-listeners",
            "signal-drain 100",
            "1 draining 100",
            "signal-drain 102",
            "1 draining 102",
            "reply stopping"
        ]
    );
    assert_eq!(d.tick_at(1000), Vec::<String>::new(), "no restart");
    d.exited(100, 0);
    d.exited(102, 0);
    assert!(d.m.is_done());
}

/// A probe checks the generation (it reaches whichever worker accepts),
/// once every worker runs; a result for an earlier run counts for
/// nothing. A worker restarted alone counts once it runs: no probe can
/// single it out.
#[test]
fn a_probe_checks_the_generation_once_every_worker_runs() {
    let mut d = Driver::new();
    d.step(Input::Start {
        spec: spec_n("v1", Readiness::Probe, 3),
    });
    assert_eq!(d.spawned_worker(1, 0, 100), ["1 spawned 100"]);
    assert_eq!(d.spawned_worker(1, 1, 101), ["1 spawned 101 w1"]);
    assert_eq!(
        d.spawned_worker(1, 2, 102),
        ["1 spawned 102 w2", "probe 1 102"]
    );
    // Worker 1 dies during the check: the run is abandoned...
    assert_eq!(
        d.exited(101, 1),
        [
            "1 exited 101 w1",
            "release 101",
            "stop-probe 1",
            "1 restarting 100ms #1 w1"
        ]
    );
    d.tick_at(100);
    assert_eq!(
        d.spawned_worker(1, 1, 103),
        ["1 spawned 103 w1", "probe 1 103"]
    );
    // ...and its late result counts for nothing.
    let probe = |d: &mut Driver, pid| {
        d.step(Input::Probe {
            gen: g(1),
            pid: p(pid),
            result: Ok("http /healthz 200".into()),
        })
    };
    assert_eq!(probe(&mut d, 102), Vec::<String>::new());
    assert_eq!(
        probe(&mut d, 103),
        ["stop-probe 1", "1 ready 103", "1 active 103"]
    );
    assert_eq!(d.workers(1), up(&[100, 103, 102]));
    d.exited(100, 1);
    d.tick_at(200);
    assert_eq!(
        d.spawned_worker(1, 0, 104),
        ["1 spawned 104", "1 worker-ready 104 Running"]
    );
    assert_eq!(d.workers(1), up(&[104, 103, 102]));
}

/// A failing probe of the active generation's start recycles every worker
/// not ready; each restarts as it exits.
#[test]
fn a_failing_probe_recycles_the_active_generations_workers() {
    let mut d = started(TrafficMode::Shared, 2, Readiness::Probe);
    assert_eq!(
        d.step(Input::Probe {
            gen: g(1),
            pid: p(101),
            result: Err("answered 500".into()),
        }),
        [
            "stop-probe 1",
            "note recycling 1",
            "signal-drain 100",
            "1 draining 100",
            "signal-drain 101",
            "1 draining 101"
        ]
    );
    assert_eq!(
        d.exited(100, 0),
        ["1 exited 100", "release 100", "1 restarting 100ms #1"]
    );
}

#[test]
fn delay_readiness_is_per_worker() {
    let mut d = Driver::new();
    d.step(Input::Start {
        spec: spec_n("v1", Readiness::Delay(Duration::from_millis(10)), 2),
    });
    d.at(0);
    d.spawned_worker(1, 0, 100);
    d.at(5);
    d.spawned_worker(1, 1, 101);
    assert_eq!(d.tick_at(10), Vec::<String>::new());
    assert_eq!(d.workers(1)[0], Worker::Up { pid: p(100) });
    assert_eq!(d.tick_at(15), ["1 ready 101", "1 active 101"]);
}

#[test]
fn a_restart_request_recycles_every_worker() {
    let mut d = serving_n(TrafficMode::Shared, 2);
    assert_eq!(
        d.command(Command::Restart),
        [
            "note restart 1",
            "signal-drain 100",
            "1 draining 100",
            "signal-drain 101",
            "1 draining 101",
            "reply restarting 1"
        ]
    );
    assert_eq!(
        d.exited(101, 0),
        ["1 exited 101 w1", "release 101", "1 restarting 100ms #1 w1"]
    );
}

/// A candidate whose second worker cannot be started fails at once; the
/// worker already running is drained (it may have accepted clients).
#[test]
fn a_candidate_worker_that_cannot_start_fails_the_upgrade() {
    let mut d = Driver::serving();
    d.command(Command::Upgrade {
        trigger: Trigger::Control,
        spec: Ok(spec_n("v2", Readiness::Notify, 2)),
        options: UpgradeOptions::default(),
    });
    d.spawned_worker(2, 0, 200);
    assert_eq!(
        d.spawn_failed(2, 1, "no such file"),
        [
            "2 spawn-failed no such file",
            "signal-drain 200",
            "2 draining 200",
            "2 failed Spawn(\"no such file\")"
        ]
    );
    d.exited(200, 0);
    assert!(matches!(
        d.phase(2),
        Phase::Finished {
            failure: Some(Failure::Spawn(_)),
            ..
        }
    ));
}

/// Steered: a retired generation's workers keep accepting what is queued;
/// one of them exiting meanwhile is not restarted and leaves the others
/// retiring; the empty queue drains the rest.
#[test]
fn retiring_workers_are_drained_together_once_the_queue_is_empty() {
    let mut d = serving_n(TrafficMode::Steered, 2);
    candidate_n(&mut d, 1, UpgradeOptions::default());
    assert!(d.ready(200).contains(&"1 retiring 100".to_owned()));
    assert_eq!(d.exited(100, 1), ["1 exited 100", "release 100"]);
    assert!(matches!(d.phase(1), Phase::Retiring { .. }));
    assert_eq!(
        d.step(Input::QueueEmpty { gen: g(1) }),
        ["signal-drain 101", "1 draining 101"]
    );
    assert_eq!(
        d.exited(101, 0),
        ["1 exited 101 w1", "release 101", "free-sockets 1"]
    );
}

/// Steered, with a bake: a worker of the new generation dying rolls the
/// traffic back to the parked generation (its workers untouched) and the
/// new one's other workers are retired.
#[test]
fn a_worker_dying_during_the_bake_rolls_back() {
    let mut d = serving_n(TrafficMode::Steered, 2);
    candidate_n(&mut d, 2, bake_60s());
    d.ready(200);
    d.ready(201);
    assert_eq!(d.m.traffic().parked, Some(g(1)));
    assert_eq!(
        d.exited(201, 3),
        [
            "2 exited 201 w1",
            "release 201",
            "traffic 1",
            "2 rolled-back to 1 Died(Code(3))",
            "2 retiring 200",
            "watch-queue 2"
        ]
    );
    assert_eq!(d.phase(1), serving(&[100, 101]), "the same processes");
    assert_eq!(
        d.step(Input::StderrClosed { pid: p(201) }),
        ["2 failed Died(Code(3)) w1"]
    );
}

/// A parked generation that loses a worker is no longer what served: it
/// is drained whole, and there is nothing to roll back to.
#[test]
fn a_parked_generation_losing_a_worker_is_drained_whole() {
    let mut d = serving_n(TrafficMode::Steered, 2);
    candidate_n(&mut d, 1, bake_60s());
    d.ready(200);
    assert_eq!(
        d.exited(100, 1),
        [
            "1 exited 100",
            "release 100",
            "note parked-exited 1",
            "traffic 2",
            "signal-drain 101",
            "1 draining 101"
        ]
    );
    assert_eq!(d.m.traffic().parked, None);
    assert_eq!(d.command(Command::Rollback), ["reply busy 2"]);
}

/// A generation restarting a worker at the cutover is not parked (it is
/// not whole) but retired; its pending restart is dropped. (Found by the
/// property test: it used to be parked, then drained by its restart timer
/// while still in the traffic plan.)
#[test]
fn a_generation_missing_a_worker_is_retired_not_parked() {
    let mut d = serving_n(TrafficMode::Steered, 2);
    d.exited(101, 1);
    candidate_n(&mut d, 1, bake_60s());
    assert_eq!(
        d.ready(200),
        [
            "2 ready 200",
            "traffic 2",
            "2 active 200",
            "1 retiring 100",
            "watch-queue 1",
            "2 succeeded"
        ]
    );
    assert_eq!(d.m.traffic().parked, None);
    assert_eq!(d.tick_at(100), Vec::<String>::new(), "no restart");
    // Positive control: a whole generation is parked.
    let mut d = serving_n(TrafficMode::Steered, 2);
    candidate_n(&mut d, 1, bake_60s());
    d.ready(200);
    assert_eq!(d.m.traffic().parked, Some(g(1)));
}

/// During a bake with nothing parked, the new generation restarts its
/// workers like any active one, even when a restart's spawn fails (which
/// once ended the active generation).
#[test]
fn a_failed_restart_during_a_bake_with_nothing_parked_is_retried() {
    let mut d = Driver::serving_in(TrafficMode::Steered);
    candidate_n(&mut d, 2, bake_60s());
    d.ready(200);
    d.ready(201);
    d.exited(100, 0);
    assert_eq!(d.m.traffic().parked, None);
    d.exited(201, 1);
    assert_eq!(d.tick_at(100), ["spawn 2 w1"]);
    assert_eq!(
        d.spawn_failed(2, 1, "no such file"),
        ["2 spawn-failed no such file", "2 restarting 200ms #2 w1"]
    );
    assert_eq!(d.m.traffic().active, Some(g(2)));
    assert!(matches!(d.phase(2), Phase::Serving { .. }));
    assert!(d.m.upgrade().is_some(), "the bake goes on");
}

// ----- without overlap ---------------------------------------------------

/// Generation 1 of an app that cannot run twice, serving with `workers`
/// workers (pids 100, 101, …); then an upgrade to `workers` workers of v2.
fn replacing_n(mode: TrafficMode, workers: u32) -> (Driver, Vec<String>) {
    let mut d = Driver::with_mode(mode);
    let mut first = spec_n("v1", Readiness::Notify, workers);
    first.settings.overlap = Overlap::None;
    d.step(Input::Start { spec: first });
    for i in 0..workers {
        d.spawned_worker(1, i, 100 + i as i32);
        d.ready(100 + i as i32);
    }
    let mut next = spec_n("v2", Readiness::Notify, workers);
    next.settings.overlap = Overlap::None;
    let fx = d.upgrade_spec(next, UpgradeOptions::default());
    (d, fx)
}

/// Without overlap, every worker of the old generation is drained and gone
/// (its whole group) before any worker of the new one is asked for; then
/// all N start, and the new generation has taken over once all are ready.
#[test]
fn without_overlap_every_old_worker_is_gone_before_the_new_workers_start() {
    let (mut d, fx) = replacing_n(TrafficMode::Steered, 3);
    assert_eq!(
        fx,
        [
            "2 requested Control",
            "pass-sockets 1 2",
            "traffic 2",
            "signal-drain 100",
            "1 draining 100",
            "signal-drain 101",
            "1 draining 101",
            "signal-drain 102",
            "1 draining 102",
            "reply upgrading 2"
        ]
    );
    assert_eq!(d.phase(2), Phase::Waiting);
    assert_eq!(d.exited(100, 0), ["1 exited 100", "release 100"]);
    assert_eq!(d.exited_leaving_group(102, 0), ["1 exited 102 w2"]);
    assert_eq!(d.exited(101, 0), ["1 exited 101 w1", "release 101"]);
    assert_eq!(d.phase(2), Phase::Waiting, "a member of 102's group runs");
    assert_eq!(
        d.step(Input::GroupEmpty { pid: p(102) }),
        ["release 102", "spawn 2", "spawn 2 w1", "spawn 2 w2"]
    );
    for i in 0..3 {
        d.spawned_worker(2, i, 200 + i as i32);
    }
    assert_eq!(d.ready(200), Vec::<String>::new());
    assert_eq!(d.ready(202), Vec::<String>::new());
    assert_eq!(d.ready(201), ["2 ready 201", "2 active 201", "2 succeeded"]);
    assert_eq!(
        d.phase(2),
        Phase::Serving {
            workers: up(&[200, 201, 202])
        }
    );
}

/// Without overlap, a worker of the new generation dying while it starts
/// brings the previous release back with all its workers, once nothing of
/// the new one runs; the failure, naming the worker, is reported once
/// every restored worker has been started (or could not be).
#[test]
fn without_overlap_a_dying_worker_restores_the_previous_release_whole() {
    let (mut d, _) = replacing_n(TrafficMode::Steered, 3);
    for pid in [100, 101, 102] {
        d.exited(pid, 0);
    }
    for i in 0..3 {
        d.spawned_worker(2, i, 200 + i as i32);
    }
    d.ready(200);
    assert_eq!(
        d.exited(201, 3),
        [
            "2 exited 201 w1",
            "release 201",
            "3 requested Rollback",
            "pass-sockets 2 3",
            "traffic 3",
            "2 rolled-back to 3 Exited(Code(3))",
            "signal-drain 200",
            "2 draining 200",
            "signal-drain 202",
            "2 draining 202"
        ]
    );
    assert_eq!(d.m.spec(g(3)).unwrap().release, release("v1"));
    assert_eq!(d.m.spec(g(3)).unwrap().settings.workers, 3);
    assert_eq!(d.exited(200, 0), ["2 exited 200", "release 200"]);
    assert_eq!(
        d.exited(202, 0),
        [
            "2 exited 202 w2",
            "release 202",
            "spawn 3",
            "spawn 3 w1",
            "spawn 3 w2"
        ]
    );
    assert_eq!(d.spawned_worker(3, 0, 300), ["3 spawned 300"]);
    // The restored generation is the active one: a worker that cannot
    // start is restarted, not given up.
    assert_eq!(
        d.spawn_failed(3, 1, "no such file"),
        ["3 spawn-failed no such file", "3 restarting 100ms #1 w1"]
    );
    assert!(d.m.upgrade().is_some(), "not reported before every worker");
    assert_eq!(
        d.spawned_worker(3, 2, 302),
        ["3 spawned 302 w2", "2 failed Exited(Code(3)) w1"]
    );
    assert!(d.m.upgrade().is_none());
    assert_eq!(d.tick_at(100), ["spawn 3 w1"]);
    d.spawned_worker(3, 1, 301);
    d.ready(300);
    d.ready(302);
    assert_eq!(d.ready(301), ["3 ready 301", "3 active 301"]);
}

/// Without overlap, a new worker that cannot be started fails the upgrade
/// like an exit would (the new generation owns the traffic before it is
/// ever ready, yet it is not restarted as an active one would be).
#[test]
fn without_overlap_a_new_worker_that_cannot_start_restores_the_previous_release() {
    let (mut d, _) = replacing_n(TrafficMode::Shared, 2);
    d.exited(100, 0);
    d.exited(101, 0);
    d.spawned_worker(2, 0, 200);
    assert_eq!(
        d.spawn_failed(2, 1, "no such file"),
        [
            "2 spawn-failed no such file",
            "signal-drain 200",
            "2 draining 200",
            "3 requested Rollback",
            "traffic 3",
            "2 rolled-back to 3 Spawn(\"no such file\")"
        ]
    );
    assert_eq!(
        d.exited(200, 0),
        ["2 exited 200", "release 200", "spawn 3", "spawn 3 w1"]
    );
}
