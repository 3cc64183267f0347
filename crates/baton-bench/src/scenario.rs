//! The comparison, start to end, in one process so that every figure comes
//! from the same machine in the same minute:
//!
//! 1. the app alone and the app under baton, both running; their closed-loop
//!    ceilings measured alternately (so drift hits both alike), giving the
//!    throughput ratio;
//! 2. baton idle for a few seconds (its idle CPU);
//! 3. open-loop load at a fraction of the app's ceiling while baton upgrades
//!    every interval, once per connection mode; then (full scenario) the
//!    same load while app processes merely start and stop beside it, the
//!    control experiment;
//! 4. the naive deploy (stop, then start) under the same load;
//! 5. HAProxy with a seamless reload in front of two app instances, if
//!    installed.
//!
//! The summary and the targets are in [`crate::summary`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use crate::cli::ScenarioArgs;
use crate::cutover::{self, Deployer, Haproxy, Naive};
use crate::load::{ConnMode, LoadSpec, Model};
use crate::measure::{self, RunData, RunSpec};
use crate::procs::{self, Bins, Proc};
use crate::procstat::{self, Sample};
use crate::report::{self, RunReport};
use crate::schedule::CutoverPlan;
use crate::summary::{
    loadavg, machine, median, ratio, targets, Ceiling, Comparison, Machine, Summary, Supervisor,
};
use crate::BenchError;

/// Durations and counts of one scenario.
#[derive(Debug, Clone)]
pub struct Preset {
    pub name: &'static str,
    /// Closed-loop measurement length (each target, each mode, each round).
    pub ceiling: Duration,
    pub ceiling_rounds: u32,
    pub idle: Duration,
    /// Measure idle CPU again after the cutovers.
    pub idle_after: bool,
    pub cutovers: u32,
    pub interval: Duration,
    pub lead: Duration,
    pub tail: Duration,
    pub naive_cutovers: u32,
    pub naive_interval: Duration,
    pub naive_modes: Vec<ConnMode>,
    pub haproxy_ceiling: Duration,
    pub haproxy_cutovers: u32,
    pub haproxy_interval: Duration,
    pub haproxy_modes: Vec<ConnMode>,
    /// A missing HAProxy is an error (exit 2) rather than a skipped part.
    pub require_haproxy: bool,
    /// The control experiment: process starts and stops with no cutover,
    /// under the same load (0: skipped).
    pub control_spawns: u32,
}

impl Preset {
    pub fn quick() -> Preset {
        Preset {
            name: "quick",
            ceiling: Duration::from_millis(1_000),
            ceiling_rounds: 4,
            idle: Duration::from_secs(2),
            idle_after: false,
            cutovers: 8,
            interval: Duration::from_secs(1),
            lead: Duration::from_millis(700),
            tail: Duration::from_millis(500),
            naive_cutovers: 3,
            naive_interval: Duration::from_secs(1),
            naive_modes: vec![ConnMode::Close],
            haproxy_ceiling: Duration::from_millis(1_500),
            haproxy_cutovers: 3,
            haproxy_interval: Duration::from_secs(1),
            haproxy_modes: vec![ConnMode::Close],
            require_haproxy: false,
            control_spawns: 0,
        }
    }

    pub fn full() -> Preset {
        Preset {
            name: "full",
            ceiling: Duration::from_millis(1_500),
            ceiling_rounds: 6,
            idle: Duration::from_secs(5),
            idle_after: true,
            cutovers: 200,
            interval: Duration::from_millis(500),
            lead: Duration::from_secs(1),
            tail: Duration::from_secs(1),
            naive_cutovers: 10,
            naive_interval: Duration::from_secs(1),
            naive_modes: vec![ConnMode::KeepAlive, ConnMode::Close],
            haproxy_ceiling: Duration::from_secs(3),
            haproxy_cutovers: 10,
            haproxy_interval: Duration::from_secs(1),
            haproxy_modes: vec![ConnMode::KeepAlive, ConnMode::Close],
            require_haproxy: true,
            control_spawns: 40,
        }
    }
}

/// Scratch space for the control socket (short path: Unix socket paths
/// are limited to 108 bytes), removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> std::io::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("baton-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A run's report plus what the summary merges across runs.
struct Done {
    report: RunReport,
    steady: Histogram<u64>,
    cutover: Histogram<u64>,
}

struct Ctx<'a> {
    args: &'a ScenarioArgs,
    out: PathBuf,
    logs: PathBuf,
    files: Vec<String>,
}

impl Ctx<'_> {
    fn spec(&self, name: &str, target: &str, port: u16, model: Model, conn: ConnMode) -> RunSpec {
        RunSpec {
            name: name.into(),
            target: target.into(),
            addr: procs::loopback(port),
            load: LoadSpec {
                model,
                conn,
                concurrency: self.args.concurrency,
                timeout: self.args.timeout,
                threads: self.args.client_threads,
            },
            duration: Duration::ZERO,
            plan: None,
            sample_pid: None,
            tree_pid: None,
            stamps: None,
            quiet: self.args.quiet,
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    /// Analyses a run, draws its timeline if it had cutovers.
    fn finish(&mut self, run: &RunData, plot_to: Option<&Path>) -> Done {
        let (report, split) = report::analyze(run);
        eprint!("{}", report::text(&report));
        if !run.cutovers.is_empty() {
            let buckets = report::timeline(&run.load.records, 100_000);
            let starts = report::cutover_starts_s(run);
            let end = run.load.ended_us as f64 / 1e6;
            let what = match report.target.as_str() {
                "naive" => "deploys (stop, then start)",
                "haproxy" => "deploys (new app, reload HAProxy)",
                "spawn-only" => "app starts and stops beside baton, no cutover",
                _ => "cutovers",
            };
            let title = format!(
                "{}: {} {what}, {} load at {}",
                report.target,
                run.cutovers.len(),
                report.conn,
                match report.model {
                    Model::Open { rate } => format!("{rate:.0} req/s (open loop)"),
                    Model::Closed => "max (closed loop)".into(),
                }
            );
            // The whole run in the output directory; the first seconds
            // (small enough to commit) where --plot says.
            let path = self.out.join(format!("timeline-{}.svg", report.name));
            let span = end.min(self.args.plot_span.as_secs_f64());
            let excerpt = plot_to.map(|p| (p, format!("{title} (first {span:.0} s)"), span));
            for (p, title, to) in
                std::iter::once((path.as_path(), title.clone(), end)).chain(excerpt)
            {
                match crate::plot::timeline_svg(p, &title, &buckets, &starts, (0.0, to)) {
                    Ok(()) => self.files.push(p.display().to_string()),
                    Err(e) => eprintln!("baton-bench: {e}"),
                }
            }
        }
        Done {
            report,
            steady: split.steady,
            cutover: split.cutover,
        }
    }
}

/// `--plot FILE` for the first connection mode, `FILE-MODE.svg` for others.
fn plot_path(base: &Path, index: usize, mode: ConnMode) -> PathBuf {
    if index == 0 {
        return base.to_owned();
    }
    sibling_plot(base, mode.name())
}

/// `FILE-SUFFIX.svg` beside `--plot FILE`.
fn sibling_plot(base: &Path, suffix: &str) -> PathBuf {
    let stem = base
        .file_stem()
        .map_or("timeline".into(), |s| s.to_string_lossy().into_owned());
    base.with_file_name(format!("{stem}-{suffix}.svg"))
}

fn closed_loop(
    ctx: &mut Ctx<'_>,
    name: &str,
    target: &str,
    port: u16,
    conn: ConnMode,
    secs: Duration,
    (sample_pid, tree_pid): (Option<i32>, Option<i32>),
) -> Result<Done, BenchError> {
    let mut spec = ctx.spec(name, target, port, Model::Closed, conn);
    spec.duration = secs;
    spec.sample_pid = sample_pid;
    spec.tree_pid = tree_pid;
    let (run, _) = measure::measure(spec, None).map_err(BenchError::io("running the load"))?;
    Ok(ctx.finish(&run, None))
}

fn comparison(done: &[Done]) -> Comparison {
    let mut c = Comparison::default();
    let (mut steady, mut cut) = (report::new_hist(), report::new_hist());
    for d in done {
        let r = &d.report;
        c.cutovers += r.cutover_count;
        c.requests += r.sent;
        c.failed += r.failed;
        c.retried += r.retried;
        for (k, v) in &r.failed_by_cause {
            *c.failed_by_cause.entry(k).or_default() += v;
        }
        let _ = steady.add(&d.steady);
        let _ = cut.add(&d.cutover);
    }
    c.p99_steady_ms = report::latency_of(&steady).p99_ms;
    c.p99_cutover_ms = report::latency_of(&cut).p99_ms;
    c
}

/// Runs the scenario; returns the summary (the caller prints it).
pub fn run(preset: Preset, args: &ScenarioArgs) -> Result<Summary, BenchError> {
    let t_start = Instant::now();
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut preset = preset;
    if let Some(n) = args.cutovers {
        preset.cutovers = n;
    }
    if let Some(i) = args.interval {
        preset.interval = i;
    }
    if !(0.01..=1.0).contains(&args.rate_fraction) || args.concurrency == 0 || args.modes.is_empty()
    {
        return Err(BenchError::Usage(
            "--rate-fraction must be in [0.01, 1], --concurrency and --modes non-empty".into(),
        ));
    }
    let bins = Bins {
        baton: procs::sibling("baton", args.baton.as_deref()).map_err(BenchError::Env)?,
        app: procs::sibling("hello", args.app.as_deref()).map_err(BenchError::Env)?,
        haproxy: if args.no_haproxy {
            None
        } else {
            args.haproxy.clone().or_else(|| procs::on_path("haproxy"))
        },
    };
    if bins.haproxy.is_none() && preset.require_haproxy && !args.no_haproxy {
        return Err(BenchError::Env(
            "haproxy not found: run benches/setup.sh, pass --haproxy PATH, or --no-haproxy".into(),
        ));
    }
    let loadavg_start = loadavg();
    if loadavg_start
        .split_whitespace()
        .next()
        .and_then(|l| l.parse::<f64>().ok())
        .is_some_and(|l| l > 0.5)
    {
        eprintln!(
            "baton-bench: warning: load average {loadavg_start}: other work on this machine will make the figures noisy"
        );
    }
    let out = args.out.clone();
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).map_err(BenchError::io("creating the output directory"))?;
    let scratch = Scratch::new().map_err(BenchError::io("creating a scratch directory"))?;
    let control = scratch.0.join("ctl").join("control.sock");
    // The apps under baton stamp READY=1 and their drain signal here.
    let stamps = out.join("app-stamps.txt");
    match std::fs::remove_file(&stamps) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(BenchError::Io {
                what: "removing the previous run's stamps",
                source: e,
            })
        }
        _ => {}
    }
    let mut ctx = Ctx {
        args,
        out,
        logs,
        files: Vec::new(),
    };
    let port = || procs::free_port().map_err(BenchError::io("finding a free port"));

    // 1. Both targets up; ceilings measured alternately.
    let app_port = port()?;
    let baton_port = port()?;
    let mut app = procs::spawn_app(&bins.app, app_port, &ctx.log("app-alone"))
        .map_err(BenchError::io("starting the app"))?;
    if !procs::wait_accepting(procs::loopback(app_port), Duration::from_secs(10)) {
        return Err(BenchError::Env(format!(
            "the app did not start; see {}",
            ctx.log("app-alone").display()
        )));
    }
    let baton = procs::spawn_baton(
        &bins,
        baton_port,
        &control,
        Some(&stamps),
        &ctx.log("baton"),
    )
    .map_err(BenchError::Env)?;
    let baton_pid = baton.pid();
    let start_sample = procstat::sample(baton_pid, 0);
    eprintln!(
        "baton-bench {}: baton pid {baton_pid} on 127.0.0.1:{baton_port}, app alone on 127.0.0.1:{app_port}",
        preset.name
    );

    // 2. Idle CPU before any load.
    let idle = measure::idle_samples(baton_pid, preset.idle);

    let mut ceilings: Vec<Ceiling> = Vec::new();
    let mut ratio_by_mode = BTreeMap::new();
    let mut rate_of: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut runs: Vec<RunReport> = Vec::new();
    for &mode in &args.modes {
        let (mut alone, mut under) = (Vec::new(), Vec::new());
        let (mut alone_p99, mut under_p99) = (0.0f64, 0.0f64);
        for round in 0..preset.ceiling_rounds {
            // Alternate which goes first, so a drift affects both alike.
            let order = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for under_baton in order {
                let (target, p, pid, tree) = if under_baton {
                    ("baton", baton_port, Some(baton_pid), Some(baton_pid))
                } else {
                    ("app", app_port, None, Some(app.pid()))
                };
                let name = format!("ceiling-{target}-{}-{}", mode.name(), round + 1);
                let d = closed_loop(
                    &mut ctx,
                    &name,
                    target,
                    p,
                    mode,
                    preset.ceiling,
                    (pid, tree),
                )?;
                if under_baton {
                    under.push(d.report.throughput_rps);
                    under_p99 = under_p99.max(d.report.latency.all.p99_ms);
                } else {
                    alone.push(d.report.throughput_rps);
                    alone_p99 = alone_p99.max(d.report.latency.all.p99_ms);
                }
                runs.push(d.report);
            }
        }
        // Each round measures both back to back (alternating which goes
        // first, so a slow drift hits both alike); the ratio is the median
        // of the rounds' ratios, so one round disturbed by something else
        // on the machine does not decide it.
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (a, b) = (mean(&alone), mean(&under));
        let pairs: Vec<f64> = alone
            .iter()
            .zip(&under)
            .map(|(a, b)| ratio(*b, *a))
            .collect();
        ratio_by_mode.insert(mode.name(), median(pairs));
        rate_of.insert(mode.name(), (a * args.rate_fraction).round().max(1.0));
        ceilings.push(Ceiling {
            target: "app".into(),
            conn: mode.name(),
            rps: a.round(),
            rounds: alone,
            p99_ms: alone_p99,
        });
        ceilings.push(Ceiling {
            target: "baton".into(),
            conn: mode.name(),
            rps: b.round(),
            rounds: under,
            p99_ms: under_p99,
        });
    }
    app.terminate(Duration::from_secs(5));
    drop(app);

    // 3. Cutovers under baton.
    let plan = |count, interval| CutoverPlan {
        lead: preset.lead,
        interval,
        count,
        tail: preset.tail,
    };
    let mut deployer = Some(Deployer::Baton(
        cutover::BatonDeploy::new(control.clone()).map_err(BenchError::io("starting a runtime"))?,
    ));
    let mut baton_done: Vec<Done> = Vec::new();
    let mut cutover_samples: Vec<Sample> = Vec::new();
    for (i, &mode) in args.modes.iter().enumerate() {
        let rate = rate_of[mode.name()];
        let name = format!("baton-{}-cutovers", mode.name());
        let mut spec = ctx.spec(&name, "baton", baton_port, Model::Open { rate }, mode);
        spec.plan = Some(plan(preset.cutovers, preset.interval));
        spec.sample_pid = Some(baton_pid);
        spec.stamps = Some(stamps.clone());
        let (run, dep) =
            measure::measure(spec, deployer.take()).map_err(BenchError::io("running the load"))?;
        deployer = dep;
        cutover_samples.extend(run.samples.iter().copied());
        let plot_to = args.plot.as_deref().map(|p| plot_path(p, i, mode));
        baton_done.push(ctx.finish(&run, plot_to.as_deref()));
    }
    // 3b. The control experiment: same load, same process churn, no cutover.
    let mut control_done = Vec::new();
    if preset.control_spawns > 0 {
        for &mode in &args.modes {
            let rate = rate_of[mode.name()];
            let name = format!("spawn-only-{}", mode.name());
            let mut spec = ctx.spec(&name, "spawn-only", baton_port, Model::Open { rate }, mode);
            spec.plan = Some(plan(preset.control_spawns, preset.interval));
            spec.sample_pid = Some(baton_pid);
            let dep = Deployer::SpawnOnly(cutover::SpawnOnly {
                app: bins.app.clone(),
                log: ctx.log("spawn-only-app"),
            });
            let (run, _) =
                measure::measure(spec, Some(dep)).map_err(BenchError::io("running the load"))?;
            control_done.push(ctx.finish(&run, None));
        }
    }
    let idle_after = if preset.idle_after {
        measure::idle_samples(baton_pid, preset.idle)
    } else {
        None
    };
    let end_sample = procstat::sample(baton_pid, 0);
    cutover::stop_baton(&control, baton);

    // 4. The naive deploy.
    let mut naive_done = Vec::new();
    for &mode in &preset.naive_modes {
        let p = port()?;
        let log = ctx.log("naive-app");
        let first =
            procs::spawn_app(&bins.app, p, &log).map_err(BenchError::io("starting the app"))?;
        if !procs::wait_accepting(procs::loopback(p), Duration::from_secs(10)) {
            return Err(BenchError::Env(
                "the app did not start for the naive deploy".into(),
            ));
        }
        let dep = Deployer::Naive(Naive {
            app: bins.app.clone(),
            port: p,
            log,
            current: Some(first),
        });
        let rate = rate_of.get(mode.name()).copied().unwrap_or(1000.0);
        let mut spec = ctx.spec(
            &format!("naive-{}-deploys", mode.name()),
            "naive",
            p,
            Model::Open { rate },
            mode,
        );
        spec.plan = Some(plan(preset.naive_cutovers, preset.naive_interval));
        let (run, dep) =
            measure::measure(spec, Some(dep)).map_err(BenchError::io("running the load"))?;
        drop(dep); // stops the last app
                   // The first naive run is drawn beside baton's, to show what it avoids.
        let plot_to = match &args.plot {
            Some(p) if naive_done.is_empty() => Some(sibling_plot(p, "naive")),
            _ => None,
        };
        naive_done.push(ctx.finish(&run, plot_to.as_deref()));
    }

    // 5. HAProxy.
    let mut reference = Comparison::default();
    let mut haproxy_done = Vec::new();
    match &bins.haproxy {
        None => {
            let why = if args.no_haproxy {
                "--no-haproxy".to_string()
            } else {
                "haproxy is not installed (run benches/setup.sh)".to_string()
            };
            eprintln!("baton-bench: skipping the HAProxy comparison: {why}");
            reference.skipped = Some(why);
        }
        Some(haproxy) => {
            match run_haproxy(
                &mut ctx,
                &preset,
                &bins,
                haproxy,
                &scratch.0,
                &rate_of,
                &mut ceilings,
            ) {
                Ok((done, r)) => {
                    haproxy_done = done;
                    reference.throughput_ratio = r;
                }
                Err(e) => {
                    eprintln!("baton-bench: HAProxy comparison failed: {e}");
                    reference.skipped = Some(e.to_string());
                }
            }
        }
    }
    if reference.skipped.is_none() {
        let skipped = reference.skipped.take();
        let ratio = reference.throughput_ratio;
        reference = comparison(&haproxy_done);
        reference.skipped = skipped;
        reference.throughput_ratio = ratio;
    }

    // Summary.
    let under = comparison(&baton_done);
    let naive = comparison(&naive_done);
    let baton_cutovers: Vec<cutover::Cutover> = baton_done
        .iter()
        .flat_map(|d| d.report.cutovers.iter().map(|c| c.cutover.clone()))
        .collect();
    let cutover_latency = report::stat_of(&baton_cutovers, |c| c.cutover_latency_us);
    let ready_to_first_response =
        report::stat_of(&baton_cutovers, |c| c.ready_to_first_response_us);
    let rss: Vec<u64> = cutover_samples
        .iter()
        .map(|s| s.rss_kb)
        .chain(start_sample.map(|s| s.rss_kb))
        .chain(end_sample.map(|s| s.rss_kb))
        .collect();
    let ticks = procstat::clock_ticks();
    let idle_pct = |s: &Option<(Sample, Sample)>| {
        s.as_ref()
            .and_then(|(a, b)| procstat::cpu_percent(a, b, ticks))
            .map(|p| (p * 1000.0).round() / 1000.0)
    };
    let idle_ticks = |s: &Option<(Sample, Sample)>| {
        s.as_ref()
            .map(|(a, b)| b.cpu_ticks.saturating_sub(a.cpu_ticks))
    };
    let supervisor = Supervisor {
        rss_kb_min: rss.iter().copied().min().unwrap_or(0),
        rss_kb_max: rss.iter().copied().max().unwrap_or(0),
        rss_kb_at_start: start_sample.map_or(0, |s| s.rss_kb),
        rss_kb_cutovers_first: cutover_samples.first().map_or(0, |s| s.rss_kb),
        rss_kb_cutovers_last: cutover_samples.last().map_or(0, |s| s.rss_kb),
        rss_kb_at_end: end_sample.map_or(0, |s| s.rss_kb),
        idle_seconds: preset.idle.as_secs_f64(),
        idle_cpu_pct: idle_pct(&idle).unwrap_or(f64::NAN),
        idle_cpu_ticks: idle_ticks(&idle).unwrap_or(0),
        idle_cpu_pct_after: idle_pct(&idle_after),
        idle_cpu_ticks_after: idle_ticks(&idle_after),
        cutover_runs_cpu_pct: {
            let cpu: Vec<f64> = baton_done
                .iter()
                .filter_map(|d| d.report.supervisor.map(|r| r.cpu_pct))
                .collect();
            (cpu.iter().sum::<f64>() / cpu.len().max(1) as f64 * 100.0).round() / 100.0
        },
    };
    let mut spawn_only = comparison(&control_done);
    if control_done.is_empty() {
        spawn_only.skipped = Some("only in the full scenario".into());
    }
    let mut runs_all = runs;
    let baton_reports: Vec<RunReport> = baton_done.iter().map(|d| d.report.clone()).collect();
    let control_reports: Vec<RunReport> = control_done.iter().map(|d| d.report.clone()).collect();
    let targets = targets(
        &preset,
        &baton_reports,
        &control_reports,
        &ratio_by_mode,
        &ceilings,
        cutover_latency.as_ref(),
        &supervisor,
        &naive,
    );
    runs_all.extend(baton_done.into_iter().map(|d| d.report));
    runs_all.extend(control_done.into_iter().map(|d| d.report));
    runs_all.extend(naive_done.into_iter().map(|d| d.report));
    runs_all.extend(haproxy_done.into_iter().map(|d| d.report));
    let summary = Summary {
        scenario: preset.name,
        version: env!("CARGO_PKG_VERSION"),
        started_unix,
        elapsed_s: (t_start.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine {
            loadavg_start,
            ..machine()
        },
        cutovers: under.cutovers,
        requests: under.requests,
        failed: under.failed,
        failed_by_cause: under.failed_by_cause.clone(),
        retried: under.retried,
        throughput_ratio: ratio_by_mode
            .get("keep-alive")
            .or_else(|| ratio_by_mode.values().next())
            .copied()
            .unwrap_or(0.0),
        throughput_ratio_by_mode: ratio_by_mode,
        p99_steady_ms: under.p99_steady_ms,
        p99_cutover_ms: under.p99_cutover_ms,
        cutover_latency_ms: cutover_latency,
        ready_to_first_response_ms: ready_to_first_response,
        supervisor,
        ceilings,
        naive,
        reference,
        spawn_only,
        targets,
        runs: runs_all,
        files: ctx.files,
    };
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
fn run_haproxy(
    ctx: &mut Ctx<'_>,
    preset: &Preset,
    bins: &Bins,
    haproxy: &Path,
    scratch: &Path,
    rate_of: &BTreeMap<&'static str, f64>,
    ceilings: &mut Vec<Ceiling>,
) -> Result<(Vec<Done>, Option<f64>), BenchError> {
    let port = || procs::free_port().map_err(BenchError::io("finding a free port"));
    let (front, a, b) = (port()?, port()?, port()?);
    let app_log = ctx.log("haproxy-app");
    let first: Proc =
        procs::spawn_app(&bins.app, a, &app_log).map_err(BenchError::io("starting the app"))?;
    if !procs::wait_accepting(procs::loopback(a), Duration::from_secs(10)) {
        return Err(BenchError::Env(
            "the app behind HAProxy did not start".into(),
        ));
    }
    let dir = scratch.join("haproxy");
    std::fs::create_dir_all(&dir).map_err(BenchError::io("creating the HAProxy directory"))?;
    let cfg = dir.join("haproxy.cfg");
    let threads = ctx.args.haproxy_threads.max(1);
    procs::write_atomic(&cfg, &procs::haproxy_config(front, a, &dir, threads))
        .map_err(BenchError::io("writing the HAProxy config"))?;
    let master =
        procs::spawn_haproxy(haproxy, &cfg, front, &ctx.log("haproxy")).map_err(BenchError::Env)?;
    let mut dep = Some(Deployer::Haproxy(Haproxy {
        master,
        cfg,
        dir,
        port: front,
        threads,
        app: bins.app.clone(),
        app_log,
        app_ports: [a, b],
        apps: [Some(first), None],
        active: 0,
    }));
    let mut done = Vec::new();
    let mut tp_ratio = None;
    for &mode in &preset.haproxy_modes {
        let d = closed_loop(
            ctx,
            &format!("ceiling-haproxy-{}", mode.name()),
            "haproxy",
            front,
            mode,
            preset.haproxy_ceiling,
            (None, None),
        )?;
        let ceiling = d.report.throughput_rps;
        let app = ceilings
            .iter()
            .find(|c| c.target == "app" && c.conn == mode.name())
            .map(|c| c.rps);
        if mode == ConnMode::KeepAlive || tp_ratio.is_none() {
            tp_ratio = app.map(|a| ratio(ceiling, a));
        }
        ceilings.push(Ceiling {
            target: "haproxy".into(),
            conn: mode.name(),
            rps: ceiling,
            rounds: vec![ceiling],
            p99_ms: d.report.latency.all.p99_ms,
        });
        // The same rate as baton's run, unless that overloads HAProxy.
        let rate = rate_of
            .get(mode.name())
            .copied()
            .unwrap_or(1000.0)
            .min((ceiling * ctx.args.rate_fraction).max(1.0))
            .round();
        let mut spec = ctx.spec(
            &format!("haproxy-{}-reloads", mode.name()),
            "haproxy",
            front,
            Model::Open { rate },
            mode,
        );
        spec.plan = Some(CutoverPlan {
            lead: preset.lead,
            interval: preset.haproxy_interval,
            count: preset.haproxy_cutovers,
            tail: preset.tail,
        });
        let (run, back) =
            measure::measure(spec, dep.take()).map_err(BenchError::io("running the load"))?;
        dep = back;
        done.push(ctx.finish(&run, None));
    }
    drop(dep);
    Ok((done, tp_ratio))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_paths_per_mode() {
        let base = Path::new("docs/bench-timeline.svg");
        assert_eq!(plot_path(base, 0, ConnMode::KeepAlive), base);
        assert_eq!(
            plot_path(base, 1, ConnMode::Close),
            Path::new("docs/bench-timeline-close.svg")
        );
        assert_eq!(
            sibling_plot(base, "naive"),
            Path::new("docs/bench-timeline-naive.svg")
        );
    }

    #[test]
    fn presets_are_bounded() {
        // quick must fit in a minute with room for process start-up.
        let q = Preset::quick();
        let modes = 2;
        let ceilings = q.ceiling * (2 * q.ceiling_rounds * modes);
        let cutovers = (q.lead + q.interval * q.cutovers + q.tail) * modes;
        let naive =
            (q.lead + q.naive_interval * q.naive_cutovers + q.tail) * q.naive_modes.len() as u32;
        let haproxy =
            (q.haproxy_ceiling + q.lead + q.haproxy_interval * q.haproxy_cutovers + q.tail)
                * q.haproxy_modes.len() as u32;
        let total = ceilings + q.idle + cutovers + naive + haproxy;
        assert!(total < Duration::from_secs(50), "{total:?}");
        let f = Preset::full();
        assert_eq!(f.cutovers, 200);
        let nominal = (f.lead + f.interval * f.cutovers + f.tail) * modes;
        assert!(nominal < Duration::from_secs(300), "{nominal:?}");
    }
}
