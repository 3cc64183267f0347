//! baton: a zero-downtime socket-handoff supervisor.
//!
//! baton binds the listening sockets itself, starts the app with them
//! through the systemd socket-activation protocol, and upgrades it
//! blue/green: a new generation starts beside the old one on the same
//! sockets, is health-checked, becomes active, and the old one drains.
//! See the README and docs/ for the user-facing story.

pub mod cli;
pub mod config;
pub mod control;
pub mod listener;
pub mod notify;
pub mod probe;
pub mod process;
pub mod protocol;
pub mod supervisor;
mod sys;
