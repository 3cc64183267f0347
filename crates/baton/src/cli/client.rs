//! The commands that talk to a running supervisor over its control socket.

use std::path::PathBuf;
use std::time::Duration;

use baton::control;
use baton::protocol::{EventKind, GenState, Reply, Request, Status};

use super::{CliError, UpgradeArgs, EXIT_FAILED, EXIT_OK, EXIT_USAGE};

pub async fn upgrade(path: PathBuf, rollback: bool, args: UpgradeArgs) -> Result<u8, CliError> {
    let wait_drain = !args.no_wait_drain;
    let req = if rollback {
        Request::Rollback { wait_drain }
    } else {
        Request::Upgrade { wait_drain }
    };
    let what = if rollback { "rollback" } else { "upgrade" };
    let mut code = None;
    let mut refused = None;
    control::request(&path, &req, |reply| {
        if args.json {
            if let Ok(s) = serde_json::to_string(&reply) {
                println!("{s}");
            }
        }
        match reply {
            Reply::Event(ev) => {
                if !args.json {
                    println!(
                        "{:>9}  {}",
                        format!("+{:.3}s", ev.elapsed_us.unwrap_or(0) as f64 / 1e6),
                        describe_event(ev.generation, &ev.kind)
                    );
                }
            }
            Reply::Done(o) => {
                if !args.json {
                    let secs = o.elapsed_us as f64 / 1e6;
                    if o.success {
                        println!(
                            "{what} succeeded: generation {} is active ({secs:.3}s)",
                            o.upgrade
                        );
                    } else {
                        println!(
                            "{what} failed: {}; generation {} still serves",
                            o.reason.as_deref().unwrap_or("unknown reason"),
                            o.active.map_or("none".into(), |a| a.to_string())
                        );
                        if !o.stderr_tail.is_empty() {
                            println!("last lines of generation {}'s stderr:", o.upgrade);
                            for l in &o.stderr_tail {
                                println!("  | {l}");
                            }
                        }
                    }
                }
                code = Some(match (o.success, o.config_error) {
                    (true, _) => EXIT_OK,
                    (false, true) => EXIT_USAGE,
                    (false, false) => EXIT_FAILED,
                });
            }
            Reply::Error(e) => refused = Some(e),
            Reply::Status(_) | Reply::Stopping => {}
        }
    })
    .await?;
    if let Some(reply) = refused {
        return Err(CliError::Refused { what, reply });
    }
    code.ok_or(CliError::StreamEnded(what))
}

fn describe_event(gen: u64, kind: &EventKind) -> String {
    match kind {
        EventKind::UpgradeRequested { trigger } => {
            format!("generation {gen} requested ({trigger:?})").to_lowercase()
        }
        EventKind::Spawned { pid, dir } => format!("generation {gen} started: pid {pid} in {dir}"),
        EventKind::SpawnFailed { error } => format!("generation {gen} could not start: {error}"),
        EventKind::Ready { via, .. } => format!("generation {gen} ready ({via})"),
        EventKind::Active { .. } => format!("generation {gen} active"),
        EventKind::Draining { pid, signal } => {
            format!("generation {gen} draining ({signal} to pid {pid})")
        }
        EventKind::Killed { pid } => {
            format!("generation {gen} killed after drain timeout (pid {pid})")
        }
        EventKind::Exited { pid, status } => {
            format!("generation {gen} exited: pid {pid}, {status}")
        }
        EventKind::Restarting { delay_ms, restarts } => {
            format!("generation {gen} restarting in {delay_ms}ms (restart {restarts})")
        }
        EventKind::Status { text } => format!("generation {gen} status: {text}"),
        EventKind::Stopping { pid } => format!("generation {gen} stopping (pid {pid})"),
        EventKind::UpgradeSucceeded => format!("generation {gen} took over"),
        EventKind::UpgradeFailed { reason, .. } => format!("generation {gen} failed: {reason}"),
    }
}

pub async fn status(path: PathBuf, json: bool) -> Result<u8, CliError> {
    let mut got: Option<Status> = None;
    let mut err = None;
    control::request(&path, &Request::Status, |reply| match reply {
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
    let s = got.ok_or(CliError::NoStatus)?;
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
    let _ = writeln!(out, "\nSOCKET   FD  ADDRESS");
    for sock in &s.sockets {
        let _ = writeln!(out, "{:<8} {:<3} {}", sock.name, sock.fd, sock.address);
    }
    let _ = writeln!(
        out,
        "\nGEN  STATE     PID      UPTIME    RESTARTS  DIR  (STATUS)"
    );
    for g in s.generations.iter().rev() {
        let state = match g.state {
            GenState::Starting => "starting",
            GenState::Ready => "ready",
            GenState::Active => "active",
            GenState::Draining => "draining",
            GenState::Exited => "exited",
            GenState::Failed => "failed",
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
            "{:<4} {:<9} {:<8} {:<9} {:<9} {}",
            g.number,
            state,
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
        out.push('\n');
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
