//! The supervisor: one task that owns the listeners and the generations and
//! serializes every decision, so there are no locks and no races between
//! an upgrade, a crash and a stop.
//!
//! Three separate ideas live here:
//! - **listeners**: bound once, handed to every generation, never closed
//!   while baton runs;
//! - **generations**: one release of the app, with its lifecycle
//!   ([`GenState`]: Starting → Ready → Active → Draining → Exited, or
//!   Failed for a candidate that never became ready);
//! - **who gets traffic**: `active`, the generation restarted on crash and
//!   kept on upgrade failure. With shared sockets every generation that
//!   calls accept() gets connections; the active one is the only one that
//!   is not being drained.
//!
//! Every change is published as an [`Event`] on a broadcast channel, only
//! after it has happened; the control socket's streams, the logs and the
//! tests all read it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::config::{Config, ConfigSource, EnvInherit, ReadySpec, PROBE_FD_NAME};
use crate::listener::Listener;
use crate::notify::{NotifyMessage, NotifySocket, Received};
use crate::process::{self, Release, StderrTail};
use crate::protocol::{
    ErrorKind, ErrorReply, Event, EventKind, GenState, GenerationStatus, SocketStatus, Status,
    Trigger,
};
use crate::{probe, sys};

/// Finished generations kept for `status`; older ones are forgotten so
/// memory stays flat across any number of upgrades.
const FINISHED_KEPT: usize = 8;
/// Successful releases remembered for rollback.
const RELEASES_KEPT: usize = 16;
/// How long a failure report waits for a dead candidate's last stderr lines.
const STDERR_GRACE: Duration = Duration::from_millis(200);
/// Events buffered for slow readers of the broadcast channel.
const EVENT_BUFFER: usize = 4096;

/// Requests to the supervisor task.
#[derive(Debug)]
pub enum Command {
    Status(oneshot::Sender<Status>),
    Upgrade {
        trigger: Trigger,
        rollback: bool,
        reply: oneshot::Sender<Result<u64, ErrorReply>>,
    },
    Stop(oneshot::Sender<()>),
}

/// A cheap, cloneable way to talk to a running supervisor.
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
}

impl Handle {
    /// A handle with no supervisor behind it: the commands arrive on the
    /// returned receiver. For driving the control server in tests.
    pub fn detached() -> (Self, mpsc::Receiver<Command>, broadcast::Sender<Event>) {
        let (commands, rx) = mpsc::channel(64);
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let handle = Self {
            commands,
            events: events.clone(),
        };
        (handle, rx, events)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    pub async fn status(&self) -> Option<Status> {
        self.ask(Command::Status).await
    }

    /// Starts an upgrade (or rollback); returns its id, the candidate's
    /// generation number. Subscribe first to see all of its events.
    pub async fn upgrade(&self, trigger: Trigger, rollback: bool) -> Result<u64, ErrorReply> {
        self.ask(|reply| Command::Upgrade {
            trigger,
            rollback,
            reply,
        })
        .await
        .unwrap_or_else(|| Err(stopping_error()))
    }

    pub async fn stop(&self) {
        let _ = self.ask(Command::Stop).await;
    }
}

fn stopping_error() -> ErrorReply {
    ErrorReply {
        kind: ErrorKind::Stopping,
        message: "the supervisor is stopping".into(),
    }
}

/// A readiness check in progress; resolves to how it passed or why not.
type ReadyCheck =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, String>> + Send>>;

/// Internal events from the tasks the supervisor started.
#[derive(Debug)]
enum Internal {
    Exited {
        gen: u64,
        pid: i32,
        status: String,
    },
    Probe {
        gen: u64,
        pid: i32,
        result: Result<String, String>,
    },
    ReadyTimeout {
        gen: u64,
        pid: i32,
    },
    DrainTimeout {
        gen: u64,
        pid: i32,
    },
    /// A candidate exited and its stderr has been read to the end.
    CandidateExited {
        gen: u64,
        reason: String,
    },
    RestartDue {
        gen: u64,
    },
    Notify(Received),
}

/// Capped exponential backoff for crash restarts; it starts over after a
/// process has stayed up for `stable`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    stable: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        let initial = Duration::from_millis(100).min(max);
        Self {
            initial,
            max,
            stable: Duration::from_secs(10),
            next: initial,
        }
    }

    /// Delay before restarting a process that ran for `uptime`.
    pub fn on_exit(&mut self, uptime: Duration) -> Duration {
        if uptime >= self.stable {
            self.next = self.initial;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

struct Running {
    pid: i32,
    started: Instant,
}

struct Generation {
    number: u64,
    release: Release,
    /// Settings in force when the generation was started.
    config: Arc<Config>,
    state: GenState,
    process: Option<Running>,
    restarts: u32,
    backoff: Backoff,
    status_text: Option<String>,
    last_exit: Option<String>,
    stderr: StderrTail,
    /// Our copy of the private probe listener, until ready.
    probe: Option<Listener>,
    /// Readiness, timeout and restart tasks of the current process.
    tasks: Vec<AbortHandle>,
    /// SIGKILL timer of a drain; outlives the leader while its group does.
    drain_timer: Option<AbortHandle>,
    /// The upgrade this generation's events belong to, and when it began.
    upgrade: Option<(u64, Instant)>,
    /// A candidate that failed: ends as `Failed`, not `Exited`.
    failed: bool,
    /// Process group of the last process, kept while any member may live
    /// (workers can outlive their leader).
    pgid: Option<i32>,
    /// When a draining group gets SIGKILL.
    drain_deadline: Option<Instant>,
    finished_at: Option<Instant>,
}

impl Generation {
    fn abort_tasks(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

struct Upgrade {
    id: u64,
    started: Instant,
    rollback: bool,
}

pub struct Supervisor {
    source: ConfigSource,
    config: Arc<Config>,
    listeners: Vec<Listener>,
    notify_path: std::path::PathBuf,
    /// baton's own environment at start, without protocol variables.
    base_env: Vec<(OsString, OsString)>,
    generations: BTreeMap<u64, Generation>,
    active: Option<u64>,
    next_gen: u64,
    upgrade: Option<Upgrade>,
    /// A SIGHUP arrived during an upgrade: run one more afterwards, so the
    /// newest deploy always wins.
    pending_signal_upgrade: bool,
    releases: Vec<Release>,
    stopping: bool,
    /// Why the first generation could not even be started.
    start_error: Option<String>,
    started: Instant,
    commands: mpsc::Receiver<Command>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    events: broadcast::Sender<Event>,
    handle: Handle,
    notify_task: AbortHandle,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl Supervisor {
    /// `listeners` are bound by the caller (so bind errors surface before
    /// anything starts); `notify` is the socket apps report to.
    pub fn new(
        source: ConfigSource,
        config: Config,
        listeners: Vec<Listener>,
        notify: NotifySocket,
    ) -> Self {
        let (cmd_tx, commands) = mpsc::channel(64);
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let handle = Handle {
            commands: cmd_tx,
            events: events.clone(),
        };
        let notify_path = notify.path().to_owned();
        let tx = internal_tx.clone();
        let notify_task = tokio::spawn(async move {
            loop {
                match notify.recv().await {
                    Ok(r) => {
                        if tx.send(Internal::Notify(r)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("notify socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
        .abort_handle();
        let base_env = own_env();
        Self {
            source,
            config: Arc::new(config),
            listeners,
            notify_path,
            base_env,
            generations: BTreeMap::new(),
            active: None,
            next_gen: 1,
            upgrade: None,
            pending_signal_upgrade: false,
            releases: Vec::new(),
            stopping: false,
            start_error: None,
            started: Instant::now(),
            commands,
            internal_tx,
            internal_rx,
            events,
            handle,
            notify_task,
        }
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Starts the first generation and runs until stopped (by a `stop`
    /// command or `shutdown` resolving) and every generation has exited.
    /// Errs only if the first generation's program could not be resolved.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), String> {
        self.start_first();
        tokio::pin!(shutdown);
        let mut shutdown_done = false;
        while !(self.stopping && self.all_exited() && !self.reap_leftover_groups()) {
            tokio::select! {
                // Commands and internal events are both cancel-safe mpsc
                // receives; shutdown is polled once.
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                Some(ev) = self.internal_rx.recv() => self.on_internal(ev),
                () = &mut shutdown, if !shutdown_done => {
                    shutdown_done = true;
                    self.stop();
                }
                // Stopping, leaders gone, but group members (workers) may
                // still finish: their exits are not ours to see, so look.
                () = tokio::time::sleep(Duration::from_millis(50)),
                    if self.stopping && self.all_exited() => {}
            }
        }
        self.kill_leftovers();
        self.notify_task.abort();
        tracing::info!("all generations exited; supervisor done");
        match self.start_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn all_exited(&self) -> bool {
        self.generations.values().all(|g| g.process.is_none())
    }

    /// Forgets process groups that have emptied, SIGKILLs those past their
    /// drain deadline; true while any remains.
    fn reap_leftover_groups(&mut self) -> bool {
        let now = Instant::now();
        let mut any = false;
        for g in self.generations.values_mut() {
            let Some(pgid) = g.pgid else { continue };
            if !our_group_alive(pgid) {
                g.pgid = None;
                continue;
            }
            if g.process.is_none() && g.drain_deadline.is_none_or(|d| now >= d) {
                tracing::warn!(
                    generation = g.number,
                    pgid,
                    "killing processes left in the generation's group"
                );
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            any = true;
        }
        any
    }

    fn emit(&self, gen: u64, kind: EventKind) {
        let upgrade = self.generations.get(&gen).and_then(|g| g.upgrade);
        self.emit_in(gen, upgrade, kind);
    }

    fn emit_in(&self, gen: u64, upgrade: Option<(u64, Instant)>, kind: EventKind) {
        log_event(gen, &kind);
        let _ = self.events.send(Event {
            time_us: now_us(),
            generation: gen,
            upgrade: upgrade.map(|u| u.0),
            elapsed_us: upgrade.map(|u| u.1.elapsed().as_micros() as u64),
            kind,
        });
    }

    // ----- commands -------------------------------------------------------

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Upgrade {
                trigger,
                rollback,
                reply,
            } => {
                let res = self.start_upgrade(trigger, rollback);
                if let Err(e) = &res {
                    tracing::warn!("upgrade refused: {}", e.message);
                }
                let _ = reply.send(res);
            }
            Command::Stop(reply) => {
                self.stop();
                let _ = reply.send(());
            }
        }
    }

    fn start_first(&mut self) {
        let n = self.next_gen;
        self.next_gen += 1;
        self.emit_in(
            n,
            None,
            EventKind::UpgradeRequested {
                trigger: Trigger::Start,
            },
        );
        let config = self.config.clone();
        match Release::resolve(
            &config.cwd,
            &config.command,
            self.child_path(&config).as_deref(),
        ) {
            Ok(release) => {
                self.insert_generation(n, release, config, None);
                self.active = Some(n);
                if let Err(e) = self.spawn_process(n) {
                    self.emit(n, EventKind::SpawnFailed { error: e.clone() });
                    self.schedule_restart(n, Duration::ZERO);
                }
            }
            Err(e) => {
                // Checked before binding (resolve_release), so only a race
                // (the program removed meanwhile) gets here.
                self.start_error = Some(e.to_string());
                self.stop();
            }
        }
    }

    fn start_upgrade(&mut self, trigger: Trigger, rollback: bool) -> Result<u64, ErrorReply> {
        if self.stopping {
            return Err(stopping_error());
        }
        if let Some(up) = &self.upgrade {
            if trigger == Trigger::Signal {
                self.pending_signal_upgrade = true;
            }
            return Err(ErrorReply {
                kind: ErrorKind::Busy,
                message: format!(
                    "an upgrade (to generation {}) is already in progress; try again when it ends",
                    up.id
                ),
            });
        }
        // Everything that can refuse the request happens before an id is
        // used, so a refused request leaves no trace but its error.
        let (config, release) = if rollback {
            let Some(prev) = self
                .releases
                .len()
                .checked_sub(2)
                .map(|i| self.releases[i].clone())
            else {
                return Err(ErrorReply {
                    kind: ErrorKind::NoPrevious,
                    message: "no previous successful release to roll back to".into(),
                });
            };
            (self.config.clone(), Ok(prev))
        } else {
            let config = self.source.load().map_err(|e| config_error(&e))?;
            let fixed = [
                ("listeners", config.listen != self.config.listen),
                ("backlog", config.backlog != self.config.backlog),
                ("control socket", config.control != self.config.control),
                (
                    "allowed control uids",
                    config.control_allow_uids != self.config.control_allow_uids,
                ),
            ];
            if let Some((what, _)) = fixed.iter().find(|(_, changed)| *changed) {
                return Err(ErrorReply {
                    kind: ErrorKind::Config,
                    message: format!(
                        "the configuration changes the {what}, which is fixed for baton's \
                         lifetime; restart baton to change it"
                    ),
                });
            }
            let config = Arc::new(config);
            let path = self.child_path(&config);
            let release = Release::resolve(&config.cwd, &config.command, path.as_deref());
            (config, release)
        };
        let id = self.next_gen;
        self.next_gen += 1;
        let started = Instant::now();
        self.upgrade = Some(Upgrade {
            id,
            started,
            rollback,
        });
        let trigger = if rollback { Trigger::Rollback } else { trigger };
        self.emit_in(
            id,
            Some((id, started)),
            EventKind::UpgradeRequested { trigger },
        );
        match release {
            Ok(release) => {
                self.insert_generation(id, release, config, Some((id, started)));
                if let Err(e) = self.spawn_process(id) {
                    self.emit(id, EventKind::SpawnFailed { error: e.clone() });
                    self.fail_upgrade(format!("cannot start generation {id}: {e}"));
                }
            }
            Err(e) => {
                let error = e.to_string();
                self.emit_in(
                    id,
                    Some((id, started)),
                    EventKind::SpawnFailed {
                        error: error.clone(),
                    },
                );
                self.finish_upgrade_failed(
                    id,
                    started,
                    format!("cannot start generation {id}: {error}"),
                    vec![],
                );
            }
        }
        Ok(id)
    }

    fn insert_generation(
        &mut self,
        n: u64,
        release: Release,
        config: Arc<Config>,
        upgrade: Option<(u64, Instant)>,
    ) {
        let backoff = Backoff::new(config.restart_backoff_max);
        self.generations.insert(
            n,
            Generation {
                number: n,
                release,
                config,
                state: GenState::Starting,
                process: None,
                restarts: 0,
                backoff,
                status_text: None,
                last_exit: None,
                stderr: StderrTail::default(),
                probe: None,
                tasks: Vec::new(),
                drain_timer: None,
                upgrade,
                failed: false,
                pgid: None,
                drain_deadline: None,
                finished_at: None,
            },
        );
    }

    fn stop(&mut self) {
        if self.stopping {
            return;
        }
        tracing::info!("stopping: draining every generation");
        self.stopping = true;
        if self.upgrade.is_some() {
            self.fail_upgrade("the supervisor is stopping".into());
        }
        let running: Vec<u64> = self
            .generations
            .values()
            .filter(|g| g.state != GenState::Draining)
            .map(|g| g.number)
            .collect();
        for n in running {
            self.begin_drain(n, None);
        }
    }

    // ----- internal events ------------------------------------------------

    fn on_internal(&mut self, ev: Internal) {
        match ev {
            Internal::Exited { gen, pid, status } => self.on_exited(gen, pid, status),
            Internal::Probe { gen, pid, result } => {
                if !self.is_current(gen, pid) {
                    return;
                }
                match result {
                    Ok(via) => self.on_ready(gen, via),
                    Err(reason) => self.on_not_ready(gen, reason),
                }
            }
            Internal::ReadyTimeout { gen, pid } => {
                if self.is_current(gen, pid) {
                    let t = self.generations[&gen].config.ready_timeout;
                    self.on_not_ready(
                        gen,
                        format!("not ready within {}", humantime::format_duration(t)),
                    );
                }
            }
            Internal::DrainTimeout { gen, pid } => self.on_drain_timeout(gen, pid),
            Internal::CandidateExited { gen, reason } => {
                if self.upgrade.as_ref().is_some_and(|u| u.id == gen) {
                    self.fail_upgrade(reason);
                }
            }
            Internal::RestartDue { gen } => self.on_restart_due(gen),
            Internal::Notify(r) => self.on_notify(r),
        }
    }

    /// True if `pid` is the generation's current process and it is still
    /// waiting to become ready.
    fn is_current(&self, gen: u64, pid: i32) -> bool {
        self.generations.get(&gen).is_some_and(|g| {
            g.state == GenState::Starting && g.process.as_ref().is_some_and(|p| p.pid == pid)
        })
    }

    fn on_ready(&mut self, n: u64, via: String) {
        let Some(gen) = self.generations.get_mut(&n) else {
            return;
        };
        gen.abort_tasks();
        gen.probe = None;
        gen.state = GenState::Ready;
        let pid = gen.process.as_ref().map_or(0, |p| p.pid);
        self.emit(n, EventKind::Ready { pid, via });

        let is_candidate = self.upgrade.as_ref().is_some_and(|u| u.id == n);
        if !is_candidate && self.active != Some(n) {
            return;
        }
        // Cutover: the new generation becomes active first, then every
        // older one is told to drain.
        let old = self.active.replace(n);
        if let Some(gen) = self.generations.get_mut(&n) {
            gen.state = GenState::Active;
        }
        self.emit(n, EventKind::Active { pid: Some(pid) });
        let release = self.generations[&n].release.clone();
        if is_candidate {
            let up = self.upgrade.take().expect("candidate implies upgrade");
            // Every other generation still in service: the old active one,
            // even if it is between crash restarts (then it just ends).
            let older: Vec<u64> = self
                .generations
                .values()
                .filter(|g| {
                    g.number != n
                        && matches!(
                            g.state,
                            GenState::Starting | GenState::Ready | GenState::Active
                        )
                })
                .map(|g| g.number)
                .collect();
            debug_assert!(old.is_none_or(|o| older.contains(&o)));
            for o in older {
                self.begin_drain(o, Some((up.id, up.started)));
            }
            if up.rollback {
                self.releases.pop();
            } else {
                self.remember_release(release);
            }
            self.config = self.generations[&n].config.clone();
            self.emit(n, EventKind::UpgradeSucceeded);
            self.after_upgrade();
        } else if self.releases.last() != Some(&release) {
            // First start (or a restart that never had a success).
            self.remember_release(release);
        }
    }

    fn remember_release(&mut self, release: Release) {
        // An upgrade to the same release is no new step to roll back from.
        if self.releases.last() == Some(&release) {
            return;
        }
        self.releases.push(release);
        if self.releases.len() > RELEASES_KEPT {
            self.releases.remove(0);
        }
    }

    fn after_upgrade(&mut self) {
        if std::mem::take(&mut self.pending_signal_upgrade) && !self.stopping {
            tracing::info!("running the upgrade requested by SIGHUP during the last one");
            if let Err(e) = self.start_upgrade(Trigger::Signal, false) {
                tracing::warn!("upgrade requested by SIGHUP refused: {}", e.message);
            }
        }
    }

    /// A generation failed its readiness check (probe or timeout).
    fn on_not_ready(&mut self, n: u64, reason: String) {
        if self.upgrade.as_ref().is_some_and(|u| u.id == n) {
            self.fail_upgrade(reason);
        } else if self.active == Some(n) {
            // The active generation (first start or restart) is not ready:
            // drain it; its exit restarts it with backoff.
            tracing::warn!(generation = n, "{reason}; draining it to restart");
            self.signal_drain(n);
        }
    }

    fn fail_upgrade(&mut self, reason: String) {
        let Some(up) = self.upgrade.take() else {
            return;
        };
        let tail = match self.generations.get_mut(&up.id) {
            Some(gen) => {
                gen.failed = true;
                gen.stderr.lines()
            }
            None => Vec::new(),
        };
        // Drained like any generation: it may already be serving clients.
        self.begin_drain(up.id, Some((up.id, up.started)));
        self.finish_upgrade_failed(up.id, up.started, reason, tail);
    }

    fn finish_upgrade_failed(
        &mut self,
        id: u64,
        started: Instant,
        reason: String,
        stderr_tail: Vec<String>,
    ) {
        self.upgrade = None;
        self.emit_in(
            id,
            Some((id, started)),
            EventKind::UpgradeFailed {
                reason,
                stderr_tail,
            },
        );
        self.after_upgrade();
    }

    /// Sends the drain signal and starts the drain timer. A generation with
    /// no process just ends.
    fn begin_drain(&mut self, n: u64, upgrade: Option<(u64, Instant)>) {
        let Some(gen) = self.generations.get_mut(&n) else {
            return;
        };
        if upgrade.is_some() {
            gen.upgrade = upgrade;
        }
        gen.abort_tasks();
        gen.probe = None;
        if gen.process.is_none() {
            gen.state = if gen.failed {
                GenState::Failed
            } else {
                GenState::Exited
            };
            gen.finished_at.get_or_insert_with(Instant::now);
            return;
        }
        gen.state = GenState::Draining;
        self.signal_drain(n);
    }

    fn signal_drain(&mut self, n: u64) {
        let Some(pid) = self
            .generations
            .get(&n)
            .and_then(|g| g.process.as_ref())
            .map(|p| p.pid)
        else {
            return;
        };
        let signal = self.drain_group(n, pid);
        self.emit(
            n,
            EventKind::Draining {
                pid,
                signal: signal.as_str().to_owned(),
            },
        );
    }

    /// Sends the drain signal to process group `pgid` of generation `n` and
    /// arms the SIGKILL timer.
    fn drain_group(&mut self, n: u64, pgid: i32) -> Signal {
        let Some(gen) = self.generations.get_mut(&n) else {
            return Signal::SIGTERM;
        };
        let signal = gen.config.drain_signal.0;
        let timeout = gen.config.drain_timeout;
        gen.drain_deadline = Some(Instant::now() + timeout);
        if let Err(e) = killpg(Pid::from_raw(pgid), signal) {
            tracing::warn!(generation = n, pgid, "sending {signal} failed: {e}");
        }
        let tx = self.internal_tx.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ = tx.send(Internal::DrainTimeout { gen: n, pid: pgid });
        });
        if let Some(old) = gen.drain_timer.replace(timer.abort_handle()) {
            old.abort();
        }
        signal
    }

    fn on_drain_timeout(&mut self, n: u64, pid: i32) {
        let alive = self
            .generations
            .get(&n)
            .is_some_and(|g| g.process.as_ref().is_some_and(|p| p.pid == pid));
        if alive {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            self.emit(n, EventKind::Killed { pid });
        } else if self
            .generations
            .get(&n)
            .is_some_and(|g| g.pgid == Some(pid))
            && our_group_alive(pid)
        {
            // The leader left, but workers in its group outstayed the drain.
            tracing::warn!(
                generation = n,
                pgid = pid,
                "drain timeout: killing processes left in the group"
            );
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    fn on_exited(&mut self, n: u64, pid: i32, status: String) {
        let Some(gen) = self.generations.get_mut(&n) else {
            return;
        };
        let Some(p) = gen.process.take_if(|p| p.pid == pid) else {
            return;
        };
        let uptime = p.started.elapsed();
        gen.last_exit = Some(status.clone());
        gen.probe = None;
        gen.abort_tasks();
        let state = gen.state;
        // Workers may outlive their leader. Unless a drain already covers
        // them, they are drained like any generation: signal, timeout, kill.
        if !our_group_alive(pid) {
            gen.pgid = None;
            if let Some(t) = gen.drain_timer.take() {
                t.abort();
            }
        } else if state != GenState::Draining {
            tracing::warn!(
                generation = n,
                pgid = pid,
                "main process gone; draining the rest of its group"
            );
            self.drain_group(n, pid);
        }
        self.emit(
            n,
            EventKind::Exited {
                pid,
                status: status.clone(),
            },
        );

        let is_candidate = self.upgrade.as_ref().is_some_and(|u| u.id == n);
        let gen = self.generations.get_mut(&n).expect("checked above");
        if is_candidate {
            gen.state = GenState::Failed;
            gen.failed = true;
            gen.finished_at = Some(Instant::now());
            // Report once its last stderr lines are in (a bounded wait); the
            // process is gone, so nothing can promote it meanwhile.
            let tail = gen.stderr.clone();
            let tx = self.internal_tx.clone();
            let reason = format!("generation {n} exited before it was ready ({status})");
            tokio::spawn(async move {
                tail.closed(STDERR_GRACE).await;
                let _ = tx.send(Internal::CandidateExited { gen: n, reason });
            });
        } else if self.active == Some(n) && !self.stopping {
            gen.state = GenState::Starting;
            let delay = gen.backoff.on_exit(uptime);
            tracing::warn!(generation = n, pid, "active generation died ({status})");
            self.schedule_restart(n, delay);
        } else {
            gen.state = if gen.failed || state == GenState::Starting && self.active != Some(n) {
                GenState::Failed
            } else {
                GenState::Exited
            };
            gen.finished_at = Some(Instant::now());
        }
        self.prune();
    }

    fn schedule_restart(&mut self, n: u64, delay: Duration) {
        let Some(gen) = self.generations.get_mut(&n) else {
            return;
        };
        gen.restarts += 1;
        let restarts = gen.restarts;
        let tx = self.internal_tx.clone();
        let t = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Internal::RestartDue { gen: n });
        });
        gen.tasks.push(t.abort_handle());
        self.emit(
            n,
            EventKind::Restarting {
                delay_ms: delay.as_millis() as u64,
                restarts,
            },
        );
    }

    fn on_restart_due(&mut self, n: u64) {
        let eligible = self.active == Some(n)
            && !self.stopping
            && self
                .generations
                .get(&n)
                .is_some_and(|g| g.process.is_none());
        if !eligible {
            return;
        }
        if let Err(e) = self.spawn_process(n) {
            self.emit(n, EventKind::SpawnFailed { error: e });
            let gen = self.generations.get_mut(&n).expect("eligible");
            let delay = gen.backoff.on_exit(Duration::ZERO);
            self.schedule_restart(n, delay);
        }
    }

    fn on_notify(&mut self, r: Received) {
        let Some(n) = self.generation_of(r.pid, r.pgid) else {
            tracing::debug!(
                pid = r.pid,
                "ignoring notify message from a process outside every generation"
            );
            return;
        };
        for msg in r.messages {
            match msg {
                NotifyMessage::Ready => {
                    let g = &self.generations[&n];
                    let waiting =
                        g.state == GenState::Starting && g.config.ready == ReadySpec::Notify;
                    if waiting && g.process.is_some() {
                        self.on_ready(n, format!("notify READY=1 from pid {}", r.pid));
                    }
                }
                NotifyMessage::Status(text) => {
                    if let Some(g) = self.generations.get_mut(&n) {
                        g.status_text = Some(text.clone());
                    }
                    self.emit(n, EventKind::Status { text });
                }
                NotifyMessage::Stopping => self.emit(n, EventKind::Stopping { pid: r.pid }),
                NotifyMessage::Reloading | NotifyMessage::MainPid(_) => {}
            }
        }
    }

    /// The generation a sender belongs to: its main process, or any
    /// process in its process group (`pgid`, looked up on arrival).
    fn generation_of(&self, pid: i32, pgid: Option<i32>) -> Option<u64> {
        self.generations.values().find_map(|g| {
            let leader = g.process.as_ref()?.pid;
            (leader == pid || Some(leader) == pgid).then_some(g.number)
        })
    }

    fn prune(&mut self) {
        let mut finished: Vec<(Instant, u64)> = self
            .generations
            .values()
            // A generation whose group may still live is never forgotten:
            // its drain timer and the stop path must still find it.
            .filter(|g| g.process.is_none() && g.pgid.is_none())
            .filter_map(|g| Some((g.finished_at?, g.number)))
            .collect();
        if finished.len() > FINISHED_KEPT {
            finished.sort();
            for (_, n) in &finished[..finished.len() - FINISHED_KEPT] {
                self.generations.remove(n);
            }
        }
    }

    /// Safety net on the way out: nothing of ours outlives baton.
    fn kill_leftovers(&mut self) {
        for g in self.generations.values_mut() {
            g.abort_tasks();
            if let Some(t) = g.drain_timer.take() {
                t.abort();
            }
            if let Some(pgid) = g.pgid.filter(|p| our_group_alive(*p)) {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        }
    }

    // ----- spawning -------------------------------------------------------

    fn child_path(&self, config: &Config) -> Option<OsString> {
        app_path(config, &self.base_env)
    }

    fn inherited_env(&self, config: &Config) -> Vec<(OsString, OsString)> {
        inherited_env(config, &self.base_env)
    }

    fn spawn_process(&mut self, n: u64) -> Result<(), String> {
        let gen = self.generations.get(&n).ok_or("unknown generation")?;
        let config = gen.config.clone();
        let probe = if config.ready.needs_probe_listener() {
            Some(
                Listener::bind_probe(PROBE_FD_NAME)
                    .map_err(|e| format!("binding the probe listener: {e}"))?,
            )
        } else {
            None
        };
        let mut fds: Vec<BorrowedFd<'_>> = self.listeners.iter().map(|l| l.as_fd()).collect();
        let mut names: Vec<&str> = self.listeners.iter().map(|l| l.name.as_str()).collect();
        if let Some(p) = &probe {
            fds.push(p.as_fd());
            names.push(PROBE_FD_NAME);
        }
        let mut env = self.inherited_env(&config);
        env.retain(|(k, _)| !config.env.contains_key(&*k.to_string_lossy()));
        env.extend(config.env.iter().map(|(k, v)| (k.into(), v.into())));
        if !fds.is_empty() {
            env.push(("LISTEN_FDS".into(), fds.len().to_string().into()));
            env.push(("LISTEN_FDNAMES".into(), names.join(":").into()));
        }
        env.push(("NOTIFY_SOCKET".into(), self.notify_path.clone().into()));
        env.push(("BATON_GENERATION".into(), n.to_string().into()));

        // Everything that can fail happens before the fork: once the
        // process exists it must be tracked, or it would run unsupervised.
        let credentials = resolve_credentials(&config)?;
        let probe_addr = match probe.as_ref().map(|p| &p.address) {
            Some(crate::config::ListenAddr::Tcp(a)) => Some(*a),
            Some(crate::config::ListenAddr::Unix(_)) => {
                return Err("probe listener has no address".into())
            }
            None => None,
        };
        let probe_fd = match (&config.ready, &probe) {
            (ReadySpec::Tcp, Some(p)) => Some(
                p.as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| format!("copying the probe listener: {e}"))?,
            ),
            _ => None,
        };
        let tx = self.internal_tx.clone();
        let spec = process::SpawnSpec {
            release: &gen.release,
            env,
            fds,
            fd_names: names,
            parent_death_signal: Some(config.drain_signal.0 as i32),
            credentials: credentials.as_ref(),
        };
        let proc = process::spawn(spec, move |pid, status| {
            let _ = tx.send(Internal::Exited {
                gen: n,
                pid,
                status,
            });
        })
        .map_err(|e| error_chain(&*e))?;
        let pid = proc.pid;

        let tx = self.internal_tx.clone();
        let check: Option<ReadyCheck> = match (&config.ready, probe_addr, probe_fd) {
            (ReadySpec::Http(path), Some(addr), _) => {
                let path = path.clone();
                Some(Box::pin(async move { probe::http(addr, &path).await }))
            }
            (ReadySpec::Tcp, Some(addr), Some(fd)) => {
                Some(Box::pin(async move { probe::tcp(addr, fd.as_fd()).await }))
            }
            (ReadySpec::Exec(cmd), addr, _) => {
                let cmd = cmd.clone();
                let mut penv = vec![
                    ("BATON_GENERATION".to_owned(), n.to_string()),
                    ("BATON_PID".to_owned(), pid.to_string()),
                ];
                if let Some(a) = addr {
                    penv.push(("BATON_PROBE_ADDR".to_owned(), a.to_string()));
                }
                Some(Box::pin(async move { probe::exec(&cmd, &penv).await }))
            }
            (ReadySpec::Delay(d), _, _) => {
                let d = *d;
                Some(Box::pin(async move {
                    tokio::time::sleep(d).await;
                    Ok(format!("delay {}", humantime::format_duration(d)))
                }))
            }
            // notify: READY=1 arrives on the notify socket.
            _ => None,
        };
        let mut tasks = Vec::new();
        if let Some(check) = check {
            let tx = tx.clone();
            tasks.push(
                tokio::spawn(async move {
                    let result = check.await;
                    let _ = tx.send(Internal::Probe {
                        gen: n,
                        pid,
                        result,
                    });
                })
                .abort_handle(),
            );
        }
        let timeout = config.ready_timeout;
        tasks.push(
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                let _ = tx.send(Internal::ReadyTimeout { gen: n, pid });
            })
            .abort_handle(),
        );

        let gen = self.generations.get_mut(&n).expect("checked above");
        gen.process = Some(Running {
            pid,
            started: Instant::now(),
        });
        gen.state = GenState::Starting;
        gen.stderr = proc.stderr;
        gen.pgid = Some(pid);
        gen.drain_deadline = None;
        gen.probe = probe;
        gen.tasks.extend(tasks);
        gen.status_text = None;
        let dir = gen.release.dir.display().to_string();
        self.emit(n, EventKind::Spawned { pid, dir });
        Ok(())
    }

    // ----- status ---------------------------------------------------------

    fn status(&self) -> Status {
        let groups = process_groups();
        Status {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            stopping: self.stopping,
            sockets: self
                .listeners
                .iter()
                .enumerate()
                .map(|(i, l)| SocketStatus {
                    name: l.name.clone(),
                    address: l.address.to_string(),
                    fd: 3 + i as u32,
                })
                .collect(),
            active: self.active,
            upgrading: self.upgrade.as_ref().map(|u| u.id),
            generations: self
                .generations
                .values()
                .map(|g| {
                    let pid = g.process.as_ref().map(|p| p.pid);
                    GenerationStatus {
                        number: g.number,
                        state: g.state,
                        pid,
                        pids: g
                            .pgid
                            .map(|pgid| {
                                groups
                                    .iter()
                                    .filter(|p| p.pgrp == pgid && p.state != 'Z')
                                    .map(|p| p.pid)
                                    .collect()
                            })
                            .unwrap_or_default(),
                        dir: g.release.dir.display().to_string(),
                        command: g.release.argv.clone(),
                        uptime_ms: g
                            .process
                            .as_ref()
                            .map(|p| p.started.elapsed().as_millis() as u64),
                        status_text: g.status_text.clone(),
                        restarts: g.restarts,
                        last_exit: g.last_exit.clone(),
                    }
                })
                .collect(),
        }
    }
}

/// baton's own environment, without the protocol variables.
fn own_env() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        // The protocol variables are baton's to set, and BATON_CONTROL
        // names this supervisor, not anything the app should reach.
        .filter(|(k, _)| {
            k != "BATON_CONTROL" && !crate::config::PROTOCOL_ENV.iter().any(|p| k == *p)
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
fn app_path(config: &Config, base_env: &[(OsString, OsString)]) -> Option<OsString> {
    if let Some(p) = config.env.get("PATH") {
        return Some(p.into());
    }
    inherited_env(config, base_env)
        .into_iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v)
}

/// Resolves the configured release exactly as the first spawn will, so a
/// bad command is reported before anything is bound or started.
pub fn resolve_release(config: &Config) -> Result<Release, crate::process::ResolveError> {
    Release::resolve(
        &config.cwd,
        &config.command,
        app_path(config, &own_env()).as_deref(),
    )
}

fn config_error(e: &crate::config::ConfigError) -> ErrorReply {
    ErrorReply {
        kind: ErrorKind::Config,
        message: error_chain(e),
    }
}

/// "outer: inner: innermost", for one-line reports.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}

fn resolve_credentials(config: &Config) -> Result<Option<sys::Credentials>, String> {
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
    Ok(Some(sys::Credentials {
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

/// Whether process group `pgid` still has a live member in baton's
/// session.
///
/// A group id is a pid: once every member has gone, the number can be
/// reused by an unrelated process that makes itself a group leader.
/// Requiring a member in our own session (generations stay in it unless
/// they call setsid themselves) keeps a late SIGKILL off such a stranger.
fn our_group_alive(pgid: i32) -> bool {
    let Ok(sid) = nix::unistd::getsid(None) else {
        return false;
    };
    process_groups()
        .iter()
        .any(|p| p.pgrp == pgid && p.sid == sid.as_raw() && p.state != 'Z')
}

struct ProcEntry {
    pid: i32,
    state: char,
    pgrp: i32,
    sid: i32,
}

/// Every process we can see in /proc, with its group and session.
fn process_groups() -> Vec<ProcEntry> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the parenthesised command: state ppid pgrp session ...
        let mut f = stat[stat.rfind(')')? + 2..].split(' ');
        let state = f.next()?.chars().next()?;
        let pgrp = f.nth(1)?.parse().ok()?;
        let sid = f.next()?.parse().ok()?;
        Some(ProcEntry {
            pid,
            state,
            pgrp,
            sid,
        })
    })
    .collect()
}

fn log_event(gen: u64, kind: &EventKind) {
    use tracing::{info, warn};
    match kind {
        EventKind::UpgradeRequested { trigger } => {
            info!(generation = gen, ?trigger, "generation requested")
        }
        EventKind::Spawned { pid, dir } => info!(generation = gen, pid, dir, "generation started"),
        EventKind::SpawnFailed { error } => {
            warn!(generation = gen, "generation failed to start: {error}")
        }
        EventKind::Ready { pid, via } => info!(generation = gen, pid, via, "generation ready"),
        EventKind::Active { pid } => info!(generation = gen, pid, "generation active"),
        EventKind::Draining { pid, signal } => {
            info!(generation = gen, pid, signal, "generation draining")
        }
        EventKind::Killed { pid } => {
            warn!(generation = gen, pid, "drain timeout: generation killed")
        }
        EventKind::Exited { pid, status } => {
            info!(generation = gen, pid, status, "generation exited")
        }
        EventKind::Restarting { delay_ms, restarts } => {
            warn!(
                generation = gen,
                delay_ms, restarts, "restarting generation"
            )
        }
        EventKind::Status { text } => info!(generation = gen, status = text, "generation status"),
        EventKind::Stopping { pid } => {
            info!(generation = gen, pid, "generation reports STOPPING=1")
        }
        EventKind::UpgradeSucceeded => info!(generation = gen, "upgrade succeeded"),
        EventKind::UpgradeFailed { reason, .. } => {
            warn!(generation = gen, "upgrade failed: {reason}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, Overrides};

    /// A supervisor over a shell "app" (no sockets needed), driven through
    /// its handle; returns the handle and an event receiver.
    fn supervisor(
        script: &str,
        dir: &std::path::Path,
    ) -> (
        Handle,
        broadcast::Receiver<Event>,
        tokio::task::JoinHandle<()>,
    ) {
        let app = dir.join("app.sh");
        std::fs::write(&app, format!("#!/bin/sh\n{script}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&app, std::fs::Permissions::from_mode(0o755)).unwrap();
        let source = ConfigSource {
            file: None,
            overrides: Overrides {
                command: vec!["./app.sh".into()],
                ready: Some(ReadySpec::Delay(Duration::from_millis(5))),
                drain_timeout: Some(Duration::from_secs(5)),
                control: Some(dir.join("unused.sock")),
                ..Default::default()
            },
            base_dir: dir.to_owned(),
        };
        let config = Config::merge(FileConfig::default(), &source.overrides, dir).unwrap();
        let notify = NotifySocket::bind(&dir.join("notify.sock")).unwrap();
        let sup = Supervisor::new(source, config, Vec::new(), notify);
        let handle = sup.handle();
        let events = handle.subscribe();
        let task = tokio::spawn(async move { sup.run(std::future::pending()).await.unwrap() });
        (handle, events, task)
    }

    const SERVE: &str = "trap 'exit 0' TERM\nwhile :; do sleep 0.02; done 2>/dev/null";

    /// Collects events until `stop` matches one (bounded in time).
    async fn until(
        events: &mut broadcast::Receiver<Event>,
        stop: impl Fn(&Event) -> bool,
    ) -> Vec<Event> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ev = tokio::time::timeout_at(deadline, events.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out; events so far: {seen:#?}"))
                .unwrap();
            let done = stop(&ev);
            seen.push(ev);
            if done {
                return seen;
            }
        }
    }

    fn names(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| {
                let v = serde_json::to_value(&e.kind).unwrap();
                format!("{}:{}", e.generation, v["event"].as_str().unwrap())
            })
            .collect()
    }

    #[tokio::test]
    async fn upgrade_phases_are_published_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, mut events, task) = supervisor(SERVE, dir.path());
        until(&mut events, |e| matches!(e.kind, EventKind::Active { .. })).await;
        assert_eq!(handle.upgrade(Trigger::Control, false).await, Ok(2));
        let seen = until(&mut events, |e| {
            e.generation == 1 && matches!(e.kind, EventKind::Exited { .. })
        })
        .await;
        assert_eq!(
            names(&seen),
            [
                "2:upgrade_requested",
                "2:spawned",
                "2:ready",
                "2:active",
                "1:draining",
                "2:upgrade_succeeded",
                "1:exited"
            ]
        );
        assert!(seen.iter().all(|e| e.upgrade == Some(2)), "{seen:#?}");
        let status = handle.status().await.unwrap();
        assert_eq!(status.active, Some(2));
        assert_eq!(
            status
                .generations
                .iter()
                .find(|g| g.number == 1)
                .unwrap()
                .state,
            GenState::Exited
        );
        handle.stop().await;
        task.await.unwrap();
    }

    #[tokio::test]
    async fn same_release_twice_is_not_a_rollback_target() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, mut events, task) = supervisor(SERVE, dir.path());
        until(&mut events, |e| matches!(e.kind, EventKind::Active { .. })).await;
        handle.upgrade(Trigger::Control, false).await.unwrap();
        until(&mut events, |e| {
            matches!(e.kind, EventKind::UpgradeSucceeded)
        })
        .await;
        let err = handle.upgrade(Trigger::Control, true).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::NoPrevious);
        handle.stop().await;
        task.await.unwrap();
    }

    #[tokio::test]
    async fn busy_and_stopping_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let (handle, mut events, task) = supervisor(SERVE, dir.path());
        until(&mut events, |e| matches!(e.kind, EventKind::Active { .. })).await;
        // Two requests back to back: the second finds the first running.
        let first = handle.upgrade(Trigger::Control, false).await;
        let second = handle.upgrade(Trigger::Control, false).await;
        assert_eq!(first, Ok(2));
        assert_eq!(second.unwrap_err().kind, ErrorKind::Busy);
        handle.stop().await;
        let err = handle.upgrade(Trigger::Control, false).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Stopping);
        task.await.unwrap();
    }

    #[tokio::test]
    async fn cutover_ends_a_generation_waiting_to_restart() {
        let dir = tempfile::tempdir().unwrap();
        // Crashes at once while no "fixed" file exists.
        let script = format!("[ -e fixed ] || exit 3\n{SERVE}");
        let (handle, mut events, task) = supervisor(&script, dir.path());
        until(&mut events, |e| {
            matches!(e.kind, EventKind::Restarting { restarts: 2, .. })
        })
        .await;
        std::fs::write(dir.path().join("fixed"), "").unwrap();
        let id = handle.upgrade(Trigger::Control, false).await.unwrap();
        until(&mut events, |e| {
            e.generation == id && matches!(e.kind, EventKind::UpgradeSucceeded)
        })
        .await;
        let s = handle.status().await.unwrap();
        let g1 = s.generations.iter().find(|g| g.number == 1).unwrap();
        assert_eq!(g1.state, GenState::Exited, "{s:#?}");
        assert_eq!(s.active, Some(id));
        handle.stop().await;
        task.await.unwrap();
    }

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let quick = Duration::from_millis(5);
        let delays: Vec<_> = (0..6).map(|_| b.on_exit(quick).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.on_exit(Duration::from_secs(11)).as_millis(), 100);
    }
}
