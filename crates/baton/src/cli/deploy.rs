//! `baton deploy` and `baton releases`: releases side by side, managed
//! client-side (see `baton::releases`); the supervisor only ever sees an
//! ordinary upgrade of whatever `current` points to.
//!
//! A deploy: check the artifact and the name (nothing written yet), take
//! the deploy lock, unpack into a temporary directory and rename it into
//! `releases/NAME`, repoint `current`, then upgrade. If the upgrade fails
//! (or is refused), `current` goes back to where it pointed; a refused
//! upgrade (nothing ran) also removes the new release. On success, old
//! releases are pruned, never the active, parked or previous one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use baton::protocol::{ErrorKind, ErrorReply, Role, Status};
use baton::releases::{
    self, DeployLock, DeployOutcome, Listed, Meta, Releases, DEFAULT_KEEP_RELEASES,
};

use super::client::{self, fetch_status};
use super::report::{self, Report};
use super::{CliError, DeployArgs, ReleasesArgs, EXIT_OK};

pub async fn deploy(path: PathBuf, args: DeployArgs) -> Result<u8, CliError> {
    let json = args.upgrade.stream.json;
    let result = run_deploy(&path, &args).await;
    report::finish("deploy", json, result)
}

/// The releases root: the flag, else what the supervisor reports.
fn root_of(flag: Option<&Path>, status: Option<&Status>) -> Result<Releases, CliError> {
    flag.map(Path::to_owned)
        .or_else(|| {
            status
                .and_then(|s| s.releases.as_ref())
                .map(|r| PathBuf::from(&r.dir))
        })
        .map(Releases::new)
        .ok_or(CliError::NoReleasesDir)
}

fn refused(kind: ErrorKind, message: String) -> CliError {
    CliError::Refused {
        what: "deploy",
        reply: ErrorReply { kind, message },
    }
}

async fn run_deploy(path: &Path, args: &DeployArgs) -> Result<Report, CliError> {
    let stream_args = &args.upgrade.stream;
    let human = !stream_args.json && !stream_args.events;
    // Without an upgrade the supervisor is needed only to find the root.
    let status = if args.no_upgrade && args.releases_dir.is_some() {
        None
    } else {
        Some(fetch_status(path).await?)
    };
    let rel = root_of(args.releases_dir.as_deref(), status.as_ref())?;
    if let (Some(s), false) = (&status, args.no_upgrade) {
        // Refused before anything is written; the supervisor would refuse
        // the upgrade anyway.
        if s.stopping {
            return Err(refused(
                ErrorKind::Stopping,
                "the supervisor is stopping".into(),
            ));
        }
        if let Some(gen) = s.upgrading {
            return Err(refused(
                ErrorKind::Busy,
                format!("an upgrade (to generation {gen}) is already in progress; try again when it ends"),
            ));
        }
    }
    let name = match &args.name {
        Some(n) => n.clone(),
        None => {
            releases::name_from_artifact(&args.artifact).unwrap_or_else(releases::timestamp_name)
        }
    };
    rel.preflight(&args.artifact, &name)?;
    let lock = rel.lock()?;
    let started = Instant::now();
    let installed = rel.install(&args.artifact, &name, &lock)?;
    if human {
        println!(
            "unpacked {} into {} ({} files, {} bytes, {:.3}s)",
            args.artifact.display(),
            installed.dir.display(),
            installed.files,
            installed.bytes,
            started.elapsed().as_secs_f64()
        );
    }
    let before = rel.current_link()?;
    let mut meta = Meta::new(&name, &args.artifact);
    if args.no_upgrade {
        meta.outcome = DeployOutcome::Staged;
    }
    if let Err(e) = rel
        .write_meta(&meta, &lock)
        .and_then(|()| rel.point_current(&name, &lock))
    {
        // Nothing ran in it: leave the root as it was.
        let _ = rel.set_current(before.as_deref(), &lock);
        let _ = rel.remove(&name, &lock);
        return Err(e.into());
    }
    let new_link = format!("releases/{name}");
    if human {
        match &before {
            Some(b) => println!("current -> {new_link} (was {})", b.display()),
            None => println!("current -> {new_link}"),
        }
    }
    let mut report = Report {
        command: "deploy",
        outcome: "succeeded",
        exit_code: EXIT_OK,
        release: Some(installed.dir.display().to_string()),
        release_name: Some(name.clone()),
        current: Some(new_link),
        ..Report::default()
    };
    if args.no_upgrade {
        return Ok(report);
    }

    let streamed = client::stream(
        path,
        client::upgrade_request(&args.upgrade),
        client::upgrade_what(&args.upgrade),
        stream_args,
    )
    .await;
    let streamed = match streamed {
        Ok(s) => s,
        Err(e) => {
            revert_after_error(path, &rel, &name, before.as_deref(), &e, &lock, human).await;
            return Err(e);
        }
    };
    let own = Report::from_stream("deploy", &streamed, args.upgrade.canary);
    report = Report {
        release_name: report.release_name,
        current: report.current,
        // The release as the supervisor resolved it, else as unpacked.
        release: own.release.clone().or(report.release),
        ..own
    };
    meta.generation = Some(streamed.outcome.upgrade);
    if streamed.outcome.success {
        meta.outcome = if args.upgrade.canary.is_some() {
            DeployOutcome::Canary
        } else {
            DeployOutcome::Succeeded
        };
        note(rel.write_meta(&meta, &lock));
        let status = fetch_status(path).await.ok();
        report.active_release = status.as_ref().and_then(active_dir);
        let keep = status
            .as_ref()
            .and_then(|s| s.releases.as_ref())
            .map_or(DEFAULT_KEEP_RELEASES, |r| r.keep);
        let mut protect = in_use(&rel, status.as_ref());
        protect.push(name.clone());
        if let Some(b) = before
            .as_deref()
            .and_then(|b| rel.name_of(&rel.root().join(b)))
        {
            protect.push(b);
        }
        match rel.prune(keep as usize, &protect, &lock) {
            Ok(pruned) => {
                if human && !pruned.is_empty() {
                    println!("pruned {} (keep_releases = {keep})", pruned.join(", "));
                }
                report.pruned = pruned;
            }
            Err(e) => eprintln!(
                "baton: warning: pruning old releases: {}",
                baton::error_chain(&e)
            ),
        }
    } else {
        meta.outcome = DeployOutcome::Failed;
        meta.reason = streamed.outcome.reason.clone();
        note(rel.write_meta(&meta, &lock));
        match rel.set_current(before.as_deref(), &lock) {
            Ok(()) => {
                report.current = before.as_ref().map(|b| b.display().to_string());
                if human {
                    match &before {
                        Some(b) => println!("current -> {} again", b.display()),
                        None => println!("current removed again"),
                    }
                }
            }
            Err(e) => eprintln!(
                "baton: error: putting `current` back: {}",
                baton::error_chain(&e)
            ),
        }
        report.active_release = client::active_release(path).await;
    }
    Ok(report)
}

/// The upgrade did not report an outcome. Refused (busy, stopping, a bad
/// configuration): nothing ran in the new release, so the root goes back
/// to what it was. Otherwise (the supervisor went away mid-stream) the
/// outcome is unknown: `current` stays on the new release only if the
/// supervisor, asked again, runs it.
async fn revert_after_error(
    path: &Path,
    rel: &Releases,
    name: &str,
    before: Option<&Path>,
    error: &CliError,
    lock: &DeployLock,
    human: bool,
) {
    let runs_it = match error {
        CliError::Refused { .. } => false,
        _ => fetch_status(path)
            .await
            .ok()
            .and_then(|s| active_dir(&s))
            .is_some_and(|d| rel.name_of(Path::new(&d)).as_deref() == Some(name)),
    };
    if runs_it {
        return;
    }
    if let Err(e) = rel.set_current(before, lock) {
        eprintln!(
            "baton: error: putting `current` back: {}",
            baton::error_chain(&e)
        );
        return;
    }
    if human {
        println!(
            "current -> {} again",
            before.map_or("(none)".into(), |b| b.display().to_string())
        );
    }
    if matches!(error, CliError::Refused { .. }) {
        note(rel.remove(name, lock));
    } else if let Some(mut meta) = rel.read_meta(name) {
        meta.outcome = DeployOutcome::Failed;
        meta.reason = Some(format!("outcome unknown: {}", baton::error_chain(error)));
        note(rel.write_meta(&meta, lock));
    }
}

fn note(r: Result<(), releases::ReleaseError>) {
    if let Err(e) = r {
        eprintln!("baton: warning: {}", baton::error_chain(&e));
    }
}

fn active_dir(s: &Status) -> Option<String> {
    let active = s.active?;
    s.generations
        .iter()
        .find(|g| g.number == active)
        .map(|g| g.dir.clone())
}

/// The previous release: the one `baton rollback` would start, as the
/// supervisor says; without a supervisor, the newest successful deploy
/// that `current` does not point to.
fn previous(rel: &Releases, status: Option<&Status>, listed: &[Listed]) -> Option<String> {
    if let Some(s) = status {
        return s
            .rollback_to
            .as_deref()
            .and_then(|dir| rel.name_of(Path::new(dir)));
    }
    let current = rel.current_name().ok().flatten();
    listed
        .iter()
        .filter(|l| Some(&l.name) != current.as_ref())
        .find(|l| {
            l.meta
                .as_ref()
                .is_some_and(|m| m.outcome == DeployOutcome::Succeeded)
        })
        .map(|l| l.name.clone())
}

/// [`previous`] for pruning: both the supervisor's and the newest
/// successful deploy besides the active one (a supervisor restarted since
/// remembers none), so neither is ever removed.
fn previous_for_pruning(rel: &Releases, status: Option<&Status>, listed: &[Listed]) -> Vec<String> {
    let mut names: Vec<String> = previous(rel, status, listed).into_iter().collect();
    let active = status
        .and_then(active_dir)
        .and_then(|d| rel.name_of(Path::new(&d)));
    let fallback = listed
        .iter()
        .filter(|l| Some(&l.name) != active.as_ref())
        .find(|l| {
            l.meta
                .as_ref()
                .is_some_and(|m| m.outcome == DeployOutcome::Succeeded)
        })
        .map(|l| l.name.clone());
    names.extend(fallback);
    names
}

/// Releases pruning must keep: any a running generation uses (active,
/// candidate, parked, draining), the previous one, `current`'s target.
fn in_use(rel: &Releases, status: Option<&Status>) -> Vec<String> {
    let mut names: Vec<String> = status
        .into_iter()
        .flat_map(|s| s.generations.iter())
        .filter(|g| g.pid.is_some() || g.role.is_some())
        .filter_map(|g| rel.name_of(Path::new(&g.dir)))
        .collect();
    let listed = rel.list().unwrap_or_default();
    names.extend(previous_for_pruning(rel, status, &listed));
    names.extend(rel.current_name().ok().flatten());
    names
}

/// After a rollback or a promote: `current` follows the active release,
/// so that a later upgrade (or SIGHUP) starts what runs now, not the
/// release just left.
pub async fn follow_active(path: &Path, report: &mut Report, human: bool) {
    let Ok(status) = fetch_status(path).await else {
        return;
    };
    let Some(root) = status.releases.as_ref().map(|r| Releases::new(&r.dir)) else {
        return;
    };
    let Some(name) = active_dir(&status).and_then(|d| root.name_of(Path::new(&d))) else {
        return;
    };
    let lock = match root.lock() {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "baton: warning: `current` not updated: {}",
                baton::error_chain(&e)
            );
            return;
        }
    };
    let left = root.current_name().ok().flatten();
    if left.as_deref() != Some(name.as_str()) {
        if let Err(e) = root.point_current(&name, &lock) {
            eprintln!(
                "baton: error: pointing `current` at {name}: {}",
                baton::error_chain(&e)
            );
            return;
        }
        if human {
            println!("current -> releases/{name}");
        }
    }
    // A canary's release: promoted, it succeeded; rolled back, it failed.
    if let Some(mut meta) = root.read_meta(&name) {
        if meta.outcome == DeployOutcome::Canary {
            meta.outcome = DeployOutcome::Succeeded;
            note(root.write_meta(&meta, &lock));
        }
    }
    if let Some(left) = left.filter(|l| *l != name) {
        if let Some(mut meta) = root.read_meta(&left) {
            if meta.outcome == DeployOutcome::Canary {
                meta.outcome = DeployOutcome::Failed;
                meta.reason = Some("the canary was rolled back".into());
                note(root.write_meta(&meta, &lock));
            }
        }
    }
    report.release_name = Some(name.clone());
    report.current = Some(format!("releases/{name}"));
}

/// One row of `baton releases`.
#[derive(serde::Serialize)]
struct Row {
    name: String,
    /// `active`, `candidate`, `parked`, `previous`, `failed`, `staged` or null.
    state: Option<&'static str>,
    /// Whether `current` points to it.
    current: bool,
    dir: String,
    deployed_at: Option<String>,
    deployed_unix_ms: u64,
    artifact: Option<String>,
    outcome: Option<DeployOutcome>,
    generation: Option<u64>,
    reason: Option<String>,
}

pub async fn releases(path: PathBuf, args: ReleasesArgs) -> Result<u8, CliError> {
    // The supervisor says which release runs; without it (not running)
    // the list still shows what is on disk.
    let status = match fetch_status(&path).await {
        Ok(s) => Some(s),
        Err(_) if args.releases_dir.is_some() => None,
        Err(e) => return Err(e),
    };
    let rel = root_of(args.releases_dir.as_deref(), status.as_ref())?;
    let listed = rel.list()?;
    let current = rel.current_name()?;
    let prev = previous(&rel, status.as_ref(), &listed);
    let role_of = |name: &str| -> Option<&'static str> {
        let s = status.as_ref()?;
        s.generations
            .iter()
            .filter(|g| g.pid.is_some() || g.role.is_some())
            .filter(|g| rel.name_of(Path::new(&g.dir)).as_deref() == Some(name))
            .find_map(|g| match g.role {
                Some(Role::Active) => Some("active"),
                Some(Role::Candidate) => Some("candidate"),
                Some(Role::Parked) => Some("parked"),
                None if s.active == Some(g.number) => Some("active"),
                None => None,
            })
    };
    let rows: Vec<Row> = listed
        .into_iter()
        .map(|l| {
            let state = role_of(&l.name).or_else(|| {
                if prev.as_deref() == Some(l.name.as_str()) {
                    Some("previous")
                } else {
                    match l.meta.as_ref().map(|m| m.outcome) {
                        Some(DeployOutcome::Failed) => Some("failed"),
                        Some(DeployOutcome::Staged) => Some("staged"),
                        _ => None,
                    }
                }
            });
            Row {
                current: current.as_deref() == Some(l.name.as_str()),
                state,
                dir: l.dir.display().to_string(),
                deployed_at: l.meta.as_ref().map(|m| m.deployed_at.clone()),
                deployed_unix_ms: l.deployed_unix_ms,
                artifact: l.meta.as_ref().map(|m| m.artifact.clone()),
                outcome: l.meta.as_ref().map(|m| m.outcome),
                generation: l.meta.as_ref().and_then(|m| m.generation),
                reason: l.meta.as_ref().and_then(|m| m.reason.clone()),
                name: l.name,
            }
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(EXIT_OK);
    }
    println!("releases in {}", rel.releases_dir().display());
    println!(
        "{:<24} {:<10} {:<22} CURRENT",
        "RELEASE", "STATE", "DEPLOYED"
    );
    for r in &rows {
        let mut line = format!(
            "{:<24} {:<10} {:<22} {}",
            r.name,
            r.state.unwrap_or("-"),
            r.deployed_at.as_deref().unwrap_or("-"),
            if r.current { "*" } else { "" }
        );
        if let (Some("failed"), Some(reason)) = (r.state, &r.reason) {
            line.push_str(&format!("  ({reason})"));
        }
        println!("{}", line.trim_end());
    }
    Ok(EXIT_OK)
}
