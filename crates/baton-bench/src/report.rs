//! Turning a run's records into numbers: counts by outcome, throughput,
//! latency for the steady state and inside the windows around cutovers,
//! the cutovers' phases, failures placed relative to the cutover events,
//! and the 100 ms timeline the plot draws.
//!
//! Latency histograms hold *successful* requests, measured from their
//! scheduled time; failures are counted by cause instead. A request belongs
//! to a cutover window when its scheduled time falls in
//! `[cutover start - pad, cutover end + pad]`.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::Cause;
use crate::cutover::Cutover;
use crate::load::{Model, Record};
use crate::measure::RunData;
use crate::procstat::{self, Sample};

/// Margin around a cutover that still counts as its window.
pub const PAD_US: i64 = 100_000;
/// Requests scheduled before this are left out of the steady state
/// (connections are being opened).
pub const WARMUP_US: u32 = 500_000;
/// At most this many failures are listed one by one.
const FAILURES_LISTED: usize = 100;

pub fn new_hist() -> Histogram<u64> {
    // 1 µs to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn ms(us: u64) -> f64 {
    (us as f64 / 1e3 * 1e3).round() / 1e3
}

pub fn latency_of(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    }
}

/// The cutover windows, padded, sorted and merged where they overlap.
pub fn windows(cutovers: &[Cutover], pad_us: i64) -> Vec<(i64, i64)> {
    let mut w: Vec<(i64, i64)> = cutovers
        .iter()
        .map(|c| (c.start_us - pad_us, c.end_us.max(c.start_us) + pad_us))
        .collect();
    w.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::with_capacity(w.len());
    for (a, b) in w {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// Whether `t` lies in one of the (sorted, disjoint) windows.
pub fn in_windows(w: &[(i64, i64)], t: i64) -> bool {
    let i = w.partition_point(|&(_, end)| end < t);
    w.get(i).is_some_and(|&(start, _)| start <= t)
}

/// Latency histograms of the successful requests: all of them, the steady
/// state (outside every window, after warm-up) and inside the windows.
pub struct Split {
    pub all: Histogram<u64>,
    pub steady: Histogram<u64>,
    pub cutover: Histogram<u64>,
}

pub fn split(records: &[Record], windows: &[(i64, i64)], warmup_us: u32) -> Split {
    split_by(records, windows, warmup_us, |r| {
        r.failed().is_none().then(|| r.latency_us())
    })
}

/// Like [`split`], for any per-request measure (`None` leaves a request out).
pub fn split_by(
    records: &[Record],
    windows: &[(i64, i64)],
    warmup_us: u32,
    measure: impl Fn(&Record) -> Option<u64>,
) -> Split {
    let mut s = Split {
        all: new_hist(),
        steady: new_hist(),
        cutover: new_hist(),
    };
    for r in records {
        let Some(v) = measure(r) else { continue };
        let v = v.max(1);
        s.all.saturating_record(v);
        if in_windows(windows, i64::from(r.sched_us)) {
            s.cutover.saturating_record(v);
        } else if r.sched_us >= warmup_us {
            s.steady.saturating_record(v);
        }
    }
    s
}

impl Split {
    fn latencies(&self) -> Latencies {
        Latencies {
            all: latency_of(&self.all),
            steady: latency_of(&self.steady),
            cutover: latency_of(&self.cutover),
        }
    }
}

/// The stages of a cutover under baton, by its events: `starting` (the
/// window's start → the candidate active: it starts beside the serving
/// generation), `moving` (active → the old generation's drain signal:
/// steered, it still accepts what waits in its socket) and `exiting` (the
/// drain signal → the old generation gone, and the window's end): where in
/// a cutover the tail latency comes from, e.g. whether the old
/// generation's exit is on the clients' critical path.
pub const STAGES: [&str; 3] = ["starting", "moving", "exiting"];

/// Latency of the successful requests in each [`STAGES`] interval of the
/// cutovers that have baton's marks (`active`, `draining`); empty for
/// other deploys.
fn by_stage(records: &[Record], cutovers: &[Cutover]) -> BTreeMap<&'static str, Latency> {
    // (from, to, stage), sorted by `from`; a later cutover's padding may
    // overlap an earlier one's end, and then the later interval wins.
    let mut spans: Vec<(i64, i64, usize)> = Vec::new();
    for c in cutovers {
        let (Some(active), Some(draining)) = (c.phase("active"), c.phase("draining")) else {
            continue;
        };
        let end = c.end_us.max(draining) + PAD_US;
        spans.push((c.start_us - PAD_US, active, 0));
        spans.push((active, draining, 1));
        spans.push((draining, end, 2));
    }
    if spans.is_empty() {
        return BTreeMap::new();
    }
    spans.sort_unstable();
    let mut hists: Vec<Histogram<u64>> = STAGES.iter().map(|_| new_hist()).collect();
    for r in records.iter().filter(|r| r.failed().is_none()) {
        let t = i64::from(r.sched_us);
        let i = spans.partition_point(|&(from, _, _)| from <= t);
        if let Some(&(_, to, stage)) = i.checked_sub(1).and_then(|i| spans.get(i)) {
            if t < to {
                hists[stage].saturating_record(r.latency_us().max(1));
            }
        }
    }
    // A stage no request fell in (with shared sockets the drain signal
    // follows activation at once: `moving` is empty) has no latency.
    STAGES
        .iter()
        .zip(&hists)
        .filter(|(_, h)| !h.is_empty())
        .map(|(name, h)| (*name, latency_of(h)))
        .collect()
}

/// Median, 90th percentile and maximum of a set of durations (ms), and
/// how many there were.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stat {
    pub median: f64,
    pub p90: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stat(mut v: Vec<f64>) -> Option<Stat> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    Some(Stat {
        median: at(0.5),
        p90: at(0.9),
        max: v[v.len() - 1],
        n: v.len(),
    })
}

/// `median / p90 / max` with `decimals` digits after the point, `-` for
/// none: a table cell.
pub fn fmt_stat(s: &Option<Stat>, decimals: usize) -> String {
    match s {
        Some(s) => format!(
            "{:.d$} / {:.d$} / {:.d$}",
            s.median,
            s.p90,
            s.max,
            d = decimals
        ),
        None => "-".into(),
    }
}

/// A per-cutover figure in µs, over the successful cutovers that have it
/// (like the phases), in ms.
pub fn stat_of(cutovers: &[Cutover], f: impl Fn(&Cutover) -> Option<i64>) -> Option<Stat> {
    stat(
        cutovers
            .iter()
            .filter(|c| c.ok)
            .filter_map(f)
            .map(|us| us as f64 / 1e3)
            .collect(),
    )
}

/// The rollback latency (ms) over the rollbacks that reached the old
/// generation's same process; a rollback that reached no old process, or
/// another one (a restart), has no latency to count (the run reports it
/// as a failed cutover).
pub fn rollback_stat(cutovers: &[Cutover]) -> Option<Stat> {
    stat(
        cutovers
            .iter()
            .filter_map(|c| c.rollback)
            .filter(|r| r.same_pid == Some(true))
            .filter_map(|r| r.latency_us)
            .map(|us| us as f64 / 1e3)
            .collect(),
    )
}

/// Cutovers whose new generation answered a client before its READY=1
/// stamp: with steered traffic, a candidate is dark until ready, so this
/// must be 0; with shared sockets it accepts from its first accept().
pub fn answered_before_ready(cutovers: &[Cutover]) -> usize {
    cutovers
        .iter()
        .filter(|c| c.ok && c.ready_to_first_response_us.is_some_and(|us| us < 0))
        .count()
}

/// What happened to the requests in one cutover's window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WindowStats {
    pub requests: u64,
    pub failed: u64,
    pub retried: u64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CutoverReport {
    #[serde(flatten)]
    pub cutover: Cutover,
    pub window: WindowStats,
}

/// One failed request, placed relative to the nearest cutover.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FailureNote {
    pub cause: Cause,
    pub retried: bool,
    /// Request start and end, ms since the run's start.
    pub start_ms: f64,
    pub end_ms: f64,
    pub cutover: Option<u32>,
    /// The last phase of that cutover at or before the request started
    /// (`before_start` if it started before the cutover did).
    pub after_phase: Option<String>,
    /// ms from that phase (or to the cutover's start) to the request start.
    pub since_phase_ms: Option<f64>,
    /// The same for the moment the request ended (failed).
    pub end_after_phase: Option<String>,
    pub end_since_phase_ms: Option<f64>,
}

/// The supervisor's memory and CPU during a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Resources {
    pub rss_kb_min: u64,
    pub rss_kb_max: u64,
    pub rss_kb_first: u64,
    pub rss_kb_last: u64,
    /// Average CPU over the run, % of one core.
    pub cpu_pct: f64,
    pub samples: usize,
}

pub fn resources(samples: &[Sample]) -> Option<Resources> {
    let (first, last) = (samples.first()?, samples.last()?);
    Some(Resources {
        rss_kb_min: samples.iter().map(|s| s.rss_kb).min()?,
        rss_kb_max: samples.iter().map(|s| s.rss_kb).max()?,
        rss_kb_first: first.rss_kb,
        rss_kb_last: last.rss_kb,
        cpu_pct: procstat::cpu_percent(first, last, procstat::clock_ticks())
            .map_or(0.0, |p| (p * 100.0).round() / 100.0),
        samples: samples.len(),
    })
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latencies {
    pub all: Latency,
    pub steady: Latency,
    pub cutover: Latency,
}

/// Everything about one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    pub name: String,
    pub target: String,
    pub conn: &'static str,
    pub model: Model,
    pub concurrency: usize,
    pub duration_s: f64,
    pub sent: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub failed_by_cause: BTreeMap<&'static str, u64>,
    pub retried: u64,
    /// Open loop: due but not sent when the run ended.
    pub unsent: u64,
    pub throughput_rps: f64,
    pub latency: Latencies,
    /// Scheduled time to actual send: the load generator's own lag (all
    /// requests). Where it dominates `latency`, the client was starved of
    /// CPU, not the server slow.
    pub send_lag: Latencies,
    /// Actual send to response (successful requests): `latency` without
    /// the send lag.
    pub service: Latencies,
    pub cutover_count: usize,
    pub cutovers_ok: usize,
    /// Time from each phase to the next, over all cutovers (ms), from the
    /// times in baton's events.
    pub phases_ms: BTreeMap<String, Stat>,
    /// The new version's READY=1 to the old version's drain signal, from
    /// the apps' own stamps (see [`crate::stamps`]).
    pub cutover_latency_ms: Option<Stat>,
    /// The new version's READY=1 to its first response at the load
    /// generator (negative: it answered before saying READY).
    pub ready_to_first_response_ms: Option<Stat>,
    /// Rollback runs: from sending `rollback` to the first response from
    /// the old generation's same process on a new connection (see
    /// [`crate::steering`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback_ms: Option<Stat>,
    pub failed_in_windows: u64,
    pub failed_outside_windows: u64,
    /// Runs under baton: the latency inside the cutover windows, by what
    /// was happening when the request was scheduled ([`STAGES`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub latency_by_stage: BTreeMap<&'static str, Latency>,
    /// Latency per ms around the cutovers' start, all cutovers together.
    pub profile: Vec<ProfilePoint>,
    pub cutovers: Vec<CutoverReport>,
    pub failures: Vec<FailureNote>,
    pub supervisor: Option<Resources>,
    /// The load generator's CPU over the run, % of one core.
    pub client_cpu_pct: Option<f64>,
    /// The whole machine's CPU use over the run, % of all cores.
    pub machine_busy_pct: Option<f64>,
    /// baton and its generations (runs under baton), % of one core.
    pub target_cpu_pct: Option<f64>,
    /// CPU used by anything else on the machine during the run, % of one
    /// core (kernel work on behalf of the run included): high values mean
    /// the run was disturbed.
    pub other_cpu_pct: Option<f64>,
}

impl RunReport {
    /// p99 (ms) of each stage of the cutover windows that has requests.
    pub fn p99_by_stage(&self) -> BTreeMap<&'static str, f64> {
        self.latency_by_stage
            .iter()
            .map(|(stage, l)| (*stage, l.p99_ms))
            .collect()
    }
}

pub fn by_cause(records: &[Record]) -> BTreeMap<&'static str, u64> {
    let mut m: BTreeMap<&'static str, u64> = Cause::ALL.iter().map(|c| (c.name(), 0)).collect();
    for c in records.iter().filter_map(Record::failed) {
        *m.entry(c.name()).or_default() += 1;
    }
    m
}

/// Requests scheduled inside `[a, b]` (records are sorted by schedule).
fn range(records: &[Record], a: i64, b: i64) -> &[Record] {
    let lo = records.partition_point(|r| i64::from(r.sched_us) < a);
    let hi = records.partition_point(|r| i64::from(r.sched_us) <= b);
    &records[lo..hi.max(lo)]
}

fn window_stats(records: &[Record]) -> WindowStats {
    let mut h = new_hist();
    let mut w = WindowStats::default();
    for r in records {
        w.requests += 1;
        w.retried += u64::from(r.retried);
        if r.failed().is_some() {
            w.failed += 1;
        } else {
            h.saturating_record(r.latency_us().max(1));
        }
    }
    let l = latency_of(&h);
    w.p99_ms = l.p99_ms;
    w.max_ms = l.max_ms;
    w
}

/// Durations between consecutive phases (named `a→b`), and in total.
fn phase_stats(cutovers: &[Cutover]) -> BTreeMap<String, Stat> {
    let mut durations: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for c in cutovers.iter().filter(|c| c.ok) {
        for pair in c.phases.windows(2) {
            durations
                .entry(format!("{}→{}", pair[0].name, pair[1].name))
                .or_default()
                .push((pair[1].at_us - pair[0].at_us) as f64 / 1e3);
        }
        durations
            .entry("total".into())
            .or_default()
            .push((c.end_us - c.start_us) as f64 / 1e3);
    }
    durations
        .into_iter()
        .filter_map(|(k, v)| stat(v).map(|s| (k, s)))
        .collect()
}

/// The last phase of `c` at or before `t` (or `before_start`), and the ms
/// from it to `t`.
fn phase_at(c: &Cutover, t: i64) -> (String, f64) {
    match c.phases.iter().rev().find(|p| p.at_us <= t) {
        Some(p) => (p.name.clone(), (t - p.at_us) as f64 / 1e3),
        None => ("before_start".into(), (t - c.start_us) as f64 / 1e3),
    }
}

/// Places a failure relative to the cutover whose window holds its start
/// (or the nearest one): which phase it started after, and which it ended
/// after.
fn place(r: &Record, cutovers: &[Cutover]) -> FailureNote {
    let t = i64::from(r.start_us);
    let near = cutovers.iter().min_by_key(|c| {
        if t < c.start_us {
            c.start_us - t
        } else if t > c.end_us {
            t - c.end_us
        } else {
            0
        }
    });
    let start = near.map(|c| phase_at(c, t));
    let end = near.map(|c| phase_at(c, i64::from(r.end_us)));
    FailureNote {
        cause: r.failed().unwrap_or(Cause::Client),
        retried: r.retried,
        start_ms: r.start_us as f64 / 1e3,
        end_ms: r.end_us as f64 / 1e3,
        cutover: near.map(|c| c.index),
        after_phase: start.as_ref().map(|s| s.0.clone()),
        since_phase_ms: start.map(|s| s.1),
        end_after_phase: end.as_ref().map(|s| s.0.clone()),
        end_since_phase_ms: end.map(|s| s.1),
    }
}

pub fn analyze(run: &RunData) -> (RunReport, Split) {
    let records = &run.load.records;
    let w = windows(&run.cutovers, PAD_US);
    let s = split(records, &w, WARMUP_US);
    let (mut succeeded, mut failed, mut retried) = (0, 0, 0);
    let (mut failed_in, mut failed_out) = (0, 0);
    let mut failures = Vec::new();
    for r in records {
        retried += u64::from(r.retried);
        if r.failed().is_some() {
            failed += 1;
            if in_windows(&w, i64::from(r.sched_us)) {
                failed_in += 1;
            } else {
                failed_out += 1;
            }
            if failures.len() < FAILURES_LISTED {
                failures.push(place(r, &run.cutovers));
            }
        } else {
            succeeded += 1;
        }
    }
    let secs = (run.load.ended_us.saturating_sub(run.load.started_us)) as f64 / 1e6;
    let cutovers: Vec<CutoverReport> = run
        .cutovers
        .iter()
        .map(|c| CutoverReport {
            cutover: c.clone(),
            window: window_stats(range(records, c.start_us - PAD_US, c.end_us + PAD_US)),
        })
        .collect();
    let report = RunReport {
        name: run.spec.name.clone(),
        target: run.spec.target.clone(),
        conn: run.spec.load.conn.name(),
        model: run.spec.load.model,
        concurrency: run.spec.load.concurrency,
        duration_s: (secs * 1e3).round() / 1e3,
        sent: records.len() as u64,
        succeeded,
        failed,
        failed_by_cause: by_cause(records),
        retried,
        unsent: run.load.unsent,
        throughput_rps: if secs > 0.0 {
            (succeeded as f64 / secs).round()
        } else {
            0.0
        },
        latency: s.latencies(),
        send_lag: split_by(records, &w, WARMUP_US, |r| {
            Some(u64::from(r.start_us.saturating_sub(r.sched_us)))
        })
        .latencies(),
        service: split_by(records, &w, WARMUP_US, |r| {
            r.failed()
                .is_none()
                .then(|| u64::from(r.end_us.saturating_sub(r.start_us)))
        })
        .latencies(),
        cutover_count: run.cutovers.len(),
        cutovers_ok: run.cutovers.iter().filter(|c| c.ok).count(),
        phases_ms: phase_stats(&run.cutovers),
        cutover_latency_ms: stat_of(&run.cutovers, |c| c.cutover_latency_us),
        ready_to_first_response_ms: stat_of(&run.cutovers, |c| c.ready_to_first_response_us),
        rollback_ms: rollback_stat(&run.cutovers),
        failed_in_windows: failed_in,
        failed_outside_windows: failed_out,
        latency_by_stage: by_stage(records, &run.cutovers),
        profile: if run.cutovers.is_empty() {
            Vec::new()
        } else {
            profile(records, &run.cutovers, PROFILE_MS)
        },
        cutovers,
        failures,
        supervisor: resources(&run.samples),
        client_cpu_pct: run.client_cpu_pct.map(|p| p.round()),
        machine_busy_pct: run.machine_busy_pct.map(|p| p.round()),
        target_cpu_pct: run.target_cpu_pct.map(|p| p.round()),
        other_cpu_pct: run.other_cpu_pct.map(|p| p.round()),
    };
    (report, s)
}

/// Latency by time since the cutovers began, all cutovers of a run
/// superimposed: where in a cutover the latency rises, and whether the
/// load generator's lag or the server's service time makes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ProfilePoint {
    /// Start of the 1 ms slice, ms from the cutover's start (scheduled time).
    pub offset_ms: i64,
    pub requests: u64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub lag_p99_ms: f64,
    pub service_p99_ms: f64,
}

/// Profile slices from `from_ms` to `to_ms` around each cutover's start.
pub const PROFILE_MS: (i64, i64) = (-5, 20);

pub fn profile(
    records: &[Record],
    cutovers: &[Cutover],
    (from_ms, to_ms): (i64, i64),
) -> Vec<ProfilePoint> {
    let n = (to_ms - from_ms).max(0) as usize;
    let mut lat: Vec<Vec<u64>> = vec![Vec::new(); n];
    let mut lag: Vec<Vec<u64>> = vec![Vec::new(); n];
    let mut svc: Vec<Vec<u64>> = vec![Vec::new(); n];
    for c in cutovers {
        let (a, b) = (c.start_us + from_ms * 1000, c.start_us + to_ms * 1000 - 1);
        for r in range(records, a, b) {
            let i = ((i64::from(r.sched_us) - a) / 1000) as usize;
            lag[i].push(u64::from(r.start_us.saturating_sub(r.sched_us)));
            if r.failed().is_none() {
                lat[i].push(r.latency_us());
                svc[i].push(u64::from(r.end_us.saturating_sub(r.start_us)));
            }
        }
    }
    let pct = |v: &mut Vec<u64>, q: f64| {
        if v.is_empty() {
            return 0.0;
        }
        v.sort_unstable();
        v[((v.len() - 1) as f64 * q).round() as usize] as f64 / 1e3
    };
    (0..n)
        .map(|i| ProfilePoint {
            offset_ms: from_ms + i as i64,
            requests: lag[i].len() as u64,
            p99_ms: pct(&mut lat[i], 0.99),
            max_ms: pct(&mut lat[i], 1.0),
            lag_p99_ms: pct(&mut lag[i], 0.99),
            service_p99_ms: pct(&mut svc[i], 0.99),
        })
        .collect()
}

/// One 100 ms slice of a run, by completion time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Bucket {
    pub t_s: f64,
    /// Successful completions, scaled to a per-second rate.
    pub rps: f64,
    pub failed: u64,
    pub retried: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// When each cutover of `run` began, in seconds on the run's clock (for
/// marking them on a timeline).
pub fn cutover_starts_s(run: &RunData) -> Vec<f64> {
    run.cutovers
        .iter()
        .map(|c| c.start_us as f64 / 1e6)
        .collect()
}

/// The run cut into `bucket_us` slices by completion time.
pub fn timeline(records: &[Record], bucket_us: u32) -> Vec<Bucket> {
    let Some(last) = records.iter().map(|r| r.end_us).max() else {
        return Vec::new();
    };
    let n = (last / bucket_us) as usize + 1;
    let mut lat: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut out: Vec<Bucket> = (0..n)
        .map(|i| Bucket {
            t_s: (i as f64 + 0.5) * f64::from(bucket_us) / 1e6,
            ..Bucket::default()
        })
        .collect();
    for r in records {
        let i = (r.end_us / bucket_us) as usize;
        out[i].retried += u64::from(r.retried);
        if r.failed().is_some() {
            out[i].failed += 1;
        } else {
            lat[i].push(r.latency_us() as u32);
        }
    }
    for (b, l) in out.iter_mut().zip(lat.iter_mut()) {
        if l.is_empty() {
            continue;
        }
        l.sort_unstable();
        let at = |q: f64| f64::from(l[((l.len() - 1) as f64 * q).round() as usize]) / 1e3;
        b.rps = l.len() as f64 * 1e6 / f64::from(bucket_us);
        b.p50_ms = at(0.5);
        b.p99_ms = at(0.99);
        b.max_ms = at(1.0);
    }
    out
}

fn fmt_lat(l: &Latency) -> String {
    format!(
        "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms  (n={})",
        l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
    )
}

/// A readable block about one run.
pub fn text(r: &RunReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let model = match r.model {
        Model::Open { rate } => format!("open loop {rate:.0} req/s"),
        Model::Closed => "closed loop".into(),
    };
    let _ = writeln!(
        s,
        "== {}: {} / {} / {}, {} workers, {:.1} s",
        r.name, r.target, r.conn, model, r.concurrency, r.duration_s
    );
    let causes: Vec<String> = r
        .failed_by_cause
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    let _ = writeln!(
        s,
        "   sent {}  succeeded {}  failed {}{}  retried {}{}  throughput {:.0} req/s",
        r.sent,
        r.succeeded,
        r.failed,
        if causes.is_empty() {
            String::new()
        } else {
            format!(" ({})", causes.join(", "))
        },
        r.retried,
        if r.unsent > 0 {
            format!("  unsent at end {}", r.unsent)
        } else {
            String::new()
        },
        r.throughput_rps
    );
    if r.cutover_count == 0 {
        let _ = writeln!(s, "   latency   {}", fmt_lat(&r.latency.all));
    } else {
        let _ = writeln!(s, "   steady    {}", fmt_lat(&r.latency.steady));
        let _ = writeln!(s, "   cutovers  {}", fmt_lat(&r.latency.cutover));
        for stage in STAGES {
            if let Some(l) = r.latency_by_stage.get(stage) {
                let _ = writeln!(s, "     {stage:<8}  {}", fmt_lat(l));
            }
        }
        let _ = writeln!(
            s,
            "   {} cutovers ({} ok); failures in windows {}, outside {}",
            r.cutover_count, r.cutovers_ok, r.failed_in_windows, r.failed_outside_windows
        );
        for (k, v) in &r.phases_ms {
            let _ = writeln!(
                s,
                "     {k:<34} median {:8.3}  p90 {:8.3}  max {:8.3} ms",
                v.median, v.p90, v.max
            );
        }
        let outside = [
            ("cutover latency (app stamps)", &r.cutover_latency_ms),
            (
                "READY=1 → first new response",
                &r.ready_to_first_response_ms,
            ),
        ];
        if let Some(v) = &r.rollback_ms {
            let _ = writeln!(
                s,
                "     {:<34} median {:8.3}  p90 {:8.3}  max {:8.3} ms  (n={})",
                "rollback → old process answers", v.median, v.p90, v.max, v.n
            );
        }
        for (k, v) in outside {
            match v {
                Some(v) => {
                    let _ = writeln!(
                        s,
                        "     {k:<34} median {:8.3}  p90 {:8.3}  max {:8.3} ms  (n={})",
                        v.median, v.p90, v.max, v.n
                    );
                }
                None if r.target.starts_with("baton") => {
                    let _ = writeln!(s, "     {k:<34} no data");
                }
                None => {}
            }
        }
    }
    let _ = writeln!(
        s,
        "   CPU: load generator {:.0}% of a core, machine {:.0}% busy{}",
        r.client_cpu_pct.unwrap_or(f64::NAN),
        r.machine_busy_pct.unwrap_or(f64::NAN),
        match (r.target_cpu_pct, r.other_cpu_pct) {
            (Some(t), Some(o)) =>
                format!("; baton and the app {t:.0}% of a core, everything else {o:.0}% of a core"),
            _ => String::new(),
        }
    );
    if matches!(r.model, Model::Open { .. }) {
        let pair = |name: &str, l: &Latencies| {
            if r.cutover_count == 0 {
                format!("   {name:<9} {}\n", fmt_lat(&l.all))
            } else {
                format!(
                    "   {name:<9} p99 steady {:.3} ms, in cutover windows {:.3} ms; max {:.3} / {:.3} ms\n",
                    l.steady.p99_ms, l.cutover.p99_ms, l.steady.max_ms, l.cutover.max_ms
                )
            }
        };
        s.push_str(&pair("send lag", &r.send_lag));
        s.push_str(&pair("service", &r.service));
    }
    if !r.profile.is_empty() {
        let line = |f: fn(&ProfilePoint) -> f64| {
            r.profile
                .iter()
                .map(|p| format!("{:.1}", f(p)))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let _ = writeln!(
            s,
            "   by ms since the cutover began ({}..{} ms), all cutovers together:",
            PROFILE_MS.0,
            PROFILE_MS.1 - 1
        );
        let _ = writeln!(s, "     p99 latency  {}", line(|p| p.p99_ms));
        let _ = writeln!(s, "     p99 send lag {}", line(|p| p.lag_p99_ms));
        let _ = writeln!(s, "     p99 service  {}", line(|p| p.service_p99_ms));
    }
    if let Some(res) = &r.supervisor {
        let _ = writeln!(
            s,
            "   supervisor RSS {}..{} kB (first {}, last {}), CPU {:.2}% of a core",
            res.rss_kb_min, res.rss_kb_max, res.rss_kb_first, res.rss_kb_last, res.cpu_pct
        );
    }
    for f in r.failures.iter().take(5) {
        let _ = writeln!(
            s,
            "   failure: {} at {:.1} ms, cutover {}: sent {:.3} ms after {}, failed {:.3} ms after {}",
            f.cause.name(),
            f.start_ms,
            f.cutover.map_or("-".into(), |c| c.to_string()),
            f.since_phase_ms.unwrap_or(0.0),
            f.after_phase.as_deref().unwrap_or("-"),
            f.end_since_phase_ms.unwrap_or(0.0),
            f.end_after_phase.as_deref().unwrap_or("-")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Outcome;
    use crate::cutover::Phase;

    fn rec(sched: u32, lat: u32, outcome: Outcome) -> Record {
        Record {
            sched_us: sched,
            start_us: sched,
            end_us: sched + lat,
            outcome,
            retried: false,
        }
    }

    fn cut(index: u32, start: i64, end: i64) -> Cutover {
        Cutover {
            index,
            ok: true,
            error: None,
            start_us: start,
            end_us: end,
            phases: vec![
                Phase {
                    name: "requested".into(),
                    at_us: start,
                },
                Phase {
                    name: "exited".into(),
                    at_us: end,
                },
            ],
            ..Cutover::new(index, start)
        }
    }

    #[test]
    fn window_latency_is_split_by_the_stage_of_the_cutover() {
        // A baton cutover: requested at 1 s, active at 1.01 s, the old
        // generation told to drain at 1.11 s and gone at 1.12 s.
        let mut c = cut(0, 1_000_000, 1_120_000);
        c.mark("active", 1_010_000);
        c.mark("draining", 1_110_000);
        let records = [
            rec(400_000, 9_000, Outcome::Ok),   // steady: in no stage
            rec(950_000, 1_000, Outcome::Ok),   // padding before: starting
            rec(1_005_000, 2_000, Outcome::Ok), // starting
            rec(1_050_000, 3_000, Outcome::Ok), // moving
            rec(1_115_000, 4_000, Outcome::Ok), // exiting
            rec(1_200_000, 5_000, Outcome::Ok), // padding after: exiting
            rec(1_116_000, 80_000, Outcome::Failed(Cause::Refused)), // failed: left out
            rec(1_300_000, 9_000, Outcome::Ok), // after the window
        ];
        let by = by_stage(&records, std::slice::from_ref(&c));
        // (HDR histograms keep 3 significant digits: the max is rounded.)
        let max = |stage: &str| (by[stage].count, by[stage].max_ms.round());
        assert_eq!(max("starting"), (2, 2.0));
        assert_eq!(max("moving"), (1, 3.0));
        assert_eq!(max("exiting"), (2, 5.0));
        // With no request in a stage, it has no figure (rather than 0 ms).
        let by = by_stage(&records[..3], std::slice::from_ref(&c));
        assert_eq!(by.keys().copied().collect::<Vec<_>>(), ["starting"]);
        // Deploys without baton's marks (naive, a proxy) have no stages.
        assert!(by_stage(&records, &[cut(0, 1_000_000, 1_120_000)]).is_empty());
    }

    #[test]
    fn windows_are_padded_and_merged() {
        let c = [
            cut(0, 1_000_000, 1_050_000),
            cut(1, 1_200_000, 1_210_000),
            cut(2, 3_000_000, 3_000_000),
        ];
        let w = windows(&c, 100_000);
        assert_eq!(w, vec![(900_000, 1_310_000), (2_900_000, 3_100_000)]);
        assert!(in_windows(&w, 900_000));
        assert!(in_windows(&w, 1_310_000));
        assert!(!in_windows(&w, 1_310_001));
        assert!(!in_windows(&w, 899_999));
        assert!(in_windows(&w, 3_000_000));
        assert!(!in_windows(&w, 5_000_000));
        assert!(!in_windows(&[], 0));
    }

    #[test]
    fn split_separates_steady_cutover_and_warmup() {
        let w = vec![(1_000_000, 2_000_000)];
        let records = [
            rec(100_000, 50_000, Outcome::Ok),  // warm-up: only in `all`
            rec(600_000, 100, Outcome::Ok),     // steady
            rec(700_000, 200, Outcome::Ok),     // steady
            rec(1_500_000, 9_000, Outcome::Ok), // cutover
            rec(1_600_000, 1, Outcome::Failed(Cause::Reset)), // failures excluded
        ];
        let s = split(&records, &w, 500_000);
        assert_eq!(s.all.len(), 4);
        assert_eq!(s.steady.len(), 2);
        assert_eq!(s.cutover.len(), 1);
        assert_eq!(s.steady.max(), 200);
        assert!(s.cutover.max() >= 8_990);
    }

    #[test]
    fn latency_counts_from_the_schedule() {
        let r = Record {
            sched_us: 1_000,
            start_us: 5_000, // sent late: the target was stalled
            end_us: 5_100,
            outcome: Outcome::Ok,
            retried: false,
        };
        assert_eq!(r.latency_us(), 4_100);
    }

    #[test]
    fn stats_and_causes() {
        let s = stat(vec![5.0, 1.0, 3.0, 2.0, 4.0]).expect("stat");
        assert_eq!(
            s,
            Stat {
                median: 3.0,
                p90: 5.0,
                max: 5.0,
                n: 5
            }
        );
        assert!(stat(vec![]).is_none());
        let mut c = [cut(0, 0, 1), cut(1, 0, 1), cut(2, 0, 1)];
        c[0].cutover_latency_us = Some(40);
        c[2].cutover_latency_us = Some(1_500);
        let s = stat_of(&c, |c| c.cutover_latency_us).expect("stat");
        assert_eq!((s.median, s.max, s.n), (1.5, 1.5, 2));
        c[2].ok = false; // a failed cutover is left out, as in the phases
        let s = stat_of(&c, |c| c.cutover_latency_us).expect("stat");
        assert_eq!((s.median, s.max, s.n), (0.04, 0.04, 1));
        assert_eq!(stat_of(&c, |c| c.first_response_us), None);
        let records = [
            rec(0, 1, Outcome::Failed(Cause::Refused)),
            rec(0, 1, Outcome::Failed(Cause::Refused)),
            rec(0, 1, Outcome::Ok),
        ];
        let m = by_cause(&records);
        assert_eq!(m["refused"], 2);
        assert_eq!(m["reset"], 0);
        assert_eq!(m.len(), Cause::ALL.len());
    }

    #[test]
    fn rollback_stat_counts_only_returns_to_the_same_process() {
        use crate::cutover::AppId;
        use crate::steering::RollbackNote;
        let note = |latency_us: Option<i64>, same_pid: Option<bool>| RollbackNote {
            to: AppId {
                generation: 1,
                pid: Some(100),
            },
            sent_us: 0,
            latency_us,
            opened_after_us: latency_us.map(|l| l - 100),
            probes: 1,
            probe_failures: 0,
            answered_pid: Some(100),
            same_pid,
        };
        let mut c = [cut(0, 0, 1), cut(1, 0, 1), cut(2, 0, 1), cut(3, 0, 1)];
        c[0].rollback = Some(note(Some(2_500), Some(true)));
        c[1].rollback = Some(note(Some(900), Some(false))); // a restart
        c[2].rollback = Some(note(None, None)); // never came back
        c[3].rollback = Some(note(Some(4_000), Some(true)));
        let s = rollback_stat(&c).expect("stat");
        assert_eq!((s.median, s.max, s.n), (4.0, 4.0, 2));
        assert_eq!(rollback_stat(&c[1..3]), None);
        assert_eq!(rollback_stat(&[cut(0, 0, 1)]), None);
    }

    #[test]
    fn answered_before_ready_counts_negative_ready_to_first_response() {
        let mut c = [cut(0, 0, 1), cut(1, 0, 1), cut(2, 0, 1), cut(3, 0, 1)];
        c[0].ready_to_first_response_us = Some(-50);
        c[1].ready_to_first_response_us = Some(0);
        c[2].ready_to_first_response_us = Some(1_200);
        c[3].ready_to_first_response_us = Some(-1);
        assert_eq!(answered_before_ready(&c), 2);
        c[3].ok = false; // a failed cutover is left out
        assert_eq!(answered_before_ready(&c), 1);
    }

    #[test]
    fn failures_are_placed_after_the_last_phase() {
        let c = [cut(0, 1_000_000, 1_050_000), cut(1, 2_000_000, 2_050_000)];
        let r = rec(1_060_000, 10, Outcome::Failed(Cause::ClosedBeforeResponse));
        let f = place(&r, &c);
        assert_eq!(f.cutover, Some(0));
        assert_eq!(f.after_phase.as_deref(), Some("exited"));
        assert_eq!(f.since_phase_ms, Some(10.0));
        let r = rec(1_990_000, 10, Outcome::Failed(Cause::Reset));
        let f = place(&r, &c);
        assert_eq!(f.cutover, Some(1));
        assert_eq!(f.after_phase.as_deref(), Some("before_start"));
        assert_eq!(f.since_phase_ms, Some(-10.0));
        assert_eq!(f.end_after_phase.as_deref(), Some("before_start"));
        let r = rec(
            1_040_000,
            20_000,
            Outcome::Failed(Cause::ClosedBeforeResponse),
        );
        let f = place(&r, &c);
        assert_eq!(f.after_phase.as_deref(), Some("requested"));
        assert_eq!(f.end_after_phase.as_deref(), Some("exited"));
        assert_eq!(f.end_since_phase_ms, Some(10.0));
    }

    #[test]
    fn run_report_json_shape() {
        use crate::load::{Clock, ConnMode, LoadOutput, LoadSpec};
        use crate::measure::RunSpec;
        let records = vec![
            rec(600_000, 100, Outcome::Ok),
            rec(1_010_000, 900, Outcome::Ok),
            rec(1_020_000, 5, Outcome::Failed(Cause::ClosedBeforeResponse)),
            rec(2_000_000, 120, Outcome::Ok),
        ];
        let run = RunData {
            spec: RunSpec {
                name: "t".into(),
                target: "baton".into(),
                addr: "127.0.0.1:1".parse().expect("addr"),
                load: LoadSpec {
                    model: Model::Open { rate: 1000.0 },
                    conn: ConnMode::Close,
                    concurrency: 4,
                    timeout: std::time::Duration::from_secs(1),
                    threads: 1,
                },
                duration: std::time::Duration::ZERO,
                plan: None,
                sample_pid: None,
                tree_pid: None,
                stamps: None,
                quiet: true,
            },
            clock: Clock::with_wall(0),
            load: LoadOutput {
                records,
                started_us: 0,
                ended_us: 2_000_000,
                unsent: 0,
                first_response: BTreeMap::new(),
            },
            cutovers: vec![{
                let mut c = cut(0, 1_000_000, 1_015_000);
                c.cutover_latency_us = Some(60);
                c
            }],
            samples: vec![],
            client_cpu_pct: Some(12.0),
            machine_busy_pct: None,
            target_cpu_pct: None,
            other_cpu_pct: None,
        };
        let (r, split) = analyze(&run);
        assert_eq!((r.sent, r.succeeded, r.failed), (4, 3, 1));
        assert_eq!(r.failed_in_windows, 1);
        assert_eq!(r.cutovers[0].window.requests, 2);
        assert_eq!(split.cutover.len(), 1);
        assert_eq!(split.steady.len(), 2);
        assert_eq!(r.failures[0].after_phase.as_deref(), Some("exited"));
        let v = serde_json::to_value(&r).expect("serializes");
        assert_eq!(v["model"]["kind"], "open");
        assert_eq!(v["conn"], "close");
        assert_eq!(v["failed_by_cause"]["closed_before_response"], 1);
        assert!(v["latency"]["steady"]["p99_ms"].is_number());
        assert!(v["latency"]["cutover"]["p999_ms"].is_number());
        assert_eq!(v["cutovers"][0]["phases"][0]["name"], "requested");
        assert_eq!(v["cutovers"][0]["window"]["failed"], 1);
        assert_eq!(v["cutover_latency_ms"]["median"], 0.06);
        assert_eq!(v["cutover_latency_ms"]["n"], 1);
        assert!(v["ready_to_first_response_ms"].is_null());
        assert!(v.get("supervisor_share_ms").is_none());
        assert_eq!(v["failures"][0]["cause"], "closed_before_response");
    }

    #[test]
    fn profile_superimposes_cutovers() {
        let c = [cut(0, 1_000_000, 1_004_000), cut(1, 2_000_000, 2_004_000)];
        let records = [
            rec(999_500, 100, Outcome::Ok),   // -1 ms slice
            rec(1_000_200, 900, Outcome::Ok), // 0 ms slice
            rec(2_000_900, 300, Outcome::Ok), // 0 ms slice of cutover 1
            rec(2_001_000, 50, Outcome::Ok),  // 1 ms slice
            rec(5_000_000, 1, Outcome::Ok),   // outside
        ];
        let p = profile(&records, &c, (-2, 3));
        assert_eq!(p.len(), 5);
        assert_eq!(p[0].offset_ms, -2);
        assert_eq!(p[1].requests, 1);
        assert_eq!(p[2].requests, 2);
        assert_eq!(p[2].max_ms, 0.9);
        assert_eq!(p[3].requests, 1);
        assert_eq!(p[4].requests, 0);
    }

    #[test]
    fn timeline_buckets_by_completion() {
        let records = [
            rec(0, 10_000, Outcome::Ok),
            rec(50_000, 10_000, Outcome::Ok),
            rec(150_000, 20_000, Outcome::Failed(Cause::Timeout)),
        ];
        let t = timeline(&records, 100_000);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].rps, 20.0);
        assert_eq!(t[0].p50_ms, 10.0);
        assert_eq!(t[1].failed, 1);
        assert_eq!(t[1].rps, 0.0);
    }
}
