//! The comparison, start to end, in one process so that every figure comes
//! from the same machine in the same minute:
//!
//! 1. the app alone and the app under two batons, one with steered traffic
//!    (the default) and one started with `--traffic shared`, all running;
//!    their closed-loop ceilings measured in turn (so drift hits all
//!    alike), giving the throughput ratios;
//! 2. the steered baton idle for a few seconds (its idle CPU);
//! 3. open-loop load at a fraction of the app's ceiling while a baton
//!    upgrades every interval, per connection mode and per traffic mode
//!    (steered and shared alternating); then (full scenario) the same load
//!    while app processes merely start and stop beside it, the control
//!    experiment;
//! 4. a steered baton with a bake window: under load, upgrades that do not
//!    wait for the bake, each rolled back, timed from outside; then a
//!    canary's share of new connections ([`crate::steering`]);
//! 5. the naive deploy (stop, then start) under the same load;
//! 6. HAProxy with a seamless reload in front of two app instances, if
//!    installed.
//!
//! The summary and the targets are in [`crate::summary`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use crate::cli::ScenarioArgs;
use crate::cutover::{self, Deployer, Naive, Proxy, ProxySwap};
use crate::load::{ConnMode, LoadSpec, Model};
use crate::measure::{self, RunData, RunSpec};
use crate::procs::{self, Bins, Proc, Scratch};
use crate::procstat::{self, Sample};
use crate::report::{self, RunReport};
use crate::schedule::CutoverPlan;
use crate::steering::{self, RollbackDeploy};
use crate::summary::{
    loadavg, machine, median, ratio, targets, Ceiling, Comparison, Machine, RollbackSummary,
    Summary, Supervisor, TrafficResult,
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
    /// The bake window of the baton the rollbacks run on (`--bake`).
    pub bake: &'static str,
    /// Upgrade-then-rollback cycles under load, and their spacing.
    pub rollbacks: u32,
    pub rollback_interval: Duration,
    /// How long the new generation serves before each rollback.
    pub rollback_pause: Duration,
    /// The canary's percentage, the new connections counted during it,
    /// and those checked after `promote`.
    pub canary_pct: u8,
    pub canary_connections: u64,
    pub canary_confirm: u64,
}

impl Preset {
    pub fn quick() -> Preset {
        Preset {
            name: "quick",
            ceiling: Duration::from_millis(1_000),
            ceiling_rounds: 3,
            idle: Duration::from_secs(2),
            idle_after: false,
            cutovers: 8,
            interval: Duration::from_millis(500),
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
            bake: "60s",
            rollbacks: 5,
            rollback_interval: Duration::from_millis(500),
            rollback_pause: Duration::from_millis(100),
            canary_pct: 10,
            canary_connections: 2_000,
            canary_confirm: 200,
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
            bake: "60s",
            rollbacks: 20,
            rollback_interval: Duration::from_millis(500),
            rollback_pause: Duration::from_millis(100),
            canary_pct: 10,
            canary_connections: 10_000,
            canary_confirm: 1_000,
        }
    }
}

/// The traffic modes the cutovers run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// A socket per generation, the kernel picks (baton's default).
    Steered,
    /// One socket for every generation (`--traffic shared`).
    Shared,
}

impl Traffic {
    pub const ALL: [Traffic; 2] = [Traffic::Steered, Traffic::Shared];

    pub fn name(self) -> &'static str {
        match self {
            Traffic::Steered => "steered",
            Traffic::Shared => "shared",
        }
    }

    /// The flags of `baton run`: steered is the default, so the steered
    /// baton gets none (the bench measures what users get).
    fn flags(self) -> &'static [&'static str] {
        match self {
            Traffic::Steered => &[],
            Traffic::Shared => &["--traffic", "shared"],
        }
    }

    /// The runs' target, also the ceilings' (see [`crate::summary::traffic_of`]).
    pub fn target(self) -> &'static str {
        match self {
            Traffic::Steered => "baton-steered",
            Traffic::Shared => "baton-shared",
        }
    }
}

/// A baton under test.
struct Under {
    traffic: Traffic,
    port: u16,
    control: PathBuf,
    stamps: PathBuf,
    proc: Proc,
    /// The traffic mode it reported in its status.
    reported: String,
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
                "rollback" => "upgrades, each rolled back during its bake",
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

fn comparison<'a>(done: impl IntoIterator<Item = &'a Done>) -> Comparison {
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
    let scratch = Scratch::new("").map_err(BenchError::io("creating a scratch directory"))?;
    let mut ctx = Ctx {
        args,
        out,
        logs,
        files: Vec::new(),
    };
    let port = || procs::free_port().map_err(BenchError::io("finding a free port"));

    // 1. The app alone and a baton per traffic mode; ceilings in turn.
    let app_port = port()?;
    let mut app = procs::spawn_app(&bins.app, app_port, &ctx.log("app-alone"))
        .map_err(BenchError::io("starting the app"))?;
    if !procs::wait_accepting(procs::loopback(app_port), Duration::from_secs(10)) {
        return Err(BenchError::Env(format!(
            "the app did not start; see {}",
            ctx.log("app-alone").display()
        )));
    }
    let mut unders: Vec<Under> = Vec::new();
    for traffic in Traffic::ALL {
        let p = port()?;
        let control = scratch
            .0
            .join(format!("ctl-{}", traffic.name()))
            .join("control.sock");
        // The apps under this baton stamp READY=1 and their drain signal
        // here (steered: the file the docs name).
        let stamps = ctx.out.join(match traffic {
            Traffic::Steered => "app-stamps.txt".to_string(),
            Traffic::Shared => format!("app-stamps-{}.txt", traffic.name()),
        });
        remove_stale(&stamps)?;
        let log = ctx.log(&format!("baton-{}", traffic.name()));
        let proc = procs::spawn_baton(&bins, p, &control, Some(&stamps), traffic.flags(), &log)
            .map_err(BenchError::Env)?;
        let reported = cutover::baton_traffic(&control).unwrap_or_else(|| "unknown".into());
        if reported != traffic.name() {
            eprintln!(
                "baton-bench: warning: the {} baton reports traffic {reported:?}; see {}",
                traffic.name(),
                log.display()
            );
        }
        eprintln!(
            "baton-bench {}: baton ({}) pid {} on 127.0.0.1:{p}",
            preset.name,
            traffic.name(),
            proc.pid()
        );
        unders.push(Under {
            traffic,
            port: p,
            control,
            stamps,
            proc,
            reported,
        });
    }
    // The supervisor's footprint is the steered (default) baton's.
    let baton_pid = unders[0].proc.pid();
    let start_sample = procstat::sample(baton_pid, 0);
    eprintln!(
        "baton-bench {}: app alone on 127.0.0.1:{app_port}",
        preset.name
    );

    // 2. Idle CPU before any load.
    let idle = measure::idle_samples(baton_pid, preset.idle);

    let mut ceilings: Vec<Ceiling> = Vec::new();
    // traffic -> connection mode -> ratio.
    let mut ratios: BTreeMap<&'static str, BTreeMap<&'static str, f64>> = BTreeMap::new();
    let mut rate_of: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut runs: Vec<RunReport> = Vec::new();
    for &mode in &args.modes {
        // Index 0: the app alone; then one per baton.
        let n = 1 + unders.len();
        let mut rps: Vec<Vec<f64>> = vec![Vec::new(); n];
        let mut p99: Vec<f64> = vec![0.0; n];
        for round in 0..preset.ceiling_rounds {
            // Rotate which goes first, so a drift affects all alike.
            for k in 0..n {
                let which = (k + round as usize) % n;
                let (target, p, pid, tree) = match which {
                    0 => ("app", app_port, None, Some(app.pid())),
                    i => {
                        let u = &unders[i - 1];
                        let pid = u.proc.pid();
                        (u.traffic.target(), u.port, Some(pid), Some(pid))
                    }
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
                rps[which].push(d.report.throughput_rps);
                p99[which] = p99[which].max(d.report.latency.all.p99_ms);
                runs.push(d.report);
            }
        }
        // Each round measures all back to back; a baton's ratio is the
        // median of the rounds' ratios, so one round disturbed by something
        // else on the machine does not decide it.
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let alone = mean(&rps[0]);
        rate_of.insert(mode.name(), (alone * args.rate_fraction).round().max(1.0));
        for (i, u) in unders.iter().enumerate() {
            let pairs: Vec<f64> = rps[0]
                .iter()
                .zip(&rps[i + 1])
                .map(|(a, b)| ratio(*b, *a))
                .collect();
            ratios
                .entry(u.traffic.name())
                .or_default()
                .insert(mode.name(), median(pairs));
        }
        for (i, target) in std::iter::once("app")
            .chain(unders.iter().map(|u| u.traffic.target()))
            .enumerate()
        {
            ceilings.push(Ceiling {
                target: target.into(),
                conn: mode.name(),
                rps: mean(&rps[i]).round(),
                rounds: rps[i].clone(),
                p99_ms: p99[i],
            });
        }
    }
    app.terminate(Duration::from_secs(5));
    drop(app);

    // 3. Cutovers under baton: per connection mode, each traffic mode in
    // turn (so a drift of the machine hits both alike).
    let plan = |count, interval| CutoverPlan {
        lead: preset.lead,
        interval,
        count,
        tail: preset.tail,
    };
    let mut deployers: Vec<Option<Deployer>> = Vec::new();
    for u in &unders {
        deployers.push(Some(Deployer::Baton(
            cutover::BatonDeploy::new(u.control.clone())
                .map_err(BenchError::io("starting a runtime"))?,
        )));
    }
    let mut baton_done: Vec<(Traffic, Done)> = Vec::new();
    let mut cutover_samples: Vec<Sample> = Vec::new();
    for (i, &mode) in args.modes.iter().enumerate() {
        let rate = rate_of[mode.name()];
        for (k, u) in unders.iter().enumerate() {
            let name = format!("baton-{}-{}-cutovers", u.traffic.name(), mode.name());
            let mut spec = ctx.spec(
                &name,
                u.traffic.target(),
                u.port,
                Model::Open { rate },
                mode,
            );
            spec.plan = Some(plan(preset.cutovers, preset.interval));
            spec.sample_pid = Some(u.proc.pid());
            spec.stamps = Some(u.stamps.clone());
            let (run, dep) = measure::measure(spec, deployers[k].take())
                .map_err(BenchError::io("running the load"))?;
            deployers[k] = dep;
            // The pictures (--plot) are the steered runs'.
            let plot_to = match u.traffic {
                Traffic::Steered => {
                    cutover_samples.extend(run.samples.iter().copied());
                    args.plot.as_deref().map(|p| plot_path(p, i, mode))
                }
                Traffic::Shared => None,
            };
            baton_done.push((u.traffic, ctx.finish(&run, plot_to.as_deref())));
        }
    }
    // 3b. The control experiment: same load, same process churn, no cutover.
    let mut control_done = Vec::new();
    if preset.control_spawns > 0 {
        for &mode in &args.modes {
            let rate = rate_of[mode.name()];
            let name = format!("spawn-only-{}", mode.name());
            let mut spec = ctx.spec(
                &name,
                "spawn-only",
                unders[0].port,
                Model::Open { rate },
                mode,
            );
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
    let reported: BTreeMap<&'static str, String> = unders
        .iter()
        .map(|u| (u.traffic.name(), u.reported.clone()))
        .collect();
    for u in unders {
        cutover::stop_baton(&u.control, u.proc);
    }

    // 4. Rollbacks during a bake, and a canary, on a steered baton.
    let (rollback_done, mut rollback, canary) =
        match steering_runs(&mut ctx, &preset, &bins, &scratch.0, &rate_of) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("baton-bench: the steering measurements failed: {e}");
                (
                    None,
                    RollbackSummary {
                        skipped: Some(e.to_string()),
                        planned: preset.rollbacks,
                        ..RollbackSummary::default()
                    },
                    Err(e.to_string()),
                )
            }
        };
    if let Some(d) = &rollback_done {
        let c = comparison([d]);
        rollback.p99_steady_ms = c.p99_steady_ms;
        rollback.p99_cutover_ms = c.p99_cutover_ms;
    }

    // 5. The naive deploy.
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

    // 6. HAProxy.
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
    let result_of = |traffic: Traffic| {
        let done: Vec<&Done> = baton_done
            .iter()
            .filter(|(t, _)| *t == traffic)
            .map(|(_, d)| d)
            .collect();
        traffic_result(
            reported
                .get(traffic.name())
                .cloned()
                .unwrap_or_else(|| "unknown".into()),
            &done,
            ratios.get(traffic.name()).cloned().unwrap_or_default(),
        )
    };
    let (steered, shared) = (result_of(Traffic::Steered), result_of(Traffic::Shared));
    let naive = comparison(&naive_done);
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
                .filter(|(t, _)| *t == Traffic::Steered)
                .filter_map(|(_, d)| d.report.supervisor.map(|r| r.cpu_pct))
                .collect();
            (cpu.iter().sum::<f64>() / cpu.len().max(1) as f64 * 100.0).round() / 100.0
        },
    };
    let mut spawn_only = comparison(&control_done);
    if control_done.is_empty() {
        spawn_only.skipped = Some("only in the full scenario".into());
    }
    let rollback_ms = rollback_done.as_ref().and_then(|d| d.report.rollback_ms);
    let mut runs_all = runs;
    runs_all.extend(baton_done.into_iter().map(|(_, d)| d.report));
    runs_all.extend(control_done.into_iter().map(|d| d.report));
    runs_all.extend(rollback_done.into_iter().map(|d| d.report));
    runs_all.extend(naive_done.into_iter().map(|d| d.report));
    runs_all.extend(haproxy_done.into_iter().map(|d| d.report));
    let (canary_share, canary_error) = match canary {
        Ok(c) => (Some(c), None),
        Err(e) => (None, Some(e)),
    };
    let mut summary = Summary {
        scenario: preset.name,
        version: env!("CARGO_PKG_VERSION"),
        started_unix,
        elapsed_s: (t_start.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine {
            loadavg_start,
            ..machine()
        },
        traffic: Traffic::Steered.name(),
        cutovers: steered.cutovers,
        requests: steered.requests,
        failed: steered.failed,
        failed_by_cause: steered.failed_by_cause.clone(),
        retried: steered.retried,
        throughput_ratio: steered.throughput_ratio,
        throughput_ratio_by_mode: steered.throughput_ratio_by_mode.clone(),
        p99_steady_ms: steered.p99_steady_ms,
        p99_cutover_ms: steered.p99_cutover_ms,
        cutover_latency_ms: steered.cutover_latency_ms,
        ready_to_first_response_ms: steered.ready_to_first_response_ms,
        steered,
        shared,
        rollback_ms,
        rollback,
        canary_share,
        canary_error,
        supervisor,
        ceilings,
        naive,
        reference,
        spawn_only,
        targets: Vec::new(),
        runs: runs_all,
        files: ctx.files,
    };
    summary.targets = targets(&preset, &summary);
    Ok(summary)
}

/// Removes a previous run's file, if any.
fn remove_stale(path: &Path) -> Result<(), BenchError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BenchError::Io {
            what: "removing the previous run's stamps",
            source: e,
        }),
        _ => Ok(()),
    }
}

/// One traffic mode's figures from its cutover runs.
fn traffic_result(
    reported: String,
    done: &[&Done],
    ratio_by_mode: BTreeMap<&'static str, f64>,
) -> TrafficResult {
    let c = comparison(done.iter().copied());
    let cutovers: Vec<cutover::Cutover> = done
        .iter()
        .flat_map(|d| d.report.cutovers.iter().map(|c| c.cutover.clone()))
        .collect();
    TrafficResult {
        traffic: reported,
        cutovers: c.cutovers,
        cutovers_ok: done.iter().map(|d| d.report.cutovers_ok).sum(),
        requests: c.requests,
        failed: c.failed,
        failed_by_cause: c.failed_by_cause,
        retried: c.retried,
        p99_steady_ms: c.p99_steady_ms,
        p99_cutover_ms: c.p99_cutover_ms,
        throughput_ratio: ratio_by_mode
            .get("keep-alive")
            .or_else(|| ratio_by_mode.values().next())
            .copied()
            .unwrap_or(0.0),
        throughput_ratio_by_mode: ratio_by_mode,
        cutover_latency_ms: report::stat_of(&cutovers, |c| c.cutover_latency_us),
        ready_to_first_response_ms: report::stat_of(&cutovers, |c| c.ready_to_first_response_us),
        ready_to_first_response_ms_by_mode: done
            .iter()
            .filter_map(|d| {
                d.report
                    .ready_to_first_response_ms
                    .map(|s| (d.report.conn, s))
            })
            .collect(),
        answered_before_ready: report::answered_before_ready(&cutovers),
    }
}

/// Step 4: a steered baton with `--bake`; rollbacks under load, then the
/// canary. Returns the rollback run, its summary, and the canary's result
/// (or why it has none).
type SteeringRuns = (
    Option<Done>,
    RollbackSummary,
    Result<steering::CanaryShare, String>,
);

fn steering_runs(
    ctx: &mut Ctx<'_>,
    preset: &Preset,
    bins: &Bins,
    scratch: &Path,
    rate_of: &BTreeMap<&'static str, f64>,
) -> Result<SteeringRuns, BenchError> {
    let port = procs::free_port().map_err(BenchError::io("finding a free port"))?;
    let control = scratch.join("ctl-bake").join("control.sock");
    let baton = procs::spawn_baton(
        bins,
        port,
        &control,
        None,
        &["--traffic", "steered", "--bake", preset.bake],
        &ctx.log("baton-bake"),
    )
    .map_err(BenchError::Env)?;
    let traffic = cutover::baton_traffic(&control).unwrap_or_else(|| "unknown".into());
    eprintln!(
        "baton-bench {}: baton (--traffic steered --bake {}, reports {traffic}) pid {} on 127.0.0.1:{port}",
        preset.name,
        preset.bake,
        baton.pid()
    );
    // The load: a new connection per request if measured (each one is
    // steered), else the first mode.
    let mode = if ctx.args.modes.contains(&ConnMode::Close) {
        ConnMode::Close
    } else {
        ctx.args.modes[0]
    };
    let rate = rate_of.get(mode.name()).copied().unwrap_or(1000.0);
    let mut spec = ctx.spec(
        &format!("rollback-{}", mode.name()),
        "rollback",
        port,
        Model::Open { rate },
        mode,
    );
    spec.plan = Some(CutoverPlan {
        lead: preset.lead,
        interval: preset.rollback_interval,
        count: preset.rollbacks,
        tail: preset.tail,
    });
    spec.sample_pid = Some(baton.pid());
    let dep = Deployer::Rollback(
        RollbackDeploy::new(
            control.clone(),
            procs::loopback(port),
            preset.rollback_pause,
        )
        .map_err(BenchError::io("starting a runtime"))?,
    );
    let (run, _) = measure::measure(spec, Some(dep)).map_err(BenchError::io("running the load"))?;
    let done = ctx.finish(&run, None);
    let r = &done.report;
    let notes: Vec<steering::RollbackNote> =
        run.cutovers.iter().filter_map(|c| c.rollback).collect();
    let same_pid = notes
        .iter()
        .filter(|n| n.latency_us.is_some() && n.same_pid == Some(true))
        .count();
    let other_pid = notes.iter().filter(|n| n.same_pid == Some(false)).count();
    let summary = RollbackSummary {
        skipped: None,
        bake: preset.bake.into(),
        traffic,
        conn: mode.name(),
        rate,
        planned: preset.rollbacks,
        cycles: r.cutover_count,
        cycles_ok: r.cutovers_ok,
        same_pid,
        other_pid,
        unanswered: r.cutover_count.saturating_sub(same_pid + other_pid),
        probe_failures: notes.iter().map(|n| n.probe_failures).sum(),
        opened_after_ms: report::stat(
            notes
                .iter()
                .filter(|n| n.latency_us.is_some() && n.same_pid == Some(true))
                .filter_map(|n| n.opened_after_us)
                .map(|us| us as f64 / 1e3)
                .collect(),
        ),
        requests: r.sent,
        failed: r.failed,
        failed_by_cause: r.failed_by_cause.clone(),
        retried: r.retried,
        p99_steady_ms: 0.0,
        p99_cutover_ms: 0.0,
    };
    // The canary, on the same baton, without load.
    let canary = steering::canary(
        &control,
        procs::loopback(port),
        preset.canary_pct,
        preset.canary_connections,
        preset.canary_confirm,
    );
    if let Err(e) = &canary {
        eprintln!("baton-bench: canary: {e}");
    }
    cutover::stop_baton(&control, baton);
    Ok((Some(done), summary, canary))
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
    let proxy = Proxy::Haproxy {
        haproxy: haproxy.to_owned(),
        threads: ctx.args.haproxy_threads.max(1),
    };
    let swap = ProxySwap::start(
        proxy,
        bins.app.clone(),
        ctx.log("haproxy-app"),
        front,
        [a, b],
        scratch.join("haproxy"),
        ctx.log("haproxy"),
    )
    .map_err(BenchError::Env)?;
    let mut dep = Some(Deployer::Proxy(Box::new(swap)));
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
        // quick must take about a minute with room for process start-up:
        // the app alone and two batons (steered, shared) per ceiling round,
        // the cutovers in both traffic modes, the rollbacks, the canary's
        // connections (well under 1 ms each on loopback; 1 ms counted).
        let q = Preset::quick();
        let modes = 2;
        let traffic = Traffic::ALL.len() as u32;
        let ceilings = q.ceiling * ((1 + traffic) * q.ceiling_rounds * modes);
        let cutovers = (q.lead + q.interval * q.cutovers + q.tail) * modes * traffic;
        let naive =
            (q.lead + q.naive_interval * q.naive_cutovers + q.tail) * q.naive_modes.len() as u32;
        let haproxy =
            (q.haproxy_ceiling + q.lead + q.haproxy_interval * q.haproxy_cutovers + q.tail)
                * q.haproxy_modes.len() as u32;
        let rollbacks = q.lead + q.rollback_interval * q.rollbacks + q.tail;
        let canary = Duration::from_millis(q.canary_connections + q.canary_confirm);
        let total = ceilings + q.idle + cutovers + naive + haproxy + rollbacks + canary;
        assert!(total < Duration::from_secs(60), "{total:?}");
        // Each rollback cycle (upgrade, probes, pause, rollback) fits its slot.
        assert!(q.rollback_pause * 3 < q.rollback_interval);
        assert!(q.canary_connections >= 2_000);
        let f = Preset::full();
        assert_eq!(f.cutovers, 200);
        assert_eq!(
            f.canary_connections, 10_000,
            "the issue's accuracy is over 10 000"
        );
        assert!(f.rollbacks >= 20);
        let nominal = (f.lead + f.interval * f.cutovers + f.tail) * modes * traffic;
        assert!(nominal < Duration::from_secs(420), "{nominal:?}");
    }
}
