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

    // Never ready: the timeout fails it, and it is drained, not killed.
    failed_upgrade(
        &baton,
        "notify",
        "FAKE_NEVER_READY = \"1\"",
        "not ready within 3s",
    );
    load.wait_requests(20);

    // Health check answers 500.
    failed_upgrade(
        &baton,
        "http:/healthz",
        "FAKE_HEALTH_STATUS = \"500\"",
        "answered 500",
    );
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
    assert_eq!(baton.status()["active"], 1);
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

#[test]
fn concurrent_upgrade_is_refused_while_one_runs() {
    let baton = start_fake("notify");
    baton.reconfigure(&fake_config(
        &ready("notify"),
        "FAKE_READY_DELAY_MS = \"1500\"",
    ));
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
    assert!(String::from_utf8_lossy(&second.stderr).contains("already in progress"));
    let first = finish(first_cmd, first);
    assert!(first.status.success(), "{}", describe_output(&first));
    assert_eq!(baton.status()["active"], 2);
}

#[test]
fn forged_ready_from_another_process_is_ignored() {
    let baton = start_fake("notify");
    failed_upgrade(
        &baton,
        "notify",
        "FAKE_NOTIFY_FORGE = \"1\"",
        "not ready within 3s",
    );
}
