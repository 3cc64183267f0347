//! baton-bench: proves baton's cutovers under load with numbers.
//!
//! It drives HTTP/1.1 load (open loop on a timetable, or closed loop) at
//! the example app, alone and under baton (steered traffic, baton's
//! default, and shared sockets side by side), while upgrading baton
//! through its control socket, and compares with a naive deploy and with
//! HAProxy. With steered traffic it also times rollbacks during a bake and
//! counts a canary's share of new connections, from outside baton.
//! See docs/benchmarks.md for what it measures and what the numbers mean.

#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod cutover;
pub mod load;
pub mod measure;
pub mod no_overlap;
pub mod plot;
pub mod priority;
pub mod procs;
pub mod procstat;
pub mod report;
pub mod scenario;
pub mod schedule;
pub mod servers;
pub mod soak;
pub mod stamps;
pub mod steering;
pub mod summary;
pub mod tools;

use std::io::Write;
use std::process::ExitCode;

use crate::cli::{
    Cli, Cmd, LoadArgs, NoOverlapArgs, PriorityArgs, ScenarioArgs, ServersArgs, SoakArgs, ToolsArgs,
};
use crate::load::{LoadSpec, Model};
use crate::measure::RunSpec;
use crate::schedule::CutoverPlan;

/// Exit codes: 0 done (and, with `--strict`, every target held).
pub const EXIT_OK: u8 = 0;
/// `--strict` and a request failed or a target was missed.
pub const EXIT_MISSED: u8 = 1;
/// Bad usage or an unusable environment (binary missing, port in use).
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Env(String),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl BenchError {
    /// For `map_err`: an I/O error while doing `what`.
    pub fn io(what: &'static str) -> impl Fn(std::io::Error) -> BenchError {
        move |source| BenchError::Io { what, source }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let res = match cli.command {
        Cmd::Quick(args) => scenario_cmd(scenario::Preset::quick(), &args),
        Cmd::Full(args) => scenario_cmd(scenario::Preset::full(), &args),
        Cmd::Load(args) => load_cmd(&args),
        Cmd::NoOverlap(args) => no_overlap_cmd(&args),
        Cmd::Servers(args) => servers_cmd(&args),
        Cmd::Priority(args) => priority_cmd(&args),
        Cmd::Soak(args) => soak_cmd(&args),
        Cmd::Tools(args) => tools_cmd(&args),
    };
    match res {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("baton-bench: error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Writes a summary as JSON and text into `files`, and prints it: the
/// text, or with `json` the JSON on stdout and the text on stderr.
fn publish(
    summary: &impl serde::Serialize,
    text: &str,
    files: (std::path::PathBuf, std::path::PathBuf),
    json: bool,
) -> Result<(), BenchError> {
    let encoded = serde_json::to_string(summary).map_err(|e| BenchError::Env(e.to_string()))?;
    let _ = std::fs::write(files.0, &encoded);
    let _ = std::fs::write(files.1, text);
    if json {
        eprint!("{text}");
        println!("{encoded}");
    } else {
        print!("{text}");
    }
    let _ = std::io::stdout().flush();
    Ok(())
}

fn scenario_cmd(preset: scenario::Preset, args: &ScenarioArgs) -> Result<u8, BenchError> {
    let summary = scenario::run(preset, args)?;
    let text = summary::text(&summary);
    let files = (args.out.join("report.json"), args.out.join("summary.txt"));
    publish(&summary, &text, files, args.json)?;
    let missed = summary.failed > 0
        || summary.shared.failed > 0
        || summary.rollback.failed > 0
        || summary.targets.iter().any(|t| !t.ok);
    Ok(if args.strict && missed {
        EXIT_MISSED
    } else {
        EXIT_OK
    })
}

fn no_overlap_cmd(args: &NoOverlapArgs) -> Result<u8, BenchError> {
    let summary = no_overlap::run(args)?;
    let text = no_overlap::text(&summary);
    let files = (
        args.out.join("no-overlap.json"),
        args.out.join("no-overlap.txt"),
    );
    publish(&summary, &text, files, args.json)?;
    Ok(if args.strict && summary.failed > 0 {
        EXIT_MISSED
    } else {
        EXIT_OK
    })
}

fn servers_cmd(args: &ServersArgs) -> Result<u8, BenchError> {
    let summary = servers::run(args)?;
    let text = servers::text(&summary);
    let files = (args.out.join("servers.json"), args.out.join("servers.txt"));
    publish(&summary, &text, files, args.json)?;
    Ok(if args.strict && !servers::held(&summary) {
        EXIT_MISSED
    } else {
        EXIT_OK
    })
}

fn priority_cmd(args: &PriorityArgs) -> Result<u8, BenchError> {
    let summary = priority::run(args)?;
    let text = priority::text(&summary);
    let files = (
        args.out.join("priority.json"),
        args.out.join("priority.txt"),
    );
    publish(&summary, &text, files, args.json)?;
    Ok(if args.strict && summary.failed > 0 {
        EXIT_MISSED
    } else {
        EXIT_OK
    })
}

fn soak_cmd(args: &SoakArgs) -> Result<u8, BenchError> {
    let summary = soak::run(args)?;
    let text = soak::text(&summary);
    let files = (args.out.join("soak.json"), args.out.join("soak.txt"));
    publish(&summary, &text, files, args.json)?;
    Ok(if args.strict && !soak::held(&summary) {
        EXIT_MISSED
    } else {
        EXIT_OK
    })
}

fn tools_cmd(args: &ToolsArgs) -> Result<u8, BenchError> {
    let summary = tools::run(args)?;
    let text = tools::text(&summary);
    let files = (args.out.join("tools.json"), args.out.join("tools.txt"));
    publish(&summary, &text, files, args.json)?;
    Ok(if args.strict && !tools::complete(&summary) {
        EXIT_MISSED
    } else {
        EXIT_OK
    })
}

fn load_cmd(args: &LoadArgs) -> Result<u8, BenchError> {
    if !args.target.ip().is_loopback() {
        return Err(BenchError::Usage(format!(
            "{} is not a loopback address: baton-bench only loads 127.0.0.0/8 and ::1",
            args.target
        )));
    }
    let model = match args.rate {
        Some(rate) if schedule::Schedule::new(0, rate).is_some() => Model::Open { rate },
        Some(rate) => return Err(BenchError::Usage(format!("bad --rate {rate}"))),
        None => Model::Closed,
    };
    let plan = args.control.as_ref().map(|_| CutoverPlan {
        lead: std::time::Duration::from_secs(1),
        interval: args.interval,
        count: args.cutovers,
        tail: std::time::Duration::from_secs(1),
    });
    // Sample the supervisor if we know it.
    let pid = args.control.as_deref().and_then(baton_pid);
    let spec = RunSpec {
        name: "load".into(),
        target: if args.control.is_some() {
            "baton"
        } else {
            "target"
        }
        .into(),
        addr: args.target,
        load: LoadSpec {
            model,
            conn: args.conn,
            concurrency: args.concurrency.max(1),
            timeout: args.timeout,
            threads: args.client_threads,
        },
        duration: args.duration,
        plan,
        sample_pid: pid,
        tree_pid: None,
        stamps: args.stamps.clone(),
        quiet: args.quiet,
    };
    let deployer = match args.control.clone() {
        Some(control) => Some(cutover::Deployer::Baton(
            cutover::BatonDeploy::new(control).map_err(BenchError::io("starting a runtime"))?,
        )),
        None => None,
    };
    let (run, _) = measure::measure(spec, deployer).map_err(BenchError::io("running the load"))?;
    let (report, _) = report::analyze(&run);
    if let Some(path) = &args.plot {
        let buckets = report::timeline(&run.load.records, 100_000);
        let starts = report::cutover_starts_s(&run);
        plot::timeline_svg(
            path,
            "baton-bench load",
            &buckets,
            &starts,
            (0.0, run.load.ended_us as f64 / 1e6),
        )
        .map_err(BenchError::Env)?;
    }
    if args.json {
        let json = serde_json::to_string(&report).map_err(|e| BenchError::Env(e.to_string()))?;
        eprint!("{}", report::text(&report));
        println!("{json}");
    } else {
        print!("{}", report::text(&report));
    }
    Ok(EXIT_OK)
}

/// The supervisor's pid, from its status.
fn baton_pid(control: &std::path::Path) -> Option<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let mut pid = None;
    let _ = rt.block_on(baton::control::request(
        control,
        &baton::protocol::Request::Status,
        |r| {
            if let baton::protocol::Reply::Status(s) = r {
                pid = Some(s.pid as i32);
            }
        },
    ));
    pid
}
