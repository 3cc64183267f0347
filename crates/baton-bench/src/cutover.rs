//! Deploys under load: through baton's control socket, and the two
//! comparisons (the naive stop-then-start deploy, and an HAProxy reload in
//! front of two app instances). Each deploy is recorded as a [`Cutover`]
//! whose phases are placed on the run's time axis, so the requests around
//! it can be cut out and attributed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton::protocol::{EventKind, Reply, Request};
use nix::sys::signal::Signal;
use serde::Serialize;

use crate::load::Clock;
use crate::procs::{self, Proc};

/// An upgrade that takes longer than this is reported as failed.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);

/// A named moment of a cutover, in µs since the run's start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Phase {
    pub name: String,
    pub at_us: i64,
}

/// One lifecycle event as the supervisor reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventNote {
    pub event: String,
    pub generation: u64,
    /// µs since the run's start (from the event's wall-clock `time_us`).
    pub at_us: i64,
    /// µs since the upgrade was requested (the supervisor's monotonic clock).
    pub elapsed_us: Option<u64>,
}

/// One deploy, as it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cutover {
    pub index: u32,
    pub ok: bool,
    pub error: Option<String>,
    /// When the deploy began (upgrade requested, SIGTERM sent, ...).
    pub start_us: i64,
    /// When the old version was gone and the new one serving.
    pub end_us: i64,
    pub phases: Vec<Phase>,
    /// baton only: the candidate and the process it replaced, as baton's
    /// events name them; only used to find those processes' own stamps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_app: Option<AppId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_app: Option<AppId>,
    /// From the apps' stamps ([`crate::stamps`]), µs on the run's clock:
    /// the new version about to send READY=1...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_ready_us: Option<i64>,
    /// ...and the old version receiving its drain signal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_drain_us: Option<i64>,
    /// `app_drain - app_ready` (from the stamps' ns): the cutover latency,
    /// measured outside baton.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cutover_latency_us: Option<i64>,
    /// When the first response from the new generation reached the load
    /// generator, µs on the run's clock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_response_us: Option<i64>,
    /// `first_response - app_ready`; negative when the new version answered
    /// before its READY=1 (it accepts on the shared socket just before).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_to_first_response_us: Option<i64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<EventNote>,
    /// Rollback runs only: the rollback as the client saw it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollback: Option<crate::steering::RollbackNote>,
}

/// An app process: its generation and, if an event said, its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AppId {
    pub generation: u64,
    pub pid: Option<i32>,
}

impl Cutover {
    pub fn phase(&self, name: &str) -> Option<i64> {
        self.phases.iter().find(|p| p.name == name).map(|p| p.at_us)
    }

    pub fn new(index: u32, start_us: i64) -> Cutover {
        Cutover {
            index,
            ok: true,
            error: None,
            start_us,
            end_us: start_us,
            phases: Vec::new(),
            new_app: None,
            old_app: None,
            app_ready_us: None,
            app_drain_us: None,
            cutover_latency_us: None,
            first_response_us: None,
            ready_to_first_response_us: None,
            events: Vec::new(),
            rollback: None,
        }
    }

    pub(crate) fn mark(&mut self, name: &str, at_us: i64) {
        self.phases.push(Phase {
            name: name.to_owned(),
            at_us,
        });
        self.end_us = self.end_us.max(at_us);
    }

    pub(crate) fn fail(&mut self, why: impl Into<String>) {
        self.ok = false;
        self.error.get_or_insert_with(|| why.into());
    }
}

fn event_name(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::UpgradeRequested { .. } => "upgrade_requested",
        EventKind::Spawned { .. } => "spawned",
        EventKind::SpawnFailed { .. } => "spawn_failed",
        EventKind::Ready { .. } => "ready",
        EventKind::WorkerReady { .. } => "worker_ready",
        EventKind::Active { .. } => "active",
        EventKind::Canary { .. } => "canary",
        EventKind::Bake { .. } => "bake",
        EventKind::RolledBack { .. } => "rolled_back",
        EventKind::Traffic { .. } => "traffic",
        EventKind::Retiring { .. } => "retiring",
        EventKind::Draining { .. } => "draining",
        EventKind::Killed { .. } => "killed",
        EventKind::Exited { .. } => "exited",
        EventKind::Restarting { .. } => "restarting",
        EventKind::Status { .. } => "status",
        EventKind::Stopping { .. } => "stopping",
        EventKind::UpgradeSucceeded => "upgrade_succeeded",
        EventKind::UpgradeFailed { .. } => "upgrade_failed",
    }
}

/// Builds a cutover from the replies of one `upgrade` request (`wait_drain`
/// set). `sent_us`/`done_us` are when the bench sent the request and saw the
/// stream end. Phases: `requested`, `spawned`, `ready`, `active` (the
/// candidate), `draining`, `exited` (the old generation), at the times
/// baton's events carry. The events also name the candidate and the old
/// process, whose own stamps [`crate::stamps::attach`] adds later.
pub fn from_replies(
    index: u32,
    sent_us: i64,
    done_us: i64,
    replies: &[Reply],
    clock: &Clock,
) -> Cutover {
    let mut c = Cutover::new(index, sent_us);
    let mut candidate: Option<u64> = None;
    let mut draining = false;
    let mut exited: Option<i64> = None;
    let mut done = false;
    for r in replies {
        match r {
            Reply::Event(e) => {
                let at = clock.wall_to_us(e.time_us);
                c.events.push(EventNote {
                    event: event_name(&e.kind).to_owned(),
                    generation: e.generation,
                    at_us: at,
                    elapsed_us: e.elapsed_us,
                });
                let is_candidate = candidate.is_none_or(|n| n == e.generation);
                match &e.kind {
                    EventKind::UpgradeRequested { .. } => {
                        candidate = Some(e.upgrade.unwrap_or(e.generation));
                        c.start_us = at;
                        c.mark("requested", at);
                    }
                    EventKind::Spawned { pid, .. } if is_candidate => {
                        c.new_app = Some(AppId {
                            generation: e.generation,
                            pid: Some(*pid),
                        });
                        c.mark("spawned", at);
                    }
                    EventKind::Ready { .. } if is_candidate => c.mark("ready", at),
                    EventKind::Active { .. } if is_candidate => c.mark("active", at),
                    EventKind::Draining { pid, .. } if !is_candidate && !draining => {
                        draining = true;
                        c.old_app = Some(AppId {
                            generation: e.generation,
                            pid: Some(*pid),
                        });
                        c.mark("draining", at);
                    }
                    EventKind::Exited { .. } if !is_candidate => exited = Some(at),
                    EventKind::Killed { .. } => c.fail("the old generation had to be killed"),
                    EventKind::SpawnFailed { error } => c.fail(format!("spawn failed: {error}")),
                    EventKind::UpgradeFailed { reason, .. } => {
                        c.fail(format!("upgrade failed: {reason}"))
                    }
                    _ => {}
                }
            }
            Reply::Done(o) => {
                done = true;
                if !o.success {
                    c.fail(o.reason.clone().unwrap_or_else(|| "upgrade failed".into()));
                }
            }
            Reply::Error(e) => c.fail(format!("refused: {:?}: {}", e.kind, e.message)),
            Reply::Status(_) | Reply::Stopping | Reply::HandingOver(_) => {}
        }
    }
    if let Some(at) = exited {
        c.mark("exited", at);
    }
    if !done {
        c.fail("the upgrade stream ended without a result");
    } else if exited.is_none() && c.ok {
        c.fail("no old generation exited");
    }
    c.end_us = c
        .end_us
        .max(if exited.is_some() { c.end_us } else { done_us });
    c
}

fn small_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// The active generation of the baton at `control`: `None` if unreachable.
pub fn baton_active(control: &Path) -> Option<Option<u64>> {
    let rt = small_runtime().ok()?;
    let mut active = None;
    let res = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(2),
            baton::control::request(control, &Request::Status, |r| {
                if let Reply::Status(s) = r {
                    active = Some(s.active);
                }
            }),
        )
        .await
    });
    match res {
        Ok(Ok(())) => active,
        _ => None,
    }
}

/// The traffic mode the baton at `control` reports (`steered`, `shared`).
pub fn baton_traffic(control: &Path) -> Option<String> {
    let rt = small_runtime().ok()?;
    let mut traffic = None;
    let res = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(2),
            baton::control::request(control, &Request::Status, |r| {
                if let Reply::Status(s) = r {
                    traffic = Some(s.traffic);
                }
            }),
        )
        .await
    });
    match res {
        Ok(Ok(())) => traffic,
        _ => None,
    }
}

/// Asks baton to stop and waits for it (bounded), then the guard's SIGTERM.
pub fn stop_baton(control: &Path, mut proc: Proc) {
    if let Ok(rt) = small_runtime() {
        let _ = rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(2),
                baton::control::request(control, &Request::Stop, |_| {}),
            )
            .await
        });
    }
    if proc.wait_for(Duration::from_secs(10)).is_none() {
        proc.terminate(Duration::from_secs(2));
    }
}

/// How a deploy is done.
pub enum Deployer {
    /// `upgrade` with `wait_drain` over baton's control socket.
    Baton(BatonDeploy),
    /// Stop the old process (SIGTERM, wait for exit), then start the new
    /// one on the same port: what a deploy script without baton does.
    Naive(Naive),
    /// Start the new app on the other port, point the proxy (HAProxy or
    /// nginx) at it, reload the proxy, wait for its old workers to leave,
    /// stop the old app.
    Proxy(Box<ProxySwap>),
    /// A control experiment, no deploy at all: start an app instance on a
    /// port nobody loads, wait until it serves, stop it. The same process
    /// start-up and exit a cutover costs the machine, with no traffic moved:
    /// what it does to latency is the cost of sharing two cores.
    SpawnOnly(SpawnOnly),
    /// Under baton with a bake window: upgrade without waiting for the
    /// bake, then roll back, measuring from outside how soon new
    /// connections reach the old processes again ([`crate::steering`]).
    Rollback(crate::steering::RollbackDeploy),
    /// A server's own reload signal to its master (gunicorn's SIGHUP
    /// starts new workers and retires the old ones gracefully): done once
    /// every old worker has gone and as many new ones run.
    Signal(SignalReload),
    /// A tool's own reload command (`pm2 reload NAME`): done when it
    /// exits 0.
    Command(CommandReload),
}

impl Deployer {
    /// Performs one deploy; blocking (the driver has its own thread).
    pub fn cutover(&mut self, index: u32, clock: &Clock) -> Cutover {
        match self {
            Deployer::Baton(b) => b.cutover(index, clock),
            Deployer::Naive(n) => n.cutover(index, clock),
            Deployer::Proxy(p) => p.cutover(index, clock),
            Deployer::SpawnOnly(s) => s.cutover(index, clock),
            Deployer::Rollback(r) => r.cutover(index, clock),
            Deployer::Signal(h) => h.cutover(index, clock),
            Deployer::Command(r) => r.cutover(index, clock),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Deployer::Baton(_) => "baton",
            Deployer::Naive(_) => "naive",
            Deployer::Proxy(p) => p.proxy.name(),
            Deployer::SpawnOnly(_) => "spawn-only",
            Deployer::Rollback(_) => "rollback",
            Deployer::Signal(_) => "signal",
            Deployer::Command(_) => "command",
        }
    }
}

/// Upgrades through the control socket, with one runtime for every
/// request (so the bench's own work per cutover stays small).
pub struct BatonDeploy {
    control: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl BatonDeploy {
    pub fn new(control: PathBuf) -> std::io::Result<BatonDeploy> {
        Ok(BatonDeploy {
            control,
            rt: small_runtime()?,
        })
    }

    fn cutover(&mut self, index: u32, clock: &Clock) -> Cutover {
        let sent = clock.now_us() as i64;
        let mut replies = Vec::new();
        let control = &self.control;
        let res = self.rt.block_on(async {
            tokio::time::timeout(
                UPGRADE_TIMEOUT,
                baton::control::request(control, &Request::upgrade(true), |r| replies.push(r)),
            )
            .await
        });
        let done = clock.now_us() as i64;
        let mut c = from_replies(index, sent, done, &replies, clock);
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                c.ok = false;
                c.error = Some(format!("control: {}", baton::error_chain(&e)));
            }
            Err(_) => {
                c.ok = false;
                c.error = Some(format!("no result within {UPGRADE_TIMEOUT:?}"));
            }
        }
        c
    }
}

/// The spawn-only control experiment's state.
pub struct SpawnOnly {
    pub app: PathBuf,
    pub log: PathBuf,
}

impl SpawnOnly {
    fn cutover(&mut self, index: u32, clock: &Clock) -> Cutover {
        let now = || clock.now_us() as i64;
        let mut c = Cutover::new(index, now());
        c.mark("requested", c.start_us);
        let port = match procs::free_port() {
            Ok(p) => p,
            Err(e) => {
                c.fail(format!("no free port: {e}"));
                return c;
            }
        };
        let mut p = match procs::spawn_app(&self.app, port, &self.log) {
            Ok(p) => p,
            Err(e) => {
                c.fail(format!("starting the app: {e}"));
                return c;
            }
        };
        c.mark("spawned", now());
        if procs::wait_accepting(procs::loopback(port), Duration::from_secs(10)) {
            c.mark("serving", now());
        } else {
            c.fail("the app did not accept within 10s");
        }
        let _ = p.signal(Signal::SIGTERM);
        c.mark("sigterm", now());
        if p.wait_for(Duration::from_secs(10)).is_none() {
            c.fail("the app did not exit within 10s");
        }
        c.mark("exited", now());
        c
    }
}

/// The naive deploy's state: the app process of the moment.
pub struct Naive {
    pub app: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    pub current: Option<Proc>,
}

impl Naive {
    fn cutover(&mut self, index: u32, clock: &Clock) -> Cutover {
        let now = || clock.now_us() as i64;
        let mut c = Cutover::new(index, now());
        c.mark("sigterm", c.start_us);
        if let Some(mut old) = self.current.take() {
            let _ = old.signal(Signal::SIGTERM);
            if old.wait_for(Duration::from_secs(10)).is_none() {
                c.fail("old app did not exit within 10s");
                old.terminate(Duration::from_millis(100));
            }
            c.mark("old_exited", now());
        }
        match procs::spawn_app(&self.app, self.port, &self.log) {
            Ok(p) => {
                c.mark("spawned", now());
                self.current = Some(p);
                if procs::wait_accepting(procs::loopback(self.port), Duration::from_secs(10)) {
                    c.mark("serving", now());
                } else {
                    c.fail("new app not accepting within 10s");
                }
            }
            Err(e) => c.fail(format!("starting the new app: {e}")),
        }
        c
    }
}

/// A reload by signal to a master process that forks its workers.
pub struct SignalReload {
    pub master: Proc,
    pub signal: Signal,
    /// Workers the master runs once the reload is done.
    pub workers: usize,
}

impl SignalReload {
    fn cutover(&mut self, index: u32, clock: &Clock) -> Cutover {
        let now = || clock.now_us() as i64;
        let mut c = Cutover::new(index, now());
        c.mark("requested", c.start_us);
        let old = crate::procstat::children(self.master.pid());
        if let Err(e) = self.master.signal(self.signal) {
            c.fail(format!("signalling {}: {e}", self.master.name));
            return c;
        }
        c.mark("signalled", now());
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut new_seen = false;
        loop {
            let kids = crate::procstat::children(self.master.pid());
            let new = kids.iter().filter(|k| !old.contains(k)).count();
            if !new_seen && new > 0 {
                new_seen = true;
                c.mark("new_worker", now());
            }
            if new >= self.workers && !kids.iter().any(|k| old.contains(k)) {
                c.mark("old_workers_exited", now());
                return c;
            }
            if self.master.try_wait().is_some() {
                c.fail(format!("{} exited", self.master.name));
                return c;
            }
            if Instant::now() >= deadline {
                c.fail("the reload did not complete within 30s");
                return c;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A reload by running a tool's command.
pub struct CommandReload {
    pub argv: Vec<std::ffi::OsString>,
    pub env: Vec<(String, std::ffi::OsString)>,
    pub log: PathBuf,
}

impl CommandReload {
    /// Runs the command to its end (at most 60 s).
    pub fn run_once(&self) -> Result<(), String> {
        let (program, args) = self.argv.split_first().ok_or("no command")?;
        let mut cmd = std::process::Command::new(program);
        cmd.args(args).envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut p = Proc::spawn(cmd, "command", &self.log).map_err(|e| e.to_string())?;
        match p.wait_for(Duration::from_secs(60)) {
            Some(s) if s.success() => Ok(()),
            Some(s) => Err(format!("{s}")),
            None => Err("did not finish within 60s".into()),
        }
    }

    fn cutover(&mut self, index: u32, clock: &Clock) -> Cutover {
        let now = || clock.now_us() as i64;
        let mut c = Cutover::new(index, now());
        c.mark("requested", c.start_us);
        match self.run_once() {
            Ok(()) => c.mark("reloaded", now()),
            Err(e) => c.fail(format!("the reload command: {e}")),
        }
        c
    }
}

/// The proxy in front of the two app instances, and how it reloads.
pub enum Proxy {
    /// HAProxy in master-worker mode: `SIGUSR2` to the master; the new
    /// worker takes the listeners over the stats socket (seamless reload).
    Haproxy { haproxy: PathBuf, threads: usize },
    /// nginx: `nginx -s reload` (its master starts new workers on the
    /// listeners it holds and retires the old ones gracefully).
    Nginx { nginx: PathBuf, workers: usize },
}

impl Proxy {
    pub fn name(&self) -> &'static str {
        match self {
            Proxy::Haproxy { .. } => "haproxy",
            Proxy::Nginx { .. } => "nginx",
        }
    }

    /// The configuration: listen on `port`, send everything to `app_port`.
    pub fn config(&self, port: u16, app_port: u16, dir: &Path) -> String {
        match self {
            Proxy::Haproxy { threads, .. } => procs::haproxy_config(port, app_port, dir, *threads),
            Proxy::Nginx { workers, .. } => procs::nginx_config(port, app_port, dir, *workers),
        }
    }

    /// Starts the proxy's master on `cfg`, listening on `port`.
    fn spawn(&self, cfg: &Path, dir: &Path, port: u16, log: &Path) -> Result<Proc, String> {
        match self {
            Proxy::Haproxy { haproxy, .. } => procs::spawn_haproxy(haproxy, cfg, port, log),
            Proxy::Nginx { nginx, .. } => procs::spawn_nginx(nginx, cfg, dir, port, log),
        }
    }

    /// Tells the running proxy to re-read its configuration.
    fn reload(&self, master: &Proc, cfg: &Path, dir: &Path, log: &Path) -> Result<(), String> {
        match self {
            Proxy::Haproxy { .. } => master
                .signal(Signal::SIGUSR2)
                .map_err(|e| format!("signalling haproxy: {e}")),
            // The command operators type: it signals the master whose pid
            // the configuration's pid file holds.
            Proxy::Nginx { nginx, .. } => CommandReload {
                argv: procs::nginx_args(nginx, cfg, dir, &["-s", "reload"]),
                env: Vec::new(),
                log: log.to_owned(),
            }
            .run_once()
            .map_err(|e| format!("nginx -s reload: {e}")),
        }
    }
}

/// A deploy behind a proxy: its state.
pub struct ProxySwap {
    pub proxy: Proxy,
    pub master: Proc,
    pub cfg: PathBuf,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    pub app: PathBuf,
    pub app_log: PathBuf,
    pub app_ports: [u16; 2],
    pub apps: [Option<Proc>; 2],
    /// Index of the app instance the proxy points at.
    pub active: usize,
}

impl ProxySwap {
    /// Starts the first app instance on `app_ports[0]` and, once it
    /// accepts, the proxy in front of it on `port`, with its configuration,
    /// pid file and temp files in `dir` (created).
    pub fn start(
        proxy: Proxy,
        app: PathBuf,
        app_log: PathBuf,
        port: u16,
        app_ports: [u16; 2],
        dir: PathBuf,
        log: PathBuf,
    ) -> Result<ProxySwap, String> {
        let first = procs::spawn_app(&app, app_ports[0], &app_log)
            .map_err(|e| format!("starting the app: {e}"))?;
        if !procs::wait_accepting(procs::loopback(app_ports[0]), Duration::from_secs(10)) {
            return Err(format!(
                "the app behind {} did not accept; see {}",
                proxy.name(),
                app_log.display()
            ));
        }
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let cfg = dir.join(format!("{}.conf", proxy.name()));
        procs::write_atomic(&cfg, &proxy.config(port, app_ports[0], &dir))
            .map_err(|e| format!("writing {}: {e}", cfg.display()))?;
        let master = proxy.spawn(&cfg, &dir, port, &log)?;
        Ok(ProxySwap {
            proxy,
            master,
            cfg,
            dir,
            log,
            port,
            app,
            app_log,
            app_ports,
            apps: [Some(first), None],
            active: 0,
        })
    }

    fn cutover(&mut self, index: u32, clock: &Clock) -> Cutover {
        let now = || clock.now_us() as i64;
        let mut c = Cutover::new(index, now());
        c.mark("requested", c.start_us);
        let next = 1 - self.active;
        let next_port = self.app_ports[next];
        match procs::spawn_app(&self.app, next_port, &self.app_log) {
            Ok(p) => self.apps[next] = Some(p),
            Err(e) => {
                c.fail(format!("starting the new app: {e}"));
                return c;
            }
        }
        if !procs::wait_accepting(procs::loopback(next_port), Duration::from_secs(10)) {
            c.fail("new app not accepting within 10s");
            return c;
        }
        c.mark("new_app_serving", now());
        let old_workers = crate::procstat::children(self.master.pid());
        let cfg = self.proxy.config(self.port, next_port, &self.dir);
        if let Err(e) = procs::write_atomic(&self.cfg, &cfg) {
            c.fail(format!("writing the config: {e}"));
            return c;
        }
        if let Err(e) = self
            .proxy
            .reload(&self.master, &self.cfg, &self.dir, &self.log)
        {
            c.fail(e);
            return c;
        }
        c.mark("reload", now());
        let name = self.proxy.name();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut new_seen = false;
        loop {
            let kids = crate::procstat::children(self.master.pid());
            if !new_seen && kids.iter().any(|k| !old_workers.contains(k)) {
                new_seen = true;
                c.mark("new_worker", now());
            }
            if new_seen && !kids.iter().any(|k| old_workers.contains(k)) {
                c.mark("old_worker_exited", now());
                break;
            }
            if self.master.try_wait().is_some() {
                c.fail(format!("{name} master exited"));
                return c;
            }
            if Instant::now() >= deadline {
                c.fail(format!("{name} reload did not complete within 10s"));
                return c;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(mut old) = self.apps[self.active].take() {
            if old.terminate(Duration::from_secs(10)).is_none() {
                c.fail("old app did not exit");
            }
            c.mark("old_app_exited", now());
        }
        self.active = next;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton::protocol::{Event, Outcome, Trigger};

    fn ev(time_us: u64, generation: u64, elapsed_us: u64, kind: EventKind) -> Reply {
        Reply::Event(Event {
            time_us,
            generation,
            upgrade: Some(3),
            elapsed_us: Some(elapsed_us),
            kind,
        })
    }

    #[test]
    fn phases_and_processes_from_events() {
        let clock = Clock::with_wall(1_000_000);
        let replies = vec![
            ev(
                1_100_000,
                3,
                0,
                EventKind::UpgradeRequested {
                    trigger: Trigger::Control,
                },
            ),
            ev(
                1_101_000,
                3,
                1_000,
                EventKind::Spawned {
                    pid: 9,
                    dir: "/".into(),
                    worker: None,
                },
            ),
            ev(
                1_110_000,
                3,
                10_000,
                EventKind::Ready {
                    pid: 9,
                    via: "notify".into(),
                },
            ),
            ev(1_110_050, 3, 10_040, EventKind::Active { pid: Some(9) }),
            ev(
                1_110_090,
                2,
                10_080,
                EventKind::Draining {
                    pid: 8,
                    signal: "SIGTERM".into(),
                },
            ),
            ev(1_110_100, 3, 10_100, EventKind::UpgradeSucceeded),
            ev(
                1_130_000,
                2,
                30_000,
                EventKind::Exited {
                    pid: 8,
                    status: "exit status 0".into(),
                    worker: None,
                },
            ),
            Reply::Done(Outcome {
                upgrade: 3,
                success: true,
                active: Some(3),
                elapsed_us: 10_100,
                reason: None,
                stderr_tail: vec![],
                config_error: false,
            }),
        ];
        let c = from_replies(7, 99_000, 131_000, &replies, &clock);
        assert!(c.ok, "{:?}", c.error);
        assert_eq!(c.index, 7);
        assert_eq!(c.start_us, 100_000);
        assert_eq!(c.end_us, 130_000);
        assert_eq!(c.phase("ready"), Some(110_000));
        assert_eq!(c.phase("draining"), Some(110_090));
        assert_eq!(c.phase("exited"), Some(130_000));
        assert_eq!(
            (c.new_app, c.old_app),
            (
                Some(AppId {
                    generation: 3,
                    pid: Some(9)
                }),
                Some(AppId {
                    generation: 2,
                    pid: Some(8)
                })
            )
        );
        // Timings of the apps' own come from their stamps, not from here.
        assert_eq!(c.cutover_latency_us, None);
        assert_eq!(c.events.len(), 7);
        let names: Vec<_> = c.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "requested",
                "spawned",
                "ready",
                "active",
                "draining",
                "exited"
            ]
        );
    }

    #[test]
    fn refused_or_truncated_streams_are_failures() {
        let clock = Clock::with_wall(0);
        let refused = vec![Reply::Error(baton::protocol::ErrorReply {
            kind: baton::protocol::ErrorKind::Busy,
            message: "busy".into(),
        })];
        let c = from_replies(0, 5, 9, &refused, &clock);
        assert!(!c.ok);
        assert!(c.error.as_deref().is_some_and(|e| e.contains("Busy")));
        assert_eq!((c.start_us, c.end_us), (5, 9));
        let c = from_replies(0, 5, 9, &[], &clock);
        assert!(!c.ok);
    }
}
