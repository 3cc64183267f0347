//! Crash-restart delays.

use std::time::Duration;

/// Capped exponential backoff for crash restarts; it starts over after a
/// process has stayed up for `stable`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    stable: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        let initial = Duration::from_millis(100).min(max);
        Self {
            initial,
            max,
            stable: Duration::from_secs(10),
            next: initial,
        }
    }

    /// Delay before restarting a process that ran for `uptime`.
    pub fn on_exit(&mut self, uptime: Duration) -> Duration {
        if uptime >= self.stable {
            self.next = self.initial;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let quick = Duration::from_millis(5);
        let delays: Vec<_> = (0..6).map(|_| b.on_exit(quick).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.on_exit(Duration::from_secs(11)).as_millis(), 100);
    }

    #[test]
    fn a_cap_below_the_first_step_is_the_only_delay() {
        let mut b = Backoff::new(Duration::from_millis(30));
        assert_eq!(b.on_exit(Duration::ZERO), Duration::from_millis(30));
        assert_eq!(b.on_exit(Duration::ZERO), Duration::from_millis(30));
    }
}
