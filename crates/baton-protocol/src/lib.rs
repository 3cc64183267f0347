//! baton's wire formats, kept apart from its internal state:
//! - [`control`]: the JSON requests, replies, events and status of the
//!   control socket (what `baton upgrade` and orchestrators speak);
//! - [`app`]: the socket-activation protocol an app is started with, and
//!   [`notify`], the sd_notify messages it may send back.
//!
//! Data and parsers only; see docs/protocol.md.
#![forbid(unsafe_code)]

pub mod app;
pub mod control;
pub mod notify;

pub use control::*;
