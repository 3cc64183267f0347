//! What a child receives: exactly the declared fds, names and LISTEN_PID.

use std::path::Path;

use baton_e2e::*;
use serde_json::Value;

fn read_report(path: &Path) -> Value {
    wait_until("the fake app's report", WAIT, || path.exists());
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Runs the fake app under baton with `flags` before `--`; returns baton
/// (generation 1 active) and the fake's report.
fn run_fake(flags: &[&str]) -> (Baton, Value) {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let env = format!("TEST_SOCKETFD_REPORT={}", report_path.display());
    let fake = bin("test-socketfd");
    let mut args = flags.to_vec();
    args.extend_from_slice(&["--env", &env, "--", fake.to_str().unwrap()]);
    let baton = Baton::spawn(dir, &args);
    baton.wait_active(1);
    let report = read_report(&report_path);
    (baton, report)
}

fn open_fds(report: &Value) -> Vec<i64> {
    report["fds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["fd"].as_i64().unwrap())
        .collect()
}

#[test]
fn child_receives_exactly_the_declared_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let unix = dir.path().join("admin.sock");
    let fake = bin("test-socketfd");
    let admin = format!("admin=unix:{},mode=0660", unix.display());
    let env = format!("TEST_SOCKETFD_REPORT={}", report_path.display());
    let baton = Baton::spawn(
        dir,
        &[
            "--listen",
            "http=127.0.0.1:0",
            "--listen",
            "api=[::1]:0",
            "--listen",
            &admin,
            "--env",
            &env,
            "--",
            fake.to_str().unwrap(),
            "--fd",
            "{fd:api}",
        ],
    );
    baton.wait_active(1);
    let r = read_report(&report_path);
    let pid = baton.generation(1)["pid"].as_i64().unwrap();

    assert_eq!(r["pid"], pid);
    assert_eq!(
        r["pgid"], pid,
        "each generation leads its own process group"
    );
    assert_eq!(r["listen_fds"], "3");
    assert_eq!(r["listen_fdnames"], "http:api:admin");
    assert_eq!(r["listen_pid"], pid.to_string());
    assert_eq!(r["argv"][1], "--fd");
    assert_eq!(r["argv"][2], "4", "{{fd:api}} became 4");
    assert_eq!(r["env"]["BATON_GENERATION"], "1");
    assert!(r["env"]["NOTIFY_SOCKET"].as_str().unwrap().starts_with('/'));
    assert_eq!(
        open_fds(&r),
        vec![0, 1, 2, 3, 4, 5],
        "no other descriptor leaks: {r}"
    );

    let fds = r["fds"].as_array().unwrap();
    let s = baton.status();
    let expect = [
        (
            "tcp",
            s["sockets"][0]["address"].as_str().unwrap().to_owned(),
        ),
        (
            "tcp",
            s["sockets"][1]["address"].as_str().unwrap().to_owned(),
        ),
        ("unix", unix.display().to_string()),
    ];
    for (i, (kind, addr)) in expect.iter().enumerate() {
        let f = &fds[3 + i];
        assert_eq!(f["socket"]["kind"], *kind, "{f}");
        assert_eq!(f["socket"]["listening"], true, "{f}");
        assert_eq!(f["cloexec"], false, "{f}");
        let local = f["socket"]["local_addr"].as_str().unwrap();
        assert!(
            local.contains(addr.trim_start_matches("unix:")),
            "fd {}: {local} vs {addr}",
            3 + i
        );
    }
    assert!(s["sockets"][1]["address"]
        .as_str()
        .unwrap()
        .starts_with("[::1]:"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&unix).unwrap().permissions().mode() & 0o777,
        0o660
    );
    // And the sockets work.
    let r = get(baton.addr("api"), "/").unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn http_readiness_adds_the_private_probe_listener_last() {
    let (baton, r) = run_fake(&["--listen", "http=127.0.0.1:0", "--ready", "http:/healthz"]);
    assert_eq!(r["listen_fds"], "2");
    assert_eq!(r["listen_fdnames"], "http:baton-probe");
    assert_eq!(open_fds(&r), vec![0, 1, 2, 3, 4]);
    let probe = r["fds"][4]["socket"]["local_addr"].as_str().unwrap();
    assert!(probe.starts_with("127.0.0.1:"), "{probe}");
    assert_ne!(probe, baton.addr("http").to_string());
    assert!(baton.stderr.text().contains("http /healthz 200"));
}

#[test]
fn env_clear_passes_only_configured_and_protocol_variables() {
    let (_baton, r) = run_fake(&[
        "--listen",
        "http=127.0.0.1:0",
        "--env-clear",
        "--env",
        "A=b",
    ]);
    let mut keys: Vec<&str> = r["env"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "A",
            "BATON_GENERATION",
            "LISTEN_FDNAMES",
            "LISTEN_FDS",
            "LISTEN_PID",
            "NOTIFY_SOCKET",
            "TEST_SOCKETFD_REPORT"
        ]
    );
}

/// Every readiness check gates a real upgrade: `tcp` (the app accepted on
/// the probe listener), `exec:` (a command exits 0) and `delay:`.
#[test]
fn tcp_exec_and_delay_readiness_gate_upgrades() {
    let fake = bin("test-socketfd");
    for (ready, via) in [
        ("tcp", "tcp accept"),
        ("exec:test \"$BATON_GENERATION\" -ge 1", "exec"),
        ("delay:50ms", "delay 50ms"),
    ] {
        let baton = Baton::start(&[
            "--listen",
            "http=127.0.0.1:0",
            "--ready",
            ready,
            "--",
            fake.to_str().unwrap(),
        ]);
        let out = baton.upgrade_expect(&[], 0);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("generation 2 ready ({via}")),
            "{ready}: {text}"
        );
        assert_eq!(get(baton.addr("http"), "/").unwrap().status, 200);
    }
}

#[test]
fn unix_listener_serves_through_upgrades() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let listen = format!("app=unix:{}", sock.display());
    let hello = bin("hello");
    let baton = Baton::spawn(dir, &["--listen", &listen, "--", hello.to_str().unwrap()]);
    baton.wait_active(1);
    let ask = || {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(ask().contains("generation=1"));
    baton.upgrade_expect(&[], 0);
    assert!(ask().contains("generation=2"));
}
