//! Faults, resource hygiene, security and supervisor death: each fault
//! under continuous load, zero failed requests wherever a healthy
//! generation exists.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use baton_e2e::*;

fn start(env: &str, top: &str, flags: &[&str]) -> Baton {
    Baton::with_config(&fake_config(top, env), flags)
}

fn reconfigure(baton: &Baton, env: &str, top: &str) {
    baton.reconfigure(&fake_config(top, env));
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Decision (docs/guarantees.md): a candidate that crashes right after
/// READY=1 is already the active generation; it is restarted with backoff
/// from the same release while the old one finishes draining. Connections
/// arriving meanwhile wait in the queue; only requests the crashing
/// process had accepted are lost with it.
#[test]
fn candidate_crashing_right_after_ready_is_restarted_without_refusals() {
    let baton = start("", "", &[]);
    baton.wait_active(1);
    let addr = baton.addr("http");
    // Crash once: the wrapper arms the crash only on its first run.
    let wrapper = baton.path("crash-once.sh");
    write_script(
        &wrapper,
        &format!(
            "if [ ! -e crashed ]; then touch crashed; export FAKE_CRASH_AFTER_READY_MS=20; fi\nexec {}",
            bin("test-socketfd").display()
        ),
    );
    let conf = fake_config("", "").replacen(
        &format!("command = [\"{}\"]", bin("test-socketfd").display()),
        &format!("command = [\"{}\"]", wrapper.display()),
        1,
    );
    std::fs::write(baton.path("baton.toml"), conf).unwrap();
    let load = Load::start(addr, &[Mode::NewConnection], 2, Duration::from_secs(60));
    baton.upgrade_expect(&["--no-wait-drain"], 0);
    baton
        .stderr
        .wait_for(&["restarting generation", "generation=2 "], 1, WAIT);
    baton
        .stderr
        .wait_for(&["generation active", "generation=2 "], 2, WAIT);
    load.wait_requests(50);
    let report = load.finish();
    assert_eq!(report.connect_errors(), 0, "{:?}", report.errors);
    assert!(
        report.failed <= 2,
        "only requests in flight on the crashed process may fail: {:?}",
        report.errors
    );
    assert_eq!(baton.generation(2)["restarts"], 1);
}

#[test]
fn slow_in_flight_request_on_the_old_generation_completes() {
    let baton = start("FAKE_SLOW_MS = \"1500\"", "", &[]);
    baton.wait_active(1);
    let addr = baton.addr("http");
    // Pin a connection to generation 1 (the only one), then start a slow
    // request on it and upgrade while it runs.
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let first = roundtrip(&mut conn, "/", true).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(first.body.contains("generation=1"));
    let slow = std::thread::spawn(move || roundtrip(&mut conn, "/slow", false).map(|r| r.body));
    baton.upgrade_expect(&["--no-wait-drain"], 0);
    let body = slow
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("slow request failed: {e:?}"));
    assert_eq!(body.trim(), "slow done");
    baton.stderr.wait_for(
        &["generation exited", "generation=1 ", "exit status 0"],
        1,
        WAIT,
    );
}

#[test]
fn crash_looping_generation_backs_off_capped_and_keeps_sockets() {
    let baton = start(
        "FAKE_EXIT_AT_START = \"1\"",
        "restart_backoff_max = \"400ms\"",
        &[],
    );
    baton
        .stderr
        .wait_for(&["restarting generation", "generation=1 "], 6, WAIT);
    let s = baton.status();
    let g = &s["generations"][0];
    assert!(g["restarts"].as_u64().unwrap() >= 5, "{s}");
    assert!(
        g["last_exit"].as_str().unwrap().contains("exit status 1"),
        "{s}"
    );
    let delays: Vec<u64> = baton
        .stderr
        .all()
        .iter()
        .filter(|l| l.contains("restarting generation"))
        .filter_map(|l| l.split("delay_ms=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert!(delays.iter().all(|d| *d <= 400), "{delays:?}");
    assert!(delays.contains(&400), "backoff reaches its cap: {delays:?}");
    // The socket still accepts connections into its queue.
    let addr = baton.addr("http");
    std::net::TcpStream::connect(addr).expect("listener must stay open");
    // A fixed release can be deployed over the crash loop.
    reconfigure(&baton, "", "");
    baton.upgrade_expect(&[], 0);
    assert_eq!(get(addr, "/").unwrap().status, 200);
    // The crash-looping generation ended with the cutover; no restart is
    // left pending for it.
    let g1 = baton.generation(1);
    assert_eq!(g1["state"], "exited", "{g1}");
    let restarts = g1["restarts"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(600)); // longer than the capped backoff
    assert_eq!(baton.generation(1)["restarts"].as_u64().unwrap(), restarts);
}

#[test]
fn fifty_sighups_in_a_second_run_one_upgrade_at_a_time_and_the_last_wins() {
    let baton = start("FAKE_READY_DELAY_MS = \"100\"", "", &[]);
    baton.wait_active(1);
    let addr = baton.addr("http");
    let load = Load::start(
        addr,
        &[Mode::NewConnection, Mode::KeepAlive],
        1,
        Duration::from_secs(60),
    );
    for _ in 0..50 {
        signal(baton.pid(), nix::sys::signal::Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Wait until no upgrade runs or is pending, and every SIGHUP baton
    // handled got its answer (an upgrade started, or coalesced as busy).
    // The kernel merges pending signals, so how many deliveries (and so
    // upgrades) 50 signals make depends on timing; what is deterministic
    // is checked below: never two upgrades at once, and the last wins.
    wait_until("upgrades to settle", WAIT, || {
        let s = baton.status();
        let hups = baton.stderr.count(&["SIGHUP: upgrade requested"]);
        let answered =
            baton.stderr.count(&["trigger=Signal"]) + baton.stderr.count(&["SIGHUP: an upgrade"]);
        s["upgrading"].is_null()
            && hups > 0
            && answered >= hups
            && baton.stderr.count(&["upgrade succeeded"]) + baton.stderr.count(&["upgrade failed"])
                == baton.stderr.count(&["generation requested"]) - 1
    });
    let lines = baton.stderr.all();
    // Upgrades never overlap: each request is followed by its outcome
    // before the next request.
    let mut open = false;
    for l in &lines {
        if l.contains("generation requested") && !l.contains("Start") {
            assert!(!open, "two upgrades at once:\n{}", lines.join("\n"));
            open = true;
        }
        if l.contains("upgrade succeeded") || l.contains("upgrade failed") {
            open = false;
        }
    }
    // The last SIGHUP is followed by an upgrade start: the newest deploy wins.
    let last_hup = lines
        .iter()
        .rposition(|l| l.contains("SIGHUP: upgrade requested"))
        .unwrap();
    let last_start = lines
        .iter()
        .rposition(|l| l.contains("generation requested"))
        .unwrap();
    let last_coalesced = lines
        .iter()
        .rposition(|l| l.contains("running the upgrade requested by SIGHUP"));
    assert!(
        last_start > last_hup || last_coalesced.is_some_and(|c| c > last_hup),
        "the last SIGHUP did not lead to an upgrade:\n{}",
        lines.join("\n")
    );
    let upgrades = baton.stderr.count(&["upgrade succeeded"]);
    assert!((1..=50).contains(&upgrades), "{upgrades} upgrades");
    assert_eq!(baton.stderr.count(&["upgrade failed"]), 0);
    load.finish().assert_no_failures();
}

#[test]
fn upgrade_while_stopping_is_refused() {
    let baton = start("FAKE_IGNORE_TERM = \"1\"", "", &["--drain-timeout", "3s"]);
    baton.wait_active(1);
    signal(baton.pid(), nix::sys::signal::Signal::SIGTERM);
    baton
        .stderr
        .wait_for(&["stopping: draining every generation"], 1, WAIT);
    let out = baton.cli(&["upgrade"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe_output(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopping"));
}

#[test]
fn control_client_disconnecting_mid_upgrade_changes_nothing() {
    let baton = start("", "", &[]);
    baton.wait_active(1);
    reconfigure(&baton, "FAKE_READY_DELAY_MS = \"800\"", "");
    let mut client = std::process::Command::new(bin("baton"))
        .arg("--control")
        .arg(&baton.control)
        .arg("upgrade")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    baton
        .stderr
        .wait_for(&["generation started", "generation=2 "], 1, WAIT);
    client.kill().unwrap();
    client.wait().unwrap();
    baton.wait_active(2);
    baton
        .stderr
        .wait_for(&["generation exited", "generation=1 "], 1, WAIT);
    assert_eq!(baton.status()["active"], 2);
}

#[test]
fn hundred_upgrades_leak_nothing() {
    let out = tempfile::tempdir().unwrap();
    let report = out.path().join("report.json");
    let report_env = format!("TEST_SOCKETFD_REPORT = \"{}\"", report.display());
    let baton = start(&report_env, "", &[]);
    baton.wait_active(1);
    let pid = baton.pid();
    // Warm up (lazily allocated buffers, thread pools), then measure.
    for _ in 0..5 {
        baton.upgrade_expect(&[], 0);
    }
    let fds_before = fd_count(pid);
    let rss_before = rss_kb(pid);
    for _ in 0..100 {
        baton.upgrade_expect(&[], 0);
    }
    assert!(zombies_of(pid as i32).is_empty(), "zombies left");
    // A leak would add at least one fd per upgrade (100+); a control
    // connection or an exited generation's stderr pipe may still be
    // closing at either measurement, hence the small settle margin.
    let settled = |n: usize| n <= fds_before + 1;
    wait_until("supervisor fds to settle", WAIT, || settled(fd_count(pid)));
    let fds_after = fd_count(pid);
    assert!(
        settled(fds_after),
        "supervisor fds grew from {fds_before} to {fds_after}"
    );
    let rss_after = rss_kb(pid);
    assert!(
        rss_after <= rss_before + 2048,
        "supervisor RSS grew from {rss_before} kB to {rss_after} kB"
    );
    // The newest child holds exactly the declared descriptors.
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let fds: Vec<i64> = r["fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["fd"].as_i64().unwrap())
        .collect();
    assert_eq!(fds, vec![0, 1, 2, 3], "{r}");
    assert_eq!(r["env"]["BATON_GENERATION"], "106");
    // Only the active generation runs.
    let running: Vec<_> = baton.status()["generations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| !g["pid"].is_null())
        .map(|g| g["number"].clone())
        .collect();
    assert_eq!(running, vec![serde_json::json!(106)]);
    eprintln!(
        "after 105 upgrades: {} fds, RSS {rss_before} -> {rss_after} kB",
        fds_before
    );
}

#[test]
fn control_socket_is_private() {
    let baton = start("", "", &[]);
    baton.wait_active(1);
    let mode = std::fs::metadata(&baton.control)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let dir_mode = std::fs::metadata(baton.control.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        dir_mode & 0o022,
        0,
        "control directory writable by others: {dir_mode:o}"
    );

    // A world-writable directory is refused before anything starts.
    let open = tempfile::tempdir().unwrap();
    let shared = open.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = refuse_control_dir(&shared);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("writable by others"),
        "{}",
        describe_output(&out)
    );
}

/// Runs `baton run` with its control socket in `dir`, expecting exit 2.
fn refuse_control_dir(dir: &std::path::Path) -> CmdOutput {
    let out = run(std::process::Command::new(bin("baton"))
        .arg("--control")
        .arg(dir.join("c.sock"))
        .args([
            "run",
            "--listen",
            "http=127.0.0.1:0",
            "--",
            bin("hello").to_str().unwrap(),
        ]));
    assert_eq!(out.status.code(), Some(2), "{}", describe_output(&out));
    assert!(!dir.join("c.sock").exists(), "socket created anyway");
    out
}

/// A control directory owned by another user (here nobody, 65534) is
/// refused like a world-writable one: that user could replace the socket.
#[test]
#[cfg_attr(not(baton_root), ignore = "needs root (chowns to another user)")]
fn control_directory_owned_by_another_user_is_refused() {
    assert_root();
    let tmp = tempfile::tempdir().unwrap();
    let theirs = tmp.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let out = refuse_control_dir(&theirs);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("owned by another user"),
        "{}",
        describe_output(&out)
    );
    // Positive control: the same directory, given back to us, is accepted.
    std::os::unix::fs::chown(&theirs, Some(0), Some(0)).unwrap();
    let mut ok = std::process::Command::new(bin("baton"))
        .arg("--control")
        .arg(theirs.join("c.sock"))
        .args(["run", "--listen", "http=127.0.0.1:0", "--"])
        .arg(bin("hello"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sock = theirs.join("c.sock");
    wait_until("baton to take the directory once it is ours", WAIT, || {
        let exited = ok.try_wait().unwrap();
        assert!(exited.is_none(), "refused our own directory: {exited:?}");
        cli(&sock, &["status"]).status.success()
    });
    let out = cli(&sock, &["stop"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(ok.wait().unwrap().success());
}

/// For the tests that need root: they are compiled as ignored unless the
/// tests were built by root (`cfg(baton_root)`, see tests/build.rs), and
/// must then really run as root.
fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "built as root (cfg baton_root) but running as uid {}: rebuild the tests as this user",
        nix::unistd::geteuid()
    );
}

/// Creates (once) the unprivileged user and extra group the tests use.
fn test_user() -> (u32, u32, u32) {
    let run = |cmd: &[&str]| {
        let _ = std::process::Command::new(cmd[0]).args(&cmd[1..]).output();
    };
    run(&["groupadd", "--system", "baton-extra"]);
    run(&[
        "useradd",
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
        "--user-group",
        "baton-test",
    ]);
    run(&["usermod", "-aG", "baton-extra", "baton-test"]);
    let user = nix::unistd::User::from_name("baton-test")
        .unwrap()
        .expect("user baton-test");
    let extra = nix::unistd::Group::from_name("baton-extra")
        .unwrap()
        .expect("group baton-extra");
    (user.uid.as_raw(), user.gid.as_raw(), extra.gid.as_raw())
}

#[test]
#[cfg_attr(not(baton_root), ignore = "needs root (acts as other uids)")]
fn other_uids_are_refused_unless_allowed() {
    assert_root();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("baton.toml"),
        fake_config("control_allow_uids = [65533]", ""),
    )
    .unwrap();
    let baton = Baton::spawn(dir, &["--config", "baton.toml"]);
    baton.wait_active(1);
    // With allowed uids, baton makes the socket reachable (0666 in a 0711
    // directory) and SO_PEERCRED decides; the operator only opens the path
    // above it (here the test's temp dir).
    std::fs::set_permissions(baton.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = std::fs::metadata(&baton.control)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o666);
    let as_uid = |uid: u32| {
        use std::os::unix::process::CommandExt;
        run(std::process::Command::new(bin("baton"))
            .arg("--control")
            .arg(&baton.control)
            .arg("status")
            .uid(uid)
            .gid(65534))
    };
    let out = as_uid(65534);
    assert_eq!(out.status.code(), Some(2), "{}", describe_output(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("may not control"),
        "{}",
        describe_output(&out)
    );
    let out = as_uid(65533);
    assert!(out.status.success(), "{}", describe_output(&out));
}

#[test]
#[cfg_attr(
    not(baton_root),
    ignore = "needs root (creates a user, switches to it)"
)]
fn runs_generations_as_the_configured_user_and_group() {
    assert_root();
    let (uid, gid, extra_gid) = test_user();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::set_permissions(&out_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let report = out_dir.join("report.json");
    // A privileged port, bound by baton as root before the app starts.
    let port = (600..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free privileged port");
    let listen = format!("http=127.0.0.1:{port}");
    let env = format!("TEST_SOCKETFD_REPORT={}", report.display());
    let fake = bin("test-socketfd");
    // A private per-user runtime dir (as in a root login shell) must not
    // put the notify socket out of the app's reach.
    let xdg = tempfile::tempdir().unwrap();
    let xdg_path = xdg.path().to_str().unwrap().to_owned();
    let baton = Baton::spawn_with_env(
        dir,
        &[
            "--listen",
            &listen,
            "--user",
            "baton-test",
            "--env",
            &env,
            "--",
            fake.to_str().unwrap(),
        ],
        &[("XDG_RUNTIME_DIR", &xdg_path)],
    );
    baton.wait_active(1);
    wait_until("report", WAIT, || report.exists());
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["uid"], uid, "{r}");
    assert_eq!(r["gid"], gid, "{r}");
    let groups: Vec<u64> = r["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_u64().unwrap())
        .collect();
    assert!(
        groups.contains(&(extra_gid as u64)) && groups.contains(&(gid as u64)),
        "{groups:?}"
    );
    assert!(!groups.contains(&0), "root group kept: {groups:?}");
    let resp = get(format!("127.0.0.1:{port}").parse().unwrap(), "/").unwrap();
    assert_eq!(resp.status, 200);
}

/// Decision (docs/guarantees.md): if baton dies, even by SIGKILL, each
/// generation receives its drain signal (parent-death signal) and exits,
/// so no unsupervised app keeps holding the ports.
#[test]
fn apps_drain_and_exit_when_the_supervisor_is_killed() {
    // An app that records the signal it got, so the test sees the drain
    // signal itself (not, say, a broken stderr pipe).
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("got-signal");
    write_script(
        &dir.path().join("app.sh"),
        &format!(
            "trap 'echo TERM > {}; exit 0' TERM\nwhile :; do sleep 0.05; done",
            mark.display()
        ),
    );
    let mut baton = Baton::spawn(
        dir,
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            "delay:10ms",
            "--",
            "./app.sh",
        ],
    );
    baton.wait_active(1);
    let addr = baton.addr("http");
    let app = baton.generation(1)["pid"].as_i64().unwrap() as i32;
    signal(baton.pid(), nix::sys::signal::Signal::SIGKILL);
    baton.wait_exit(WAIT);
    wait_until("the app to get its drain signal", WAIT, || mark.exists());
    assert_eq!(std::fs::read_to_string(&mark).unwrap().trim(), "TERM");
    wait_until("the app to exit", WAIT, || group_members(app).is_empty());
    // The port is free again for a restarted baton.
    std::net::TcpListener::bind(addr).expect("port released");
}

#[test]
fn many_concurrent_and_stalled_control_clients() {
    let baton = start("", "", &[]);
    baton.wait_active(1);
    // Stalled clients that never finish their request.
    let stalled: Vec<_> = (0..8)
        .map(|_| {
            use std::io::Write;
            let mut s = std::os::unix::net::UnixStream::connect(&baton.control).unwrap();
            s.write_all(b"POST /v1/request HTTP/1.1\r\nhost: x\r\n")
                .unwrap();
            s
        })
        .collect();
    // Many clients at once all get answers.
    let control = baton.control.clone();
    let threads: Vec<_> = (0..40)
        .map(|_| {
            let control = control.clone();
            std::thread::spawn(move || cli(&control, &["status", "--json"]))
        })
        .collect();
    for t in threads {
        let out = t.join().unwrap();
        assert!(out.status.success(), "{}", describe_output(&out));
    }
    drop(stalled);
    assert_eq!(baton.status()["active"], 1);
}

/// Starts baton over a shell app whose main process drains on SIGTERM but
/// leaves behind a worker (in its group) that ignores it.
fn start_with_stubborn_worker(drain_timeout: &str) -> Baton {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        &dir.path().join("app.sh"),
        "(trap '' TERM; exec sleep 300) &\ntrap 'exit 0' TERM\nwhile :; do sleep 0.05; done",
    );
    let args = [
        "--listen",
        "http=127.0.0.1:0",
        "--ready",
        "delay:10ms",
        "--drain-timeout",
        drain_timeout,
        "--",
        "./app.sh",
    ];
    Baton::spawn(dir, &args)
}

/// Workers that outlive their group leader are killed at the drain
/// timeout, on upgrade and on stop: nothing is left behind.
#[test]
fn group_members_outliving_their_leader_are_killed_after_the_drain_timeout() {
    let mut baton = start_with_stubborn_worker("1s");
    baton.wait_active(1);
    let first = baton.generation(1)["pid"].as_i64().unwrap() as i32;
    wait_until("the worker to start", WAIT, || {
        group_members(first).len() >= 2
    });
    baton.upgrade_expect(&[], 0);
    wait_until("generation 1's worker to be killed", WAIT, || {
        group_members(first).is_empty()
    });
    assert!(baton
        .stderr
        .text()
        .contains("killing processes left in the group"));

    let second = baton.generation(2)["pid"].as_i64().unwrap() as i32;
    wait_until("the worker to start", WAIT, || {
        group_members(second).len() >= 2
    });
    let out = baton.cli(&["stop"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(baton.wait_exit(WAIT), 0);
    assert!(
        group_members(second).is_empty(),
        "worker left behind after stop"
    );
}

/// Many generations whose workers outlive their leader: none is forgotten
/// (pruned from the state) while its group lives, so `stop` still finds
/// and ends every worker.
#[test]
fn stop_ends_workers_of_long_finished_generations() {
    let mut baton = start_with_stubborn_worker("3s");
    baton.wait_active(1);
    for _ in 0..11 {
        baton.upgrade_expect(&[], 0);
    }
    let leaders: Vec<i32> = baton
        .stderr
        .all()
        .iter()
        .filter(|l| l.contains("generation started"))
        .filter_map(|l| l.split("pid=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(leaders.len(), 12);
    let out = baton.cli(&["stop"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(baton.wait_exit(WAIT), 0);
    for pgid in leaders {
        assert!(
            group_members(pgid).is_empty(),
            "a worker of group {pgid} outlived baton"
        );
    }
}

/// READY=1 sent with a passed descriptor (FDSTORE=1) still counts; the
/// descriptor is closed, and nothing stalls.
#[test]
fn ready_with_passed_fds_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        &dir.path().join("app.py"),
        "exec python3 -c 'import os, socket, time\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\ns.connect(os.environ[\"NOTIFY_SOCKET\"])\nsocket.send_fds(s, [b\"READY=1\\nFDSTORE=1\"], [0, 1])\ntime.sleep(300)'",
    );
    let baton = Baton::spawn(dir, &["--listen", "http=127.0.0.1:0", "--", "./app.py"]);
    baton.wait_active(1);
}
