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

/// A request the old generation is still working on when its drain
/// signal arrives completes. The fake app's `/after-drain` answers only
/// once the drain signal has arrived (then works 500 ms more), so the
/// request is provably in flight across the drain.
#[test]
fn slow_in_flight_request_on_the_old_generation_completes() {
    let baton = start("FAKE_SLOW_MS = \"500\"", "", &[]);
    baton.wait_active(1);
    let addr = baton.addr("http");
    // Pin a connection to generation 1 (the only one), then start the
    // request on it and upgrade while it runs.
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let first = roundtrip(&mut conn, "/", true).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(first.body.contains("generation=1"), "{}", first.body);
    let slow = std::thread::spawn(move || roundtrip(&mut conn, "/after-drain", false));
    baton
        .stderr
        .wait_for(&["fake: /after-drain waiting for the drain"], 1, WAIT);
    baton.upgrade_expect(&["--no-wait-drain"], 0);
    let r = slow
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("in-flight request failed: {e:?}"));
    assert_eq!((r.status, r.body.trim()), (200, "answered after drain"));
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

/// The value of `key=` in a log line (tracing's `key=value` fields).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Whether a SIGHUP sent to `pid` is still pending in the kernel (not yet
/// taken by baton's signal handler).
fn sighup_pending(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("ShdPnd:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & 1 << (libc::SIGHUP - 1) != 0)
}

/// One upgrade as baton's log tells it.
#[derive(Debug)]
struct UpgradeSeen {
    generation: u64,
    trigger: String,
    requested: usize,
    outcome: Option<usize>,
}

fn upgrades_in(lines: &[String]) -> Vec<UpgradeSeen> {
    let mut out: Vec<UpgradeSeen> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let generation = field(l, "generation").and_then(|g| g.parse().ok());
        if l.contains("generation requested") {
            let trigger = field(l, "trigger").unwrap_or("").to_owned();
            if trigger != "Start" {
                out.push(UpgradeSeen {
                    generation: generation.unwrap(),
                    trigger,
                    requested: i,
                    outcome: None,
                });
            }
        } else if l.contains("upgrade succeeded") || l.contains("upgrade failed") {
            if let Some(u) = out.iter_mut().find(|u| Some(u.generation) == generation) {
                u.outcome.get_or_insert(i);
            }
        }
    }
    out
}

/// SIGHUPs during an upgrade are remembered, not run at once and not
/// lost: however many arrive, exactly one more upgrade runs after the
/// current one ends, and it reads the configuration as it is then (the
/// newest deploy wins). An upgrade is held open by a candidate whose
/// READY=1 waits for a gate file, while 50 SIGHUPs arrive in a second.
#[test]
fn sighups_during_an_upgrade_schedule_exactly_one_more_and_the_newest_deploy_wins() {
    const COALESCED: &str = "running the upgrade requested by SIGHUP during the last one";
    let baton = start("", "", &[]);
    baton.wait_active(1);
    let addr = baton.addr("http");
    let load = Load::start(
        addr,
        &[Mode::NewConnection, Mode::KeepAlive],
        1,
        Duration::from_secs(120),
    );
    let gate = baton.path("gate");
    baton.reconfigure(&gated_fake_config("v2", &gate));
    signal(baton.pid(), nix::sys::signal::Signal::SIGHUP);
    baton
        .stderr
        .wait_for(&["generation started", "generation=2 "], 1, WAIT);
    // The newest deploy lands while upgrade 2 is held open.
    baton.reconfigure(&gated_fake_config("v3", &gate));
    for _ in 0..50 {
        signal(baton.pid(), nix::sys::signal::Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every SIGHUP baton took is answered: it started an upgrade (a
    // request not preceded by COALESCED) or was refused as busy, which
    // the answer says with the upgrade it met ("(to generation N)").
    let busy_for = |lines: &[String], g: u64| {
        let met = format!("(to generation {g})");
        lines
            .iter()
            .filter(|l| l.contains("SIGHUP: ") && l.contains("in progress") && l.contains(&met))
            .count()
    };
    let all_answered = || {
        let hups = baton.stderr.count(&["SIGHUP: upgrade requested"]);
        let busy = baton.stderr.count(&["SIGHUP: ", "in progress"]);
        let started = baton
            .stderr
            .count(&["generation requested", "trigger=Signal"]);
        let direct = started.saturating_sub(baton.stderr.count(&[COALESCED]));
        !sighup_pending(baton.pid()) && hups == busy + direct
    };
    baton.wait_until("every SIGHUP to be answered", WAIT, all_answered);
    // Positive control: SIGHUPs really met upgrade 2, which still runs.
    assert!(
        busy_for(&baton.stderr.all(), 2) >= 1,
        "no SIGHUP arrived during upgrade 2\n{}",
        baton.logs()
    );
    assert_eq!(baton.status()["upgrading"], 2, "{}", baton.logs());

    std::fs::write(&gate, "").unwrap();
    // Settled: nothing runs, the newest generation's outcome is logged,
    // and every SIGHUP is answered.
    let mut last = 0;
    baton.wait_until("the upgrades to settle", WAIT, || {
        // The log first, then the state: anything the log shows started
        // is in the state read after it.
        let lines = baton.stderr.all();
        let s = baton.status();
        last = s["generations"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|g| g["number"].as_u64())
            .max()
            .unwrap();
        // A follow-up owed (COALESCED logged) is prepared (the
        // configuration loaded) before it is requested: not settled until
        // it has been.
        let owed = lines.iter().rposition(|l| l.contains(COALESCED));
        let requested = lines
            .iter()
            .rposition(|l| l.contains("generation requested"));
        s["upgrading"].is_null()
            && owed.is_none_or(|o| requested.is_some_and(|r| r > o))
            && upgrades_in(&lines)
                .iter()
                .any(|u| u.generation == last && u.outcome.is_some())
            && all_answered()
    });
    let lines = baton.stderr.all();
    let text = lines.join("\n");
    let ups: Vec<UpgradeSeen> = upgrades_in(&lines)
        .into_iter()
        .filter(|u| u.generation <= last)
        .collect();
    // One upgrade at a time: each ends before the next is requested.
    for w in ups.windows(2) {
        let end = w[0]
            .outcome
            .unwrap_or_else(|| panic!("{:?} never ended:\n{text}", w[0]));
        assert!(end < w[1].requested, "two upgrades at once: {w:?}\n{text}");
    }
    // Exactly one more upgrade after each upgrade a SIGHUP met, and none
    // after one no SIGHUP met (a later SIGHUP starts its own).
    for (i, u) in ups.iter().enumerate() {
        let end = u.outcome.unwrap();
        let next = ups.get(i + 1);
        let until = next.map_or(lines.len(), |n| n.requested);
        let coalesced = lines[end..until]
            .iter()
            .filter(|l| l.contains(COALESCED))
            .count();
        let met = busy_for(&lines, u.generation);
        assert_eq!(
            coalesced,
            usize::from(met > 0),
            "upgrade {} met {met} SIGHUP(s):\n{text}",
            u.generation,
        );
        if met > 0 {
            let n = next.unwrap_or_else(|| panic!("no upgrade after {}:\n{text}", u.generation));
            assert_eq!(n.trigger, "Signal", "{text}");
        }
        assert_eq!(u.trigger, "Signal", "{text}");
    }
    assert_eq!(
        lines.iter().filter(|l| l.contains(COALESCED)).count(),
        ups.iter()
            .filter(|u| busy_for(&lines, u.generation) > 0)
            .count(),
        "{text}"
    );
    assert_eq!(ups[1].generation, 3, "{text}");
    // All succeeded, and the newest deploy serves.
    assert_eq!(baton.stderr.count(&["upgrade failed"]), 0, "{text}");
    assert_eq!(baton.status()["active"], last);
    let r = get(addr, "/").unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(version_of(&r.body), "v3", "{}", r.body);
    eprintln!(
        "{} SIGHUPs handled, upgrades: {:?}",
        baton.stderr.count(&["SIGHUP: upgrade requested"]),
        ups.iter().map(|u| u.generation).collect::<Vec<_>>()
    );
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

/// The upgrade is held open (its candidate waits for a gate file) until
/// the client that asked for it is gone; it then completes on its own.
#[test]
fn control_client_disconnecting_mid_upgrade_changes_nothing() {
    let baton = start("", "", &[]);
    baton.wait_active(1);
    let gate = baton.path("gate");
    baton.reconfigure(&gated_fake_config("v2", &gate));
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
    assert_eq!(baton.status()["upgrading"], 2, "{}", baton.logs());
    std::fs::write(&gate, "").unwrap();
    baton.wait_active(2);
    baton
        .stderr
        .wait_for(&["generation exited", "generation=1 "], 1, WAIT);
    assert_eq!(baton.status()["active"], 2);
    assert_eq!(
        version_of(&get(baton.addr("http"), "/").unwrap().body),
        "v2"
    );
}

#[test]
fn hundred_upgrades_leak_nothing() {
    let out = tempfile::tempdir().unwrap();
    let report = out.path().join("report.json");
    let report_env = format!("TEST_SOCKETFD_REPORT = \"{}\"", report.display());
    // The fake app's report reads /proc/net/tcp, slow on a machine with
    // tens of thousands of sockets in TIME_WAIT: a generous ready timeout
    // keeps this test about leaks, not about that.
    let baton = start(&report_env, "", &["--ready-timeout", "30s"]);
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
/// so no unsupervised app keeps holding the ports. And what happens to an
/// app that writes to stderr then: baton, which read the pipe, is gone,
/// so the write raises SIGPIPE, which kills the writer at the default
/// disposition baton leaves every child (here a shell subshell: status
/// 141 = 128 + SIGPIPE); a runtime that ignores SIGPIPE itself (here
/// Python) sees the write fail with EPIPE instead.
#[test]
fn apps_drain_and_exit_when_the_supervisor_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("got-signal");
    std::fs::write(
        dir.path().join("write_stderr.py"),
        "import errno, os\n\
         try:\n    os.write(2, b'draining\\n')\n    print('python stderr write: ok')\n\
         except OSError as e:\n    print('python stderr write: ' + errno.errorcode[e.errno])\n",
    )
    .unwrap();
    write_script(
        &dir.path().join("app.sh"),
        &format!(
            "trap '\n\
               echo TERM > {m}.tmp\n\
               (echo draining >&2)\n\
               echo \"subshell stderr write: status $?\" >> {m}.tmp\n\
               python3 write_stderr.py >> {m}.tmp\n\
               mv {m}.tmp {m}\n\
               exit 0' TERM\n\
             while :; do sleep 0.05; done",
            m = mark.display()
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
    let got = std::fs::read_to_string(&mark).unwrap();
    let got: Vec<&str> = got.lines().collect();
    assert_eq!(
        got,
        [
            "TERM",
            "subshell stderr write: status 141",
            "python stderr write: EPIPE"
        ]
    );
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
/// leaves behind a worker (in its group) that ignores it, and another that
/// writes `worker-got-TERM-<generation>` in baton's directory when the
/// drain signal reaches it.
fn start_with_stubborn_worker(drain_timeout: &str) -> Baton {
    let dir = tempfile::tempdir().unwrap();
    let marks = dir.path().display().to_string();
    write_script(
        &dir.path().join("app.sh"),
        &format!(
            "(trap '' TERM; exec sleep 300) &\n\
             (trap 'touch {marks}/worker-got-TERM-$BATON_GENERATION; exit 0' TERM; while :; do sleep 0.05; done) &\n\
             trap 'exit 0' TERM\nwhile :; do sleep 0.05; done"
        ),
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

/// The drain signal goes to the generation's whole process group (a
/// worker gets it too); workers that outlive their group leader get the
/// rest of the drain timeout, then SIGKILL, on upgrade and on stop:
/// nothing is left behind.
#[test]
fn group_members_outliving_their_leader_are_killed_after_the_drain_timeout() {
    const DRAIN: Duration = Duration::from_secs(1);
    let mut baton = start_with_stubborn_worker("1s");
    baton.wait_active(1);
    let first = baton.generation(1)["pid"].as_i64().unwrap() as i32;
    wait_until("the workers to start", WAIT, || {
        group_members(first).len() >= 3
    });
    let before_upgrade = std::time::Instant::now();
    baton.upgrade_expect(&[], 0);
    wait_until("generation 1's worker to be killed", WAIT, || {
        group_members(first).is_empty()
    });
    // The drain began after `before_upgrade`, so a kill at the drain
    // timeout, not earlier, is observed at least DRAIN after it.
    let lived = before_upgrade.elapsed();
    assert!(
        lived >= DRAIN,
        "the stubborn worker was killed after {lived:?}, before the {DRAIN:?} drain timeout"
    );
    assert!(
        baton.path("worker-got-TERM-1").exists(),
        "the drain signal did not reach the group's worker"
    );
    baton
        .stderr
        .wait_for(&["killing processes left in the group"], 1, WAIT);

    let second = baton.generation(2)["pid"].as_i64().unwrap() as i32;
    wait_until("the workers to start", WAIT, || {
        group_members(second).len() >= 3
    });
    let out = baton.cli(&["stop"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(baton.wait_exit(WAIT), 0);
    assert!(
        group_members(second).is_empty(),
        "worker left behind after stop"
    );
    assert!(baton.path("worker-got-TERM-2").exists());
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

/// Runs an app that passes descriptors with its notify datagrams: first a
/// datagram with 40 copies of one pipe's write end (more than baton takes,
/// so baton drops it), then `READY=1` + `FDSTORE=1` with another pipe's
/// write end, then `STATUS=after the fds`. It closes its own copies and
/// reports, per pipe, whether the read end sees end-of-file (every copy
/// closed) within 20 s.
fn run_fd_passing_app() -> Baton {
    let dir = tempfile::tempdir().unwrap();
    write_script(
        &dir.path().join("app.py"),
        r#"exec python3 -c '
import os, select, socket, sys, time
dropped_r, dropped_w = os.pipe()
counted_r, counted_w = os.pipe()
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(os.environ["NOTIFY_SOCKET"])
socket.send_fds(s, [b"STATUS=too many fds"], [dropped_w] * 40)
socket.send_fds(s, [b"READY=1\nFDSTORE=1"], [counted_w])
s.send(b"STATUS=after the fds")
os.close(dropped_w)
os.close(counted_w)
def closed(r):
    readable, _, _ = select.select([r], [], [], 20)
    return bool(readable) and os.read(r, 1) == b""
for name, r in (("counted", counted_r), ("dropped", dropped_r)):
    state = "closed" if closed(r) else "still open after 20s"
    print("app: fds of the " + name + " datagram: " + state, file=sys.stderr, flush=True)
time.sleep(300)
'"#,
    );
    let baton = Baton::spawn(dir, &["--listen", "http=127.0.0.1:0", "--", "./app.py"]);
    baton.wait_active(1);
    baton
        .stderr
        .wait_for(&["app: fds of the counted datagram"], 1, WAIT);
    baton
}

/// A notify datagram carrying descriptors (FDSTORE=1) still counts, and
/// baton closes what it was passed (the app sees end-of-file once its own
/// copy is closed). A datagram with more descriptors than baton takes is
/// dropped without stalling the ones after it.
#[test]
fn notify_with_passed_fds_counts_and_the_fds_are_closed() {
    let baton = run_fd_passing_app();
    assert_eq!(
        baton
            .stderr
            .count(&["app: fds of the counted datagram: closed"]),
        1,
        "{}",
        baton.logs()
    );
    baton.wait_until("the datagram after the dropped one to count", WAIT, || {
        baton.generation(1)["status_text"] == "after the fds"
    });
}

/// The descriptors of a datagram baton drops (more than it takes) are
/// closed too. Today they stay open in baton: nix's `cmsgs()` refuses to
/// parse a truncated control message, so they are never seen to be closed
/// (16 fds leak per such datagram; anyone can send one, the notify
/// socket is 0666).
#[test]
fn fds_of_a_dropped_notify_datagram_are_closed() {
    let baton = run_fd_passing_app();
    baton
        .stderr
        .wait_for(&["app: fds of the dropped datagram"], 1, WAIT);
    assert_eq!(
        baton
            .stderr
            .count(&["app: fds of the dropped datagram: closed"]),
        1,
        "{}",
        baton.logs()
    );
}
