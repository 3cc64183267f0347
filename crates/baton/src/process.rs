//! Starting and watching a generation's processes.
//!
//! - [`resolve`] turns the configured directory and command into a
//!   [`Release`] (paths resolved now, kept for restarts and rollbacks);
//! - [`Spawner`] forks from the process's main thread ([`Forks::run`]):
//!   `PR_SET_PDEATHSIG` fires when the *thread* that forked exits, so the
//!   forking thread must live as long as baton, and must be the one that
//!   re-executes baton for its own upgrade (an `execve` from any other
//!   thread ends the main thread, and with it every app). Credential
//!   lookups (NSS) and the wait for `exec` happen there too, never in the
//!   decision loop;
//! - [`watch`] waits on a pidfd for the exit and reads its status without
//!   reaping, so the pid (and the process group id) stays reserved until
//!   the supervisor releases it, then reports when the group is empty;
//! - stderr is passed through to baton's, with the last lines kept for
//!   failure reports.

use std::collections::VecDeque;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_core::{ExitStatus, GenId, Pid, Release};
use baton_protocol::app;
use nix::sys::wait::WaitStatus;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::mpsc::UnboundedSender;

use crate::config::{Config, EnvInherit, ListenAddr, LogFormat, PROBE_FD_NAME};
use crate::listener::Listener;

/// Lines of a process's stderr kept for failure reports.
const STDERR_TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("working directory {}: {source}", .path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("program {program:?} not found in {}", .searched)]
    NotFound { program: String, searched: String },
    #[error("program {}: {reason}", .path.display())]
    Program { path: PathBuf, reason: String },
}

/// Resolves `cwd` and `command[0]` now, so a `current` symlink repointed
/// since the last spawn starts the new target; the result is kept for the
/// generation's restarts and for rollbacks. A program with a `/` is taken
/// relative to the resolved directory; a bare name is searched in `path`.
pub fn resolve(
    cwd: &Path,
    command: &[String],
    path: Option<&OsStr>,
) -> Result<Release, ResolveError> {
    let dir = cwd.canonicalize().map_err(|source| ResolveError::Dir {
        path: cwd.to_owned(),
        source,
    })?;
    if !dir.is_dir() {
        return Err(ResolveError::Dir {
            path: cwd.to_owned(),
            source: std::io::Error::other("not a directory"),
        });
    }
    let name = &command[0];
    let program = if name.contains('/') {
        let candidate = dir.join(name);
        check_executable(&candidate)?
    } else {
        let search = path.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
        std::env::split_paths(search)
            .map(|d| dir.join(d).join(name))
            .find_map(|p| check_executable(&p).ok())
            .ok_or_else(|| ResolveError::NotFound {
                program: name.clone(),
                searched: format!("PATH={}", search.to_string_lossy()),
            })?
    };
    Ok(Release {
        dir,
        program,
        argv: command.to_vec(),
    })
}

fn check_executable(p: &Path) -> Result<PathBuf, ResolveError> {
    let err = |reason: String| ResolveError::Program {
        path: p.to_owned(),
        reason,
    };
    let canon = p.canonicalize().map_err(|e| err(e.to_string()))?;
    let meta = canon.metadata().map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(err("not executable (no x permission)".into()));
    }
    Ok(canon)
}

/// Longest stderr line passed through and kept at once; longer ones (or
/// `\r` progress bars with no newline) are forwarded in pieces.
const STDERR_MAX_LINE: u64 = 8 * 1024;

/// The last lines a process wrote to stderr, and whether its stderr has
/// closed (so a failure report can wait, briefly, for the final lines).
#[derive(Debug, Clone)]
pub struct StderrTail {
    lines: Arc<Mutex<VecDeque<String>>>,
    /// Dropped (or set) by the forwarder at end of stream.
    closed: tokio::sync::watch::Receiver<bool>,
}

impl Default for StderrTail {
    fn default() -> Self {
        Self::new().0
    }
}

impl StderrTail {
    fn new() -> (Self, tokio::sync::watch::Sender<bool>) {
        let (tx, closed) = tokio::sync::watch::channel(false);
        let tail = Self {
            lines: Arc::default(),
            closed,
        };
        (tail, tx)
    }

    /// Waits until the stream has closed, at most `limit` (a grandchild
    /// may hold the pipe open forever).
    pub async fn closed(&self, limit: Duration) {
        let mut rx = self.closed.clone();
        // Err: the forwarder is gone, so the stream is closed too.
        let _ = tokio::time::timeout(limit, rx.wait_for(|c| *c)).await;
    }

    fn push(&self, line: String) {
        let mut q = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() == STDERR_TAIL_LINES {
            q.pop_front();
        }
        q.push_back(line);
    }

    pub fn lines(&self) -> Vec<String> {
        let q = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        q.iter().cloned().collect()
    }
}

/// What the supervisor learns about its processes, from the spawner and
/// the watchers.
#[derive(Debug)]
pub enum ProcessEvent {
    Spawned {
        gen: GenId,
        worker: u32,
        result: Result<Started, String>,
    },
    Exited {
        pid: Pid,
        status: ExitStatus,
        group_empty: bool,
    },
    GroupEmpty {
        pid: Pid,
    },
    StderrClosed {
        pid: Pid,
    },
}

/// Everything one spawn needs, owned, so it can cross to the spawner.
pub struct SpawnJob {
    pub gen: GenId,
    pub worker: u32,
    pub release: Release,
    pub config: Arc<Config>,
    /// The generation's sockets, in fd order, with their names (copies,
    /// closed once the process has them). Every worker gets the same.
    pub sockets: Vec<(String, OwnedFd)>,
    /// The generation's private probe listener, passed last (shared
    /// sockets and an `http` or `tcp` readiness check).
    pub probe_listener: Option<OwnedFd>,
    pub notify_path: PathBuf,
    pub base_env: Arc<Vec<(OsString, OsString)>>,
    /// The CPU priority it runs at from its first instruction (`None`:
    /// baton's own).
    pub priority: Option<baton_sys::SchedPriority>,
}

/// A process that was exec'd.
#[derive(Debug)]
pub struct Started {
    pub pid: Pid,
    pub pidfd: OwnedFd,
    /// Read end of its stderr pipe.
    pub stderr: OwnedFd,
}

/// What the main thread is asked to do.
enum Job {
    Spawn {
        job: SpawnJob,
        events: UnboundedSender<ProcessEvent>,
    },
    Exec {
        exec: ExecJob,
        failed: std::sync::mpsc::Sender<std::io::Error>,
    },
}

/// baton re-executing itself: the image replaces this one in the same
/// process (same pid, same children), keeping the descriptors the caller
/// made inheritable.
pub struct ExecJob {
    pub program: CString,
    pub argv: Vec<CString>,
    pub env: Vec<CString>,
}

/// A way to ask the main thread to fork (or re-execute baton). Cloneable;
/// the main thread's [`Forks::run`] returns once every one is dropped.
#[derive(Clone)]
pub struct Spawner {
    jobs: std::sync::mpsc::Sender<Job>,
}

/// The main thread's side of [`Spawner`].
pub struct Forks {
    jobs: std::sync::mpsc::Receiver<Job>,
}

impl Spawner {
    pub fn new() -> (Self, Forks) {
        let (jobs, rx) = std::sync::mpsc::channel();
        (Self { jobs }, Forks { jobs: rx })
    }

    /// Starts `job`; the result goes to `events`.
    pub fn spawn(
        &self,
        job: SpawnJob,
        events: UnboundedSender<ProcessEvent>,
    ) -> Result<(), String> {
        self.jobs
            .send(Job::Spawn { job, events })
            .map_err(|_| "the spawner thread has gone".to_owned())
    }

    /// Replaces this process's image with `exec`. Returns only if that
    /// failed, with why (blocking: a failed `execve` returns at once).
    pub fn exec(&self, exec: ExecJob) -> std::io::Error {
        let (failed, rx) = std::sync::mpsc::channel();
        if self.jobs.send(Job::Exec { exec, failed }).is_err() {
            return std::io::Error::other("the main thread no longer takes jobs");
        }
        rx.recv()
            .unwrap_or_else(|_| std::io::Error::other("the main thread dropped the exec"))
    }
}

impl Forks {
    /// Runs the jobs on the calling thread, which must be the main thread
    /// and must outlive every child: returns once every [`Spawner`] is
    /// dropped. Blocks every signal in this thread for good (forks happen
    /// with every signal blocked, see `baton_sys::spawn`; the tokio
    /// threads and the signal thread handle them).
    pub fn run(self) {
        if let Err(e) = baton_sys::block_all_signals() {
            tracing::warn!("spawner: blocking signals: {e}");
        }
        for job in self.jobs {
            match job {
                Job::Spawn { job, events } => {
                    let (gen, worker) = (job.gen, job.worker);
                    let result = spawn_now(job);
                    let _ = events.send(ProcessEvent::Spawned {
                        gen,
                        worker,
                        result,
                    });
                }
                Job::Exec { exec, failed } => {
                    let err = nix::unistd::execve(&exec.program, &exec.argv, &exec.env)
                        .map_or_else(std::io::Error::from, |never| match never {});
                    let _ = failed.send(err);
                }
            }
        }
    }
}

/// The app's environment: what it inherits of baton's (per
/// `env_inherit`), the configured variables, then the protocol variables,
/// which nothing else may set. `LISTEN_PID` is written after the fork.
/// This is the one place the protocol environment is assembled.
pub fn app_env(
    config: &Config,
    base_env: &[(OsString, OsString)],
    fd_names: &[&str],
    notify_path: &Path,
    gen: GenId,
    worker: u32,
) -> Vec<(OsString, OsString)> {
    let mut env = inherited_env(config, base_env);
    env.retain(|(k, _)| !config.env.contains_key(&*k.to_string_lossy()));
    env.extend(config.env.iter().map(|(k, v)| (k.into(), v.into())));
    if !fd_names.is_empty() {
        env.push((app::LISTEN_FDS.into(), fd_names.len().to_string().into()));
        env.push((app::LISTEN_FDNAMES.into(), fd_names.join(":").into()));
    }
    env.push((app::NOTIFY_SOCKET.into(), notify_path.into()));
    env.push((app::BATON_GENERATION.into(), gen.to_string().into()));
    env.push((app::BATON_WORKER.into(), worker.to_string().into()));
    env
}

/// baton's own environment, without the protocol variables (baton's to
/// set), `BATON_CONTROL` (it names this supervisor, nothing the app
/// should reach) and the watchdog systemd set for baton, not for the app.
pub fn own_env() -> Vec<(OsString, OsString)> {
    const NOT_THE_APPS: &[&str] = &["BATON_CONTROL", "WATCHDOG_USEC", "WATCHDOG_PID"];
    std::env::vars_os()
        .filter(|(k, _)| {
            !NOT_THE_APPS.iter().any(|n| k == *n) && !app::PROTOCOL_ENV.iter().any(|p| k == *p)
        })
        .collect()
}

/// The part of `base_env` the app inherits under `config.env_inherit`.
fn inherited_env(config: &Config, base_env: &[(OsString, OsString)]) -> Vec<(OsString, OsString)> {
    match &config.env_inherit {
        EnvInherit::All(true) => base_env.to_vec(),
        EnvInherit::All(false) => Vec::new(),
        EnvInherit::Only(names) => base_env
            .iter()
            .filter(|(k, _)| names.iter().any(|n| k == n.as_str()))
            .cloned()
            .collect(),
    }
}

/// PATH the app will see, for finding a bare program name.
pub fn app_path(config: &Config, base_env: &[(OsString, OsString)]) -> Option<OsString> {
    if let Some(p) = config.env.get("PATH") {
        return Some(p.into());
    }
    inherited_env(config, base_env)
        .into_iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v)
}

/// Resolves the configured release exactly as a spawn of it will.
pub fn resolve_config(
    config: &Config,
    base_env: &[(OsString, OsString)],
) -> Result<Release, ResolveError> {
    resolve(
        &config.cwd,
        &config.command,
        app_path(config, base_env).as_deref(),
    )
}

fn cstring(bytes: Vec<u8>, what: &str) -> Result<CString, String> {
    CString::new(bytes).map_err(|_| format!("{what} contains a NUL byte"))
}

/// Forks and execs one process of `job` (on the spawner thread).
fn spawn_now(job: SpawnJob) -> Result<Started, String> {
    let config = &job.config;
    // Everything that can fail happens before the fork: once the process
    // exists it must be tracked, or it would run unsupervised.
    let credentials = resolve_credentials(config)?;
    let mut fds: Vec<BorrowedFd<'_>> = job.sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
    let mut names: Vec<&str> = job.sockets.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(p) = &job.probe_listener {
        fds.push(p.as_fd());
        names.push(PROBE_FD_NAME);
    }
    let env = app_env(
        config,
        &job.base_env,
        &names,
        &job.notify_path,
        job.gen,
        job.worker,
    );
    let program = cstring(
        job.release.program.as_os_str().as_bytes().to_vec(),
        "program path",
    )?;
    let argv = job
        .release
        .argv
        .iter()
        .map(|a| {
            cstring(
                crate::config::substitute_fds(a, &names).into_bytes(),
                "argument",
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let env = env
        .into_iter()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            cstring(kv.into_vec(), "environment variable")
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cwd = cstring(
        job.release.dir.as_os_str().as_bytes().to_vec(),
        "working directory",
    )?;
    let devnull =
        std::fs::File::open("/dev/null").map_err(|e| format!("opening /dev/null: {e}"))?;
    let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("creating the stderr pipe: {e}"))?;
    let plan = baton_sys::SpawnPlan {
        program: &program,
        argv: &argv,
        env: &env,
        cwd: &cwd,
        fds: &fds,
        stdio: baton_sys::Stdio {
            stdin: devnull.as_fd(),
            stdout: None,
            stderr: err_write.as_fd(),
        },
        parent_death_signal: Some(config.drain_signal.0 as i32),
        credentials: credentials.as_ref(),
        priority: job.priority,
    };
    let spawned = baton_sys::spawn(&plan).map_err(|e| {
        crate::error_chain(&SpawnFailed {
            program: job.release.program.clone(),
            source: e,
        })
    })?;
    Ok(Started {
        pid: Pid(spawned.pid),
        pidfd: spawned.pidfd,
        stderr: err_read,
    })
}

#[derive(Debug, thiserror::Error)]
#[error("starting {}", .program.display())]
struct SpawnFailed {
    program: PathBuf,
    #[source]
    source: baton_sys::SpawnError,
}

fn resolve_credentials(config: &Config) -> Result<Option<baton_sys::Credentials>, String> {
    use nix::unistd::{Group, User};
    if config.user.is_none() && config.group.is_none() {
        return Ok(None);
    }
    let user = match &config.user {
        Some(name) => Some(
            lookup(name, User::from_name, |id| User::from_uid(id.into()))
                .ok_or_else(|| format!("user {name:?} does not exist"))?,
        ),
        None => None,
    };
    let group = match &config.group {
        Some(name) => Some(
            lookup(name, Group::from_name, |id| Group::from_gid(id.into()))
                .ok_or_else(|| format!("group {name:?} does not exist"))?,
        ),
        None => None,
    };
    let uid = user.as_ref().map_or(nix::unistd::getuid(), |u| u.uid);
    let gid = group
        .as_ref()
        .map(|g| g.gid)
        .or(user.as_ref().map(|u| u.gid))
        .unwrap_or(nix::unistd::getgid());
    let groups = match &user {
        Some(u) => {
            let cname = std::ffi::CString::new(u.name.clone()).map_err(|_| "bad user name")?;
            nix::unistd::getgrouplist(&cname, gid)
                .map_err(|e| format!("listing groups of {:?}: {e}", u.name))?
        }
        None => vec![gid],
    };
    Ok(Some(baton_sys::Credentials {
        uid: uid.as_raw(),
        gid: gid.as_raw(),
        groups: groups.into_iter().map(|g| g.as_raw()).collect(),
    }))
}

/// Looks a user or group up by name, or by number when it is one.
fn lookup<T>(
    name: &str,
    by_name: impl Fn(&str) -> nix::Result<Option<T>>,
    by_id: impl Fn(u32) -> nix::Result<Option<T>>,
) -> Option<T> {
    if let Ok(id) = name.parse::<u32>() {
        return by_id(id).ok().flatten();
    }
    by_name(name).ok().flatten()
}

/// A pidfd shared between the supervisor (signal safety, reaping) and the
/// task watching for the exit.
#[derive(Debug, Clone)]
pub struct PidFd(Arc<OwnedFd>);

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl PidFd {
    pub fn new(fd: OwnedFd) -> Self {
        Self(Arc::new(fd))
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Whether the process has exited (reaped or not), without waiting.
    pub fn has_exited(&self) -> bool {
        baton_sys::has_exited(self.0.as_fd())
    }

    /// Reaps the process, which must have exited: after this its pid and
    /// group id may be reused, so nothing may signal the group any more.
    pub fn reap(&self) -> std::io::Result<()> {
        baton_sys::reap(self.0.as_fd())
    }
}

/// Watches process `pid`: reports its exit (status read without reaping)
/// with whether its group is already empty, then, if it was not, when it
/// becomes so.
pub async fn watch(pid: Pid, pidfd: PidFd, events: UnboundedSender<ProcessEvent>) {
    let status = match baton_sys::async_fd(pidfd.clone()) {
        Ok(fd) => {
            // Readable once the process has exited.
            let _ = fd.readable().await;
            baton_sys::exit_status(pidfd.0.as_fd())
        }
        Err(e) => Err(e),
    };
    let status = match status {
        Ok(Some(WaitStatus::Exited(_, code))) => ExitStatus::Code(code),
        Ok(Some(WaitStatus::Signaled(_, sig, core_dumped))) => ExitStatus::Signaled {
            signal: sig as i32,
            core_dumped,
        },
        other => {
            // Cannot happen for a pidfd of our own child; report it as gone
            // rather than never.
            tracing::error!(%pid, "cannot read the exit status: {other:?}");
            ExitStatus::Code(-1)
        }
    };
    let group_empty = group_empty_now(pid).await;
    if events
        .send(ProcessEvent::Exited {
            pid,
            status,
            group_empty,
        })
        .is_err()
        || group_empty
    {
        return;
    }
    // Members outlived their leader: look again, less and less often.
    let mut pause = Duration::from_millis(10);
    loop {
        tokio::time::sleep(pause).await;
        if group_empty_now(pid).await {
            let _ = events.send(ProcessEvent::GroupEmpty { pid });
            return;
        }
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Watches the group of `pid`, whose exit was already reported (by a
/// previous baton image): reports when it is empty.
pub async fn watch_group(pid: Pid, events: UnboundedSender<ProcessEvent>) {
    let mut pause = Duration::from_millis(10);
    loop {
        if group_empty_now(pid).await {
            let _ = events.send(ProcessEvent::GroupEmpty { pid });
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

async fn group_empty_now(pgid: Pid) -> bool {
    tokio::task::spawn_blocking(move || group_members(pgid).is_empty())
        .await
        .unwrap_or(false)
}

/// Live (non-zombie) members of process group `pgid`, from /proc. The
/// group's leader is kept unreaped until its group is empty, so the id
/// cannot have been reused by a stranger's group.
pub fn group_members(pgid: Pid) -> Vec<i32> {
    proc_table()
        .into_iter()
        .filter(|p| p.pgrp == pgid.0 && p.state != 'Z')
        .map(|p| p.pid)
        .collect()
}

/// baton's own CPU priority, which the apps start with unless lowered
/// and get back when restored. A real-time baton (which baton never sets
/// itself) counts as the normal policy at its nice value.
pub fn own_priority() -> baton_sys::SchedPriority {
    baton_sys::thread_priority(0).unwrap_or(baton_sys::SchedPriority {
        policy: baton_sys::SchedPolicy::Other,
        nice: 0,
    })
}

/// What `priority` means for a process of baton running at `own`: `None`
/// for the normal priority (the child inherits baton's own).
pub fn sched_for(
    priority: baton_core::CpuPriority,
    own: baton_sys::SchedPriority,
) -> Option<baton_sys::SchedPriority> {
    use baton_core::CpuPriority as P;
    use baton_sys::{SchedPolicy, SchedPriority};
    match priority {
        P::Normal => None,
        P::Batch => Some(SchedPriority {
            policy: SchedPolicy::Batch,
            nice: own.nice,
        }),
        P::Idle => Some(SchedPriority {
            policy: SchedPolicy::Idle,
            nice: own.nice,
        }),
        P::Nice(n) => Some(SchedPriority {
            policy: own.policy,
            nice: (own.nice + i32::from(n)).min(19),
        }),
    }
}

/// What baton may do about CPU priorities, as the kernel will judge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NiceRights {
    /// It may raise a thread back to its own priority (out of
    /// `SCHED_IDLE`, to a lower nice value): `CAP_SYS_NICE`, or an
    /// `RLIMIT_NICE` that allows its own nice value.
    pub may_raise: bool,
    /// The apps run as another user (`user = ...`): changing their threads
    /// at all needs `CAP_SYS_NICE`.
    pub other_user: bool,
}

impl NiceRights {
    /// This process's rights, for apps run as another user or not.
    pub fn of_self(other_user: bool) -> Self {
        let own = own_priority();
        Self {
            may_raise: baton_sys::may_raise_to(own).unwrap_or(false),
            other_user,
        }
    }

    /// Whether a candidate started at `p` can be given baton's own
    /// priority back: leaving `SCHED_BATCH` for one's own threads needs
    /// nothing; leaving `SCHED_IDLE` or lowering a nice value again needs
    /// [`may_raise`](Self::may_raise), and so does any change to another
    /// user's threads (with `CAP_SYS_NICE` both hold).
    pub fn restorable(self, p: baton_core::CpuPriority) -> bool {
        use baton_core::CpuPriority as P;
        match p {
            P::Normal => true,
            P::Batch => self.may_raise || !self.other_user,
            P::Idle | P::Nice(_) => self.may_raise,
        }
    }
}

/// The candidate priority baton can keep its promise with: the normal
/// priority back before the candidate takes traffic. An explicit setting
/// that cannot be undone is an error; the default, `normal`, needs no
/// right.
pub fn usable_candidate_priority(
    explicit: Option<baton_core::CpuPriority>,
    rights: NiceRights,
) -> Result<baton_core::CpuPriority, String> {
    match explicit {
        Some(p) if rights.restorable(p) => Ok(p),
        Some(p) => Err(format!(
            "candidate_priority = \"{}\" cannot be undone before the new generation takes \
             traffic: {}; use {} or \"normal\"",
            crate::config::candidate_priority_name(p),
            if rights.other_user {
                "changing the threads of the app's user needs CAP_SYS_NICE"
            } else {
                "raising a priority back needs CAP_SYS_NICE or a high enough RLIMIT_NICE \
                 (`ulimit -e`, LimitNICE= under systemd)"
            },
            if rights.other_user {
                "CAP_SYS_NICE (AmbientCapabilities=CAP_SYS_NICE)"
            } else {
                "\"batch\""
            },
        )),
        None => Ok(crate::config::DEFAULT_CANDIDATE_PRIORITY),
    }
}

/// How often [`restore_group_priority`] goes over a group at most: each
/// pass after the first only looks for threads and processes started
/// during the one before.
const RESTORE_PASSES: usize = 8;

/// What [`restore_group_priority`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub processes: usize,
    pub threads: usize,
    /// Threads left as they were: not at `from` (the app changed them).
    pub left: usize,
}

/// Every thread of every process in group `pgid` (the leader first) that
/// runs at `from` (the lowered priority baton started it at) gets `to`.
/// Threads and processes started meanwhile inherit their creator's
/// priority, which may still be `from`, so the group is gone over again
/// until a pass finds no thread it had not seen (at most
/// [`RESTORE_PASSES`]). A thread or process that ended meanwhile is no
/// error; the first refusal (EPERM) is. Reads /proc: off the decision
/// loop.
pub fn restore_group_priority(
    pgid: Pid,
    from: baton_sys::SchedPriority,
    to: baton_sys::SchedPriority,
) -> Result<Restored, String> {
    let gone = |e: &std::io::Error| e.raw_os_error() == Some(nix::errno::Errno::ESRCH as i32);
    let mut seen = std::collections::BTreeSet::new();
    let mut processes = std::collections::BTreeSet::new();
    let mut done = Restored::default();
    let mut first_error = None;
    for _ in 0..RESTORE_PASSES {
        let mut pids = vec![pgid.0];
        pids.extend(group_members(pgid).into_iter().filter(|p| *p != pgid.0));
        let mut new = 0;
        for pid in pids {
            // Gone, or a zombie with no threads left: nothing to restore.
            let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue;
            };
            let tids: Vec<i32> = dir
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            for tid in tids {
                if !seen.insert(tid) {
                    continue;
                }
                new += 1;
                processes.insert(pid);
                match baton_sys::thread_priority(tid) {
                    Ok(now) if now == from => {}
                    Ok(_) => {
                        done.left += 1;
                        continue;
                    }
                    Err(e) if gone(&e) => continue,
                    // A real-time policy the app chose: not ours to undo.
                    Err(_) => {
                        done.left += 1;
                        continue;
                    }
                }
                match baton_sys::set_thread_priority(tid, to) {
                    Ok(()) => done.threads += 1,
                    Err(e) if gone(&e) => {}
                    Err(e) => {
                        first_error.get_or_insert(format!("thread {tid} of process {pid}: {e}"));
                    }
                }
            }
        }
        if new == 0 {
            done.processes = processes.len();
            return match first_error {
                Some(e) => Err(e),
                None => Ok(done),
            };
        }
    }
    Err(first_error.unwrap_or_else(|| {
        format!(
            "threads kept appearing: {} seen in {RESTORE_PASSES} passes over the group",
            seen.len()
        )
    }))
}

/// One process as /proc/PID/stat shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub state: char,
    pub pgrp: i32,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident set size, in pages.
    pub rss_pages: u64,
}

impl ProcStat {
    /// Parses a `/proc/PID/stat` line. The command (field 2) is in
    /// parentheses and may hold spaces, so fields count from the last `)`.
    pub fn parse(pid: i32, stat: &str) -> Option<Self> {
        let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
        // After ')': state(3) ppid(4) pgrp(5) ... utime(14) stime(15) ... rss(24).
        let num = |i: usize| f.get(i)?.parse::<u64>().ok();
        Some(Self {
            pid,
            state: f.first()?.chars().next()?,
            pgrp: f.get(2)?.parse().ok()?,
            cpu_ticks: num(11)? + num(12)?,
            rss_pages: num(21)?,
        })
    }
}

/// Every process we can see in /proc, with its state, group, CPU and RSS.
pub fn proc_table() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        ProcStat::parse(pid, &stat)
    })
    .collect()
}

/// Where the apps' stderr lines go: baton's own stderr, through a writer
/// that never blocks (lines are dropped if baton's stderr stays stuck long
/// enough to fill its buffer), so a stuck log reader cannot freeze an app
/// writing to stderr. With JSON logs each line becomes a JSON object, so
/// baton's stderr stays one object per line.
#[derive(Clone)]
pub struct StderrSink {
    writer: tracing_appender::non_blocking::NonBlocking,
    format: LogFormat,
}

impl StderrSink {
    pub fn new(writer: tracing_appender::non_blocking::NonBlocking, format: LogFormat) -> Self {
        Self { writer, format }
    }

    /// Writes one line of `pid`'s stderr (with its newline, if it had one).
    fn write_line(&mut self, pid: Pid, line: &[u8]) {
        use std::io::Write;
        let _ = match self.format {
            LogFormat::Text => self.writer.write_all(line),
            LogFormat::Json => {
                let mut obj = app_line_json(pid, line, std::time::SystemTime::now());
                obj.push('\n');
                self.writer.write_all(obj.as_bytes())
            }
        };
    }
}

/// An app's stderr line as a JSON log object: the fields of baton's own
/// JSON lines (`timestamp`, `level`, `message`) plus `source` and `pid`.
fn app_line_json(pid: Pid, line: &[u8], now: std::time::SystemTime) -> String {
    let text = String::from_utf8_lossy(line);
    let json = |s: &str| serde_json::Value::from(s).to_string();
    // In the order of baton's own lines (serde_json's maps sort keys).
    format!(
        "{{\"timestamp\":{},\"level\":\"INFO\",\"message\":{},\"source\":\"app\",\"pid\":{}}}",
        json(&humantime::format_rfc3339_micros(now).to_string()),
        json(text.trim_end_matches(['\n', '\r'])),
        pid.0
    )
}

/// Starts passing `stderr` through to `sink`; the tail fills as lines
/// arrive, and `StderrClosed` is reported at its end.
pub fn forward(
    pid: Pid,
    stderr: OwnedFd,
    sink: StderrSink,
    events: UnboundedSender<ProcessEvent>,
) -> StderrTail {
    let (tail, closer) = StderrTail::new();
    let t = tail.clone();
    tokio::spawn(async move {
        forward_stderr(stderr, sink, pid, t, closer).await;
        let _ = events.send(ProcessEvent::StderrClosed { pid });
    });
    tail
}

/// The probe listener's address.
pub fn probe_addr(probe: &Listener) -> Option<std::net::SocketAddr> {
    match probe.address {
        ListenAddr::Tcp(a) => Some(a),
        ListenAddr::Unix(_) | ListenAddr::Udp(_) | ListenAddr::Inherited => None,
    }
}

async fn forward_stderr(
    fd: OwnedFd,
    mut sink: StderrSink,
    pid: Pid,
    tail: StderrTail,
    closer: tokio::sync::watch::Sender<bool>,
) {
    let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(STDERR_MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                // Passed through (unchanged, or as JSON); the sink never
                // blocks.
                sink.write_line(pid, &line);
                let text = String::from_utf8_lossy(&line);
                tail.push(text.trim_end_matches(['\n', '\r']).to_owned());
            }
        }
    }
    let _ = closer.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_symlinked_release_at_call_time() {
        let root = tempfile::tempdir().unwrap();
        for v in ["v1", "v2"] {
            let bin = root.path().join(v).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            let server = bin.join("server");
            std::fs::write(&server, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&server, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let current = root.path().join("current");
        std::os::unix::fs::symlink(root.path().join("v1"), &current).unwrap();
        let cmd = vec!["./bin/server".to_owned()];
        let r1 = resolve(&current, &cmd, None).unwrap();
        std::fs::remove_file(&current).unwrap();
        std::os::unix::fs::symlink(root.path().join("v2"), &current).unwrap();
        let r2 = resolve(&current, &cmd, None).unwrap();
        assert!(r1.dir.ends_with("v1") && r1.program.ends_with("v1/bin/server"));
        assert!(r2.dir.ends_with("v2") && r2.program.ends_with("v2/bin/server"));
        assert_eq!(r2.argv, cmd);
    }

    #[test]
    fn resolve_errors_name_the_path() {
        let root = tempfile::tempdir().unwrap();
        let cmd = vec!["./missing".to_owned()];
        let err = resolve(root.path(), &cmd, None).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
        let file = root.path().join("noexec");
        std::fs::write(&file, "x").unwrap();
        let err = resolve(root.path(), &["./noexec".into()], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not executable"), "{err}");
        let err = resolve(&root.path().join("nope"), &cmd, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
        let sh = resolve(root.path(), &["sh".into()], None).unwrap();
        assert!(sh.program.is_absolute());
    }

    #[test]
    fn parses_proc_stat_whatever_the_command_name() {
        // A command name with spaces and parentheses; fields from the kernel docs.
        let line = "4242 (my (odd) app) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 0 0 20 0 3 0 12345 104857600 2560 18446744073709551615";
        let p = ProcStat::parse(4242, line).unwrap();
        assert_eq!((p.pid, p.state, p.pgrp), (4242, 'S', 4242));
        assert_eq!(p.cpu_ticks, 300, "utime 250 + stime 50");
        assert_eq!(p.rss_pages, 2560);
        assert!(ProcStat::parse(1, "1 (truncated) S 0").is_none());
        // Positive control on the real thing: this process uses memory.
        let me = std::process::id() as i32;
        let own = proc_table().into_iter().find(|p| p.pid == me).unwrap();
        assert!(own.rss_pages > 0 && own.state != 'Z');
    }

    #[test]
    fn app_lines_become_one_json_object_each() {
        let at = std::time::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let line = app_line_json(Pid(7), b"caf\xc3\xa9 \"quoted\"\r\n", at);
        assert!(!line.contains('\n'));
        assert!(line.starts_with("{\"timestamp\":"), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["message"], "caf\u{e9} \"quoted\"");
        assert_eq!(v["source"], "app");
        assert_eq!(v["pid"], 7);
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.123456Z");
    }

    #[test]
    fn the_default_is_normal_and_an_explicit_setting_is_kept_or_refused() {
        use baton_core::CpuPriority as P;
        let rights = |may_raise, other_user| NiceRights {
            may_raise,
            other_user,
        };
        // The default needs no right at all.
        for (may_raise, other_user) in [(true, false), (true, true), (false, false), (false, true)]
        {
            assert_eq!(
                usable_candidate_priority(None, rights(may_raise, other_user)),
                Ok(P::Normal)
            );
        }
        // Batch back to normal needs nothing for one's own threads.
        assert_eq!(
            usable_candidate_priority(Some(P::Batch), rights(false, false)),
            Ok(P::Batch)
        );
        // An explicit setting is kept or refused, never changed.
        assert_eq!(
            usable_candidate_priority(Some(P::Nice(5)), rights(true, false)),
            Ok(P::Nice(5))
        );
        assert_eq!(
            usable_candidate_priority(Some(P::Batch), rights(false, false)),
            Ok(P::Batch)
        );
        for p in [P::Idle, P::Nice(5)] {
            let e = usable_candidate_priority(Some(p), rights(false, false)).unwrap_err();
            assert!(e.contains("cannot be undone"), "{e}");
        }
        assert!(usable_candidate_priority(Some(P::Batch), rights(false, true)).is_err());
        assert_eq!(
            usable_candidate_priority(Some(P::Normal), rights(false, true)),
            Ok(P::Normal)
        );
    }
}
