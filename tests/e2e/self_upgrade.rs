//! baton upgrading itself (`baton upgrade --self`, SIGUSR2): the binary at
//! the path baton was started from is replaced, and baton re-executes it
//! in place. The tests run baton from a copy in a temp dir, and "build" a
//! new version by appending bytes to a copy (still the same program, but a
//! different file: its size tells them apart in `status`).

use std::path::{Path, PathBuf};

use baton_e2e::*;
use serde_json::Value;

/// A copy of the baton binary at `path`, with `marker` appended (a new
/// "build"), put in place by rename as a deploy would.
fn install_baton(path: &Path, marker: &str) {
    let mut bytes = std::fs::read(bin("baton")).unwrap();
    bytes.extend_from_slice(marker.as_bytes());
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// baton run from a copy of its binary in its temp dir, with the fake app.
fn start_from_copy(flags: &[&str]) -> (Baton, PathBuf) {
    let (b, exe, _) = start_copy(flags, |_| fake_config("", ""));
    (b, exe)
}

/// [`start_from_copy`] with the fake app (`v1`) holding READY=1 until the
/// returned gate file exists (it does at first).
fn start_gated_from_copy(flags: &[&str]) -> (Baton, PathBuf, PathBuf) {
    start_copy(flags, |gate| {
        std::fs::write(gate, b"").unwrap();
        gated_fake_config("v1", gate)
    })
}

/// baton run from a copy of its binary, with the configuration `config`
/// makes given the path of a gate file in baton's temp dir: baton, its
/// binary, the gate's path.
fn start_copy(flags: &[&str], config: impl FnOnce(&Path) -> String) -> (Baton, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let exe = dir.path().join("baton");
    install_baton(&exe, "");
    std::fs::write(dir.path().join("baton.toml"), config(&gate)).unwrap();
    let mut args = vec!["--config", "baton.toml"];
    args.extend_from_slice(flags);
    let b = Baton::spawn_binary(dir, &exe, &args);
    b.wait_active(1);
    (b, exe, gate)
}

/// The active generation's main pid (none while it restarts).
fn active_pid(status: &Value) -> Option<i64> {
    let active = status["active"].as_u64()?;
    status["generations"]
        .as_array()?
        .iter()
        .find(|g| g["number"] == active)?["pid"]
        .as_i64()
}

/// Under continuous load (new connections and keep-alive): the new
/// binary takes over in the same process (same pid), the running
/// generation is untouched (same pid, still active), `status` shows the
/// new binary and one hand-over, and no request fails. The new image then
/// does everything the old one did: restarts a crashed app, upgrades the
/// app, upgrades itself again by SIGUSR2, and stops cleanly.
#[test]
fn baton_upgrades_itself_under_load_and_carries_on() {
    let (mut b, exe) = start_from_copy(&[]);
    let addr = b.addr("http");
    let before = b.status();
    assert_eq!(before["handovers"], 0);
    let app = active_pid(&before).unwrap();
    let load = Load::start(addr, &[Mode::NewConnection, Mode::KeepAlive], 2, WAIT);

    install_baton(&exe, "build-2");
    let out = b.cli(&["upgrade", "--self"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe_output(&out),
        b.logs()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("pid {} (unchanged)", b.pid())),
        "{text}"
    );
    load.wait_requests(200);
    let after = b.status();
    assert_eq!(after["pid"], before["pid"], "same process");
    assert_eq!(after["handovers"], 1);
    assert_eq!(
        after["binary"]["size"].as_u64().unwrap(),
        before["binary"]["size"].as_u64().unwrap() + "build-2".len() as u64,
        "status shows the new binary: {after}"
    );
    assert_eq!(active_pid(&after), Some(app), "the app was not touched");
    assert_eq!(after["active"], 1);
    assert_eq!(
        b.stderr.count(&["took over from the previous baton image"]),
        1
    );
    let report = load.finish();
    report.assert_no_failures();
    assert!(report.ok > 200, "traffic flowed: {}", report.ok);

    // The new image watches the old image's processes: a crash is seen
    // and the generation restarted.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(app as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    b.wait_until("the crashed app's restart", WAIT, || {
        let s = b.status();
        s["generations"][0]["restarts"] == 1 && active_pid(&s).is_some_and(|p| p != app)
    });
    assert_eq!(version_of(&get(addr, "/").unwrap().body), "good");

    // It upgrades the app, whose old generation drains and is reaped.
    b.upgrade_expect(&[], 0);
    b.wait_until("generation 1 to exit", WAIT, || {
        b.stderr.count(&["generation exited", "generation=1 "]) >= 2
    });
    wait_until("no zombie", WAIT, || zombies_of(b.pid() as i32).is_empty());

    // SIGUSR2 is the same as `baton upgrade --self`.
    install_baton(&exe, "build-3");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.pid() as i32),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    b.wait_until("the second hand-over", WAIT, || {
        b.status()["handovers"] == 2
    });
    assert_eq!(b.status()["active"], 2);
    assert_eq!(version_of(&get(addr, "/").unwrap().body), "good");

    let out = b.cli(&["stop"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(b.wait_exit(WAIT), 0, "{}", b.logs());
    assert!(!b.control.exists(), "the control socket is removed at exit");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the listener is closed once baton is gone"
    );
}

/// A new binary that is missing, not executable, or fails its check of
/// the hand-over document is refused with exit 1 and why; the old baton
/// goes on serving, unchanged. Positive control: a good binary then passes.
#[test]
fn a_bad_new_binary_is_refused_and_the_old_baton_goes_on() {
    let (b, exe) = start_from_copy(&[]);
    let addr = b.addr("http");
    let pid = b.pid();
    type Break = Box<dyn Fn(&Path)>;
    let cases: [(&str, Break); 3] = [
        (
            "not executable",
            Box::new(|p: &Path| {
                let tmp = p.with_extension("tmp");
                std::fs::write(&tmp, b"not a program").unwrap();
                std::fs::rename(&tmp, p).unwrap();
            }),
        ),
        (
            "its check failed",
            Box::new(|p: &Path| {
                let tmp = p.with_extension("tmp");
                write_script(&tmp, "echo 'cannot read this format' >&2; exit 1");
                std::fs::rename(&tmp, p).unwrap();
            }),
        ),
        (
            "not found",
            Box::new(|p: &Path| {
                std::fs::remove_file(p).unwrap();
            }),
        ),
    ];
    for (why, break_it) in &cases {
        break_it(&exe);
        let out = b.cli(&["upgrade", "--self"]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{why}: {}",
            describe_output(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{why}: {err}");
        if *why == "its check failed" {
            assert!(
                err.contains("cannot read this format"),
                "the check's words: {err}"
            );
        }
        let s = b.status();
        assert_eq!(s["pid"], pid, "{why}");
        assert_eq!(s["handovers"], 0, "{why}");
        assert_eq!(version_of(&get(addr, "/").unwrap().body), "good", "{why}");
    }
    install_baton(&exe, "good");
    let out = b.cli(&["upgrade", "--self"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(b.status()["handovers"], 1);
}

/// While an app upgrade is in progress baton does not hand over: exit 1,
/// saying so; once it is over, the self-upgrade goes through.
#[test]
fn no_self_upgrade_during_an_app_upgrade() {
    let (b, _, gate) = start_gated_from_copy(&[]);
    std::fs::remove_file(&gate).unwrap();
    let mut upgrade = std::process::Command::new(bin("baton"))
        .arg("--control")
        .arg(&b.control)
        .arg("upgrade")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    b.wait_until("the candidate to start", WAIT, || {
        b.stderr.count(&["generation started", "generation=2 "]) == 1
    });
    let out = b.cli(&["upgrade", "--self"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe_output(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("in progress") || err.contains("is starting"),
        "{err}"
    );
    std::fs::write(&gate, b"").unwrap();
    assert!(upgrade.wait().unwrap().success());
    let out = b.cli(&["upgrade", "--self"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(b.status()["handovers"], 1);
}

/// The pids of generation `n`'s workers, by index, with their states.
fn worker_states(b: &Baton, n: u64) -> Vec<(i64, String)> {
    b.generation(n)["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["pid"].as_i64().unwrap_or(0),
                w["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// With `--workers 3`: no hand-over while a worker restarted alone is not
/// ready yet (exit 1, naming it); once it is, `baton upgrade --self` under
/// continuous load fails no request, every worker keeps its process (the
/// same three pids, each still its own group and still ready), `status`
/// shows one hand-over and the restarted worker's restart count; the
/// workers' stderr (handed over as open pipes) still reaches baton's log;
/// the new image restarts a crashed worker alone and stops them all.
#[test]
fn a_self_upgrade_hands_over_every_worker_under_load() {
    let (mut b, exe, gate) = start_gated_from_copy(&["--workers", "3"]);
    let addr = b.addr("http");
    let ready = |b: &Baton| {
        let ws = worker_states(b, 1);
        ws.iter()
            .all(|(_, s)| s == "ready")
            .then(|| ws.iter().map(|(p, _)| *p).collect::<Vec<i64>>())
    };
    let first = ready(&b).unwrap();
    assert_eq!(first.len(), 3);

    // Worker 1 killed, and its restart held before READY=1: refused.
    std::fs::remove_file(&gate).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first[1] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    b.wait_until("worker 1 to start again", WAIT, || {
        let ws = worker_states(&b, 1);
        ws[1].1 == "starting" && ws[1].0 != 0 && ws[1].0 != first[1]
    });
    install_baton(&exe, "build-2");
    let out = b.upgrade_expect(&["--self"], 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("worker 1 of generation 1 is"), "{err}");
    assert_eq!(b.status()["handovers"], 0);
    std::fs::write(&gate, b"").unwrap();
    b.wait_until("worker 1 ready again", WAIT, || ready(&b).is_some());
    let pids = ready(&b).unwrap();
    assert_eq!((pids[0], pids[2]), (first[0], first[2]));

    // The hand-over, under load.
    let load = Load::start(addr, &[Mode::NewConnection, Mode::KeepAlive], 2, WAIT);
    load.wait_requests(50);
    b.upgrade_expect(&["--self"], 0);
    load.wait_requests(200);
    let s = b.status();
    assert_eq!(s["handovers"], 1, "{s}");
    assert_eq!(s["active"], 1, "{s}");
    assert_eq!(
        ready(&b),
        Some(pids.clone()),
        "every worker kept its process"
    );
    for &pid in &pids {
        let pgrp = procs()
            .into_iter()
            .find(|p| i64::from(p.pid) == pid)
            .map(|p| i64::from(p.pgrp));
        assert_eq!(pgrp, Some(pid), "worker {pid} leads its group");
    }
    let g = b.generation(1);
    let restarts: Vec<u64> = g["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["restarts"].as_u64().unwrap())
        .collect();
    assert_eq!(restarts, [0, 1, 0], "restart counts handed over: {g}");
    let report = load.finish();
    report.assert_no_failures();
    assert!(report.ok > 200, "traffic flowed: {}", report.ok);

    // Every worker's process predates the hand-over: what one writes to
    // its stderr now still reaches baton's log, through its handed-over
    // pipe.
    let mut held = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(
        &mut held,
        b"GET /after-drain HTTP/1.1\r\nHost: test\r\n\r\n",
    )
    .unwrap();
    b.stderr
        .wait_for(&["fake: /after-drain waiting for the drain"], 1, WAIT);
    drop(held);

    // The new image restarts worker 2 alone.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[2] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    b.wait_until("worker 2's restart", WAIT, || {
        ready(&b).is_some_and(|now| now[2] != pids[2])
    });
    let now = ready(&b).unwrap();
    assert_eq!((now[0], now[1]), (pids[0], pids[1]));
    assert_eq!(b.generation(1)["restarts"], 2);

    let out = b.cli(&["stop"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(b.wait_exit(WAIT), 0, "{}", b.logs());
    for pid in now {
        assert!(group_members(pid as i32).is_empty(), "worker {pid} is gone");
    }
}
