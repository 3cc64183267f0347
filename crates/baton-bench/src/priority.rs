//! The candidate's CPU priority (`baton run --candidate-priority`),
//! setting against setting: what each does to the clients' latency inside
//! cutover windows, and what it costs the new version (its time to ready).
//!
//! For every setting (default `normal` and `idle`), traffic mode and
//! connection mode, a fresh baton runs the example app under open-loop
//! load at a fraction of the app's own ceiling (measured first, closed
//! loop, the app alone) while it is upgraded every `--interval`. Per run:
//!
//! - p99 latency in cutover windows and in the steady state, and their
//!   ratio (the target: ≤ 1.5), with the send lag (the load
//!   generator's own delay) and the service time (sent → answered) apart;
//! - the cost: upgrade requested → candidate ready, and spawned → ready
//!   (baton's events), and the app's own `start` → `ready` stamps
//!   (`HELLO_STAMPS`, CLOCK_MONOTONIC): how much longer a lowered
//!   candidate takes to start;
//! - failed and retried requests, and the CPU other processes took.
//!
//! With `--rounds N` the settings run N times, in turn (the order reversed
//! every other round), so that drift on a shared machine hits each alike.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::cli::PriorityArgs;
use crate::cutover::{self};
use crate::load::{ConnMode, LoadSpec, Model};
use crate::measure::{self, RunSpec};
use crate::procs::{self, Bins, Scratch};
use crate::report::{self, stat, Latency, Stat};
use crate::schedule::CutoverPlan;
use crate::stamps::Stamps;
use crate::summary::{loadavg, machine, Machine};
use crate::BenchError;

/// One setting, traffic mode and connection mode, once.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub priority: String,
    pub traffic: String,
    pub conn: &'static str,
    pub round: u32,
    pub rate: f64,
    pub cutovers: usize,
    pub cutovers_ok: usize,
    pub requests: u64,
    pub failed: u64,
    pub failed_by_cause: BTreeMap<&'static str, u64>,
    pub retried: u64,
    pub latency_steady: Latency,
    pub latency_cutover: Latency,
    /// p99 in each stage of the cutover windows ([`report::STAGES`]).
    pub p99_by_stage_ms: BTreeMap<&'static str, f64>,
    /// p99 in cutover windows / steady p99.
    pub p99_ratio: Option<f64>,
    pub send_lag_p99_ms: (f64, f64),
    pub service_p99_ms: (f64, f64),
    /// Upgrade requested → candidate ready (baton's events).
    pub requested_to_ready_ms: Option<Stat>,
    /// Candidate spawned → ready (baton's events).
    pub spawned_to_ready_ms: Option<Stat>,
    /// The new app's `start` → `ready` stamps.
    pub start_to_ready_ms: Option<Stat>,
    /// CPU that neither the load generator nor baton's tree used, % of
    /// one core.
    pub other_cpu_pct: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub machine: Machine,
    /// The app alone's closed-loop ceiling per connection mode (req/s), if
    /// measured (no `--rate`).
    pub ceilings: BTreeMap<&'static str, f64>,
    pub failed: u64,
    pub runs: Vec<Run>,
}

pub fn run(args: &PriorityArgs) -> Result<Summary, BenchError> {
    if args.cutovers == 0 || args.rounds == 0 || args.priorities.is_empty() {
        return Err(BenchError::Usage(
            "--cutovers, --rounds and --priorities must not be zero or empty".into(),
        ));
    }
    if let Some(rate) = args.rate {
        if !rate.is_finite() || rate <= 0.0 {
            return Err(BenchError::Usage(format!("bad --rate {rate}")));
        }
    }
    for t in &args.traffic {
        if t != "steered" && t != "shared" {
            return Err(BenchError::Usage(format!(
                "bad --traffic {t:?}: steered or shared"
            )));
        }
    }
    let bins = Bins {
        baton: procs::sibling("baton", args.baton.as_deref()).map_err(BenchError::Env)?,
        app: procs::sibling("hello", args.app.as_deref()).map_err(BenchError::Env)?,
        haproxy: None,
    };
    std::fs::create_dir_all(&args.out).map_err(BenchError::io("creating the output directory"))?;
    let scratch =
        Scratch::new("priority").map_err(BenchError::io("creating a scratch directory"))?;
    let mut m = machine();
    m.loadavg_start = loadavg();
    let mut ceilings = BTreeMap::new();
    let mut rates = BTreeMap::new();
    for &conn in &args.modes {
        let rate = match args.rate {
            Some(r) => r,
            None => {
                let c = ceiling(args, &bins, conn)?;
                ceilings.insert(conn.name(), c);
                (c * args.rate_fraction).max(1.0)
            }
        };
        rates.insert(conn.name(), rate);
    }
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        let mut order: Vec<&String> = args.priorities.iter().collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for &conn in &args.modes {
            for traffic in &args.traffic {
                for priority in &order {
                    let rate = rates[conn.name()];
                    let setting = Setting {
                        priority,
                        traffic,
                        conn,
                        round,
                        rate,
                    };
                    runs.push(run_one(args, &bins, &scratch.0, &setting)?);
                }
            }
        }
    }
    m.loadavg_end = loadavg();
    Ok(Summary {
        machine: m,
        ceilings,
        failed: runs.iter().map(|r| r.failed).sum(),
        runs,
    })
}

/// The app alone's closed-loop throughput, median of 3 one-second rounds.
fn ceiling(args: &PriorityArgs, bins: &Bins, conn: ConnMode) -> Result<f64, BenchError> {
    let port = procs::free_port().map_err(BenchError::io("finding a free port"))?;
    let log = args.out.join("priority-app-alone.log");
    let mut app =
        procs::spawn_app(&bins.app, port, &log).map_err(BenchError::io("starting the app"))?;
    if !procs::wait_accepting(procs::loopback(port), Duration::from_secs(10)) {
        return Err(BenchError::Env(format!(
            "the app did not start; see {}",
            log.display()
        )));
    }
    let mut rounds = Vec::new();
    for i in 0..3 {
        let spec = RunSpec {
            name: format!("priority-ceiling-{}-{}", conn.name(), i + 1),
            target: "app".into(),
            addr: procs::loopback(port),
            load: LoadSpec {
                model: Model::Closed,
                conn,
                concurrency: args.concurrency.max(1),
                timeout: args.timeout,
                threads: 1,
            },
            duration: Duration::from_secs(1),
            plan: None,
            sample_pid: None,
            tree_pid: Some(app.pid()),
            stamps: None,
            quiet: args.quiet,
        };
        let (data, _) = measure::measure(spec, None).map_err(BenchError::io("running the load"))?;
        rounds.push(report::analyze(&data).0.throughput_rps);
    }
    let _ = app.terminate(Duration::from_secs(5));
    let s = stat(rounds).ok_or_else(|| BenchError::Env("no ceiling measured".into()))?;
    eprintln!(
        "baton-bench priority: the app alone, {}: {:.0} req/s (median of 3)",
        conn.name(),
        s.median
    );
    Ok(s.median)
}

struct Setting<'a> {
    priority: &'a str,
    traffic: &'a str,
    conn: ConnMode,
    round: u32,
    rate: f64,
}

fn run_one(
    args: &PriorityArgs,
    bins: &Bins,
    scratch: &Path,
    s: &Setting<'_>,
) -> Result<Run, BenchError> {
    let name = format!(
        "priority-{}-{}-{}-{}",
        s.priority.replace(':', ""),
        s.traffic,
        s.conn.name(),
        s.round
    );
    eprintln!(
        "baton-bench priority: {name}: {} cutovers at {:.0} req/s",
        args.cutovers, s.rate
    );
    let port = procs::free_port().map_err(BenchError::io("finding a free port"))?;
    let control = scratch.join(format!("{name}.sock"));
    let stamps = args.out.join(format!("{name}-stamps.txt"));
    let _ = std::fs::remove_file(&stamps);
    let log = args.out.join(format!("{name}-baton.log"));
    let _ = std::fs::remove_file(&log);
    let run_flags = [
        "--candidate-priority".to_owned(),
        s.priority.to_owned(),
        "--traffic".to_owned(),
        s.traffic.to_owned(),
    ];
    let baton = procs::spawn_baton_with(bins, port, &control, Some(&stamps), &log, &run_flags, &[])
        .map_err(BenchError::Env)?;
    let spec = RunSpec {
        name,
        target: format!("baton-{}", s.traffic),
        addr: procs::loopback(port),
        load: LoadSpec::open(s.rate, s.conn, args.concurrency, args.timeout),
        duration: Duration::ZERO,
        plan: Some(CutoverPlan {
            lead: Duration::from_secs(1),
            interval: args.interval,
            count: args.cutovers,
            tail: Duration::from_secs(1),
        }),
        sample_pid: Some(baton.pid()),
        tree_pid: Some(baton.pid()),
        stamps: Some(stamps.clone()),
        quiet: args.quiet,
    };
    let data = measure::under_baton(spec, &control, baton)?;
    let (rep, _) = report::analyze(&data);
    let stamps = Stamps::read(&stamps).map_err(BenchError::io("reading the stamps"))?;
    let ok: Vec<&cutover::Cutover> = data.cutovers.iter().filter(|c| c.ok).collect();
    let between = |from: &str, to: &str| {
        stat(
            ok.iter()
                .filter_map(|c| Some((c.phase(to)? - c.phase(from)?) as f64 / 1e3))
                .collect(),
        )
    };
    let start_to_ready = stat(stamps.start_to_ready_ms(&data.cutovers));
    let steady = rep.latency.steady.p99_ms;
    Ok(Run {
        priority: s.priority.to_owned(),
        traffic: s.traffic.to_owned(),
        conn: s.conn.name(),
        round: s.round,
        rate: s.rate,
        cutovers: rep.cutover_count,
        cutovers_ok: rep.cutovers_ok,
        requests: rep.sent,
        failed: rep.failed,
        failed_by_cause: rep.failed_by_cause.clone(),
        retried: rep.retried,
        p99_ratio: (steady > 0.0).then(|| rep.latency.cutover.p99_ms / steady),
        send_lag_p99_ms: (rep.send_lag.steady.p99_ms, rep.send_lag.cutover.p99_ms),
        service_p99_ms: (rep.service.steady.p99_ms, rep.service.cutover.p99_ms),
        latency_steady: rep.latency.steady,
        latency_cutover: rep.latency.cutover,
        p99_by_stage_ms: rep.p99_by_stage(),
        requested_to_ready_ms: between("requested", "ready"),
        spawned_to_ready_ms: between("spawned", "ready"),
        start_to_ready_ms: start_to_ready,
        other_cpu_pct: rep.other_cpu_pct,
    })
}

/// The readable summary: one table row per run.
pub fn text(s: &Summary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let m = &s.machine;
    let _ = writeln!(
        out,
        "baton-bench priority: the candidate's CPU priority, setting against setting"
    );
    let _ = writeln!(out, "{m}");
    for (conn, c) in &s.ceilings {
        let _ = writeln!(out, "the app alone, {conn}: {c:.0} req/s");
    }
    let _ = writeln!(
        out,
        "\n{:<8} {:<8} {:<10} {:>3} {:>7} {:>6} {:>7} {:>7} {:>9} {:>9} {:>6} {:>20} {:>17} {:>17} {:>17} {:>6}",
        "priority",
        "traffic",
        "conn",
        "rnd",
        "req/s",
        "ok",
        "failed",
        "retried",
        "p99 stdy",
        "p99 cut",
        "ratio",
        "p99 start/move/exit",
        "req->ready ms",
        "spawn->ready ms",
        "app start->ready",
        "other%"
    );
    for r in &s.runs {
        let _ = writeln!(
            out,
            "{:<8} {:<8} {:<10} {:>3} {:>7.0} {:>6} {:>7} {:>7} {:>9.3} {:>9.3} {:>6} {:>20} {:>17} {:>17} {:>17} {:>6}",
            r.priority,
            r.traffic,
            r.conn,
            r.round,
            r.rate,
            format!("{}/{}", r.cutovers_ok, r.cutovers),
            r.failed,
            r.retried,
            r.latency_steady.p99_ms,
            r.latency_cutover.p99_ms,
            r.p99_ratio.map_or("-".into(), |x| format!("{x:.2}")),
            report::STAGES
                .iter()
                .map(|st| r.p99_by_stage_ms.get(st).map_or("-".into(), |v| format!("{v:.2}")))
                .collect::<Vec<_>>()
                .join("/"),
            report::fmt_stat(&r.requested_to_ready_ms, 2),
            report::fmt_stat(&r.spawned_to_ready_ms, 2),
            report::fmt_stat(&r.start_to_ready_ms, 2),
            r.other_cpu_pct.map_or("-".into(), |p| format!("{p:.0}")),
        );
    }
    let _ = writeln!(
        out,
        "\n(times: median / p90 / max; send lag p99 steady/cut and service p99 steady/cut are in the JSON)"
    );
    out
}
