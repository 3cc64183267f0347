//! baton's lifecycle decisions, as one pure state machine.
//!
//! Everything baton decides about an app's generations lives here:
//! starting, readiness, cutover, draining, crash restarts, upgrades,
//! rollbacks and stop. [`Machine::step`] takes an [`Input`] (a command, a
//! process exit with its real wait status, a readiness result, a notify
//! message, the passing of time) and the time it happened, and returns the
//! [`Effect`]s to perform (spawn, signal, probe, reply, publish an event,
//! change who gets traffic). It never reads a clock, touches a process or
//! waits, so every decision can be tested with a list of inputs and the
//! effects expected, as sans-IO protocol libraries (quinn-proto, str0m) are.
//!
//! Three ideas are kept apart:
//! - a generation's [`Phase`]: what it is doing, each phase holding
//!   exactly the data valid in it, with the state of each of its
//!   [`Worker`]s (N processes per generation, each restarted alone);
//! - the process groups ([`Proc`]) the machine answers for, from spawn until
//!   the last member is gone;
//! - the [`TrafficPlan`]: which generation new connections go to (the
//!   active one, a dark or canary candidate, a parked previous one).
//!
//! The thin shell that performs the effects lives in the `baton` crate.
#![forbid(unsafe_code)]

mod backoff;
mod io;
mod machine;
mod state;
mod traffic;
mod types;

pub use backoff::Backoff;
pub use io::{
    Command, Effect, Event, EventKind, Failure, Input, Note, Refusal, Reply, RequestId, UpgradeRef,
    Via,
};
pub use machine::{Machine, FINISHED_KEPT, RELEASES_KEPT, RETIRE_WAIT, STDERR_GRACE};
pub use state::{Check, Generation, Phase, Proc, Upgrade, UpgradePhase, Worker, WorkerRecord};
pub use traffic::{Candidate, TrafficPlan};
pub use types::{
    CpuPriority, ExitStatus, GenId, Health, Overlap, Pid, Readiness, Release, Report, Settings,
    Signal, Spec, Time, TrafficMode, Trigger, UpgradeOptions,
};
