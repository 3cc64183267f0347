//! Upgrades without overlap (`baton run --overlap none`), measured from
//! outside baton. The app cannot run twice, so every upgrade leaves a gap
//! in which no app process runs: the old one drains and exits, then the
//! new one starts on the same socket, and clients wait in the kernel's
//! queue meanwhile. What that costs a client, per cutover:
//!
//! - `gap`: the old app's `exit` stamp → the new app's `start` stamp (no
//!   app process runs), as the two apps stamped it;
//! - `pause`: the old app's `exit` stamp → the first response from the new
//!   generation reaching the load generator;
//! - `longest_wait`: the slowest request in the cutover's window, timed by
//!   the client from its scheduled send (queueing included);
//! - `start_to_ready`: the new app's `start` → `ready` stamps.
//!
//! Where the gap goes, with baton's events placed between the stamps:
//! the old app's exit → baton sees it (`exited` event, once the process
//! group is empty) → baton has the new process running (`spawned`) → the
//! new app's `start` stamp.
//!
//! The stamps are the example app's (`HELLO_STAMPS`, CLOCK_MONOTONIC, see
//! [`crate::stamps`]); baton's events only name which processes a cutover
//! involved. And every request must succeed: none refused, none reset.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::cli::NoOverlapArgs;
use crate::cutover::Cutover;
use crate::load::{Clock, ConnMode, LoadSpec};
use crate::measure::{self, RunSpec};
use crate::procs::{self, Bins, Scratch};
use crate::report::{self, stat, Latency, Stat};
use crate::schedule::CutoverPlan;
use crate::stamps::{Event, Stamps};
use crate::summary::{loadavg, machine, Machine};
use crate::BenchError;

/// One connection mode's run.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub conn: &'static str,
    pub rate: f64,
    pub cutovers: usize,
    pub cutovers_ok: usize,
    pub requests: u64,
    pub failed: u64,
    pub failed_by_cause: BTreeMap<&'static str, u64>,
    pub retried: u64,
    pub gap_ms: Option<Stat>,
    pub pause_ms: Option<Stat>,
    pub longest_wait_ms: Option<Stat>,
    pub start_to_ready_ms: Option<Stat>,
    /// The gap, split at baton's events: exit stamp → `exited` event →
    /// `spawned` event → start stamp.
    pub exit_to_seen_ms: Option<Stat>,
    pub seen_to_spawned_ms: Option<Stat>,
    pub spawned_to_start_ms: Option<Stat>,
    pub latency_steady: Latency,
    pub latency_cutover: Latency,
    /// Each cutover: (gap, pause, longest wait) in ms, where measured.
    pub per_cutover: Vec<PerCutover>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PerCutover {
    pub index: u32,
    pub ok: bool,
    pub gap_ms: Option<f64>,
    pub pause_ms: Option<f64>,
    pub longest_wait_ms: f64,
    pub failed: u64,
    pub exit_to_seen_ms: Option<f64>,
    pub seen_to_spawned_ms: Option<f64>,
    pub spawned_to_start_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub machine: Machine,
    pub delay_ready_ms: u64,
    /// Failed requests over every run.
    pub failed: u64,
    pub runs: Vec<Run>,
}

pub fn run(args: &NoOverlapArgs) -> Result<Summary, BenchError> {
    if args.cutovers == 0 || !args.rate.is_finite() || args.rate <= 0.0 {
        return Err(BenchError::Usage(
            "--cutovers and --rate must be more than zero".into(),
        ));
    }
    let bins = Bins {
        baton: procs::sibling("baton", args.baton.as_deref()).map_err(BenchError::Env)?,
        app: procs::sibling("hello", args.app.as_deref()).map_err(BenchError::Env)?,
        haproxy: None,
    };
    std::fs::create_dir_all(&args.out).map_err(BenchError::io("creating the output directory"))?;
    let scratch =
        Scratch::new("no-overlap").map_err(BenchError::io("creating a scratch directory"))?;
    let mut m = machine();
    m.loadavg_start = loadavg();
    let mut runs = Vec::new();
    for &conn in &args.modes {
        runs.push(run_mode(args, &bins, &scratch.0, conn)?);
    }
    m.loadavg_end = loadavg();
    Ok(Summary {
        machine: m,
        delay_ready_ms: args.delay_ready,
        failed: runs.iter().map(|r| r.failed).sum(),
        runs,
    })
}

fn run_mode(
    args: &NoOverlapArgs,
    bins: &Bins,
    scratch: &std::path::Path,
    conn: ConnMode,
) -> Result<Run, BenchError> {
    let name = format!("no-overlap-{}", conn.name());
    let port = procs::free_port().map_err(BenchError::io("finding a free port"))?;
    let control = scratch.join(format!("{}.sock", conn.name()));
    let stamps = args.out.join(format!("{name}-stamps.txt"));
    let _ = std::fs::remove_file(&stamps);
    let log = args.out.join(format!("{name}-baton.log"));
    let run_flags = ["--overlap".to_owned(), "none".to_owned()];
    let app_args = if args.delay_ready > 0 {
        vec!["--delay-ready".to_owned(), args.delay_ready.to_string()]
    } else {
        Vec::new()
    };
    let baton = procs::spawn_baton_with(
        bins,
        port,
        &control,
        Some(&stamps),
        &log,
        &run_flags,
        &app_args,
    )
    .map_err(BenchError::Env)?;
    let spec = RunSpec {
        name,
        target: "baton".into(),
        addr: procs::loopback(port),
        load: LoadSpec::open(args.rate, conn, args.concurrency, args.timeout),
        duration: Duration::ZERO,
        plan: Some(CutoverPlan {
            lead: Duration::from_secs(1),
            interval: args.interval,
            count: args.cutovers,
            tail: Duration::from_secs(1),
        }),
        sample_pid: Some(baton.pid()),
        tree_pid: None,
        stamps: Some(stamps.clone()),
        quiet: args.quiet,
    };
    let data = measure::under_baton(spec, &control, baton)?;
    let (rep, _) = report::analyze(&data);
    let stamps = Stamps::read(&stamps).map_err(BenchError::io("reading the stamps"))?;
    let per_cutover: Vec<PerCutover> = rep
        .cutovers
        .iter()
        .map(|c| {
            let (gap_ms, pause_ms) = pause(&c.cutover, &stamps, &data.clock);
            let [exit_to_seen_ms, seen_to_spawned_ms, spawned_to_start_ms] =
                gap_parts(&c.cutover, &stamps, &data.clock);
            PerCutover {
                index: c.cutover.index,
                ok: c.cutover.ok,
                gap_ms,
                pause_ms,
                longest_wait_ms: c.window.max_ms,
                failed: c.window.failed,
                exit_to_seen_ms,
                seen_to_spawned_ms,
                spawned_to_start_ms,
            }
        })
        .collect();
    // Over the successful cutovers that have the figure.
    let over = |f: fn(&PerCutover) -> Option<f64>| {
        stat(per_cutover.iter().filter(|p| p.ok).filter_map(f).collect())
    };
    let start_to_ready = stamps.start_to_ready_ms(&data.cutovers);
    Ok(Run {
        conn: conn.name(),
        rate: args.rate,
        cutovers: rep.cutover_count,
        cutovers_ok: rep.cutovers_ok,
        requests: rep.sent,
        failed: rep.failed,
        failed_by_cause: rep.failed_by_cause.clone(),
        retried: rep.retried,
        gap_ms: over(|p| p.gap_ms),
        pause_ms: over(|p| p.pause_ms),
        longest_wait_ms: over(|p| Some(p.longest_wait_ms)),
        start_to_ready_ms: stat(start_to_ready),
        exit_to_seen_ms: over(|p| p.exit_to_seen_ms),
        seen_to_spawned_ms: over(|p| p.seen_to_spawned_ms),
        spawned_to_start_ms: over(|p| p.spawned_to_start_ms),
        latency_steady: rep.latency.steady,
        latency_cutover: rep.latency.cutover,
        per_cutover,
    })
}

/// A cutover's gap (old app's exit → new app's start) and pause (old app's
/// exit → the new generation's first response at the client), in ms.
fn pause(c: &Cutover, stamps: &Stamps, clock: &Clock) -> (Option<f64>, Option<f64>) {
    let exit = c
        .old_app
        .and_then(|a| stamps.find(Event::Exit, a.generation, a.pid));
    let start = c
        .new_app
        .and_then(|a| stamps.find(Event::Start, a.generation, a.pid));
    let gap = exit.zip(start).map(|(e, s)| ms_between(e.ns, s.ns));
    let pause = exit
        .and_then(|e| clock.mono_to_us(e.ns))
        .zip(c.first_response_us)
        .map(|(exit_us, first_us)| (first_us - exit_us) as f64 / 1e3);
    (gap, pause)
}

/// The gap split at baton's events (µs on the run's clock): the old app's
/// exit stamp → baton's `exited` event for it → baton's `spawned` event
/// for the new one → the new app's start stamp, in ms.
fn gap_parts(c: &Cutover, stamps: &Stamps, clock: &Clock) -> [Option<f64>; 3] {
    let on_clock = |event, app: Option<crate::cutover::AppId>| {
        app.and_then(|a| stamps.find(event, a.generation, a.pid))
            .and_then(|s| clock.mono_to_us(s.ns))
    };
    let exit = on_clock(Event::Exit, c.old_app);
    let start = on_clock(Event::Start, c.new_app);
    let (seen, spawned) = (c.phase("exited"), c.phase("spawned"));
    let between = |a: Option<i64>, b: Option<i64>| a.zip(b).map(|(a, b)| (b - a) as f64 / 1e3);
    [
        between(exit, seen),
        between(seen, spawned),
        between(spawned, start),
    ]
}

/// `b - a` in ms, from two CLOCK_MONOTONIC ns readings.
fn ms_between(a: u64, b: u64) -> f64 {
    (b as i128 - a as i128) as f64 / 1e6
}

fn fmt_stat(s: &Option<Stat>) -> String {
    match s {
        Some(s) => format!(
            "median {:.3}, p90 {:.3}, max {:.3} (n = {})",
            s.median, s.p90, s.max, s.n
        ),
        None => "not measured".into(),
    }
}

/// The readable summary.
pub fn text(s: &Summary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let m = &s.machine;
    let _ = writeln!(
        out,
        "baton-bench no-overlap: upgrades with `baton run --overlap none`, app start delay {} ms",
        s.delay_ready_ms
    );
    let _ = writeln!(out, "{m}");
    for r in &s.runs {
        let _ = writeln!(
            out,
            "\n{} at {:.0} req/s: {} of {} cutovers ok; {} requests, {} failed {:?}, {} retried",
            r.conn,
            r.rate,
            r.cutovers_ok,
            r.cutovers,
            r.requests,
            r.failed,
            r.failed_by_cause
                .iter()
                .filter(|(_, n)| **n > 0)
                .collect::<BTreeMap<_, _>>(),
            r.retried
        );
        let rows = [
            ("gap, old app exit -> new app start", &r.gap_ms),
            ("  old app exit -> baton sees it", &r.exit_to_seen_ms),
            (
                "  baton sees it -> new process spawned",
                &r.seen_to_spawned_ms,
            ),
            ("  spawned -> new app start", &r.spawned_to_start_ms),
            ("pause, old app exit -> first new response", &r.pause_ms),
            ("new app start -> ready", &r.start_to_ready_ms),
            ("longest request in each cutover window", &r.longest_wait_ms),
        ];
        for (what, figure) in rows {
            let _ = writeln!(
                out,
                "  {:<48} {}",
                format!("{what} (ms):"),
                fmt_stat(figure)
            );
        }
        let _ = writeln!(
            out,
            "  latency p99 steady {:.3} ms, in cutover windows {:.3} ms",
            r.latency_steady.p99_ms, r.latency_cutover.p99_ms
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cutover::AppId;

    #[test]
    fn gap_and_pause_come_from_the_apps_stamps_and_the_client() {
        // The run started at CLOCK_MONOTONIC 10 s.
        let clock = Clock::with_origins(0, 10_000_000_000);
        let stamps = Stamps::parse(
            "start 1 500 10000000000\n\
             drain 1 500 10500000000\n\
             exit 1 500 10502000000\n\
             start 2 501 10503500000\n\
             ready 2 501 10504000000\n",
        );
        let mut c = Cutover::new(0, 500_000);
        c.old_app = Some(AppId {
            generation: 1,
            pid: Some(500),
        });
        c.new_app = Some(AppId {
            generation: 2,
            pid: Some(501),
        });
        c.first_response_us = Some(504_700);
        let (gap, pause) = pause(&c, &stamps, &clock);
        assert_eq!(gap, Some(1.5));
        assert_eq!(pause, Some(2.7));
        // Without the new process's stamp there is no gap; without a new
        // response, no pause.
        c.new_app = Some(AppId {
            generation: 2,
            pid: Some(999),
        });
        c.first_response_us = None;
        assert_eq!(super::pause(&c, &stamps, &clock), (None, None));
    }
}
