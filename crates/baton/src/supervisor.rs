//! The shell around [`baton_core::Machine`]: one task that feeds it inputs
//! (commands, process exits, readiness results, notify messages, the
//! passing of time) and performs the effects it returns (spawn, signal,
//! probe, reply, publish). Every decision is the machine's; this file only
//! does I/O, and nothing here blocks: forks happen on the main thread,
//! configuration is loaded and /proc scanned on blocking tasks, logs go
//! through a non-blocking writer.
//!
//! Events are published on a broadcast channel once true; the control
//! socket's streams, the logs and the tests all read it.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton_core::{
    Command as CoreCommand, Effect, GenId, Input, Machine, Note, Pid, Refusal, Reply as CoreReply,
    Report, RequestId, Signal, Spec, Time, TrafficMode, TrafficPlan, UpgradeOptions,
};
use nix::sys::signal::killpg;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::config::{Config, ConfigSource, ReadySpec};
use crate::listener::Listener;
use crate::metrics::{Asked, Metrics};
use crate::notify::{NotifyMessage, NotifySocket, Received};
use crate::probe::{self, Source};
use crate::process::{self, PidFd, ProcessEvent, SpawnJob, Spawner, StderrSink, StderrTail};
use crate::protocol::{
    Binary, ErrorKind, ErrorReply, Event, EventKind, HandingOver, SocketStatus, Status, Trigger,
};
use crate::steer::Sockets;
use crate::systemd::{Observed, Reporter, ServiceManager, Upgrading};
use crate::wire;

#[path = "supervisor_handover.rs"]
mod handover_impl;

/// How long a retired generation's sockets are watched before the first
/// look at their queues: handshakes that were in flight when it lost its
/// traffic complete into its queue, and it should accept them too.
const RETIRE_SETTLE: Duration = Duration::from_millis(100);
/// After a listener hung up (an app's `shutdown()`, see [`crate::hup`]):
/// how soon the sockets are looked at again while a replacement fails, or
/// how often at all if the hang-up watch cannot be set up.
const RECOVER_INTERVAL: Duration = Duration::from_millis(100);

/// Events buffered for slow readers of the broadcast channel.
const EVENT_BUFFER: usize = 4096;

/// Requests to the supervisor task.
#[derive(Debug)]
pub enum Command {
    Status(oneshot::Sender<Status>),
    Upgrade {
        trigger: Trigger,
        ask: Ask,
        reply: oneshot::Sender<Result<Started, ErrorReply>>,
    },
    Stop(oneshot::Sender<()>),
    /// Re-execute baton's binary in place (`baton upgrade --self`).
    UpgradeSelf(oneshot::Sender<Result<HandingOver, ErrorReply>>),
}

/// What an upgrade request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// A new generation from the configuration on disk.
    Upgrade(UpgradeOptions),
    /// Back: to the parked generation during a bake (or off a canary), else
    /// to the previous release.
    Rollback,
    /// A canary to all traffic, or a bake ended now.
    Promote,
}

/// A request that was taken: the upgrade it concerns, and what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    /// The upgrade's number (its candidate generation's).
    pub id: u64,
    pub how: How,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// A new generation is starting.
    Upgrading,
    /// The traffic went back at once.
    RolledBack,
    /// The candidate is cut over, or the bake ended.
    Promoting,
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

    /// The supervisor's state, with the live members of each generation's
    /// process groups, one per worker (read from /proc here, off the
    /// decision loop).
    pub async fn status(&self) -> Option<Status> {
        let mut status = self.ask(Command::Status).await?;
        let groups: Vec<(usize, Vec<i32>)> = status
            .generations
            .iter()
            .enumerate()
            .map(|(i, g)| (i, g.workers.iter().filter_map(|w| w.pid).collect()))
            .collect();
        let members = tokio::task::spawn_blocking(move || {
            groups
                .into_iter()
                .map(|(i, pgids)| {
                    let pids = pgids
                        .into_iter()
                        .flat_map(|pgid| process::group_members(Pid(pgid)))
                        .collect::<Vec<_>>();
                    (i, pids)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for (i, mut pids) in members {
            pids.sort_unstable();
            status.generations[i].pids = pids;
        }
        Some(status)
    }

    /// Starts an upgrade, a rollback or a promote. Subscribe first to see
    /// all of its events.
    pub async fn upgrade(&self, trigger: Trigger, ask: Ask) -> Result<Started, ErrorReply> {
        self.ask(|reply| Command::Upgrade {
            trigger,
            ask,
            reply,
        })
        .await
        .unwrap_or_else(|| Err(stopping_error()))
    }

    pub async fn stop(&self) {
        let _ = self.ask(Command::Stop).await;
    }

    /// Checks baton's binary and, if it passes, re-executes it in place;
    /// the reply comes just before the exec.
    pub async fn upgrade_self(&self) -> Result<HandingOver, ErrorReply> {
        self.ask(Command::UpgradeSelf)
            .await
            .unwrap_or_else(|| Err(stopping_error()))
    }
}

fn stopping_error() -> ErrorReply {
    ErrorReply {
        kind: ErrorKind::Stopping,
        message: "the supervisor is stopping".into(),
    }
}

/// What the loop hears from the tasks it started.
#[derive(Debug)]
enum Internal {
    Probe {
        gen: GenId,
        pid: Pid,
        result: Result<String, String>,
    },
    Health {
        gen: GenId,
        pid: Pid,
        result: Result<String, String>,
    },
    Notify(Received),
    /// A configuration loaded for an upgrade (or why it could not be).
    Prepared {
        trigger: Trigger,
        options: UpgradeOptions,
        spec: Result<Result<Spec<Arc<Config>>, String>, ErrorReply>,
        reply: Option<oneshot::Sender<Result<Started, ErrorReply>>>,
    },
    QueueEmpty {
        gen: GenId,
    },
    /// A worker of a ready candidate has its group's CPU priority back (or
    /// not, why).
    PriorityRestored {
        gen: GenId,
        worker: u32,
        pid: Pid,
        result: Result<process::Restored, String>,
    },
    /// The new binary's check of the hand-over document is done.
    SelfChecked {
        exe: PathBuf,
        result: Result<(), String>,
        reply: oneshot::Sender<Result<HandingOver, ErrorReply>>,
    },
    /// The control server is quiet: hand over to `exe` now.
    ExecSelf {
        exe: PathBuf,
    },
}

/// How the reply to a request gets back to its asker.
enum ReplyTo {
    Upgrade(Option<oneshot::Sender<Result<Started, ErrorReply>>>),
    Stop(oneshot::Sender<()>),
}

/// A process the machine answers for, as the shell holds it.
struct ProcHandle {
    gen: GenId,
    /// Which of its generation's workers it is.
    worker: u32,
    /// Keeps the exited leader unreaped until released, so `killpg` on its
    /// id can never reach a stranger.
    pidfd: PidFd,
    exit_reported: bool,
    watcher: AbortHandle,
    /// A copy of the read end of its stderr pipe while it is open, for a
    /// hand-over to a new baton image.
    stderr: Option<OwnedFd>,
}

/// What upgrades need to load a configuration, off the decision loop.
struct Prep {
    source: ConfigSource,
    /// The configuration baton started with: its fixed settings hold for
    /// baton's lifetime.
    initial: Arc<Config>,
    base_env: Arc<Vec<(OsString, OsString)>>,
}

impl Prep {
    /// Loads the configuration and resolves the release it names. The
    /// outer error refuses the upgrade (a bad configuration); the inner one
    /// is a release that cannot be resolved, which fails it.
    fn spec(&self) -> Result<Result<Spec<Arc<Config>>, String>, ErrorReply> {
        let config_error = |message: String| ErrorReply {
            kind: ErrorKind::Config,
            message,
        };
        let config = self
            .source
            .load()
            .map_err(|e| config_error(crate::error_chain(&e)))?;
        if let Some(what) = self.initial.fixed_change(&config) {
            return Err(config_error(format!(
                "the configuration changes the {what}, which is fixed for baton's \
                 lifetime; restart baton to change it"
            )));
        }
        let settings = config.settings();
        Ok(process::resolve_config(&config, &self.base_env)
            .map(|release| Spec {
                release,
                settings,
                payload: Arc::new(config),
            })
            .map_err(|e| e.to_string()))
    }
}

pub struct Supervisor {
    machine: Machine<Arc<Config>>,
    epoch: Instant,
    prep: Arc<Prep>,
    /// The listening sockets and the traffic plan applied to them.
    sockets: Sockets,
    /// Stop closed the sockets.
    closed: bool,
    /// Where probes and health checks connect from.
    probe_source: Source,
    notify_path: PathBuf,
    stderr_sink: StderrSink,
    spawner: Spawner,
    procs: HashMap<Pid, ProcHandle>,
    /// The stderr of each worker's latest process, for failure reports.
    tails: BTreeMap<(GenId, u32), StderrTail>,
    /// Each generation's private probe listener (shared sockets and an
    /// `http` or `tcp` check): every worker gets it, so all hold the same
    /// fds, and only that generation's processes can answer on it. Kept
    /// while the generation runs, for workers restarted later.
    probe_listeners: HashMap<GenId, Listener>,
    probes: HashMap<GenId, AbortHandle>,
    health: HashMap<GenId, AbortHandle>,
    queue_watches: HashMap<GenId, AbortHandle>,
    replies: HashMap<RequestId, ReplyTo>,
    next_request: u64,
    /// Readiness reports held back until the exit of their process, which
    /// happened first, has been fed in.
    deferred: Vec<Input<Arc<Config>>>,
    /// Spawns sent to the spawner and not answered yet.
    spawning: usize,
    /// Priority restores ([`Effect::RestorePriority`]) under way on
    /// blocking tasks: their answers are fed in; a hand-over waits for them.
    restoring: usize,
    commands: mpsc::Receiver<Command>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    process_rx: mpsc::UnboundedReceiver<ProcessEvent>,
    process_tx: mpsc::UnboundedSender<ProcessEvent>,
    events: broadcast::Sender<Event>,
    handle: Handle,
    notify_task: AbortHandle,
    metrics: Metrics,
    /// Upgrade requests whose configuration is being loaded.
    preparing: usize,
    /// baton's own service manager (systemd), when it has one.
    systemd: Option<SystemdLink>,
    /// How baton was started, to find (and re-execute) its binary.
    argv0: PathBuf,
    /// The binary this image runs.
    binary: Binary,
    /// Self-upgrades so far.
    handovers: u64,
    /// Why the last accepted self-upgrade failed, if it did.
    self_upgrade_error: Option<String>,
    /// A new binary is checking the hand-over document.
    self_checking: bool,
    /// What only a hand-over needs: copies of the descriptors other tasks
    /// own (the control, notify and metrics sockets).
    handover_fds: Option<HandoverFds>,
    /// Taken over from a previous image: the generations already run.
    resumed: bool,
    /// Pauses the control server, and tells when its connections are done.
    control_pause: Option<(
        tokio::sync::watch::Sender<bool>,
        crate::control::Connections,
    )>,
}

/// Copies of descriptors owned by tasks, for a hand-over.
pub struct HandoverFds {
    pub control: OwnedFd,
    pub notify: OwnedFd,
    pub notify_dir: PathBuf,
    pub metrics: Option<OwnedFd>,
}

/// What baton tells its own service manager, and what it told it.
struct SystemdLink {
    manager: ServiceManager,
    reporter: Reporter,
    /// The last upgrade's outcome, in words, for `STATUS=`.
    last_outcome: Option<String>,
}

impl Supervisor {
    /// `listeners` are bound by the caller (so bind errors surface before
    /// anything starts); `notify` is the socket apps report to; the apps'
    /// stderr goes to `stderr_sink`; `manager` is baton's own service
    /// manager, if it was started by one.
    pub fn new(
        source: ConfigSource,
        config: Config,
        sockets: Sockets,
        notify: NotifySocket,
        stderr_sink: StderrSink,
        manager: Option<ServiceManager>,
        spawner: Spawner,
    ) -> std::io::Result<Self> {
        let (cmd_tx, commands) = mpsc::channel(64);
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let (process_tx, process_rx) = mpsc::unbounded_channel();
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
        let mode = sockets.mode();
        let probe_source = match mode {
            TrafficMode::Steered => Source::reserved(sockets.probe_ports()),
            TrafficMode::Shared => Source::any(),
        };
        Ok(Self {
            machine: Machine::new(mode),
            epoch: Instant::now(),
            prep: Arc::new(Prep {
                source,
                initial: Arc::new(config),
                base_env: Arc::new(process::own_env()),
            }),
            sockets,
            closed: false,
            probe_source,
            notify_path,
            stderr_sink,
            spawner,
            procs: HashMap::new(),
            tails: BTreeMap::new(),
            probe_listeners: HashMap::new(),
            probes: HashMap::new(),
            health: HashMap::new(),
            queue_watches: HashMap::new(),
            replies: HashMap::new(),
            next_request: 1,
            deferred: Vec::new(),
            spawning: 0,
            restoring: 0,
            commands,
            internal_tx,
            internal_rx,
            process_rx,
            process_tx,
            events,
            handle,
            notify_task,
            metrics: Metrics::new(),
            preparing: 0,
            systemd: manager.map(|manager| SystemdLink {
                manager,
                reporter: Reporter::default(),
                last_outcome: None,
            }),
            argv0: std::env::args_os()
                .next()
                .map(PathBuf::from)
                .unwrap_or_default(),
            binary: handover_impl::own_binary(),
            handovers: 0,
            self_upgrade_error: None,
            self_checking: false,
            handover_fds: None,
            resumed: false,
            control_pause: None,
        })
    }

    /// Gives the supervisor copies of the descriptors its tasks own, so it
    /// can hand them to a new image of itself, and the means to quiesce the
    /// control server first: `pause` stops it accepting, `connections`
    /// says when those in flight are done.
    pub fn set_handover_fds(
        &mut self,
        fds: HandoverFds,
        pause: tokio::sync::watch::Sender<bool>,
        connections: crate::control::Connections,
    ) {
        self.handover_fds = Some(fds);
        self.control_pause = Some((pause, connections));
    }

    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// What `/metrics` serves.
    pub fn metrics(&self) -> Arc<prometheus_client::registry::Registry> {
        self.metrics.registry()
    }

    fn now(&self) -> Time {
        Time::from_duration(self.epoch.elapsed())
    }

    /// Starts the first generation and runs until stopped (by a `stop`
    /// command or `shutdown` resolving) and everything has exited. Errs
    /// only if the first generation's release could not be resolved.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), String> {
        let first = {
            let config = self.prep.initial.clone();
            process::resolve_config(&config, &self.prep.base_env).map(|release| Spec {
                release,
                settings: config.settings(),
                payload: config,
            })
        };
        match first {
            // A resumed machine runs its generations already.
            _ if self.resumed => {}
            Ok(spec) => self.feed(Input::Start { spec }),
            // Checked before binding, so only a race (the program removed
            // meanwhile) gets here.
            Err(e) => return Err(e.to_string()),
        }
        tokio::pin!(shutdown);
        let mut shutdown_done = false;
        let mut hup = crate::hup::HupWatch::new();
        // When the sockets are next looked at regardless of hang-ups.
        let mut recover_at: Option<Instant> = None;
        if !self.resumed {
            // A resumed baton's sockets are in the store already.
            self.store_sockets();
        }
        // Pinged from this loop, so a wedged loop stops the pings and the
        // manager acts.
        let watchdog_every = self
            .systemd
            .as_ref()
            .and_then(|s| s.manager.watchdog_interval());
        let mut watchdog =
            tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.tell_manager();
        while !self.machine.is_done() {
            if !self.closed && recover_at.is_none() {
                if let Err(e) = hup.sync(&self.sockets) {
                    tracing::warn!(
                        "watching the listeners for hang-ups: {e}; looking every {:?} instead",
                        RECOVER_INTERVAL
                    );
                    recover_at = Some(Instant::now() + RECOVER_INTERVAL);
                }
            }
            let deadline = self
                .machine
                .poll_timeout()
                .filter(|_| !self.tick_must_wait())
                .map(|t| self.epoch + t.since_epoch());
            tokio::select! {
                // Every branch is a cancel-safe channel receive or a timer;
                // shutdown is polled once.
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                Some(ev) = self.internal_rx.recv() => self.on_internal(ev),
                Some(ev) = self.process_rx.recv() => self.on_process(ev),
                () = &mut shutdown, if !shutdown_done => {
                    shutdown_done = true;
                    self.request(CoreCommand::Stop, None);
                }
                () = sleep_until(deadline), if deadline.is_some() => self.feed(Input::Tick),
                r = hup.hung_up(), if !self.closed && recover_at.is_none() => {
                    if let Err(e) = r {
                        tracing::warn!("watching the listeners for hang-ups: {e}");
                    }
                    recover_at = self.recover_sockets();
                }
                () = sleep_until(recover_at), if !self.closed && recover_at.is_some() => {
                    recover_at = self.recover_sockets();
                }
                _ = watchdog.tick(), if watchdog_every.is_some() => {
                    if let Some(s) = &self.systemd {
                        s.manager.tell("WATCHDOG=1\n", &[]);
                    }
                }
            }
            self.tell_manager();
        }
        self.notify_task.abort();
        tracing::info!("all generations exited; supervisor done");
        Ok(())
    }

    /// Steps the machine and performs what it says, in order.
    fn feed(&mut self, input: Input<Arc<Config>>) {
        let now = self.now();
        let asked = Asked::of(&input);
        let effects = self.machine.step(input, now);
        // Before any effect is performed: no reply, event or log line is
        // ever ahead of the metrics.
        self.metrics.observe(asked, &effects, &self.machine, now);
        for effect in effects {
            self.perform(effect);
        }
        self.forget_finished();
    }

    /// Feeds a notify message or probe result in causal order: it waits
    /// while it may come from a process whose spawn is not in yet (an app
    /// can send `READY=1` before the spawner's word that it runs), and while
    /// a process it could promote has exited but that exit is not in yet (an
    /// exit always counts before a READY that came after it).
    fn feed_report(&mut self, input: Input<Arc<Config>>) {
        if self.must_wait(&input) {
            self.deferred.push(input);
        } else {
            self.feed(input);
        }
    }

    fn must_wait(&self, input: &Input<Arc<Config>>) -> bool {
        let pids: Vec<Pid> = match input {
            Input::Notify { pid, pgid, .. } => {
                let ids: Vec<Pid> = [Some(*pid), *pgid].into_iter().flatten().collect();
                if self.spawning > 0 && !ids.iter().any(|p| self.procs.contains_key(p)) {
                    return true;
                }
                ids
            }
            // An exit always counts before a result that came after it.
            Input::Probe { pid, .. }
            | Input::Health { pid, .. }
            | Input::PriorityRestored { pid, .. } => vec![*pid],
            _ => Vec::new(),
        };
        pids.iter().any(|pid| self.exit_pending(*pid))
    }

    /// Process `pid` has exited, and the machine does not know it yet.
    fn exit_pending(&self, pid: Pid) -> bool {
        self.procs
            .get(&pid)
            .is_some_and(|h| !h.exit_reported && h.pidfd.has_exited())
    }

    /// A delay-readiness deadline has come for a process that has exited,
    /// unknown to the machine: the tick waits for that exit.
    fn tick_must_wait(&self) -> bool {
        let now = self.now();
        self.machine
            .generations()
            .filter_map(|g| g.workers())
            .flatten()
            .any(|w| {
                matches!(w, baton_core::Worker::Starting {
                    pid,
                    check: baton_core::Check::Delay { at },
                    ..
                } if *at <= now && self.exit_pending(*pid))
            })
    }

    /// Feeds the reports that waited, now that a spawn or an exit is in.
    fn retry_deferred(&mut self) {
        for input in std::mem::take(&mut self.deferred) {
            self.feed_report(input);
        }
    }

    fn request(&mut self, command: CoreCommand<Arc<Config>>, reply: Option<ReplyTo>) {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        if let Some(reply) = reply {
            self.replies.insert(id, reply);
        }
        self.feed(Input::Command { id, command });
    }

    // ----- inputs ------------------------------------------------------------

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Upgrade {
                ask,
                reply,
                trigger,
            } => match ask {
                Ask::Rollback => {
                    self.request(CoreCommand::Rollback, Some(ReplyTo::Upgrade(Some(reply))))
                }
                Ask::Promote => {
                    self.request(CoreCommand::Promote, Some(ReplyTo::Upgrade(Some(reply))))
                }
                Ask::Upgrade(options) => self.prepare(trigger, options, Some(reply)),
            },
            Command::Stop(reply) => self.request(CoreCommand::Stop, Some(ReplyTo::Stop(reply))),
            Command::UpgradeSelf(reply) => self.check_self_upgrade(reply),
        }
    }

    /// Loads the configuration for an upgrade on a blocking task; the
    /// result comes back as [`Internal::Prepared`].
    fn prepare(
        &mut self,
        trigger: Trigger,
        options: UpgradeOptions,
        reply: Option<oneshot::Sender<Result<Started, ErrorReply>>>,
    ) {
        self.preparing += 1;
        let prep = self.prep.clone();
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let spec = tokio::task::spawn_blocking(move || prep.spec())
                .await
                .unwrap_or_else(|e| {
                    Err(ErrorReply {
                        kind: ErrorKind::Config,
                        message: format!("loading the configuration: {e}"),
                    })
                });
            let _ = tx.send(Internal::Prepared {
                trigger,
                options,
                spec,
                reply,
            });
        });
    }

    fn on_prepared(
        &mut self,
        trigger: Trigger,
        options: UpgradeOptions,
        spec: Result<Result<Spec<Arc<Config>>, String>, ErrorReply>,
        reply: Option<oneshot::Sender<Result<Started, ErrorReply>>>,
    ) {
        match spec {
            Ok(spec) => self.request(
                CoreCommand::Upgrade {
                    trigger: wire::core_trigger(trigger),
                    spec,
                    options,
                },
                Some(ReplyTo::Upgrade(reply)),
            ),
            Err(e) => {
                self.metrics.config_refused();
                tracing::warn!("upgrade refused: {}", e.message);
                if let Some(s) = &mut self.systemd {
                    s.last_outcome = Some(format!("refused: {}", e.message));
                }
                if let Some(reply) = reply {
                    let _ = reply.send(Err(e));
                }
            }
        }
    }

    fn on_internal(&mut self, ev: Internal) {
        match ev {
            Internal::Prepared {
                trigger,
                options,
                spec,
                reply,
            } => {
                self.preparing = self.preparing.saturating_sub(1);
                self.on_prepared(trigger, options, spec, reply);
            }
            Internal::Probe { gen, pid, result } => {
                self.probes.remove(&gen);
                self.feed_report(Input::Probe { gen, pid, result });
            }
            Internal::Health { gen, pid, result } => {
                self.feed_report(Input::Health { gen, pid, result })
            }
            Internal::SelfChecked { exe, result, reply } => {
                self.on_self_checked(exe, result, reply);
            }
            Internal::ExecSelf { exe } => {
                self.self_checking = false;
                self.exec_self(&exe);
            }
            Internal::QueueEmpty { gen } => {
                self.queue_watches.remove(&gen);
                self.feed(Input::QueueEmpty { gen });
            }
            Internal::PriorityRestored {
                gen,
                worker,
                pid,
                result,
            } => {
                self.restoring -= 1;
                let restored = match result {
                    Ok(r) => {
                        tracing::info!(
                            generation = gen.0,
                            worker,
                            pid = pid.0,
                            threads = r.threads,
                            processes = r.processes,
                            left_as_set_by_the_app = r.left,
                            "CPU priority restored"
                        );
                        true
                    }
                    Err(e) => {
                        tracing::error!(
                            generation = gen.0,
                            worker,
                            pid = pid.0,
                            "restoring the CPU priority of the new generation's worker \
                             failed: {e}; it takes the traffic anyway, and `baton status` \
                             shows it lowered"
                        );
                        false
                    }
                };
                self.feed_report(Input::PriorityRestored { gen, pid, restored });
            }
            Internal::Notify(r) => {
                let reports: Vec<Report> = r
                    .messages
                    .into_iter()
                    .filter_map(|m| match m {
                        NotifyMessage::Ready => Some(Report::Ready),
                        NotifyMessage::Stopping => Some(Report::Stopping),
                        NotifyMessage::Status(s) => Some(Report::Status(s)),
                        NotifyMessage::Reloading | NotifyMessage::MainPid(_) => None,
                    })
                    .collect();
                self.feed_report(Input::Notify {
                    pid: Pid(r.pid),
                    pgid: r.pgid.map(Pid),
                    reports,
                });
            }
        }
    }

    fn on_process(&mut self, ev: ProcessEvent) {
        match ev {
            ProcessEvent::Spawned {
                gen,
                worker,
                result,
            } => {
                self.spawning -= 1;
                self.on_spawned(gen, worker, result);
                self.retry_deferred();
            }

            ProcessEvent::Exited {
                pid,
                status,
                group_empty,
            } => {
                if let Some(h) = self.procs.get_mut(&pid) {
                    h.exit_reported = true;
                }
                self.feed(Input::Exited {
                    pid,
                    status,
                    group_empty,
                });
                self.retry_deferred();
            }
            ProcessEvent::GroupEmpty { pid } => self.feed(Input::GroupEmpty { pid }),
            ProcessEvent::StderrClosed { pid } => {
                if let Some(h) = self.procs.get_mut(&pid) {
                    h.stderr = None;
                }
                self.feed(Input::StderrClosed { pid })
            }
        }
    }

    fn on_spawned(&mut self, gen: GenId, worker: u32, result: Result<process::Started, String>) {
        match result {
            Ok(started) => {
                let pid = started.pid;
                let pidfd = PidFd::new(started.pidfd);
                let stderr = started.stderr.try_clone().ok();
                let tail = process::forward(
                    pid,
                    started.stderr,
                    self.stderr_sink.clone(),
                    self.process_tx.clone(),
                );
                self.tails.insert((gen, worker), tail);
                let watcher =
                    tokio::spawn(process::watch(pid, pidfd.clone(), self.process_tx.clone()))
                        .abort_handle();
                self.procs.insert(
                    pid,
                    ProcHandle {
                        gen,
                        worker,
                        pidfd,
                        exit_reported: false,
                        watcher,
                        stderr,
                    },
                );
                self.feed(Input::Spawned { gen, worker, pid });
            }
            Err(error) => self.feed(Input::SpawnFailed { gen, worker, error }),
        }
    }

    // ----- effects -----------------------------------------------------------

    fn perform(&mut self, effect: Effect) {
        match effect {
            Effect::Spawn {
                gen,
                worker,
                priority,
            } => self.spawn(gen, worker, priority),
            Effect::RestorePriority {
                gen,
                worker,
                pid,
                from,
            } => self.restore_priority(gen, worker, pid, from),
            Effect::StartProbe { gen, pid } => self.start_probe(gen, pid),
            Effect::StopProbe { gen } => {
                if let Some(task) = self.probes.remove(&gen) {
                    task.abort();
                }
            }
            Effect::Signal { pid, signal } => self.signal(pid, signal),
            Effect::Release { pid } => {
                if let Some(h) = self.procs.remove(&pid) {
                    h.watcher.abort();
                    // The group is empty: reaping frees the ids.
                    if let Err(e) = h.pidfd.reap() {
                        tracing::warn!(pid = pid.0, "reaping: {e}");
                    }
                }
            }
            Effect::StartHealth { gen, pid } => self.start_health(gen, pid),
            Effect::StopHealth { gen } => {
                if let Some(task) = self.health.remove(&gen) {
                    task.abort();
                }
            }
            Effect::WatchQueue { gen } => self.watch_queue(gen),
            Effect::FreeSockets { gen } => {
                if let Some(task) = self.queue_watches.remove(&gen) {
                    task.abort();
                }
                self.sockets.free(gen);
            }
            Effect::PassSockets { from, to } => {
                if let Some(task) = self.queue_watches.remove(&from) {
                    task.abort();
                }
                self.sockets.pass(from, to);
            }
            Effect::Traffic(plan) => {
                // Applied first: the event says what the kernel does now.
                self.sockets.apply(&plan);
                self.publish_traffic(&plan);
            }
            Effect::CloseListeners => {
                // New clients are refused (once the apps, which drain, have
                // closed their copies too) instead of being accepted into a
                // queue that nobody serves and reset when baton exits.
                tracing::info!("stopping: draining every generation; new connections are refused");
                self.sockets.close();
                self.closed = true;
            }
            Effect::RequestUpgrade => {
                self.prepare(Trigger::Signal, UpgradeOptions::default(), None)
            }
            Effect::Reply { id, reply } => self.reply(id, reply),
            Effect::Event(ev) => {
                self.note_outcome(&ev);
                let wire = wire::event(&ev, &self.machine, &self.tails, self.now());
                wire::log_event(&wire);
                let _ = self.events.send(wire);
            }
            Effect::Note(note) => log_note(&note),
        }
    }

    /// Every thread of every process in the group led by `pid` (worker
    /// `worker` of `gen`) that runs at `from`, the priority it was started
    /// at, gets baton's own back, on a blocking task (it reads /proc); the
    /// machine hears when it is done and moves traffic once it has heard
    /// about every worker. The workers' groups are restored side by side.
    fn restore_priority(
        &mut self,
        gen: GenId,
        worker: u32,
        pid: Pid,
        from: baton_core::CpuPriority,
    ) {
        let own = process::own_priority();
        let from = process::sched_for(from, own);
        let tx = self.internal_tx.clone();
        self.restoring += 1;
        tokio::task::spawn_blocking(move || {
            let result = match from {
                Some(from) => process::restore_group_priority(pid, from, own),
                None => Ok(process::Restored::default()),
            };
            let _ = tx.send(Internal::PriorityRestored {
                gen,
                worker,
                pid,
                result,
            });
        });
    }

    fn spawn(&mut self, gen: GenId, worker: u32, priority: baton_core::CpuPriority) {
        let Some(spec) = self.machine.spec(gen).cloned() else {
            return;
        };
        if self.closed {
            // Stopping: nothing new may take the sockets.
            self.feed(Input::SpawnFailed {
                gen,
                worker,
                error: "the supervisor is stopping".into(),
            });
            return;
        }
        let fail = |error: String| Input::SpawnFailed { gen, worker, error };
        let sockets = match self.sockets.for_spawn(gen) {
            Ok(s) => s,
            Err(e) => return self.feed(fail(format!("preparing its sockets: {e}"))),
        };
        let probe_listener = match self.probe_listener(gen, &spec.payload) {
            Ok(l) => l,
            Err(e) => return self.feed(fail(format!("binding the probe listener: {e}"))),
        };
        let job = SpawnJob {
            gen,
            worker,
            release: spec.release,
            config: spec.payload,
            sockets,
            probe_listener,
            notify_path: self.notify_path.clone(),
            base_env: self.prep.base_env.clone(),
            priority: process::sched_for(priority, process::own_priority()),
        };
        match self.spawner.spawn(job, self.process_tx.clone()) {
            Ok(()) => self.spawning += 1,
            Err(error) => self.feed(fail(error)),
        }
    }

    /// A copy of `gen`'s private probe listener for a spawn, bound at the
    /// generation's first spawn, when its check needs one.
    fn probe_listener(&mut self, gen: GenId, config: &Config) -> std::io::Result<Option<OwnedFd>> {
        if self.sockets.mode() != TrafficMode::Shared || !config.ready.needs_probe_listener() {
            return Ok(None);
        }
        let listener = match self.probe_listeners.entry(gen) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Listener::bind_probe(crate::config::PROBE_FD_NAME)?)
            }
        };
        listener.as_fd().try_clone_to_owned().map(Some)
    }

    /// Where a check of `gen` connects, and the socket whose queue shows
    /// that the app accepted: its private probe listener (shared sockets),
    /// or the real address and its own socket (steered). Either way it
    /// reaches whichever of the generation's workers accepts.
    fn check_target(&self, gen: GenId) -> (Option<SocketAddr>, Option<OwnedFd>) {
        match self.sockets.mode() {
            TrafficMode::Steered => (
                self.sockets.probe_addr(),
                self.sockets.watch_fds(gen).into_iter().next(),
            ),
            TrafficMode::Shared => {
                let probe = self.probe_listeners.get(&gen);
                (
                    probe.and_then(process::probe_addr),
                    probe.and_then(|l| l.as_fd().try_clone_to_owned().ok()),
                )
            }
        }
    }

    /// The environment of an `exec:` check.
    fn check_env(&self, gen: GenId, pid: Pid, addr: Option<SocketAddr>) -> Vec<(String, String)> {
        let mut env = vec![
            ("BATON_GENERATION".to_owned(), gen.to_string()),
            ("BATON_PID".to_owned(), pid.to_string()),
        ];
        if let Some(a) = addr {
            env.push(("BATON_PROBE_ADDR".to_owned(), a.to_string()));
        }
        if self.sockets.mode() == TrafficMode::Steered {
            let ports = self.sockets.probe_ports();
            env.push(("BATON_PROBE_PORTS".to_owned(), ports.to_string()));
        }
        env
    }

    fn start_probe(&mut self, gen: GenId, pid: Pid) {
        let Some(config) = self.machine.spec(gen).map(|s| s.payload.clone()) else {
            return;
        };
        let (addr, fd) = self.check_target(gen);
        let env = self.check_env(gen, pid, addr);
        let source = self.probe_source.clone();
        let tx = self.internal_tx.clone();
        let task = tokio::spawn(async move {
            let result = match (&config.ready, addr) {
                (ReadySpec::Http(path), Some(addr)) => probe::http(addr, path, &source).await,
                (ReadySpec::Tcp, Some(addr)) => match &fd {
                    Some(fd) => probe::tcp(addr, fd.as_fd(), &source).await,
                    None => Err("cannot watch the listener for the tcp check".into()),
                },
                (ReadySpec::Exec(cmd), _) => probe::exec(cmd, &env).await,
                _ => Err("no address for the readiness check".into()),
            };
            let _ = tx.send(Internal::Probe { gen, pid, result });
        });
        if let Some(old) = self.probes.insert(gen, task.abort_handle()) {
            old.abort();
        }
    }

    /// Runs `gen`'s health check against `pid` at its interval until
    /// stopped, each result an input.
    fn start_health(&mut self, gen: GenId, pid: Pid) {
        let Some(config) = self.machine.spec(gen).map(|s| s.payload.clone()) else {
            return;
        };
        let Some(check) = config.health.clone() else {
            return;
        };
        let (addr, fd) = self.check_target(gen);
        let env = self.check_env(gen, pid, addr);
        let source = self.probe_source.clone();
        let tx = self.internal_tx.clone();
        let interval = config.health_interval;
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let result = probe::health_once(
                    &check.0,
                    addr,
                    fd.as_ref().map(|f| f.as_fd()),
                    &source,
                    &env,
                )
                .await;
                if tx.send(Internal::Health { gen, pid, result }).is_err() {
                    return;
                }
            }
        });
        if let Some(old) = self.health.insert(gen, task.abort_handle()) {
            old.abort();
        }
    }

    /// Reports when nothing waits in `gen`'s sockets any more: after
    /// [`RETIRE_SETTLE`], once their accept queues are empty. The machine
    /// drains it regardless after its own bound.
    fn watch_queue(&mut self, gen: GenId) {
        let fds = self.sockets.watch_fds(gen);
        let tx = self.internal_tx.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(RETIRE_SETTLE).await;
            let bound = tokio::time::Instant::now() + baton_core::RETIRE_WAIT;
            while tokio::time::Instant::now() < bound {
                let waiting: u32 = fds
                    .iter()
                    .map(|fd| baton_sys::tcp_accept_queue_len(fd.as_fd()).unwrap_or(0))
                    .sum();
                if waiting == 0 {
                    let _ = tx.send(Internal::QueueEmpty { gen });
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        if let Some(old) = self.queue_watches.insert(gen, task.abort_handle()) {
            old.abort();
        }
    }

    /// Publishes a traffic change, once the kernel has it.
    fn publish_traffic(&self, plan: &TrafficPlan) {
        let Some(active) = plan.active else {
            return;
        };
        let upgrade = self.machine.upgrade();
        let ev = Event {
            time_us: wall_us(),
            generation: active.0,
            upgrade: upgrade.map(|u| u.candidate.0),
            elapsed_us: upgrade.map(|u| self.now().since(u.started).as_micros() as u64),
            kind: EventKind::Traffic {
                active: Some(active.0),
                candidate: plan.candidate.map(|c| c.gen.0),
                share: plan.candidate.map_or(0, |c| c.share),
                parked: plan.parked.map(|g| g.0),
            },
        };
        wire::log_event(&ev);
        let _ = self.events.send(ev);
    }

    fn signal(&mut self, pid: Pid, signal: Signal) {
        let Some(h) = self.procs.get(&pid) else {
            // The machine only signals groups it holds; a released one is
            // reaped and its id may belong to a stranger now.
            tracing::error!(pid = pid.0, "refusing to signal a released process group");
            return;
        };
        let sig = match signal {
            Signal::Kill => nix::sys::signal::Signal::SIGKILL,
            Signal::Drain => self
                .machine
                .spec(h.gen)
                .map_or(nix::sys::signal::Signal::SIGTERM, |s| {
                    s.payload.drain_signal.0
                }),
        };
        // Safe from reuse: the group's leader is unreaped until released.
        if let Err(e) = killpg(nix::unistd::Pid::from_raw(pid.0), sig) {
            tracing::debug!(generation = h.gen.0, pgid = pid.0, "sending {sig}: {e}");
        }
    }

    fn reply(&mut self, id: RequestId, reply: CoreReply) {
        let Some(to) = self.replies.remove(&id) else {
            // The follow-up owed to SIGHUPs met another upgrade (one a new
            // SIGHUP started while its configuration loaded): it is owed
            // again, after that one.
            if let CoreReply::Refused(r) = reply {
                tracing::info!("follow-up upgrade deferred: {}", refusal(r).message);
            }
            return;
        };
        match (to, reply) {
            (ReplyTo::Upgrade(tx), reply) => {
                let started = |gen: GenId, how| Ok(Started { id: gen.0, how });
                let result = match reply {
                    CoreReply::Upgrading(gen) => started(gen, How::Upgrading),
                    CoreReply::RolledBack(gen) => started(gen, How::RolledBack),
                    CoreReply::Promoting(gen) => started(gen, How::Promoting),
                    CoreReply::Restarting(gen) => started(gen, How::Upgrading),
                    CoreReply::Refused(r) => {
                        let e = refusal(r);
                        tracing::warn!("upgrade refused: {}", e.message);
                        Err(e)
                    }
                    CoreReply::Stopping => Err(stopping_error()),
                };
                if let Some(tx) = tx {
                    let _ = tx.send(result);
                }
            }
            (ReplyTo::Stop(tx), _) => {
                let _ = tx.send(());
            }
        }
    }

    /// Keeps the last upgrade's outcome in words, for the service manager.
    fn note_outcome(&mut self, ev: &baton_core::Event) {
        use baton_core::EventKind as K;
        let Some(s) = &mut self.systemd else {
            return;
        };
        let words = match &ev.kind {
            K::UpgradeSucceeded => format!("generation {} succeeded", ev.gen),
            K::UpgradeFailed { failure, .. } => {
                format!("failed: {}", wire::failure_words(ev.gen, failure))
            }
            K::RolledBack { to, .. } => format!("rolled back to generation {to}"),
            _ => return,
        };
        s.last_outcome = Some(words);
    }

    /// Tells the service manager what changed since it was last told.
    fn tell_manager(&mut self) {
        let Some(s) = &mut self.systemd else {
            return;
        };
        let machine = &self.machine;
        let active = machine.traffic().active.map(|gen| {
            let release = machine
                .spec(gen)
                .map_or_else(String::new, |s| s.release.dir.display().to_string());
            (gen.0, release)
        });
        let upgrading = match machine.upgrade() {
            Some(u)
                if matches!(
                    u.phase,
                    baton_core::UpgradePhase::Starting
                        | baton_core::UpgradePhase::Raising { .. }
                        | baton_core::UpgradePhase::Canary { .. }
                ) =>
            {
                Some(Upgrading::Starting(u.candidate.0))
            }
            _ if self.preparing > 0 => Some(Upgrading::Preparing),
            _ => None,
        };
        let serving = machine.traffic().active.is_some_and(|gen| {
            machine
                .generation(gen)
                .is_some_and(|g| matches!(g.phase(), baton_core::Phase::Serving { .. }))
        });
        let observed = Observed {
            active,
            serving,
            upgrading,
            last_outcome: s.last_outcome.clone(),
            stopping: machine.stopping(),
        };
        let pid = std::process::id();
        if let Some(message) = s
            .reporter
            .observe(&observed, pid, crate::systemd::monotonic_us())
        {
            s.manager.tell(&message, &[]);
        }
    }

    /// Puts the sockets baton bound into the service manager's fd store.
    /// Replaces the listening sockets an app's `shutdown()` stopped, and
    /// restarts the active generation if it served from one. Returns when
    /// to look again: soon if a socket could not be replaced.
    fn recover_sockets(&mut self) -> Option<Instant> {
        let recovered = self.sockets.recover_detached();
        if let Some(s) = &self.systemd {
            for name in &recovered.replaced {
                s.manager.unstore(name);
            }
        }
        if !recovered.replaced.is_empty() {
            self.store_sockets();
        }
        if recovered.restart_active {
            // No process holds the fresh socket: the active generation is
            // restarted on it (same release).
            self.request(CoreCommand::Restart, None);
        }
        (recovered.failed > 0).then(|| Instant::now() + RECOVER_INTERVAL)
    }

    fn store_sockets(&self) {
        if let Some(s) = &self.systemd {
            for (name, fd) in self.sockets.storable() {
                s.manager.store(name, fd);
            }
        }
    }

    /// Drops what the shell kept for generations the machine has forgotten
    /// (stderr tails), or that have finished (probe listeners).
    fn forget_finished(&mut self) {
        let machine = &self.machine;
        self.tails
            .retain(|(gen, _), _| machine.generation(*gen).is_some());
        self.probe_listeners.retain(|gen, _| {
            machine
                .generation(*gen)
                .is_some_and(|g| !matches!(g.phase(), baton_core::Phase::Finished { .. }))
        });
    }

    fn status(&self) -> Status {
        let sockets: Vec<SocketStatus> = self
            .sockets
            .info()
            .into_iter()
            .enumerate()
            .map(|(i, info)| SocketStatus {
                name: info.name,
                address: info.address,
                fd: baton_protocol::app::FIRST_FD + i as u32,
                steered: info.steered,
            })
            .collect();
        let mut status = wire::status(&self.machine, &sockets, self.now(), self.epoch.elapsed());
        status.binary = self.binary.clone();
        status.handovers = self.handovers;
        status.self_upgrade_error = self.self_upgrade_error.clone();
        status
    }
}

fn refusal(r: Refusal) -> ErrorReply {
    match r {
        Refusal::Busy(gen) => ErrorReply {
            kind: ErrorKind::Busy,
            message: format!(
                "an upgrade (to generation {gen}) is already in progress; try again when it ends"
            ),
        },
        Refusal::Stopping => stopping_error(),
        Refusal::NoPrevious => ErrorReply {
            kind: ErrorKind::NoPrevious,
            message: "no previous successful release to roll back to".into(),
        },
        Refusal::NothingToPromote => ErrorReply {
            kind: ErrorKind::NothingToPromote,
            message: "nothing to promote: no canary runs and no bake is under way".into(),
        },
        Refusal::NeedsOverlap => ErrorReply {
            kind: ErrorKind::NeedsOverlap,
            message: "a canary or a bake needs two generations at once, and with \
                      overlap = \"none\" the app never runs twice"
                .into(),
        },
        Refusal::NeedsSteering => ErrorReply {
            kind: ErrorKind::NeedsSteering,
            message: "a canary needs steered traffic (traffic = \"steered\", and a kernel \
                      that takes the steering program)"
                .into(),
        },
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn log_note(note: &Note) {
    use tracing::{info, warn};
    match note {
        Note::NotifyFromStranger { pid } => {
            info!(
                pid = pid.0,
                "ignoring notify message: the sender belongs to no generation"
            )
        }
        Note::GroupOutlivesLeader { gen, pid } => warn!(
            generation = gen.0,
            pgid = pid.0,
            "worker process gone; draining the rest of its group"
        ),
        Note::KillingLeftovers { gen, pid } => warn!(
            generation = gen.0,
            pgid = pid.0,
            "drain timeout: killing processes left in the group"
        ),
        Note::Recycling { gen, failure } => warn!(
            generation = gen.0,
            "{}; draining it to restart",
            wire::failure_words(*gen, failure)
        ),
        Note::FollowUpUpgrade => {
            info!("running the upgrade requested by SIGHUP during the last one")
        }
        Note::RestartRequested { gen } => warn!(
            generation = gen.0,
            "restarting the active generation on its fresh socket"
        ),
        Note::QueueNotEmpty { gen } => warn!(
            generation = gen.0,
            "its sockets' queues did not empty in time: draining it anyway"
        ),
        Note::ParkedExited { gen } => warn!(
            generation = gen.0,
            "the parked generation exited during the bake: nothing to roll back to"
        ),
        Note::HealthFailed {
            gen,
            failures,
            reason,
        } => warn!(
            generation = gen.0,
            failures, "health check failed: {reason}"
        ),
    }
}

/// The wall clock, for event timestamps.
pub(crate) fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
