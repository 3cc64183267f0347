//! Cutover latency measured from outside baton, by the apps themselves.
//!
//! Given `HELLO_STAMPS=FILE`, the example app (`examples/hello-rust`)
//! appends one line per lifecycle moment, `<event> <generation> <pid> <ns>`,
//! where `ns` is CLOCK_MONOTONIC, one clock for every process on the
//! machine:
//!
//! - `ready`: read right before the app sends READY=1;
//! - `drain`: read when its drain signal (SIGTERM) reaches the app.
//!
//! A cutover's latency is the old generation's `drain` stamp minus the new
//! generation's `ready` stamp: how long it took, as the two apps saw it,
//! from the new version saying it is ready to the old one being told to
//! leave (baton receiving READY=1, deciding, signalling, and the signal
//! reaching the old app). baton's events only say which two processes a
//! cutover involved (generation and pid); none of baton's times is used.
//!
//! The load generator adds the client's view: when the first response
//! whose body says the new generation reached it, on the same clock.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use nix::time::{clock_gettime, ClockId};
use serde::Serialize;

use crate::cutover::Cutover;
use crate::load::Clock;

/// The environment variable that tells the example app where to stamp.
pub const ENV: &str = "HELLO_STAMPS";

/// CLOCK_MONOTONIC now, in ns (what the apps write).
pub fn mono_now_ns() -> Option<u64> {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).ok()?;
    Some(u64::try_from(t.tv_sec()).ok()? * 1_000_000_000 + u64::try_from(t.tv_nsec()).ok()?)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// First thing in `main`.
    Start,
    /// About to send READY=1.
    Ready,
    /// The drain signal arrived.
    Drain,
    /// Drained, about to exit.
    Exit,
}

/// One line of the stamps file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub event: Event,
    pub generation: u64,
    pub pid: i32,
    /// CLOCK_MONOTONIC, ns.
    pub ns: u64,
}

/// A stamps file, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamps {
    pub stamps: Vec<Stamp>,
    /// Lines that could not be read (reported, never guessed at).
    pub malformed: usize,
}

/// Parses `<event> <generation> <pid> <ns>`: `Ok(None)` for an event this
/// bench does not use, `Err(())` for a line that is not a stamp.
fn parse_line(line: &str) -> Result<Option<Stamp>, ()> {
    let mut f = line.split_ascii_whitespace();
    let (Some(event), Some(generation), Some(pid), Some(ns), None) =
        (f.next(), f.next(), f.next(), f.next(), f.next())
    else {
        return Err(());
    };
    let event = match event {
        "start" => Event::Start,
        "ready" => Event::Ready,
        "drain" => Event::Drain,
        "exit" => Event::Exit,
        _ => return Ok(None),
    };
    Ok(Some(Stamp {
        event,
        generation: generation.parse().map_err(drop)?,
        pid: pid.parse().map_err(drop)?,
        ns: ns.parse().map_err(drop)?,
    }))
}

impl Stamps {
    /// For each successful cutover whose new app stamped both: its `start`
    /// → `ready`, in ms.
    pub fn start_to_ready_ms(&self, cutovers: &[crate::cutover::Cutover]) -> Vec<f64> {
        cutovers
            .iter()
            .filter(|c| c.ok)
            .filter_map(|c| {
                let new = c.new_app?;
                let start = self.find(Event::Start, new.generation, new.pid)?;
                let ready = self.find(Event::Ready, new.generation, new.pid)?;
                Some((ready.ns as i128 - start.ns as i128) as f64 / 1e6)
            })
            .collect()
    }

    pub fn parse(text: &str) -> Stamps {
        let mut s = Stamps::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match parse_line(line) {
                Ok(Some(stamp)) => s.stamps.push(stamp),
                Ok(None) => {}
                Err(()) => s.malformed += 1,
            }
        }
        s
    }

    /// Reads the file; a file that does not exist holds no stamps.
    pub fn read(path: &Path) -> io::Result<Stamps> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Stamps::parse(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Stamps::default()),
            Err(e) => Err(e),
        }
    }

    /// The stamp of `event` by the process `generation`/`pid`. Without a
    /// pid, only an unambiguous stamp of that generation counts.
    pub fn find(&self, event: Event, generation: u64, pid: Option<i32>) -> Option<&Stamp> {
        let mut of_gen = self
            .stamps
            .iter()
            .filter(|s| s.event == event && s.generation == generation);
        match pid {
            Some(pid) => of_gen.find(|s| s.pid == pid),
            None => match (of_gen.next(), of_gen.next()) {
                (Some(s), None) => Some(s),
                _ => None,
            },
        }
    }
}

/// Fills in each baton cutover's outside view: the apps' `ready` and
/// `drain` stamps, the cutover latency between them, and when the new
/// generation's first response reached the load generator (`first_response`:
/// generation → µs since the run's start).
pub fn attach(
    cutovers: &mut [Cutover],
    stamps: &Stamps,
    first_response: &BTreeMap<u64, u32>,
    clock: &Clock,
) {
    for c in cutovers {
        let ready = c
            .new_app
            .and_then(|a| stamps.find(Event::Ready, a.generation, a.pid));
        let drain = c
            .old_app
            .and_then(|a| stamps.find(Event::Drain, a.generation, a.pid));
        c.app_ready_us = ready.and_then(|s| clock.mono_to_us(s.ns));
        c.app_drain_us = drain.and_then(|s| clock.mono_to_us(s.ns));
        c.cutover_latency_us = ready.zip(drain).map(|(r, d)| ns_to_us(d.ns, r.ns));
        c.first_response_us = c
            .new_app
            .and_then(|a| first_response.get(&a.generation))
            .map(|&us| i64::from(us));
        c.ready_to_first_response_us = c.first_response_us.zip(c.app_ready_us).map(|(f, r)| f - r);
    }
}

/// `b - a` in µs, rounded, from two CLOCK_MONOTONIC ns readings.
fn ns_to_us(b: u64, a: u64) -> i64 {
    ((b as i128 - a as i128) as f64 / 1e3).round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cutover::AppId;

    #[test]
    fn parses_stamp_lines() {
        let s = Stamps::parse(
            "ready 2 100 5000000000\n\
             drain 1 99 5000041500\n\
             \n\
             exit 1 99 5000042000\n\
             started 2 100 4000000000\n\
             ready 2 100\n\
             drain x 99 1\n",
        );
        assert_eq!(
            s.stamps,
            [
                Stamp {
                    event: Event::Ready,
                    generation: 2,
                    pid: 100,
                    ns: 5_000_000_000
                },
                Stamp {
                    event: Event::Drain,
                    generation: 1,
                    pid: 99,
                    ns: 5_000_041_500
                },
                Stamp {
                    event: Event::Exit,
                    generation: 1,
                    pid: 99,
                    ns: 5_000_042_000
                },
            ]
        );
        // An unknown event is skipped; short or non-numeric lines counted.
        assert_eq!(s.malformed, 2);
    }

    #[test]
    fn finds_the_stamp_of_a_process() {
        let s = Stamps::parse("ready 3 10 1\nready 3 11 2\nready 4 12 3\n");
        assert_eq!(s.find(Event::Ready, 3, Some(11)).map(|s| s.ns), Some(2));
        assert_eq!(s.find(Event::Ready, 3, Some(12)), None);
        assert_eq!(s.find(Event::Drain, 3, Some(10)), None);
        assert_eq!(s.find(Event::Ready, 4, None).map(|s| s.ns), Some(3));
        assert_eq!(s.find(Event::Ready, 3, None), None, "ambiguous");
    }

    fn cutover(new: (u64, i32), old: (u64, i32)) -> Cutover {
        let mut c = Cutover::new(0, 0);
        c.new_app = Some(AppId {
            generation: new.0,
            pid: Some(new.1),
        });
        c.old_app = Some(AppId {
            generation: old.0,
            pid: Some(old.1),
        });
        c
    }

    #[test]
    fn cutover_latency_is_old_drain_minus_new_ready() {
        // The run started at CLOCK_MONOTONIC 10 s.
        let clock = Clock::with_origins(0, 10_000_000_000);
        let stamps = Stamps::parse(
            "ready 1 500 10000100000\n\
             ready 2 501 10500000000\n\
             drain 1 500 10500041600\n\
             ready 3 502 11000000000\n\
             drain 2 501 11000250000\n\
             ready 4 503 11500000000\n",
        );
        let first: BTreeMap<u64, u32> = [(1, 1_000), (2, 502_000), (3, 999_900)].into();
        let mut cuts = [
            cutover((2, 501), (1, 500)),
            cutover((3, 502), (2, 501)),
            // The old process's drain was never stamped.
            cutover((4, 503), (3, 502)),
        ];
        attach(&mut cuts, &stamps, &first, &clock);

        assert_eq!(cuts[0].app_ready_us, Some(500_000));
        assert_eq!(cuts[0].app_drain_us, Some(500_041));
        assert_eq!(cuts[0].cutover_latency_us, Some(42)); // 41.6 µs, rounded
        assert_eq!(cuts[0].first_response_us, Some(502_000));
        assert_eq!(cuts[0].ready_to_first_response_us, Some(2_000));

        assert_eq!(cuts[1].cutover_latency_us, Some(250));
        // The new generation answered before it sent READY=1.
        assert_eq!(cuts[1].ready_to_first_response_us, Some(-100));

        assert_eq!(cuts[2].app_ready_us, Some(1_500_000));
        assert_eq!(cuts[2].app_drain_us, None);
        assert_eq!(cuts[2].cutover_latency_us, None);
        assert_eq!(cuts[2].first_response_us, None);
    }
}
