//! The commands that talk to a running supervisor over its control socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton::control;
use baton::protocol::{EventKind, Outcome, Reply, Request, Role, Status};

use super::report::{self, Report};
use super::{CliError, PromoteArgs, StreamArgs, UpgradeArgs, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

/// The request `baton upgrade` (and `baton deploy`) sends.
pub fn upgrade_request(args: &UpgradeArgs) -> Request {
    Request::Upgrade {
        wait_drain: !args.stream.no_wait_drain,
        no_wait: args.no_wait,
        canary: args.canary,
        canary_for_ms: args.canary_for.map(|d| d.as_millis() as u64),
        bake_ms: args.bake.map(|d| d.as_millis() as u64),
    }
}

pub fn upgrade_what(args: &UpgradeArgs) -> &'static str {
    if args.canary.is_some() {
        "canary"
    } else {
        "upgrade"
    }
}

pub async fn upgrade(path: PathBuf, args: UpgradeArgs) -> Result<u8, CliError> {
    let json = args.stream.json;
    let result = async {
        let streamed = stream(
            &path,
            upgrade_request(&args),
            upgrade_what(&args),
            &args.stream,
        )
        .await?;
        let mut report = Report::from_stream("upgrade", &streamed, args.canary);
        report.active_release = active_release(&path).await;
        Ok(report)
    }
    .await;
    report::finish("upgrade", json, result)
}

pub async fn rollback(path: PathBuf, args: StreamArgs) -> Result<u8, CliError> {
    let json = args.json;
    let result = async {
        let req = Request::Rollback {
            wait_drain: !args.no_wait_drain,
        };
        let streamed = stream(&path, req, "rollback", &args).await?;
        let mut report = Report::from_stream("rollback", &streamed, None);
        // With releases side by side, `current` follows: a later upgrade
        // (or SIGHUP) must not bring back the release just left.
        if streamed.outcome.success {
            super::deploy::follow_active(&path, &mut report, !args.json && !args.events).await;
        }
        report.active_release = active_release(&path).await;
        Ok(report)
    }
    .await;
    report::finish("rollback", json, result)
}

pub async fn promote(path: PathBuf, args: PromoteArgs) -> Result<u8, CliError> {
    let json = args.stream.json;
    let result = async {
        let req = Request::Promote {
            wait_drain: !args.stream.no_wait_drain,
            no_wait: args.no_wait,
        };
        let streamed = stream(&path, req, "promote", &args.stream).await?;
        let mut report = Report::from_stream("promote", &streamed, None);
        if streamed.outcome.success {
            super::deploy::follow_active(
                &path,
                &mut report,
                !args.stream.json && !args.stream.events,
            )
            .await;
        }
        report.active_release = active_release(&path).await;
        Ok(report)
    }
    .await;
    report::finish("promote", json, result)
}

/// What an upgrade-like request came to.
pub struct Streamed {
    pub outcome: Outcome,
    /// The exit code the outcome maps to.
    pub code: u8,
    /// Each event of the request: (event, generation, microseconds since
    /// the request).
    pub events: Vec<(String, u64, u64)>,
    /// The directory the request's new generation started in.
    pub release: Option<String>,
}

/// Sends an upgrade-like request and follows its events to the outcome,
/// printing them as they come (as text, or raw with `--events`; nothing
/// with `--json`, whose one object the caller prints at the end).
pub async fn stream(
    path: &Path,
    req: Request,
    what: &'static str,
    args: &StreamArgs,
) -> Result<Streamed, CliError> {
    let human = !args.json && !args.events;
    let mut outcome = None;
    let mut refused = None;
    // Where a failed upgrade sent the traffic back, if it did.
    let mut back_to = None;
    let mut events = Vec::new();
    let mut spawned = Vec::new();
    control::request(path, &req, |reply| {
        if args.events {
            if let Ok(s) = serde_json::to_string(&reply) {
                println!("{s}");
            }
        }
        match reply {
            Reply::Event(ev) => {
                if let EventKind::RolledBack { to, .. } = ev.kind {
                    back_to = Some(to);
                }
                if human {
                    println!(
                        "{:>9}  {}",
                        format!("+{:.3}s", ev.elapsed_us.unwrap_or(0) as f64 / 1e6),
                        describe_event(ev.generation, &ev.kind)
                    );
                }
                if let EventKind::Spawned { dir, .. } = &ev.kind {
                    spawned.push((ev.generation, dir.clone()));
                }
                events.push((
                    event_name(&ev.kind),
                    ev.generation,
                    ev.elapsed_us.unwrap_or(0),
                ));
            }
            Reply::Done(o) => {
                if human {
                    print_outcome(what, &o, back_to);
                }
                outcome = Some(o);
            }
            Reply::Error(e) => refused = Some(e),
            Reply::Status(_) | Reply::Stopping | Reply::HandingOver(_) => {}
        }
    })
    .await?;
    if let Some(reply) = refused {
        return Err(CliError::Refused { what, reply });
    }
    let outcome = outcome.ok_or(CliError::StreamEnded(what))?;
    let code = match (outcome.success, outcome.config_error) {
        (true, _) => EXIT_OK,
        (false, true) => EXIT_USAGE,
        (false, false) => EXIT_FAILED,
    };
    let release = spawned
        .into_iter()
        .find(|(gen, _)| *gen == outcome.upgrade)
        .map(|(_, dir)| dir);
    Ok(Streamed {
        outcome,
        code,
        events,
        release,
    })
}

/// An event's name on the wire (`ready`, `upgrade_failed`).
fn event_name(kind: &EventKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.get("event").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn print_outcome(what: &str, o: &Outcome, back_to: Option<u64>) {
    let secs = o.elapsed_us as f64 / 1e6;
    if o.success && what == "canary" {
        println!(
            "canary running: generation {} takes its share of new connections \
             ({secs:.3}s); `baton promote` to finish, `baton rollback` to abort",
            o.upgrade
        );
    } else if o.success {
        println!(
            "{what} succeeded: generation {} is active ({secs:.3}s)",
            o.active.unwrap_or(o.upgrade)
        );
    } else {
        let reason = o.reason.as_deref().unwrap_or("unknown reason");
        match (back_to, o.active) {
            // Without overlap the previous release was started again, as a
            // newer generation.
            (Some(to), Some(active)) if to == active && to > o.upgrade => println!(
                "{what} failed: {reason}; the previous release serves again as generation {active}"
            ),
            _ => println!(
                "{what} failed: {reason}; generation {} still serves",
                o.active.map_or("none".into(), |a| a.to_string())
            ),
        }
        if !o.stderr_tail.is_empty() {
            println!("last lines of generation {}'s stderr:", o.upgrade);
            for l in &o.stderr_tail {
                println!("  | {l}");
            }
        }
    }
}

/// The supervisor's status, or why it could not be had.
pub async fn fetch_status(path: &Path) -> Result<Status, CliError> {
    let mut got: Option<Status> = None;
    let mut err = None;
    control::request(path, &Request::Status, |reply| match reply {
        Reply::Status(s) => got = Some(s),
        Reply::Error(e) => err = Some(e),
        _ => {}
    })
    .await?;
    if let Some(reply) = err {
        return Err(CliError::Refused {
            what: "status",
            reply,
        });
    }
    got.ok_or(CliError::NoStatus)
}

/// The directory of the active generation, if the supervisor says.
pub async fn active_release(path: &Path) -> Option<String> {
    let s = fetch_status(path).await.ok()?;
    let active = s.active?;
    s.generations
        .into_iter()
        .find(|g| g.number == active)
        .map(|g| g.dir)
}

/// `baton upgrade --self`: asks, then waits until the new image answers
/// (its `handovers` one higher) or the old one says why it failed.
pub async fn upgrade_self(path: PathBuf) -> Result<u8, CliError> {
    const LIMIT: Duration = Duration::from_secs(30);
    let before = fetch_status(&path).await?;
    let mut refused = None;
    let mut accepted = None;
    // The connection may close under the reply when the exec wins the race
    // with its last write: what counts is the status afterwards.
    let _ = control::request(&path, &Request::UpgradeSelf, |reply| match reply {
        Reply::Error(e) => refused = Some(e),
        Reply::HandingOver(h) => accepted = Some(h),
        _ => {}
    })
    .await;
    if let Some(reply) = refused {
        return Err(CliError::Refused {
            what: "self-upgrade",
            reply,
        });
    }
    if let Some(h) = &accepted {
        println!("handing over to {}", h.exe);
    }
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Ok(now) = fetch_status(&path).await {
            if now.handovers > before.handovers {
                println!(
                    "baton upgraded itself: pid {} (unchanged), version {} -> {}, binary {} ({} bytes)",
                    now.pid, before.version, now.version, now.binary.path, now.binary.size
                );
                return Ok(EXIT_OK);
            }
            if now.self_upgrade_error.is_some()
                && now.self_upgrade_error != before.self_upgrade_error
            {
                println!(
                    "self-upgrade failed, the old baton goes on: {}",
                    now.self_upgrade_error.unwrap_or_default()
                );
                return Ok(EXIT_FAILED);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::SelfUpgradeLost(LIMIT));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// " (worker N)" where the generation runs more than one.
fn of_worker(worker: &Option<u32>) -> String {
    worker.map_or_else(String::new, |w| format!(" (worker {w})"))
}

fn describe_event(gen: u64, kind: &EventKind) -> String {
    match kind {
        EventKind::UpgradeRequested { trigger } => {
            format!("generation {gen} requested ({trigger:?})").to_lowercase()
        }
        EventKind::Spawned { pid, dir, worker } => format!(
            "generation {gen} started: pid {pid} in {dir}{}",
            of_worker(worker)
        ),
        EventKind::SpawnFailed { error } => format!("generation {gen} could not start: {error}"),
        EventKind::Ready { via, .. } => format!("generation {gen} ready ({via})"),
        EventKind::WorkerReady { worker, pid, via } => {
            format!("generation {gen} worker {worker} ready again: pid {pid} ({via})")
        }
        EventKind::Active { .. } => format!("generation {gen} active"),
        EventKind::Canary { share } => {
            format!("generation {gen} takes {share}% of new connections (canary)")
        }
        EventKind::Bake { parked, bake_ms } => format!(
            "generation {parked} parked for {} (bake): `baton rollback` returns to it at once",
            humantime::format_duration(Duration::from_millis(*bake_ms))
        ),
        EventKind::RolledBack { to, reason } => {
            format!("traffic back to generation {to} ({reason})")
        }
        EventKind::Traffic {
            active,
            candidate,
            share,
            parked,
        } => {
            let mut t = format!(
                "traffic: generation {} gets new connections",
                active.map_or("-".into(), |a| a.to_string())
            );
            match candidate {
                Some(c) if *share == 0 => t.push_str(&format!("; {c} is dark (probes only)")),
                Some(c) => t.push_str(&format!("; {c} takes {share}%")),
                None => {}
            }
            if let Some(p) = parked {
                t.push_str(&format!("; {p} is parked"));
            }
            t
        }
        EventKind::Retiring { pid } => {
            format!("generation {gen} retiring (pid {pid} accepts what is queued, then drains)")
        }
        EventKind::Draining { pid, signal } => {
            format!("generation {gen} draining ({signal} to pid {pid})")
        }
        EventKind::Killed { pid } => {
            format!("generation {gen} killed after drain timeout (pid {pid})")
        }
        EventKind::Exited {
            pid,
            status,
            worker,
        } => format!(
            "generation {gen} exited: pid {pid}, {status}{}",
            of_worker(worker)
        ),
        EventKind::Restarting {
            delay_ms,
            restarts,
            worker,
        } => format!(
            "generation {gen} restarting{} in {delay_ms}ms (restart {restarts})",
            of_worker(worker)
        ),
        EventKind::Status { text } => format!("generation {gen} status: {text}"),
        EventKind::Stopping { pid } => format!("generation {gen} stopping (pid {pid})"),
        EventKind::UpgradeSucceeded => format!("generation {gen} took over"),
        EventKind::UpgradeFailed { reason, .. } => format!("generation {gen} failed: {reason}"),
    }
}

pub async fn status(path: PathBuf, json: bool) -> Result<u8, CliError> {
    let s = fetch_status(&path).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", format_status(&s));
    }
    Ok(EXIT_OK)
}

fn fmt_ms(ms: u64) -> String {
    let d = Duration::from_secs(ms / 1000);
    if d.is_zero() {
        format!("{ms}ms")
    } else {
        humantime::format_duration(d).to_string().replace(' ', "")
    }
}

/// The human-readable `status` table.
fn format_status(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "baton {} (pid {}), up {}{}",
        s.version,
        s.pid,
        fmt_ms(s.uptime_ms),
        if s.stopping { ", stopping" } else { "" }
    );
    if s.handovers > 0 {
        let _ = writeln!(
            out,
            "upgraded in place {} time(s); binary {} ({} bytes)",
            s.handovers, s.binary.path, s.binary.size
        );
    }
    if let Some(e) = &s.self_upgrade_error {
        let _ = writeln!(out, "last self-upgrade failed: {e}");
    }
    let _ = writeln!(out, "traffic: {}", s.traffic);
    if let Some(r) = &s.releases {
        let _ = writeln!(out, "releases: {} (keep {})", r.dir, r.keep);
    }
    let _ = writeln!(out, "\nSOCKET   FD  TRAFFIC  ADDRESS");
    for sock in &s.sockets {
        let traffic = if sock.steered { "steered" } else { "shared" };
        let _ = writeln!(
            out,
            "{:<8} {:<3} {:<8} {}",
            sock.name, sock.fd, traffic, sock.address
        );
    }
    let _ = writeln!(
        out,
        "\nGEN  STATE     TRAFFIC      PID      UPTIME    RESTARTS  DIR  (STATUS)"
    );
    for g in s.generations.iter().rev() {
        let state = g.state.as_str();
        let traffic = match (g.role, g.share) {
            (Some(Role::Candidate), Some(0)) => "dark".to_owned(),
            (Some(Role::Parked), _) => "parked".to_owned(),
            (Some(_), Some(share)) => format!("{share}%"),
            _ => "-".to_owned(),
        };
        let pid = g.pid.map_or("-".to_owned(), |p| {
            if g.pids.len() > 1 {
                format!("{p}+{}", g.pids.len() - 1)
            } else {
                p.to_string()
            }
        });
        let _ = write!(
            out,
            "{:<4} {:<9} {:<12} {:<8} {:<9} {:<9} {}",
            g.number,
            state,
            traffic,
            pid,
            g.uptime_ms.map_or("-".into(), fmt_ms),
            g.restarts,
            g.dir
        );
        match (g.pid, &g.status_text, &g.last_exit) {
            (None, _, Some(exit)) => {
                let _ = write!(out, "  ({exit})");
            }
            (Some(_), Some(text), _) => {
                let _ = write!(out, "  ({text})");
            }
            _ => {}
        }
        if let Some(p) = &g.priority {
            let _ = write!(out, "  [cpu: {p}]");
        }
        out.push('\n');
        // One line per worker where there are several.
        if g.workers.len() > 1 {
            for w in &g.workers {
                let state = w.state.as_str();
                let mut line = format!(
                    "     worker {:<3} {:<10} {:<8} {:<9} {:<9}",
                    w.index,
                    state,
                    w.pid.map_or("-".to_owned(), |p| p.to_string()),
                    w.uptime_ms.map_or("-".into(), fmt_ms),
                    w.restarts
                );
                if let Some(exit) = &w.last_exit {
                    let _ = write!(line, " (last: {exit})");
                }
                if let Some(p) = &w.priority {
                    let _ = write!(line, " [cpu: {p}]");
                }
                let _ = writeln!(out, "{}", line.trim_end());
            }
        }
    }
    if let Some(u) = s.upgrading {
        let _ = writeln!(out, "\nupgrade to generation {u} in progress");
    }
    out
}

pub async fn stop(path: PathBuf) -> Result<u8, CliError> {
    let res = control::request(&path, &Request::Stop, |_| {}).await;
    match res {
        // Stop is idempotent: if the reply was cut short because the
        // supervisor finished first, its disappearing is the answer.
        Ok(()) | Err(control::ControlError::Http(_)) => {
            // Wait until the supervisor has gone (its socket stops answering).
            for _ in 0..6000 {
                if tokio::net::UnixStream::connect(&path).await.is_err() {
                    println!("stopped");
                    return Ok(EXIT_OK);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(CliError::StillDraining)
        }
        Err(e) => Err(e.into()),
    }
}
