//! `baton run`: check everything, bind, then supervise until stopped.

use std::path::PathBuf;
use std::time::Duration;

use baton::config::TrafficMode;
use baton::config::{ConfigSource, Overrides};
use baton::notify::NotifySocket;
use baton::protocol::Trigger;
use baton::steer::program::PortRange;
use baton::steer::Sockets;
use baton::supervisor::{Ask, Handle, Supervisor};
use baton::{control, process};
use baton_core::UpgradeOptions;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::{CliError, RunArgs, EXIT_OK};

pub async fn supervise(args: RunArgs, control: Option<PathBuf>) -> Result<u8, CliError> {
    let setup = |what| move |source| CliError::Setup { what, source };
    let base_dir = std::env::current_dir().map_err(setup("reading the current directory"))?;
    let source = ConfigSource {
        file: args.config.clone(),
        overrides: Overrides {
            listen: args.listen,
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
            overlap: args.overlap,
        },
        base_dir,
    };
    let config = source.load()?;
    // Everything that can be checked is checked before the first bind, so
    // a bad invocation starts nothing.
    process::resolve_config(&config, &process::own_env())?;
    if (config.user.is_some() || config.group.is_some()) && !nix::unistd::geteuid().is_root() {
        return Err(CliError::NeedsRoot);
    }
    // Signal handlers before anything starts: without them SIGTERM would
    // kill baton outright and leave its apps to the parent-death signal.
    let signals = Signals::install().map_err(setup("installing signal handlers"))?;
    let sockets = Sockets::bind(
        &config.listen,
        config.backlog,
        config.traffic,
        config.probe_ports,
    )?;
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
    // The apps' stderr lines share baton's stderr through their own
    // non-blocking writer (flushed, boundedly, when the guard drops).
    let (app_stderr, _app_stderr_guard) = super::stderr_writer("baton-app-stderr");
    let supervisor = Supervisor::new(source, config, sockets, notify, app_stderr)
        .map_err(setup("starting the spawner thread"))?;
    let handle = supervisor.handle();
    tracing::info!(control = %control_path.display(), pid = std::process::id(), "supervisor started");
    let connections = control::Connections::default();
    let server = tokio::spawn(control::serve(
        control_listener,
        handle.clone(),
        allowed,
        connections.clone(),
    ));
    let signal_task = tokio::spawn(signals.serve(handle));
    let result = supervisor.run(std::future::pending()).await;
    server.abort();
    signal_task.abort();
    // Let replies in flight (`stop`'s own) reach their clients.
    connections.drained(Duration::from_secs(1)).await;
    let _ = std::fs::remove_file(&control_path);
    drop(runtime_dir);
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

/// SIGHUP upgrades; SIGTERM and SIGINT stop.
struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        install_all(&[
            SignalKind::hangup(),
            SignalKind::terminate(),
            SignalKind::interrupt(),
        ])
        .map(|mut s| {
            let int = s.pop().expect("three handlers");
            let term = s.pop().expect("three handlers");
            let hup = s.pop().expect("three handlers");
            Self { hup, term, int }
        })
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
