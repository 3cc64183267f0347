//! Prometheus metrics, served at `/metrics` (`--metrics ADDR`).
//!
//! Counted where the shell steps the machine: [`Metrics::observe`] takes
//! each step's effects *before* the shell performs any of them, so no
//! reply, event on the control socket or log line is ever ahead of the
//! metrics. Nothing here decides anything: it counts the machine's events
//! and replies, times the spans between them with the machine's clock, and
//! keeps a snapshot of its generations for scrapes.
//!
//! A scrape reads counters (atomics) and the snapshot (swapped under a
//! mutex held for a pointer copy), so a slow or stuck scraper can never
//! hold the supervisor up. Memory and CPU are the one thing read at scrape
//! time, from /proc on a blocking thread: they change without any event.
//! docs/operations.md lists every metric.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_core::{
    Command, Effect, Event, EventKind, ExitStatus, Failure, GenId, Input, Machine, Pid, Refusal,
    Reply, RequestId, Time, Trigger,
};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::process::{self, ProcStat};
use crate::protocol::Role;
use crate::wire;

/// Bucket bounds of every duration histogram, in seconds: from a
/// sub-millisecond cutover to an hour-long bake.
const BUCKETS: [f64; 20] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// Scrapes served at once; more wait in the listen backlog, so scrapers
/// cannot take all of baton's descriptors.
const MAX_SCRAPES: usize = 8;
/// A scraper must send its request within this.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
#[error("binding the metrics address {addr}")]
pub struct BindError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics listener. Done before anything starts, so a bad
/// address costs nothing but baton's exit.
pub fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, BindError> {
    let err = |source| BindError { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    tokio::net::TcpListener::from_std(listener).map_err(err)
}

/// Serves `GET /metrics` until aborted; any other path is a 404.
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("metrics listener accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(respond(&req, registry).await) }
            });
            // One request per connection: nothing holds a permit idle.
            let _ = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(REQUEST_READ_TIMEOUT)
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn respond(req: &Request<Incoming>, registry: Arc<Registry>) -> Response<Full<Bytes>> {
    let reply = |status, content_type: &'static str, body: String| {
        let mut res = Response::new(Full::new(Bytes::from(body)));
        *res.status_mut() = status;
        res.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        res
    };
    if req.uri().path() != "/metrics" {
        let text = "not found: baton serves its metrics at /metrics\n".to_owned();
        return reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", text);
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let text = "only GET and HEAD\n".to_owned();
        let mut res = reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", text);
        res.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return res;
    }
    // Encoding reads /proc: off the runtime's threads.
    let encoded = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).map(|()| text)
    })
    .await;
    match encoded {
        Ok(Ok(text)) => reply(StatusCode::OK, CONTENT_TYPE, text),
        _ => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "encoding the metrics failed\n".to_owned(),
        ),
    }
}

// ----- labels ------------------------------------------------------------------

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    request: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RollbackLabels {
    trigger: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabels {
    how: &'static str,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GenLabels {
    generation: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GenInfoLabels {
    generation: u64,
    release: String,
    phase: &'static str,
    role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LastExitLabels {
    generation: u64,
    how: &'static str,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcLabels {
    generation: u64,
    worker: u32,
    pid: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerStateLabels {
    generation: u64,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

const OUTCOMES: [&str; 4] = ["succeeded", "failed", "rolled_back", "refused"];
const FAILURES: [&str; 8] = [
    "spawn",
    "exited",
    "timeout",
    "check",
    "died",
    "unhealthy",
    "rolled_back",
    "stopping",
];

// ----- what a step is about ------------------------------------------------------

/// What a request asked for, so its reply (in the same step) can be
/// counted by kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    Upgrade,
    Rollback,
    Promote,
}

impl Asked {
    /// The request an input carries, if it is one whose refusal counts.
    pub fn of<P>(input: &Input<P>) -> Option<(RequestId, Asked)> {
        let Input::Command { id, command } = input else {
            return None;
        };
        let asked = match command {
            Command::Upgrade { .. } => Asked::Upgrade,
            Command::Rollback => Asked::Rollback,
            Command::Promote => Asked::Promote,
            // Internal (a replaced socket) or not an upgrade.
            Command::Restart | Command::Stop => return None,
        };
        Some((*id, asked))
    }

    fn label(self) -> &'static str {
        match self {
            Asked::Upgrade => "upgrade",
            Asked::Rollback => "rollback",
            Asked::Promote => "promote",
        }
    }
}

/// The upgrade whose phases are being timed.
#[derive(Debug, Clone, Copy)]
struct Timing {
    candidate: GenId,
    requested: Time,
    spawned: bool,
    ready_at: Option<Time>,
    active: bool,
}

// ----- the metrics -----------------------------------------------------------------

pub struct Metrics {
    registry: Arc<Registry>,
    upgrades: Family<OutcomeLabels, Counter>,
    failures: Family<ReasonLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    rollbacks: Family<RollbackLabels, Counter>,
    restarts: Counter,
    exits: Family<ExitLabels, Counter>,
    kills: Counter,
    upgrade_seconds: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    phase_seconds: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    snapshot: Arc<Mutex<Arc<Snapshot>>>,
    timing: Option<Timing>,
    /// When each process was retired, and told to drain.
    retiring_at: HashMap<Pid, Time>,
    draining_at: HashMap<Pid, Time>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("baton");
        let upgrades = Family::<OutcomeLabels, Counter>::default();
        let failures = Family::<ReasonLabels, Counter>::default();
        let refusals = Family::<RefusalLabels, Counter>::default();
        let rollbacks = Family::<RollbackLabels, Counter>::default();
        let restarts = Counter::default();
        let exits = Family::<ExitLabels, Counter>::default();
        let kills = Counter::default();
        let upgrade_seconds = Family::new_with_constructor(histogram as fn() -> Histogram);
        let phase_seconds = Family::new_with_constructor(histogram as fn() -> Histogram);
        // Series that exist from the start (at 0), so rates and alerts work
        // before the first upgrade.
        for outcome in OUTCOMES {
            let _ = upgrades.get_or_create(&OutcomeLabels { outcome });
        }
        for reason in FAILURES {
            let _ = failures.get_or_create(&ReasonLabels { reason });
        }
        for (trigger, kind) in [
            ("manual", "instant"),
            ("manual", "cold"),
            ("automatic", "instant"),
        ] {
            let _ = rollbacks.get_or_create(&RollbackLabels { trigger, kind });
        }
        registry.register(
            "upgrades",
            "Upgrades and rollbacks by outcome: succeeded, failed, rolled_back, or refused \
             (never started)",
            upgrades.clone(),
        );
        registry.register(
            "upgrade_failures",
            "Upgrades that did not succeed, by the reason the candidate was abandoned",
            failures.clone(),
        );
        registry.register(
            "refusals",
            "Upgrade, rollback and promote requests refused, by request and reason",
            refusals.clone(),
        );
        registry.register(
            "rollbacks",
            "Rollbacks: manual (requested) or automatic (the new generation died or failed its \
             health checks); instant (traffic back to running processes) or cold (the previous \
             release started anew)",
            rollbacks.clone(),
        );
        registry.register(
            "restarts",
            "Restarts of a worker of the active generation after its process exited",
            restarts.clone(),
        );
        registry.register(
            "exits",
            "Exits of generations' worker processes, by exit code or signal",
            exits.clone(),
        );
        registry.register(
            "drain_kills",
            "Process groups killed (SIGKILL) because the drain timeout expired",
            kills.clone(),
        );
        registry.register_with_unit(
            "upgrade_duration",
            "Time from an upgrade's request to its outcome (bake and canary included)",
            Unit::Seconds,
            upgrade_seconds.clone(),
        );
        registry.register_with_unit(
            "phase_duration",
            "Time spent in each phase of a cutover; see docs/operations.md for each phase",
            Unit::Seconds,
            phase_seconds.clone(),
        );
        let snapshot = Arc::new(Mutex::new(Arc::new(Snapshot::default())));
        registry.register_collector(Box::new(Live {
            snapshot: snapshot.clone(),
            page_size: sysconf(nix::unistd::SysconfVar::PAGE_SIZE, 4096),
            clock_ticks: sysconf(nix::unistd::SysconfVar::CLK_TCK, 100),
        }));
        Self {
            registry: Arc::new(registry),
            upgrades,
            failures,
            refusals,
            rollbacks,
            restarts,
            exits,
            kills,
            upgrade_seconds,
            phase_seconds,
            snapshot,
            timing: None,
            retiring_at: HashMap::new(),
            draining_at: HashMap::new(),
        }
    }

    /// What scrapes encode.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Takes one step's effects, before the shell performs them: `asked`
    /// is the request the step's input carried, `machine` its state after
    /// the step, `now` the time the step was given.
    pub fn observe<P: Clone>(
        &mut self,
        asked: Option<(RequestId, Asked)>,
        effects: &[Effect],
        machine: &Machine<P>,
        now: Time,
    ) {
        for effect in effects {
            match effect {
                Effect::Event(ev) => self.event(ev, machine, now),
                Effect::Reply { id, reply } => {
                    if let Some((_, what)) = asked.filter(|(asked_id, _)| asked_id == id) {
                        self.reply(what, reply);
                    }
                }
                _ => {}
            }
        }
        // Spans of processes the machine no longer answers for end unmeasured.
        let procs = machine.procs();
        self.retiring_at.retain(|pid, _| procs.contains_key(pid));
        self.draining_at.retain(|pid, _| procs.contains_key(pid));
        self.publish(machine);
    }

    /// An upgrade refused before it reached the machine: its configuration
    /// did not load.
    pub fn config_refused(&self) {
        self.refused(Asked::Upgrade, "config");
    }

    fn refused(&self, what: Asked, reason: &'static str) {
        let request = what.label();
        self.refusals
            .get_or_create(&RefusalLabels { request, reason })
            .inc();
        if what != Asked::Promote {
            self.count_outcome("refused");
        }
    }

    fn count_outcome(&self, outcome: &'static str) {
        self.upgrades
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    fn phase(&self, phase: &'static str, from: Time, to: Time) {
        self.phase_seconds
            .get_or_create(&PhaseLabels { phase })
            .observe(seconds(to.since(from)));
    }

    fn reply(&self, what: Asked, reply: &Reply) {
        match reply {
            Reply::Refused(r) => self.refused(what, refusal_label(*r)),
            // The traffic went back to running processes at once.
            Reply::RolledBack(_) => {
                self.rollbacks
                    .get_or_create(&RollbackLabels {
                        trigger: "manual",
                        kind: "instant",
                    })
                    .inc();
            }
            _ => {}
        }
    }

    fn event<P: Clone>(&mut self, ev: &Event, machine: &Machine<P>, now: Time) {
        // The upgrade's own candidate, while its upgrade is being timed.
        let timed = self.timing.filter(|t| t.candidate == ev.gen);
        match &ev.kind {
            EventKind::Requested { trigger } => {
                if let Some(up) = ev.upgrade.filter(|u| u.id == ev.gen) {
                    self.timing = Some(Timing {
                        candidate: ev.gen,
                        requested: up.started,
                        spawned: false,
                        ready_at: None,
                        active: false,
                    });
                }
                if *trigger == Trigger::Rollback {
                    self.rollbacks
                        .get_or_create(&RollbackLabels {
                            trigger: "manual",
                            kind: "cold",
                        })
                        .inc();
                }
            }
            EventKind::Spawned { .. } => {
                if let Some(t) = timed.filter(|t| !t.spawned) {
                    self.phase("requested_to_spawned", t.requested, now);
                    self.timing = Some(Timing { spawned: true, ..t });
                }
            }
            EventKind::Ready { pid, .. } => {
                if let Some(p) = machine.procs().get(pid) {
                    self.phase("spawned_to_ready", p.started, now);
                }
                if let Some(t) = timed.filter(|t| t.ready_at.is_none()) {
                    self.timing = Some(Timing {
                        ready_at: Some(now),
                        ..t
                    });
                }
            }
            EventKind::Active { .. } => {
                if let Some(t) = timed.filter(|t| !t.active) {
                    self.phase("requested_to_active", t.requested, now);
                    if let Some(ready) = t.ready_at {
                        self.phase("ready_to_active", ready, now);
                    }
                    self.timing = Some(Timing { active: true, ..t });
                }
            }
            EventKind::Retiring { pid } => {
                self.retiring_at.insert(*pid, now);
            }
            EventKind::Draining { pid } => {
                if let Some(at) = self.retiring_at.remove(pid) {
                    self.phase("retiring_to_draining", at, now);
                }
                self.draining_at.insert(*pid, now);
            }
            EventKind::Exited { pid, status, .. } => {
                let (how, status) = exit_labels(*status);
                self.exits.get_or_create(&ExitLabels { how, status }).inc();
                self.retiring_at.remove(pid);
                if let Some(at) = self.draining_at.remove(pid) {
                    self.phase("draining_to_exited", at, now);
                }
            }
            EventKind::Killed { .. } => {
                self.kills.inc();
            }
            EventKind::Restarting { .. } => {
                self.restarts.inc();
            }
            EventKind::RolledBack { failure, .. } => {
                // A requested one is counted at its reply.
                if *failure != Failure::RolledBack {
                    self.rollbacks
                        .get_or_create(&RollbackLabels {
                            trigger: "automatic",
                            kind: "instant",
                        })
                        .inc();
                }
            }
            EventKind::UpgradeSucceeded => self.outcome(ev, "succeeded", now),
            EventKind::UpgradeFailed { failure, .. } => {
                let reason = failure_label(failure);
                self.failures.get_or_create(&ReasonLabels { reason }).inc();
                // Abandoned by a rollback, requested or automatic.
                let outcome = match failure {
                    Failure::RolledBack | Failure::Died(_) | Failure::Unhealthy(_) => "rolled_back",
                    _ => "failed",
                };
                self.outcome(ev, outcome, now);
            }
            // A worker restarted alone, ready again: a start like any.
            EventKind::WorkerReady { pid, .. } => {
                if let Some(p) = machine.procs().get(pid) {
                    self.phase("spawned_to_ready", p.started, now);
                }
            }
            EventKind::SpawnFailed { .. }
            | EventKind::CanaryStarted { .. }
            | EventKind::BakeStarted { .. }
            | EventKind::Status { .. }
            | EventKind::Stopping { .. } => {}
        }
    }

    fn outcome(&mut self, ev: &Event, outcome: &'static str, now: Time) {
        self.count_outcome(outcome);
        if let Some(up) = ev.upgrade {
            self.upgrade_seconds
                .get_or_create(&OutcomeLabels { outcome })
                .observe(seconds(now.since(up.started)));
        }
        if self.timing.is_some_and(|t| t.candidate == ev.gen) {
            self.timing = None;
        }
    }

    /// Replaces the snapshot scrapes read, if the machine's generations or
    /// plan changed.
    fn publish<P: Clone>(&self, machine: &Machine<P>) {
        let next = Snapshot::of(machine);
        let mut current = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        if **current != next {
            *current = Arc::new(next);
        }
    }
}

fn refusal_label(r: Refusal) -> &'static str {
    match r {
        Refusal::Busy(_) => "busy",
        Refusal::Stopping => "stopping",
        Refusal::NoPrevious => "no_previous",
        Refusal::NothingToPromote => "nothing_to_promote",
        Refusal::NeedsSteering => "needs_steering",
        Refusal::NeedsOverlap => "needs_overlap",
    }
}

fn failure_label(f: &Failure) -> &'static str {
    match f {
        Failure::Spawn(_) => "spawn",
        Failure::Exited(_) => "exited",
        Failure::Timeout(_) => "timeout",
        Failure::Check(_) => "check",
        Failure::Died(_) => "died",
        Failure::Unhealthy(_) => "unhealthy",
        Failure::RolledBack => "rolled_back",
        Failure::Stopping => "stopping",
    }
}

/// `("code", "3")` or `("signal", "SIGKILL")`.
fn exit_labels(status: ExitStatus) -> (&'static str, String) {
    match status {
        ExitStatus::Code(c) => ("code", c.to_string()),
        ExitStatus::Signaled { signal, .. } => (
            "signal",
            nix::sys::signal::Signal::try_from(signal)
                .map_or_else(|_| signal.to_string(), |s| s.as_str().to_owned()),
        ),
    }
}

fn role_label(r: Option<Role>) -> &'static str {
    match r {
        Some(Role::Active) => "active",
        Some(Role::Candidate) => "candidate",
        Some(Role::Parked) => "parked",
        None => "none",
    }
}

fn sysconf(var: nix::unistd::SysconfVar, fallback: u64) -> u64 {
    match nix::unistd::sysconf(var) {
        Ok(Some(n)) if n > 0 => n as u64,
        _ => fallback,
    }
}

// ----- the snapshot, and what is read at scrape time -------------------------------

/// The machine's generations as scrapes show them.
#[derive(Debug, Default, PartialEq)]
struct Snapshot {
    generations: Vec<GenRow>,
    /// The process groups the machine answers for, by leader (= group
    /// id), with the generation and worker each belongs to.
    groups: Vec<(i32, (u64, u32))>,
    active: Option<u64>,
    upgrading: bool,
}

#[derive(Debug, PartialEq)]
struct GenRow {
    number: u64,
    release: String,
    phase: &'static str,
    role: &'static str,
    /// Its share of new connections, 0 to 1.
    share: f64,
    restarts: u32,
    last_exit: Option<(&'static str, String)>,
    /// How many of its workers are in each state (those with any).
    workers: Vec<(&'static str, u32)>,
}

impl Snapshot {
    fn of<P: Clone>(machine: &Machine<P>) -> Self {
        let plan = machine.traffic();
        let generations = machine
            .generations()
            .map(|g| {
                let (role, share) = wire::role_share(plan, g.id());
                let mut workers: Vec<(&'static str, u32)> = Vec::new();
                for w in wire::workers(machine, g, Time::ZERO) {
                    let state = w.state.as_str();
                    match workers.iter_mut().find(|(s, _)| *s == state) {
                        Some((_, n)) => *n += 1,
                        None => workers.push((state, 1)),
                    }
                }
                GenRow {
                    number: g.id().0,
                    release: g.spec().release.dir.display().to_string(),
                    phase: wire::gen_state(g, plan.active).as_str(),
                    role: role_label(role),
                    share: share.map_or(0.0, |s| f64::from(s) / 100.0),
                    restarts: g.restarts(),
                    last_exit: g.last_exit().map(exit_labels),
                    workers,
                }
            })
            .collect();
        Self {
            generations,
            groups: machine
                .procs()
                .iter()
                .map(|(pid, p)| (pid.0, (p.gen.0, p.worker)))
                .collect(),
            active: plan.active.map(|g| g.0),
            upgrading: machine.upgrade().is_some(),
        }
    }
}

/// Encodes the snapshot, and reads processes' memory and CPU, at scrape
/// time.
#[derive(Debug)]
struct Live {
    snapshot: Arc<Mutex<Arc<Snapshot>>>,
    page_size: u64,
    clock_ticks: u64,
}

/// One metric family, from `(labels, value)` rows; nothing for no rows.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    rows: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut rows = rows.into_iter().peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, value) in rows {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One metric without labels.
fn single(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, unit, value.metric_type())?;
    value.encode(metric)
}

impl Live {
    fn cpu_seconds(&self, p: &ProcStat) -> f64 {
        p.cpu_ticks as f64 / self.clock_ticks as f64
    }

    fn rss_bytes(&self, p: &ProcStat) -> u64 {
        p.rss_pages * self.page_size
    }
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snap = self
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let gauge = MetricType::Gauge;
        family(
            &mut encoder,
            "build_info",
            "baton's version (always 1).",
            None,
            gauge,
            [(
                VersionLabels {
                    version: env!("CARGO_PKG_VERSION"),
                },
                ConstGauge::new(1),
            )],
        )?;
        family(
            &mut encoder,
            "generation_info",
            "Each generation baton knows, with its release (resolved directory), phase (as in \
             baton status) and traffic role (active, candidate, parked, none); always 1.",
            None,
            gauge,
            snap.generations.iter().map(|g| {
                let labels = GenInfoLabels {
                    generation: g.number,
                    release: g.release.clone(),
                    phase: g.phase,
                    role: g.role,
                };
                (labels, ConstGauge::new(1))
            }),
        )?;
        family(
            &mut encoder,
            "generation_traffic_share_ratio",
            "Each generation's share of new connections, 0 to 1.",
            None,
            gauge,
            snap.generations.iter().map(|g| {
                let labels = GenLabels {
                    generation: g.number,
                };
                (labels, ConstGauge::new(g.share))
            }),
        )?;
        family(
            &mut encoder,
            "generation_restarts",
            "Crash restarts of each generation's workers, in all.",
            None,
            gauge,
            snap.generations.iter().map(|g| {
                let labels = GenLabels {
                    generation: g.number,
                };
                (labels, ConstGauge::new(i64::from(g.restarts)))
            }),
        )?;
        family(
            &mut encoder,
            "generation_last_exit_info",
            "How each generation's last worker process to end ended: exit code or signal; \
             always 1.",
            None,
            gauge,
            snap.generations.iter().filter_map(|g| {
                let (how, status) = g.last_exit.clone()?;
                let labels = LastExitLabels {
                    generation: g.number,
                    how,
                    status,
                };
                Some((labels, ConstGauge::new(1)))
            }),
        )?;
        family(
            &mut encoder,
            "generation_workers",
            "Each generation's workers by state (as in baton status: waiting, starting, \
             ready, restarting, retiring, draining, exited).",
            None,
            gauge,
            snap.generations.iter().flat_map(|g| {
                g.workers.iter().map(|(state, n)| {
                    let labels = WorkerStateLabels {
                        generation: g.number,
                        state,
                    };
                    (labels, ConstGauge::new(i64::from(*n)))
                })
            }),
        )?;
        if let Some(active) = snap.active {
            single(
                &mut encoder,
                "active_generation",
                "The number of the generation new connections belong to.",
                None,
                ConstGauge::new(active as i64),
            )?;
        }
        single(
            &mut encoder,
            "upgrade_in_progress",
            "1 while an upgrade (with its canary or bake) is in progress.",
            None,
            ConstGauge::new(i64::from(snap.upgrading)),
        )?;

        // Every live member of each group the machine answers for; the
        // leaders are kept unreaped, so no group id is a stranger's.
        let gens: HashMap<i32, (u64, u32)> = snap.groups.iter().copied().collect();
        let members: Vec<((u64, u32), ProcStat)> = process::proc_table()
            .into_iter()
            .filter(|p| p.state != 'Z')
            .filter_map(|p| Some((*gens.get(&p.pgrp)?, p)))
            .collect();
        let proc_labels = |(gen, worker): (u64, u32), p: &ProcStat| ProcLabels {
            generation: gen,
            worker,
            pid: p.pid,
        };
        family(
            &mut encoder,
            "process_resident_memory",
            "Resident memory of each process of each generation (read from /proc at scrape \
             time).",
            Some(&Unit::Bytes),
            gauge,
            members.iter().map(|(g, p)| {
                (
                    proc_labels(*g, p),
                    ConstGauge::new(self.rss_bytes(p) as i64),
                )
            }),
        )?;
        family(
            &mut encoder,
            "process_cpu",
            "CPU time (user + system) of each process of each generation (read from /proc at \
             scrape time).",
            Some(&Unit::Seconds),
            MetricType::Counter,
            members
                .iter()
                .map(|(g, p)| (proc_labels(*g, p), ConstCounter::new(self.cpu_seconds(p)))),
        )?;

        // baton itself.
        let me = std::process::id() as i32;
        let own = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| ProcStat::parse(me, &s));
        if let Some(own) = own {
            single(
                &mut encoder,
                "supervisor_resident_memory",
                "baton's own resident memory.",
                Some(&Unit::Bytes),
                ConstGauge::new(self.rss_bytes(&own) as i64),
            )?;
            single(
                &mut encoder,
                "supervisor_cpu",
                "baton's own CPU time (user + system).",
                Some(&Unit::Seconds),
                ConstCounter::new(self.cpu_seconds(&own)),
            )?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            single(
                &mut encoder,
                "supervisor_open_fds",
                "Descriptors baton holds open.",
                None,
                ConstGauge::new(fds.count() as i64),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::{
        Readiness, Release, Report, Settings, Spec, TrafficMode, Trigger as CoreTrigger,
        UpgradeOptions,
    };

    fn spec(name: &str) -> Spec<()> {
        Spec {
            release: Release {
                dir: format!("/srv/{name}").into(),
                program: format!("/srv/{name}/server").into(),
                argv: vec!["./server".into()],
            },
            settings: Settings {
                workers: 1,
                readiness: Readiness::Notify,
                ready_timeout: Duration::from_secs(3),
                drain_timeout: Duration::from_secs(5),
                restart_backoff_max: Duration::from_secs(1),
                bake: Duration::ZERO,
                health: None,
                overlap: baton_core::Overlap::Full,
                candidate_priority: baton_core::CpuPriority::Normal,
            },
            payload: (),
        }
    }

    /// The machine, stepped as the shell steps it, with the metrics
    /// observing every step.
    struct Rig {
        machine: Machine<()>,
        metrics: Metrics,
        next: u64,
    }

    impl Rig {
        fn new() -> Self {
            Self {
                machine: Machine::new(TrafficMode::Steered),
                metrics: Metrics::new(),
                next: 1,
            }
        }

        fn step(&mut self, ms: u64, input: Input<()>) -> Vec<Effect> {
            let now = Time::from_duration(Duration::from_millis(ms));
            let asked = Asked::of(&input);
            let effects = self.machine.step(input, now);
            self.metrics.observe(asked, &effects, &self.machine, now);
            effects
        }

        fn command(&mut self, ms: u64, command: Command<()>) -> Vec<Effect> {
            let id = RequestId(self.next);
            self.next += 1;
            self.step(ms, Input::Command { id, command })
        }

        fn upgrade(&mut self, ms: u64, name: &str, bake: Option<Duration>) -> Vec<Effect> {
            let options = UpgradeOptions {
                bake,
                ..UpgradeOptions::default()
            };
            self.command(
                ms,
                Command::Upgrade {
                    trigger: CoreTrigger::Control,
                    spec: Ok(spec(name)),
                    options,
                },
            )
        }

        fn spawned(&mut self, ms: u64, gen: u64, pid: i32) {
            self.spawned_worker(ms, gen, 0, pid);
        }

        fn spawned_worker(&mut self, ms: u64, gen: u64, worker: u32, pid: i32) {
            self.step(
                ms,
                Input::Spawned {
                    gen: GenId(gen),
                    worker,
                    pid: Pid(pid),
                },
            );
        }

        fn ready(&mut self, ms: u64, pid: i32) {
            self.step(
                ms,
                Input::Notify {
                    pid: Pid(pid),
                    pgid: Some(Pid(pid)),
                    reports: vec![Report::Ready],
                },
            );
        }

        fn exited(&mut self, ms: u64, pid: i32, status: ExitStatus) {
            self.step(
                ms,
                Input::Exited {
                    pid: Pid(pid),
                    status,
                    group_empty: true,
                },
            );
        }

        fn text(&self) -> String {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &self.metrics.registry()).unwrap();
            text
        }

        /// The value of the sample named exactly `series` (name and labels
        /// as printed); panics if there is none.
        fn value(&self, series: &str) -> f64 {
            let text = self.text();
            text.lines()
                .find_map(|l| {
                    let (name, value) = l.rsplit_once(' ')?;
                    (name == series).then(|| value.parse().unwrap())
                })
                .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
        }

        /// Seconds observed in a cutover phase, in all.
        fn phase_sum(&self, phase: &str) -> f64 {
            self.value(&format!(
                "baton_phase_duration_seconds_sum{{phase=\"{phase}\"}}"
            ))
        }

        fn has(&self, series: &str) -> bool {
            self.text()
                .lines()
                .any(|l| l.rsplit_once(' ').is_some_and(|(n, _)| n == series))
        }
    }

    /// Generation 1 (`v1`, pid 100) started at 0 ms, ready at 40 ms.
    fn started() -> Rig {
        let mut rig = Rig::new();
        rig.step(0, Input::Start { spec: spec("v1") });
        rig.spawned(0, 1, 100);
        rig.ready(40, 100);
        rig
    }

    #[test]
    fn a_cutover_counts_and_times_each_phase_with_the_machines_clock() {
        let mut rig = started();
        assert_eq!(
            rig.value("baton_upgrades_total{outcome=\"succeeded\"}"),
            0.0
        );
        assert_eq!(
            rig.value("baton_phase_duration_seconds_count{phase=\"spawned_to_ready\"}"),
            1.0
        );
        // Requested at 1000 ms, running at 1100, ready (and active) at 1300.
        rig.upgrade(1000, "v2", None);
        rig.spawned(1100, 2, 200);
        assert_eq!(rig.value("baton_upgrade_in_progress"), 1.0);
        rig.ready(1300, 200);
        assert_eq!(
            rig.value("baton_upgrades_total{outcome=\"succeeded\"}"),
            1.0
        );
        assert_eq!(rig.value("baton_upgrade_in_progress"), 0.0);
        assert!((rig.phase_sum("requested_to_spawned") - 0.1).abs() < 1e-9);
        assert!((rig.phase_sum("requested_to_active") - 0.3).abs() < 1e-9);
        assert!((rig.phase_sum("ready_to_active") - 0.0).abs() < 1e-9);
        // 40 ms for generation 1, 200 ms for generation 2.
        assert!((rig.phase_sum("spawned_to_ready") - 0.24).abs() < 1e-9);
        assert!(
            (rig.value("baton_upgrade_duration_seconds_sum{outcome=\"succeeded\"}") - 0.3).abs()
                < 1e-9
        );
        // Steered: generation 1 is retired, then drained once its queue is
        // empty (at 1500 ms), and exits at 2000 ms.
        assert!(rig.has(
            "baton_generation_info{generation=\"1\",release=\"/srv/v1\",phase=\"retiring\",role=\"none\"}"
        ));
        rig.step(1500, Input::QueueEmpty { gen: GenId(1) });
        rig.exited(2000, 100, ExitStatus::Code(0));
        assert!((rig.phase_sum("retiring_to_draining") - 0.2).abs() < 1e-9);
        assert!((rig.phase_sum("draining_to_exited") - 0.5).abs() < 1e-9);
        assert_eq!(
            rig.value("baton_exits_total{how=\"code\",status=\"0\"}"),
            1.0
        );
        // The snapshot follows: one series per generation, none stale.
        let text = rig.text();
        let gen1: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("baton_generation_info{generation=\"1\""))
            .collect();
        assert_eq!(
            gen1,
            ["baton_generation_info{generation=\"1\",release=\"/srv/v1\",phase=\"exited\",role=\"none\"} 1"]
        );
        assert!(rig.has(
            "baton_generation_info{generation=\"2\",release=\"/srv/v2\",phase=\"active\",role=\"active\"}"
        ));
        assert_eq!(
            rig.value("baton_generation_traffic_share_ratio{generation=\"2\"}"),
            1.0
        );
        assert_eq!(rig.value("baton_active_generation"), 2.0);
        assert!(
            rig.has("baton_generation_last_exit_info{generation=\"1\",how=\"code\",status=\"0\"}")
        );
    }

    #[test]
    fn failures_refusals_and_restarts_are_counted_by_kind() {
        let mut rig = started();
        // Nothing to promote: a refusal, but no upgrade.
        rig.command(500, Command::Promote);
        assert_eq!(
            rig.value("baton_refusals_total{request=\"promote\",reason=\"nothing_to_promote\"}"),
            1.0
        );
        assert_eq!(rig.value("baton_upgrades_total{outcome=\"refused\"}"), 0.0);
        // Nothing to roll back to: a refused upgrade.
        rig.command(600, Command::Rollback);
        assert_eq!(
            rig.value("baton_refusals_total{request=\"rollback\",reason=\"no_previous\"}"),
            1.0
        );
        assert_eq!(rig.value("baton_upgrades_total{outcome=\"refused\"}"), 1.0);
        rig.metrics.config_refused();
        assert_eq!(rig.value("baton_upgrades_total{outcome=\"refused\"}"), 2.0);

        // A candidate that exits before it is ready; the failure is
        // reported once its stderr has ended.
        rig.upgrade(1000, "v2", None);
        rig.spawned(1010, 2, 200);
        rig.exited(1050, 200, ExitStatus::Code(7));
        assert_eq!(rig.value("baton_upgrades_total{outcome=\"failed\"}"), 0.0);
        rig.step(1060, Input::StderrClosed { pid: Pid(200) });
        assert_eq!(rig.value("baton_upgrades_total{outcome=\"failed\"}"), 1.0);
        assert_eq!(
            rig.value("baton_upgrade_failures_total{reason=\"exited\"}"),
            1.0
        );
        assert_eq!(
            rig.value("baton_exits_total{how=\"code\",status=\"7\"}"),
            1.0
        );
        assert!(rig.has(
            "baton_generation_info{generation=\"2\",release=\"/srv/v2\",phase=\"failed\",role=\"none\"}"
        ));

        // The active generation killed by a signal is restarted.
        let sigkill = ExitStatus::Signaled {
            signal: 9,
            core_dumped: false,
        };
        rig.exited(3000, 100, sigkill);
        assert_eq!(rig.value("baton_restarts_total"), 1.0);
        assert_eq!(
            rig.value("baton_exits_total{how=\"signal\",status=\"SIGKILL\"}"),
            1.0
        );
        assert_eq!(
            rig.value("baton_generation_restarts{generation=\"1\"}"),
            1.0
        );
        assert_eq!(
            rig.value("baton_upgrades_total{outcome=\"succeeded\"}"),
            0.0
        );
    }

    #[test]
    fn rollbacks_are_manual_or_automatic() {
        let bake = Some(Duration::from_secs(60));
        let mut rig = started();
        // Manual, during the bake: the traffic goes back at once.
        rig.upgrade(1000, "v2", bake);
        rig.spawned(1010, 2, 200);
        rig.ready(1020, 200);
        assert!(rig.has(
            "baton_generation_info{generation=\"1\",release=\"/srv/v1\",phase=\"ready\",role=\"parked\"}"
        ));
        assert_eq!(
            rig.value("baton_generation_traffic_share_ratio{generation=\"1\"}"),
            0.0
        );
        rig.command(2000, Command::Rollback);
        let manual = "baton_rollbacks_total{trigger=\"manual\",kind=\"instant\"}";
        let automatic = "baton_rollbacks_total{trigger=\"automatic\",kind=\"instant\"}";
        assert_eq!((rig.value(manual), rig.value(automatic)), (1.0, 0.0));
        assert_eq!(
            rig.value("baton_upgrades_total{outcome=\"rolled_back\"}"),
            1.0
        );
        assert_eq!(rig.value("baton_active_generation"), 1.0);
        // Automatic: the new generation dies during its bake.
        rig.upgrade(3000, "v3", bake);
        rig.spawned(3010, 3, 300);
        rig.ready(3020, 300);
        rig.exited(3500, 300, ExitStatus::Code(3));
        rig.step(3510, Input::StderrClosed { pid: Pid(300) });
        assert_eq!((rig.value(manual), rig.value(automatic)), (1.0, 1.0));
        assert_eq!(
            rig.value("baton_upgrades_total{outcome=\"rolled_back\"}"),
            2.0
        );
        assert_eq!(
            rig.value("baton_upgrade_failures_total{reason=\"died\"}"),
            1.0
        );
        assert!(
            (rig.value("baton_upgrade_duration_seconds_sum{outcome=\"rolled_back\"}") - 1.51).abs()
                < 1e-9,
            "1.0 s and 0.51 s"
        );
        assert_eq!(rig.value("baton_upgrades_total{outcome=\"failed\"}"), 0.0);
    }

    #[test]
    fn every_line_is_a_comment_or_a_baton_sample() {
        let mut rig = started();
        rig.upgrade(1000, "v2", None);
        rig.spawned(1100, 2, 200);
        rig.ready(1300, 200);
        let text = rig.text();
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in text.lines() {
            if let Some(comment) = line.strip_prefix("# ") {
                let mut words = comment.split(' ');
                let kind = words.next().unwrap_or("");
                assert!(
                    kind == "EOF"
                        || (["HELP", "TYPE", "UNIT"].contains(&kind)
                            && words.next().is_some_and(|n| n.starts_with("baton_"))),
                    "bad comment line {line:?}"
                );
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(series.starts_with("baton_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    /// The processes of a generation's group are read from /proc at
    /// scrape time: here the test's own process group stands for one.
    #[test]
    fn processes_memory_and_cpu_come_from_proc() {
        let pgid = nix::unistd::getpgrp().as_raw();
        let mut rig = Rig::new();
        rig.step(0, Input::Start { spec: spec("v1") });
        rig.spawned(0, 1, pgid);
        let me = std::process::id();
        let rss: f64 = rig.value(&format!(
            "baton_process_resident_memory_bytes{{generation=\"1\",worker=\"0\",pid=\"{me}\"}}"
        ));
        assert!(rss > 1e6, "this test process uses more than 1 MB: {rss}");
        assert!(rig.has(&format!(
            "baton_process_cpu_seconds_total{{generation=\"1\",worker=\"0\",pid=\"{me}\"}}"
        )));
        assert!(rig.value("baton_supervisor_resident_memory_bytes") > 1e6);
        assert!(rig.value("baton_supervisor_open_fds") >= 3.0);
        // Positive control: a group the machine does not answer for shows
        // nothing.
        let other = Rig::new();
        assert!(!other
            .text()
            .contains("baton_process_resident_memory_bytes{"));
    }

    /// Workers are counted by state per generation, their crash restarts
    /// add up in the generation's, a worker restarted alone is timed like
    /// any start, and each process names its worker.
    #[test]
    fn workers_are_counted_by_state() {
        let mut rig = Rig::new();
        let mut three = spec("v1");
        three.settings.workers = 3;
        rig.step(0, Input::Start { spec: three });
        for (worker, pid) in [(0, 100), (1, 101), (2, 102)] {
            rig.spawned_worker(0, 1, worker, pid);
        }
        let series =
            |state: &str| format!("baton_generation_workers{{generation=\"1\",state=\"{state}\"}}");
        assert_eq!(rig.value(&series("starting")), 3.0);
        for pid in [100, 101, 102] {
            rig.ready(40, pid);
        }
        assert_eq!(rig.value(&series("ready")), 3.0);
        assert!(!rig.has(&series("starting")), "no stale series");
        rig.exited(1000, 101, ExitStatus::Code(1));
        assert_eq!(rig.value(&series("ready")), 2.0);
        assert_eq!(rig.value(&series("restarting")), 1.0);
        assert_eq!(rig.value("baton_restarts_total"), 1.0);
        assert_eq!(
            rig.value("baton_generation_restarts{generation=\"1\"}"),
            1.0
        );
        // Restarted (after 100 ms) and ready again 50 ms later: a start
        // timed like the generation's (40 ms, from the last worker's).
        let count = "baton_phase_duration_seconds_count{phase=\"spawned_to_ready\"}";
        assert_eq!(rig.value(count), 1.0);
        rig.step(1100, Input::Tick);
        rig.spawned_worker(1100, 1, 1, 103);
        rig.ready(1150, 103);
        assert_eq!(rig.value(&series("ready")), 3.0);
        assert_eq!(rig.value(count), 2.0);
        assert!((rig.phase_sum("spawned_to_ready") - 0.09).abs() < 1e-9);
        // The group of worker 1 (here: this test's own group) names it.
        let pgid = nix::unistd::getpgrp().as_raw();
        let mut rig = Rig::new();
        let mut two = spec("v1");
        two.settings.workers = 2;
        rig.step(0, Input::Start { spec: two });
        rig.spawned_worker(0, 1, 1, pgid);
        let me = std::process::id();
        assert!(rig.has(&format!(
            "baton_process_resident_memory_bytes{{generation=\"1\",worker=\"1\",pid=\"{me}\"}}"
        )));
    }
}
