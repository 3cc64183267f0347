//! Property-based fuzzing of every parser that takes outside input: the
//! control-request decoder, the config file parser, the listen-address
//! parser and the sd_notify message parser. They must never panic, and
//! their errors stay one line.
//!
//! CI runs the default number of cases; a longer run:
//! `PROPTEST_CASES=100000 cargo test --release -p baton --test fuzz`
//! (results are recorded in docs/guarantees.md).
#![allow(clippy::unwrap_used)]

use std::str::FromStr;

use baton::config::{FileConfig, ListenSpec, ReadySpec, SignalSpec};
use baton::protocol::Request;
use proptest::prelude::*;

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

proptest! {
    #[test]
    fn request_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = serde_json::from_slice::<Request>(&bytes);
    }

    #[test]
    fn request_decoder_on_json_shapes(
        cmd in prop::sample::select(vec!["status", "upgrade", "rollback", "stop", "", "UPGRADE"]),
        extra in prop::option::of(("[a-z_]{1,10}", prop_oneof![Just("true"), Just("1"), Just("null"), Just("\"x\"")])),
    ) {
        let body = match &extra {
            Some((k, v)) => format!(r#"{{"cmd":"{cmd}","{k}":{v}}}"#),
            None => format!(r#"{{"cmd":"{cmd}"}}"#),
        };
        if let Ok(r) = serde_json::from_str::<Request>(&body) {
            // Whatever decodes re-encodes to the same request.
            let again: Request = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            prop_assert_eq!(r, again);
        }
    }

    #[test]
    fn config_parser_never_panics_and_errors_are_one_line(text in near_valid_toml()) {
        if let Err(e) = FileConfig::parse(&text) {
            prop_assert!(!e.contains('\n'), "multi-line error: {e}");
        }
    }

    #[test]
    fn config_parser_on_arbitrary_text(text in ".{0,200}") {
        if let Err(e) = FileConfig::parse(&text) {
            prop_assert!(!e.contains('\n'), "multi-line error: {e}");
        }
    }

    #[test]
    fn address_parser_never_panics(s in ".{0,64}") {
        let _ = ListenSpec::from_str(&s);
        let _ = ReadySpec::from_str(&s);
        let _ = SignalSpec::from_str(&s);
    }

    #[test]
    fn valid_addresses_round_trip(
        name in "[a-z][a-z0-9_-]{0,10}",
        ip in prop_oneof![any::<std::net::Ipv4Addr>().prop_map(std::net::IpAddr::V4), any::<std::net::Ipv6Addr>().prop_map(std::net::IpAddr::V6)],
        port in any::<u16>(),
    ) {
        prop_assume!(name != "baton-probe");
        let addr = std::net::SocketAddr::new(ip, port);
        let spec = ListenSpec::from_str(&format!("{name}={addr}")).unwrap();
        let again = ListenSpec::from_str(&format!("{}={}", spec.name, spec.address)).unwrap();
        prop_assert_eq!(spec, again);
    }

    #[test]
    fn notify_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        for m in baton::notify::parse(&bytes) {
            if let baton::notify::NotifyMessage::Status(s) = m {
                prop_assert!(s.chars().count() <= 512);
            }
        }
    }

    #[test]
    fn notify_parser_on_assignments(lines in prop::collection::vec(
        (prop::sample::select(vec!["READY", "STATUS", "STOPPING", "MAINPID", "WATCHDOG", "X"]), ".{0,20}"), 0..8)) {
        let text: String = lines.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        let _ = baton::notify::parse(text.as_bytes());
    }
}
