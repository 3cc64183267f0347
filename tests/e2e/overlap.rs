//! Upgrades without overlap (`overlap = "none"`), end to end: the old
//! generation drains and is gone before the new one starts on the same
//! sockets; connections arriving meanwhile wait in the kernel's queue and
//! are served by the new generation; a failed start brings the previous
//! release back the same way.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_e2e::*;

/// A config for the fake app with `top` lines, logging its life to `log`.
fn config(top: &str, log: &Path, env: &str) -> String {
    fake_config(
        top,
        &format!("FAKE_LIFE_LOG = \"{}\"\n{env}", log.display()),
    )
}

/// Each generation from `first` on started with no other process of the
/// app alive (as it saw itself), and after the one before it had exited.
fn assert_never_two_at_once(log: &Path, first: u64, last: u64) {
    let lives = life_log(log);
    for gen in first..=last {
        let start = life_of(&lives, "start", gen);
        assert!(
            start.alive.is_empty(),
            "generation {gen} started while {:?} still ran: {lives:#?}",
            start.alive
        );
        let exit = life_of(&lives, "exit", gen - 1);
        assert!(
            exit.ns < start.ns,
            "generation {} exited after generation {gen} started: {lives:#?}",
            gen - 1
        );
    }
}

/// Five upgrades under continuous load, a new connection per request and
/// keep-alive, with the new version taking 200 ms to start: no request
/// fails (none refused, none reset), every response after an upgrade is
/// the new generation's, and no generation ever started beside another.
#[test]
fn upgrades_without_overlap_under_load_refuse_and_reset_nothing() {
    for traffic in ["steered", "shared"] {
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("life.log");
        let top = format!("traffic = \"{traffic}\"\noverlap = \"none\"");
        let baton = Baton::with_config(&config(&top, &log, "FAKE_START_DELAY_MS = \"200\""), &[]);
        baton.wait_active(1);
        assert_eq!(baton.status()["traffic"], traffic);
        let addr = baton.addr("http");
        let load = Load::start(
            addr,
            &[Mode::NewConnection, Mode::KeepAlive],
            2,
            Duration::from_secs(120),
        );
        for gen in 2..=6u64 {
            let out = baton.upgrade_expect(&[], 0);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("upgrade succeeded"), "{text}");
            assert_eq!(
                census(addr, 10).keys().copied().collect::<Vec<_>>(),
                [gen],
                "{traffic}: only the new generation serves after upgrade {gen}"
            );
            load.wait_requests(20);
        }
        load.finish().assert_served_all(traffic);
        assert_never_two_at_once(&log, 2, 6);
    }
}

/// One probe's view: when its connection was established (the kernel's
/// handshake, CLOCK_MONOTONIC) and who answered.
#[derive(Debug, Clone)]
struct Probe {
    connected_ns: u64,
    answer: Result<(u64, i64), String>,
}

/// Probes' results, shared while they run, and the thread starting them.
type Probing = (Arc<Mutex<Vec<Probe>>>, std::thread::JoinHandle<()>);

/// A new client every 20 ms, each on its own thread (so one waiting in
/// the queue holds up no other), until stopped.
fn probe_continuously(addr: SocketAddr, stop: &Arc<AtomicBool>) -> Probing {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (results, stop) = (seen.clone(), stop.clone());
    let starter = std::thread::spawn(move || {
        let mut clients = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
            let results = results.clone();
            clients.push(std::thread::spawn(move || {
                let probe = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(mut s) => {
                        let connected_ns = mono_ns();
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        let answer = roundtrip(&mut s, "/", false)
                            .map(|r| who(&r.body))
                            .map_err(|e| format!("{e:?}"));
                        Probe {
                            connected_ns,
                            answer,
                        }
                    }
                    Err(e) => Probe {
                        connected_ns: mono_ns(),
                        answer: Err(format!("connect: {e}")),
                    },
                };
                results.lock().unwrap().push(probe);
            }));
            std::thread::sleep(Duration::from_millis(20));
        }
        for c in clients {
            c.join().unwrap();
        }
    });
    (seen, starter)
}

/// Waits until `n` more probes have been answered.
fn probes_wait(p: &Probing, n: usize) {
    let start = p.0.lock().unwrap().len();
    wait_until("probes to be answered", WAIT, || {
        p.0.lock().unwrap().len() >= start + n
    });
}

/// The positive control for the queue: the new version takes 600 ms to
/// start, and clients connecting after the old process exited and before
/// the new one accepted did connect (the kernel's queue took them) and
/// were answered by the new process. With overlap the same log shows the
/// two processes alive together, so the log can see it.
#[test]
fn connections_arriving_in_the_gap_wait_and_are_served_by_the_new_generation() {
    for overlap in ["none", "full"] {
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("life.log");
        let top = format!("overlap = \"{overlap}\"");
        let baton = Baton::with_config(&config(&top, &log, "FAKE_START_DELAY_MS = \"600\""), &[]);
        baton.wait_active(1);
        let addr = baton.addr("http");
        let stop = Arc::new(AtomicBool::new(false));
        let probing = probe_continuously(addr, &stop);
        probes_wait(&probing, 4);
        baton.upgrade_expect(&[], 0);
        probes_wait(&probing, 20);
        stop.store(true, Ordering::Relaxed);
        let (seen, starter) = probing;
        starter.join().unwrap();
        let seen = seen.lock().unwrap().clone();
        let lives = life_log(&log);
        let (old, new) = (life_of(&lives, "start", 1), life_of(&lives, "start", 2));
        if overlap == "full" {
            assert_eq!(
                new.alive,
                [old.pid],
                "with overlap the old process runs when the new one starts: {lives:#?}"
            );
            continue;
        }
        assert_never_two_at_once(&log, 2, 2);
        let failed: Vec<_> = seen.iter().filter(|p| p.answer.is_err()).collect();
        assert!(failed.is_empty(), "{failed:?}");
        let (gone, accepting) = (
            life_of(&lives, "exit", 1).ns,
            life_of(&lives, "accepting", 2).ns,
        );
        let in_gap: Vec<&Probe> = seen
            .iter()
            .filter(|p| (gone..accepting).contains(&p.connected_ns))
            .collect();
        eprintln!(
            "{} probes; {} connected in the {:.1} ms gap between the old exit and the new accept",
            seen.len(),
            in_gap.len(),
            (accepting - gone) as f64 / 1e6
        );
        assert!(
            !in_gap.is_empty(),
            "no client connected in the gap: {seen:#?}\n{lives:#?}"
        );
        for p in in_gap {
            assert_eq!(
                p.answer.as_ref().unwrap(),
                &(2, new.pid),
                "queued in the gap, answered by the new process"
            );
        }
    }
}

/// A new version that exits at once, or is never ready, fails the upgrade
/// (exit 1, with the reason); the previous release comes back as a new
/// generation on the same sockets, and under load no request fails.
#[test]
fn a_failed_start_brings_the_previous_release_back_under_load() {
    let cases = [
        ("FAKE_EXIT_AT_START = \"3\"", "exited before it was ready"),
        ("FAKE_NEVER_READY = \"1\"", "not ready within 1s"),
    ];
    for (bad, reason) in cases {
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("life.log");
        let top = "overlap = \"none\"";
        let baton = Baton::with_config(&config(top, &log, ""), &[]);
        baton.wait_active(1);
        let addr = baton.addr("http");
        let load = Load::start(
            addr,
            &[Mode::NewConnection, Mode::KeepAlive],
            2,
            Duration::from_secs(120),
        );
        let next = config(top, &log, bad)
            .replace("FAKE_VERSION = \"good\"", "FAKE_VERSION = \"bad\"")
            .replace("ready_timeout = \"3s\"", "ready_timeout = \"1s\"");
        baton.reconfigure(&next);
        let out = baton.upgrade_expect(&[], 1);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(reason), "{text}");
        assert!(
            text.contains("previous release serves again as generation 3"),
            "{text}"
        );
        baton.wait_active(3);
        let r = get(addr, "/").unwrap();
        assert_eq!(
            version_of(&r.body),
            "good",
            "the previous release: {}",
            r.body
        );
        assert_eq!(who(&r.body).0, 3);
        let s = baton.status();
        assert_eq!(s["active"], 3, "{s}");
        assert_eq!(baton.generation(2)["state"], "failed");
        assert_eq!(baton.generation(3)["dir"], baton.generation(1)["dir"]);
        load.wait_requests(20);
        let report = load.finish();
        assert_eq!(report.connect_errors(), 0, "{reason}: {:?}", report.errors);
        report.assert_no_failures();
        assert_never_two_at_once(&log, 2, 3);
    }
}

/// A canary and a bake need two generations at once: refused (exit 1)
/// with nothing started; a configuration asking for both a bake and no
/// overlap does not start (exit 2, one line naming the key).
#[test]
fn a_canary_or_a_bake_without_overlap_is_refused() {
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("life.log");
    let baton = Baton::with_config(&config("overlap = \"none\"", &log, ""), &[]);
    baton.wait_active(1);
    for args in [&["--canary", "10"][..], &["--bake", "1m"]] {
        let out = baton.upgrade_expect(args, 1);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("overlap"), "{args:?}: {err}");
    }
    let s = baton.status();
    assert!(s["upgrading"].is_null(), "{s}");
    assert_eq!(s["generations"].as_array().unwrap().len(), 1, "{s}");
    // Positive control: a plain upgrade goes ahead.
    baton.upgrade_expect(&[], 0);

    let mut bad = Baton::with_config(&config("overlap = \"none\"\nbake = \"1m\"", &log, ""), &[]);
    assert_eq!(bad.wait_exit(WAIT), 2, "{}", bad.logs());
    let err = bad.stderr.text();
    assert!(
        err.lines()
            .any(|l| l.contains("bake") && l.contains("overlap")),
        "{err}"
    );
    assert!(
        !err.contains("generation started"),
        "nothing started: {err}"
    );
}

/// `baton rollback` without overlap restarts the previous release the
/// same way: the current generation drains and exits first.
#[test]
fn a_rollback_without_overlap_drains_first_then_starts_the_previous_release() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("life.log");
    for v in ["v1", "v2"] {
        write_script(
            &dir.path().join("releases").join(v).join("bin/server"),
            &format!("exec {} \"$@\"", bin("test-socketfd").display()),
        );
    }
    std::os::unix::fs::symlink("releases/v1", dir.path().join("current")).unwrap();
    let config = format!(
        r#"command = ["./bin/server"]
cwd = "current"
overlap = "none"
ready_timeout = "3s"
drain_timeout = "5s"

[env]
FAKE_LIFE_LOG = "{}"

[[listen]]
name = "http"
address = "127.0.0.1:0"
"#,
        log.display()
    );
    std::fs::write(dir.path().join("baton.toml"), config).unwrap();
    let baton = Baton::spawn(dir, &["--config", "baton.toml"]);
    baton.wait_active(1);
    let addr = baton.addr("http");
    let tmp = baton.path("current.tmp");
    std::os::unix::fs::symlink("releases/v2", &tmp).unwrap();
    std::fs::rename(&tmp, baton.path("current")).unwrap();
    baton.upgrade_expect(&[], 0);
    assert!(baton.generation(2)["dir"]
        .as_str()
        .unwrap()
        .ends_with("releases/v2"));
    let out = baton.cli(&["rollback"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(who(&get(addr, "/").unwrap().body).0, 3);
    let g3 = baton.generation(3);
    assert!(g3["dir"].as_str().unwrap().ends_with("releases/v1"), "{g3}");
    assert_never_two_at_once(&log, 2, 3);
}
