//! Who receives new connections: a value of its own, separate from what
//! each generation's processes are doing.

use crate::types::GenId;

/// The traffic plan. A generation's [`Phase`](crate::Phase) says what its
/// processes are doing; the plan says which of them new connections go to.
/// The machine publishes it ([`Effect::Traffic`](crate::Effect::Traffic))
/// whenever it changes; with one socket shared by every generation the
/// shell has nothing to steer and only reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrafficPlan {
    /// The generation new connections belong to: restarted if it crashes,
    /// kept if an upgrade fails. `None` only before the first start.
    pub active: Option<GenId>,
}
