//! The machine driven input by input with injected time and no process:
//! each test is the list of inputs and the effects expected.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use baton_core::*;
use common::*;

fn ms(n: u64) -> Time {
    Time::from_duration(Duration::from_millis(n))
}

#[test]
fn first_generation_starts_owns_the_traffic_and_is_active_when_ready() {
    let mut d = Driver::new();
    assert_eq!(
        d.step(Input::Start {
            spec: spec("v1", Readiness::Notify)
        }),
        ["1 requested Start", "traffic 1", "spawn 1"]
    );
    assert_eq!(d.spawned(1, 100), ["1 spawned 100"]);
    assert_eq!(d.m.poll_timeout(), Some(ms(3000)), "ready timeout armed");
    assert_eq!(d.ready(100), ["1 ready 100", "1 active 100"]);
    assert_eq!(d.phase(1), serving(&[100]));
    assert_eq!(d.m.poll_timeout(), None, "nothing left to time");
}

#[test]
fn upgrade_phases_come_in_order_and_belong_to_the_upgrade() {
    let mut d = Driver::serving();
    assert_eq!(
        d.upgrade("v2", Readiness::Notify),
        ["2 requested Control", "spawn 2", "reply upgrading 2"]
    );
    assert_eq!(d.spawned(2, 200), ["2 spawned 200"]);
    let fx = d.m.step(
        Input::Notify {
            pid: p(200),
            pgid: Some(p(200)),
            reports: vec![Report::Ready],
        },
        d.now,
    );
    assert_eq!(
        fx.iter().map(show).collect::<Vec<_>>(),
        [
            "2 ready 200",
            "traffic 2",
            "2 active 200",
            "signal-drain 100",
            "1 draining 100",
            "2 succeeded"
        ]
    );
    // Every event of the cutover, the old generation's drain included,
    // belongs to upgrade 2.
    for e in &fx {
        if let Effect::Event(ev) = e {
            assert_eq!(ev.upgrade.map(|u| u.id), Some(g(2)), "{ev:?}");
        }
    }
    assert_eq!(d.exited(100, 0), ["1 exited 100", "release 100"]);
    assert!(matches!(d.phase(1), Phase::Finished { failure: None, .. }));
    assert_eq!(d.m.traffic().active, Some(g(2)));
    assert!(d.m.upgrade().is_none());
}

/// READY first, then the exit: the candidate was ready when it was seen,
/// so it is active and its crash restarts it; the old generation, already
/// draining, is not brought back.
#[test]
fn ready_then_exit_promotes_then_restarts() {
    let mut d = Driver::serving();
    d.upgrade("v2", Readiness::Notify);
    d.spawned(2, 200);
    assert!(d.ready(200).contains(&"2 succeeded".to_owned()));
    d.at(50);
    assert_eq!(
        d.exited(200, 1),
        ["2 exited 200", "release 200", "2 restarting 100ms #1"]
    );
    assert_eq!(d.tick_at(150), ["spawn 2"]);
    assert_eq!(d.m.spec(g(2)).unwrap().release, release("v2"));
    assert!(matches!(d.phase(1), Phase::Draining { .. }));
}

/// The exit first, then READY from the same process: it is no longer any
/// generation's process, so it promotes nothing; the upgrade fails and the
/// old generation keeps the traffic.
#[test]
fn exit_then_ready_never_promotes() {
    let mut d = Driver::serving();
    d.upgrade("v2", Readiness::Notify);
    d.spawned(2, 200);
    assert_eq!(d.exited(200, 3), ["2 exited 200", "release 200"]);
    assert_eq!(d.ready(200), ["note stranger 200"]);
    assert_eq!(d.phase(1), serving(&[100]));
    assert_eq!(d.m.traffic().active, Some(g(1)));
    // The failure is reported once the candidate's stderr has ended.
    assert!(d.m.upgrade().is_some());
    assert_eq!(
        d.step(Input::StderrClosed { pid: p(200) }),
        ["2 failed Exited(Code(3))"]
    );
    assert!(d.m.upgrade().is_none());
    assert!(matches!(
        d.phase(2),
        Phase::Finished {
            failure: Some(Failure::Exited(ExitStatus::Code(3))),
            ..
        }
    ));
}

#[test]
fn a_dead_candidates_failure_is_reported_after_a_bounded_wait_for_stderr() {
    let mut d = Driver::serving();
    d.upgrade("v2", Readiness::Notify);
    d.spawned(2, 200);
    d.at(1000);
    d.exited(200, 3);
    assert_eq!(d.m.poll_timeout(), Some(ms(1000) + STDERR_GRACE));
    assert_eq!(d.tick_at(1199), Vec::<String>::new());
    assert_eq!(d.tick_at(1200), ["2 failed Exited(Code(3))"]);
}

#[test]
fn a_probe_result_after_the_ready_timeout_is_ignored() {
    let mut d = Driver::serving();
    d.upgrade("v2", Readiness::Probe);
    assert_eq!(d.spawned(2, 200), ["2 spawned 200", "probe 2 200"]);
    assert_eq!(
        d.tick_at(3000),
        [
            "stop-probe 2",
            "signal-drain 200",
            "2 draining 200",
            "2 failed Timeout(3s)"
        ]
    );
    let late = d.step(Input::Probe {
        gen: g(2),
        pid: p(200),
        result: Ok("http /healthz 200".into()),
    });
    assert_eq!(late, Vec::<String>::new(), "no ready, no active");
    assert_eq!(d.m.traffic().active, Some(g(1)));
}

#[test]
fn a_probe_result_for_an_earlier_process_is_ignored() {
    let mut d = Driver::new();
    d.step(Input::Start {
        spec: spec("v1", Readiness::Probe),
    });
    d.spawned(1, 100);
    d.exited(100, 1);
    d.tick_at(100);
    d.spawned(1, 101);
    let old = d.step(Input::Probe {
        gen: g(1),
        pid: p(100),
        result: Ok("tcp accept".into()),
    });
    assert_eq!(old, Vec::<String>::new());
    let now = d.step(Input::Probe {
        gen: g(1),
        pid: p(101),
        result: Ok("tcp accept".into()),
    });
    assert_eq!(now, ["stop-probe 1", "1 ready 101", "1 active 101"]);
}

/// A drain re-sent (a ready timeout, then stop) neither signals again nor
/// moves the SIGKILL deadline later.
#[test]
fn a_drain_deadline_never_moves_later() {
    let mut d = Driver::new();
    d.step(Input::Start {
        spec: spec("v1", Readiness::Notify),
    });
    d.spawned(1, 100);
    d.tick_at(3000);
    assert_eq!(d.m.procs()[&p(100)].kill_at, Some(ms(8000)));
    d.at(6000);
    assert_eq!(
        d.command(Command::Stop),
        ["close-listeners", "reply stopping"]
    );
    assert_eq!(d.m.procs()[&p(100)].kill_at, Some(ms(8000)));
    assert_eq!(d.tick_at(8000), ["signal-kill 100", "1 killed 100"]);
}

/// The same after a cutover: the old generation's deadline holds through
/// a stop.
#[test]
fn a_cutover_drain_deadline_holds_through_stop() {
    let mut d = Driver::serving();
    d.upgrade("v2", Readiness::Notify);
    d.spawned(2, 200);
    d.ready(200);
    assert_eq!(d.m.procs()[&p(100)].kill_at, Some(ms(5000)));
    d.at(2000);
    assert_eq!(
        d.command(Command::Stop),
        [
            "close-listeners",
            "signal-drain 200",
            "2 draining 200",
            "reply stopping"
        ]
    );
    assert_eq!(d.m.procs()[&p(100)].kill_at, Some(ms(5000)));
    assert_eq!(d.m.poll_timeout(), Some(ms(5000)));
    assert_eq!(d.tick_at(5000), ["signal-kill 100", "1 killed 100"]);
    assert_eq!(d.tick_at(7000), ["signal-kill 200", "2 killed 200"]);
    assert_eq!(d.tick_at(9000), Vec::<String>::new(), "killed once");
}

/// Workers outliving their main process are drained, then killed at the
/// deadline; once the group is known empty it is never signalled again.
#[test]
fn a_group_outliving_its_leader_is_drained_and_never_signalled_once_empty() {
    let mut d = Driver::serving();
    d.at(10);
    assert_eq!(
        d.step(Input::Exited {
            pid: p(100),
            status: ExitStatus::Signaled {
                signal: 9,
                core_dumped: false
            },
            group_empty: false,
        }),
        [
            "1 exited 100",
            "note outlives 100",
            "signal-drain 100",
            "1 restarting 100ms #1"
        ]
    );
    assert_eq!(d.tick_at(110), ["spawn 1"]);
    // Positive control: with members left at the deadline, they are killed.
    let mut d2 = Driver::serving();
    d2.step(Input::Exited {
        pid: p(100),
        status: ExitStatus::Code(0),
        group_empty: false,
    });
    assert_eq!(
        d2.tick_at(5000)
            .into_iter()
            .filter(|e| !e.starts_with("spawn"))
            .collect::<Vec<_>>(),
        ["signal-kill 100", "note leftovers 100"]
    );
    // Known empty: released, and nothing more is sent to it.
    assert_eq!(d.step(Input::GroupEmpty { pid: p(100) }), ["release 100"]);
    assert_eq!(d.tick_at(6000), Vec::<String>::new());
    assert!(!d.m.procs().contains_key(&p(100)));
}

#[test]
fn sighups_during_an_upgrade_coalesce_into_exactly_one_follow_up() {
    let mut d = Driver::serving();
    assert_eq!(
        d.sighup("v2"),
        ["2 requested Signal", "spawn 2", "reply upgrading 2"]
    );
    assert_eq!(d.sighup("v3"), ["reply busy 2"]);
    assert_eq!(d.sighup("v3"), ["reply busy 2"]);
    assert_eq!(d.upgrade("v3", Readiness::Notify), ["reply busy 2"]);
    d.spawned(2, 200);
    let fx = d.ready(200);
    assert_eq!(
        fx.iter()
            .filter(|e| e.contains("follow-up") || e.contains("request-upgrade"))
            .count(),
        2,
        "{fx:?}"
    );
    assert!(fx.ends_with(&["note follow-up".into(), "request-upgrade".into()]));
    // The follow-up arrives as a fresh SIGHUP upgrade; when it ends, no
    // further one is owed.
    d.sighup("v3");
    d.spawned(3, 300);
    let fx = d.ready(300);
    assert!(!fx.contains(&"request-upgrade".to_owned()), "{fx:?}");
}

#[test]
fn a_busy_control_upgrade_schedules_no_follow_up() {
    let mut d = Driver::serving();
    d.upgrade("v2", Readiness::Notify);
    assert_eq!(d.upgrade("v3", Readiness::Notify), ["reply busy 2"]);
    d.spawned(2, 200);
    assert!(!d.ready(200).contains(&"request-upgrade".to_owned()));
}

#[test]
fn rollback_returns_to_the_previous_successful_release() {
    let mut d = Driver::serving();
    assert_eq!(d.command(Command::Rollback), ["reply no-previous"]);
    d.upgrade("v2", Readiness::Notify);
    d.spawned(2, 200);
    d.ready(200);
    assert_eq!(
        d.command(Command::Rollback),
        ["3 requested Rollback", "spawn 3", "reply upgrading 3"]
    );
    assert_eq!(d.m.spec(g(3)).unwrap().release, release("v1"));
    d.spawned(3, 300);
    assert!(d.ready(300).contains(&"3 succeeded".to_owned()));
    assert_eq!(d.command(Command::Rollback), ["reply no-previous"]);
}

#[test]
fn the_same_release_twice_is_no_rollback_target() {
    let mut d = Driver::serving();
    d.upgrade("v1", Readiness::Notify);
    d.spawned(2, 200);
    d.ready(200);
    assert_eq!(d.command(Command::Rollback), ["reply no-previous"]);
}

#[test]
fn a_failed_upgrade_is_no_rollback_step() {
    let mut d = Driver::serving();
    d.upgrade("v2", Readiness::Notify);
    d.spawn_failed(2, 0, "no such file");
    assert_eq!(d.command(Command::Rollback), ["reply no-previous"]);
}

/// A crash restart runs the release the generation was started with, with
/// capped exponential backoff.
#[test]
fn crash_restarts_back_off_and_keep_the_release() {
    let mut d = Driver::serving();
    let mut delays = Vec::new();
    let mut pid = 100;
    let mut t = 0;
    for _ in 0..6 {
        let fx = d.exited(pid, 1);
        let r = fx
            .iter()
            .find(|e| e.contains("restarting"))
            .unwrap()
            .clone();
        delays.push(r.split(' ').nth(2).unwrap().to_owned());
        t += 2000;
        assert_eq!(d.tick_at(t), ["spawn 1"]);
        pid += 1;
        d.spawned(1, pid);
    }
    assert_eq!(
        delays,
        ["100ms", "200ms", "400ms", "800ms", "1000ms", "1000ms"]
    );
    assert_eq!(d.m.generation(g(1)).unwrap().restarts(), 6);
    assert_eq!(d.m.spec(g(1)).unwrap().release, release("v1"));
}

#[test]
fn the_active_generation_failing_readiness_is_drained_then_restarted() {
    let mut d = Driver::new();
    d.step(Input::Start {
        spec: spec("v1", Readiness::Notify),
    });
    d.spawned(1, 100);
    assert_eq!(
        d.tick_at(3000),
        ["note recycling 1", "signal-drain 100", "1 draining 100"]
    );
    // Told to drain: a late READY makes nothing of it.
    assert_eq!(d.ready(100), Vec::<String>::new());
    d.at(3100);
    assert_eq!(
        d.exited(100, 0),
        ["1 exited 100", "release 100", "1 restarting 100ms #1"]
    );
}

#[test]
fn cutover_ends_a_generation_waiting_to_restart() {
    let mut d = Driver::serving();
    d.exited(100, 1);
    d.upgrade("v2", Readiness::Notify);
    d.spawned(2, 200);
    let fx = d.ready(200);
    assert!(!fx.iter().any(|e| e.starts_with("1 ")), "{fx:?}");
    assert!(matches!(d.phase(1), Phase::Finished { failure: None, .. }));
    assert_eq!(d.tick_at(5000), Vec::<String>::new(), "no restart left");
}

#[test]
fn stop_refuses_new_clients_drains_everything_and_ends() {
    let mut d = Driver::serving();
    d.upgrade("v2", Readiness::Notify);
    assert_eq!(
        d.command(Command::Stop),
        [
            "close-listeners",
            "2 failed Stopping",
            "signal-drain 100",
            "1 draining 100",
            "reply stopping"
        ]
    );
    assert!(!d.m.is_done(), "a spawn is outstanding");
    assert_eq!(
        d.upgrade("v3", Readiness::Notify),
        ["reply refused-stopping"]
    );
    assert_eq!(d.command(Command::Stop), ["reply stopping"], "idempotent");
    // The candidate being started when stop came is drained on arrival.
    assert_eq!(
        d.spawned(2, 200),
        ["2 spawned 200", "signal-drain 200", "2 draining 200"]
    );
    d.exited(100, 0);
    assert!(!d.m.is_done());
    d.exited(200, 0);
    assert!(d.m.is_done());
}

#[test]
fn stop_while_restarting_ends_the_generation() {
    let mut d = Driver::serving();
    d.exited(100, 1);
    d.command(Command::Stop);
    assert!(d.m.is_done());
    assert_eq!(d.tick_at(5000), Vec::<String>::new());
}

#[test]
fn a_candidate_that_cannot_start_fails_the_upgrade_at_once() {
    let mut d = Driver::serving();
    d.upgrade("v2", Readiness::Notify);
    assert_eq!(
        d.spawn_failed(2, 0, "no such file"),
        [
            "2 spawn-failed no such file",
            "2 failed Spawn(\"no such file\")"
        ]
    );
    assert!(matches!(
        d.phase(2),
        Phase::Finished {
            failure: Some(_),
            ..
        }
    ));
    assert!(d.m.upgrade().is_none());
}

#[test]
fn reports_count_only_for_their_own_generation() {
    let mut d = Driver::serving();
    d.upgrade("v2", Readiness::Notify);
    d.spawned(2, 200);
    // A stranger, and a member of generation 1's group: neither readies 2.
    assert_eq!(
        d.notify(999, Some(999), vec![Report::Ready]),
        ["note stranger 999"]
    );
    assert_eq!(
        d.notify(150, Some(100), vec![Report::Ready]),
        Vec::<String>::new()
    );
    assert_eq!(
        d.notify(
            201,
            Some(200),
            vec![Report::Status("warming".into()), Report::Stopping]
        ),
        ["2 status warming", "2 stopping 201"]
    );
    assert_eq!(d.m.generation(g(2)).unwrap().status_text(), Some("warming"));
    // A helper in the candidate's group may report for it.
    let fx = d.notify(201, Some(200), vec![Report::Ready]);
    assert_eq!(fx[0], "2 ready 200");
}

#[test]
fn delay_readiness_is_a_deadline() {
    let mut d = Driver::new();
    d.step(Input::Start {
        spec: spec("v1", Readiness::Delay(Duration::from_millis(10))),
    });
    d.spawned(1, 100);
    assert_eq!(d.m.poll_timeout(), Some(ms(10)));
    assert_eq!(d.tick_at(9), Vec::<String>::new());
    assert_eq!(d.tick_at(10), ["1 ready 100", "1 active 100"]);
}

#[test]
fn finished_generations_are_pruned_to_a_bounded_number() {
    let mut d = Driver::serving();
    let mut pid = 100;
    for n in 2..=20u64 {
        d.upgrade("v", Readiness::Notify);
        d.spawned(n, pid + 100);
        d.ready(pid + 100);
        d.exited(pid, 0);
        pid += 100;
    }
    let finished =
        d.m.generations()
            .filter(|g| matches!(g.phase(), Phase::Finished { .. }))
            .count();
    assert_eq!(finished, FINISHED_KEPT);
    assert_eq!(d.m.generations().count(), FINISHED_KEPT + 1);
}

#[test]
fn time_given_out_of_order_never_runs_the_clock_backwards() {
    let mut d = Driver::serving();
    d.at(5000);
    d.upgrade("v2", Readiness::Notify);
    d.at(1000);
    d.spawned(2, 200);
    // The ready deadline counts from 5000, the latest time seen.
    assert_eq!(d.m.poll_timeout(), Some(ms(8000)));
}

#[test]
fn an_exit_or_group_report_for_an_unknown_process_changes_nothing() {
    let mut d = Driver::serving();
    assert_eq!(d.exited(4242, 0), Vec::<String>::new());
    assert_eq!(
        d.step(Input::GroupEmpty { pid: p(4242) }),
        Vec::<String>::new()
    );
    // A running leader's group cannot be empty: ignored.
    assert_eq!(
        d.step(Input::GroupEmpty { pid: p(100) }),
        Vec::<String>::new()
    );
    assert!(d.m.procs().contains_key(&p(100)));
}

#[test]
fn an_unresolvable_release_fails_its_upgrade_at_once() {
    let mut d = Driver::serving();
    assert_eq!(
        d.command(Command::Upgrade {
            trigger: Trigger::Control,
            spec: Err("program \"./gone\" not found".into()),
            options: UpgradeOptions::default(),
        }),
        [
            "2 requested Control",
            "2 spawn-failed program \"./gone\" not found",
            "2 failed Spawn(\"program \\\"./gone\\\" not found\")",
            "reply upgrading 2"
        ]
    );
    assert!(d.m.upgrade().is_none());
    assert!(d.m.generation(g(2)).is_none(), "nothing of it ran");
    // The next upgrade gets the next number.
    assert_eq!(d.upgrade("v2", Readiness::Notify)[0], "3 requested Control");
}

/// When the shell has replaced the active generation's socket, the
/// generation is restarted (drained, then started again with backoff) so a
/// process holds the fresh socket.
#[test]
fn a_restart_request_recycles_the_active_generation() {
    let mut d = Driver::serving();
    assert_eq!(
        d.command(Command::Restart),
        [
            "note restart 1",
            "signal-drain 100",
            "1 draining 100",
            "reply restarting 1"
        ]
    );
    assert_eq!(
        d.exited(100, 0),
        ["1 exited 100", "release 100", "1 restarting 100ms #1"]
    );
    assert_eq!(d.tick_at(100), ["spawn 1"]);
    assert_eq!(d.m.spec(g(1)).unwrap().release, release("v1"));
}

/// The old generation's exit is off the critical path: the upgrade
/// succeeds at activation, before the old generation has exited, and the
/// next upgrade starts, and moves the traffic, while two older
/// generations are still draining.
#[test]
fn no_upgrade_waits_for_an_old_generation_to_exit() {
    let mut d = Driver::serving();
    d.upgrade("v2", Readiness::Notify);
    d.spawned(2, 200);
    let fx = d.ready(200);
    assert!(fx.contains(&"1 draining 100".to_owned()), "{fx:?}");
    assert!(fx.contains(&"2 succeeded".to_owned()), "{fx:?}");
    assert!(d.m.upgrade().is_none(), "done although 1 still runs");
    // No exit of generation 1 yet: the next upgrade goes ahead anyway.
    assert_eq!(
        d.upgrade("v3", Readiness::Notify),
        ["3 requested Control", "spawn 3", "reply upgrading 3"]
    );
    d.spawned(3, 300);
    let fx = d.ready(300);
    assert!(fx.contains(&"traffic 3".to_owned()), "{fx:?}");
    assert!(fx.contains(&"3 succeeded".to_owned()), "{fx:?}");
    assert!(
        matches!(d.phase(1), Phase::Draining { .. }),
        "{:?}",
        d.phase(1)
    );
    assert!(
        matches!(d.phase(2), Phase::Draining { .. }),
        "{:?}",
        d.phase(2)
    );
    assert_eq!(d.m.traffic().active, Some(g(3)));
    // The exits, when they come, only finish the old generations.
    assert_eq!(d.exited(100, 0), ["1 exited 100", "release 100"]);
    assert_eq!(d.exited(200, 0), ["2 exited 200", "release 200"]);
    assert_eq!(d.m.traffic().active, Some(g(3)));
}
