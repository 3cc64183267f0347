//! baton side by side with the deploys people run today, on the same app,
//! the same load and the same machine, in one run:
//!
//! - **the naive deploy** of the Rust example (`SIGTERM` the running app,
//!   wait for it to exit, start the new one on the same port), and two
//!   proxies in front of two instances of it, each deploy starting the new
//!   instance on the other port, pointing the proxy at it, reloading the
//!   proxy, waiting for its old workers to leave and stopping the old
//!   instance: **HAProxy's seamless reload** (master-worker, listeners
//!   passed to the new worker) and **nginx** (`nginx -s reload`); against
//!   the same app under baton, steered and shared;
//! - **gunicorn's own reload** (`SIGHUP` to its master: new workers start,
//!   the old ones finish their requests and exit) against gunicorn under
//!   baton, steered and shared;
//! - **PM2's cluster-mode reload** (`pm2 reload`: one worker at a time is
//!   replaced, the old one told with SIGINT) of the Node app against the
//!   same app under baton, steered and shared.
//!
//! The apps are `benches/servers/` ([`crate::servers`]); PM2 is pinned and
//! installed by `benches/setup.sh` into `target/bench-node`. A deploy under
//! baton is `upgrade` over its control socket; gunicorn's ends when every
//! old worker has exited and as many new ones run; PM2's when its command
//! returns. Every request is timed and classified by the client, as in the
//! rest of the bench.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Serialize;

use crate::cli::{ServersArgs, ToolsArgs};
use crate::cutover::{
    self, BatonDeploy, CommandReload, Deployer, Naive, Proxy, ProxySwap, SignalReload,
};
use crate::load::{ConnMode, LoadSpec};
use crate::measure::{self, RunSpec};
use crate::procs::{self, Bins, Proc};
use crate::report::{self, Latency, Stat};
use crate::schedule::CutoverPlan;
use crate::summary::{loadavg, machine, Machine};
use crate::BenchError;

/// The contenders, in the order they run: grouped by app, each group's
/// baton runs right after the tools they are compared with.
pub const TOOLS: [&str; 11] = [
    "naive",
    "haproxy-reload",
    "nginx-reload",
    "baton-rust",
    "baton-rust-shared",
    "gunicorn-hup",
    "baton-gunicorn",
    "baton-gunicorn-shared",
    "pm2-reload",
    "baton-node",
    "baton-node-shared",
];

#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub tool: String,
    pub conn: &'static str,
    pub round: u32,
    pub rate: f64,
    pub deploys: usize,
    pub deploys_ok: usize,
    pub requests: u64,
    pub failed: u64,
    pub failed_by_cause: BTreeMap<&'static str, u64>,
    pub retried: u64,
    pub latency_steady: Latency,
    pub latency_cutover: Latency,
    /// p99 of every request scheduled in a deploy window, a failed one
    /// counted at the client's timeout: what a deploy costs its clients,
    /// which `latency_cutover` (answered requests only) hides for a tool
    /// that refuses some.
    pub p99_cutover_with_failures_ms: f64,
    /// The load generator's own lag (scheduled → sent), p99 steady and in
    /// deploy windows: where it is as high as the latency, the client was
    /// short of CPU, not the server slow.
    pub send_lag_p99_ms: (f64, f64),
    /// Under baton: p99 in each stage of the deploy windows
    /// ([`report::STAGES`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub p99_by_stage_ms: BTreeMap<&'static str, f64>,
    /// A deploy, from its start to its end as the tool defines it.
    pub deploy_ms: Option<Stat>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub tool: String,
    pub why: String,
}

/// A figure over the rounds: the median resists a round that something
/// else on the machine disturbed; `min` and `max` show the spread.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    fn of(v: Vec<f64>) -> Option<Spread> {
        let min = v.iter().copied().reduce(f64::min)?;
        let st = report::stat(v)?;
        Some(Spread {
            median: st.median,
            min,
            max: st.max,
            n: st.n,
        })
    }
}

/// One contender in one connection mode over every round: the counts
/// summed, each latency figure's [`Spread`] over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Contender {
    pub tool: String,
    pub conn: &'static str,
    pub rounds: usize,
    pub deploys: usize,
    pub deploys_ok: usize,
    pub requests: u64,
    pub failed: u64,
    pub retried: u64,
    pub p99_steady_ms: Option<Spread>,
    pub p99_deploy_ms: Option<Spread>,
    pub p99_deploy_with_failures_ms: Option<Spread>,
    /// The rounds' median deploy times.
    pub deploy_ms: Option<Spread>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub machine: Machine,
    pub deploys_per_run: u32,
    pub rounds: u32,
    pub contenders: Vec<Contender>,
    pub runs: Vec<Run>,
    pub skipped: Vec<Skipped>,
}

/// The runs of each contender and mode, in the order they first ran.
fn contenders(runs: &[Run]) -> Vec<Contender> {
    let mut keys: Vec<(&str, &'static str)> = Vec::new();
    for r in runs {
        if !keys.contains(&(r.tool.as_str(), r.conn)) {
            keys.push((r.tool.as_str(), r.conn));
        }
    }
    keys.into_iter()
        .map(|(tool, conn)| {
            let of: Vec<&Run> = runs
                .iter()
                .filter(|r| r.tool == tool && r.conn == conn)
                .collect();
            let over = |f: &dyn Fn(&Run) -> Option<f64>| {
                Spread::of(of.iter().filter_map(|r| f(r)).collect())
            };
            Contender {
                tool: tool.into(),
                conn,
                rounds: of.len(),
                deploys: of.iter().map(|r| r.deploys).sum(),
                deploys_ok: of.iter().map(|r| r.deploys_ok).sum(),
                requests: of.iter().map(|r| r.requests).sum(),
                failed: of.iter().map(|r| r.failed).sum(),
                retried: of.iter().map(|r| r.retried).sum(),
                p99_steady_ms: over(&|r| Some(r.latency_steady.p99_ms)),
                p99_deploy_ms: over(&|r| Some(r.latency_cutover.p99_ms)),
                p99_deploy_with_failures_ms: over(&|r| Some(r.p99_cutover_with_failures_ms)),
                deploy_ms: over(&|r| r.deploy_ms.as_ref().map(|d| d.median)),
            }
        })
        .collect()
}

/// The [`ServersArgs`] the shared launch code reads.
fn servers_args(args: &ToolsArgs) -> ServersArgs {
    ServersArgs {
        json: false,
        strict: false,
        out: args.out.clone(),
        servers: Vec::new(),
        baton: args.baton.clone(),
        app: args.app.clone(),
        venv: args.venv.clone(),
        node: args.node.clone(),
        servers_dir: args.servers_dir.clone(),
        cutovers: args.deploys,
        interval: args.interval,
        rate: args.rate,
        modes: args.modes.clone(),
        concurrency: args.concurrency,
        timeout: args.timeout,
        quiet: args.quiet,
    }
}

/// PM2 from `target/bench-node` (made by `benches/setup.sh`).
fn pm2(args: &ToolsArgs) -> Result<PathBuf, String> {
    if let Some(p) = &args.pm2 {
        return Ok(p.clone());
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| {
            Some(
                e.parent()?
                    .parent()?
                    .join("bench-node/node_modules/.bin/pm2"),
            )
        })
        .filter(|p| p.is_file())
        .ok_or_else(|| "pm2 is not installed (run benches/setup.sh, or pass --pm2)".into())
}

pub fn run(args: &ToolsArgs) -> Result<Summary, BenchError> {
    if args.deploys == 0 || args.rounds == 0 || !args.rate.is_finite() || args.rate <= 0.0 {
        return Err(BenchError::Usage(
            "--deploys, --rounds and --rate must be more than zero".into(),
        ));
    }
    if let Some(bad) = args.tools.iter().find(|t| !TOOLS.contains(&t.as_str())) {
        return Err(BenchError::Usage(format!(
            "unknown tool {bad:?}: expected one of {}",
            TOOLS.join(", ")
        )));
    }
    let baton = procs::sibling("baton", args.baton.as_deref()).map_err(BenchError::Env)?;
    std::fs::create_dir_all(&args.out).map_err(BenchError::io("creating the output directory"))?;
    let scratch =
        procs::Scratch::new("tools").map_err(BenchError::io("creating a scratch directory"))?;
    let sa = servers_args(args);
    let mut m = machine();
    m.loadavg_start = loadavg();
    let (mut runs, mut skipped) = (Vec::new(), Vec::<Skipped>::new());
    for round in 1..=args.rounds {
        // Every other round in reverse, so that drift on a shared machine
        // hits each contender alike.
        let mut order: Vec<&str> = TOOLS
            .into_iter()
            .filter(|t| args.tools.iter().any(|a| a == t))
            .collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for tool in order {
            if skipped.iter().any(|k| k.tool == tool) {
                continue;
            }
            for &conn in &args.modes {
                match run_one(args, &sa, &baton, &scratch.0, tool, conn) {
                    Ok(r) => runs.push(Run { round, ..r }),
                    Err(Skip(why)) => {
                        eprintln!("baton-bench: skipping {tool}: {why}");
                        skipped.push(Skipped {
                            tool: tool.into(),
                            why,
                        });
                        break;
                    }
                }
            }
        }
    }
    m.loadavg_end = loadavg();
    Ok(Summary {
        machine: m,
        deploys_per_run: args.deploys,
        rounds: args.rounds,
        contenders: contenders(&runs),
        runs,
        skipped,
    })
}

struct Skip(String);

/// What runs the app for one contender: the process to stop at the end
/// (if any), the command that stops it otherwise, and the deployer.
struct Setup {
    keep: Vec<Proc>,
    control: Option<PathBuf>,
    teardown: Option<CommandReload>,
    deployer: Deployer,
    sample_pid: Option<i32>,
}

fn setup(
    args: &ToolsArgs,
    sa: &ServersArgs,
    baton: &std::path::Path,
    scratch: &std::path::Path,
    tool: &str,
    conn: ConnMode,
    port: u16,
) -> Result<Setup, Skip> {
    let name = format!("{tool}-{}", conn.name());
    let log = args.out.join(format!("tools-{name}.log"));
    let dir = crate::servers::servers_dir(sa);
    match tool {
        "naive" => {
            let app = procs::sibling("hello", args.app.as_deref()).map_err(Skip)?;
            let first = start_app(&app, port, &log)?;
            Ok(Setup {
                keep: Vec::new(),
                control: None,
                teardown: None,
                deployer: Deployer::Naive(Naive {
                    app,
                    port,
                    log,
                    current: Some(first),
                }),
                sample_pid: None,
            })
        }
        "haproxy-reload" | "nginx-reload" => {
            let app = procs::sibling("hello", args.app.as_deref()).map_err(Skip)?;
            let workers = args.proxy_workers.max(1);
            let found = |given: &Option<PathBuf>, name: &str| {
                given
                    .clone()
                    .or_else(|| procs::on_path(name))
                    .ok_or_else(|| Skip(format!("{name} is not installed (run benches/setup.sh)")))
            };
            let proxy = if tool == "nginx-reload" {
                Proxy::Nginx {
                    nginx: found(&args.nginx, "nginx")?,
                    workers,
                }
            } else {
                Proxy::Haproxy {
                    haproxy: found(&args.haproxy, "haproxy")?,
                    threads: workers,
                }
            };
            let free = || procs::free_port().map_err(|e| Skip(format!("no free port: {e}")));
            let app_ports = [free()?, free()?];
            let app_log = args.out.join(format!("tools-{name}-app.log"));
            let swap = ProxySwap::start(
                proxy,
                app,
                app_log,
                port,
                app_ports,
                scratch.join(&name),
                log,
            )
            .map_err(Skip)?;
            let pid = swap.master.pid();
            Ok(Setup {
                keep: Vec::new(),
                control: None,
                teardown: None,
                deployer: Deployer::Proxy(Box::new(swap)),
                sample_pid: Some(pid),
            })
        }
        "gunicorn-hup" => {
            let l = crate::servers::launch("gunicorn", sa).map_err(Skip)?;
            let mut cmd = std::process::Command::new(&l.program);
            // The same gunicorn command as under baton, binding the port
            // itself instead of taking baton's socket.
            cmd.args(["--bind", &procs::loopback(port).to_string()])
                .args(&l.args)
                .env_remove("LISTEN_FDS")
                .env_remove("LISTEN_PID");
            let master = Proc::spawn(cmd, "gunicorn", &log).map_err(|e| Skip(e.to_string()))?;
            if !procs::wait_accepting(procs::loopback(port), Duration::from_secs(20)) {
                return Err(Skip(format!(
                    "gunicorn did not accept; see {}",
                    log.display()
                )));
            }
            let pid = master.pid();
            Ok(Setup {
                keep: Vec::new(),
                control: None,
                teardown: None,
                deployer: Deployer::Signal(SignalReload {
                    master,
                    signal: Signal::SIGHUP,
                    workers: 2,
                }),
                sample_pid: Some(pid),
            })
        }
        "pm2-reload" => {
            let pm2 = pm2(args).map_err(Skip)?;
            let home = scratch.join(format!("pm2-{}", conn.name()));
            let env = vec![
                ("PM2_HOME".to_owned(), home.clone().into_os_string()),
                ("PORT".to_owned(), port.to_string().into()),
            ];
            let script = dir.join("server.js");
            let start = CommandReload {
                argv: [
                    pm2.as_os_str(),
                    "start".as_ref(),
                    script.as_os_str(),
                    "-i".as_ref(),
                    "2".as_ref(),
                    "--name".as_ref(),
                    "bench".as_ref(),
                    "--wait-ready".as_ref(),
                    "--listen-timeout".as_ref(),
                    "10000".as_ref(),
                    "--kill-timeout".as_ref(),
                    "10000".as_ref(),
                ]
                .map(Into::into)
                .to_vec(),
                env: env.clone(),
                log: log.clone(),
            };
            let started = start.run_once();
            if let Err(e) = started {
                return Err(Skip(format!("pm2 start: {e}; see {}", log.display())));
            }
            if !procs::wait_accepting(procs::loopback(port), Duration::from_secs(20)) {
                return Err(Skip(format!(
                    "pm2's app did not accept; see {}",
                    log.display()
                )));
            }
            let cmd = |verb: &str| CommandReload {
                argv: vec![pm2.clone().into_os_string(), verb.into(), "bench".into()],
                env: env.clone(),
                log: log.clone(),
            };
            let mut teardown = cmd("delete");
            teardown.argv = vec![pm2.clone().into_os_string(), "kill".into()];
            Ok(Setup {
                keep: Vec::new(),
                control: None,
                teardown: Some(teardown),
                deployer: Deployer::Command(cmd("reload")),
                sample_pid: None,
            })
        }
        baton_tool => {
            let (server, shared) = match baton_tool {
                "baton-rust" => ("rust", false),
                "baton-rust-shared" => ("rust", true),
                "baton-gunicorn" => ("gunicorn", false),
                "baton-gunicorn-shared" => ("gunicorn", true),
                "baton-node" => ("node", false),
                _ => ("node", true),
            };
            let l = crate::servers::launch(server, sa).map_err(Skip)?;
            let bins = Bins {
                baton: baton.to_owned(),
                app: l.program.clone(),
                haproxy: None,
            };
            let mut flags = l.run_flags.clone();
            if shared {
                flags.extend(["--traffic".to_owned(), "shared".to_owned()]);
            }
            let control = scratch.join(format!("{name}.sock"));
            let proc = procs::spawn_baton_with(&bins, port, &control, None, &log, &flags, &l.args)
                .map_err(Skip)?;
            let deployer = Deployer::Baton(
                BatonDeploy::new(control.clone()).map_err(|e| Skip(e.to_string()))?,
            );
            let pid = proc.pid();
            Ok(Setup {
                keep: vec![proc],
                control: Some(control),
                teardown: None,
                deployer,
                sample_pid: Some(pid),
            })
        }
    }
}

/// Starts one instance of the example app on `port`, serving.
fn start_app(app: &std::path::Path, port: u16, log: &std::path::Path) -> Result<Proc, Skip> {
    let p = procs::spawn_app(app, port, log).map_err(|e| Skip(format!("starting the app: {e}")))?;
    if procs::wait_accepting(procs::loopback(port), Duration::from_secs(10)) {
        Ok(p)
    } else {
        Err(Skip(format!(
            "the app did not accept; see {}",
            log.display()
        )))
    }
}

fn run_one(
    args: &ToolsArgs,
    sa: &ServersArgs,
    baton: &std::path::Path,
    scratch: &std::path::Path,
    tool: &str,
    conn: ConnMode,
) -> Result<Run, Skip> {
    let port = procs::free_port().map_err(|e| Skip(format!("no free port: {e}")))?;
    let Setup {
        mut keep,
        control,
        teardown,
        deployer,
        sample_pid,
    } = setup(args, sa, baton, scratch, tool, conn, port)?;
    let spec = RunSpec {
        name: format!("tools-{tool}-{}", conn.name()),
        target: tool.into(),
        addr: procs::loopback(port),
        load: LoadSpec::open(args.rate, conn, args.concurrency, args.timeout),
        duration: Duration::ZERO,
        plan: Some(CutoverPlan {
            lead: Duration::from_secs(1),
            interval: args.interval,
            count: args.deploys,
            tail: Duration::from_secs(1),
        }),
        sample_pid,
        tree_pid: None,
        stamps: None,
        quiet: args.quiet,
    };
    let measured = measure::measure(spec, Some(deployer));
    if let (Some(control), Some(p)) = (control, keep.pop()) {
        cutover::stop_baton(&control, p);
    }
    if let Some(t) = teardown {
        let _ = t.run_once();
    }
    let (data, _) = measured.map_err(|e| Skip(format!("running the load: {e}")))?;
    let (rep, _) = report::analyze(&data);
    let timeout_us = u64::try_from(args.timeout.as_micros()).unwrap_or(u64::MAX);
    let with_failures = report::split_by(
        &data.load.records,
        &report::windows(&data.cutovers, report::PAD_US),
        report::WARMUP_US,
        |r| {
            Some(if r.failed().is_some() {
                timeout_us
            } else {
                r.latency_us()
            })
        },
    );
    Ok(Run {
        tool: tool.into(),
        conn: conn.name(),
        round: 0,
        rate: args.rate,
        deploys: rep.cutover_count,
        deploys_ok: rep.cutovers_ok,
        requests: rep.sent,
        failed: rep.failed,
        failed_by_cause: rep.failed_by_cause.clone(),
        retried: rep.retried,
        latency_steady: rep.latency.steady,
        latency_cutover: rep.latency.cutover,
        p99_cutover_with_failures_ms: report::latency_of(&with_failures.cutover).p99_ms,
        send_lag_p99_ms: (rep.send_lag.steady.p99_ms, rep.send_lag.cutover.p99_ms),
        p99_by_stage_ms: rep.p99_by_stage(),
        deploy_ms: rep.phases_ms.get("total").cloned(),
    })
}

/// Whether every contender asked for ran and every deploy completed.
pub fn complete(s: &Summary) -> bool {
    s.skipped.is_empty() && s.runs.iter().all(|r| r.deploys_ok == r.deploys)
}

/// The readable summary: one row per contender and connection mode.
pub fn text(s: &Summary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let m = &s.machine;
    let _ = writeln!(
        out,
        "baton-bench tools: the deploys people run today against baton, {} deploys per run, {} round(s)",
        s.deploys_per_run, s.rounds
    );
    let _ = writeln!(out, "{m}");
    let _ = writeln!(
        out,
        "{:<22} {:<10} {:>3} {:>8} {:>9} {:>7} {:>8} {:>10} {:>10} {:>14} {:>16}",
        "tool",
        "conn",
        "rnd",
        "deploys",
        "requests",
        "failed",
        "retried",
        "p99 steady",
        "p99 deploy",
        "+failed at TO",
        "deploy ms (med)"
    );
    for r in &s.runs {
        let _ = writeln!(
            out,
            "{:<22} {:<10} {:>3} {:>8} {:>9} {:>7} {:>8} {:>10.2} {:>10.2} {:>14.2} {:>16}",
            r.tool,
            r.conn,
            r.round,
            format!("{}/{}", r.deploys_ok, r.deploys),
            r.requests,
            r.failed,
            r.retried,
            r.latency_steady.p99_ms,
            r.latency_cutover.p99_ms,
            r.p99_cutover_with_failures_ms,
            r.deploy_ms
                .as_ref()
                .map_or("-".into(), |d| format!("{:.1}", d.median))
        );
        let causes: BTreeMap<_, _> = r.failed_by_cause.iter().filter(|(_, n)| **n > 0).collect();
        if !causes.is_empty() {
            let _ = writeln!(out, "  failed by cause: {causes:?}");
        }
    }
    for k in &s.skipped {
        let _ = writeln!(out, "{:<22} skipped: {}", k.tool, k.why);
    }
    let _ = writeln!(
        out,
        "\nover the rounds: counts summed; latencies (ms) the median of the rounds' values, [lowest, highest]"
    );
    let _ = writeln!(
        out,
        "{:<22} {:<10} {:>9} {:>7} {:>8} {:>18} {:>18} {:>20} {:>10}",
        "tool",
        "conn",
        "deploys",
        "failed",
        "retried",
        "p99 steady",
        "p99 deploy",
        "+failed at TO",
        "deploy ms"
    );
    let cell = |st: &Option<Spread>| match st {
        Some(st) => format!("{:.2} [{:.2}, {:.2}]", st.median, st.min, st.max),
        None => "-".into(),
    };
    for c in &s.contenders {
        let _ = writeln!(
            out,
            "{:<22} {:<10} {:>9} {:>7} {:>8} {:>18} {:>18} {:>20} {:>10}",
            c.tool,
            c.conn,
            format!("{}/{}", c.deploys_ok, c.deploys),
            c.failed,
            c.retried,
            cell(&c.p99_steady_ms),
            cell(&c.p99_deploy_ms),
            cell(&c.p99_deploy_with_failures_ms),
            c.deploy_ms
                .as_ref()
                .map_or("-".into(), |d| format!("{:.1}", d.median))
        );
    }
    let _ = writeln!(
        out,
        "(p99 deploy: answered requests in deploy windows; +failed at TO: every request there, a failed one counted at the timeout)"
    );
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Cmd};

    fn args(extra: &[&str]) -> ToolsArgs {
        let mut argv = vec!["baton-bench", "tools"];
        argv.extend_from_slice(extra);
        match Cli::parse_from(argv).command {
            Cmd::Tools(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_contender_runs_by_default_and_an_unknown_one_is_a_usage_error() {
        assert_eq!(args(&[]).tools, TOOLS);
        let err = run(&args(&["--tools", "pm2-reload,envoy"])).unwrap_err();
        assert!(
            matches!(&err, BenchError::Usage(m) if m.contains("\"envoy\"")),
            "{err}"
        );
    }

    #[test]
    fn a_missing_pm2_says_how_to_install_it() {
        let why = pm2(&args(&["--pm2", "/nonexistent/pm2"])).unwrap();
        assert_eq!(why, PathBuf::from("/nonexistent/pm2"));
        let complete_with = |skipped: usize| {
            complete(&Summary {
                machine: machine(),
                deploys_per_run: 1,
                rounds: 1,
                contenders: Vec::new(),
                runs: Vec::new(),
                skipped: (0..skipped)
                    .map(|_| Skipped {
                        tool: "pm2-reload".into(),
                        why: "pm2 is not installed".into(),
                    })
                    .collect(),
            })
        };
        assert!(complete_with(0));
        assert!(!complete_with(1));
    }

    fn a_run(tool: &str, round: u32, failed: u64, p99_deploy: f64) -> Run {
        let lat = |p99_ms| Latency {
            p99_ms,
            ..Latency::default()
        };
        Run {
            tool: tool.into(),
            conn: "close",
            round,
            rate: 500.0,
            deploys: 20,
            deploys_ok: 20,
            requests: 10_000,
            failed,
            failed_by_cause: BTreeMap::new(),
            retried: 0,
            latency_steady: lat(1.0),
            latency_cutover: lat(p99_deploy),
            p99_cutover_with_failures_ms: p99_deploy,
            send_lag_p99_ms: (0.1, 0.1),
            p99_by_stage_ms: BTreeMap::new(),
            deploy_ms: None,
        }
    }

    #[test]
    fn contenders_sum_counts_and_take_the_median_of_the_rounds() {
        let runs = [
            a_run("naive", 1, 3, 2.0),
            a_run("baton-rust", 1, 0, 1.0),
            a_run("baton-rust", 2, 0, 9.0), // a disturbed round
            a_run("naive", 2, 4, 1.5),
            a_run("baton-rust", 3, 0, 1.2),
            a_run("naive", 3, 5, 3.0),
        ];
        let c = contenders(&runs);
        let names: Vec<&str> = c.iter().map(|c| c.tool.as_str()).collect();
        assert_eq!(
            names,
            ["naive", "baton-rust"],
            "in the order they first ran"
        );
        assert_eq!((c[0].rounds, c[0].failed, c[0].requests), (3, 12, 30_000));
        let baton = c[1].p99_deploy_ms.unwrap();
        assert_eq!(
            (baton.median, baton.min, baton.max, baton.n),
            (1.2, 1.0, 9.0, 3)
        );
        assert!(c[1].deploy_ms.is_none(), "no round had a deploy time");
    }
}
