//! All of baton's unsafe code, in one small crate: fork/exec, pidfds, and
//! the few socket options std, nix and socket2 don't wrap. Everything it
//! hands out is an `OwnedFd` or a plain value; every `unsafe` block names
//! the preconditions it relies on.
//!
//! The child side of [`spawn`] runs between `fork` and `execve` in a
//! multi-threaded process, where another thread may hold the allocator's or
//! any other lock. It therefore only calls async-signal-safe functions and
//! writes into memory prepared before the fork; it never allocates.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::signal::{SigSet, SigmaskHow};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};

/// Where the child's stdio comes from.
pub struct Stdio<'a> {
    pub stdin: BorrowedFd<'a>,
    /// `None` keeps the supervisor's own stdout.
    pub stdout: Option<BorrowedFd<'a>>,
    pub stderr: BorrowedFd<'a>,
}

/// Credentials the child switches to before exec (needs root).
pub struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
}

/// Everything [`spawn`] needs, prepared (and allocated) before the fork.
pub struct SpawnPlan<'a> {
    pub program: &'a CStr,
    pub argv: &'a [CString],
    /// Environment without `LISTEN_PID`, which is written after the fork.
    pub env: &'a [CString],
    pub cwd: &'a CStr,
    /// Become fds 3, 4, … in this order, without close-on-exec.
    pub fds: &'a [BorrowedFd<'a>],
    pub stdio: Stdio<'a>,
    /// Sent to the child if the supervisor dies (`PR_SET_PDEATHSIG`).
    pub parent_death_signal: Option<libc::c_int>,
    pub credentials: Option<&'a Credentials>,
    /// The CPU priority the child runs at from before `execve` on; `None`
    /// leaves it as baton's own (inherited across fork).
    pub priority: Option<SchedPriority>,
    /// Test hook: the parent sends this signal to the child right after
    /// `fork`, to hit the window before the child has reset its signal
    /// dispositions.
    #[cfg(test)]
    pub signal_child_after_fork: Option<libc::c_int>,
}

/// A started child: its pid and a pidfd to wait on.
pub struct Spawned {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
}

/// What failed in the child before exec, reported over the error pipe.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub enum ChildStage {
    Fds = 1,
    ProcessGroup = 2,
    ParentDeath = 3,
    Groups = 4,
    Gid = 5,
    Uid = 6,
    Chdir = 7,
    Exec = 8,
    Priority = 9,
}

impl ChildStage {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Fds,
            2 => Self::ProcessGroup,
            3 => Self::ParentDeath,
            4 => Self::Groups,
            5 => Self::Gid,
            6 => Self::Uid,
            7 => Self::Chdir,
            9 => Self::Priority,
            _ => Self::Exec,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Fds => "setting up descriptors",
            Self::ProcessGroup => "creating the process group",
            Self::ParentDeath => "setting the parent-death signal",
            Self::Groups => "setting supplementary groups",
            Self::Gid => "setting the group id",
            Self::Uid => "setting the user id",
            Self::Chdir => "changing to the working directory",
            Self::Exec => "executing the program",
            Self::Priority => "lowering the CPU priority",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("preparing to start the process")]
    Prepare(#[source] io::Error),
    #[error("{} failed", .stage.describe())]
    Child {
        stage: ChildStage,
        #[source]
        source: io::Error,
    },
}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

/// Fork and exec `plan`. Returns once the child has exec'd (or failed to):
/// the error pipe is close-on-exec, so EOF on it means exec succeeded.
///
/// Every signal is blocked in the calling thread around the fork, so the
/// child starts with all of them blocked: a signal sent to it before it
/// has reset its dispositions stays pending instead of running one of
/// baton's handlers in the child (which would swallow it, and could write
/// into baton's own signal pipe). The child unblocks them right before
/// `execve`, as `posix_spawn` does.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked exits, not the
/// process: call this from a thread that lives as long as baton.
pub fn spawn(plan: &SpawnPlan<'_>) -> Result<Spawned, SpawnError> {
    // All allocation happens here, before the fork.
    let mut argv: Vec<*const libc::c_char> = plan.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    // "LISTEN_PID=" + up to 20 digits + NUL; digits are written in the child.
    let mut listen_pid = [0u8; 32];
    listen_pid[..LISTEN_PID_PREFIX.len()].copy_from_slice(LISTEN_PID_PREFIX);
    let mut envp: Vec<*const libc::c_char> = plan.env.iter().map(|e| e.as_ptr()).collect();
    if !plan.fds.is_empty() {
        envp.push(listen_pid.as_ptr().cast());
    }
    envp.push(std::ptr::null());
    let groups: &[libc::gid_t] = plan.credentials.map_or(&[], |c| c.groups.as_slice());

    // Sources in the order they are placed: stdin, stdout, stderr, then 3.. .
    let mut sources: Vec<RawFd> = Vec::with_capacity(3 + plan.fds.len());
    sources.push(plan.stdio.stdin.as_raw_fd());
    sources.push(plan.stdio.stdout.map_or(1, |fd| fd.as_raw_fd()));
    sources.push(plan.stdio.stderr.as_raw_fd());
    sources.extend(plan.fds.iter().map(|fd| fd.as_raw_fd()));
    let mut scratch: Vec<RawFd> = vec![-1; sources.len()];

    let (err_read, err_write) = pipe_cloexec().map_err(SpawnError::Prepare)?;
    let parent_pid = std::process::id() as libc::pid_t;

    let mut old_mask = SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old_mask),
    )
    .map_err(|e| SpawnError::Prepare(e.into()))?;
    // SAFETY: fork has no memory-safety preconditions; in the child we only
    // run `child_after_fork`, which is restricted to async-signal-safe calls
    // on memory allocated before the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let ctx = ChildContext {
            sources: &sources,
            scratch: &mut scratch,
            listen_pid: &mut listen_pid,
            parent_pid,
            program: plan.program,
            argv: &argv,
            envp: &envp,
            cwd: plan.cwd,
            parent_death_signal: plan.parent_death_signal,
            credentials: plan.credentials.map(|c| (c.uid, c.gid)),
            groups,
            priority: plan.priority,
            err_fd: err_write.as_raw_fd(),
        };
        child_after_fork(ctx);
    }
    let fork_error = (pid < 0).then(io::Error::last_os_error);
    #[cfg(test)]
    if let (Some(sig), None) = (plan.signal_child_after_fork, &fork_error) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, sig) };
    }
    // The parent's own mask comes back at once; a failure here would leave
    // this thread deaf to signals, which baton does not rely on it hearing.
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old_mask), None);
    if let Some(e) = fork_error {
        return Err(SpawnError::Prepare(e));
    }
    drop(err_write);

    // Open the pidfd before anything can reap the child, so it names it.
    let pidfd = pidfd_open(pid);
    let report = read_child_report(&err_read);
    match (report, pidfd) {
        (None, Ok(pidfd)) => Ok(Spawned { pid, pidfd }),
        (Some((stage, errno)), _) => {
            reap_blocking(pid);
            Err(SpawnError::Child {
                stage,
                source: io::Error::from_raw_os_error(errno),
            })
        }
        (None, Err(e)) => {
            // Cannot watch it: do not leave an unsupervised process behind.
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reap_blocking(pid);
            Err(SpawnError::Prepare(e))
        }
    }
}

struct ChildContext<'a> {
    sources: &'a [RawFd],
    scratch: &'a mut [RawFd],
    listen_pid: &'a mut [u8; 32],
    parent_pid: libc::pid_t,
    program: &'a CStr,
    argv: &'a [*const libc::c_char],
    envp: &'a [*const libc::c_char],
    cwd: &'a CStr,
    parent_death_signal: Option<libc::c_int>,
    credentials: Option<(libc::uid_t, libc::gid_t)>,
    groups: &'a [libc::gid_t],
    priority: Option<SchedPriority>,
    err_fd: RawFd,
}

/// Runs in the child between fork and exec: async-signal-safe calls only,
/// no allocation, no locks. Never returns.
fn child_after_fork(ctx: ChildContext<'_>) -> ! {
    let mut err_fd = ctx.err_fd;
    // SAFETY (whole block): only async-signal-safe libc calls, on memory
    // allocated before the fork and owned by this (single-threaded) child.
    unsafe {
        // Signals arrive blocked (see `spawn`). Restore every default
        // disposition first; ignored ones would survive exec: Rust ignores
        // SIGPIPE, and whoever started baton may have ignored others.
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        // Linux has signals 1..=64 (_NSIG - 1).
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                // Fails harmlessly for numbers that are not signals.
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }

        // Own process group, so signals can reach the whole generation.
        if libc::setpgid(0, 0) != 0 {
            fail(err_fd, ChildStage::ProcessGroup);
        }

        // Move every source above the target range first, so placing one
        // never clobbers another; the copies are close-on-exec. The error
        // pipe moves too, or a dup2 below could replace it.
        let floor = ctx.sources.len() as libc::c_int;
        let moved = libc::fcntl(err_fd, libc::F_DUPFD_CLOEXEC, floor);
        if moved < 0 {
            fail(err_fd, ChildStage::Fds);
        }
        err_fd = moved;
        for (i, &src) in ctx.sources.iter().enumerate() {
            let high = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, floor.max(3));
            if high < 0 {
                fail(err_fd, ChildStage::Fds);
            }
            ctx.scratch[i] = high;
        }
        // dup2 clears close-on-exec on the target, which is what we want.
        for (target, &high) in ctx.scratch.iter().enumerate() {
            if libc::dup2(high, target as libc::c_int) < 0 {
                fail(err_fd, ChildStage::Fds);
            }
        }
        // Everything above the placed range closes at exec: our own fds are
        // close-on-exec already, but baton may have inherited open ones
        // from whoever started it, and those must not reach the app.
        cloexec_from(floor);

        if let Some((uid, gid)) = ctx.credentials {
            if libc::setgroups(ctx.groups.len(), ctx.groups.as_ptr()) != 0 {
                fail(err_fd, ChildStage::Groups);
            }
            if libc::setgid(gid) != 0 {
                fail(err_fd, ChildStage::Gid);
            }
            if libc::setuid(uid) != 0 {
                fail(err_fd, ChildStage::Uid);
            }
        }

        // After the credential change: the kernel clears the parent-death
        // signal when credentials change, so set before it would be lost.
        if let Some(sig) = ctx.parent_death_signal {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                fail(err_fd, ChildStage::ParentDeath);
            }
            // The supervisor may have died before prctl took effect.
            if libc::getppid() != ctx.parent_pid {
                libc::_exit(1);
            }
        }

        if libc::chdir(ctx.cwd.as_ptr()) != 0 {
            fail(err_fd, ChildStage::Chdir);
        }

        // Last before exec, so everything above ran at baton's own
        // priority; lowering one's own priority needs no privilege (the
        // kernel only refuses raising it). Threads and processes the app
        // starts inherit it.
        if let Some(priority) = ctx.priority {
            if set_sched(0, priority).is_err() {
                fail(err_fd, ChildStage::Priority);
            }
        }

        write_decimal(
            &mut ctx.listen_pid[LISTEN_PID_PREFIX.len()..],
            libc::getpid(),
        );
        // The app starts with no signal blocked. One that arrived since the
        // fork is delivered now, with its default action.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(ctx.program.as_ptr(), ctx.argv.as_ptr(), ctx.envp.as_ptr());
        fail(err_fd, ChildStage::Exec);
    }
}

/// Marks every fd >= `first` close-on-exec. Child-side: syscalls only.
unsafe fn cloexec_from(first: libc::c_int) {
    // SAFETY: close_range only changes descriptor flags in this process.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return;
    }
    // Kernels before 5.11: walk the descriptor table up to the limit.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes into the struct we own.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur.min(65536) as libc::c_int
    } else {
        1024
    };
    for fd in first..max {
        // SAFETY: fcntl on a closed fd just fails with EBADF.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// Reports `stage` and errno to the parent over the error pipe and exits.
/// Child-side: async-signal-safe calls only.
fn fail(err_fd: RawFd, stage: ChildStage) -> ! {
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let mut msg = [0u8; 5];
    msg[0] = stage as u8;
    msg[1..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: write and _exit are async-signal-safe; msg is on our stack.
    unsafe {
        libc::write(err_fd, msg.as_ptr().cast(), msg.len());
        libc::_exit(127);
    }
}

/// Writes `n` as NUL-terminated decimal into `buf`, without allocating.
fn write_decimal(buf: &mut [u8], n: libc::pid_t) {
    let mut digits = [0u8; 20];
    let mut len = 0;
    let mut v = n.unsigned_abs();
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = digits[len - 1 - i];
    }
    buf[len] = 0;
}

fn read_child_report(fd: &OwnedFd) -> Option<(ChildStage, i32)> {
    let mut msg = [0u8; 5];
    let mut got = 0;
    while got < msg.len() {
        // SAFETY: reading into a stack buffer within its bounds.
        let n = unsafe {
            libc::read(
                fd.as_raw_fd(),
                msg[got..].as_mut_ptr().cast(),
                msg.len() - got,
            )
        };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    (got == msg.len()).then(|| {
        let errno = i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]]);
        (ChildStage::from_u8(msg[0]), errno)
    })
}

/// Reaps a child known to have exited or be exiting (failed before exec).
fn reap_blocking(pid: libc::pid_t) {
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
}

/// A thread's CPU priority as the kernel's fair scheduler knows it: a
/// policy (`SCHED_OTHER`, `SCHED_BATCH` or `SCHED_IDLE`) and a nice value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedPriority {
    pub policy: SchedPolicy,
    /// -20 (most CPU) to 19 (least); ignored by `SCHED_IDLE`.
    pub nice: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedPolicy {
    Other,
    Batch,
    Idle,
}

impl SchedPolicy {
    fn raw(self) -> libc::c_int {
        match self {
            Self::Other => libc::SCHED_OTHER,
            Self::Batch => libc::SCHED_BATCH,
            Self::Idle => libc::SCHED_IDLE,
        }
    }

    fn from_raw(raw: libc::c_int) -> Option<Self> {
        match raw {
            libc::SCHED_OTHER => Some(Self::Other),
            libc::SCHED_BATCH => Some(Self::Batch),
            libc::SCHED_IDLE => Some(Self::Idle),
            _ => None,
        }
    }
}

/// Sets thread `tid`'s policy, then its nice value (0: the calling
/// thread). Async-signal-safe: two plain syscalls, nothing allocated and
/// no lock taken (the error is read from errno only by the caller, and
/// `io::Error::last_os_error` allocates nothing), so the child calls it
/// between fork and exec.
fn set_sched(tid: libc::pid_t, p: SchedPriority) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler only reads the sched_param, which lives
    // on this stack frame for the whole call; a priority of 0 is the one
    // the three normal policies accept.
    if unsafe { libc::sched_setscheduler(tid, p.policy.raw(), &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: setpriority takes plain integers and touches no memory of
    // ours. On Linux, PRIO_PROCESS with a thread id sets that thread's
    // nice value alone (nice is per thread).
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, p.nice) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets thread `tid`'s CPU priority (a thread id of any process, as
/// `/proc/PID/task` lists them). Raising a priority (lower nice, or out of
/// `SCHED_IDLE`) needs `CAP_SYS_NICE` or a high enough `RLIMIT_NICE`;
/// another user's thread needs `CAP_SYS_NICE`.
pub fn set_thread_priority(tid: libc::pid_t, p: SchedPriority) -> io::Result<()> {
    if tid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    set_sched(tid, p)
}

/// Thread `tid`'s CPU priority (0: the calling thread).
pub fn thread_priority(tid: libc::pid_t) -> io::Result<SchedPriority> {
    // SAFETY: sched_getscheduler takes a plain integer and touches no
    // memory of ours.
    let raw = unsafe { libc::sched_getscheduler(tid) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    let policy = SchedPolicy::from_raw(raw)
        .ok_or_else(|| io::Error::other(format!("thread {tid} has a real-time policy ({raw})")))?;
    // getpriority returns the nice value, which may be -1: errno tells.
    nix::errno::Errno::clear();
    // SAFETY: getpriority takes plain integers and touches no memory of
    // ours.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    let err = io::Error::last_os_error();
    if nice == -1 && err.raw_os_error() != Some(0) {
        return Err(err);
    }
    Ok(SchedPriority { policy, nice })
}

/// Whether this process may raise a thread of its own user back to
/// `to.nice` (and out of `SCHED_IDLE`) after lowering it: it has
/// `CAP_SYS_NICE`, or its `RLIMIT_NICE` allows that nice value (the limit
/// `r` allows down to `20 - r`).
pub fn may_raise_to(to: SchedPriority) -> io::Result<bool> {
    let mut lim: libc::rlimit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`, which we own and
    // which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let allowed = lim.rlim_cur == libc::RLIM_INFINITY
        || i64::from(20 - to.nice) <= i64::try_from(lim.rlim_cur).unwrap_or(i64::MAX);
    Ok(allowed || has_cap_sys_nice()?)
}

/// Whether `CAP_SYS_NICE` is in this process's effective set.
fn has_cap_sys_nice() -> io::Result<bool> {
    const CAP_SYS_NICE: u32 = 23;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff in /proc/self/status"))?;
    Ok(eff & (1 << CAP_SYS_NICE) != 0)
}

fn pipe_cloexec() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((r, w))
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us (close-on-exec by
    // default for pidfds) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The exit status of the process behind `pidfd`, if it has exited,
/// without reaping it: the zombie keeps its pid, and so its process group
/// id, from being reused until [`reap`]. Never blocks.
pub fn exit_status(pidfd: BorrowedFd<'_>) -> io::Result<Option<WaitStatus>> {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT | WaitPidFlag::WNOHANG;
    match waitid(Id::PIDFd(pidfd), flags) {
        Ok(WaitStatus::StillAlive) => Ok(None),
        Ok(status) => Ok(Some(status)),
        Err(e) => Err(e.into()),
    }
}

/// Reaps the exited process behind `pidfd`. Never blocks: a process that
/// has not exited is left alone.
pub fn reap(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    waitid(
        Id::PIDFd(pidfd),
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG,
    )
    .map(drop)
    .map_err(Into::into)
}

/// Whether the process behind `pidfd` has exited (its pidfd is readable),
/// without waiting.
pub fn has_exited(pidfd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Registers a pidfd (or anything owning a descriptor) with tokio, so its
/// readiness (the process's exit) can be awaited.
pub fn async_fd<T: AsRawFd>(fd: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: the AsyncFd owns `fd`, which keeps its descriptor open and
    // unchanged for as long as it lives: callers pass an owning type
    // (`OwnedFd`, or an `Arc` of one), never a bare number.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Blocks every signal in the calling thread, for good: for a thread that
/// must never run a signal handler (the one that forks).
pub fn block_all_signals() -> io::Result<()> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), None)
        .map_err(Into::into)
}

/// Takes ownership of descriptor `fd`, which this process's previous image
/// handed over across `execve` (baton's own upgrade), and makes it
/// close-on-exec again. Each number can be taken once per process: a
/// second take of the same number is refused rather than wrapped twice.
pub fn take_handed_over_fd(fd: RawFd) -> io::Result<OwnedFd> {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    static TAKEN: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is stdio, not a handed-over one"),
        ));
    }
    let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
    if taken.contains(&fd) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("descriptor {fd} was already taken"),
        ));
    }
    // SAFETY: F_SETFD only changes this descriptor's flags; an unopened
    // number fails with EBADF, which is reported.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    taken.insert(fd);
    // SAFETY: `fd` is open (F_SETFD succeeded); the previous image left it
    // for this one to own and nothing in this image has wrapped it (the
    // TAKEN set, checked and updated under its lock, makes this the only
    // wrap of the number).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Lets `fd` survive `execve` (clears close-on-exec), or not.
pub fn set_inheritable(fd: BorrowedFd<'_>, inheritable: bool) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let flags = if inheritable {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(flags))
        .map(drop)
        .map_err(Into::into)
}

/// Unblocks every signal in the calling thread.
pub fn unblock_all_signals() -> io::Result<()> {
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(Into::into)
}

/// One classic BPF instruction, as the kernel takes it (`sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic; sparc and mips number it
/// differently, and libc exports it only for some targets).
#[cfg(not(any(target_arch = "mips", target_arch = "mips64", target_arch = "sparc64")))]
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Attaches `program` to the reuseport group of the listening socket `fd`:
/// its return value picks the group's socket for each new connection. The
/// program belongs to the whole group; no privilege is needed.
pub fn attach_reuseport_cbpf(fd: BorrowedFd<'_>, program: &[SockFilter]) -> io::Result<()> {
    let filters: Vec<libc::sock_filter> = program
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let len = u16::try_from(filters.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "program too long"))?;
    let prog = libc::sock_fprog {
        len,
        // The kernel only reads through this pointer.
        filter: filters.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points to `len` initialised instructions in `filters`,
    // which outlives the call; the kernel copies the program before
    // returning and checks every instruction itself.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Accept-queue length of a TCP listener (`tcpi_unacked` in TCP_INFO),
/// used to learn whether an app has accepted a probe connection.
pub fn tcp_accept_queue_len(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: tcp_info is plain data; zeroed is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: info and len point to valid, writable memory of the given size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_unacked)
}

/// Sockets passed by a service manager with the socket-activation
/// protocol (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`), by name.
#[derive(Debug, thiserror::Error)]
pub enum ListenFdsError {
    #[error("LISTEN_FDS={0:?} is not a count of descriptors")]
    Count(String),
    #[error("LISTEN_FDNAMES has {names} names for LISTEN_FDS={fds}")]
    Names { names: usize, fds: usize },
    #[error("LISTEN_FDS names descriptor {fd}, which is not open")]
    NotOpen { fd: RawFd },
    #[error("taking descriptor {fd}")]
    Fcntl {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
}

/// Takes the descriptors a service manager passed this process (fds 3,
/// 4, … with `LISTEN_FDS`), once: later calls return `None`. `None` too
/// when there are none, or when `LISTEN_PID` names another process (the
/// variables were inherited, not meant for us: the descriptors are left
/// alone). Each one taken is made close-on-exec. Unnamed ones are called
/// `unknown`, as systemd's `sd_listen_fds_with_names` does.
///
/// Call it before anything else could open or close descriptors 3 and up
/// by number. The variables themselves stay in the environment (changing
/// the environment of a multi-threaded process is not safe); whoever starts
/// children must leave them out.
pub fn take_listen_fds() -> Result<Option<Vec<(String, OwnedFd)>>, ListenFdsError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let var = |k: &str| std::env::var(k).ok();
    let for_us = var("LISTEN_PID")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let Some(count) = var("LISTEN_FDS").filter(|_| for_us) else {
        return Ok(None);
    };
    let n: usize = count
        .trim()
        .parse()
        .ok()
        .filter(|n| *n <= 4096)
        .ok_or_else(|| ListenFdsError::Count(count.clone()))?;
    let names: Vec<String> = match var("LISTEN_FDNAMES") {
        Some(names) => names.split(':').map(str::to_owned).collect(),
        None => vec!["unknown".to_owned(); n],
    };
    if names.len() != n {
        return Err(ListenFdsError::Names {
            names: names.len(),
            fds: n,
        });
    }
    // Check every descriptor before taking any, so an error leaves all of
    // them as they were.
    let first: RawFd = 3;
    for fd in first..first + n as RawFd {
        // SAFETY: F_GETFD only reads the descriptor's flags; any number is
        // a valid argument (EBADF for a closed one).
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(ListenFdsError::NotOpen { fd });
        }
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    let mut taken = Vec::with_capacity(n);
    for (i, name) in names.into_iter().enumerate() {
        let fd = first + i as RawFd;
        // SAFETY: as above; F_SETFD with FD_CLOEXEC changes only this
        // descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(ListenFdsError::Fcntl {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: the service manager passed `fd` to this process for it
        // to own (LISTEN_PID is ours); it is open (checked above), and the
        // TAKEN guard makes this the only place that ever wraps it.
        taken.push((name, unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    Ok(Some(taken))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI32, Ordering};

    /// Write end of a pipe the test's SIGUSR1 handler reports into.
    static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

    extern "C" fn report_pid(_: libc::c_int) {
        // SAFETY: getpid and write are async-signal-safe; the buffer is on
        // this handler's stack.
        unsafe {
            let pid = libc::getpid().to_ne_bytes();
            libc::write(
                REPORT_FD.load(Ordering::Relaxed),
                pid.as_ptr().cast(),
                pid.len(),
            );
        }
    }

    fn cstr(s: &str) -> CString {
        CString::new(s).unwrap_or_default()
    }

    /// A signal sent to the child right after fork, before it has reset
    /// its dispositions, must neither run baton's handler in the child
    /// (swallowing it) nor get lost: it is delivered with its default
    /// action once the child unblocks, so the child dies of it.
    #[test]
    fn a_signal_in_the_fork_window_is_not_swallowed() {
        let (r, w) = pipe_cloexec().unwrap_or_else(|e| panic!("pipe: {e}"));
        REPORT_FD.store(w.as_raw_fd(), Ordering::Relaxed);
        let handler = nix::sys::signal::SigHandler::Handler(report_pid);
        let action = nix::sys::signal::SigAction::new(
            handler,
            nix::sys::signal::SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler only makes async-signal-safe calls; no other
        // test in this binary uses SIGUSR1.
        unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGUSR1, &action) }
            .unwrap_or_else(|e| panic!("sigaction: {e}"));
        let program = cstr("/bin/sh");
        // Long enough that a signal the parent is slow to send (a loaded
        // machine) still finds the child alive: a late signal kills it by
        // its default action too, while a swallowed one lets it exit 0.
        let argv = [cstr("sh"), cstr("-c"), cstr("sleep 5")];
        let env: [CString; 0] = [];
        let cwd = cstr("/");
        let devnull = std::fs::File::open("/dev/null").unwrap_or_else(|e| panic!("{e}"));
        let mut deaths = 0;
        for _ in 0..30 {
            let plan = SpawnPlan {
                program: &program,
                argv: &argv,
                env: &env,
                cwd: &cwd,
                fds: &[],
                stdio: Stdio {
                    stdin: devnull.as_fd(),
                    stdout: None,
                    stderr: devnull.as_fd(),
                },
                parent_death_signal: None,
                credentials: None,
                priority: None,
                signal_child_after_fork: Some(libc::SIGUSR1),
            };
            let child = spawn(&plan).unwrap_or_else(|e| panic!("spawn: {e}"));
            let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child.pid), None)
                .unwrap_or_else(|e| panic!("waitpid: {e}"));
            assert_eq!(
                status,
                WaitStatus::Signaled(
                    nix::unistd::Pid::from_raw(child.pid),
                    nix::sys::signal::Signal::SIGUSR1,
                    false
                ),
                "the child must die of the signal sent to it"
            );
            deaths += 1;
        }
        assert_eq!(deaths, 30);
        // No child ran the parent's handler.
        drop(w);
        REPORT_FD.store(-1, Ordering::Relaxed);
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut buf)
            .unwrap_or_else(|e| panic!("{e}"));
        let own = std::process::id() as i32;
        let foreign: Vec<i32> = buf
            .chunks_exact(4)
            .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .filter(|p| *p != own)
            .collect();
        assert!(
            foreign.is_empty(),
            "children ran baton's handler: {foreign:?}"
        );
    }

    fn own_priority() -> SchedPriority {
        thread_priority(0).unwrap_or_else(|e| panic!("own priority: {e}"))
    }

    /// The child runs at the plan's priority from before exec (so `sh`
    /// itself, not just what it starts, is lowered), and its thread can be
    /// given the normal one back, as baton does at activation.
    #[test]
    fn a_child_starts_at_the_planned_priority_and_can_be_restored() {
        let own = own_priority();
        let program = cstr("/bin/sh");
        let argv = [cstr("sh"), cstr("-c"), cstr("read x")];
        let env: [CString; 0] = [];
        let cwd = cstr("/");
        let (stdin_r, stdin_w) = pipe_cloexec().unwrap_or_else(|e| panic!("pipe: {e}"));
        let devnull = std::fs::File::open("/dev/null").unwrap_or_else(|e| panic!("{e}"));
        for wanted in [
            SchedPriority {
                policy: SchedPolicy::Idle,
                nice: own.nice,
            },
            SchedPriority {
                policy: SchedPolicy::Batch,
                nice: own.nice,
            },
            SchedPriority {
                policy: SchedPolicy::Other,
                nice: (own.nice + 7).min(19),
            },
        ] {
            let plan = SpawnPlan {
                program: &program,
                argv: &argv,
                env: &env,
                cwd: &cwd,
                fds: &[],
                stdio: Stdio {
                    stdin: stdin_r.as_fd(),
                    stdout: None,
                    stderr: devnull.as_fd(),
                },
                parent_death_signal: None,
                credentials: None,
                priority: Some(wanted),
                signal_child_after_fork: None,
            };
            let child = spawn(&plan).unwrap_or_else(|e| panic!("spawn: {e}"));
            let seen = thread_priority(child.pid);
            // Restoring needs CAP_SYS_NICE (or RLIMIT_NICE) for idle and
            // nice; batch back to other is allowed to anyone.
            let may = may_raise_to(own).unwrap_or(false) || wanted.policy == SchedPolicy::Batch;
            let restored = set_thread_priority(child.pid, own);
            let after = thread_priority(child.pid);
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(child.pid, libc::SIGKILL) };
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child.pid), None);
            assert_eq!(seen.unwrap_or_else(|e| panic!("{e}")), wanted);
            if may {
                restored.unwrap_or_else(|e| panic!("restoring: {e}"));
                assert_eq!(after.unwrap_or_else(|e| panic!("{e}")), own);
            }
        }
        drop(stdin_w);
        assert_eq!(
            set_thread_priority(0, own).map_err(|e| e.raw_os_error()),
            Err(Some(libc::EINVAL)),
            "tid 0 (the caller) is refused: it would restore baton itself"
        );
    }

    #[test]
    fn decimal_without_allocation() {
        let mut buf = [0xffu8; 12];
        write_decimal(&mut buf, 40213);
        assert_eq!(&buf[..6], b"40213\0");
        write_decimal(&mut buf, 7);
        assert_eq!(&buf[..2], b"7\0");
    }
}
