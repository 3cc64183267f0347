//! `--json` for `upgrade`, `rollback`, `promote` and `deploy`: one JSON
//! object on stdout at the end, whatever happened, for orchestrators
//! (Ansible registers it). Every key is always present (null when it does
//! not apply), so a playbook can read any of them. docs/fleet.md is the
//! contract.

use serde::ser::{Serialize, SerializeMap, Serializer};

use super::client::Streamed;
use super::CliError;

/// The phases of a request: event name → milliseconds since the request,
/// in the order they happened. Events of the request's own generation
/// are keyed by name (`ready`); those of other generations by name and
/// number (`draining:4`). The first of each key is kept.
#[derive(Debug, Default)]
pub struct Phases(Vec<(String, f64)>);

impl Phases {
    pub fn from_events(events: &[(String, u64, u64)], own: Option<u64>) -> Self {
        let mut out: Vec<(String, f64)> = Vec::new();
        for (name, gen, us) in events {
            let key = if Some(*gen) == own {
                name.clone()
            } else {
                format!("{name}:{gen}")
            };
            if !out.iter().any(|(k, _)| *k == key) {
                out.push((key, ms(*us)));
            }
        }
        Self(out)
    }
}

impl Serialize for Phases {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Milliseconds, to the microsecond.
fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    /// `upgrade`, `rollback`, `promote` or `deploy`.
    pub command: &'static str,
    /// `succeeded`, `failed` (the old generation still serves), `refused`
    /// (nothing was done: bad input, busy, unreachable) or `unknown` (the
    /// supervisor went away before telling).
    pub outcome: &'static str,
    /// The process's exit code: 0, 1 or 2.
    pub exit_code: u8,
    /// The generation the request started (its candidate).
    pub generation: Option<u64>,
    /// The generation active at the end.
    pub active: Option<u64>,
    /// The directory the request's generation started in.
    pub release: Option<String>,
    /// `deploy` (and a rollback within a releases root): the release's name.
    pub release_name: Option<String>,
    /// The active generation's directory at the end.
    pub active_release: Option<String>,
    /// With a releases root: where `current` points at the end.
    pub current: Option<String>,
    /// The canary share, when the request started a canary.
    pub canary: Option<u8>,
    pub elapsed_ms: Option<f64>,
    pub phases: Phases,
    /// Why it failed or was refused.
    pub reason: Option<String>,
    /// The failed generation's last stderr lines.
    pub stderr_tail: Vec<String>,
    /// `deploy`: releases removed by `keep_releases`.
    pub pruned: Vec<String>,
}

impl Report {
    pub fn from_stream(command: &'static str, s: &Streamed, canary: Option<u8>) -> Self {
        let o = &s.outcome;
        Self {
            command,
            outcome: if o.success { "succeeded" } else { "failed" },
            exit_code: s.code,
            generation: Some(o.upgrade),
            active: o.active,
            release: s.release.clone(),
            canary: canary.filter(|_| o.success),
            elapsed_ms: Some(ms(o.elapsed_us)),
            phases: Phases::from_events(&s.events, Some(o.upgrade)),
            reason: o.reason.clone(),
            stderr_tail: o.stderr_tail.clone(),
            ..Self::default()
        }
    }
}

/// Prints the report with `--json` (also for an error, as `refused` or
/// `unknown`), and gives the exit code.
pub fn finish(
    command: &'static str,
    json: bool,
    result: Result<Report, CliError>,
) -> Result<u8, CliError> {
    match result {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string(&report)?);
            }
            Ok(report.exit_code)
        }
        Err(e) => {
            if json {
                let report = Report {
                    command,
                    outcome: match e {
                        CliError::StreamEnded(_) => "unknown",
                        _ => "refused",
                    },
                    exit_code: e.exit_code(),
                    reason: Some(baton::error_chain(&e)),
                    ..Report::default()
                };
                println!("{}", serde_json::to_string(&report)?);
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_keep_order_and_tell_generations_apart() {
        let events = [
            ("upgrade_requested".to_owned(), 5, 0),
            ("spawned".to_owned(), 5, 1_200),
            ("ready".to_owned(), 5, 215_000),
            ("draining".to_owned(), 4, 215_500),
            ("traffic".to_owned(), 5, 215_100),
            ("traffic".to_owned(), 5, 216_000),
        ];
        let json = serde_json::to_string(&Phases::from_events(&events, Some(5))).unwrap();
        assert_eq!(
            json,
            r#"{"upgrade_requested":0.0,"spawned":1.2,"ready":215.0,"draining:4":215.5,"traffic":215.1}"#
        );
    }

    #[test]
    fn every_key_is_present() {
        let v = serde_json::to_value(Report::default()).unwrap();
        for key in [
            "command",
            "outcome",
            "exit_code",
            "generation",
            "active",
            "release",
            "release_name",
            "active_release",
            "current",
            "canary",
            "elapsed_ms",
            "phases",
            "reason",
            "stderr_tail",
            "pruned",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
    }
}
