//! `HELLO_STAMPS`: the app stamps its start, READY=1, its drain signal and
//! its exit on CLOCK_MONOTONIC, which baton-bench compares across
//! processes. Checked against this process's own reading of the same clock
//! around each event.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::time::{clock_gettime, ClockId};
use nix::unistd::Pid;

fn mono_ns() -> u64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// (event, generation, pid, ns) of each line.
fn parse(text: &str) -> Vec<(String, String, u32, u64)> {
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert_eq!(f.len(), 4, "bad stamp line {l:?}");
            (
                f[0].to_owned(),
                f[1].to_owned(),
                f[2].parse().expect("pid"),
                f[3].parse().expect("ns"),
            )
        })
        .collect()
}

#[test]
fn ready_and_drain_are_stamped_on_the_monotonic_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify_path = dir.path().join("notify");
    let stamps = dir.path().join("stamps");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");

    let before_start = mono_ns();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hello"))
        .args(["--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &notify_path)
        .env("HELLO_STAMPS", &stamps)
        .env("BATON_GENERATION", "5")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start hello");
    let pid = child.id();

    let mut buf = [0u8; 512];
    loop {
        let n = notify.recv(&mut buf).expect("READY=1 within 10 s");
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "READY=1")
        {
            break;
        }
    }
    let ready_seen = mono_ns();

    let term_sent = mono_ns();
    kill(Pid::from_raw(pid as i32), Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "hello did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let exited = mono_ns();
    assert!(status.success(), "{status}");

    let lines = parse(&std::fs::read_to_string(&stamps).expect("stamps file"));
    assert_eq!(lines.len(), 4, "{lines:?}");
    let (start, ready, drain, exit) = (&lines[0], &lines[1], &lines[2], &lines[3]);
    for (line, event) in [(start, "start"), (exit, "exit")] {
        assert_eq!(
            (line.0.as_str(), line.1.as_str(), line.2),
            (event, "5", pid)
        );
    }
    // Stamped first thing, before it was ready; and once drained, before
    // the exit.
    assert!(
        (before_start..=ready.3).contains(&start.3),
        "start {} not in [{before_start}, {}]",
        start.3,
        ready.3
    );
    assert!(
        (drain.3..=exited).contains(&exit.3),
        "exit {} not in [{}, {exited}]",
        exit.3,
        drain.3
    );
    assert_eq!(
        (ready.0.as_str(), ready.1.as_str(), ready.2),
        ("ready", "5", pid)
    );
    assert_eq!(
        (drain.0.as_str(), drain.1.as_str(), drain.2),
        ("drain", "5", pid)
    );
    // Stamped before READY=1 was sent, so before this process received it.
    assert!(
        (before_start..=ready_seen).contains(&ready.3),
        "ready {} not in [{before_start}, {ready_seen}]",
        ready.3
    );
    // Stamped when SIGTERM arrived: after it was sent, before the exit.
    assert!(
        (term_sent..=exited).contains(&drain.3),
        "drain {} not in [{term_sent}, {exited}]",
        drain.3
    );
}
