//! The soak: one baton, a long run of cutovers under keep-alive load (by
//! default 1 000 cutovers and over a million requests), and what must not
//! drift while it runs: no request fails or is retried, and baton's RSS,
//! open descriptors and CPU per cutover are the same over the last hundred
//! cutovers as over the first.
//!
//! The load is measured by the client, as everywhere in the bench; baton's
//! RSS, descriptors (entries of /proc/PID/fd) and CPU time are read from
//! /proc every 100 ms by the bench, not reported by baton. The cutovers are
//! cut into blocks of 100; each block's figures are read at its last
//! cutover's end, and its CPU is the CPU baton used over the block divided
//! by its cutovers.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::cli::SoakArgs;
use crate::cutover::Cutover;
use crate::load::LoadSpec;
use crate::measure::{self, RunSpec};
use crate::procs::{self, Bins};
use crate::procstat::{self, Sample};
use crate::report::{self, Latency};
use crate::schedule::CutoverPlan;
use crate::summary::{loadavg, machine, Machine};
use crate::BenchError;

/// Cutovers per block.
pub const BLOCK: usize = 100;
/// What "flat" allows from the first block to the last.
pub const RSS_GROWTH_MAX_KB: i64 = 1024;
pub const FDS_CHANGE_MAX: i64 = 0;
pub const CPU_RATIO_MAX: f64 = 1.5;

/// One block of consecutive cutovers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Block {
    /// Cutover indices, first and last (from 0).
    pub cutovers: (u32, u32),
    /// Run time at the block's end, seconds.
    pub end_s: f64,
    pub rss_kb: u64,
    pub fds: Option<u64>,
    /// baton's CPU time over the block divided by its cutovers, ms.
    pub cpu_ms_per_cutover: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Flatness {
    pub rss_growth_kb: i64,
    pub fds_change: Option<i64>,
    pub cpu_ratio: Option<f64>,
    pub held: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub machine: Machine,
    pub commit_hint: &'static str,
    pub conn: &'static str,
    pub rate: f64,
    pub duration_s: f64,
    pub cutovers: usize,
    pub cutovers_ok: usize,
    pub requests: u64,
    pub failed: u64,
    pub failed_by_cause: std::collections::BTreeMap<&'static str, u64>,
    pub retried: u64,
    pub latency_steady: Latency,
    pub latency_cutover: Latency,
    pub blocks: Vec<Block>,
    pub flatness: Flatness,
    /// Every sample of baton, for the plot and for anyone re-analysing.
    pub samples: Vec<Sample>,
    pub files: Vec<String>,
}

pub fn run(args: &SoakArgs) -> Result<Summary, BenchError> {
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
        procs::Scratch::new("soak").map_err(BenchError::io("creating a scratch directory"))?;
    let mut m = machine();
    m.loadavg_start = loadavg();
    let port = procs::free_port().map_err(BenchError::io("finding a free port"))?;
    let control = scratch.0.join("soak.sock");
    let log = args.out.join("soak-baton.log");
    let baton = procs::spawn_baton_with(&bins, port, &control, None, &log, &[], &[])
        .map_err(BenchError::Env)?;
    let spec = RunSpec {
        name: "soak".into(),
        target: "baton".into(),
        addr: procs::loopback(port),
        load: LoadSpec::open(args.rate, args.conn, args.concurrency, args.timeout),
        duration: Duration::ZERO,
        plan: Some(CutoverPlan {
            lead: Duration::from_secs(2),
            interval: args.interval,
            count: args.cutovers,
            tail: Duration::from_secs(2),
        }),
        sample_pid: Some(baton.pid()),
        tree_pid: None,
        stamps: None,
        quiet: args.quiet,
    };
    let data = measure::under_baton(spec, &control, baton)?;
    m.loadavg_end = loadavg();
    let (rep, _) = report::analyze(&data);
    let blocks = blocks(
        &data.cutovers,
        &data.samples,
        BLOCK,
        procstat::clock_ticks(),
    );
    let flatness = flatness(&blocks);
    let mut files = Vec::new();
    let buckets = report::timeline(&data.load.records, 1_000_000);
    let starts = report::cutover_starts_s(&data);
    let end = buckets.last().map_or(1.0, |b| b.t_s + 1.0);
    let timeline = args.out.join("timeline-soak.svg");
    let title = format!(
        "baton-bench soak: {} cutovers, {} load at {:.0} req/s (1 s buckets)",
        rep.cutover_count,
        args.conn.name(),
        args.rate
    );
    match crate::plot::timeline_svg(&timeline, &title, &buckets, &starts, (0.0, end)) {
        Ok(()) => files.push(timeline.display().to_string()),
        Err(e) => eprintln!("baton-bench: {e}"),
    }
    let own = args.out.join("soak-supervisor.svg");
    for path in std::iter::once(own).chain(args.plot.iter().cloned()) {
        match supervisor_svg(&path, &data.samples, &blocks) {
            Ok(()) => files.push(path.display().to_string()),
            Err(e) => eprintln!("baton-bench: {e}"),
        }
    }
    Ok(Summary {
        machine: m,
        commit_hint: "the commit the binaries were built from (git log -1)",
        conn: args.conn.name(),
        rate: args.rate,
        duration_s: rep.duration_s,
        cutovers: rep.cutover_count,
        cutovers_ok: rep.cutovers_ok,
        requests: rep.sent,
        failed: rep.failed,
        failed_by_cause: rep.failed_by_cause.clone(),
        retried: rep.retried,
        latency_steady: rep.latency.steady,
        latency_cutover: rep.latency.cutover,
        blocks,
        flatness,
        samples: data.samples,
        files,
    })
}

/// The first sample at or after `t_us`, else the last one.
fn sample_at(samples: &[Sample], t_us: u64) -> Option<&Sample> {
    samples.iter().find(|s| s.t_us >= t_us).or(samples.last())
}

/// baton's CPU time between two samples, ms (nanoseconds where both have
/// them and they did not go back, else clock ticks).
fn cpu_ms(a: &Sample, b: &Sample, ticks_per_s: u64) -> f64 {
    match (a.cpu_ns, b.cpu_ns) {
        (Some(x), Some(y)) if y >= x => (y - x) as f64 / 1e6,
        _ => b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 * 1e3 / ticks_per_s as f64,
    }
}

/// Cuts the cutovers into blocks of `per` (a last, shorter block is left
/// out: it would not compare with the others) and reads baton at each
/// block's end.
pub fn blocks(cutovers: &[Cutover], samples: &[Sample], per: usize, ticks: u64) -> Vec<Block> {
    let mut out = Vec::new();
    let mut from = sample_at(samples, 0).copied();
    for chunk in cutovers.chunks_exact(per.max(1)) {
        let (first, last) = (&chunk[0], &chunk[chunk.len() - 1]);
        let end_us = last.end_us.max(last.start_us).max(0) as u64;
        let Some(at) = sample_at(samples, end_us).copied() else {
            break;
        };
        let cpu = from.map_or(0.0, |f| cpu_ms(&f, &at, ticks));
        out.push(Block {
            cutovers: (first.index, last.index),
            end_s: at.t_us as f64 / 1e6,
            rss_kb: at.rss_kb,
            fds: at.fds,
            cpu_ms_per_cutover: cpu / chunk.len() as f64,
        });
        from = Some(at);
    }
    out
}

/// First block against last: RSS growth, descriptor change, CPU ratio.
pub fn flatness(blocks: &[Block]) -> Flatness {
    let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
        return Flatness {
            rss_growth_kb: 0,
            fds_change: None,
            cpu_ratio: None,
            held: false,
        };
    };
    let rss_growth_kb = last.rss_kb as i64 - first.rss_kb as i64;
    let fds_change = first.fds.zip(last.fds).map(|(a, b)| b as i64 - a as i64);
    let cpu_ratio = (first.cpu_ms_per_cutover > 0.0)
        .then(|| last.cpu_ms_per_cutover / first.cpu_ms_per_cutover);
    let held = blocks.len() >= 2
        && rss_growth_kb < RSS_GROWTH_MAX_KB
        && fds_change.is_some_and(|d| d.abs() <= FDS_CHANGE_MAX)
        && cpu_ratio.is_some_and(|r| r <= CPU_RATIO_MAX);
    Flatness {
        rss_growth_kb,
        fds_change,
        cpu_ratio,
        held,
    }
}

/// Whether the soak held: every cutover ok, nothing failed or retried,
/// and baton flat.
pub fn held(s: &Summary) -> bool {
    s.failed == 0 && s.retried == 0 && s.cutovers_ok == s.cutovers && s.flatness.held
}

/// baton over the soak: RSS and open descriptors per sample, CPU per
/// cutover per block.
fn supervisor_svg(path: &Path, samples: &[Sample], blocks: &[Block]) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| format!("plot: {e}");
    let end = samples.last().map_or(1.0, |s| s.t_us as f64 / 1e6).max(1.0);
    let root = SVGBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, rest) = root.split_vertically(40);
    top.titled(
        "baton over the soak (read from /proc by the bench)",
        ("sans-serif", 20),
    )
    .map_err(|e| err(&e))?;
    let panels = rest.split_evenly((3, 1));
    type Get = fn(&Sample) -> Option<f64>;
    let series: [(&str, Get); 2] = [
        ("RSS, MB", |s| Some(s.rss_kb as f64 / 1024.0)),
        ("open descriptors", |s| s.fds.map(|n| n as f64)),
    ];
    for (area, (label, get)) in panels.iter().zip(series) {
        let points: Vec<(f64, f64)> = samples
            .iter()
            .filter_map(|s| Some((s.t_us as f64 / 1e6, get(s)?)))
            .collect();
        let top = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.25;
        let mut chart = ChartBuilder::on(area)
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..end, 0.0..top)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .y_desc(label)
            .light_line_style(WHITE)
            .draw()
            .map_err(|e| err(&e))?;
        chart
            .draw_series(LineSeries::new(points, BLACK.stroke_width(1)))
            .map_err(|e| err(&e))?;
    }
    let top = blocks
        .iter()
        .map(|b| b.cpu_ms_per_cutover)
        .fold(0.1, f64::max)
        * 1.25;
    let mut chart = ChartBuilder::on(&panels[2])
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..top)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .y_desc("CPU ms per cutover")
        .x_desc("seconds")
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(
            blocks
                .iter()
                .map(|b| Circle::new((b.end_s, b.cpu_ms_per_cutover), 4, BLACK.filled())),
        )
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// The readable summary.
pub fn text(s: &Summary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let m = &s.machine;
    let _ = writeln!(
        out,
        "baton-bench soak: {} of {} cutovers ok in {:.0} s, {} load at {:.0} req/s",
        s.cutovers_ok, s.cutovers, s.duration_s, s.conn, s.rate
    );
    let _ = writeln!(out, "{m}");
    let _ = writeln!(
        out,
        "requests {}, failed {}, retried {}; p99 steady {:.3} ms, in cutover windows {:.3} ms",
        s.requests, s.failed, s.retried, s.latency_steady.p99_ms, s.latency_cutover.p99_ms
    );
    let _ = writeln!(
        out,
        "{:>12} {:>8} {:>10} {:>6} {:>16}",
        "cutovers", "at s", "RSS kB", "fds", "CPU ms/cutover"
    );
    for b in &s.blocks {
        let _ = writeln!(
            out,
            "{:>12} {:>8.1} {:>10} {:>6} {:>16.3}",
            format!("{}-{}", b.cutovers.0, b.cutovers.1),
            b.end_s,
            b.rss_kb,
            b.fds.map_or("-".into(), |n| n.to_string()),
            b.cpu_ms_per_cutover
        );
    }
    let f = &s.flatness;
    let _ = writeln!(
        out,
        "first block -> last: RSS {:+} kB (< {RSS_GROWTH_MAX_KB}), fds {} (0), CPU per cutover x{} (<= {CPU_RATIO_MAX})",
        f.rss_growth_kb,
        f.fds_change.map_or("-".into(), |d| format!("{d:+}")),
        f.cpu_ratio.map_or("-".into(), |r| format!("{r:.2}")),
    );
    let _ = writeln!(
        out,
        "{}",
        if held(s) {
            "held: 0 failed, 0 retried, baton flat"
        } else {
            "NOT HELD"
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_s: f64, rss_kb: u64, cpu_ms: u64, fds: u64) -> Sample {
        Sample {
            t_us: (t_s * 1e6) as u64,
            rss_kb,
            cpu_ticks: cpu_ms / 10,
            cpu_ns: Some(cpu_ms * 1_000_000),
            fds: Some(fds),
        }
    }

    fn cutovers(n: u32, every_s: f64) -> Vec<Cutover> {
        (0..n)
            .map(|i| {
                let start = (1.0 + i as f64 * every_s) * 1e6;
                let mut c = Cutover::new(i, start as i64);
                c.end_us = (start + 0.1e6) as i64;
                c.ok = true;
                c
            })
            .collect()
    }

    #[test]
    fn blocks_read_baton_at_each_blocks_end() {
        // 250 cutovers, one a second: two whole blocks, the rest left out.
        let cs = cutovers(250, 1.0);
        let samples: Vec<Sample> = (0..300)
            .map(|t| sample(t as f64, 9000 + t, t * 2, 12))
            .collect();
        let b = blocks(&cs, &samples, 100, 100);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].cutovers, (0, 99));
        assert_eq!(b[1].cutovers, (100, 199));
        // Cutover 99 ends at 100.1 s: the sample at 101 s.
        assert_eq!(b[0].rss_kb, 9101);
        assert_eq!(b[0].end_s, 101.0);
        // 202 ms of CPU from the first sample to 101 s, over 100 cutovers.
        assert!((b[0].cpu_ms_per_cutover - 2.02).abs() < 1e-9, "{b:?}");
        assert!((b[1].cpu_ms_per_cutover - 2.0).abs() < 1e-9, "{b:?}");
        let f = flatness(&b);
        assert_eq!((f.rss_growth_kb, f.fds_change), (100, Some(0)));
        assert!(f.held, "{f:?}");
    }

    #[test]
    fn growth_a_leaked_descriptor_or_costlier_cutovers_break_flatness() {
        let block = |rss_kb, fds, cpu| Block {
            cutovers: (0, 99),
            end_s: 1.0,
            rss_kb,
            fds: Some(fds),
            cpu_ms_per_cutover: cpu,
        };
        let good = [block(9000, 12, 2.0), block(9500, 12, 2.5)];
        assert!(flatness(&good).held);
        assert!(!flatness(&[block(9000, 12, 2.0), block(10100, 12, 2.0)]).held);
        assert!(!flatness(&[block(9000, 12, 2.0), block(9000, 13, 2.0)]).held);
        assert!(!flatness(&[block(9000, 12, 2.0), block(9000, 12, 3.1)]).held);
        // One block compares with nothing.
        assert!(!flatness(&good[..1]).held);
    }
}
