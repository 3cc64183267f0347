//! The supervisor's side of baton upgrading itself: when a hand-over may
//! happen, the new binary's check, the exec, and taking over in the new
//! image. The document and its rules are in [`crate::handover`].

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton_core::{GenId, Phase, Pid, Worker};
use tokio::sync::oneshot;

use super::{HandoverFds, Internal, ProcHandle, Supervisor};
use crate::config::{Config, ConfigSource};
use crate::handover::{self, FdNum, NotifyState, ProcState, State};
use crate::notify::NotifySocket;
use crate::process::{self, ExecJob, PidFd, Spawner, StderrSink};
use crate::protocol::{Binary, ErrorKind, ErrorReply, HandingOver};
use crate::steer::Sockets;
use crate::systemd::{Reporter, ServiceManager};

/// How long the new binary gets to check the hand-over document.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long control connections in flight get to finish before the exec
/// (a stream waiting for a drain is cut after this).
const CONTROL_QUIET: Duration = Duration::from_secs(2);

/// The binary this image runs, as its file is now.
pub(super) fn own_binary() -> Binary {
    let path = std::env::current_exe().unwrap_or_default();
    let meta = std::fs::metadata("/proc/self/exe").ok();
    Binary {
        path: path.display().to_string(),
        size: meta.as_ref().map_or(0, |m| m.len()),
        modified_us: meta
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_micros() as u64),
    }
}

fn refused(message: String) -> ErrorReply {
    ErrorReply {
        kind: ErrorKind::SelfUpgrade,
        message,
    }
}

/// The binary to execute: `argv0` as baton was started, looked up afresh
/// (a path is taken relative to the directory baton started in; a bare
/// name is searched in `PATH` now), so a binary replaced at that path, or a
/// symlink repointed, is what runs.
fn resolve_exe(argv0: &Path, base_dir: &Path) -> Result<PathBuf, String> {
    let candidates: Vec<PathBuf> = if argv0.as_os_str().as_bytes().contains(&b'/') {
        vec![base_dir.join(argv0)]
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join(argv0))
            .collect()
    };
    let mut why = format!("{} not found", argv0.display());
    for c in candidates {
        match std::fs::metadata(&c) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(c),
            Ok(m) if m.is_file() => why = format!("{} is not executable", c.display()),
            Ok(_) => why = format!("{} is not a file", c.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => why = format!("{}: {e}", c.display()),
        }
    }
    Err(why)
}

/// Runs `exe __handover-check` with the document on its stdin.
async fn run_check(exe: &Path, doc: OwnedFd) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("__handover-check")
        .stdin(std::process::Stdio::from(doc))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(CHECK_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("it did not answer its check within {CHECK_TIMEOUT:?}"))?
        .map_err(|e| format!("it cannot be run: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .trim_start_matches("baton: error: ");
    Err(format!("its check failed ({}): {line}", out.status))
}

impl Supervisor {
    /// Why baton cannot hand over right now, if it cannot.
    fn handover_blocker(&self) -> Option<String> {
        if self.machine.stopping() || self.closed {
            return Some("baton is stopping".into());
        }
        if let Some(u) = self.machine.upgrade() {
            return Some(format!(
                "an upgrade (to generation {}) is in progress; try again when it ends",
                u.candidate
            ));
        }
        if self.preparing > 0 {
            return Some("an upgrade's configuration is being loaded; try again".into());
        }
        if let Some(g) = self
            .machine
            .generations()
            .find(|g| matches!(g.phase(), Phase::Waiting | Phase::Starting { .. }))
        {
            return Some(format!(
                "generation {} is starting; try again once it is ready",
                g.id()
            ));
        }
        // A worker restarted alone while the others serve: starting, or
        // waiting out its backoff.
        if let Some((g, worker, what)) = self.machine.generations().find_map(|g| {
            let workers = g.workers()?;
            let (i, w) = (0u32..)
                .zip(workers)
                .find(|(_, w)| !matches!(w, Worker::Up { .. }))?;
            let what = match w {
                Worker::Restarting { .. } => "waiting to restart",
                Worker::Recycling { .. } => "being restarted",
                _ => "starting",
            };
            Some((g.id(), i, what))
        }) {
            return Some(format!(
                "worker {worker} of generation {g} is {what}; try again once it is ready"
            ));
        }
        if self.spawning > 0 || !self.deferred.is_empty() || !self.probes.is_empty() {
            return Some("a process is starting; try again".into());
        }
        if self.restoring > 0 {
            return Some("a CPU priority is being restored; try again".into());
        }
        if self.self_checking {
            return Some("a self-upgrade is already being checked".into());
        }
        if self.handover_fds.is_none() {
            return Some("this baton cannot hand its sockets over".into());
        }
        None
    }

    /// `baton upgrade --self`: checks what can be checked here, then has
    /// the new binary check the document (off the loop).
    pub(super) fn check_self_upgrade(
        &mut self,
        reply: oneshot::Sender<Result<HandingOver, ErrorReply>>,
    ) {
        let fail = |reply: oneshot::Sender<_>, message: String| {
            tracing::warn!("self-upgrade refused: {message}");
            let _ = reply.send(Err(refused(message)));
        };
        if let Some(why) = self.handover_blocker() {
            return fail(reply, why);
        }
        let exe = match resolve_exe(&self.argv0, &self.prep.source.base_dir) {
            Ok(exe) => exe,
            Err(why) => return fail(reply, format!("the new binary: {why}")),
        };
        let doc = match self.handover_state().map(|(state, _)| state.to_memfd()) {
            Some(Ok(doc)) => doc,
            Some(Err(e)) => return fail(reply, format!("writing the hand-over document: {e}")),
            None => return fail(reply, "this baton cannot hand its sockets over".into()),
        };
        tracing::info!(exe = %exe.display(), "self-upgrade: checking the new binary");
        self.self_checking = true;
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let result = run_check(&exe, doc).await;
            let _ = tx.send(Internal::SelfChecked { exe, result, reply });
        });
    }

    pub(super) fn on_self_checked(
        &mut self,
        exe: PathBuf,
        result: Result<(), String>,
        reply: oneshot::Sender<Result<HandingOver, ErrorReply>>,
    ) {
        let why = match result {
            Err(e) => Some(format!("the new binary {}: {e}", exe.display())),
            // Things may have moved on while it was checked.
            Ok(()) => {
                self.self_checking = false;
                let blocker = self.handover_blocker();
                self.self_checking = true;
                blocker
            }
        };
        if let Some(message) = why {
            self.self_checking = false;
            tracing::warn!("self-upgrade refused: {message}");
            let _ = reply.send(Err(refused(message)));
            return;
        }
        let _ = reply.send(Ok(HandingOver {
            exe: exe.display().to_string(),
            handover: self.handovers + 1,
        }));
        // The control server stops accepting (new connections wait in the
        // socket's backlog for the next image) and the ones in flight, this
        // reply's among them, finish first; the loop keeps answering them.
        // `self_checking` stays set, so nothing else starts meanwhile.
        let tx = self.internal_tx.clone();
        let connections = self.control_pause.as_ref().map(|(pause, connections)| {
            let _ = pause.send(true);
            connections.clone()
        });
        tokio::spawn(async move {
            if let Some(c) = connections {
                c.drained(CONTROL_QUIET).await;
            }
            let _ = tx.send(Internal::ExecSelf { exe });
        });
    }

    /// The document for a new image, and the descriptors it names.
    fn handover_state(&self) -> Option<(State, Vec<BorrowedFd<'_>>)> {
        let extra = self.handover_fds.as_ref()?;
        let (sockets, mut fds) = self.sockets.hand_over();
        fds.push(extra.control.as_fd());
        fds.push(extra.notify.as_fd());
        fds.extend(extra.metrics.as_ref().map(|m| m.as_fd()));
        let procs = self
            .procs
            .iter()
            .map(|(pid, h)| {
                fds.push(h.pidfd.as_fd());
                fds.extend(h.stderr.as_ref().map(|s| s.as_fd()));
                ProcState {
                    pid: pid.0,
                    gen: h.gen.0,
                    worker: h.worker,
                    pidfd: FdNum::of(h.pidfd.as_fd()),
                    stderr: h.stderr.as_ref().map(|s| FdNum::of(s.as_fd())),
                    exit_reported: h.exit_reported,
                }
            })
            .collect();
        let state = State {
            format: handover::FORMAT,
            from_version: env!("CARGO_PKG_VERSION").to_owned(),
            handovers: self.handovers + 1,
            argv0: self.argv0.clone(),
            clock_us: self.now().since_epoch().as_micros() as u64,
            machine: self.machine.clone(),
            source: self.prep.source.clone(),
            initial: (*self.prep.initial).clone(),
            sockets,
            control: FdNum::of(extra.control.as_fd()),
            notify: NotifyState {
                fd: FdNum::of(extra.notify.as_fd()),
                path: self.notify_path.clone(),
                dir: extra.notify_dir.clone(),
            },
            metrics: extra.metrics.as_ref().map(|m| FdNum::of(m.as_fd())),
            procs,
            systemd_ready: self.systemd.as_ref().is_some_and(|s| s.reporter.is_ready()),
        };
        Some((state, fds))
    }

    /// Replaces this image with `exe`'s. Returns only if that failed: the
    /// descriptors are made close-on-exec again and this baton goes on.
    pub(super) fn exec_self(&mut self, exe: &Path) {
        let failed = match self.try_exec(exe) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        tracing::error!("self-upgrade failed, this baton goes on: {failed}");
        self.self_upgrade_error = Some(failed);
        if let Some((pause, _)) = &self.control_pause {
            let _ = pause.send(false);
        }
        if let Some(s) = &mut self.systemd {
            s.manager.tell("READY=1\n", &[]);
            s.reporter.forget_status();
        }
    }

    fn try_exec(&mut self, exe: &Path) -> Result<std::convert::Infallible, String> {
        // Checked again: the loop ran on while the control server quieted.
        self.self_checking = false;
        if let Some(why) = self.handover_blocker() {
            return Err(why);
        }
        let cstring =
            |b: &[u8]| CString::new(b).map_err(|_| "a NUL byte in an argument".to_owned());
        let (state, fds) = self
            .handover_state()
            .ok_or("this baton cannot hand its sockets over")?;
        let doc = state
            .to_memfd()
            .map_err(|e| format!("writing the hand-over document: {e}"))?;
        let mut argv = vec![cstring(self.argv0.as_os_str().as_bytes())?];
        for a in ["__handover", "--state-fd"] {
            argv.push(cstring(a.as_bytes())?);
        }
        argv.push(cstring(FdNum::of(doc.as_fd()).0.to_string().as_bytes())?);
        // The new image is not socket-activated again: its sockets come
        // with the document.
        let env = std::env::vars_os()
            .filter(|(k, _)| {
                !matches!(
                    k.to_str(),
                    Some("LISTEN_PID" | "LISTEN_FDS" | "LISTEN_FDNAMES")
                )
            })
            .map(|(k, v)| {
                let mut kv = k.into_encoded_bytes();
                kv.push(b'=');
                kv.extend(v.into_encoded_bytes());
                cstring(&kv)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let job = ExecJob {
            program: cstring(exe.as_os_str().as_bytes())?,
            argv,
            env,
        };
        let mut keep = fds;
        keep.push(doc.as_fd());
        handover::set_inheritable(&keep, true)
            .map_err(|e| format!("keeping the descriptors open across exec: {e}"))?;
        tracing::info!(
            exe = %exe.display(),
            handover = self.handovers + 1,
            "self-upgrade: handing over to the new binary"
        );
        if let Some(s) = &self.systemd {
            s.manager.tell(
                &format!(
                    "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=baton is upgrading itself\n",
                    crate::systemd::monotonic_us()
                ),
                &[],
            );
        }
        let error = self.spawner.exec(job);
        let _ = handover::set_inheritable(&keep, false);
        Err(format!("executing {}: {error}", exe.display()))
    }

    /// The supervisor a previous image handed over, taking every
    /// descriptor it names; its tasks (process watchers, stderr
    /// forwarders, queue watches) start again. `run` then carries on
    /// without starting a first generation.
    #[allow(clippy::too_many_arguments)]
    pub fn resume(
        machine: baton_core::Machine<Arc<Config>>,
        clock_us: u64,
        source: ConfigSource,
        initial: Config,
        sockets: Sockets,
        notify: NotifySocket,
        stderr_sink: StderrSink,
        manager: Option<ServiceManager>,
        spawner: Spawner,
        procs: Vec<ProcState>,
        handovers: u64,
        argv0: PathBuf,
        systemd_ready: bool,
    ) -> std::io::Result<Self> {
        let mut sup = Self::new(
            source,
            initial,
            sockets,
            notify,
            stderr_sink,
            manager,
            spawner,
        )?;
        sup.machine = machine;
        let clock = Duration::from_micros(clock_us);
        sup.epoch = tokio::time::Instant::now()
            .checked_sub(clock)
            .unwrap_or_else(tokio::time::Instant::now);
        sup.handovers = handovers;
        sup.argv0 = argv0;
        sup.resumed = true;
        if let Some(s) = &mut sup.systemd {
            s.reporter = Reporter::resumed(systemd_ready);
            if systemd_ready {
                // The previous image said RELOADING=1 before the exec.
                s.manager.tell("READY=1\n", &[]);
            }
        }
        for p in procs {
            let pid = Pid(p.pid);
            let (gen, worker) = (GenId(p.gen), p.worker);
            let pidfd = PidFd::new(p.pidfd.take()?);
            let stderr = match p.stderr {
                Some(fd) => {
                    let fd = fd.take()?;
                    let keep = fd.try_clone().ok();
                    let tail =
                        process::forward(pid, fd, sup.stderr_sink.clone(), sup.process_tx.clone());
                    sup.tails.insert((gen, worker), tail);
                    keep
                }
                None => None,
            };
            let tx = sup.process_tx.clone();
            let watcher = if p.exit_reported {
                tokio::spawn(process::watch_group(pid, tx)).abort_handle()
            } else {
                tokio::spawn(process::watch(pid, pidfd.clone(), tx)).abort_handle()
            };
            sup.procs.insert(
                pid,
                ProcHandle {
                    gen,
                    worker,
                    pidfd,
                    exit_reported: p.exit_reported,
                    watcher,
                    stderr,
                },
            );
        }
        let retiring: Vec<GenId> = sup
            .machine
            .generations()
            .filter(|g| matches!(g.phase(), Phase::Retiring { .. }))
            .map(|g| g.id())
            .collect();
        for gen in retiring {
            sup.watch_queue(gen);
        }
        Ok(sup)
    }

    /// Hand-over copies of the descriptors other tasks own (see
    /// [`HandoverFds`]).
    pub fn handover_fds(&self) -> Option<&HandoverFds> {
        self.handover_fds.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_is_looked_up_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("baton-x");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        let err = resolve_exe(Path::new("./baton-x"), dir.path()).unwrap_err();
        assert!(err.contains("not executable"), "{err}");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            resolve_exe(Path::new("./baton-x"), dir.path()).unwrap(),
            dir.path().join("./baton-x")
        );
        let err = resolve_exe(Path::new("./missing"), dir.path()).unwrap_err();
        assert!(err.contains("not found"), "{err}");
        assert!(
            resolve_exe(Path::new("sh"), dir.path()).is_ok(),
            "a bare name: PATH"
        );
    }
}
