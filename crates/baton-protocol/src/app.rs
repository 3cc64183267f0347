//! What an app is started with: the systemd socket-activation protocol,
//! plus baton's own generation and worker numbers.

/// Number of listening descriptors passed, starting at fd 3.
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// Their names, `:`-separated, in fd order.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// The pid the descriptors are meant for (the app's own).
pub const LISTEN_PID: &str = "LISTEN_PID";
/// Datagram socket for `READY=1`, `STATUS=…`, `STOPPING=1`.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
/// The generation the process belongs to: 1, 2, …
pub const BATON_GENERATION: &str = "BATON_GENERATION";
/// Which of its generation's workers the process is: 0, 1, … (`--workers`).
pub const BATON_WORKER: &str = "BATON_WORKER";

/// Variables baton sets for every generation; configuration may not, and
/// they are never inherited from baton's own environment.
pub const PROTOCOL_ENV: &[&str] = &[
    LISTEN_FDS,
    LISTEN_FDNAMES,
    LISTEN_PID,
    NOTIFY_SOCKET,
    BATON_GENERATION,
    BATON_WORKER,
];

/// First descriptor number of the passed sockets.
pub const FIRST_FD: u32 = 3;

/// Fd name of the private per-generation probe listener (shared sockets
/// with an `http:` or `tcp` readiness check).
pub const PROBE_FD_NAME: &str = "baton-probe";
