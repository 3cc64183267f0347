//! Property-based tests of every parser that takes outside input: the
//! control-request decoder, the config file parser, the listen-address,
//! readiness and signal parsers, and the sd_notify message parser. Each
//! property has an oracle: a round trip (value -> text -> value), or
//! agreement with a small reference implementation of the documented
//! grammar written here, independently of the parser under test.
//!
//! CI runs the default number of cases; a longer run:
//! `PROPTEST_CASES=100000 cargo test --release -p baton --test fuzz`
//! (results are recorded in docs/guarantees.md). Coverage-guided fuzzing
//! of the same parsers lives in `fuzz/` (cargo-fuzz).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use baton::config::{Config, FileConfig, ListenAddr, ListenSpec, Overrides, ReadySpec, SignalSpec};
use baton::notify::NotifyMessage;
use baton::protocol::Request;
use nix::sys::signal::Signal;
use proptest::prelude::*;
use serde_json::Value;

// ----- control requests -------------------------------------------------------

/// A JSON object's entries in document order, duplicates kept (a
/// `serde_json::Value` keeps only the last of duplicated keys).
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(kv) = m.next_entry::<String, Value>()? {
                    out.push(kv);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The request grammar as docs/protocol.md states it: one JSON object with
/// a `cmd`; "unknown commands or fields are refused", and so is a key
/// given twice. Per command, the fields it takes (all optional):
/// - `status`, `stop`: none;
/// - `upgrade`: `wait_drain`, `no_wait` (booleans, default false),
///   `canary` (0-255 at this layer; the server refuses over 100),
///   `canary_for_ms`, `bake_ms` (non-negative integers); `null` is absent;
/// - `rollback`: `wait_drain`;
/// - `promote`: `wait_drain`, `no_wait`.
fn documented_request(body: &[u8]) -> Option<Request> {
    let Ok(Value::Object(_)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let Entries(entries) = serde_json::from_slice(body).ok()?;
    let mut keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    keys.sort_unstable();
    if keys.windows(2).any(|w| w[0] == w[1]) {
        return None;
    }
    let get = |key: &str| entries.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let Some(Value::String(cmd)) = get("cmd") else {
        return None;
    };
    let allowed: &[&str] = match cmd.as_str() {
        "status" | "stop" | "upgrade_self" => &[],
        "upgrade" => &[
            "wait_drain",
            "no_wait",
            "canary",
            "canary_for_ms",
            "bake_ms",
        ],
        "rollback" => &["wait_drain"],
        "promote" => &["wait_drain", "no_wait"],
        _ => return None,
    };
    if entries
        .iter()
        .any(|(k, _)| k != "cmd" && !allowed.contains(&k.as_str()))
    {
        return None;
    }
    let flag = |key: &str| -> Option<bool> {
        match get(key) {
            None => Some(false),
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => None,
        }
    };
    let number = |key: &str, max: u64| -> Option<Option<u64>> {
        match get(key) {
            None | Some(Value::Null) => Some(None),
            Some(Value::Number(n)) => n.as_u64().filter(|v| *v <= max).map(Some),
            Some(_) => None,
        }
    };
    Some(match cmd.as_str() {
        "status" => Request::Status,
        "stop" => Request::Stop,
        "upgrade_self" => Request::UpgradeSelf,
        "rollback" => Request::Rollback {
            wait_drain: flag("wait_drain")?,
        },
        "promote" => Request::Promote {
            wait_drain: flag("wait_drain")?,
            no_wait: flag("no_wait")?,
        },
        _ => Request::Upgrade {
            wait_drain: flag("wait_drain")?,
            no_wait: flag("no_wait")?,
            canary: number("canary", 255)?.map(|v| v as u8),
            canary_for_ms: number("canary_for_ms", u64::MAX)?,
            bake_ms: number("bake_ms", u64::MAX)?,
        },
    })
}

fn expected_request(body: &[u8]) -> Option<Request> {
    documented_request(body)
}

fn any_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Status),
        Just(Request::Stop),
        Just(Request::UpgradeSelf),
        (
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(0..=100u8),
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>())
        )
            .prop_map(|(wait_drain, no_wait, canary, canary_for_ms, bake_ms)| {
                Request::Upgrade {
                    wait_drain,
                    no_wait,
                    canary,
                    canary_for_ms,
                    bake_ms,
                }
            }),
        (any::<bool>(), any::<bool>()).prop_map(|(wait_drain, no_wait)| Request::Promote {
            wait_drain,
            no_wait
        }),
        any::<bool>().prop_map(|wait_drain| Request::Rollback { wait_drain }),
    ]
}

/// JSON texts close to valid requests: objects and arrays of the keys and
/// values the decoder looks for, in any order, duplicates included.
fn request_like_json() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "cmd",
        "wait_drain",
        "no_wait",
        "canary",
        "canary_for_ms",
        "bake_ms",
        "force",
        "CMD",
        "",
        "cmd ",
    ]);
    let value = prop::sample::select(vec![
        "\"status\"",
        "\"upgrade\"",
        "\"rollback\"",
        "\"stop\"",
        "\"promote\"",
        "\"upgrade_self\"",
        "\"UPGRADE\"",
        "10",
        "300",
        "-1",
        "1.5",
        "\"\"",
        "\"\\u0073top\"",
        "true",
        "false",
        "null",
        "1",
        "0",
        "\"true\"",
        "[]",
        "{}",
        "{\"cmd\":\"stop\"}",
    ]);
    let ws = prop::sample::select(vec!["", " ", "\n", "\t "]);
    let object = prop::collection::vec((key, value.clone(), ws.clone()), 0..5).prop_map(|kvs| {
        let body: Vec<String> = kvs
            .iter()
            .map(|(k, v, w)| format!("{w}\"{k}\"{w}:{w}{v}"))
            .collect();
        format!("{{{}}}", body.join(","))
    });
    let array = prop::collection::vec(value, 0..4).prop_map(|v| format!("[{}]", v.join(",")));
    let tail = prop::sample::select(vec!["", " ", "\n", "x", "}", ","]);
    (prop_oneof![3 => object, 1 => array], tail).prop_map(|(j, t)| format!("{j}{t}"))
}

// ----- configuration -------------------------------------------------------------

/// Strings built from the pieces the parsers look for, so the fuzzer
/// reaches deep paths rather than failing at the first byte.
fn near_valid_toml() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "command",
        "cwd",
        "ready",
        "ready_timeout",
        "drain_signal",
        "drain_timeout",
        "restart_backoff_max",
        "control",
        "backlog",
        "user",
        "group",
        "env_inherit",
        "control_allow_uids",
        "workers",
        "candidate_priority",
        "name",
        "address",
        "mode",
        "colour",
    ]);
    let value = prop_oneof![
        Just("\"notify\"".to_owned()),
        Just("\"http:/up\"".to_owned()),
        Just("\"30s\"".to_owned()),
        Just("\"SIGTERM\"".to_owned()),
        Just("[\"./srv\", \"{fd:http}\"]".to_owned()),
        Just("\"127.0.0.1:0\"".to_owned()),
        Just("\"unix:/tmp/x.sock\"".to_owned()),
        Just("\"0660\"".to_owned()),
        Just("\"nice:7\"".to_owned()),
        Just("true".to_owned()),
        Just("[1, 2]".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        "\"[^\"\\\\\n]{0,12}\"",
    ];
    let line = prop_oneof![
        (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
        Just("[[listen]]".to_owned()),
        Just("[env]".to_owned()),
        "[a-zA-Z_]{1,8} = \"[a-z]{0,5}\"",
        ".{0,20}",
    ];
    prop::collection::vec(line, 0..12).prop_map(|l| l.join("\n"))
}

/// A config error is one line, and a position it names is inside the text.
fn check_config_error(text: &str, e: &str) -> Result<(), TestCaseError> {
    prop_assert!(!e.contains('\n'), "multi-line error: {e}");
    if let Some(rest) = e.strip_prefix("line ") {
        let line: usize = rest
            .split(',')
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| TestCaseError::fail(format!("no line number in {e:?}")))?;
        let lines = text.split('\n').count();
        prop_assert!(
            (1..=lines).contains(&line),
            "line {line} of a {lines}-line text: {e}"
        );
    }
    Ok(())
}

/// What a generated config file says, to compare with what baton reads.
#[derive(Debug, Clone)]
struct ConfigModel {
    command: Vec<String>,
    cwd: Option<String>,
    ready: Option<ReadySpec>,
    ready_timeout_ms: Option<u64>,
    drain_signal: Option<Signal>,
    drain_timeout_ms: Option<u64>,
    backlog: Option<u32>,
    env: BTreeMap<String, String>,
    env_inherit: Option<Vec<String>>,
    listen: Vec<(String, SocketAddr)>,
    allow_uids: Vec<u32>,
    workers: Option<u32>,
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

impl ConfigModel {
    fn to_toml(&self) -> String {
        let list = |items: &[String]| {
            let quoted: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
            format!("[{}]", quoted.join(", "))
        };
        let mut t = format!("command = {}\n", list(&self.command));
        if let Some(cwd) = &self.cwd {
            t += &format!("cwd = {}\n", toml_str(cwd));
        }
        if let Some(r) = &self.ready {
            t += &format!("ready = {}\n", toml_str(&r.to_string()));
        }
        if let Some(ms) = self.ready_timeout_ms {
            t += &format!("ready_timeout = \"{ms}ms\"\n");
        }
        if let Some(s) = self.drain_signal {
            t += &format!("drain_signal = {}\n", toml_str(s.as_str()));
        }
        if let Some(ms) = self.drain_timeout_ms {
            t += &format!("drain_timeout = \"{ms}ms\"\n");
        }
        if let Some(b) = self.backlog {
            t += &format!("backlog = {b}\n");
        }
        if let Some(names) = &self.env_inherit {
            t += &format!("env_inherit = {}\n", list(names));
        }
        let uids: Vec<String> = self.allow_uids.iter().map(u32::to_string).collect();
        t += &format!("control_allow_uids = [{}]\n", uids.join(", "));
        if let Some(n) = self.workers {
            t += &format!("workers = {n}\n");
        }
        t += "[env]\n";
        for (k, v) in &self.env {
            t += &format!("{} = {}\n", toml_str(k), toml_str(v));
        }
        for (name, addr) in &self.listen {
            t += &format!(
                "[[listen]]\nname = {}\naddress = \"{addr}\"\n",
                toml_str(name)
            );
        }
        t
    }
}

fn config_model() -> impl Strategy<Value = ConfigModel> {
    let arg = "[^\u{0}]{1,12}";
    let signal = prop::sample::select(
        Signal::iterator()
            .filter(|s| !matches!(s, Signal::SIGKILL | Signal::SIGSTOP))
            .collect::<Vec<_>>(),
    );
    let listen = prop::collection::btree_map(
        listen_name(),
        (any::<std::net::Ipv4Addr>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
        0..4,
    );
    (
        (
            prop::collection::vec(arg, 1..4),
            prop::option::of("[a-z/._-]{1,12}"),
            prop::option::of(valid_ready()),
            prop::option::of(1..100_000_000u64),
            prop::option::of(signal),
            prop::option::of(1..100_000_000u64),
        ),
        (
            prop::option::of(1..=u32::MAX),
            prop::collection::btree_map("[A-Za-z_][A-Za-z0-9_]{0,8}", "[^\u{0}]{0,12}", 0..4),
            prop::option::of(prop::collection::vec("[A-Z_]{1,8}", 0..3)),
            listen,
            prop::collection::vec(any::<u32>(), 0..3),
            prop::option::of(1..=baton::config::MAX_WORKERS),
        ),
    )
        .prop_filter(
            "protocol variables cannot be configured",
            |(_, (_, env, ..))| {
                env.keys()
                    .all(|k| !baton::config::PROTOCOL_ENV.contains(&k.as_str()))
            },
        )
        .prop_map(
            |(
                (command, cwd, ready, ready_timeout_ms, drain_signal, drain_timeout_ms),
                (backlog, env, env_inherit, listen, allow_uids, workers),
            )| ConfigModel {
                command,
                cwd,
                ready,
                ready_timeout_ms,
                drain_signal,
                drain_timeout_ms,
                backlog,
                env,
                env_inherit,
                listen: listen.into_iter().collect(),
                allow_uids,
                workers,
            },
        )
}

// ----- listen addresses, readiness checks, signals ----------------------------------

fn listen_name() -> impl Strategy<Value = String> {
    "[!-~&&[^:=,]]{1,12}".prop_filter("reserved", |n| n != "baton-probe")
}

/// The documented `NAME=ADDRESS[,mode=OCTAL]` grammar: NAME is 1-255
/// printable ASCII characters without `:`, `=` or `,`, and not
/// `baton-probe` (NAME alone names an inherited socket); ADDRESS is
/// `IP:PORT`, `[IPv6]:PORT`, `udp:` followed by either of those, or
/// `unix:/absolute` (at most 107 bytes, the size of sun_path less its
/// NUL); options are `mode=` with an octal file mode up to 0777.
fn reference_listen(s: &str) -> Option<(String, ListenAddr, Option<u32>)> {
    let name_ok = |name: &str| {
        (1..=255).contains(&name.len())
            && name
                .bytes()
                .all(|b| (b'!'..=b'~').contains(&b) && !b":=,".contains(&b))
            && name != "baton-probe"
    };
    let Some((name, rest)) = s.split_once('=') else {
        // NAME alone: the inherited socket of that name.
        return name_ok(s).then(|| (s.to_owned(), ListenAddr::Inherited, None));
    };
    let name_ok = name_ok(name);
    let mut parts = rest.split(',');
    let addr = parts.next()?;
    let address = match addr.strip_prefix("unix:") {
        Some(p) if p.starts_with('/') && p.len() <= 107 => ListenAddr::Unix(PathBuf::from(p)),
        Some(_) => return None,
        None => match addr.strip_prefix("udp:") {
            Some(a) => ListenAddr::Udp(a.parse().ok()?),
            None => ListenAddr::Tcp(addr.parse().ok()?),
        },
    };
    let mut mode = None;
    for opt in parts {
        let m = opt.strip_prefix("mode=")?;
        mode = Some(u32::from_str_radix(m, 8).ok().filter(|m| *m <= 0o777)?);
    }
    name_ok.then(|| (name.to_owned(), address, mode))
}

fn format_listen(spec: &ListenSpec) -> String {
    if spec.address == ListenAddr::Inherited {
        return spec.name.clone();
    }
    match spec.mode {
        Some(m) => format!("{}={},mode={m:04o}", spec.name, spec.address),
        None => format!("{}={}", spec.name, spec.address),
    }
}

fn valid_listen_spec() -> impl Strategy<Value = ListenSpec> {
    let tcp = (any::<std::net::IpAddr>(), any::<u16>())
        .prop_map(|(ip, port)| ListenAddr::Tcp(SocketAddr::new(ip, port)));
    let unix = "(/[^\u{0},/]{1,20}){1,4}"
        .prop_filter("sun_path", |p| p.len() <= 107)
        .prop_map(|p| ListenAddr::Unix(PathBuf::from(p)));
    let udp = (any::<std::net::IpAddr>(), any::<u16>())
        .prop_map(|(ip, port)| ListenAddr::Udp(SocketAddr::new(ip, port)));
    (
        listen_name(),
        prop_oneof![tcp, unix, udp],
        prop::option::of(0..=0o777u32),
    )
        .prop_map(|(name, address, mode)| ListenSpec {
            name,
            address,
            mode,
        })
}

/// Listener specs near the grammar's edges.
fn listen_like() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        listen_name(),
        Just(String::new()),
        Just("baton-probe".to_owned()),
        Just("a:b".to_owned()),
        Just("caf\u{e9}".to_owned()),
        Just("x".repeat(256)),
        Just("x".repeat(255)),
    ];
    let addr = prop_oneof![
        any::<SocketAddr>().prop_map(|a| a.to_string()),
        Just("127.0.0.1".to_owned()),
        Just("localhost:80".to_owned()),
        Just("[::1]:99999".to_owned()),
        Just("unix:".to_owned()),
        Just("unix:rel".to_owned()),
        any::<SocketAddr>().prop_map(|a| format!("udp:{a}")),
        Just("udp:".to_owned()),
        Just("udp:[::1]:99999".to_owned()),
        Just("udp:unix:/x".to_owned()),
        Just("udp:udp:127.0.0.1:1".to_owned()),
        "unix:/[a-z]{1,8}",
        Just(format!("unix:/{}", "p".repeat(106))),
        Just(format!("unix:/{}", "p".repeat(107))),
        ".{0,12}",
    ];
    let opts = prop::collection::vec(
        prop_oneof![
            (0..0o1777u32).prop_map(|m| format!("mode={m:o}")),
            Just("mode=".to_owned()),
            Just("mode=+644".to_owned()),
            Just("mode=0x1".to_owned()),
            Just("colour=red".to_owned()),
            Just(String::new()),
        ],
        0..3,
    );
    (name, addr, opts).prop_map(|(n, a, o)| {
        let mut s = format!("{n}={a}");
        for opt in o {
            s = format!("{s},{opt}");
        }
        s
    })
}

/// The documented readiness checks: `notify`, `tcp`, `http:/PATH` (no
/// whitespace), `exec:COMMAND` (not blank), `delay:DURATION` (humantime,
/// surrounding whitespace allowed).
fn reference_ready(s: &str) -> Option<ReadySpec> {
    if s == "notify" {
        return Some(ReadySpec::Notify);
    }
    if s == "tcp" {
        return Some(ReadySpec::Tcp);
    }
    if let Some(p) = s.strip_prefix("http:") {
        return (p.starts_with('/') && !p.chars().any(char::is_whitespace))
            .then(|| ReadySpec::Http(p.to_owned()));
    }
    if let Some(c) = s.strip_prefix("exec:") {
        return (!c.trim().is_empty()).then(|| ReadySpec::Exec(c.to_owned()));
    }
    if let Some(d) = s.strip_prefix("delay:") {
        return humantime::parse_duration(d.trim())
            .ok()
            .map(ReadySpec::Delay);
    }
    None
}

fn valid_ready() -> impl Strategy<Value = ReadySpec> {
    prop_oneof![
        Just(ReadySpec::Notify),
        Just(ReadySpec::Tcp),
        "/[!-~]{0,20}".prop_map(ReadySpec::Http),
        "[^\u{0}]{0,20}"
            .prop_filter("not blank", |c| !c.trim().is_empty())
            .prop_map(ReadySpec::Exec),
        (0..10 * 24 * 3600 * 1000u64).prop_map(|ms| ReadySpec::Delay(Duration::from_millis(ms))),
    ]
}

fn ready_like() -> impl Strategy<Value = String> {
    let kind = prop::sample::select(vec![
        "notify", "tcp", "http", "exec", "delay", "NOTIFY", "", "ping",
    ]);
    let arg = prop_oneof![
        Just(None),
        Just(Some(String::new())),
        "/[a-z ]{0,6}".prop_map(Some),
        Just(Some("healthz".to_owned())),
        Just(Some("  ".to_owned())),
        Just(Some(" 5s ".to_owned())),
        Just(Some("1h 2m".to_owned())),
        Just(Some("soon".to_owned())),
        "[0-9]{1,4}(ms|s|m|h)".prop_map(Some),
        ".{0,10}".prop_map(Some),
    ];
    (kind, arg).prop_map(|(k, a)| match a {
        Some(a) => format!("{k}:{a}"),
        None => k.to_owned(),
    })
}

/// The documented signal syntax: a name with or without `SIG`, in any
/// case, or a number, with surrounding whitespace; SIGKILL and SIGSTOP
/// (which cannot be caught, so cannot start a drain) are refused.
fn reference_signal(s: &str) -> Option<Signal> {
    let t = s.trim().to_ascii_uppercase();
    let sig = match t.parse::<i32>() {
        Ok(n) => Signal::iterator().find(|sig| *sig as i32 == n)?,
        Err(_) => {
            let full = if t.starts_with("SIG") {
                t
            } else {
                format!("SIG{t}")
            };
            Signal::iterator().find(|sig| sig.as_str() == full)?
        }
    };
    (!matches!(sig, Signal::SIGKILL | Signal::SIGSTOP)).then_some(sig)
}

fn signal_like() -> impl Strategy<Value = String> {
    let names: Vec<String> = Signal::iterator()
        .map(|s| s.as_str().to_owned())
        .chain(["SIGNOPE", "SIG", "", "IOT", "SIGPOLL"].map(String::from))
        .collect();
    let base = prop_oneof![
        prop::sample::select(names.clone()),
        prop::sample::select(names).prop_map(|n| n.trim_start_matches("SIG").to_owned()),
        (-2..70i32).prop_map(|n| n.to_string()),
        Just("+15".to_owned()),
        ".{0,8}",
    ];
    let pad = prop::sample::select(vec!["", " ", "\t", "\u{a0}"]);
    (base, any::<bool>(), pad.clone(), pad).prop_map(|(b, lower, l, r)| {
        let b = if lower { b.to_ascii_lowercase() } else { b };
        format!("{l}{b}{r}")
    })
}

// ----- sd_notify ---------------------------------------------------------------

/// The sd_notify grammar, written independently of `notify::parse`: split
/// the datagram's bytes at `\n`, each line at its first `=`, decode the
/// value (invalid UTF-8 replaced); READY/STOPPING/RELOADING count only as
/// `=1`, STATUS keeps its first 512 characters, MAINPID needs a positive
/// pid; every other key is ignored.
fn reference_notify(datagram: &[u8]) -> Vec<NotifyMessage> {
    let mut out = Vec::new();
    for line in datagram.split(|b| *b == b'\n') {
        let Some(eq) = line.iter().position(|b| *b == b'=') else {
            continue;
        };
        let (key, value) = (&line[..eq], String::from_utf8_lossy(&line[eq + 1..]));
        let flag = value == "1";
        match key {
            b"READY" if flag => out.push(NotifyMessage::Ready),
            b"STOPPING" if flag => out.push(NotifyMessage::Stopping),
            b"RELOADING" if flag => out.push(NotifyMessage::Reloading),
            b"STATUS" => out.push(NotifyMessage::Status(value.chars().take(512).collect())),
            b"MAINPID" => out.extend(
                value
                    .parse::<i32>()
                    .ok()
                    .filter(|p| *p > 0)
                    .map(NotifyMessage::MainPid),
            ),
            _ => {}
        }
    }
    out
}

/// Datagrams built from keys, values (long, multi-byte, invalid UTF-8) and
/// separators.
fn notify_like() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        prop::sample::select(vec![
            "READY",
            "STATUS",
            "STOPPING",
            "RELOADING",
            "MAINPID",
            "WATCHDOG",
            "FDSTORE",
            "ready",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        prop::sample::select(vec![
            "=",
            "=1",
            "\n",
            "\r",
            "0",
            "-5",
            "+7",
            "2147483648",
            "caf\u{e9}"
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        prop::sample::select(vec![vec![0xffu8], vec![0xc3], vec![0xe2, 0x82], vec![0]]),
        (
            0..700usize,
            prop::sample::select(vec!["x", "\u{e9}", "\u{1f600}"])
        )
            .prop_map(|(n, c)| c.repeat(n).into_bytes()),
        prop::collection::vec(any::<u8>(), 0..8),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|p| p.concat())
}

proptest! {
    #[test]
    fn request_encodes_and_decodes_to_itself(r in any_request()) {
        let json = serde_json::to_vec(&r).unwrap();
        let back: Request = serde_json::from_slice(&json).unwrap();
        prop_assert_eq!(&back, &r);
        // And the encoding is in the documented grammar.
        prop_assert_eq!(documented_request(&json), Some(r));
    }

    #[test]
    fn request_decoder_agrees_with_the_documented_grammar(body in request_like_json()) {
        let got = serde_json::from_slice::<Request>(body.as_bytes()).ok();
        prop_assert_eq!(got, expected_request(body.as_bytes()), "body: {}", body);
    }

    #[test]
    fn request_decoder_agrees_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let got = serde_json::from_slice::<Request>(&bytes).ok();
        prop_assert_eq!(got, expected_request(&bytes));
    }

    #[test]
    fn config_file_keeps_every_value(m in config_model()) {
        let text = m.to_toml();
        let file = FileConfig::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let c = Config::merge(file, &Overrides::default(), Path::new("/base"))
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&c.command, &m.command);
        prop_assert_eq!(&c.cwd, &Path::new("/base").join(m.cwd.as_deref().unwrap_or(".")));
        prop_assert_eq!(&c.ready, m.ready.as_ref().unwrap_or(&ReadySpec::Notify));
        prop_assert_eq!(
            c.ready_timeout,
            m.ready_timeout_ms.map_or(baton::config::DEFAULT_READY_TIMEOUT, Duration::from_millis)
        );
        prop_assert_eq!(c.drain_signal.0, m.drain_signal.unwrap_or(Signal::SIGTERM));
        prop_assert_eq!(
            c.drain_timeout,
            m.drain_timeout_ms.map_or(baton::config::DEFAULT_DRAIN_TIMEOUT, Duration::from_millis)
        );
        prop_assert_eq!(c.backlog, m.backlog.unwrap_or(baton::config::DEFAULT_BACKLOG));
        prop_assert_eq!(&c.env, &m.env);
        let inherit = match &m.env_inherit {
            Some(names) => baton::config::EnvInherit::Only(names.clone()),
            None => baton::config::EnvInherit::All(true),
        };
        prop_assert_eq!(&c.env_inherit, &inherit);
        let listen: Vec<(String, ListenAddr)> = c
            .listen
            .iter()
            .map(|l| (l.name.clone(), l.address.clone()))
            .collect();
        let expect: Vec<(String, ListenAddr)> = m
            .listen
            .iter()
            .map(|(n, a)| (n.clone(), ListenAddr::Tcp(*a)))
            .collect();
        prop_assert_eq!(listen, expect);
        prop_assert_eq!(&c.control_allow_uids, &m.allow_uids);
        prop_assert_eq!(c.workers, m.workers.unwrap_or(1));
    }

    #[test]
    fn config_errors_are_one_line_and_point_into_the_text(text in near_valid_toml()) {
        if let Err(e) = FileConfig::parse(&text) {
            check_config_error(&text, &e)?;
        }
    }

    #[test]
    fn config_errors_on_arbitrary_text(text in ".{0,200}") {
        if let Err(e) = FileConfig::parse(&text) {
            check_config_error(&text, &e)?;
        }
    }

    #[test]
    fn listen_spec_round_trips(spec in valid_listen_spec()) {
        let text = format_listen(&spec);
        prop_assert_eq!(ListenSpec::from_str(&text), Ok(spec), "{}", text);
    }

    #[test]
    fn listen_parser_agrees_with_the_reference(s in prop_oneof![listen_like(), ".{0,64}".boxed()]) {
        let got = ListenSpec::from_str(&s).ok();
        let expect = reference_listen(&s).map(|(name, address, mode)| ListenSpec { name, address, mode });
        prop_assert_eq!(&got, &expect, "{:?}", s);
        if let Some(spec) = got {
            prop_assert_eq!(ListenSpec::from_str(&format_listen(&spec)), Ok(spec));
        }
    }

    #[test]
    fn ready_spec_round_trips(r in valid_ready()) {
        prop_assert_eq!(ReadySpec::from_str(&r.to_string()), Ok(r));
    }

    #[test]
    fn ready_parser_agrees_with_the_reference(s in prop_oneof![ready_like(), ".{0,32}".boxed()]) {
        let got = ReadySpec::from_str(&s).ok();
        prop_assert_eq!(&got, &reference_ready(&s), "{:?}", s);
        if let Some(r) = got {
            prop_assert_eq!(ReadySpec::from_str(&r.to_string()), Ok(r));
        }
    }

    #[test]
    fn signal_parser_agrees_with_the_reference(s in signal_like()) {
        let got = SignalSpec::from_str(&s).ok().map(|s| s.0);
        prop_assert_eq!(got, reference_signal(&s), "{:?}", s);
    }

    #[test]
    fn notify_parser_agrees_with_the_reference(bytes in notify_like()) {
        prop_assert_eq!(baton::notify::parse(&bytes), reference_notify(&bytes));
    }

    #[test]
    fn notify_parser_agrees_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        prop_assert_eq!(baton::notify::parse(&bytes), reference_notify(&bytes));
    }
}

/// Every catchable signal's name round-trips; SIGKILL and SIGSTOP are
/// refused under every spelling.
#[test]
fn every_signal_round_trips() {
    for sig in Signal::iterator() {
        let name = String::from(SignalSpec(sig));
        let forms = [
            name.clone(),
            name.trim_start_matches("SIG").to_owned(),
            name.to_ascii_lowercase(),
            (sig as i32).to_string(),
        ];
        for form in forms {
            let got = SignalSpec::from_str(&form).map(|s| s.0);
            if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
                assert!(got.is_err(), "{form} accepted");
            } else {
                assert_eq!(got, Ok(sig), "{form}");
            }
        }
    }
}

/// The reference grammars are not vacuous: they accept and refuse what
/// the documentation's examples say.
#[test]
fn references_follow_the_documented_examples() {
    assert_eq!(
        documented_request(br#"{"cmd":"upgrade","wait_drain":true}"#),
        Some(Request::upgrade(true))
    );
    assert_eq!(
        documented_request(br#"{"cmd":"status"}"#),
        Some(Request::Status)
    );
    assert_eq!(documented_request(br#"{"cmd":"upgrade","force":1}"#), None);
    assert_eq!(documented_request(br#"{"cmd":"status","x":1}"#), None);
    assert_eq!(documented_request(br#"["status"]"#), None);
    assert_eq!(
        documented_request(br#"{"cmd":"status","cmd":"status"}"#),
        None
    );
    assert!(reference_listen("admin=unix:/run/app/admin.sock,mode=0660").is_some());
    assert!(reference_listen("api=[::1]:9000").is_some());
    assert!(reference_listen("dns=udp:[::1]:53").is_some());
    assert!(reference_listen("dns=udp:localhost:53").is_none());
    assert!(reference_listen("baton-probe=127.0.0.1:1").is_none());
    assert_eq!(
        reference_ready("http:/healthz"),
        Some(ReadySpec::Http("/healthz".into()))
    );
    assert_eq!(reference_signal(" quit "), Some(Signal::SIGQUIT));
    assert_eq!(reference_signal("SIGKILL"), None);
    assert_eq!(
        reference_notify(b"READY=1\nSTATUS=x\nWATCHDOG=1"),
        vec![NotifyMessage::Ready, NotifyMessage::Status("x".into())]
    );
}

/// docs/protocol.md: "Unknown commands or fields are refused". Today
/// docs/protocol.md: unknown fields are refused for every command,
/// `status` and `stop` included (serde would not apply
/// `deny_unknown_fields` to unit variants of an internally tagged enum).
#[test]
fn documented_refusals_unknown_fields_on_status_and_stop() {
    for body in [
        r#"{"cmd":"status","x":1}"#,
        r#"{"cmd":"stop","wait_drain":true}"#,
    ] {
        assert!(
            serde_json::from_str::<Request>(body).is_err(),
            "{body} accepted"
        );
    }
}

/// docs/protocol.md: a request is a JSON object; serde's sequence form
/// (which its derive accepts) is refused.
#[test]
fn documented_refusals_arrays() {
    for body in [r#"["status"]"#, r#"["upgrade",true]"#] {
        assert!(
            serde_json::from_str::<Request>(body).is_err(),
            "{body} accepted"
        );
    }
}
