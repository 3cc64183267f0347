//! The control protocol's messages. Transport: HTTP/1.1 over the control
//! Unix socket; `POST /v1/request` with one JSON [`Request`] as the body,
//! answered by newline-delimited JSON [`Reply`] values (one for `status`
//! and `stop`, a stream of events ending in `done` for `upgrade` and
//! `rollback`). See docs/protocol.md.

use serde::{Deserialize, Serialize};

pub const REQUEST_PATH: &str = "/v1/request";
/// Larger request bodies are refused (413): requests are tiny.
pub const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// A request: one JSON object with a `cmd` key. Unknown commands, unknown
/// fields (for every command) and anything but an object are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Re-read the configuration and start a new generation from it.
    Upgrade {
        /// Keep streaming until the generations it retires have exited.
        #[serde(default)]
        wait_drain: bool,
        /// End the stream once the new generation is active, without
        /// waiting for its bake.
        #[serde(default)]
        no_wait: bool,
        /// Percent of new connections (0-100) the ready candidate takes;
        /// the upgrade then waits for `promote` or `rollback`, and the
        /// stream ends once the canary runs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary: Option<u8>,
        /// Promote a canary that stayed healthy this long.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        canary_for_ms: Option<u64>,
        /// This upgrade's bake window, instead of the configured one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bake_ms: Option<u64>,
    },
    /// During a canary or a bake: the traffic goes back to the previous
    /// generation's processes at once. Otherwise: start the previous
    /// successful release as a new generation.
    Rollback {
        #[serde(default)]
        wait_drain: bool,
    },
    /// During a canary: cut over to the candidate. During a bake: end it.
    Promote {
        #[serde(default)]
        wait_drain: bool,
        #[serde(default)]
        no_wait: bool,
    },
    /// Drain every generation and exit.
    Stop,
    /// Re-execute baton's own binary in place (same pid), handing over
    /// every socket, process and its state.
    UpgradeSelf,
}

impl Request {
    /// A plain upgrade with none of the steering options.
    pub fn upgrade(wait_drain: bool) -> Self {
        Self::Upgrade {
            wait_drain,
            no_wait: false,
            canary: None,
            canary_for_ms: None,
            bake_ms: None,
        }
    }
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Taking a map first refuses arrays, which serde's derive for
        // internally tagged enums would accept (`["upgrade", true]`), and
        // duplicate keys, which a plain map would resolve silently (last
        // one wins) where the documented grammar refuses them.
        let UniqueKeys(map) = UniqueKeys::deserialize(d)?;
        WireRequest::deserialize(serde_json::Value::Object(map))
            .map(Request::from)
            .map_err(serde::de::Error::custom)
    }
}

/// A JSON object in which no key appears twice.
struct UniqueKeys(serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut map = serde_json::Map::new();
                while let Some((k, v)) = a.next_entry::<String, serde_json::Value>()? {
                    if map.contains_key(&k) {
                        return Err(serde::de::Error::custom(format_args!(
                            "duplicate key `{k}`"
                        )));
                    }
                    map.insert(k, v);
                }
                Ok(UniqueKeys(map))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// The decoding form of [`Request`]: `status` and `stop` are empty struct
/// variants because serde applies `deny_unknown_fields` to struct variants
/// of an internally tagged enum but not to unit ones.
#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
enum WireRequest {
    Status {},
    Upgrade {
        #[serde(default)]
        wait_drain: bool,
        #[serde(default)]
        no_wait: bool,
        #[serde(default)]
        canary: Option<u8>,
        #[serde(default)]
        canary_for_ms: Option<u64>,
        #[serde(default)]
        bake_ms: Option<u64>,
    },
    Rollback {
        #[serde(default)]
        wait_drain: bool,
    },
    Promote {
        #[serde(default)]
        wait_drain: bool,
        #[serde(default)]
        no_wait: bool,
    },
    Stop {},
    UpgradeSelf {},
}

impl From<WireRequest> for Request {
    fn from(r: WireRequest) -> Self {
        match r {
            WireRequest::Status {} => Self::Status,
            WireRequest::Upgrade {
                wait_drain,
                no_wait,
                canary,
                canary_for_ms,
                bake_ms,
            } => Self::Upgrade {
                wait_drain,
                no_wait,
                canary,
                canary_for_ms,
                bake_ms,
            },
            WireRequest::Rollback { wait_drain } => Self::Rollback { wait_drain },
            WireRequest::Promote {
                wait_drain,
                no_wait,
            } => Self::Promote {
                wait_drain,
                no_wait,
            },
            WireRequest::Stop {} => Self::Stop,
            WireRequest::UpgradeSelf {} => Self::UpgradeSelf,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Status(Status),
    Event(Event),
    /// Last line of an upgrade or rollback stream.
    Done(Outcome),
    /// Answer to `stop`: draining has begun.
    Stopping,
    /// Answer to `upgrade_self`: the new binary passed its check and baton
    /// is re-executing it now. The connection then closes; the new baton
    /// reports `handovers` one higher in `status`.
    HandingOver(HandingOver),
    Error(ErrorReply),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandingOver {
    /// The binary being executed.
    pub exe: String,
    /// The hand-over number the new baton will report.
    pub handover: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is malformed (bad JSON, unknown field, too big).
    BadRequest,
    /// Another upgrade or rollback is in progress.
    Busy,
    /// The supervisor is stopping.
    Stopping,
    /// The configuration file could not be used.
    Config,
    /// Nothing to roll back to.
    NoPrevious,
    /// No canary or bake to promote.
    NothingToPromote,
    /// The request needs steered traffic (a canary), which this baton
    /// does not have.
    NeedsSteering,
    /// The request needs two generations at once (a canary, a bake), which
    /// an upgrade without overlap never runs.
    NeedsOverlap,
    /// The client's uid is not allowed.
    Forbidden,
    /// baton cannot upgrade itself now (the binary is missing, not
    /// executable or incompatible, or an upgrade is under way); the old
    /// baton keeps running.
    SelfUpgrade,
}

/// How an upgrade ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub upgrade: u64,
    pub success: bool,
    /// The generation that is active at the end (the new one on success).
    pub active: Option<u64>,
    /// Microseconds from the request to success or failure.
    pub elapsed_us: u64,
    pub reason: Option<String>,
    /// Last lines the failed candidate wrote to stderr.
    #[serde(default)]
    pub stderr_tail: Vec<String>,
    /// True when the configuration was at fault (the CLI exits 2).
    #[serde(default)]
    pub config_error: bool,
}

/// A lifecycle event, published only once it is true.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Wall-clock time, microseconds since the Unix epoch.
    pub time_us: u64,
    pub generation: u64,
    /// The upgrade this event belongs to, if any (its candidate's number).
    pub upgrade: Option<u64>,
    /// Microseconds since that upgrade was requested.
    pub elapsed_us: Option<u64>,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    UpgradeRequested {
        trigger: Trigger,
    },
    /// The process was exec'd.
    Spawned {
        pid: i32,
        dir: String,
        /// Which worker it is, when the generation runs more than one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker: Option<u32>,
    },
    SpawnFailed {
        error: String,
    },
    /// Every worker of the generation is ready (`pid` was the last).
    Ready {
        pid: i32,
        via: String,
    },
    /// A worker restarted alone, while the others served, is ready again.
    WorkerReady {
        worker: u32,
        pid: i32,
        via: String,
    },
    /// The generation is the one restarted on crash and kept on stop;
    /// with shared sockets it is the only one accepting new connections.
    Active {
        pid: Option<i32>,
    },
    /// The candidate is ready and takes `share` percent of new
    /// connections; the upgrade waits for promote or rollback.
    Canary {
        share: u8,
    },
    /// The cutover is done; `parked` (the previous generation) stays ready
    /// to take the traffic back for `bake_ms`.
    Bake {
        parked: u64,
        bake_ms: u64,
    },
    /// The traffic went back to generation `to`; this one is retired.
    RolledBack {
        to: u64,
        reason: String,
    },
    /// Who receives new connections changed (applied before this event).
    Traffic {
        active: Option<u64>,
        candidate: Option<u64>,
        /// The candidate's percent of new connections (0: dark).
        share: u8,
        parked: Option<u64>,
    },
    /// The generation gets no new connections any more; it is drained once
    /// what waits in its sockets has been accepted.
    Retiring {
        pid: i32,
    },
    /// The drain signal was sent to the generation's process group.
    Draining {
        pid: i32,
        signal: String,
    },
    /// The drain timeout expired; SIGKILL was sent to the process group.
    Killed {
        pid: i32,
    },
    Exited {
        pid: i32,
        status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker: Option<u32>,
    },
    /// A worker starts again after `delay_ms`: its `restarts`th restart.
    Restarting {
        delay_ms: u64,
        restarts: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker: Option<u32>,
    },
    Status {
        text: String,
    },
    Stopping {
        pid: i32,
    },
    UpgradeSucceeded,
    UpgradeFailed {
        reason: String,
        stderr_tail: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Start,
    Control,
    Signal,
    Rollback,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub version: String,
    /// The binary this baton runs, as it was when started.
    #[serde(default)]
    pub binary: Binary,
    /// How many times this baton upgraded itself in place (same pid).
    #[serde(default)]
    pub handovers: u64,
    /// Why the last self-upgrade failed after it was accepted, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_upgrade_error: Option<String>,
    pub uptime_ms: u64,
    pub stopping: bool,
    pub sockets: Vec<SocketStatus>,
    /// `steered` (a socket per generation, the kernel picks) or `shared`.
    #[serde(default)]
    pub traffic: String,
    pub active: Option<u64>,
    /// The candidate of the upgrade in progress, if any.
    pub upgrading: Option<u64>,
    pub generations: Vec<GenerationStatus>,
    /// The releases root, when baton runs with one (`releases_dir`): what
    /// `baton deploy` unpacks into and prunes. Absent from older
    /// supervisors, hence the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub releases: Option<ReleasesStatus>,
    /// The release directory `baton rollback` would start (outside a
    /// canary or a bake): the previous successful one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_to: Option<String>,
}

/// Where releases live, for the clients that manage them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasesStatus {
    /// The releases root: `DIR/releases/NAME`, `DIR/current`.
    pub dir: String,
    /// How many releases `baton deploy` keeps (`keep_releases`).
    pub keep: u32,
}

/// A binary's identity: its path and what its file looked like when it
/// was started (a replaced build differs in size or time).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binary {
    pub path: String,
    pub size: u64,
    /// Modification time, microseconds since the Unix epoch.
    pub modified_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketStatus {
    pub name: String,
    /// `IP:PORT`, `udp:IP:PORT` or `unix:/path`.
    pub address: String,
    pub fd: u32,
    /// A socket per generation, the kernel choosing (TCP with steered
    /// traffic); false: one socket every generation shares (Unix, UDP,
    /// `traffic = "shared"`).
    #[serde(default)]
    pub steered: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GenState {
    /// Not started yet: it waits for the previous generation to exit (an
    /// upgrade without overlap). Connections queue for it.
    Waiting,
    /// Spawned (or restarting), not yet ready.
    Starting,
    /// Passed its readiness check; about to become active.
    Ready,
    /// The generation receiving new traffic.
    Active,
    /// Gets no new connections; accepting what waits in its sockets, to
    /// be drained once they are empty.
    Retiring,
    /// Told to stop; finishing in-flight work.
    Draining,
    /// Gone after serving or draining.
    Exited,
    /// A candidate that never became ready (its process is gone).
    Failed,
}

impl GenState {
    /// Its name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Active => "active",
            Self::Retiring => "retiring",
            Self::Draining => "draining",
            Self::Exited => "exited",
            Self::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationStatus {
    pub number: u64,
    pub state: GenState,
    /// The first running worker's pid.
    pub pid: Option<i32>,
    /// Every live process in the process groups of the generation's
    /// workers.
    pub pids: Vec<i32>,
    pub dir: String,
    pub command: Vec<String>,
    pub uptime_ms: Option<u64>,
    pub status_text: Option<String>,
    /// Crash restarts, of all its workers.
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// Each worker, by index (`--workers`).
    #[serde(default)]
    pub workers: Vec<WorkerStatus>,
    /// Its part in the traffic plan, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// Percent of new connections it gets (0 for a dark candidate or a
    /// parked generation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<u8>,
    /// The CPU priority its workers run at when baton lowered them (`idle`,
    /// `batch`, `nice:N`; the first lowered worker's): an upgrade's
    /// candidate until it is ready, or one with a worker whose restore
    /// failed. Absent at the normal priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
}

/// One worker of a generation: a process (its own process group) on the
/// generation's sockets, restarted alone if it crashes while it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// 0, 1, … (the app sees it as `BATON_WORKER`).
    pub index: u32,
    pub state: WorkerState,
    /// Its running process, if any.
    pub pid: Option<i32>,
    pub uptime_ms: Option<u64>,
    pub restarts: u32,
    pub last_exit: Option<String>,
    /// The CPU priority its process runs at when baton lowered it (`idle`,
    /// `batch`, `nice:N`): a worker of an upgrade's candidate until the
    /// candidate is ready, or one whose restore failed. Absent at the
    /// normal priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Its generation has not started yet: it waits for the previous one
    /// to exit (an upgrade without overlap).
    Waiting,
    /// Being started, or running and not yet ready.
    Starting,
    Ready,
    /// Its process died; it starts again after a backoff.
    Restarting,
    /// Its generation gets no new connections; it accepts what is queued.
    Retiring,
    /// Told to stop (or, not ready in time, to be restarted).
    Draining,
    /// Gone.
    Exited,
}

impl WorkerState {
    /// Its name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Starting => "starting",
            Self::Ready => "ready",
            Self::Restarting => "restarting",
            Self::Retiring => "retiring",
            Self::Draining => "draining",
            Self::Exited => "exited",
        }
    }
}

/// A generation's part in the traffic plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Gets new connections (all of them, or all but a canary's share).
    Active,
    /// Being brought in: baton's probes, and a canary share if any.
    Candidate,
    /// The previous generation during a bake: running, getting nothing
    /// new, ready to take the traffic back.
    Parked,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_their_json_names() {
        use GenState::*;
        for s in [
            Waiting, Starting, Ready, Active, Retiring, Draining, Exited, Failed,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        use WorkerState as W;
        for s in [
            W::Waiting,
            W::Starting,
            W::Ready,
            W::Restarting,
            W::Retiring,
            W::Draining,
            W::Exited,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn request_json() {
        let r: Request = serde_json::from_str(r#"{"cmd":"upgrade"}"#).unwrap();
        assert_eq!(r, Request::upgrade(false));
        let r: Request =
            serde_json::from_str(r#"{"cmd":"upgrade","canary":10,"bake_ms":60000}"#).unwrap();
        assert!(matches!(
            r,
            Request::Upgrade {
                canary: Some(10),
                bake_ms: Some(60000),
                ..
            }
        ));
        let r: Request = serde_json::from_str(r#"{"cmd":"promote"}"#).unwrap();
        assert_eq!(
            r,
            Request::Promote {
                wait_drain: false,
                no_wait: false
            }
        );
        let r: Request = serde_json::from_str(r#"{"cmd":"rollback","wait_drain":true}"#).unwrap();
        assert_eq!(r, Request::Rollback { wait_drain: true });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"upgrade","force":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{}"#).is_err());
        // A repeated key is refused, not resolved to its last value.
        let dup = serde_json::from_str::<Request>(r#"{"cmd":"status","cmd":"status"}"#);
        assert!(dup.unwrap_err().to_string().contains("duplicate key `cmd`"));
        let dup = r#"{"cmd":"upgrade","canary":5,"canary":50}"#;
        assert!(serde_json::from_str::<Request>(dup).is_err());
        let r: Request = serde_json::from_str(r#"{"cmd":"upgrade_self"}"#).unwrap();
        assert_eq!(r, Request::UpgradeSelf);
    }

    /// A status from a supervisor that predates the releases fields still
    /// parses, and the fields are left out when unset.
    #[test]
    fn status_releases_fields_are_optional() {
        let old = r#"{"pid":1,"version":"0.1.0","uptime_ms":5,"stopping":false,"sockets":[],
            "traffic":"steered","active":1,"upgrading":null,"generations":[]}"#;
        let s: Status = serde_json::from_str(old).unwrap();
        assert_eq!((&s.releases, &s.rollback_to), (&None, &None));
        let v = serde_json::to_value(&s).unwrap();
        assert!(
            v.get("releases").is_none() && v.get("rollback_to").is_none(),
            "{v}"
        );
    }

    #[test]
    fn event_json_is_flat() {
        let e = Event {
            time_us: 1,
            generation: 2,
            upgrade: Some(2),
            elapsed_us: Some(5),
            kind: EventKind::Ready {
                pid: 10,
                via: "notify".into(),
            },
        };
        let v = serde_json::to_value(Reply::Event(e.clone())).unwrap();
        assert_eq!(v["type"], "event");
        assert_eq!(v["event"], "ready");
        assert_eq!(v["pid"], 10);
        let back: Reply = serde_json::from_value(v).unwrap();
        assert_eq!(back, Reply::Event(e));
    }
}
