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

/// The child gets exactly the declared sockets as fds 3, 4, 5 (TCP v4,
/// v6, Unix), their names, its own pid as LISTEN_PID, its own process
/// group, and no other descriptor: not even one baton itself inherited
/// (baton is started holding a file open as fd 7, not close-on-exec).
#[test]
fn child_receives_exactly_the_declared_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let unix = dir.path().join("admin.sock");
    let inherited = dir.path().join("inherited-by-baton");
    std::fs::write(&inherited, "baton's own fd\n").unwrap();
    let fake = bin("test-socketfd");
    let admin = format!("admin=unix:{},mode=0660", unix.display());
    let env = format!("TEST_SOCKETFD_REPORT={}", report_path.display());
    let baton = Baton::spawn_holding_fd(
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
        7,
        &inherited,
    );
    baton.wait_active(1);
    // Positive control: baton itself holds the inherited fd 7.
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/fd/7", baton.pid())).ok(),
        Some(inherited.clone()),
        "baton did not inherit fd 7"
    );
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
    assert_eq!(r["env"]["BATON_WORKER"], "0", "one worker, the first");
    assert!(r["env"]["NOTIFY_SOCKET"].as_str().unwrap().starts_with('/'));
    assert_eq!(
        open_fds(&r),
        vec![0, 1, 2, 3, 4, 5],
        "no other descriptor leaks: {r}"
    );
    assert!(
        !r["fds"].to_string().contains("inherited-by-baton"),
        "baton's inherited fd leaked: {r}"
    );
    assert_eq!(r["fds"][0]["target"], "/dev/null", "{r}");

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
    // Shared sockets only: steered traffic reaches the candidate without it.
    let (baton, r) = run_fake(&[
        "--listen",
        "http=127.0.0.1:0",
        "--ready",
        "http:/healthz",
        "--traffic",
        "shared",
    ]);
    assert_eq!(r["listen_fds"], "2");
    assert_eq!(r["listen_fdnames"], "http:baton-probe");
    assert_eq!(open_fds(&r), vec![0, 1, 2, 3, 4]);
    let probe = r["fds"][4]["socket"]["local_addr"].as_str().unwrap();
    assert!(probe.starts_with("127.0.0.1:"), "{probe}");
    assert_ne!(probe, baton.addr("http").to_string());
    assert!(baton.stderr.text().contains("http /healthz 200"));
}

/// Runs the fake app under baton started with extra variables in its own
/// environment (including protocol variables, as if baton itself had been
/// socket-activated); returns the fake's environment.
fn child_env(baton_env: &[(&str, &str)], flags: &[&str]) -> serde_json::Map<String, Value> {
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("report.json");
    let env = format!("TEST_SOCKETFD_REPORT={}", report_path.display());
    let fake = bin("test-socketfd");
    let mut args = vec!["--listen", "http=127.0.0.1:0"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--env", &env, "--", fake.to_str().unwrap()]);
    let baton = Baton::spawn_with_env(dir, &args, baton_env);
    baton.wait_active(1);
    let r = read_report(&report_path);
    let pid = baton.generation(1)["pid"].as_i64().unwrap();
    let env = r["env"].as_object().unwrap().clone();
    // The protocol variables are always baton's own, never inherited.
    assert_eq!(env["LISTEN_FDS"], "1", "{r}");
    assert_eq!(env["LISTEN_FDNAMES"], "http", "{r}");
    assert_eq!(env["LISTEN_PID"], pid.to_string(), "{r}");
    assert_eq!(env["BATON_GENERATION"], "1", "{r}");
    assert_ne!(env["NOTIFY_SOCKET"], "/inherited/notify", "{r}");
    env
}

const BATON_ENV: &[(&str, &str)] = &[
    ("FROM_BATON", "yes"),
    ("ALSO_FROM_BATON", "yes"),
    ("LISTEN_FDS", "9"),
    ("LISTEN_FDNAMES", "inherited"),
    ("LISTEN_PID", "1"),
    ("NOTIFY_SOCKET", "/inherited/notify"),
    ("BATON_GENERATION", "99"),
    ("BATON_WORKER", "99"),
];

fn keys(env: &serde_json::Map<String, Value>) -> Vec<&str> {
    env.keys().map(|k| k.as_str()).collect()
}

/// By default the app gets baton's environment; `env_inherit` narrows it
/// to a list; `--env-clear` passes only the configured and protocol
/// variables. Protocol variables are never inherited.
#[test]
fn env_is_inherited_listed_or_cleared_and_protocol_variables_never_inherited() {
    let env = child_env(BATON_ENV, &["--env", "A=b"]);
    assert_eq!(env["FROM_BATON"], "yes");
    assert_eq!(env["ALSO_FROM_BATON"], "yes");
    assert_eq!(env["A"], "b");
    assert!(env.contains_key("PATH"), "{:?}", keys(&env));

    let env = child_env(BATON_ENV, &["--env-clear", "--env", "A=b"]);
    let mut k = keys(&env);
    k.sort();
    assert_eq!(
        k,
        vec![
            "A",
            "BATON_GENERATION",
            "BATON_WORKER",
            "LISTEN_FDNAMES",
            "LISTEN_FDS",
            "LISTEN_PID",
            "NOTIFY_SOCKET",
            "TEST_SOCKETFD_REPORT"
        ]
    );

    // env_inherit lives in the config file.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("baton.toml"),
        "env_inherit = [\"FROM_BATON\", \"LISTEN_FDS\"]\n",
    )
    .unwrap();
    let config = dir.path().join("baton.toml").display().to_string();
    let env = child_env(BATON_ENV, &["--config", &config]);
    let mut k = keys(&env);
    k.sort();
    assert_eq!(
        k,
        vec![
            "BATON_GENERATION",
            "BATON_WORKER",
            "FROM_BATON",
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

/// With steered traffic an `http` check goes to the real address (from
/// baton's probe ports, which the kernel sends to the candidate): the app
/// gets exactly its declared sockets, no probe listener.
#[test]
fn steered_readiness_passes_only_the_declared_sockets() {
    let (baton, r) = run_fake(&["--listen", "http=127.0.0.1:0", "--ready", "http:/healthz"]);
    assert_eq!(baton.status()["traffic"], "steered");
    assert_eq!(r["listen_fds"], "1");
    assert_eq!(r["listen_fdnames"], "http");
    assert_eq!(open_fds(&r), vec![0, 1, 2, 3]);
    // Ready by the probe through the real address.
    baton.stderr.wait_for(
        &["generation ready", "generation=1 ", "http /healthz 200"],
        1,
        WAIT,
    );
}
