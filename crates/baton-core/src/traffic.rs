//! Who receives new connections: a value of its own, separate from what
//! each generation's processes are doing.

use crate::types::GenId;

/// The traffic plan. A generation's [`Phase`](crate::Phase) says what its
/// processes are doing; the plan says which of them new connections go to.
/// The machine publishes it ([`Effect::Traffic`](crate::Effect::Traffic))
/// whenever it changes. With steered traffic the shell turns it into the
/// kernel's choice of socket for each new connection; with one socket
/// shared by every generation there is nothing to steer and the shell only
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TrafficPlan {
    /// The generation new connections belong to: restarted if it crashes,
    /// kept if an upgrade fails. `None` only before the first start.
    pub active: Option<GenId>,
    /// The generation being brought in: it receives baton's probes, and
    /// `share` percent of new connections (0: dark).
    pub candidate: Option<Candidate>,
    /// The previous generation during a bake: running, receiving nothing
    /// new, ready to take the traffic back at once.
    pub parked: Option<GenId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Candidate {
    pub gen: GenId,
    /// Percent of new connections, 0..=100.
    pub share: u8,
}

impl TrafficPlan {
    /// Where baton's own probes (readiness and health checks) go: the
    /// candidate if there is one, else the active generation.
    pub fn probe_target(&self) -> Option<GenId> {
        self.candidate.map(|c| c.gen).or(self.active)
    }
}
