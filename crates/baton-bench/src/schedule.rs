//! The open-loop timetable and the cutover plan: pure arithmetic, kept
//! apart so it can be tested without sockets or clocks.
//!
//! All times are microseconds since the run's start (its [`Clock`]).
//!
//! [`Clock`]: crate::load::Clock

use std::time::Duration;

/// A constant-rate timetable: request `k` (from 0) is due at
/// `start + k / rate`. Computed from `k` rather than accumulated, so a long
/// run does not drift.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub start_us: u64,
    /// Microseconds between two requests (may be fractional).
    pub period_us: f64,
}

impl Schedule {
    /// `rate` requests per second from `start_us`. Rates outside
    /// (0, 10 000 000] are refused.
    pub fn new(start_us: u64, rate: f64) -> Option<Schedule> {
        (rate.is_finite() && rate > 0.0 && rate <= 1e7).then(|| Schedule {
            start_us,
            period_us: 1e6 / rate,
        })
    }

    /// When request `k` is due.
    pub fn time_of(&self, k: u64) -> u64 {
        self.start_us + (k as f64 * self.period_us).round() as u64
    }

    /// How many requests are due at `now_us` (those with `time_of(k) <= now`).
    pub fn due_by(&self, now_us: u64) -> u64 {
        if now_us < self.start_us {
            return 0;
        }
        // Estimate, then correct for rounding at the boundary.
        let mut n = ((now_us - self.start_us) as f64 / self.period_us).floor() as u64 + 1;
        while n > 0 && self.time_of(n - 1) > now_us {
            n -= 1;
        }
        while self.time_of(n) <= now_us {
            n += 1;
        }
        n
    }
}

/// When to trigger cutovers: after `lead`, `count` times, each `interval`
/// after the previous one was *started* (or right after it finished, if it
/// took longer), then `tail` of load with no cutover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutoverPlan {
    pub lead: Duration,
    pub interval: Duration,
    pub count: u32,
    pub tail: Duration,
}

impl CutoverPlan {
    /// When cutover `i` is planned, if none is late.
    pub fn planned(&self, i: u32) -> Duration {
        self.lead + self.interval * i
    }

    /// The nominal length of a run with this plan.
    pub fn nominal(&self) -> Duration {
        self.lead + self.interval * self.count + self.tail
    }

    /// A hard cap for the run: the nominal length, plus room for cutovers
    /// that take longer than planned (each may take up to `slack` more).
    pub fn hard_cap(&self, slack: Duration) -> Duration {
        self.nominal() + slack * self.count.min(50) + Duration::from_secs(10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timetable_is_exact_and_does_not_drift() {
        let s = Schedule::new(1_000, 3.0).expect("rate");
        assert_eq!(s.time_of(0), 1_000);
        assert_eq!(s.time_of(1), 1_000 + 333_333);
        assert_eq!(s.time_of(3), 1_000 + 1_000_000);
        assert_eq!(s.time_of(3_000_000), 1_000 + 1_000_000_000_000);
    }

    #[test]
    fn due_by_counts_requests_at_or_before_now() {
        let s = Schedule::new(100, 1000.0).expect("rate"); // every 1000 µs
        assert_eq!(s.due_by(0), 0);
        assert_eq!(s.due_by(99), 0);
        assert_eq!(s.due_by(100), 1);
        assert_eq!(s.due_by(1_099), 1);
        assert_eq!(s.due_by(1_100), 2);
        assert_eq!(s.due_by(1_000_100), 1_001);
        // Consistency with time_of at fractional periods.
        let s = Schedule::new(0, 7_777.0).expect("rate");
        for now in (0..200_000).step_by(37) {
            let n = s.due_by(now);
            assert!(n == 0 || s.time_of(n - 1) <= now, "now {now} n {n}");
            assert!(s.time_of(n) > now, "now {now} n {n}");
        }
    }

    #[test]
    fn refuses_silly_rates() {
        assert!(Schedule::new(0, 0.0).is_none());
        assert!(Schedule::new(0, -1.0).is_none());
        assert!(Schedule::new(0, f64::NAN).is_none());
        assert!(Schedule::new(0, 1e9).is_none());
    }

    #[test]
    fn plan_times() {
        let p = CutoverPlan {
            lead: Duration::from_secs(1),
            interval: Duration::from_millis(500),
            count: 4,
            tail: Duration::from_secs(1),
        };
        assert_eq!(p.planned(0), Duration::from_secs(1));
        assert_eq!(p.planned(3), Duration::from_millis(2_500));
        assert_eq!(p.nominal(), Duration::from_secs(4));
        assert_eq!(p.hard_cap(Duration::from_secs(2)), Duration::from_secs(22));
    }
}
