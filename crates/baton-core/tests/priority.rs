//! The CPU priority of an upgrade's candidate, input by input: started
//! lower only beside a generation that serves, and given the normal
//! priority back, with the traffic waiting for that, before it takes any.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use baton_core::*;
use common::*;

fn at(priority: CpuPriority) -> Spec<()> {
    let mut s = spec("v2", Readiness::Notify);
    s.settings.candidate_priority = priority;
    s
}

/// The priority process `pid` runs at, as the machine knows it.
fn priority_of(d: &Driver, pid: i32) -> CpuPriority {
    d.m.procs()[&p(pid)].priority
}

fn raising(d: &Driver) -> bool {
    matches!(
        d.m.upgrade().map(|u| &u.phase),
        Some(UpgradePhase::Raising { .. })
    )
}

#[test]
fn a_candidate_starts_lowered_and_takes_traffic_only_once_restored() {
    let mut d = Driver::serving_in(TrafficMode::Steered);
    assert_eq!(
        d.upgrade_spec(at(CpuPriority::Idle), UpgradeOptions::default()),
        [
            "2 requested Control",
            "spawn 2 idle",
            "traffic 1 candidate 2@0",
            "reply upgrading 2"
        ]
    );
    d.spawned(2, 200);
    assert_eq!(priority_of(&d, 200), CpuPriority::Idle);
    // Ready: the restore goes out, and nothing moves until it is done.
    assert_eq!(d.ready(200), ["2 ready 200", "restore-priority 2 200 idle"]);
    assert_eq!(d.m.traffic().active, Some(g(1)));
    assert!(raising(&d));
    assert_eq!(
        d.restored(2, 200, true),
        [
            "traffic 2",
            "2 active 200",
            "1 retiring 100",
            "watch-queue 1",
            "2 succeeded"
        ]
    );
    assert_eq!(priority_of(&d, 200), CpuPriority::Normal);
}

/// With shared sockets there is no plan to hold back, but the old
/// generation is told to drain only once the candidate is restored.
#[test]
fn with_shared_sockets_the_drain_waits_for_the_restore_too() {
    let mut d = Driver::serving();
    assert_eq!(
        d.upgrade_spec(at(CpuPriority::Nice(10)), UpgradeOptions::default()),
        [
            "2 requested Control",
            "spawn 2 nice 10",
            "reply upgrading 2"
        ]
    );
    d.spawned(2, 200);
    assert_eq!(
        d.ready(200),
        ["2 ready 200", "restore-priority 2 200 nice 10"]
    );
    let out = d.restored(2, 200, true);
    assert!(out.contains(&"2 active 200".to_owned()), "{out:?}");
    assert!(out.contains(&"signal-drain 100".to_owned()), "{out:?}");
}

#[test]
fn a_canary_is_restored_before_it_takes_its_share() {
    let mut d = Driver::serving_in(TrafficMode::Steered);
    let canary = UpgradeOptions {
        canary: Some(10),
        ..UpgradeOptions::default()
    };
    d.upgrade_spec(at(CpuPriority::Batch), canary);
    d.spawned(2, 200);
    assert_eq!(
        d.ready(200),
        ["2 ready 200", "restore-priority 2 200 batch"]
    );
    assert_eq!(
        d.restored(2, 200, true),
        ["traffic 1 candidate 2@10", "2 canary 10"]
    );
}

/// A restore that failed (the shell logs why) is no failed upgrade: the
/// traffic moves anyway, and the generation keeps showing its priority.
#[test]
fn a_failed_restore_is_not_fatal_and_stays_visible() {
    let mut d = Driver::serving_in(TrafficMode::Steered);
    d.upgrade_spec(at(CpuPriority::Idle), UpgradeOptions::default());
    d.spawned(2, 200);
    d.ready(200);
    let out = d.restored(2, 200, false);
    assert!(out.contains(&"2 active 200".to_owned()), "{out:?}");
    assert!(out.contains(&"2 succeeded".to_owned()), "{out:?}");
    assert_eq!(priority_of(&d, 200), CpuPriority::Idle);
}

/// Positive control for the tests above: at the normal priority nothing
/// is restored and the traffic moves at READY=1 itself.
#[test]
fn at_the_normal_priority_the_traffic_moves_at_ready() {
    let mut d = Driver::serving_in(TrafficMode::Steered);
    let out = d.upgrade_spec(at(CpuPriority::Normal), UpgradeOptions::default());
    assert!(out.contains(&"spawn 2".to_owned()), "{out:?}");
    d.spawned(2, 200);
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
}

#[test]
fn the_first_generation_starts_at_the_normal_priority() {
    let mut d = Driver::new();
    let mut first = at(CpuPriority::Idle);
    first.release = release("v1");
    assert_eq!(
        d.step(Input::Start { spec: first }),
        ["1 requested Start", "traffic 1", "spawn 1"]
    );
    d.spawned(1, 100);
    let out = d.ready(100);
    assert!(out.contains(&"1 active 100".to_owned()), "{out:?}");
    assert!(
        !out.iter().any(|e| e.starts_with("restore-priority")),
        "{out:?}"
    );
}

/// With nothing serving (the active generation crashed and waits to be
/// restarted), the candidate is what the clients wait for: full speed.
#[test]
fn with_nothing_serving_the_candidate_starts_at_the_normal_priority() {
    let mut d = Driver::serving_in(TrafficMode::Steered);
    assert_eq!(
        d.exited(100, 1),
        ["1 exited 100", "release 100", "1 restarting 100ms #1"]
    );
    let out = d.upgrade_spec(at(CpuPriority::Idle), UpgradeOptions::default());
    assert!(out.contains(&"spawn 2".to_owned()), "{out:?}");
    d.spawned(2, 200);
    let out = d.ready(200);
    assert!(out.contains(&"2 active 200".to_owned()), "{out:?}");
}

/// Without overlap the candidate starts once nothing else runs.
#[test]
fn without_overlap_the_candidate_starts_at_the_normal_priority() {
    let mut d = Driver::serving_in(TrafficMode::Steered);
    let mut s = at(CpuPriority::Idle);
    s.settings.overlap = Overlap::None;
    d.upgrade_spec(s, UpgradeOptions::default());
    d.step(Input::QueueEmpty { gen: g(1) });
    let out = d.exited(100, 0);
    assert!(out.contains(&"spawn 2".to_owned()), "{out:?}");
}

/// A crash restart of the new generation during its bake serves the
/// clients at once: it starts at the normal priority.
#[test]
fn a_crash_restart_during_the_bake_starts_at_the_normal_priority() {
    let mut d = Driver::serving_in(TrafficMode::Steered);
    let mut s = at(CpuPriority::Idle);
    s.settings.bake = Duration::from_secs(60);
    d.upgrade_spec(s, UpgradeOptions::default());
    d.spawned(2, 200);
    d.ready(200);
    let out = d.restored(2, 200, true);
    assert!(out.iter().any(|e| e.starts_with("2 bake")), "{out:?}");
    // Without a parked generation to roll back to (it exited), the new
    // generation's crash restarts it.
    d.exited(100, 0);
    let out = d.exited(200, 1);
    assert!(out.iter().any(|e| e.starts_with("2 restarting")), "{out:?}");
    let out = d.tick_at(1000);
    assert!(out.contains(&"spawn 2".to_owned()), "{out:?}");
    d.spawned(2, 201);
    assert_eq!(priority_of(&d, 201), CpuPriority::Normal);
}

/// A candidate that fails before it is ready takes no traffic and is
/// never restored.
#[test]
fn a_candidate_that_fails_is_not_restored() {
    let mut d = Driver::serving_in(TrafficMode::Steered);
    d.upgrade_spec(at(CpuPriority::Idle), UpgradeOptions::default());
    d.spawned(2, 200);
    let out = d.tick_at(3000);
    assert!(
        out.iter().any(|e| e.starts_with("2 failed Timeout")),
        "{out:?}"
    );
    assert!(
        !out.iter().any(|e| e.starts_with("restore-priority")),
        "{out:?}"
    );
}

/// The candidate's process exits while its priority is being restored:
/// the upgrade fails, the traffic never moved, and the late answer
/// changes nothing.
#[test]
fn a_candidate_exiting_while_restored_fails_and_the_answer_is_ignored() {
    let mut d = Driver::serving_in(TrafficMode::Steered);
    d.upgrade_spec(at(CpuPriority::Idle), UpgradeOptions::default());
    d.spawned(2, 200);
    d.ready(200);
    let out = d.exited(200, 1);
    assert!(out.contains(&"traffic 1".to_owned()), "{out:?}");
    assert_eq!(d.restored(2, 200, true), Vec::<String>::new());
    assert_eq!(d.m.traffic().active, Some(g(1)));
}

/// `rollback` while the candidate's priority is restored abandons it.
#[test]
fn a_rollback_while_restoring_abandons_the_candidate() {
    let mut d = Driver::serving_in(TrafficMode::Steered);
    d.upgrade_spec(at(CpuPriority::Idle), UpgradeOptions::default());
    d.spawned(2, 200);
    d.ready(200);
    let out = d.command(Command::Rollback);
    assert!(out.contains(&"reply rolled-back 2".to_owned()), "{out:?}");
    assert!(out.contains(&"signal-drain 200".to_owned()), "{out:?}");
    let out = d.restored(2, 200, true);
    assert!(!out.iter().any(|e| e.starts_with("traffic")), "{out:?}");
    assert_eq!(d.m.traffic().active, Some(g(1)));
}

/// An answer about another process (one that was replaced) moves nothing.
#[test]
fn an_answer_about_another_process_is_ignored() {
    let mut d = Driver::serving_in(TrafficMode::Steered);
    d.upgrade_spec(at(CpuPriority::Idle), UpgradeOptions::default());
    d.spawned(2, 200);
    d.ready(200);
    assert_eq!(d.restored(2, 999, true), Vec::<String>::new());
    assert_eq!(d.restored(1, 200, true), Vec::<String>::new());
    assert!(raising(&d));
    assert_eq!(priority_of(&d, 200), CpuPriority::Idle);
}

// ----- with workers ----------------------------------------------------------

/// Generation 1 serving with `old` workers (pids 100, …), then an upgrade
/// to `new` workers of v2 at idle priority, spawned as 200, ….
fn workers_upgrading(mode: TrafficMode, old: u32, new: u32) -> (Driver, Vec<String>) {
    let mut first = spec("v1", Readiness::Notify);
    first.settings.workers = old;
    let mut d = Driver::with_mode(mode);
    d.step(Input::Start { spec: first });
    for i in 0..old {
        d.spawned_worker(1, i, 100 + i as i32);
        d.ready(100 + i as i32);
    }
    let mut next = at(CpuPriority::Idle);
    next.settings.workers = new;
    let out = d.upgrade_spec(next, UpgradeOptions::default());
    for i in 0..new {
        d.spawned_worker(2, i, 200 + i as i32);
    }
    (d, out)
}

/// Every worker of the candidate starts lowered; once all are ready each
/// worker's group is restored, and the traffic (steered: the plan; shared:
/// the old generation's drain) moves only once the shell has answered for
/// every one of them, a failed restore counting as an answer.
#[test]
fn with_workers_every_worker_starts_lowered_and_the_traffic_waits_for_every_restore() {
    for mode in [TrafficMode::Steered, TrafficMode::Shared] {
        let (mut d, out) = workers_upgrading(mode, 2, 3);
        let spawns: Vec<&String> = out.iter().filter(|e| e.starts_with("spawn")).collect();
        assert_eq!(
            spawns,
            ["spawn 2 idle", "spawn 2 w1 idle", "spawn 2 w2 idle"],
            "{mode:?}"
        );
        for pid in [200, 201, 202] {
            assert_eq!(priority_of(&d, pid), CpuPriority::Idle, "{mode:?}");
        }
        assert_eq!(d.ready(200), Vec::<String>::new(), "{mode:?}");
        assert_eq!(d.ready(201), Vec::<String>::new(), "{mode:?}");
        assert_eq!(
            d.ready(202),
            [
                "2 ready 202",
                "restore-priority 2 200 idle",
                "restore-priority 2 201 w1 idle",
                "restore-priority 2 202 w2 idle"
            ],
            "{mode:?}"
        );
        // Answers in any order; nothing moves until the last.
        assert_eq!(d.restored(2, 202, true), Vec::<String>::new(), "{mode:?}");
        assert_eq!(d.restored(2, 200, false), Vec::<String>::new(), "{mode:?}");
        assert!(raising(&d), "{mode:?}");
        assert_eq!(d.m.traffic().active, Some(g(1)), "{mode:?}");
        let out = d.restored(2, 201, true);
        assert!(
            out.contains(&"2 active 202".to_owned()),
            "{mode:?}: {out:?}"
        );
        assert!(out.contains(&"2 succeeded".to_owned()), "{mode:?}: {out:?}");
        if mode == TrafficMode::Shared {
            for old in ["signal-drain 100", "signal-drain 101"] {
                assert!(out.contains(&old.to_owned()), "{mode:?}: {out:?}");
            }
        } else {
            assert!(out.contains(&"traffic 2".to_owned()), "{out:?}");
        }
        // The one whose restore failed keeps showing it; the others are
        // back at the normal priority.
        assert_eq!(priority_of(&d, 200), CpuPriority::Idle, "{mode:?}");
        assert_eq!(priority_of(&d, 201), CpuPriority::Normal, "{mode:?}");
        assert_eq!(priority_of(&d, 202), CpuPriority::Normal, "{mode:?}");
    }
}

/// A worker restarted alone runs at the normal priority: one of the old
/// generation while the lowered candidate starts beside it, and one of the
/// new generation once it serves.
#[test]
fn a_worker_restarted_alone_runs_at_the_normal_priority() {
    let (mut d, _) = workers_upgrading(TrafficMode::Steered, 2, 2);
    d.exited(101, 1);
    assert_eq!(d.tick_at(1000), ["spawn 1 w1"]);
    d.spawned_worker(1, 1, 102);
    assert_eq!(priority_of(&d, 102), CpuPriority::Normal);
    // The candidate is still lowered meanwhile.
    assert_eq!(priority_of(&d, 200), CpuPriority::Idle);
    d.ready(200);
    d.ready(201);
    d.restored(2, 200, true);
    let out = d.restored(2, 201, true);
    assert!(out.contains(&"2 succeeded".to_owned()), "{out:?}");
    // The new generation serves; its worker 1 crashes and comes back alone.
    let out = d.exited(201, 1);
    assert!(out.iter().any(|e| e.starts_with("2 restarting")), "{out:?}");
    assert_eq!(d.tick_at(5000), ["spawn 2 w1"]);
    d.spawned_worker(2, 1, 203);
    assert_eq!(priority_of(&d, 203), CpuPriority::Normal);
}

/// A worker of the candidate that exits while the others' priority is
/// being restored fails the upgrade: the traffic never moved, and the
/// answers that come after move nothing.
#[test]
fn a_worker_exiting_while_the_candidate_is_restored_fails_the_upgrade() {
    let (mut d, _) = workers_upgrading(TrafficMode::Steered, 1, 3);
    for pid in [200, 201, 202] {
        d.ready(pid);
    }
    assert!(raising(&d));
    d.restored(2, 200, true);
    let out = d.exited(201, 1);
    assert!(out.contains(&"traffic 1".to_owned()), "{out:?}");
    assert!(!raising(&d));
    for pid in [201, 202] {
        let out = d.restored(2, pid, true);
        assert!(!out.iter().any(|e| e.starts_with("traffic")), "{out:?}");
    }
    assert_eq!(d.m.traffic().active, Some(g(1)));
}

/// With a probe (one check for the generation) every worker counts as
/// ready at once, and every one is restored.
#[test]
fn with_a_probe_every_worker_is_restored_too() {
    let mut d = Driver::serving_in(TrafficMode::Steered);
    let mut next = at(CpuPriority::Batch);
    next.settings.readiness = Readiness::Probe;
    next.settings.workers = 2;
    d.upgrade_spec(next, UpgradeOptions::default());
    d.spawned_worker(2, 0, 200);
    assert_eq!(
        d.spawned_worker(2, 1, 201),
        ["2 spawned 201 w1", "probe 2 201"]
    );
    let out = d.step(Input::Probe {
        gen: g(2),
        pid: p(201),
        result: Ok("tcp accept".into()),
    });
    assert_eq!(
        out,
        [
            "stop-probe 2",
            "2 ready 201",
            "restore-priority 2 200 batch",
            "restore-priority 2 201 w1 batch"
        ]
    );
}
