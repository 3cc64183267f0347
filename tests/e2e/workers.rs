//! Several workers per generation (`workers = N`), end to end: each its
//! own process (and process group) on the generation's sockets, all of
//! them serving; upgrades under load; a crashed worker restarted alone
//! while the others serve; stop ending them all.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use baton_e2e::*;
use serde_json::Value;

/// `(generation, pid, worker)` of a fake app's `GET /` answer.
fn who(body: &str) -> (u64, i32, u32) {
    let field = |name: &str| -> i64 {
        body.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {body:?}"))
    };
    (
        field("generation=") as u64,
        field("pid=") as i32,
        field("worker=") as u32,
    )
}

/// The fake app with `workers` workers and room to start under load.
fn config(workers: u32, version: &str, env: &str) -> String {
    fake_config(&format!("workers = {workers}"), env)
        .replace("ready_timeout = \"3s\"", "ready_timeout = \"30s\"")
        .replace(
            "FAKE_VERSION = \"good\"",
            &format!("FAKE_VERSION = \"{version}\""),
        )
}

/// `baton status --json`'s workers of generation `n`.
fn workers(baton: &Baton, n: u64) -> Vec<Value> {
    baton.generation(n)["workers"].as_array().unwrap().clone()
}

/// The pids of generation `n`'s workers, by index, after checking that
/// all `count` are ready, each in a process group of its own.
fn ready_workers(baton: &Baton, n: u64, count: usize) -> Vec<i32> {
    let ws = workers(baton, n);
    assert_eq!(ws.len(), count, "{ws:?}\n{}", baton.logs());
    let pids: Vec<i32> = ws
        .iter()
        .enumerate()
        .map(|(i, w)| {
            assert_eq!(w["index"], i as u64, "{w}");
            assert_eq!(w["state"], "ready", "{ws:?}");
            w["pid"].as_i64().unwrap() as i32
        })
        .collect();
    let distinct: BTreeSet<i32> = pids.iter().copied().collect();
    assert_eq!(distinct.len(), count, "one process each: {pids:?}");
    for &pid in &pids {
        let pgrp = procs().into_iter().find(|p| p.pid == pid).map(|p| p.pgrp);
        assert_eq!(pgrp, Some(pid), "worker {pid} leads its own process group");
    }
    pids
}

/// GETs on new connections until every worker in `pids` (index: pid) has
/// answered for generation `gen`, each with its own index; bounded in
/// count and time. Returns how many each answered.
fn all_answer(addr: SocketAddr, gen: u64, pids: &[i32]) -> BTreeMap<i32, usize> {
    let mut seen: BTreeMap<i32, usize> = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    for _ in 0..20_000 {
        if seen.len() == pids.len() || Instant::now() > deadline {
            break;
        }
        let r = get(addr, "/").unwrap_or_else(|e| panic!("GET /: {e:?}"));
        let (g, pid, worker) = who(&r.body);
        assert_eq!(g, gen, "{}", r.body);
        assert_eq!(
            pids.get(worker as usize),
            Some(&pid),
            "worker {worker} answered as pid {pid}; workers {pids:?}"
        );
        *seen.entry(pid).or_default() += 1;
    }
    assert_eq!(
        seen.keys().copied().collect::<BTreeSet<_>>(),
        pids.iter().copied().collect(),
        "not every worker answered: {seen:?}"
    );
    seen
}

fn kill(pid: i32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).unwrap();
}

/// The promise of `--workers 3`: every worker of a generation serves; an
/// upgrade under load fails no request and replaces all three; killing
/// one worker restarts it alone (the others keep their processes, the
/// generation stays active, no connection is refused); status lists each
/// worker; stop drains all of them.
#[test]
fn three_workers_upgrade_under_load_and_a_crashed_worker_restarts_alone() {
    let mut baton = Baton::with_config(&config(3, "v1", ""), &[]);
    baton.wait_active(1);
    let addr = baton.addr("http");
    let old = ready_workers(&baton, 1, 3);
    all_answer(addr, 1, &old);

    // An upgrade under load: no failed request, and all three new workers
    // serve; every old one was drained and is gone.
    let load = Load::start(
        addr,
        &[Mode::NewConnection, Mode::KeepAlive],
        2,
        Duration::from_secs(240),
    );
    baton.reconfigure(&config(3, "v2", ""));
    let out = baton.upgrade_expect(&[], 0);
    let text = String::from_utf8_lossy(&out.stdout);
    for pid in &old {
        assert!(
            text.contains(&format!("draining (SIGTERM to pid {pid})")),
            "worker {pid} drained: {text}"
        );
        assert!(group_members(*pid).is_empty(), "old worker {pid} is gone");
    }
    assert_eq!(baton.generation(1)["state"], "exited");
    let new = ready_workers(&baton, 2, 3);
    let census = all_answer(addr, 2, &new);
    eprintln!("generation 2 answers by pid: {census:?}");
    let r = get(addr, "/").unwrap();
    assert_eq!(version_of(&r.body), "v2");
    load.wait_requests(50);
    let report = load.finish();
    eprintln!(
        "upgrade: {} ok, {} failed, {} keep-alive retries",
        report.ok, report.failed, report.retried
    );
    report.assert_no_failures();

    // One worker dies: it alone is restarted; requests keep succeeding.
    let load = Load::start(
        addr,
        &[Mode::NewConnection, Mode::KeepAlive],
        2,
        Duration::from_secs(240),
    );
    kill(new[1], nix::sys::signal::Signal::SIGKILL);
    baton.stderr.wait_for(
        &["restarting generation", "generation=2 ", "worker=1"],
        1,
        WAIT,
    );
    baton.stderr.wait_for(
        &["worker ready again", "generation=2 ", "worker=1"],
        1,
        WAIT,
    );
    let g2 = baton.generation(2);
    assert_eq!(g2["state"], "active", "{g2}");
    assert_eq!(g2["restarts"], 1, "{g2}");
    let ws = workers(&baton, 2);
    let restarted = ws[1]["pid"].as_i64().unwrap() as i32;
    assert_ne!(restarted, new[1], "{ws:?}");
    assert_eq!(ws[1]["restarts"], 1, "{ws:?}");
    assert_eq!(ws[1]["last_exit"], "killed by SIGKILL", "{ws:?}");
    for i in [0, 2] {
        assert_eq!(ws[i]["pid"], new[i], "worker {i} kept its process: {ws:?}");
        assert_eq!(ws[i]["restarts"], 0, "{ws:?}");
    }
    assert_eq!(
        baton.stderr.count(&["generation started", "generation=2 "]),
        4,
        "three starts and one restart, nothing else"
    );
    let now = ready_workers(&baton, 2, 3);
    all_answer(addr, 2, &now);
    load.wait_requests(50);
    let report = load.finish();
    eprintln!(
        "worker killed: {} ok, {} failed, {} keep-alive retries; {:?}",
        report.ok, report.failed, report.retried, report.errors
    );
    // Only what the killed worker had accepted dies with it (at most one
    // request per client); nothing is refused.
    assert_eq!(report.connect_errors(), 0, "{:?}", report.errors);
    assert!(report.failed <= 4, "{:?}", report.errors);

    // The text status lists every worker.
    let out = baton.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for (i, pid) in now.iter().enumerate() {
        assert!(
            text.lines().any(|l| l.contains(&format!("worker {i} "))
                && l.contains("ready")
                && l.contains(&pid.to_string())),
            "worker {i} not listed:\n{text}"
        );
    }

    // Stop drains every worker, and each exits by itself.
    let out = baton.cli(&["stop"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(baton.wait_exit(WAIT), 0, "{}", baton.logs());
    let log = baton.stderr.all();
    for pid in &now {
        assert!(group_members(*pid).is_empty(), "worker {pid} still alive");
        let tag = format!("pid={pid} ");
        assert!(
            log.iter()
                .any(|l| l.contains("generation draining") && l.contains(&tag)),
            "worker {pid} not drained\n{}",
            baton.logs()
        );
        assert!(
            log.iter().any(|l| l.contains("generation exited")
                && l.contains(&tag)
                && l.contains("exit status 0")),
            "worker {pid} did not exit by itself\n{}",
            baton.logs()
        );
    }
}

/// A generation is ready only when every worker is: a candidate whose
/// third worker never sends READY=1 fails the upgrade at the ready
/// timeout (its two ready workers are drained), and the old generation
/// serves on without a failed request. Positive control: the same upgrade
/// with all three ready succeeds. (The worker count may change between
/// generations: 2, then 3.)
#[test]
fn a_generation_is_ready_only_when_every_worker_is() {
    let baton = Baton::with_config(&config(2, "v1", ""), &[]);
    baton.wait_active(1);
    let addr = baton.addr("http");
    let old = ready_workers(&baton, 1, 2);
    let load = Load::start(addr, &[Mode::NewConnection], 2, Duration::from_secs(120));

    let lagging = "FAKE_NEVER_READY = \"1\"\nFAKE_MISBEHAVE_WORKER = \"2\"";
    baton.reconfigure(
        &config(3, "v2", lagging).replace("ready_timeout = \"30s\"", "ready_timeout = \"3s\""),
    );
    let out = baton.upgrade_expect(&[], 1);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("not ready within 3s"), "{text}");
    assert_eq!(
        baton.stderr.count(&["fake: ready"]),
        2 + 2,
        "two old and two new workers said READY=1\n{}",
        baton.logs()
    );
    assert_eq!(
        text.matches("generation 2 draining").count(),
        3,
        "all three drained: {text}"
    );
    assert_eq!(baton.status()["active"], 1);
    assert_eq!(ready_workers(&baton, 1, 2), old, "the same processes");

    baton.reconfigure(&config(3, "v3", ""));
    baton.upgrade_expect(&[], 0);
    let new = ready_workers(&baton, 3, 3);
    all_answer(addr, 3, &new);
    load.wait_requests(20);
    load.finish().assert_no_failures();
}

/// Every worker receives the generation's sockets: the same open sockets
/// (a UDP one among them) at the same fds in the same order, each with
/// its own `LISTEN_PID` and `BATON_WORKER`; with shared sockets and an
/// HTTP check, one private probe listener for the generation, passed last
/// to all of them. Datagrams are answered by the generation's workers. A
/// worker restarted alone gets the same sockets again.
#[test]
fn every_worker_receives_the_same_sockets_with_its_own_listen_pid() {
    for traffic in ["steered", "shared"] {
        let out = tempfile::tempdir().unwrap();
        let report = out.path().join("report-{worker}.json");
        let top = format!("workers = 2\ntraffic = \"{traffic}\"\nready = \"http:/healthz\"");
        let env = format!(
            "TEST_SOCKETFD_REPORT = \"{}\"\nFAKE_UDP_ECHO = \"1\"",
            report.display()
        );
        let config = fake_config(&top, &env)
            + "\n[[listen]]\nname = \"dns\"\naddress = \"udp:127.0.0.1:0\"\n";
        let baton = Baton::with_config(&config, &[]);
        baton.wait_active(1);
        let pids = ready_workers(&baton, 1, 2);
        // The probe checks the generation (whichever worker answers), so
        // a worker may still be writing its report when it is ready.
        let read = |i: usize| -> Value {
            let path = out.path().join(format!("report-{i}.json"));
            baton.wait_until(&format!("{}", path.display()), WAIT, || path.exists());
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
        };
        // The target of each fd from 3 on: "socket:[inode]", the same
        // inode being the same open socket.
        let sockets = |r: &Value| -> Vec<String> {
            r["fds"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|f| f["fd"].as_i64().unwrap() >= 3)
                .map(|f| f["target"].as_str().unwrap().to_owned())
                .collect()
        };
        let reports: Vec<Value> = (0..2).map(read).collect();
        let (names, count) = match traffic {
            "shared" => ("http:dns:baton-probe", 3),
            _ => ("http:dns", 2),
        };
        for (i, r) in reports.iter().enumerate() {
            assert_eq!(r["pid"], pids[i], "{traffic}: {r}");
            assert_eq!(r["listen_pid"], pids[i].to_string(), "{traffic}: {r}");
            assert_eq!(r["pgid"], pids[i], "{traffic}: {r}");
            assert_eq!(r["env"]["BATON_WORKER"], i.to_string(), "{traffic}");
            assert_eq!(r["env"]["BATON_GENERATION"], "1", "{traffic}");
            assert_eq!(r["listen_fdnames"], names, "{traffic}: {r}");
            assert_eq!(sockets(r).len(), count, "{traffic}: {r}");
            assert!(sockets(r).iter().all(|t| t.starts_with("socket:")));
        }
        assert_eq!(
            sockets(&reports[0]),
            sockets(&reports[1]),
            "{traffic}: the same sockets"
        );
        // The datagram socket is the generation's, and its workers answer.
        let dns = baton.udp_addr("dns");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        for i in 0..10 {
            let payload = format!("ping-{i}");
            client.send_to(payload.as_bytes(), dns).unwrap();
            let mut buf = [0u8; 512];
            let n = client.recv(&mut buf).unwrap();
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let rest = text
                .strip_prefix(&payload)
                .unwrap_or_else(|| panic!("{text}"));
            let (gen, pid) = baton_e2e::who(rest);
            assert_eq!(gen, 1, "{traffic}: {text}");
            assert!(
                pids.contains(&(pid as i32)),
                "{traffic}: {text} from {pids:?}"
            );
        }

        // Worker 1 restarted alone: the same sockets again.
        kill(pids[1], nix::sys::signal::Signal::SIGKILL);
        baton.wait_until("worker 1's restart", WAIT, || {
            std::fs::read(out.path().join("report-1.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|r| r["pid"] != pids[1])
        });
        let again = read(1);
        assert_eq!(sockets(&again), sockets(&reports[0]), "{traffic}: {again}");
        assert_eq!(again["listen_pid"], again["pid"].to_string());
        baton.stderr.wait_for(
            &["worker ready again", "generation=1 ", "worker=1"],
            1,
            WAIT,
        );
    }
}

/// Without overlap (`overlap = "none"`) and three workers, under
/// continuous load with steered and with shared sockets: each upgrade
/// drains every old worker, and only once all three have exited (as they
/// log it) do the three new ones start (none of them sees an old process
/// alive); no request fails, and every new worker serves.
#[test]
fn without_overlap_every_old_worker_exits_before_the_new_workers_start_under_load() {
    for traffic in ["steered", "shared"] {
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("life.log");
        let env = format!(
            "FAKE_LIFE_LOG = \"{}\"\nFAKE_START_DELAY_MS = \"200\"",
            log.display()
        );
        let top = format!("workers = 3\ntraffic = \"{traffic}\"\noverlap = \"none\"");
        let config =
            fake_config(&top, &env).replace("ready_timeout = \"3s\"", "ready_timeout = \"30s\"");
        let baton = Baton::with_config(&config, &[]);
        baton.wait_active(1);
        ready_workers(&baton, 1, 3);
        let addr = baton.addr("http");
        let load = Load::start(
            addr,
            &[Mode::NewConnection, Mode::KeepAlive],
            2,
            Duration::from_secs(120),
        );
        for gen in 2..=4u64 {
            baton.upgrade_expect(&[], 0);
            let pids = ready_workers(&baton, gen, 3);
            all_answer(addr, gen, &pids);
            load.wait_requests(20);
        }
        load.finish().assert_served_all(traffic);
        let lives = life_log(&log);
        let of = |event: &str, gen: u64| -> Vec<&Life> {
            lives
                .iter()
                .filter(|l| l.event == event && l.gen == gen)
                .collect()
        };
        for gen in 2..=4u64 {
            let (starts, exits) = (of("start", gen), of("exit", gen - 1));
            let workers = |ls: &[&Life]| ls.iter().map(|l| l.worker).collect::<BTreeSet<_>>();
            assert_eq!(workers(&starts), BTreeSet::from([0, 1, 2]), "{lives:#?}");
            assert_eq!(workers(&exits), BTreeSet::from([0, 1, 2]), "{lives:#?}");
            for s in &starts {
                assert!(
                    s.alive.is_empty(),
                    "{traffic}: {s:?} started while {:?} ran",
                    s.alive
                );
                for e in &exits {
                    assert!(e.ns < s.ns, "{traffic}: {e:?} exited after {s:?} started");
                }
            }
        }
    }
}

/// Every `(generation, pid)` answering `GET /` on new connections, until
/// `want` distinct ones have answered (bounded in count and time).
fn answering(addr: SocketAddr, want: usize) -> BTreeMap<(u64, i32), usize> {
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + WAIT;
    for _ in 0..20_000 {
        if seen.len() >= want || Instant::now() > deadline {
            break;
        }
        let r = get(addr, "/").unwrap_or_else(|e| panic!("GET /: {e:?}"));
        let (g, pid, _) = who(&r.body);
        *seen.entry((g, pid)).or_default() += 1;
    }
    seen
}

/// Steered traffic moves whole generations of three workers: a canary's
/// share is served by every worker of both generations; `promote` parks
/// the old generation with its three processes; `rollback` during the
/// bake gives the traffic back to those same three processes; no request
/// fails throughout.
#[test]
fn canary_promote_and_rollback_move_whole_generations_of_workers() {
    let baton = Baton::with_config(&config(3, "v1", ""), &["--bake", "60s"]);
    baton.wait_active(1);
    let addr = baton.addr("http");
    let old = ready_workers(&baton, 1, 3);
    let load = Load::start(
        addr,
        &[Mode::NewConnection, Mode::KeepAlive],
        2,
        Duration::from_secs(240),
    );
    baton.reconfigure(&config(3, "v2", ""));
    let out = baton.upgrade_expect(&["--canary", "50"], 0);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("canary"),
        "{}",
        describe_output(&out)
    );
    let new = ready_workers(&baton, 2, 3);
    let seen = answering(addr, 6);
    let expected: BTreeSet<(u64, i32)> = old
        .iter()
        .map(|&p| (1, p))
        .chain(new.iter().map(|&p| (2, p)))
        .collect();
    assert_eq!(
        seen.keys().copied().collect::<BTreeSet<_>>(),
        expected,
        "every worker of both generations serves the canary split: {seen:?}"
    );

    let out = baton.cli(&["promote", "--no-wait"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(census(addr, 50).keys().copied().collect::<Vec<_>>(), [2]);
    let g1 = baton.generation(1);
    assert_eq!(g1["role"], "parked", "{g1}");
    assert_eq!(
        ready_workers(&baton, 1, 3),
        old,
        "parked whole, still running"
    );
    load.wait_requests(50);

    let out = baton.cli(&["rollback", "--no-wait-drain"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(baton.status()["active"], 1);
    all_answer(addr, 1, &old);
    assert_eq!(
        ready_workers(&baton, 1, 3),
        old,
        "the same processes serve again"
    );
    baton
        .stderr
        .wait_for(&["generation exited", "generation=2 "], 3, WAIT);
    load.wait_requests(50);
    load.finish().assert_no_failures();
}
