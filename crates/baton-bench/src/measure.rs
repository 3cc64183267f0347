//! One measured run: load on the main thread, deploys on a driver thread,
//! and a monitor thread that samples the supervisor's memory and CPU every
//! 100 ms and prints the progress line once a second. Every run ends by
//! itself: the driver ends it after its last cutover and tail, and the load
//! has a hard cap in any case.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::cutover::{Cutover, Deployer};
use crate::load::{run_load, Clock, LoadOutput, LoadSpec, Model, Shared};
use crate::procstat::{self, Sample};
use crate::schedule::CutoverPlan;
use crate::stamps::{self, Stamps};

/// How often the monitor samples the supervisor.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Short identifier, e.g. `baton-keep-alive-cutovers`.
    pub name: String,
    /// What is measured: `app`, `baton-steered`, `baton-shared` (`baton`
    /// for `load`), `rollback`, `spawn-only`, `naive`, `haproxy`.
    pub target: String,
    pub addr: SocketAddr,
    pub load: LoadSpec,
    /// Length of a run without cutovers.
    pub duration: Duration,
    pub plan: Option<CutoverPlan>,
    /// Process to sample (the supervisor), if any.
    pub sample_pid: Option<i32>,
    /// Root of the process tree under test, for its CPU share (defaults to
    /// `sample_pid`).
    pub tree_pid: Option<i32>,
    /// The file the apps stamp their lifecycle into (`HELLO_STAMPS`), read
    /// after the run for the cutovers' outside view ([`crate::stamps`]).
    pub stamps: Option<PathBuf>,
    pub quiet: bool,
}

/// Everything a run produced, for the report and the plot.
pub struct RunData {
    pub spec: RunSpec,
    pub clock: Clock,
    pub load: LoadOutput,
    pub cutovers: Vec<Cutover>,
    pub samples: Vec<Sample>,
    /// The load generator's own CPU over the run, % of one core.
    pub client_cpu_pct: Option<f64>,
    /// How busy the whole machine was over the run, % of all CPUs.
    pub machine_busy_pct: Option<f64>,
    /// CPU of the process under test and its children (baton and its
    /// generations), % of one core; if a process to sample was given.
    pub target_cpu_pct: Option<f64>,
    /// What neither the load generator nor the process tree under test
    /// used, % of one core: other work on the machine disturbing the run.
    pub other_cpu_pct: Option<f64>,
}

/// Runs `spec` while upgrading the baton behind `control` as its plan
/// says, then stops that baton (which is also stopped, by dropping it, if
/// the run cannot start).
pub fn under_baton(
    spec: RunSpec,
    control: &std::path::Path,
    baton: crate::procs::Proc,
) -> Result<RunData, crate::BenchError> {
    use crate::BenchError;
    let deployer = Deployer::Baton(
        crate::cutover::BatonDeploy::new(control.to_owned())
            .map_err(BenchError::io("starting a runtime"))?,
    );
    let (data, _) = measure(spec, Some(deployer)).map_err(BenchError::io("running the load"))?;
    crate::cutover::stop_baton(control, baton);
    Ok(data)
}

/// Sleeps until `at` (µs on the run's clock), waking early if the run stops.
fn sleep_until(shared: &Shared, at_us: u64) {
    loop {
        let now = shared.clock.now_us();
        if now >= at_us || shared.stopped() {
            return;
        }
        std::thread::sleep(Duration::from_micros((at_us - now).min(20_000)));
    }
}

/// Runs the load, and the deploys if a plan and a deployer are given.
/// Returns the deployer for the next run (or for cleanup).
pub fn measure(
    spec: RunSpec,
    deployer: Option<Deployer>,
) -> std::io::Result<(RunData, Option<Deployer>)> {
    let clock = Clock::new();
    let max = match spec.plan {
        Some(p) => p.hard_cap(Duration::from_secs(5)),
        None => spec.duration,
    };
    let shared = Shared::new(clock, max);

    let (driver, unused) = match (spec.plan, deployer) {
        (Some(plan), Some(mut dep)) => {
            let shared = shared.clone();
            let handle = std::thread::Builder::new()
                .name("driver".into())
                .spawn(move || {
                    let mut cuts = Vec::with_capacity(plan.count as usize);
                    for i in 0..plan.count {
                        sleep_until(&shared, plan.planned(i).as_micros() as u64);
                        if shared.stopped() {
                            break;
                        }
                        cuts.push(dep.cutover(i, &shared.clock));
                        shared.progress.cutovers.fetch_add(1, Ordering::Relaxed);
                    }
                    let tail_end = shared.clock.now_us() + plan.tail.as_micros() as u64;
                    sleep_until(&shared, tail_end);
                    shared.stop_now();
                    (cuts, Some(dep))
                })?;
            (Some(handle), None)
        }
        // No plan: nothing to drive; the deployer goes straight back.
        (_, dep) => (None, dep),
    };

    let monitor = {
        let shared = shared.clone();
        let (pid, quiet, label) = (spec.sample_pid, spec.quiet, label(&spec));
        std::thread::Builder::new()
            .name("monitor".into())
            .spawn(move || monitor(&shared, pid, quiet, &label))?
    };

    let me = std::process::id() as i32;
    let tree = |pid: Option<i32>| pid.and_then(procstat::tree_ticks);
    let (self_before, machine_before, tree_before) = (
        procstat::sample(me, clock.now_us()),
        procstat::machine_cpu(),
        tree(spec.tree_pid.or(spec.sample_pid)),
    );
    let load = run_load(spec.load, spec.addr, shared.clone());
    let (self_after, machine_after, tree_after) = (
        procstat::sample(me, clock.now_us()),
        procstat::machine_cpu(),
        tree(spec.tree_pid.or(spec.sample_pid)),
    );
    shared.stop_now();
    let secs = match (self_before, self_after) {
        (Some(a), Some(b)) => (b.t_us.saturating_sub(a.t_us)) as f64 / 1e6,
        _ => 0.0,
    };
    let client_cpu_pct = self_before
        .zip(self_after)
        .and_then(|(a, b)| procstat::cpu_percent(&a, &b, procstat::clock_ticks()));
    let machine_busy_pct = machine_before
        .zip(machine_after)
        .and_then(|(a, b)| procstat::busy_percent(a, b));
    let target_cpu_pct = tree_before.zip(tree_after).and_then(|(a, b)| {
        (secs > 0.0)
            .then(|| 100.0 * b.saturating_sub(a) as f64 / procstat::clock_ticks() as f64 / secs)
    });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let other_cpu_pct = match (machine_busy_pct, client_cpu_pct, target_cpu_pct) {
        (Some(m), Some(c), Some(t)) => Some((m * cores - c - t).max(0.0)),
        _ => None,
    };
    let (mut cutovers, deployer) = match driver {
        Some(d) => d.join().unwrap_or_default(),
        None => (Vec::new(), unused),
    };
    let samples = monitor.join().unwrap_or_default();
    let load = load?;
    if !cutovers.is_empty() {
        // Each cutover waited for the old generation's exit, and the run
        // went on for its tail after the last one: the apps have written
        // their stamps by now.
        let stamps = match &spec.stamps {
            Some(path) => Stamps::read(path).unwrap_or_else(|e| {
                eprintln!("baton-bench: reading {}: {e}", path.display());
                Stamps::default()
            }),
            None => Stamps::default(),
        };
        if stamps.malformed > 0 {
            eprintln!(
                "baton-bench: {} unreadable lines in the stamps file",
                stamps.malformed
            );
        }
        stamps::attach(&mut cutovers, &stamps, &load.first_response, &clock);
    }
    Ok((
        RunData {
            spec,
            clock,
            load,
            cutovers,
            samples,
            client_cpu_pct,
            machine_busy_pct,
            target_cpu_pct,
            other_cpu_pct,
        },
        deployer,
    ))
}

fn label(spec: &RunSpec) -> String {
    let model = match spec.load.model {
        Model::Open { rate } => format!("open {rate:.0}/s"),
        Model::Closed => "closed".into(),
    };
    format!("{} {} {}", spec.target, spec.load.conn.name(), model)
}

fn monitor(shared: &Shared, pid: Option<i32>, quiet: bool, label: &str) -> Vec<Sample> {
    let tty = std::io::stderr().is_terminal();
    let mut samples = Vec::new();
    let mut last_print = 0u64;
    let mut last_ok = 0u64;
    let p = &shared.progress;
    loop {
        let now = shared.clock.now_us();
        if let Some(s) = pid.and_then(|pid| procstat::sample(pid, now)) {
            samples.push(s);
        }
        if shared.stopped() {
            break;
        }
        if !quiet && now >= last_print + 1_000_000 {
            let ok = p.ok.load(Ordering::Relaxed);
            let secs = (now - last_print) as f64 / 1e6;
            let line = format!(
                "[{label}] {:5.1}s sent {} ok {} failed {} retried {} | {:.0} req/s | max {:.1} ms | cutovers {}",
                now as f64 / 1e6,
                p.sent.load(Ordering::Relaxed),
                ok,
                p.failed.load(Ordering::Relaxed),
                p.retried.load(Ordering::Relaxed),
                (ok - last_ok) as f64 / secs,
                p.max_us.swap(0, Ordering::Relaxed) as f64 / 1e3,
                p.cutovers.load(Ordering::Relaxed),
            );
            let mut err = std::io::stderr().lock();
            let _ = if tty {
                write!(err, "\r\x1b[K{line}")
            } else {
                writeln!(err, "{line}")
            };
            let _ = err.flush();
            last_print = now;
            last_ok = ok;
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
    if !quiet && tty {
        let _ = writeln!(std::io::stderr());
    }
    samples
}

/// Reads the supervisor's CPU over `secs` with no load: (before, after).
pub fn idle_samples(pid: i32, secs: Duration) -> Option<(Sample, Sample)> {
    let clock = Clock::new();
    let a = procstat::sample(pid, clock.now_us())?;
    std::thread::sleep(secs);
    let b = procstat::sample(pid, clock.now_us())?;
    Some((a, b))
}
