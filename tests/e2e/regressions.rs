//! Regression tests for bugs found when the lifecycle moved into the pure
//! core (issue "Core redesign"): each fails without its fix.

use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_e2e::*;

fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut f = stat[stat.rfind(')')? + 2..].split(' ');
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((state, ppid))
}

/// A helper in the candidate's process group waits until the main process
/// has exited (a zombie: baton keeps it unreaped), then sends READY=1 at
/// once. The exit happened first, so the candidate must never be promoted,
/// however the two reach baton. Without ordering exits before reports,
/// READY usually won (the exit is reported after a /proc scan) and the dead
/// candidate replaced the healthy generation.
#[test]
fn ready_after_the_main_process_exited_never_promotes_it() {
    let baton = Baton::with_config(&fake_config("", ""), &[]);
    baton.wait_active(1);
    write_script(
        &baton.path("helper.py"),
        r#"import os, signal, socket, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
leader = int(sys.argv[1])
open("helper-ready", "w").close()
for _ in range(5_000_000):
    st = open(f"/proc/{leader}/stat").read()
    if st[st.rindex(")") + 2] == "Z":
        break
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.connect(os.environ["NOTIFY_SOCKET"])
s.send(b"READY=1")
print(f"helper: sent READY=1 as pid {os.getpid()}", file=sys.stderr, flush=True)
"#,
    );
    // Make the first line a shebang for python, not sh.
    let helper = std::fs::read_to_string(baton.path("helper.py")).unwrap();
    std::fs::write(
        baton.path("helper.py"),
        helper.replacen("#!/bin/sh", "#!/usr/bin/env python3", 1),
    )
    .unwrap();
    write_script(
        &baton.path("dies.sh"),
        "rm -f helper-ready\n./helper.py $$ &\nwhile [ ! -e helper-ready ]; do sleep 0.01; done\nexit 3",
    );
    let conf = fake_config("", "").replacen(
        &format!("command = [\"{}\"]", bin("test-socketfd").display()),
        "command = [\"./dies.sh\"]",
        1,
    );
    for attempt in 1..=5 {
        baton.reconfigure(&conf);
        let out = baton.upgrade_expect(&[], 1);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("exited before it was ready (exit status 3)"),
            "attempt {attempt}: {text}"
        );
        // Positive control: the READY was sent, and baton saw and ignored it.
        baton
            .stderr
            .wait_for(&["helper: sent READY=1 as pid"], attempt, WAIT);
        let helper_pid = baton
            .stderr
            .all()
            .iter()
            .filter_map(|l| l.split("helper: sent READY=1 as pid ").nth(1))
            .next_back()
            .unwrap()
            .trim()
            .to_owned();
        baton.stderr.wait_for(
            &["ignoring notify message", &format!("pid={helper_pid}")],
            1,
            WAIT,
        );
        assert_eq!(baton.status()["active"], 1, "attempt {attempt}");
    }
    assert_eq!(
        baton.stderr.count(&["generation active"]),
        1,
        "only generation 1 ever became active"
    );
}

/// Starts baton over a shell app whose main process drains on SIGTERM but
/// leaves behind a worker (in its group) that ignores it.
fn stubborn_worker_app(dir: &std::path::Path) {
    write_script(
        &dir.join("app.sh"),
        "(trap '' TERM; exec sleep 300) &\ntrap 'exit 0' TERM\nwhile :; do sleep 0.05; done",
    );
}

/// The main process of a generation stays unreaped (a zombie child of
/// baton) while other members of its group live, so its pid, which is the
/// group's id, cannot be reused and `killpg` cannot reach a stranger; it is
/// reaped as soon as the group is empty.
#[test]
fn an_exited_leader_stays_unreaped_until_its_group_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    stubborn_worker_app(dir.path());
    let baton = Baton::spawn(
        dir,
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            "delay:10ms",
            "--drain-timeout",
            "2s",
            "--",
            "./app.sh",
        ],
    );
    baton.wait_active(1);
    let leader = baton.generation(1)["pid"].as_i64().unwrap() as i32;
    wait_until("the worker to start", WAIT, || {
        group_members(leader).len() >= 2
    });
    baton.upgrade_expect(&["--no-wait-drain"], 0);
    baton
        .stderr
        .wait_for(&["generation exited", "generation=1 "], 1, WAIT);
    // The worker lives on: the leader is a zombie whose parent is baton.
    assert_eq!(group_members(leader).len(), 1, "the worker outlives it");
    assert_eq!(
        proc_state(leader),
        Some(('Z', baton.pid() as i32)),
        "leader kept unreaped while its group lives"
    );
    // At the drain deadline the worker is killed and the leader reaped.
    wait_until("the group to end and the leader to be reaped", WAIT, || {
        group_members(leader).is_empty() && proc_state(leader).is_none()
    });
    assert!(zombies_of(baton.pid() as i32).is_empty());
}

/// Nothing baton writes to its stderr may hold up its decisions: with its
/// stderr a full pipe nobody reads, upgrades still complete and a drain
/// timeout still kills on time. (Before, log lines were written
/// synchronously from the decision loop.)
#[test]
fn a_stuck_log_reader_delays_neither_cutover_nor_kill_timer() {
    let dir = tempfile::tempdir().unwrap();
    // Silent app that ignores the drain signal: every upgrade ends with
    // the drain timeout's SIGKILL.
    write_script(
        &dir.path().join("app.sh"),
        "trap '' TERM\nwhile :; do sleep 0.05; done",
    );
    let (read, write) = nix::unistd::pipe().unwrap();
    // The smallest pipe there is: one page.
    nix::fcntl::fcntl(write.as_raw_fd(), nix::fcntl::FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
    let control = dir.path().join("ctl/control.sock");
    let stderr_file = std::fs::File::from(write);
    let mut child = Command::new(bin("baton"))
        .args(["--control", control.to_str().unwrap(), "run"])
        .args([
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            "delay:10ms",
            "--drain-timeout",
            "300ms",
            "--",
            "./app.sh",
        ])
        .current_dir(dir.path())
        .env("BATON_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_file)
        .spawn()
        .unwrap();
    let child = KillOnDrop(&mut child);
    let read = std::fs::File::from(read);
    wait_until("baton to answer", WAIT, || {
        cli(&control, &["status", "--json"]).status.success()
    });
    for i in 1..=12 {
        let started = Instant::now();
        let out = cli_within(&control, &["upgrade"], Duration::from_secs(10));
        assert!(
            out.status.success(),
            "upgrade {i} with a stuck log reader: {}",
            describe_output(&out)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("killed after drain timeout"), "{text}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "upgrade {i} took {:?}",
            started.elapsed()
        );
    }
    // Positive control: the pipe really was full.
    let queued = pipe_queued(&read);
    assert!(
        queued >= 4000,
        "baton's stderr pipe held only {queued} bytes"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    // Let it finish: drain the pipe so its exit is not held up either.
    let reader = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut &read, &mut sink);
    });
    let deadline = Instant::now() + WAIT;
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "baton did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = reader.join();
}

/// Kills (and reaps) a child when the test ends, passed or not.
struct KillOnDrop<'a>(&'a mut std::process::Child);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a CLI command; fails the test if it has not finished in `limit`.
fn cli_within(control: &std::path::Path, args: &[&str], limit: Duration) -> CmdOutput {
    let mut cmd = Command::new(bin("baton"));
    cmd.arg("--control")
        .arg(control)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command = format!("{cmd:?}");
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "did not finish in {limit:?}\n{}",
                describe_output(&CmdOutput { command, output })
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let output = child.wait_with_output().unwrap();
    CmdOutput { command, output }
}

/// Bytes waiting in a pipe: reads what is there without blocking.
fn pipe_queued(read: &std::fs::File) -> usize {
    use std::io::Read;
    let flags = nix::fcntl::fcntl(read.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
    let nonblock = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(read.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nonblock)).unwrap();
    let mut buf = vec![0u8; 65536];
    let n = (&*read).read(&mut buf).unwrap_or(0);
    nix::fcntl::fcntl(
        read.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::from_bits_truncate(flags)),
    )
    .unwrap();
    n
}

/// While `baton stop` drains, a new client is refused at once
/// (ECONNREFUSED) instead of being accepted by the kernel into a queue
/// that nobody serves and reset when baton exits; a request already in
/// flight still completes.
#[test]
fn stop_refuses_new_connections_and_finishes_requests_in_flight() {
    let mut baton = Baton::with_config(&fake_config("", "FAKE_SLOW_MS = \"4000\""), &[]);
    baton.wait_active(1);
    let addr = baton.addr("http");
    let pid = baton.generation(1)["pid"].as_i64().unwrap() as i32;
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    wait_accepted_by(pid, &slow);
    // Sent before the stop; the app answers it whether or not it has read
    // it yet (connections accepted before a drain get their first answer).
    let in_flight = std::thread::spawn(move || roundtrip(&mut slow, "/slow", false));
    let mut stop_cmd = Command::new(bin("baton"));
    stop_cmd
        .arg("--control")
        .arg(&baton.control)
        .arg("stop")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let stop_command = format!("{stop_cmd:?}");
    let stopper = stop_cmd.spawn().unwrap();
    baton
        .stderr
        .wait_for(&["stopping: draining every generation"], 1, WAIT);
    baton.stderr.wait_for(&["fake: draining"], 1, WAIT);
    // Once the app has closed its copy too, connections are refused, while
    // the drain (the 4 s request) is still going on.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::net::TcpStream::connect(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) => panic!("expected ECONNREFUSED, got {e}"),
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "new connections still accepted 2 s into the stop"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    assert!(
        !in_flight.is_finished(),
        "refused only after the drain ended"
    );
    assert!(baton.child.as_mut().unwrap().try_wait().unwrap().is_none());
    let r = in_flight
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("in-flight request failed: {e:?}"));
    assert_eq!(r.body.trim(), "slow done");
    let out = CmdOutput {
        command: stop_command,
        output: stopper.wait_with_output().unwrap(),
    };
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(baton.wait_exit(WAIT), 0);
}

/// With `--user`, the credential change used to clear the parent-death
/// signal (it was set before setuid): a SIGKILLed baton left the app
/// serving the port, unsupervised. Now it drains and exits.
#[test]
#[cfg_attr(not(baton_root), ignore = "needs root (runs the app as another user)")]
fn apps_run_as_another_user_get_their_drain_signal_when_baton_is_killed() {
    assert_root();
    test_user();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    std::fs::set_permissions(&out_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mark = out_dir.join("got-signal");
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
            "--user",
            "baton-test",
            "--",
            "./app.sh",
        ],
    );
    baton.wait_active(1);
    let addr = baton.addr("http");
    let app = baton.generation(1)["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(baton.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    baton.wait_exit(WAIT);
    wait_until("the app to get its drain signal", WAIT, || mark.exists());
    assert_eq!(std::fs::read_to_string(&mark).unwrap().trim(), "TERM");
    wait_until("the app to exit", WAIT, || group_members(app).is_empty());
    std::net::TcpListener::bind(addr).expect("port released");
}
