//! Starting and stopping the processes under test: the example app alone,
//! baton with the app, and HAProxy. Every process started here is stopped
//! by its [`Proc`] guard (SIGTERM, then SIGKILL), even on an early return,
//! so a failed bench leaves nothing behind holding a port.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The binaries the bench drives.
#[derive(Debug, Clone)]
pub struct Bins {
    pub baton: PathBuf,
    pub app: PathBuf,
    /// `None` when HAProxy is not installed.
    pub haproxy: Option<PathBuf>,
}

/// Looks for `name` next to this executable (target/release/ when built
/// with the workspace), unless given explicitly.
pub fn sibling(name: &str, given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(format!("{} does not exist", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating myself: {e}"))?;
    let dir = exe.parent().ok_or("my executable has no directory")?;
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found next to baton-bench; run `cargo build --release --workspace` or pass --{}",
            p.display(),
            if name == "baton" { "baton" } else { "app" }
        ))
    }
}

/// Finds a program on PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A free TCP port on 127.0.0.1 (the kernel's choice; released at once, so
/// another process could take it first, which would show as a bind error).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Polls until something accepts connections on `addr`.
pub fn wait_accepting(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// A child process that is stopped when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    pub name: String,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with stdin closed and its output appended to `log`.
    pub fn spawn(mut cmd: Command, name: &str, log: &Path) -> io::Result<Proc> {
        let out = File::options().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {name}: {e}")))?;
        Ok(Proc {
            child,
            name: name.to_owned(),
            exited: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: Signal) -> nix::Result<()> {
        if self.exited.is_some() {
            return Ok(());
        }
        kill(Pid::from_raw(self.pid()), sig)
    }

    /// The exit status, if it has exited (without blocking).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_for(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_wait() {
            return Some(s);
        }
        let _ = self.signal(Signal::SIGTERM);
        if let Some(s) = self.wait_for(grace) {
            return Some(s);
        }
        let _ = self.signal(Signal::SIGKILL);
        self.wait_for(Duration::from_secs(5))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(3));
    }
}

/// The example app listening on its own (its fallback when it receives no
/// sockets): the ceiling, and the naive deploy's process.
pub fn spawn_app(app: &Path, port: u16, log: &Path) -> io::Result<Proc> {
    let mut cmd = Command::new(app);
    cmd.arg("--listen").arg(loopback(port).to_string());
    // It must not think it was socket-activated by an outer supervisor.
    cmd.env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("NOTIFY_SOCKET")
        .env_remove(crate::stamps::ENV);
    Proc::spawn(cmd, "app", log)
}

/// Starts `baton run` with the app and waits until its first generation is
/// active and the port accepts. With `stamps`, every app generation gets
/// `HELLO_STAMPS` (see [`crate::stamps`]) through baton's environment.
/// `flags` go to `baton run` before the app's command (e.g. `--traffic
/// shared`, `--bake 60s`).
pub fn spawn_baton(
    bins: &Bins,
    port: u16,
    control: &Path,
    stamps: Option<&Path>,
    flags: &[&str],
    log: &Path,
) -> Result<Proc, String> {
    let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    spawn_baton_with(bins, port, control, stamps, log, &flags, &[])
}

/// [`spawn_baton`] with more `baton run` flags (`--overlap none`) and
/// arguments for the app (`--delay-ready 50`).
pub fn spawn_baton_with(
    bins: &Bins,
    port: u16,
    control: &Path,
    stamps: Option<&Path>,
    log: &Path,
    run_flags: &[String],
    app_args: &[String],
) -> Result<Proc, String> {
    let mut cmd = Command::new(&bins.baton);
    cmd.arg("run")
        .arg("--listen")
        .arg(format!("http={}", loopback(port)))
        .arg("--control")
        .arg(control)
        .args(run_flags)
        .arg("--")
        .arg(&bins.app)
        .args(app_args);
    cmd.env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("BATON_CONTROL")
        .env_remove(crate::stamps::ENV);
    if let Some(path) = stamps {
        cmd.env(crate::stamps::ENV, path);
    }
    let mut p = Proc::spawn(cmd, "baton", log).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = p.try_wait() {
            return Err(format!(
                "baton exited at start ({s}); see {}",
                log.display()
            ));
        }
        if control.exists() && wait_accepting(loopback(port), Duration::from_millis(50)) {
            if let Some(active) = crate::cutover::baton_active(control) {
                if active.is_some() {
                    return Ok(p);
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "baton did not become ready in 10s; see {}",
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The HAProxy configuration: one frontend on `port`, one backend server
/// (the app instance of the moment), master-worker mode with listeners
/// passed to the new worker on reload (seamless reload).
pub fn haproxy_config(port: u16, app_port: u16, dir: &Path, threads: usize) -> String {
    let template = include_str!("../../../benches/haproxy.cfg.in");
    template
        .replace(
            "@STATS_SOCKET@",
            &dir.join("haproxy.sock").display().to_string(),
        )
        .replace("@THREADS@", &threads.to_string())
        .replace("@FRONTEND@", &loopback(port).to_string())
        .replace("@BACKEND@", &loopback(app_port).to_string())
}

/// Writes a file atomically (HAProxy re-reads it on reload).
pub fn write_atomic(path: &Path, text: &str) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

/// The nginx configuration: one server on `port` proxying to the app
/// instance of the moment on `app_port`, with kept-alive upstream
/// connections (as HAProxy keeps them), its pid file, temp paths and log
/// in `dir`.
pub fn nginx_config(port: u16, app_port: u16, dir: &Path, workers: usize) -> String {
    let template = include_str!("../../../benches/nginx.conf.in");
    template
        .replace("@DIR@", &dir.display().to_string())
        .replace("@WORKERS@", &workers.to_string())
        .replace("@FRONTEND@", &loopback(port).to_string())
        .replace("@BACKEND@", &loopback(app_port).to_string())
}

/// `nginx` with the bench's configuration and prefix, and `extra` (e.g.
/// `-s reload`); `-e stderr` so that it never opens the system's log.
pub fn nginx_args(nginx: &Path, cfg: &Path, dir: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut argv: Vec<OsString> = vec![nginx.into(), "-e".into(), "stderr".into()];
    argv.extend(["-p".into(), dir.into(), "-c".into(), cfg.into()]);
    argv.extend(extra.iter().map(OsString::from));
    argv
}

/// Starts HAProxy in master-worker mode (`-W`) in the foreground.
pub fn spawn_haproxy(haproxy: &Path, cfg: &Path, port: u16, log: &Path) -> Result<Proc, String> {
    let mut cmd = Command::new(haproxy);
    cmd.arg("-W").arg("-f").arg(cfg);
    spawn_proxy(cmd, "haproxy", port, log)
}

/// Starts nginx's master in the foreground (`daemon off` in the config).
pub fn spawn_nginx(
    nginx: &Path,
    cfg: &Path,
    dir: &Path,
    port: u16,
    log: &Path,
) -> Result<Proc, String> {
    let argv = nginx_args(nginx, cfg, dir, &[]);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    spawn_proxy(cmd, "nginx", port, log)
}

/// Starts a proxy's master and waits until it has a worker and the port
/// accepts.
fn spawn_proxy(cmd: Command, name: &'static str, port: u16, log: &Path) -> Result<Proc, String> {
    let mut p = Proc::spawn(cmd, name, log).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(s) = p.try_wait() {
            return Err(format!(
                "{name} exited at start ({s}); see {}",
                log.display()
            ));
        }
        if !crate::procstat::children(p.pid()).is_empty()
            && wait_accepting(loopback(port), Duration::from_millis(50))
        {
            return Ok(p);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "{name} did not start in 10s; see {}",
        log.display()
    ))
}

/// Scratch space for control sockets (a short path: Unix socket paths are
/// limited to 108 bytes), removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// `$TMPDIR/baton-bench[-what]-PID`, created.
    pub fn new(what: &str) -> io::Result<Scratch> {
        let name = if what.is_empty() {
            format!("baton-bench-{}", std::process::id())
        } else {
            format!("baton-bench-{what}-{}", std::process::id())
        };
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
