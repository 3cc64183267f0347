//! Upgrades without overlap (`overlap = "none"`), input by input: the old
//! generation drains and is gone before the new one starts, on the same
//! sockets; a failed start brings the previous release back the same way.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use baton_core::*;
use common::*;

fn ms(n: u64) -> Time {
    Time::from_duration(Duration::from_millis(n))
}

/// Generation 1 (release "v1", cannot run twice) serving as pid 100.
fn serving(mode: TrafficMode) -> Driver {
    Driver::serving_spec(mode, alone("v1", Readiness::Notify))
}

/// `serving`, then an upgrade to "v2" whose generation 2 runs as pid 200
/// (not ready yet): generation 1 is gone.
fn replacing(mode: TrafficMode, readiness: Readiness) -> Driver {
    let mut d = serving(mode);
    d.upgrade_spec(alone("v2", readiness), UpgradeOptions::default());
    d.exited(100, 0);
    d.spawned(2, 200);
    d
}

#[test]
fn the_old_generation_drains_and_exits_before_the_new_one_starts_on_its_sockets() {
    let mut d = serving(TrafficMode::Steered);
    assert_eq!(
        d.upgrade_spec(alone("v2", Readiness::Notify), UpgradeOptions::default()),
        [
            "2 requested Control",
            // Its sockets, with what queues in them, and new connections
            // belong to generation 2 before it runs.
            "pass-sockets 1 2",
            "traffic 2",
            "signal-drain 100",
            "1 draining 100",
            "reply upgrading 2"
        ]
    );
    assert_eq!(d.phase(2), Phase::Waiting);
    assert!(matches!(
        d.m.upgrade().unwrap().phase,
        UpgradePhase::Replacing { previous } if previous == g(1)
    ));
    // The drain timeout escalates as for any drain.
    assert_eq!(d.m.procs()[&p(100)].kill_at, Some(ms(5000)));
    d.at(40);
    // Nothing to free: the sockets are generation 2's now.
    assert_eq!(d.exited(100, 0), ["1 exited 100", "release 100", "spawn 2"]);
    assert_eq!(d.workers(2), [Worker::Spawning]);
    assert_eq!(d.spawned(2, 200), ["2 spawned 200"]);
    assert_eq!(
        d.ready(200),
        ["2 ready 200", "2 active 200", "2 succeeded"],
        "no cutover left to do: it has owned the traffic all along"
    );
    assert!(d.m.upgrade().is_none());
    assert_eq!(d.m.traffic().active, Some(g(2)));
}

#[test]
fn shared_sockets_need_no_hand_over() {
    let mut d = serving(TrafficMode::Shared);
    assert_eq!(
        d.upgrade_spec(alone("v2", Readiness::Notify), UpgradeOptions::default()),
        [
            "2 requested Control",
            "traffic 2",
            "signal-drain 100",
            "1 draining 100",
            "reply upgrading 2"
        ]
    );
    assert_eq!(d.exited(100, 0), ["1 exited 100", "release 100", "spawn 2"]);
}

/// Workers outliving the main process count: the new generation starts
/// only once the whole group is gone.
#[test]
fn every_process_of_the_old_generation_is_gone_before_the_new_one_starts() {
    let mut d = serving(TrafficMode::Steered);
    d.upgrade_spec(alone("v2", Readiness::Notify), UpgradeOptions::default());
    assert_eq!(d.exited_leaving_group(100, 0), ["1 exited 100"]);
    assert_eq!(d.phase(2), Phase::Waiting);
    assert_eq!(
        d.step(Input::GroupEmpty { pid: p(100) }),
        ["release 100", "spawn 2"]
    );
}

#[test]
fn an_old_generation_ignoring_the_drain_is_killed_then_replaced() {
    let mut d = serving(TrafficMode::Steered);
    d.upgrade_spec(alone("v2", Readiness::Notify), UpgradeOptions::default());
    assert_eq!(d.tick_at(4999), Vec::<String>::new());
    assert_eq!(d.tick_at(5000), ["signal-kill 100", "1 killed 100"]);
    assert_eq!(d.phase(2), Phase::Waiting, "not before it is gone");
    let killed = d.step(Input::Exited {
        pid: p(100),
        status: ExitStatus::Signaled {
            signal: 9,
            core_dumped: false,
        },
        group_empty: true,
    });
    assert_eq!(killed, ["1 exited 100", "release 100", "spawn 2"]);
}

/// Either side saying the app cannot run twice is enough: here the new
/// configuration allows overlap, the serving generation's does not.
#[test]
fn the_serving_generation_not_running_twice_is_enough() {
    let mut d = serving(TrafficMode::Shared);
    let fx = d.upgrade("v2", Readiness::Notify);
    assert!(fx.contains(&"1 draining 100".to_owned()), "{fx:?}");
    assert!(!fx.contains(&"spawn 2".to_owned()), "{fx:?}");
    // And the other way round.
    let mut d = Driver::serving();
    let fx = d.upgrade_spec(alone("v2", Readiness::Notify), UpgradeOptions::default());
    assert!(!fx.contains(&"spawn 2".to_owned()), "{fx:?}");
}

#[test]
fn a_canary_or_a_bake_without_overlap_is_refused_and_changes_nothing() {
    let mut d = serving(TrafficMode::Steered);
    let canary = UpgradeOptions {
        canary: Some(10),
        ..UpgradeOptions::default()
    };
    assert_eq!(
        d.upgrade_spec(alone("v2", Readiness::Notify), canary),
        ["reply needs-overlap"]
    );
    let bake = UpgradeOptions {
        bake: Some(Duration::from_secs(60)),
        ..UpgradeOptions::default()
    };
    assert_eq!(
        d.upgrade_spec(alone("v2", Readiness::Notify), bake),
        ["reply needs-overlap"]
    );
    assert!(d.m.upgrade().is_none());
    assert_eq!(d.phase(1), common::serving(&[100]));
    // Positive control: a zero bake is no bake, and goes ahead (as
    // generation 2: the refusals used no number).
    let no_bake = UpgradeOptions {
        bake: Some(Duration::ZERO),
        ..UpgradeOptions::default()
    };
    let fx = d.upgrade_spec(alone("v2", Readiness::Notify), no_bake);
    assert!(fx.contains(&"reply upgrading 2".to_owned()), "{fx:?}");
}

#[test]
fn a_start_that_exits_brings_the_previous_release_back_the_same_way() {
    let mut d = replacing(TrafficMode::Steered, Readiness::Notify);
    assert_eq!(
        d.exited(200, 3),
        [
            "2 exited 200",
            "release 200",
            "3 requested Rollback",
            "pass-sockets 2 3",
            "traffic 3",
            "2 rolled-back to 3 Exited(Code(3))",
            // Nothing else runs: the previous release starts at once.
            "spawn 3"
        ]
    );
    assert_eq!(d.m.spec(g(3)).unwrap().release, release("v1"));
    assert!(matches!(
        d.phase(2),
        Phase::Finished {
            failure: Some(Failure::Exited(ExitStatus::Code(3))),
            ..
        }
    ));
    // The upgrade is reported failed once the previous release runs
    // again; from then on generation 3 is the active generation.
    assert_eq!(
        d.spawned(3, 300),
        ["3 spawned 300", "2 failed Exited(Code(3))"]
    );
    assert!(d.m.upgrade().is_none());
    assert_eq!(d.ready(300), ["3 ready 300", "3 active 300"]);
    // Its release was the last successful one already: rollback history
    // has no new step, so a rollback goes to the release before v1
    // (there is none).
    assert_eq!(d.command(Command::Rollback), ["reply no-previous"]);
}

#[test]
fn a_start_not_ready_in_time_is_drained_then_the_previous_release_returns() {
    let mut d = replacing(TrafficMode::Steered, Readiness::Notify);
    assert_eq!(
        d.tick_at(3000),
        [
            "3 requested Rollback",
            "pass-sockets 2 3",
            "traffic 3",
            "2 rolled-back to 3 Timeout(3s)",
            "signal-drain 200",
            "2 draining 200"
        ]
    );
    assert_eq!(d.phase(3), Phase::Waiting, "not while generation 2 runs");
    assert_eq!(d.exited(200, 0), ["2 exited 200", "release 200", "spawn 3"]);
    assert_eq!(d.spawned(3, 300), ["3 spawned 300", "2 failed Timeout(3s)"]);
}

#[test]
fn a_failed_readiness_check_or_spawn_brings_the_previous_release_back() {
    let mut d = replacing(TrafficMode::Shared, Readiness::Probe);
    let fx = d.step(Input::Probe {
        gen: g(2),
        pid: p(200),
        result: Err("answered 500".into()),
    });
    assert!(
        fx.starts_with(&["3 requested Rollback".to_owned(), "traffic 3".to_owned()]),
        "{fx:?}"
    );
    assert!(fx.contains(&"signal-drain 200".to_owned()), "{fx:?}");

    let mut d = serving(TrafficMode::Steered);
    d.upgrade_spec(alone("v2", Readiness::Notify), UpgradeOptions::default());
    d.exited(100, 0);
    assert_eq!(
        d.spawn_failed(2, 0, "no such file"),
        [
            "2 spawn-failed no such file",
            "3 requested Rollback",
            "pass-sockets 2 3",
            "traffic 3",
            "2 rolled-back to 3 Spawn(\"no such file\")",
            "spawn 3"
        ]
    );
}

/// `baton rollback` while the old generation is still draining: the
/// candidate never ran, and the previous release comes back once the old
/// processes are gone (they cannot be called back from their drain).
#[test]
fn rollback_before_the_new_generation_started_restores_the_previous_release() {
    let mut d = serving(TrafficMode::Steered);
    d.upgrade_spec(alone("v2", Readiness::Notify), UpgradeOptions::default());
    assert_eq!(
        d.command(Command::Rollback),
        [
            "3 requested Rollback",
            "pass-sockets 2 3",
            "traffic 3",
            "2 rolled-back to 3 RolledBack",
            "reply rolled-back 2"
        ]
    );
    assert!(matches!(
        d.phase(2),
        Phase::Finished {
            failure: Some(Failure::RolledBack),
            ..
        }
    ));
    assert_eq!(d.phase(3), Phase::Waiting);
    assert_eq!(d.exited(100, 0), ["1 exited 100", "release 100", "spawn 3"]);
}

#[test]
fn a_cold_rollback_without_overlap_drains_first_too() {
    let mut d = replacing(TrafficMode::Shared, Readiness::Notify);
    d.ready(200);
    let fx = d.command(Command::Rollback);
    assert_eq!(
        fx,
        [
            "3 requested Rollback",
            "traffic 3",
            "signal-drain 200",
            "2 draining 200",
            "reply upgrading 3"
        ]
    );
    assert_eq!(d.m.spec(g(3)).unwrap().release, release("v1"));
    assert_eq!(d.exited(200, 0), ["2 exited 200", "release 200", "spawn 3"]);
}

#[test]
fn stop_while_waiting_ends_the_new_generation_before_it_ever_runs() {
    let mut d = serving(TrafficMode::Steered);
    d.upgrade_spec(alone("v2", Readiness::Notify), UpgradeOptions::default());
    assert_eq!(
        d.command(Command::Stop),
        [
            "close-listeners",
            "2 failed Stopping",
            "free-sockets 2",
            "reply stopping"
        ]
    );
    assert_eq!(d.exited(100, 0), ["1 exited 100", "release 100"]);
    assert!(d.m.is_done());
}

/// A previous generation waiting to be restarted after a crash has no
/// process: the new one starts at once.
#[test]
fn a_crashed_previous_generation_is_not_waited_for() {
    let mut d = serving(TrafficMode::Steered);
    d.exited(100, 1);
    assert!(matches!(d.workers(1)[..], [Worker::Restarting { .. }]));
    let fx = d.upgrade_spec(alone("v2", Readiness::Notify), UpgradeOptions::default());
    assert_eq!(
        fx,
        [
            "2 requested Control",
            "pass-sockets 1 2",
            "traffic 2",
            "reply upgrading 2",
            "spawn 2"
        ]
    );
}

/// A restart of the previous generation whose spawn is still outstanding
/// is waited for: its process will exist, so it is drained when it comes.
#[test]
fn an_outstanding_spawn_of_the_previous_generation_is_waited_for() {
    let mut d = serving(TrafficMode::Steered);
    d.exited(100, 1);
    assert_eq!(d.tick_at(100), ["spawn 1"]);
    d.upgrade_spec(alone("v2", Readiness::Notify), UpgradeOptions::default());
    assert_eq!(d.phase(2), Phase::Waiting);
    assert_eq!(
        d.spawned(1, 101),
        ["1 spawned 101", "signal-drain 101", "1 draining 101"]
    );
    assert_eq!(d.exited(101, 0), ["1 exited 101", "release 101", "spawn 2"]);
}

/// The new generation's socket replaced (an app's `shutdown()`) while it
/// starts: it is restarted as the active generation it is, and the
/// upgrade goes on.
#[test]
fn a_restart_request_while_replacing_restarts_rather_than_fails() {
    let mut d = replacing(TrafficMode::Steered, Readiness::Notify);
    assert_eq!(
        d.command(Command::Restart),
        [
            "note restart 2",
            "signal-drain 200",
            "2 draining 200",
            "reply restarting 2"
        ]
    );
    assert_eq!(
        d.exited(200, 0),
        ["2 exited 200", "release 200", "2 restarting 100ms #1"]
    );
    assert_eq!(d.tick_at(100), ["spawn 2"]);
    d.spawned(2, 201);
    assert_eq!(d.ready(201), ["2 ready 201", "2 active 201", "2 succeeded"]);
}

/// One upgrade at a time covers the restore: a second upgrade is refused
/// until the previous release runs again.
#[test]
fn another_upgrade_waits_for_the_restore() {
    let mut d = serving(TrafficMode::Steered);
    d.upgrade_spec(alone("v2", Readiness::Notify), UpgradeOptions::default());
    d.command(Command::Rollback);
    assert_eq!(
        d.upgrade_spec(alone("v4", Readiness::Notify), UpgradeOptions::default()),
        ["reply busy 2"]
    );
    d.exited(100, 0);
    d.spawned(3, 300);
    assert!(d.m.upgrade().is_none());
    let fx = d.upgrade_spec(alone("v4", Readiness::Notify), UpgradeOptions::default());
    assert!(fx.contains(&"reply upgrading 4".to_owned()), "{fx:?}");
}

/// The generation to restore is kept however many others finish after
/// it, and the new one waits for all of them: nine older generations still
/// draining when the upgrade begins.
#[test]
fn the_release_to_restore_is_kept_and_every_older_generation_waited_for() {
    let mut d = Driver::serving();
    for i in 2..=10u64 {
        d.upgrade(&format!("v{i}"), Readiness::Notify);
        d.spawned(i, 100 * i as i32);
        d.ready(100 * i as i32);
    }
    d.upgrade_spec(alone("v11", Readiness::Notify), UpgradeOptions::default());
    assert_eq!(d.exited(1000, 0), ["10 exited 1000", "release 1000"]);
    for i in 1..=9 {
        let fx = d.exited(100 * i, 0);
        assert_eq!(fx.contains(&"spawn 11".to_owned()), i == 9, "{fx:?}");
    }
    d.spawned(11, 1100);
    d.exited(1100, 1);
    assert_eq!(d.m.spec(g(12)).unwrap().release, release("v10"));
}
