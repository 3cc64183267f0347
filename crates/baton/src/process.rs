//! Starting one process of a generation and watching it: exit (through a
//! pidfd, so every child is reaped and no zombie stays), and stderr (passed
//! through to baton's stderr, with the last lines kept for error reports).

use std::collections::VecDeque;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use crate::sys;

/// Lines of a process's stderr kept for failure reports.
const STDERR_TAIL_LINES: usize = 20;

/// What to run: resolved at spawn time, so a `current` symlink that was
/// repointed since the last spawn starts the new target. Kept per
/// generation for restarts and rollbacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Canonical working directory.
    pub dir: PathBuf,
    /// Canonical path of the program.
    pub program: PathBuf,
    /// argv as configured (argv[0] as the user wrote it), `{fd:…}` unexpanded.
    pub argv: Vec<String>,
}

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

impl Release {
    /// Resolves `cwd` and `command[0]` now. A program with a `/` is taken
    /// relative to the resolved directory; a bare name is searched in `path`.
    pub fn resolve(
        cwd: &Path,
        command: &[String],
        path: Option<&OsStr>,
    ) -> Result<Self, ResolveError> {
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
        Ok(Self {
            dir,
            program,
            argv: command.to_vec(),
        })
    }
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

/// What a spawn needs besides the release.
pub(crate) struct SpawnSpec<'a> {
    pub release: &'a Release,
    /// Full environment, `NAME=value`, except `LISTEN_PID`.
    pub env: Vec<(OsString, OsString)>,
    /// Listener fds in order (fd 3, 4, …).
    pub fds: Vec<BorrowedFd<'a>>,
    pub fd_names: Vec<&'a str>,
    pub parent_death_signal: Option<i32>,
    pub credentials: Option<&'a sys::Credentials>,
}

#[derive(Debug, thiserror::Error)]
#[error("starting {}", .program.display())]
pub struct SpawnFailed {
    pub program: PathBuf,
    #[source]
    source: sys::SpawnError,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadArgument(String);

/// A running process, with its exit watched by a task.
pub struct Process {
    pub pid: i32,
    pub stderr: StderrTail,
}

/// How a process ended, in words ("exit status 3", "signal SIGKILL").
pub fn describe_status(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit status {code}"),
        WaitStatus::Signaled(_, sig, core) => {
            format!(
                "killed by {}{}",
                sig.as_str(),
                if core { " (core dumped)" } else { "" }
            )
        }
        other => format!("{other:?}"),
    }
}

fn cstring(bytes: Vec<u8>, what: &str) -> Result<CString, BadArgument> {
    CString::new(bytes).map_err(|_| BadArgument(format!("{what} contains a NUL byte")))
}

/// Starts the process. `on_exit` is called (from a task) with the pid and
/// exit status as soon as it is reaped; the returned `Process::stderr`
/// fills as its stderr arrives.
pub(crate) fn spawn(
    spec: SpawnSpec<'_>,
    on_exit: impl FnOnce(i32, String) + Send + 'static,
) -> Result<Process, Box<dyn std::error::Error + Send + Sync>> {
    let program = cstring(
        spec.release.program.as_os_str().as_bytes().to_vec(),
        "program path",
    )?;
    let argv = spec
        .release
        .argv
        .iter()
        .map(|a| {
            cstring(
                crate::config::substitute_fds(a, &spec.fd_names).into_bytes(),
                "argument",
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let env = spec
        .env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            cstring(kv.into_vec(), "environment variable")
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cwd = cstring(
        spec.release.dir.as_os_str().as_bytes().to_vec(),
        "working directory",
    )?;

    let devnull = std::fs::File::open("/dev/null")?;
    let (err_read, err_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let plan = sys::SpawnPlan {
        program: &program,
        argv: &argv,
        env: &env,
        cwd: &cwd,
        fds: &spec.fds,
        stdio: sys::Stdio {
            stdin: devnull.as_fd(),
            stdout: None,
            stderr: err_write.as_fd(),
        },
        parent_death_signal: spec.parent_death_signal,
        credentials: spec.credentials,
    };
    let spawned = sys::spawn(&plan).map_err(|source| SpawnFailed {
        program: spec.release.program.clone(),
        source,
    })?;
    drop(err_write);
    let pid = spawned.pid;
    let (tail, closer) = StderrTail::new();
    tokio::spawn(forward_stderr(err_read, tail.clone(), closer));
    tokio::spawn(async move {
        let status = wait_exit(spawned.pidfd, pid).await;
        on_exit(pid, status);
    });
    Ok(Process { pid, stderr: tail })
}

async fn wait_exit(pidfd: OwnedFd, pid: i32) -> String {
    let pid = Pid::from_raw(pid);
    match sys::async_pidfd(pidfd) {
        Ok(fd) => {
            // The pidfd becomes readable when the process exits.
            let _ = fd.readable().await;
        }
        Err(e) => {
            tracing::error!(%pid, "cannot watch process exit ({e}); waiting in a thread");
        }
    }
    // Blocking wait is fine here: the process has exited (or, in the
    // fallback, we are in our own task and must reap it eventually).
    let res = tokio::task::spawn_blocking(move || loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other,
        }
    })
    .await;
    match res {
        Ok(Ok(status)) => describe_status(status),
        Ok(Err(e)) => format!("unknown ({e})"),
        Err(e) => format!("unknown ({e})"),
    }
}

async fn forward_stderr(fd: OwnedFd, tail: StderrTail, closer: tokio::sync::watch::Sender<bool>) {
    let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
        return;
    };
    let mut reader = BufReader::new(pipe);
    // Async, so a blocked stderr of baton's never stalls a runtime thread.
    let mut out = tokio::io::stderr();
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
                // Pass through unchanged; a closed stderr is not the app's problem.
                let _ = out.write_all(&line).await;
                let text = String::from_utf8_lossy(&line);
                tail.push(text.trim_end_matches(['\n', '\r']).to_owned());
            }
        }
    }
    let _ = out.flush().await;
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
        let r1 = Release::resolve(&current, &cmd, None).unwrap();
        std::fs::remove_file(&current).unwrap();
        std::os::unix::fs::symlink(root.path().join("v2"), &current).unwrap();
        let r2 = Release::resolve(&current, &cmd, None).unwrap();
        assert!(r1.dir.ends_with("v1") && r1.program.ends_with("v1/bin/server"));
        assert!(r2.dir.ends_with("v2") && r2.program.ends_with("v2/bin/server"));
        assert_eq!(r2.argv, cmd);
    }

    #[test]
    fn resolve_errors_name_the_path() {
        let root = tempfile::tempdir().unwrap();
        let cmd = vec!["./missing".to_owned()];
        let err = Release::resolve(root.path(), &cmd, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
        let file = root.path().join("noexec");
        std::fs::write(&file, "x").unwrap();
        let err = Release::resolve(root.path(), &["./noexec".into()], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not executable"), "{err}");
        let err = Release::resolve(&root.path().join("nope"), &cmd, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
        let sh = Release::resolve(root.path(), &["sh".into()], None).unwrap();
        assert!(sh.program.is_absolute());
    }
}
