//! Crashes, stop, and start-up errors.

use std::time::Duration;

use baton_e2e::*;

#[test]
fn killed_app_is_restarted_and_no_connection_is_refused() {
    let baton = Baton::start(&[
        "--listen",
        "http=127.0.0.1:0",
        "--",
        bin("hello").to_str().unwrap(),
    ]);
    let addr = baton.addr("http");
    let load = Load::start(addr, &[Mode::NewConnection], 2, Duration::from_secs(60));
    let pid = baton.generation(1)["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    baton
        .stderr
        .wait_for(&["restarting generation", "generation=1 "], 1, WAIT);
    baton
        .stderr
        .wait_for(&["generation active", "generation=1 "], 2, WAIT);
    load.wait_requests(50);
    let report = load.finish();
    // The requests the killed process had accepted die with it (at most
    // one per client); no connection may be refused or lost in the queue.
    assert_eq!(report.connect_errors(), 0, "{:?}", report.errors);
    assert!(
        report.failed <= 2,
        "only in-flight requests may fail: {:?}",
        report.errors
    );
    let g = baton.generation(1);
    assert_eq!(g["restarts"], 1, "{g}");
    assert_eq!(g["state"], "active", "{g}");
    assert_ne!(g["pid"].as_i64().unwrap() as i32, pid);
    assert!(baton.stderr.text().contains("killed by SIGKILL"));
    assert!(zombies_of(baton.pid() as i32).is_empty());
}

#[test]
fn stop_drains_everything_and_leaves_no_process() {
    let mut baton = Baton::start(&[
        "--listen",
        "http=127.0.0.1:0",
        "--",
        bin("hello").to_str().unwrap(),
    ]);
    baton.upgrade_expect(&["--no-wait-drain"], 0);
    let pids: Vec<i32> = baton.status()["generations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["pid"].as_i64().map(|p| p as i32))
        .collect();
    assert!(!pids.is_empty());
    let out = baton.cli(&["stop"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(baton.wait_exit(WAIT), 0, "{}", baton.logs());
    for pid in pids {
        assert!(
            group_members(pid).is_empty(),
            "process group {pid} still alive"
        );
    }
    assert_all_drained(&baton, 2);
    assert!(!baton.control.exists(), "control socket removed");
}

/// Generations 1..=n each exited by themselves after their drain signal
/// (the example app exits 0 when drained), none was killed.
fn assert_all_drained(baton: &Baton, n: u64) {
    let lines = baton.stderr.all();
    for g in 1..=n {
        let tag = format!("generation={g} ");
        let has = |what: &str| lines.iter().any(|l| l.contains(what) && l.contains(&tag));
        assert!(
            has("generation draining"),
            "generation {g} not drained\n{}",
            baton.logs()
        );
        assert!(
            lines.iter().any(|l| l.contains("generation exited")
                && l.contains(&tag)
                && l.contains("exit status 0")),
            "generation {g} did not exit by itself\n{}",
            baton.logs()
        );
    }
}

#[test]
fn sigterm_stops_like_stop() {
    let mut baton = Baton::start(&[
        "--listen",
        "http=127.0.0.1:0",
        "--",
        bin("hello").to_str().unwrap(),
    ]);
    let pid = baton.generation(1)["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(baton.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(baton.wait_exit(WAIT), 0);
    assert!(group_members(pid).is_empty());
    assert_all_drained(&baton, 1);
}

/// Runs `baton run ARGS` expecting it to refuse to start.
fn refuses_to_start(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut baton = Baton::spawn(dir, args);
    let code = baton.wait_exit(WAIT);
    assert_eq!(code, 2, "{}", baton.logs());
    let err = baton.stderr.text();
    assert_eq!(
        err.lines().filter(|l| l.contains("error")).count(),
        1,
        "one error line:\n{err}"
    );
    // Refused before anything started.
    assert!(
        !err.contains("generation started") && !err.contains("generation requested"),
        "{}",
        baton.logs()
    );
    err
}

#[test]
fn startup_errors_are_one_line_and_exit_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let hello = bin("hello");
    let hello = hello.to_str().unwrap();
    let err = refuses_to_start(&["--listen", &format!("http={addr}"), "--", hello]);
    assert!(err.contains(&addr) && err.contains("in use"), "{err}");
    let err = refuses_to_start(&["--listen", "http=127.0.0.1:99999", "--", hello]);
    assert!(err.contains("127.0.0.1:99999"), "{err}");
    let err = refuses_to_start(&["--listen", "http=127.0.0.1:0", "--", "./no-such-server"]);
    assert!(err.contains("no-such-server"), "{err}");
    let err = refuses_to_start(&["--listen", "a=unix:/proc/nope/x.sock", "--", hello]);
    assert!(err.contains("/proc/nope/x.sock"), "{err}");
    let err = refuses_to_start(&[
        "--listen",
        "http=127.0.0.1:0",
        "--workers",
        "0",
        "--",
        hello,
    ]);
    assert!(err.contains("workers must be between 1 and"), "{err}");
    drop(taken);
}

#[test]
fn cli_without_supervisor_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = cli(&dir.path().join("none.sock"), &["status"]);
    assert_eq!(out.status.code(), Some(2), "{}", describe_output(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the supervisor"));
}

/// The start-up check resolves the program exactly as the spawn will
/// (with the app's PATH, after --env-clear), so it fails before binding
/// with exit 2 instead of failing later.
#[test]
fn program_missing_from_the_apps_path_is_a_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    write_script(&dir.path().join("bin/myserver"), "exec sleep 300");
    let path = format!(
        "{}:{}",
        dir.path().join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut baton = Baton::spawn_with_env(
        dir,
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--env-clear",
            "--",
            "myserver",
        ],
        &[("PATH", &path)],
    );
    assert_eq!(baton.wait_exit(WAIT), 2, "{}", baton.logs());
    assert!(
        baton.stderr.text().contains("\"myserver\" not found"),
        "{}",
        baton.logs()
    );
    assert!(
        !baton.stderr.text().contains("listening"),
        "bound before failing"
    );
}
