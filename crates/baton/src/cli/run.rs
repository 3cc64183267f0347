//! `baton run`: check everything, bind, then supervise until stopped.

use std::path::PathBuf;
use std::time::Duration;

use baton::config::TrafficMode;
use baton::config::{ConfigSource, Overrides};
use baton::handover::{FdNum, State};
use baton::listener::InheritedSockets;
use baton::notify::NotifySocket;
use baton::process::StderrSink;
use baton::protocol::Trigger;
use baton::steer::program::PortRange;
use baton::steer::Sockets;
use baton::supervisor::{Ask, Handle, HandoverFds, Supervisor};
use baton::systemd::ServiceManager;
use baton::{control, metrics, process};
use baton_core::UpgradeOptions;
use std::os::fd::AsFd;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::{CliError, RunArgs, EXIT_OK};

pub async fn supervise(
    args: RunArgs,
    control: Option<PathBuf>,
    mut inherited: InheritedSockets,
    spawner: process::Spawner,
) -> Result<u8, CliError> {
    let setup = |what| move |source| CliError::Setup { what, source };
    let base_dir = std::env::current_dir().map_err(setup("reading the current directory"))?;
    let source = ConfigSource {
        file: args.config.clone(),
        overrides: Overrides {
            listen: args.listen,
            metrics: args.metrics,
            log_format: args.log_format,
            command: args.command,
            cwd: args.cwd,
            env: args.env,
            env_clear: args.env_clear,
            ready: args.ready,
            ready_timeout: args.ready_timeout,
            drain_signal: args.drain_signal,
            drain_timeout: args.drain_timeout,
            control,
            backlog: args.backlog,
            user: args.user,
            group: args.group,
            traffic: args.traffic,
            bake: args.bake,
            health: args.health,
            health_interval: args.health_interval,
            health_failures: args.health_failures,
            probe_ports: args.probe_ports,
            workers: args.workers,
            releases_dir: args.releases_dir,
            keep_releases: args.keep_releases,
            overlap: args.overlap,
            candidate_priority: args.candidate_priority,
        },
        base_dir,
    };
    let config = source.load()?;
    let _logs = super::init_tracing(config.log_format);
    // Before the first deploy there is no `current` to run in: say so
    // rather than that the program is missing.
    if let Some(root) = &config.releases_dir {
        let current = root.join("current");
        if config.cwd == current && current.symlink_metadata().is_err() {
            return Err(CliError::NoRelease {
                current,
                root: root.clone(),
            });
        }
    }
    // Everything that can be checked is checked before the first bind, so
    // a bad invocation starts nothing.
    process::resolve_config(&config, &process::own_env())?;
    if (config.user.is_some() || config.group.is_some()) && !nix::unistd::geteuid().is_root() {
        return Err(CliError::NeedsRoot);
    }
    // Signal handlers before anything starts: without them SIGTERM would
    // kill baton outright and leave its apps to the parent-death signal.
    let signals = Signals::install_with_thread()?;
    let manager = ServiceManager::from_env()?;
    // First of the binds: an address that cannot be had starts nothing.
    let metrics_listener = config.metrics.map(metrics::bind).transpose()?;
    let sockets = Sockets::bind(
        &config.listen,
        config.backlog,
        config.traffic,
        config.probe_ports,
        &mut inherited,
    )?;
    inherited.close_unclaimed();
    for s in sockets.info() {
        tracing::info!(name = %s.name, address = %s.address, steered = s.steered, "listening");
        if s.datagram && sockets.mode() == TrafficMode::Steered {
            tracing::info!(
                name = %s.name,
                "datagrams are never steered: every generation reads this one shared socket"
            );
        }
    }
    if sockets.mode() == TrafficMode::Steered {
        warn_if_probe_ports_are_ephemeral(config.probe_ports);
    }
    let control_listener = control::bind(&config.control, !config.control_allow_uids.is_empty())?;
    let runtime_dir = notify_dir(config.user.is_some() || config.group.is_some())
        .map_err(setup("creating the notify socket's directory"))?;
    let notify = NotifySocket::bind(&runtime_dir.path().join("notify.sock"))
        .map_err(setup("binding the notify socket"))?;
    let control_path = config.control.clone();
    let allowed = config.control_allow_uids.clone();
    let log_format = config.log_format;
    let handover = handover_fds(
        &control_listener,
        &notify,
        runtime_dir.path(),
        metrics_listener.as_ref(),
    )?;
    let supervisor = |app_stderr| {
        Supervisor::new(
            source, config, sockets, notify, app_stderr, manager, spawner,
        )
    };
    serve(
        supervisor,
        Serving {
            signals,
            log_format,
            control_listener,
            control_path,
            allowed,
            metrics_listener,
            handover,
            notify_dir: NotifyDir::Temp(runtime_dir),
        },
    )
    .await
}

/// Continues a baton that is upgrading itself (`__handover`): takes every
/// descriptor and the state the previous image handed over, and
/// supervises on from there.
pub async fn resume(state_fd: i32, spawner: process::Spawner) -> Result<u8, CliError> {
    let setup = |what| move |source| CliError::Setup { what, source };
    let doc = FdNum(state_fd)
        .take()
        .map_err(setup("taking the hand-over document"))?;
    let state = State::read(std::fs::File::from(doc))?;
    let _logs = super::init_tracing(state.initial.log_format);
    let signals = Signals::install_with_thread()?;
    let manager = ServiceManager::from_env()?;
    let taking = setup("taking the sockets handed over");
    let sockets = Sockets::take_over(state.sockets).map_err(taking)?;
    let control_listener = {
        let fd = state
            .control
            .take()
            .map_err(setup("taking the control socket"))?;
        let std = std::os::unix::net::UnixListener::from(fd);
        std.set_nonblocking(true)
            .map_err(setup("taking the control socket"))?;
        tokio::net::UnixListener::from_std(std).map_err(setup("taking the control socket"))?
    };
    let notify = state
        .notify
        .fd
        .take()
        .and_then(|fd| NotifySocket::handed_over(fd, &state.notify.path))
        .map_err(setup("taking the notify socket"))?;
    let metrics_listener = match state.metrics {
        Some(fd) => {
            let std =
                std::net::TcpListener::from(fd.take().map_err(setup("taking the metrics socket"))?);
            std.set_nonblocking(true)
                .map_err(setup("taking the metrics socket"))?;
            Some(
                tokio::net::TcpListener::from_std(std)
                    .map_err(setup("taking the metrics socket"))?,
            )
        }
        None => None,
    };
    let control_path = state.initial.control.clone();
    let allowed = state.initial.control_allow_uids.clone();
    let log_format = state.initial.log_format;
    let handover = handover_fds(
        &control_listener,
        &notify,
        &state.notify.dir,
        metrics_listener.as_ref(),
    )?;
    tracing::info!(
        handover = state.handovers,
        from_version = %state.from_version,
        version = env!("CARGO_PKG_VERSION"),
        "took over from the previous baton image"
    );
    let notify_dir = NotifyDir::Path(state.notify.dir.clone());
    let supervisor = |app_stderr| {
        Supervisor::resume(
            state.machine,
            state.clock_us,
            state.source,
            state.initial,
            sockets,
            notify,
            app_stderr,
            manager,
            spawner,
            state.procs,
            state.handovers,
            state.argv0,
            state.systemd_ready,
        )
    };
    serve(
        supervisor,
        Serving {
            signals,
            log_format,
            control_listener,
            control_path,
            allowed,
            metrics_listener,
            handover,
            notify_dir,
        },
    )
    .await
}

/// Copies of the descriptors the serving tasks own, for a later hand-over.
fn handover_fds(
    control: &tokio::net::UnixListener,
    notify: &NotifySocket,
    notify_dir: &std::path::Path,
    metrics: Option<&tokio::net::TcpListener>,
) -> Result<HandoverFds, CliError> {
    let setup = |source| CliError::Setup {
        what: "copying descriptors for a later self-upgrade",
        source,
    };
    Ok(HandoverFds {
        control: control.as_fd().try_clone_to_owned().map_err(setup)?,
        notify: notify.try_clone_fd().map_err(setup)?,
        notify_dir: notify_dir.to_owned(),
        metrics: metrics
            .map(|m| m.as_fd().try_clone_to_owned())
            .transpose()
            .map_err(setup)?,
    })
}

/// Where the notify socket's private directory is, to remove at exit.
enum NotifyDir {
    Temp(tempfile::TempDir),
    /// Created by a previous image of this baton.
    Path(PathBuf),
}

/// What a supervisor is served with, fresh or taken over.
struct Serving {
    signals: Signals,
    log_format: baton::config::LogFormat,
    control_listener: tokio::net::UnixListener,
    control_path: PathBuf,
    allowed: Vec<u32>,
    metrics_listener: Option<tokio::net::TcpListener>,
    handover: HandoverFds,
    notify_dir: NotifyDir,
}

/// Runs the supervisor made by `make` (given the apps' stderr sink) with
/// its control server, signals and metrics, until it is done; then cleans
/// up.
async fn serve(
    make: impl FnOnce(StderrSink) -> std::io::Result<Supervisor>,
    s: Serving,
) -> Result<u8, CliError> {
    let setup = |what| move |source| CliError::Setup { what, source };
    // The apps' stderr lines share baton's stderr through their own
    // non-blocking writer (flushed, boundedly, when the guard drops).
    let (app_stderr, _app_stderr_guard) = super::stderr_writer("baton-app-stderr");
    let app_stderr = StderrSink::new(app_stderr, s.log_format);
    let mut supervisor = make(app_stderr).map_err(setup("starting the supervisor"))?;
    let connections = control::Connections::default();
    let (pause, paused) = tokio::sync::watch::channel(false);
    supervisor.set_handover_fds(s.handover, pause, connections.clone());
    let handle = supervisor.handle();
    let metrics_server = match s.metrics_listener {
        Some(listener) => {
            let address = listener
                .local_addr()
                .map_err(setup("reading the metrics address"))?;
            // Tests and operators learn an OS-chosen port from this line.
            tracing::info!(%address, "metrics listening");
            Some(tokio::spawn(metrics::serve(listener, supervisor.metrics())))
        }
        None => None,
    };
    tracing::info!(control = %s.control_path.display(), pid = std::process::id(), "supervisor started");
    let server = tokio::spawn(control::serve(
        s.control_listener,
        handle.clone(),
        s.allowed,
        connections.clone(),
        paused,
    ));
    let signal_task = tokio::spawn(s.signals.serve(handle));
    let result = supervisor.run(std::future::pending()).await;
    server.abort();
    signal_task.abort();
    if let Some(task) = metrics_server {
        task.abort();
    }
    // Let replies in flight (`stop`'s own) reach their clients.
    connections.drained(Duration::from_secs(1)).await;
    let _ = std::fs::remove_file(&s.control_path);
    match s.notify_dir {
        NotifyDir::Temp(dir) => drop(dir),
        NotifyDir::Path(dir) => {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    result.map_err(CliError::StartApp)?;
    Ok(EXIT_OK)
}

/// Probes are told apart from clients by their source port: a range that
/// overlaps the kernel's ephemeral ports could make an ordinary local
/// client (a proxy on the same machine) reach a dark candidate.
fn warn_if_probe_ports_are_ephemeral(probes: PortRange) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut it = text
        .split_whitespace()
        .filter_map(|v| v.parse::<u16>().ok());
    if let (Some(lo), Some(hi)) = (it.next(), it.next()) {
        if probes.first <= hi && lo <= probes.last {
            tracing::warn!(
                "probe ports {probes} overlap the kernel's ephemeral ports {lo}-{hi} \
                 (net.ipv4.ip_local_port_range): a local client could reach a dark \
                 candidate; choose probe_ports outside it"
            );
        }
    }
}

/// A private directory for the notify socket, reachable (0711) by apps
/// that run as another user. With `--user`, `$XDG_RUNTIME_DIR` (a 0700
/// per-user directory) would be out of the app's reach, so the system
/// runtime dir (or the temp dir) is used instead.
fn notify_dir(other_user: bool) -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let base = if other_user {
        Some(PathBuf::from("/run")).filter(|d| d.is_dir())
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
    }
    .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new().prefix("baton-").tempdir_in(base)?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
    Ok(dir)
}

/// SIGHUP upgrades the app; SIGUSR2 upgrades baton itself; SIGTERM and
/// SIGINT stop.
struct Signals {
    hup: Signal,
    usr2: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        install_all(&[
            SignalKind::hangup(),
            SignalKind::user_defined2(),
            SignalKind::terminate(),
            SignalKind::interrupt(),
        ])
        .map(|mut s| {
            let int = s.pop().expect("four handlers");
            let term = s.pop().expect("four handlers");
            let usr2 = s.pop().expect("four handlers");
            let hup = s.pop().expect("four handlers");
            Self {
                hup,
                usr2,
                term,
                int,
            }
        })
    }

    /// Installs the handlers, then starts the thread that takes the
    /// signals: every other thread blocks them (the main thread, which
    /// forks; the runtime's threads, which inherit a re-executed baton's
    /// mask).
    fn install_with_thread() -> Result<Self, CliError> {
        let setup = |what| move |source| CliError::Setup { what, source };
        let signals = Self::install().map_err(setup("installing signal handlers"))?;
        std::thread::Builder::new()
            .name("baton-signals".into())
            .spawn(|| {
                if let Err(e) = baton_sys::unblock_all_signals() {
                    tracing::error!("the signal thread cannot unblock signals: {e}");
                }
                loop {
                    std::thread::park();
                }
            })
            .map_err(setup("starting the signal thread"))?;
        Ok(signals)
    }

    async fn serve(mut self, handle: Handle) {
        loop {
            tokio::select! {
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: upgrade requested");
                    let ask = Ask::Upgrade(UpgradeOptions::default());
                    if let Err(e) = handle.upgrade(Trigger::Signal, ask).await {
                        tracing::info!("SIGHUP: {}", e.message);
                    }
                }
                _ = self.usr2.recv() => {
                    tracing::info!("SIGUSR2: baton upgrades itself");
                    if let Err(e) = handle.upgrade_self().await {
                        tracing::warn!("SIGUSR2: {}", e.message);
                    }
                }
                _ = self.term.recv() => { tracing::info!("SIGTERM: stopping"); handle.stop().await; }
                _ = self.int.recv() => { tracing::info!("SIGINT: stopping"); handle.stop().await; }
            }
        }
    }
}

/// Installs a handler for each kind, or fails on the first that cannot be.
fn install_all(kinds: &[SignalKind]) -> std::io::Result<Vec<Signal>> {
    kinds.iter().map(|k| signal(*k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handler that cannot be installed is an error, not a log line:
    /// `baton run` turns it into a start-up failure (exit 2).
    #[tokio::test]
    async fn a_handler_that_cannot_be_installed_is_an_error() {
        let forbidden = SignalKind::from_raw(libc_sigkill());
        assert!(install_all(&[SignalKind::hangup(), forbidden]).is_err());
        assert!(
            install_all(&[SignalKind::hangup()]).is_ok(),
            "positive control"
        );
    }

    fn libc_sigkill() -> i32 {
        nix::sys::signal::Signal::SIGKILL as i32
    }
}
