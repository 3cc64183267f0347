//! An upgrade's candidate starts at a lower CPU priority and, before it
//! takes any traffic, every thread of every process of its group (of each
//! worker's group, with `--workers N`) gets baton's own back: read from
//! /proc for the real processes while the upgrade is held open before
//! READY=1, and after it. The fake app starts extra threads, processes in
//! its group (`FAKE_WORKERS`, with threads of their own) and, right before
//! READY=1, more threads racing the restore.

use std::process::Stdio;

use baton_e2e::*;

/// The scheduling policy and nice value of one thread, from
/// /proc/PID/task/TID/stat (fields 41 and 19).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sched {
    policy: u32,
    nice: i32,
}

const SCHED_OTHER: u32 = 0;
const SCHED_BATCH: u32 = 3;
const SCHED_IDLE: u32 = 5;

fn thread_sched(pid: i32, tid: &str) -> Option<Sched> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    // After ')': field 3 (state) is index 0, so field n is index n - 3.
    Some(Sched {
        nice: f.get(19 - 3)?.parse().ok()?,
        policy: f.get(41 - 3)?.parse().ok()?,
    })
}

/// Every thread of process `pid`.
fn threads(pid: i32) -> Vec<Sched> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| thread_sched(pid, e.ok()?.file_name().to_str()?))
        .collect()
}

/// Every thread of every process in group `pgid`, per process.
fn group_threads(pgid: i32) -> Vec<(i32, Vec<Sched>)> {
    let mut pids = group_members(pgid);
    pids.sort_unstable();
    pids.into_iter().map(|p| (p, threads(p))).collect()
}

/// The processes of generation `gen`'s workers (baton's `--workers`), by
/// index, once each runs.
fn worker_pids(baton: &Baton, gen: u64, workers: usize) -> Vec<i32> {
    let mut pids = Vec::new();
    baton.wait_until(&format!("the {workers} workers of {gen}"), WAIT, || {
        let g = baton.generation(gen);
        pids = g["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|w| w["pid"].as_i64())
            .map(|p| p as i32)
            .collect();
        pids.len() == workers
    });
    pids
}

/// Every thread of every process in each worker's group, by worker.
type Groups = Vec<Vec<(i32, Vec<Sched>)>>;

fn groups_threads(pids: &[i32]) -> Groups {
    pids.iter().map(|&p| group_threads(p)).collect()
}

/// baton's own main thread: what the apps get back.
fn own(baton: &Baton) -> Sched {
    let pid = baton.pid() as i32;
    thread_sched(pid, &pid.to_string()).unwrap()
}

/// Extra threads (3 per process), 2 workers, and 4 threads started right
/// before READY=1.
const KNOBS: &str = "FAKE_THREADS = \"3\"\nFAKE_WORKERS = \"2\"\nFAKE_LATE_THREADS = \"4\"";
/// Threads each process of the group has at least: its main thread and
/// FAKE_THREADS (the main process also the late ones once ready).
const THREADS: usize = 4;
const PROCESSES: usize = 3;

/// What [`held_upgrade`] saw, each group by worker.
struct Seen {
    baton: Baton,
    workers: usize,
    /// The first generation's groups, once it served.
    first: Groups,
    /// The candidate's groups while held before READY=1.
    held: Groups,
    /// The candidate's `status` (its `priority`, its workers') while held.
    held_status: serde_json::Value,
    /// `baton status` (the text) while held.
    held_text: String,
    /// The candidate's workers, by index.
    candidate: Vec<i32>,
    /// The candidate's groups once the upgrade succeeded.
    active: Groups,
    active_status: serde_json::Value,
    own: Sched,
}

/// Starts baton (with `top` lines in its configuration, e.g.
/// `candidate_priority = "batch"`, `workers = 3`; `workers` says how many
/// that is), started by `launcher` if not empty, upgrades to a candidate
/// held before READY=1, and reads the threads of both generations' groups.
fn held_upgrade(top: &str, workers: usize, flags: &[&str], launcher: &[String]) -> Seen {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("baton.toml"), fake_config(top, KNOBS)).unwrap();
    let mut args = vec!["--config", "baton.toml"];
    args.extend_from_slice(flags);
    let baton = if launcher.is_empty() {
        Baton::spawn(dir, &args)
    } else {
        Baton::spawn_under(dir, launcher, &args, &[])
    };
    baton.wait_active(1);
    let first_pids = worker_pids(&baton, 1, workers);
    baton.wait_until("the first generation's groups", WAIT, || {
        first_pids
            .iter()
            .all(|&p| group_members(p).len() == PROCESSES)
    });
    let first = groups_threads(&first_pids);
    let gate = baton.path("gate");
    let held = gated_fake_config("v2", &gate)
        .replace("drain_timeout", &format!("{top}\ndrain_timeout"))
        .replace("[env]", &format!("[env]\n{KNOBS}"));
    baton.reconfigure(&held);
    let mut upgrade = std::process::Command::new(bin("baton"));
    upgrade
        .arg("--control")
        .arg(&baton.control)
        .arg("upgrade")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let cmd = format!("{upgrade:?}");
    let upgrade = upgrade.spawn().unwrap();
    // Printed by each of baton's workers once the processes in its group
    // are up and its threads started.
    baton.stderr.wait_for(&["fake: waiting for"], workers, WAIT);
    let candidate = worker_pids(&baton, 2, workers);
    let held = groups_threads(&candidate);
    let held_status = baton.generation(2);
    let held_text = String::from_utf8_lossy(&baton.cli(&["status"]).stdout).into_owned();
    std::fs::write(&gate, "").unwrap();
    let out = finish(cmd, upgrade);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe_output(&out),
        baton.logs()
    );
    assert_eq!(baton.status()["active"], 2, "{}", baton.logs());
    let active = groups_threads(&candidate);
    let active_status = baton.generation(2);
    let own = own(&baton);
    Seen {
        baton,
        workers,
        first,
        held,
        held_status,
        held_text,
        candidate,
        active,
        active_status,
        own,
    }
}

/// Every thread of every process of every worker's group at `want`, with
/// each group complete.
fn assert_all(groups: &Groups, want: Sched, what: &str, logs: &str) {
    for (worker, group) in groups.iter().enumerate() {
        assert_eq!(
            group.len(),
            PROCESSES,
            "{what}, worker {worker}: expected its process and 2 in its group, got \
             {group:?}\n{logs}"
        );
        for (pid, threads) in group {
            assert!(
                threads.len() >= THREADS,
                "{what}, worker {worker}: process {pid} has {} threads, expected at least \
                 {THREADS}\n{logs}",
                threads.len()
            );
            assert!(
                threads.iter().all(|t| *t == want),
                "{what}, worker {worker}: expected every thread of process {pid} at {want:?}, \
                 got {threads:?}\n{logs}"
            );
        }
    }
}

/// The restore of every worker was done, and said so, before any traffic
/// moved to the candidate (the plan's `traffic` event) and before it
/// became active.
fn assert_restored_before_traffic(s: &Seen) {
    let lines = s.baton.stderr.all();
    let at = |needles: &[&str]| {
        lines
            .iter()
            .position(|l| needles.iter().all(|n| l.contains(n)))
            .unwrap_or_else(|| panic!("no line with {needles:?}\n{}", s.baton.logs()))
    };
    let restored = (0..s.workers)
        .map(|w| {
            at(&[
                "CPU priority restored",
                "generation=2 ",
                &format!("worker={w} "),
            ])
        })
        .max()
        .unwrap();
    let active = at(&["generation active", "generation=2 "]);
    assert!(
        restored < active,
        "the candidate was active before its priority was restored\n{}",
        s.baton.logs()
    );
    // The plan moving to it (steered), if logged, comes after too.
    if let Some(traffic) = lines
        .iter()
        .position(|l| l.contains("traffic") && l.contains("active=2"))
    {
        assert!(restored < traffic, "{}", s.baton.logs());
    }
}

fn check(s: &Seen, lowered: Sched, name: &str) {
    let logs = s.baton.logs();
    assert_eq!(s.own.policy, SCHED_OTHER, "{logs}");
    // Positive control: the first generation, which nothing else ran
    // beside, started at baton's own priority, and nothing lowered
    // shows in `status` once the upgrade is over.
    assert_all(&s.first, s.own, "first generation", &logs);
    assert_all(&s.held, lowered, "candidate before READY=1", &logs);
    assert_eq!(s.held_status["priority"], name, "{}", s.held_status);
    assert_all(&s.active, s.own, "candidate once active", &logs);
    for group in &s.active {
        let main = &group[0].1;
        assert!(
            main.len() >= THREADS + 4,
            "the late threads are missing: {main:?}"
        );
    }
    // Each worker shows its own lowered priority while held, none after.
    let held_workers = s.held_status["workers"].as_array().unwrap();
    assert_eq!(held_workers.len(), s.workers, "{}", s.held_status);
    for w in held_workers {
        assert_eq!(w["priority"], name, "{}", s.held_status);
    }
    // The text: on the generation's line, and on each worker's where
    // there are several.
    let shown = s.held_text.matches(&format!("[cpu: {name}]")).count();
    let lines = if s.workers > 1 { 1 + s.workers } else { 1 };
    assert_eq!(shown, lines, "{}", s.held_text);
    assert!(
        s.active_status.get("priority").is_none(),
        "{}",
        s.active_status
    );
    for w in s.active_status["workers"].as_array().unwrap() {
        assert!(w.get("priority").is_none(), "{}", s.active_status);
    }
    assert_restored_before_traffic(s);
}

/// `batch` needs no privilege to undo, so this runs as any user, steered
/// and with shared sockets.
#[test]
fn a_batch_candidate_is_restored_in_every_thread_and_process_before_traffic() {
    for traffic in ["steered", "shared"] {
        let s = held_upgrade(
            "candidate_priority = \"batch\"",
            1,
            &["--traffic", traffic],
            &[],
        );
        let batch = Sched {
            policy: SCHED_BATCH,
            nice: s.own.nice,
        };
        check(&s, batch, "batch");
    }
}

/// With `--workers 3`, every thread of every process in each of the
/// candidate's 3 worker groups is lowered while the candidate is dark, and
/// every one of them is restored before the traffic moves (steered: the
/// plan; shared: the old generation's drain). A worker of the new
/// generation that then crashes is restarted alone at baton's own priority
/// (while it serves, nothing is lowered).
#[test]
fn with_workers_every_thread_of_every_worker_is_lowered_while_dark_and_restored_before_traffic() {
    for traffic in ["steered", "shared"] {
        let s = held_upgrade(
            "candidate_priority = \"batch\"",
            3,
            &["--workers", "3", "--traffic", traffic],
            &[],
        );
        let batch = Sched {
            policy: SCHED_BATCH,
            nice: s.own.nice,
        };
        check(&s, batch, "batch");
        assert_eq!(s.held_status["priority"], "batch", "{}", s.held_status);

        let crashed = s.candidate[1];
        kill(crashed);
        let mut again = Vec::new();
        s.baton
            .wait_until("worker 1 restarted and ready", WAIT, || {
                let g = s.baton.generation(2);
                let w = &g["workers"][1];
                let pid = w["pid"].as_i64().map(|p| p as i32);
                match pid {
                    Some(p) if p != crashed && w["state"] == "ready" => {
                        again = vec![p];
                        group_members(p).len() == PROCESSES
                    }
                    _ => false,
                }
            });
        let restarted = groups_threads(&again);
        assert_all(
            &restarted,
            s.own,
            "worker 1 restarted alone",
            &s.baton.logs(),
        );
        let g = s.baton.generation(2);
        assert!(g.get("priority").is_none(), "{g}");
    }
}

/// SIGKILLs process `pid`.
fn kill(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// `idle`, where baton may undo it (root has CAP_SYS_NICE).
#[test]
#[cfg_attr(
    not(baton_root),
    ignore = "needs root (leaving SCHED_IDLE needs CAP_SYS_NICE)"
)]
fn an_idle_candidate_runs_idle_until_ready_then_normal_everywhere() {
    assert_root();
    let s = held_upgrade("candidate_priority = \"idle\"", 1, &[], &[]);
    let idle = Sched {
        policy: SCHED_IDLE,
        nice: s.own.nice,
    };
    check(&s, idle, "idle");
}

/// By default (the measured choice: docs/benchmarks.md) the candidate
/// runs at baton's own priority from its start, and nothing lowered
/// shows in `status`. The tests above are the positive controls: the
/// same threads, lowered when a setting asks for it.
#[test]
fn by_default_the_candidate_runs_at_batons_own_priority() {
    let s = held_upgrade("", 1, &[], &[]);
    let logs = s.baton.logs();
    assert_all(&s.held, s.own, "candidate before READY=1", &logs);
    assert!(s.held_status.get("priority").is_none(), "{}", s.held_status);
    assert!(!s.held_text.contains("[cpu:"), "{}", s.held_text);
}

#[test]
#[cfg_attr(
    not(baton_root),
    ignore = "needs root (lowering nice again needs CAP_SYS_NICE)"
)]
fn a_niced_candidate_is_restored_at_activation() {
    assert_root();
    let s = held_upgrade("candidate_priority = \"nice:7\"", 1, &[], &[]);
    let niced = Sched {
        policy: SCHED_OTHER,
        nice: (s.own.nice + 7).min(19),
    };
    check(&s, niced, "nice:7");
}

/// baton without CAP_SYS_NICE and with RLIMIT_NICE 0 (root loses the
/// capability from its bounding set) could not undo `idle`: an explicit
/// `idle` is refused at start (exit 2), while `batch`, which anyone may
/// undo for their own threads, is lowered and restored.
#[test]
fn without_the_right_to_raise_priorities_idle_is_refused_and_batch_works() {
    let mut launcher: Vec<String> = Vec::new();
    if nix::unistd::geteuid().is_root() {
        launcher.extend(["setpriv", "--bounding-set", "-sys_nice", "--"].map(String::from));
    }
    launcher.extend(["prlimit", "--nice=0:0", "--"].map(String::from));
    let s = held_upgrade("candidate_priority = \"batch\"", 1, &[], &launcher);
    let batch = Sched {
        policy: SCHED_BATCH,
        nice: s.own.nice,
    };
    check(&s, batch, "batch");

    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(&launcher[0]);
    cmd.args(&launcher[1..])
        .arg(bin("baton"))
        .current_dir(dir.path())
        .args(["run", "--candidate-priority", "idle", "--listen"])
        .arg("http=127.0.0.1:0")
        .arg("--")
        .arg(bin("test-socketfd"));
    let out = run(&mut cmd);
    assert_eq!(out.status.code(), Some(2), "{}", describe_output(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be undone"),
        "{}",
        describe_output(&out)
    );
}

/// A priority that is no word baton knows is a usage error (exit 2),
/// and nothing starts.
#[test]
fn a_bad_priority_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(std::process::Command::new(bin("baton"))
        .current_dir(dir.path())
        .args(["run", "--candidate-priority", "nice:25", "--listen"])
        .arg("http=127.0.0.1:0")
        .arg("--")
        .arg(bin("test-socketfd")));
    assert_eq!(out.status.code(), Some(2), "{}", describe_output(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad candidate priority"),
        "{}",
        describe_output(&out)
    );
}
