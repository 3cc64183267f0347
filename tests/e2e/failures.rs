//! Failed candidates never harm the serving generation.

use std::time::Duration;

use baton_e2e::*;

fn ready(check: &str) -> String {
    format!("ready = \"{check}\"")
}

fn start_fake(check: &str) -> Baton {
    let baton = Baton::with_config(&fake_config(&ready(check), ""), &[]);
    baton.wait_active(1);
    baton
}

/// Upgrades to a candidate configured with `extra_env` and expects exit 1
/// mentioning `reason`, with the old generation still serving.
fn failed_upgrade(baton: &Baton, check: &str, extra_env: &str, reason: &str) -> String {
    baton.reconfigure(&fake_config(&ready(check), extra_env));
    let out = baton.upgrade_expect(&[], 1);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains(reason), "expected {reason:?} in:\n{text}");
    assert!(text.contains("generation 1 still serves"), "{text}");
    let s = baton.status();
    assert_eq!(s["active"], 1, "{s}");
    assert!(s["upgrading"].is_null(), "{s}");
    text
}

/// Generation `n` was drained, not killed: the drain signal reached it
/// (the fake app logged it in `signals`) and it exited by itself.
fn assert_drained(baton: &Baton, n: u64, signals: &std::path::Path) {
    let g = format!("generation={n} ");
    baton.stderr.wait_for(&["generation exited", &g], 1, WAIT);
    let logged = std::fs::read_to_string(signals).unwrap_or_default();
    assert_eq!(
        logged, "TERM\n",
        "generation {n} did not get the drain signal"
    );
    let exited: Vec<String> = baton
        .stderr
        .all()
        .into_iter()
        .filter(|l| l.contains("generation exited") && l.contains(&g))
        .collect();
    assert!(
        exited.len() == 1 && exited[0].contains("exit status 0"),
        "generation {n} did not exit by itself: {exited:?}"
    );
    assert!(
        !baton
            .stderr
            .text()
            .contains(&format!("generation killed generation={n} ")),
        "generation {n} was killed"
    );
}

#[test]
fn failed_candidates_leave_the_old_generation_serving() {
    let baton = start_fake("notify");
    let addr = baton.addr("http");
    let load = Load::start(
        addr,
        &[Mode::NewConnection, Mode::KeepAlive],
        2,
        Duration::from_secs(120),
    );

    // Exits at once: reason, exit status and its stderr reach the CLI.
    let text = failed_upgrade(
        &baton,
        "notify",
        "FAKE_EXIT_AT_START = \"7\"\nFAKE_STDERR_LINES = \"3\"",
        "exited before it was ready (exit status 7)",
    );
    assert!(text.contains("fake: stderr line 3"), "{text}");
    load.wait_requests(20);

    // Never ready: the timeout fails it, and it is drained, not killed:
    // it gets the drain signal and exits by itself (status 0).
    let signals = baton.path("never-ready.signals");
    failed_upgrade(
        &baton,
        "notify",
        &format!(
            "FAKE_NEVER_READY = \"1\"\nFAKE_SIGNAL_LOG = \"{}\"",
            signals.display()
        ),
        "not ready within 3s",
    );
    assert_drained(&baton, 3, &signals);
    load.wait_requests(20);

    // Health check answers 500; drained the same way.
    let signals = baton.path("unhealthy.signals");
    failed_upgrade(
        &baton,
        "http:/healthz",
        &format!(
            "FAKE_HEALTH_STATUS = \"500\"\nFAKE_SIGNAL_LOG = \"{}\"",
            signals.display()
        ),
        "answered 500",
    );
    assert_drained(&baton, 4, &signals);
    load.wait_requests(20);

    // Cannot be executed: missing program, no permission, bad directory.
    std::fs::write(baton.path("noexec"), "#!/bin/sh\n").unwrap();
    for (bad, reason) in [
        ("command = [\"./does-not-exist\"]", "does-not-exist"),
        ("command = [\"./noexec\"]", "not executable"),
        ("cwd = \"missing-dir\"", "missing-dir"),
    ] {
        let fake = format!("[\"{}\"]", bin("test-socketfd").display());
        let conf = match bad.strip_prefix("command = ") {
            Some(cmd) => fake_config(&ready("notify"), "").replacen(&fake, cmd, 1),
            None => fake_config(&format!("{}\n{bad}", ready("notify")), ""),
        };
        baton.reconfigure(&conf);
        let out = baton.upgrade_expect(&[], 1);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(reason), "expected {reason:?} in:\n{text}");
        load.wait_requests(10);
    }

    // Every failed candidate has gone; only generation 1 runs.
    let s = baton.status();
    let running: Vec<_> = s["generations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| !g["pid"].is_null())
        .map(|g| g["number"].as_u64().unwrap())
        .collect();
    assert_eq!(running, vec![1], "{s}");
    let report = load.finish();
    eprintln!(
        "failed upgrades: {} ok, {} retries",
        report.ok, report.retried
    );
    report.assert_no_failures();
    assert!(zombies_of(baton.pid() as i32).is_empty());
}

#[test]
fn bad_config_on_upgrade_is_a_usage_error_and_harms_nothing() {
    let baton = start_fake("notify");
    std::fs::write(
        baton.path("baton.toml"),
        "command = [\"x\"]\ncolour = \"blue\"\n",
    )
    .unwrap();
    let out = baton.upgrade_expect(&[], 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.contains("colour"), "{err}");
    // Nothing changed: no candidate was made, generation 1 still serves.
    let s = baton.status();
    assert_eq!(s["active"], 1, "{s}");
    assert!(s["upgrading"].is_null(), "{s}");
    assert_eq!(s["generations"].as_array().unwrap().len(), 1, "{s}");
    assert_eq!(baton.stderr.count(&["generation requested"]), 1);
    assert_eq!(get(baton.addr("http"), "/").unwrap().status, 200);
}

#[test]
fn old_generation_ignoring_sigterm_is_killed_after_drain_timeout() {
    let baton = Baton::with_config(
        &fake_config(&ready("notify"), "FAKE_IGNORE_TERM = \"1\""),
        &["--drain-timeout", "1s"],
    );
    baton.wait_active(1);
    let old_pid = baton.generation(1)["pid"].as_i64().unwrap() as i32;
    baton.reconfigure(&fake_config(&ready("notify"), ""));
    let out = baton.upgrade_expect(&[], 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("generation 1 killed after drain timeout"),
        "{text}"
    );
    assert!(text.contains("killed by SIGKILL"), "{text}");
    assert!(group_members(old_pid).is_empty());
}

/// While an upgrade is held open (its candidate waits for a gate file),
/// a second one is refused; the first then completes.
#[test]
fn concurrent_upgrade_is_refused_while_one_runs() {
    let baton = start_fake("notify");
    let gate = baton.path("gate");
    baton.reconfigure(&gated_fake_config("v2", &gate));
    let mut first = std::process::Command::new(bin("baton"));
    first
        .arg("--control")
        .arg(&baton.control)
        .arg("upgrade")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let first_cmd = format!("{first:?}");
    let first = first.spawn().unwrap();
    baton
        .stderr
        .wait_for(&["generation started", "generation=2 "], 1, WAIT);
    let second = baton.cli(&["upgrade"]);
    assert_eq!(
        second.status.code(),
        Some(1),
        "{}",
        describe_output(&second)
    );
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already in progress"),
        "{}",
        describe_output(&second)
    );
    assert_eq!(baton.status()["upgrading"], 2);
    std::fs::write(&gate, "").unwrap();
    let first = finish(first_cmd, first);
    assert!(first.status.success(), "{}", describe_output(&first));
    assert_eq!(baton.status()["active"], 2);
    assert_eq!(baton.stderr.count(&["generation requested"]), 2);
}

/// Upgrades to a candidate that first has a forger (a process in another
/// process group) send READY=1 for it, then sends its own; returns the
/// candidate's and the forger's pids.
fn upgrade_with_forged_ready(baton: &Baton) -> (i64, i64) {
    baton.reconfigure(&fake_config(&ready("notify"), "FAKE_NOTIFY_FORGE = \"1\""));
    baton.upgrade_expect(&["--no-wait-drain"], 0);
    let candidate = baton.generation(2)["pid"].as_i64().unwrap();
    baton.stderr.wait_for(&["fake: forger pid="], 1, WAIT);
    baton
        .stderr
        .wait_for(&["generation ready", "generation=2 "], 1, WAIT);
    let lines = baton.stderr.all();
    let forger: i64 = lines
        .iter()
        .find_map(|l| {
            l.split("fake: forger pid=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("the forger never reported sending READY=1"));
    assert_ne!(forger, candidate);
    // The forger is alive (it lives until the candidate drains) and in a
    // process group of its own, so it was too when its datagram was read.
    let stat = std::fs::read_to_string(format!("/proc/{forger}/stat"))
        .unwrap_or_else(|e| panic!("forger {forger} is gone: {e}"));
    let pgrp: i64 = stat[stat.rfind(')').unwrap() + 2..]
        .split(' ')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(pgrp, forger, "the forger shares a process group");
    (candidate, forger)
}

/// READY=1 from a process outside the candidate's process group does not
/// make it ready; its own READY=1 afterwards does. The forger's datagram
/// was queued on the notify socket before the candidate's (the candidate
/// sends only once the forger reports it sent), and the socket is read in
/// order: so baton read the forged READY=1 first, and the readiness it
/// then reports names the candidate as sender, not the forger.
#[test]
fn forged_ready_from_another_process_is_ignored() {
    let baton = start_fake("notify");
    let (candidate, forger) = upgrade_with_forged_ready(&baton);
    let ready: Vec<String> = baton
        .stderr
        .all()
        .into_iter()
        .filter(|l| l.contains("generation ready") && l.contains("generation=2 "))
        .collect();
    assert_eq!(ready.len(), 1, "{ready:?}");
    assert!(
        ready[0].contains(&format!("from pid {candidate}"))
            && !ready[0].contains(&format!("pid {forger}")),
        "ready line: {}",
        ready[0]
    );
    assert!(!baton.status()["generations"].to_string().contains("forged"));
}

/// The forged datagram is received and ignored, and baton says so with
/// the sender's pid.
#[test]
fn forged_ready_is_logged_as_ignored_with_the_senders_pid() {
    let baton = start_fake("notify");
    let (_, forger) = upgrade_with_forged_ready(&baton);
    baton.stderr.wait_for(
        &["ignoring notify message", &format!("pid={forger}")],
        1,
        WAIT,
    );
}

/// A candidate that answers no connection on its private probe listener
/// is never ready under `--ready tcp`, although the old generation,
/// sharing the public socket, accepts everything: the probe reaches only
/// the candidate.
#[test]
fn tcp_probe_reaches_only_the_candidate() {
    // Shared sockets: the probe goes to the candidate's private listener.
    let top = format!("{}\ntraffic = \"shared\"", ready("tcp"));
    let baton = Baton::with_config(&fake_config(&top, ""), &[]);
    baton.wait_active(1);
    baton.reconfigure(&fake_config(&top, "FAKE_SKIP_PROBE_FD = \"1\""));
    let out = baton.upgrade_expect(&[], 1);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("not ready within 3s"), "{text}");
    assert!(text.contains("generation 1 still serves"), "{text}");
    // Positive control: the same candidate, serving the probe fd, is ready.
    baton.reconfigure(&fake_config(&top, ""));
    let out = baton.upgrade_expect(&[], 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("generation 3 ready (tcp accept"), "{text}");
}

/// With steered traffic there is no probe listener: the probe goes to the
/// real address, and the kernel sends it to the candidate alone. A
/// candidate that accepts nothing is never ready, although the old
/// generation accepts everything on the same address.
#[test]
fn tcp_probe_reaches_only_the_candidate_when_steered() {
    let baton = start_fake("tcp");
    assert_eq!(baton.status()["traffic"], "steered");
    failed_upgrade(
        &baton,
        "tcp",
        "FAKE_NO_ACCEPT = \"1\"",
        "not ready within 3s",
    );
    assert_eq!(get(baton.addr("http"), "/").unwrap().status, 200);
    // Positive control: a candidate that accepts is ready by the same probe.
    baton.reconfigure(&fake_config(&ready("tcp"), ""));
    let out = baton.upgrade_expect(&[], 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("generation 3 ready (tcp accept"), "{text}");
}
