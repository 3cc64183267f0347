//! Datagram (UDP) listeners: bound by baton, handed to every generation in
//! LISTEN_FDS like the others, one socket shared by all generations (never
//! steered), so datagrams are answered across upgrades and those queued
//! while no generation reads are read by the next one.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use baton_e2e::*;
use serde_json::Value;

/// A datagram client on the loopback of `to`'s family.
fn client(to: SocketAddr) -> UdpSocket {
    let any = if to.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    let c = UdpSocket::bind(any).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c
}

/// Sends `payload` to `to` and waits for the echo: `generation=N pid=P`.
fn echo(c: &UdpSocket, to: SocketAddr, payload: &str) -> Result<(u64, i64), String> {
    c.send_to(payload.as_bytes(), to)
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 512];
    let n = c.recv(&mut buf).map_err(|e| format!("no answer: {e}"))?;
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let rest = text
        .strip_prefix(payload)
        .ok_or_else(|| format!("answer to another datagram: {text:?}"))?;
    Ok(who(rest))
}

/// The socket inode of the passed fd named `name` in a fake app's report.
fn socket_of(report: &Value, name: &str) -> (String, String) {
    let names: Vec<&str> = report["listen_fdnames"]
        .as_str()
        .unwrap()
        .split(':')
        .collect();
    let fd = 3 + names.iter().position(|n| *n == name).unwrap() as i64;
    let f = report["fds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["fd"] == fd)
        .unwrap_or_else(|| panic!("no fd {fd} in {report}"));
    (
        f["target"].as_str().unwrap().to_owned(),
        f["socket"]["kind"].as_str().unwrap_or("").to_owned(),
    )
}

/// The fake app echoing datagrams (or holding its datagram sockets
/// unread, without `echo`), on a TCP listener and UDP v4 and v6 ones,
/// upgraded with `overlap`.
fn config(overlap: &str) -> String {
    config_echo(overlap, true)
}

fn config_echo(overlap: &str, echo: bool) -> String {
    format!(
        r#"command = ["{}"]
# Generous: no test here is about the ready timeout, and under heavy load the
# fake app can take seconds to start.
ready_timeout = "30s"
drain_timeout = "5s"
overlap = "{overlap}"
# The senders below send and await echoes as fast as they can, which with
# the old generation answering them keeps a small machine's CPUs busy: a
# candidate at the default `idle` priority then gets almost none (seen: 11 s
# to start instead of 0.5 s, the senders' 100 000 datagrams all answered by
# the old generation). No test here is about the priority
# (tests/e2e/priority.rs is).
candidate_priority = "normal"

[env]
FAKE_UDP_ECHO = "{}"
TEST_SOCKETFD_REPORT = "report.json"

[[listen]]
name = "http"
address = "127.0.0.1:0"

[[listen]]
name = "dns"
address = "udp:127.0.0.1:0"

[[listen]]
name = "dns6"
address = "udp:[::1]:0"
"#,
        bin("test-socketfd").display(),
        u8::from(echo)
    )
}

/// UDP v4 and v6 listeners beside a TCP one: the app gets them as fds 4
/// and 5 in the declared order, `SOCK_DGRAM`, and every new generation
/// gets the very socket the first one had (the TCP one, steered, is a new
/// socket with overlap: the positive control that the check tells sockets
/// apart; without overlap it is the old generation's, handed over).
/// Datagrams sent continuously across each upgrade (with overlap, and
/// without) are all answered, first by the old generation, at the end by
/// the new one.
#[test]
fn datagram_sockets_are_handed_over_and_answered_across_upgrades() {
    let baton = Baton::with_config(&config("full"), &[]);
    baton.wait_active(1);
    let http = baton.addr("http");
    let dns = [baton.udp_addr("dns"), baton.udp_addr("dns6")];
    assert!(dns[0].is_ipv4() && dns[1].is_ipv6());
    let s = baton.status();
    let steered: Vec<(String, bool)> = s["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["name"].as_str().unwrap().to_owned(),
                x["steered"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        steered,
        [
            ("http".to_owned(), true),
            ("dns".to_owned(), false),
            ("dns6".to_owned(), false)
        ],
        "{s}"
    );
    assert_eq!(
        baton.stderr.count(&["datagrams are never steered", "dns"]),
        2,
        "the log says so for each datagram listener"
    );
    let report = |gen: u64| -> Value {
        let r = get(http, "/report").unwrap();
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["env"]["BATON_GENERATION"], gen.to_string(), "{v}");
        v
    };
    let r1 = report(1);
    assert_eq!(r1["listen_fds"], "3");
    assert_eq!(r1["listen_fdnames"], "http:dns:dns6");
    let (udp1, kind) = socket_of(&r1, "dns");
    assert_eq!(kind, "udp");
    assert_eq!(socket_of(&r1, "dns6").1, "udp");

    let clients = [client(dns[0]), client(dns[1])];
    let mut gen = 1;
    let mut previous = r1.clone();
    for overlap in ["full", "none"] {
        // Positive control of the sequence below: the current generation
        // answers before the upgrade.
        for (c, to) in clients.iter().zip(dns) {
            assert_eq!(echo(c, to, "before").unwrap().0, gen);
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let senders: Vec<_> = dns
            .iter()
            .map(|&to| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let c = client(to);
                    let mut answers: BTreeMap<u64, usize> = BTreeMap::new();
                    let mut lost = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 100_000 {
                        match echo(&c, to, &format!("q{i}")) {
                            Ok((g, _)) => *answers.entry(g).or_default() += 1,
                            Err(e) => lost.push(format!("q{i}: {e}")),
                        }
                        i += 1;
                    }
                    (answers, lost)
                })
            })
            .collect();
        baton.reconfigure(&config(overlap));
        baton.upgrade_expect(&[], 0);
        gen += 1;
        for (c, to) in clients.iter().zip(dns) {
            assert_eq!(echo(c, to, "after").unwrap().0, gen, "{overlap}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for s in senders {
            let (answers, lost) = s.join().unwrap();
            eprintln!("overlap {overlap}: answered by generation: {answers:?}, lost {lost:?}");
            assert!(lost.is_empty(), "{overlap}: {lost:?}");
            assert!(answers.contains_key(&gen), "{overlap}: {answers:?}");
        }
        let r = report(gen);
        assert_eq!(
            socket_of(&r, "dns").0,
            udp1,
            "the new generation reads the very same datagram socket"
        );
        let (tcp, tcp_before) = (socket_of(&r, "http").0, socket_of(&previous, "http").0);
        if overlap == "full" {
            assert_ne!(
                tcp, tcp_before,
                "positive control: the steered TCP listener is a socket per generation"
            );
        } else {
            assert_eq!(
                tcp, tcp_before,
                "without overlap the TCP socket is handed over"
            );
        }
        previous = r;
    }
}

/// Bytes waiting in the receive queue of the UDP socket bound to `addr`,
/// from /proc/net/udp (or udp6).
fn rx_queue(addr: SocketAddr) -> u64 {
    let table = if addr.is_ipv6() { "udp6" } else { "udp" };
    let text = std::fs::read_to_string(format!("/proc/net/{table}")).unwrap();
    let port = format!(":{:04X}", addr.port());
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1)?.ends_with(&port).then(|| {
                let queues = f.get(4)?;
                u64::from_str_radix(queues.split(':').nth(1)?, 16).ok()
            })?
        })
        .sum()
}

/// Datagrams that arrive while the serving generation does not read them
/// stay in the shared socket's queue when that generation exits (here
/// without overlap: it is drained and gone before the next one starts),
/// and the next generation reads and answers every one of them.
#[test]
fn datagrams_queued_at_a_generations_exit_are_read_by_the_next_one() {
    let baton = Baton::with_config(&config_echo("none", false), &[]);
    baton.wait_active(1);
    for name in ["dns", "dns6"] {
        let to = baton.udp_addr(name);
        assert_eq!(rx_queue(to), 0, "{name}: nothing queued yet");
    }
    let dns = [baton.udp_addr("dns"), baton.udp_addr("dns6")];
    let clients = [client(dns[0]), client(dns[1])];
    for (c, to) in clients.iter().zip(dns) {
        for i in 0..5 {
            c.send_to(format!("d{i}").as_bytes(), to).unwrap();
        }
        baton.wait_until("the datagrams to queue", WAIT, || rx_queue(to) > 0);
        // Nobody reads them: no answer has come.
        c.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(
            c.recv(&mut buf).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock
        );
        c.set_nonblocking(false).unwrap();
    }
    baton.reconfigure(&config_echo("none", true));
    let out = baton.upgrade_expect(&[], 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("generation 1 exited"), "{text}");
    for (c, to) in clients.iter().zip(dns) {
        let mut got = Vec::new();
        for _ in 0..5 {
            let mut buf = [0u8; 128];
            let n = c
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("{to}: {e}; got {got:?}"));
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        got.sort();
        for (i, answer) in got.iter().enumerate() {
            assert!(answer.starts_with(&format!("d{i} ")), "{got:?}");
            assert_eq!(who(answer).0, 2, "read by the next generation: {answer}");
        }
        assert_eq!(rx_queue(to), 0, "{to}: all read");
    }
}
