//! End-to-end tests: the real `baton` binary, real sockets on OS-chosen
//! loopback ports, temp dirs, and the example apps. See tests/lib.rs.
#![allow(clippy::unwrap_used)]

mod cutover;
mod deploy;
mod failures;
mod hardening;
mod lifecycle;
mod observability;
mod overlap;
mod priority;
mod protocol;
mod regressions;
mod self_upgrade;
mod steering;
mod systemd;
mod udp;
mod workers;
