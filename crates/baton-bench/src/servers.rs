//! Real servers under baton: gunicorn, uvicorn, Node's `http` and the Rust
//! example, each upgraded again and again under load with steered traffic
//! (baton's default), each taking the listening socket the way it does
//! under systemd:
//!
//! - **gunicorn** reads `LISTEN_FDS` itself and sends `READY=1` (from its
//!   arbiter, before its workers are forked: connections steered to the
//!   new generation wait in its socket's queue until a worker accepts);
//!   2 sync workers; drains on SIGTERM.
//! - **uvicorn** takes `--fd 3`; it sends no `READY=1`, so baton probes it
//!   (`--ready http:/`); drains on SIGTERM.
//! - **node** (`benches/servers/server.js`) listens on `{fd: 3}`; probed
//!   like uvicorn; closes idle connections and exits on SIGTERM.
//! - **rust** is `examples/hello-rust` (`READY=1`, its own drain).
//!
//! The Python apps and the Node script are in `benches/servers/`;
//! `benches/setup.sh` installs gunicorn and uvicorn (pinned) into
//! `target/bench-venv`. A server whose program is missing is skipped and
//! said so. Every request counts, by cause, as in the other scenarios.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::cli::ServersArgs;
use crate::load::{ConnMode, LoadSpec};
use crate::measure::{self, RunSpec};
use crate::procs::{self, Bins, Scratch};
use crate::report::{self, Latency, Stat};
use crate::schedule::CutoverPlan;
use crate::summary::{loadavg, machine, Machine};
use crate::BenchError;

/// The servers this scenario knows, in the order it runs them.
pub const SERVERS: [&str; 4] = ["rust", "gunicorn", "uvicorn", "node"];

/// How baton runs one server.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// `baton run` flags beyond the listener and control socket.
    pub run_flags: Vec<String>,
}

/// One server in one connection mode.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub server: String,
    pub conn: &'static str,
    /// The command baton ran (its `--` part) and its extra flags.
    pub command: Vec<String>,
    pub run_flags: Vec<String>,
    pub rate: f64,
    pub cutovers: usize,
    pub cutovers_ok: usize,
    pub requests: u64,
    pub failed: u64,
    pub failed_by_cause: BTreeMap<&'static str, u64>,
    pub retried: u64,
    pub latency_steady: Latency,
    pub latency_cutover: Latency,
    /// Upgrade requested → old generation exited, from baton's events.
    pub cutover_ms: Option<Stat>,
    /// Spawned → ready (the server's own start), from baton's events.
    pub start_ms: Option<Stat>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub server: String,
    pub why: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub machine: Machine,
    pub cutovers_per_run: u32,
    /// Failed requests over every run.
    pub failed: u64,
    pub runs: Vec<Run>,
    pub skipped: Vec<Skipped>,
}

pub fn run(args: &ServersArgs) -> Result<Summary, BenchError> {
    if args.cutovers == 0 || !args.rate.is_finite() || args.rate <= 0.0 {
        return Err(BenchError::Usage(
            "--cutovers and --rate must be more than zero".into(),
        ));
    }
    if let Some(bad) = args.servers.iter().find(|s| !SERVERS.contains(&s.as_str())) {
        return Err(BenchError::Usage(format!(
            "unknown server {bad:?}: expected one of {}",
            SERVERS.join(", ")
        )));
    }
    let baton = procs::sibling("baton", args.baton.as_deref()).map_err(BenchError::Env)?;
    std::fs::create_dir_all(&args.out).map_err(BenchError::io("creating the output directory"))?;
    let scratch =
        Scratch::new("servers").map_err(BenchError::io("creating a scratch directory"))?;
    let mut m = machine();
    m.loadavg_start = loadavg();
    let (mut runs, mut skipped) = (Vec::new(), Vec::new());
    for server in SERVERS
        .iter()
        .filter(|s| args.servers.iter().any(|a| a == *s))
    {
        let launch = match launch(server, args) {
            Ok(l) => l,
            Err(why) => {
                eprintln!("baton-bench: skipping {server}: {why}");
                skipped.push(Skipped {
                    server: (*server).into(),
                    why,
                });
                continue;
            }
        };
        let bins = Bins {
            baton: baton.clone(),
            app: launch.program.clone(),
            haproxy: None,
        };
        for &conn in &args.modes {
            runs.push(run_one(args, server, &launch, &bins, &scratch.0, conn)?);
        }
    }
    m.loadavg_end = loadavg();
    Ok(Summary {
        machine: m,
        cutovers_per_run: args.cutovers,
        failed: runs.iter().map(|r| r.failed).sum(),
        runs,
        skipped,
    })
}

/// Where this scenario's apps live: `benches/servers` in the source tree.
pub(crate) fn servers_dir(args: &ServersArgs) -> PathBuf {
    args.servers_dir
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/servers"))
}

/// The virtualenv `benches/setup.sh` makes: `target/bench-venv`, beside
/// the directory this executable is in.
pub(crate) fn venv(args: &ServersArgs) -> Option<PathBuf> {
    if let Some(v) = &args.venv {
        return Some(v.clone());
    }
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.join("bench-venv"))
}

pub(crate) fn launch(server: &str, args: &ServersArgs) -> Result<Launch, String> {
    let dir = servers_dir(args);
    let dir_s = dir.to_string_lossy().into_owned();
    let in_venv = |name: &str| -> Result<PathBuf, String> {
        let p = venv(args)
            .map(|v| v.join("bin").join(name))
            .filter(|p| p.is_file())
            .ok_or_else(|| {
                format!("{name} is not installed (run benches/setup.sh, or pass --venv)")
            })?;
        Ok(p)
    };
    let probe = vec!["--ready".to_owned(), "http:/".to_owned()];
    Ok(match server {
        "rust" => Launch {
            program: procs::sibling("hello", args.app.as_deref())?,
            args: Vec::new(),
            run_flags: Vec::new(),
        },
        "gunicorn" => Launch {
            program: in_venv("gunicorn")?,
            args: [
                "--workers",
                "2",
                "--no-control-socket",
                "--graceful-timeout",
                "10",
                "--chdir",
                &dir_s,
                "app:app",
            ]
            .map(String::from)
            .to_vec(),
            run_flags: Vec::new(),
        },
        "uvicorn" => Launch {
            program: in_venv("uvicorn")?,
            args: [
                "--fd",
                "3",
                "--app-dir",
                &dir_s,
                "--no-access-log",
                "--timeout-graceful-shutdown",
                "10",
                "app:asgi",
            ]
            .map(String::from)
            .to_vec(),
            run_flags: probe,
        },
        "node" => {
            let node = match &args.node {
                Some(p) => p.clone(),
                None => procs::on_path("node")
                    .ok_or("node is not installed (apt-get install nodejs)")?,
            };
            Launch {
                program: node,
                args: vec![dir.join("server.js").to_string_lossy().into_owned()],
                run_flags: probe,
            }
        }
        other => return Err(format!("unknown server {other:?}")),
    })
}

fn run_one(
    args: &ServersArgs,
    server: &str,
    launch: &Launch,
    bins: &Bins,
    scratch: &Path,
    conn: ConnMode,
) -> Result<Run, BenchError> {
    let name = format!("servers-{server}-{}", conn.name());
    let port = procs::free_port().map_err(BenchError::io("finding a free port"))?;
    let control = scratch.join(format!("{server}-{}.sock", conn.name()));
    let log = args.out.join(format!("{name}-baton.log"));
    let proc = procs::spawn_baton_with(
        bins,
        port,
        &control,
        None,
        &log,
        &launch.run_flags,
        &launch.args,
    )
    .map_err(|e| BenchError::Env(format!("{server}: {e}")))?;
    let spec = RunSpec {
        name,
        target: format!("baton-{server}"),
        addr: procs::loopback(port),
        load: LoadSpec::open(args.rate, conn, args.concurrency, args.timeout),
        duration: Duration::ZERO,
        plan: Some(CutoverPlan {
            lead: Duration::from_secs(1),
            interval: args.interval,
            count: args.cutovers,
            tail: Duration::from_secs(1),
        }),
        sample_pid: Some(proc.pid()),
        tree_pid: None,
        stamps: None,
        quiet: args.quiet,
    };
    let data = measure::under_baton(spec, &control, proc)?;
    let (rep, _) = report::analyze(&data);
    let mut command = vec![launch.program.to_string_lossy().into_owned()];
    command.extend(launch.args.iter().cloned());
    Ok(Run {
        server: server.into(),
        conn: conn.name(),
        command,
        run_flags: launch.run_flags.clone(),
        rate: args.rate,
        cutovers: rep.cutover_count,
        cutovers_ok: rep.cutovers_ok,
        requests: rep.sent,
        failed: rep.failed,
        failed_by_cause: rep.failed_by_cause.clone(),
        retried: rep.retried,
        latency_steady: rep.latency.steady,
        latency_cutover: rep.latency.cutover,
        cutover_ms: rep.phases_ms.get("total").cloned(),
        start_ms: rep.phases_ms.get("spawned→ready").cloned(),
    })
}

/// Whether every server asked for ran, every cutover succeeded and no
/// request failed (what `--strict` checks).
pub fn held(s: &Summary) -> bool {
    s.failed == 0 && s.skipped.is_empty() && s.runs.iter().all(|r| r.cutovers_ok == r.cutovers)
}

/// The readable summary: a table, one row per server and connection mode.
pub fn text(s: &Summary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let m = &s.machine;
    let _ = writeln!(
        out,
        "baton-bench servers: real servers under baton (steered traffic), {} cutovers per run",
        s.cutovers_per_run
    );
    let _ = writeln!(out, "{m}");
    let _ = writeln!(
        out,
        "{:<9} {:<10} {:>9} {:>9} {:>7} {:>8} {:>17} {:>24} {:>20}",
        "server",
        "conn",
        "cutovers",
        "requests",
        "failed",
        "retried",
        "p99 steady/cut ms",
        "cutover ms (med/p90/max)",
        "start ms (med/p90)"
    );
    for r in &s.runs {
        let start = r
            .start_ms
            .as_ref()
            .map_or("-".into(), |s| format!("{:.1} / {:.1}", s.median, s.p90));
        let _ = writeln!(
            out,
            "{:<9} {:<10} {:>9} {:>9} {:>7} {:>8} {:>17} {:>24} {:>20}",
            r.server,
            r.conn,
            format!("{}/{}", r.cutovers_ok, r.cutovers),
            r.requests,
            r.failed,
            r.retried,
            format!(
                "{:.2} / {:.2}",
                r.latency_steady.p99_ms, r.latency_cutover.p99_ms
            ),
            report::fmt_stat(&r.cutover_ms, 1),
            start
        );
        let causes: BTreeMap<_, _> = r.failed_by_cause.iter().filter(|(_, n)| **n > 0).collect();
        if !causes.is_empty() {
            let _ = writeln!(out, "  failed by cause: {causes:?}");
        }
    }
    for k in &s.skipped {
        let _ = writeln!(out, "{:<9} skipped: {}", k.server, k.why);
    }
    let _ = writeln!(
        out,
        "{}: {} failed requests over {} runs{}",
        if held(s) { "held" } else { "NOT HELD" },
        s.failed,
        s.runs.len(),
        if s.skipped.is_empty() {
            String::new()
        } else {
            format!(", {} servers skipped", s.skipped.len())
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Cmd};

    fn args(extra: &[&str]) -> ServersArgs {
        let mut argv = vec!["baton-bench", "servers"];
        argv.extend_from_slice(extra);
        match Cli::parse_from(argv).command {
            Cmd::Servers(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_server_runs_by_default_and_an_unknown_one_is_a_usage_error() {
        assert_eq!(args(&[]).servers, SERVERS);
        let err = run(&args(&["--servers", "rust,apache"])).unwrap_err();
        assert!(
            matches!(&err, BenchError::Usage(m) if m.contains("\"apache\"")),
            "{err}"
        );
    }

    /// A server whose program is missing is skipped with the reason (the
    /// run goes on), not silently left out.
    #[test]
    fn a_missing_server_says_how_to_install_it() {
        let a = args(&["--venv", "/nonexistent", "--node", "/nonexistent/node"]);
        let why = launch("gunicorn", &a).unwrap_err();
        assert!(why.contains("benches/setup.sh"), "{why}");
        let node = launch("node", &a).unwrap();
        assert_eq!(node.program, Path::new("/nonexistent/node"));
        assert_eq!(node.run_flags, ["--ready", "http:/"]);
    }

    #[test]
    fn held_needs_every_server_every_cutover_and_no_failure() {
        let mut s = Summary {
            machine: machine(),
            cutovers_per_run: 1,
            failed: 0,
            runs: Vec::new(),
            skipped: Vec::new(),
        };
        assert!(held(&s));
        s.skipped.push(Skipped {
            server: "node".into(),
            why: "missing".into(),
        });
        assert!(!held(&s));
        s.skipped.clear();
        s.failed = 1;
        assert!(!held(&s));
    }
}
