//! baton under a service manager: what it tells systemd (recorded by
//! `tests/support/fake_systemd.py`, which does what systemd does for one
//! service and logs every datagram with its sender's pid), the sockets it
//! takes by name (from the fake, and from systemd's own
//! `systemd-socket-activate`), its fd store across a crash, and the unit
//! files it ships.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use baton_e2e::*;
use serde_json::Value;

/// `fake_systemd.py` with `flags`, recording to a notify socket in `dir`.
fn launcher(dir: &Path, flags: &[&str]) -> Vec<String> {
    let mut l = vec![
        "python3".to_owned(),
        repo_path("tests/support/fake_systemd.py")
            .display()
            .to_string(),
        "--notify".into(),
        dir.join("notify.sock").display().to_string(),
    ];
    l.extend(flags.iter().map(|s| s.to_string()));
    l.push("--".into());
    l
}

/// baton run by the fake service manager, with the fake app.
fn under_systemd(flags: &[&str], baton_args: &[&str], env: &str) -> Baton {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("baton.toml"),
        fake_config("", env).replace(
            "[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n",
            "",
        ),
    )
    .unwrap();
    let launcher = launcher(dir.path(), flags);
    let mut args = vec!["--config", "baton.toml"];
    args.extend_from_slice(baton_args);
    Baton::spawn_under(dir, &launcher, &args, &[])
}

/// The fake's events so far.
fn events(b: &Baton) -> Vec<Value> {
    b.stdout
        .all()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn events_of(b: &Baton, kind: &str) -> Vec<Value> {
    events(b)
        .into_iter()
        .filter(|e| e["event"] == kind)
        .collect()
}

/// The notify messages, in order.
fn messages(b: &Baton) -> Vec<String> {
    events_of(b, "notify")
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until some notify message satisfies `pred`.
fn wait_message(b: &Baton, what: &str, pred: impl Fn(&str) -> bool) {
    b.wait_until(what, WAIT, || messages(b).iter().any(|m| pred(m)));
}

/// The pid of baton (the service's main process) the fake started last.
fn service_pid(b: &Baton) -> i64 {
    b.wait_until("the service to start", WAIT, || {
        !events_of(b, "started").is_empty()
    });
    events_of(b, "started").last().unwrap()["pid"]
        .as_i64()
        .unwrap()
}

fn listening(b: &Baton, name: &str) -> String {
    b.wait_until("the fake to listen", WAIT, || {
        events_of(b, "listening").iter().any(|e| e["name"] == name)
    });
    events_of(b, "listening")
        .into_iter()
        .find(|e| e["name"] == name)
        .unwrap()["address"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Replaces what varies between runs: the monotonic time and the release
/// directory.
fn normalize(m: &str, dir: &Path) -> String {
    m.lines()
        .map(|l| {
            if l.starts_with("MONOTONIC_USEC=") {
                "MONOTONIC_USEC=<now>".to_owned()
            } else {
                l.replace(&dir.display().to_string(), "<dir>")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The whole conversation with systemd, in order, over a start, a reload
/// by SIGHUP (what `Type=notify-reload` sends) under load, and a stop:
/// READY=1 (with MAINPID, baton's own pid) once generation 1 is active;
/// RELOADING=1 with a current MONOTONIC_USEC when the upgrade begins;
/// READY=1 again once the new generation serves; STOPPING=1 on stop;
/// STATUS= naming the active generation and its release throughout. Every
/// datagram comes from baton's pid (MAINPID never changes), none carries a
/// descriptor (the socket was systemd's to begin with: nothing to store),
/// and no request fails during the reload.
#[test]
fn tells_systemd_ready_reloading_ready_stopping_in_order() {
    let mut b = under_systemd(
        &["--listen", "http=127.0.0.1:0,reuseport"],
        &["--listen", "http"],
        "",
    );
    let pid = service_pid(&b);
    wait_message(&b, "READY=1", |m| m.starts_with("READY=1"));
    let addr: SocketAddr = listening(&b, "http").parse().unwrap();
    assert_eq!(b.addr("http"), addr, "baton serves the inherited socket");
    assert_eq!(b.status()["traffic"], "steered");
    let load = Load::start(addr, &[Mode::NewConnection, Mode::KeepAlive], 2, WAIT);
    let before = Instant::now();
    let t0 = monotonic_us();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_message(&b, "READY=1 after the reload", |m| {
        m.starts_with("READY=1") && m.contains("generation 2 active")
    });
    let t1 = monotonic_us();
    load.wait_requests(50);
    let report = load.finish();
    report.assert_no_failures();
    assert!(version_of(&get(addr, "/").unwrap().body) == "good");
    b.wait_until("generation 1 to exit", WAIT, || {
        b.stderr.count(&["generation exited", "generation=1 "]) > 0
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(b.wait_exit(WAIT), 0, "{}", b.logs());

    let notes = events_of(&b, "notify");
    for n in &notes {
        assert_eq!(n["pid"], pid, "every message from baton's own pid: {n}");
        assert_eq!(n["fds"], 0, "no descriptor to store: {n}");
    }
    let reloading = notes
        .iter()
        .find(|n| n["message"].as_str().unwrap().starts_with("RELOADING=1"))
        .unwrap();
    let stamp: u64 = reloading["message"]
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (t0..=t1).contains(&stamp),
        "MONOTONIC_USEC={stamp} is when the reload began ({t0}..{t1}, {:?})",
        before.elapsed()
    );
    let dir = b.dir.path().to_owned();
    let got: Vec<String> = messages(&b).iter().map(|m| normalize(m, &dir)).collect();
    let expected = [
        "STATUS=generation 1 starting (<dir>)".to_owned(),
        format!("READY=1\nMAINPID={pid}\nSTATUS=generation 1 active (<dir>)"),
        "RELOADING=1\nMONOTONIC_USEC=<now>\n\
         STATUS=generation 1 active (<dir>); upgrading (loading the configuration)"
            .to_owned(),
        "STATUS=generation 1 active (<dir>); upgrading to generation 2".to_owned(),
        // Without a bake, the upgrade succeeds as its candidate takes the
        // traffic: one step.
        "READY=1\nSTATUS=generation 2 active (<dir>); last upgrade: generation 2 succeeded"
            .to_owned(),
        "STOPPING=1\nSTATUS=stopping: draining every generation".to_owned(),
    ];
    assert_eq!(got, expected, "{}", b.logs());
}

/// With `WATCHDOG_USEC`, baton pings `WATCHDOG=1` at half the interval
/// from its own pid; the app does not inherit the watchdog variables.
/// Positive control: the other runs, without a watchdog, send none.
#[test]
fn pings_the_watchdog_and_keeps_it_from_the_app() {
    let b = under_systemd(
        &["--watchdog-usec", "200000"],
        &["--listen", "http=127.0.0.1:0"],
        "",
    );
    let pid = service_pid(&b);
    b.wait_active(1);
    let start = Instant::now();
    b.wait_until("five pings", WAIT, || {
        messages(&b).iter().filter(|m| *m == "WATCHDOG=1\n").count() >= 5
    });
    // 5 pings at 100 ms take 400 ms at least (the first is at once).
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    for n in events_of(&b, "notify") {
        assert_eq!(n["pid"], pid, "{n}");
    }
    let report_path = b.path("report.json");
    // The fake app's report reads /proc/net/tcp, slow while the suite's
    // load tests leave tens of thousands of sockets in TIME_WAIT: a
    // generous ready timeout keeps this test about the watchdog.
    let b2 = under_systemd(
        &["--watchdog-usec", "200000"],
        &["--listen", "http=127.0.0.1:0", "--ready-timeout", "30s"],
        &format!("TEST_SOCKETFD_REPORT = \"{}\"", report_path.display()),
    );
    b2.wait_active(1);
    b2.wait_until("the app's report", WAIT, || report_path.exists());
    let report: Value = serde_json::from_slice(&std::fs::read(&report_path).unwrap()).unwrap();
    let env = report["env"].to_string();
    assert!(!env.contains("WATCHDOG_USEC"), "{env}");
    assert!(
        env.contains("NOTIFY_SOCKET"),
        "positive control: the env is there: {env}"
    );
    // The first test's run (no --watchdog-usec) sends no WATCHDOG=1: see
    // tells_systemd_ready_reloading_ready_stopping_in_order's exact list.
}

/// An inherited socket without SO_REUSEPORT cannot take baton's
/// per-generation sockets: baton says why, shares it, and serves.
#[test]
fn an_inherited_socket_without_reuseport_is_shared_and_baton_says_why() {
    let b = under_systemd(&["--listen", "http=127.0.0.1:0"], &["--listen", "http"], "");
    b.wait_active(1);
    let addr: SocketAddr = listening(&b, "http").parse().unwrap();
    assert_eq!(b.status()["traffic"], "shared");
    assert_eq!(
        b.stderr.count(&[
            "steered traffic is unavailable",
            "has no SO_REUSEPORT",
            "ReusePort=yes"
        ]),
        1,
        "{}",
        b.logs()
    );
    assert_eq!(version_of(&get(addr, "/").unwrap().body), "good");
}

/// `--listen http=ADDR` with an inherited `http` bound elsewhere: exit 2,
/// naming both addresses; and a name alone with nothing inherited: exit 2.
#[test]
fn an_inherited_socket_that_does_not_match_exits_2_naming_both() {
    let mut b = under_systemd(
        &["--listen", "http=127.0.0.1:0"],
        &["--listen", "http=127.0.0.1:1"],
        "",
    );
    let actual = listening(&b, "http");
    b.wait_until("baton to exit", WAIT, || {
        !events_of(&b, "exited").is_empty()
    });
    assert_eq!(events_of(&b, "exited")[0]["code"], 2, "{}", b.logs());
    let err = b.stderr.text();
    assert!(
        err.contains("127.0.0.1:1") && err.contains(&actual),
        "{err}"
    );
    let _ = b.wait_exit(WAIT);

    let dir = tempfile::tempdir().unwrap();
    let out = run(Command::new(bin("baton"))
        .current_dir(dir.path())
        .args(["--control", "c.sock", "run", "--listen", "http", "--"])
        .arg(bin("test-socketfd")));
    assert_eq!(out.status.code(), Some(2), "{}", describe_output(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not started with sockets (LISTEN_FDS)"),
        "{err}"
    );
}

/// systemd's own `systemd-socket-activate` holds a Unix socket and starts
/// baton on the first connection, which waited in the socket's queue and
/// is served by the app; baton never removes the inherited socket file.
/// Positive control: a socket file baton binds itself is removed on exit.
#[test]
fn under_systemd_socket_activate_the_first_connection_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("http.sock");
    let config = fake_config("", "").replace(
        "[[listen]]\nname = \"http\"\naddress = \"127.0.0.1:0\"\n",
        "[[listen]]\nname = \"http\"\n",
    );
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let launcher = vec![
        "systemd-socket-activate".to_owned(),
        "--listen".into(),
        sock.display().to_string(),
        "--fdname=http".into(),
    ];
    let mut b = Baton::spawn_under(dir, &launcher, &["--config", "baton.toml"], &[]);
    b.wait_until("the socket file", WAIT, || sock.exists());
    assert_eq!(
        b.stderr.count(&["supervisor started"]),
        0,
        "started on demand only"
    );
    // The first connection waits in the queue while baton and the app
    // start. The file appears at bind(), a moment before listen(): until
    // then a connection is refused (and starts nothing), so retry those.
    let deadline = Instant::now() + WAIT;
    let mut conn = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(c) => break c,
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("connecting to {}: {e}\n{}", sock.display(), b.logs()),
        }
    };
    conn.set_read_timeout(Some(WAIT)).unwrap();
    std::io::Write::write_all(
        &mut conn,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut conn, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}\n{}", b.logs());
    assert!(answer.contains("generation=1"), "{answer}");
    let status = b.status();
    assert_eq!(
        status["sockets"][0]["address"],
        format!("unix:{}", sock.display())
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(b.wait_exit(WAIT), 0, "{}", b.logs());
    assert!(
        sock.exists(),
        "the inherited socket file is systemd's: never removed"
    );

    let own = tempfile::tempdir().unwrap();
    let path = own.path().join("own.sock");
    let listen = format!("http=unix:{}", path.display());
    let mut b = Baton::spawn(
        own,
        &[
            "--listen",
            &listen,
            "--",
            bin("test-socketfd").to_str().unwrap(),
        ],
    );
    b.wait_active(1);
    assert!(path.exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(b.wait_exit(WAIT), 0);
    assert!(
        !path.exists(),
        "positive control: baton removes its own socket file"
    );
}

/// baton keeps its listener in systemd's fd store (FDSTORE=1, FDNAME=http,
/// the socket attached). When baton is killed and restarted, it gets the
/// same socket back by name and keeps steering on it; connections made
/// while no baton runs wait in its queue and are served: none is refused.
#[test]
fn the_fd_store_carries_the_socket_across_a_crash_without_refusing() {
    let b = under_systemd(&["--restarts", "1"], &["--listen", "http=127.0.0.1:0"], "");
    let first = service_pid(&b);
    b.wait_active(1);
    wait_message(&b, "FDSTORE=1", |m| m.starts_with("FDSTORE=1"));
    let stores: Vec<Value> = events_of(&b, "notify")
        .into_iter()
        .filter(|n| n["message"].as_str().unwrap().starts_with("FDSTORE=1"))
        .collect();
    assert_eq!(stores.len(), 1, "{stores:?}");
    assert_eq!(stores[0]["message"], "FDSTORE=1\nFDNAME=http\n");
    assert_eq!(stores[0]["fds"], 1);
    let addr = b.addr("http");
    let load = Load::start(addr, &[Mode::NewConnection], 2, WAIT);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    b.wait_until("the restart", WAIT, || events_of(&b, "started").len() == 2);
    let second = service_pid(&b);
    assert_ne!(first, second);
    assert_eq!(
        events_of(&b, "started")[1]["fds"],
        serde_json::json!(["http"])
    );
    b.wait_until("the restarted baton's READY=1", WAIT, || {
        events_of(&b, "notify")
            .iter()
            .any(|n| n["pid"] == second && n["message"].as_str().unwrap().starts_with("READY=1"))
    });
    load.wait_requests(200);
    let report = load.finish();
    assert_eq!(report.connect_errors(), 0, "refused: {:?}", report.errors);
    // Requests in flight in the killed baton's app die with it (at most
    // one per client); nothing else fails.
    assert!(report.failed <= 2, "{:?}", report.errors);
    assert_eq!(b.addr("http"), addr, "the same socket");
    assert_eq!(b.status()["traffic"], "steered", "{}", b.logs());
    assert!(
        !events_of(&b, "notify")
            .iter()
            .any(|n| n["pid"] == second && n["message"].as_str().unwrap().starts_with("FDSTORE")),
        "the restarted baton stores nothing twice"
    );
}

/// The unit files in examples/systemd pass `systemd-analyze verify`
/// (with their paths pointed at real files).
#[test]
fn the_example_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let src = repo_path("examples/systemd");
    let mut units = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if !(name.ends_with(".service") || name.ends_with(".socket")) {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("/usr/local/bin/baton", bin("baton").to_str().unwrap());
        std::fs::write(dir.path().join(&name), text).unwrap();
        units.push(dir.path().join(&name));
    }
    assert!(
        units.len() >= 3,
        "service, socket and hardened service: {units:?}"
    );
    let out = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(&units)
        .env("SYSTEMD_LOG_LEVEL", "warning"));
    assert!(out.status.success(), "{}", describe_output(&out));
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    // systemd before 253 does not know Type=notify-reload and says so (and
    // the unit still runs as Type=notify there): the only warning allowed.
    let other: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.contains("notify-reload"))
        .collect();
    assert!(other.is_empty(), "{}", describe_output(&out));
}

fn monotonic_us() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
}

/// `baton upgrade --self` under systemd: the main pid never changes, the
/// manager hears RELOADING=1 then READY=1 from it, the fd store is left as
/// it was (nothing stored twice), and the socket keeps serving.
#[test]
fn a_self_upgrade_keeps_the_main_pid_and_tells_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("baton");
    std::fs::copy(bin("baton"), &exe).unwrap();
    std::fs::write(dir.path().join("baton.toml"), fake_config("", "")).unwrap();
    let launcher = launcher(dir.path(), &[]);
    let b = Baton::spawn_under_binary(dir, &launcher, &exe, &["--config", "baton.toml"]);
    let pid = service_pid(&b);
    wait_message(&b, "READY=1", |m| m.starts_with("READY=1"));
    let addr = b.addr("http");
    let before = messages(&b).len();
    let out = b.cli(&["upgrade", "--self"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe_output(&out),
        b.logs()
    );
    wait_message(&b, "READY=1 after the hand-over", |m| m == "READY=1\n");
    let notes = events_of(&b, "notify");
    for n in &notes {
        assert_eq!(n["pid"], pid, "MAINPID never changes: {n}");
    }
    let after: Vec<String> = messages(&b)[before..].to_vec();
    assert!(
        after[0].starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{after:?}"
    );
    assert!(
        after[0].contains("STATUS=baton is upgrading itself"),
        "{after:?}"
    );
    assert!(after.iter().any(|m| m == "READY=1\n"), "{after:?}");
    assert!(
        !after.iter().any(|m| m.starts_with("FDSTORE")),
        "nothing stored twice: {after:?}"
    );
    assert_eq!(events_of(&b, "started").len(), 1, "systemd saw no restart");
    assert_eq!(b.status()["handovers"], 1);
    assert_eq!(version_of(&get(addr, "/").unwrap().body), "good");
}

/// With `--workers 3`, `READY=1` goes to systemd only once every worker of
/// the first generation is ready (two ready workers are not enough), with
/// `MAINPID` baton's own pid, never a worker's; every datagram systemd
/// gets comes from baton.
#[test]
fn ready_only_once_every_worker_is_ready() {
    let gates = tempfile::tempdir().unwrap();
    let gate = gates.path().join("gate-{worker}");
    let env = format!("FAKE_READY_GATE = \"{}\"", gate.display());
    let flags = [
        "--listen",
        "http=127.0.0.1:0",
        "--workers",
        "3",
        "--ready-timeout",
        "60s",
    ];
    let b = under_systemd(&[], &flags, &env);
    let pid = service_pid(&b);
    // Every worker started: baton answers on its control socket by then.
    b.stderr
        .wait_for(&["generation started", "generation=1 "], 3, WAIT);
    let open = |w: u32| std::fs::write(gates.path().join(format!("gate-{w}")), b"").unwrap();
    let ready_workers = || {
        b.generation(1)["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "ready")
            .count()
    };
    open(0);
    open(2);
    b.wait_until("two workers ready", WAIT, || ready_workers() == 2);
    assert_eq!(b.generation(1)["state"], "starting");
    assert!(
        !messages(&b).iter().any(|m| m.starts_with("READY=1")),
        "READY=1 with a worker not ready: {:?}",
        messages(&b)
    );
    open(1);
    wait_message(&b, "READY=1", |m| m.starts_with("READY=1"));
    assert_eq!(ready_workers(), 3);
    let ready = messages(&b)
        .into_iter()
        .find(|m| m.starts_with("READY=1"))
        .unwrap();
    assert!(ready.contains(&format!("MAINPID={pid}\n")), "{ready}");
    let workers: Vec<i64> = b.generation(1)["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    assert!(!workers.contains(&pid), "{workers:?} {pid}");
    for n in events_of(&b, "notify") {
        assert_eq!(n["pid"], pid, "{n}");
    }
}
