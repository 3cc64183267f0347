//! baton: a zero-downtime socket-handoff supervisor.
//!
//! baton binds the listening sockets itself, starts the app with them
//! through the systemd socket-activation protocol, and upgrades it
//! blue/green: a new generation starts beside the old one on the same
//! sockets, is health-checked, becomes active, and the old one drains.
//!
//! The crates: `baton-core` decides (a pure state machine), this crate is
//! the thin tokio shell that performs its decisions (processes, sockets,
//! probes, the control socket), `baton-protocol` holds the wire formats and
//! `baton-sys` all the unsafe code. The CLI lives in the binary. See the
//! README and docs/ for the user-facing story.
#![forbid(unsafe_code)]

pub mod config;
pub mod control;
pub mod handover;
mod hup;
pub mod listener;
pub mod metrics;
pub mod notify;
pub mod probe;
pub mod process;
pub mod releases;
pub mod steer;
pub mod supervisor;
pub mod systemd;
pub mod wire;

/// The control protocol's wire types, and what apps receive and send.
pub use baton_protocol as protocol;

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
