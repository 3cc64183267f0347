//! Load generation: open-loop (a timetable) or closed-loop (as fast as the
//! target answers), over keep-alive or one-connection-per-request.
//!
//! Open loop is paced by a dedicated thread that releases one permit per
//! request when its scheduled time arrives (tokio's timers tick in whole
//! milliseconds, too coarse at tens of thousands of requests per second).
//! A worker takes a permit, claims the next slot of the timetable and sends
//! it; the latency counts from the slot's *scheduled* time. When every
//! worker is busy (the target stalls), permits pile up and are claimed
//! late, and that lateness is in the latency: coordinated omission is
//! corrected, a stall is never hidden. The pacer's own lag (at most
//! [`PACER_TICK_US`] plus a thread wake-up) is reported as `send_lag`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::client::{request_bytes, Cause, Client, Outcome};
use crate::schedule::Schedule;

/// The pacer wakes at most this often (µs): coarser batches cost less CPU.
pub const PACER_TICK_US: u64 = 100;
/// Runs are limited to this so that times fit in u32 microseconds.
pub const MAX_RUN: Duration = Duration::from_secs(3_600);

/// A run's time base: monotonic offsets, and the wall-clock and
/// CLOCK_MONOTONIC times of the start, to place the supervisor's events
/// (wall-clock µs) and the apps' stamps (CLOCK_MONOTONIC ns) on the same
/// axis.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    t0: Instant,
    t0_wall_us: u64,
    t0_mono_ns: Option<u64>,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Clock {
        // `Instant` reads CLOCK_MONOTONIC too, but keeps the value to
        // itself: read it once more for the origin the apps' stamps use.
        let t0 = Instant::now();
        let t0_mono_ns = crate::stamps::mono_now_ns();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        Clock {
            t0,
            t0_wall_us: wall,
            t0_mono_ns,
        }
    }

    /// A clock with a given wall-clock origin (tests).
    pub fn with_wall(t0_wall_us: u64) -> Clock {
        Clock {
            t0: Instant::now(),
            t0_wall_us,
            t0_mono_ns: None,
        }
    }

    /// A clock with given wall-clock and CLOCK_MONOTONIC origins (tests).
    pub fn with_origins(t0_wall_us: u64, t0_mono_ns: u64) -> Clock {
        Clock {
            t0_mono_ns: Some(t0_mono_ns),
            ..Clock::with_wall(t0_wall_us)
        }
    }

    pub fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// A wall-clock time (µs since the epoch) as an offset from the start.
    pub fn wall_to_us(&self, wall_us: u64) -> i64 {
        wall_us as i64 - self.t0_wall_us as i64
    }

    pub fn wall_origin_us(&self) -> u64 {
        self.t0_wall_us
    }

    /// A CLOCK_MONOTONIC time (ns) as µs from the start.
    pub fn mono_to_us(&self, mono_ns: u64) -> Option<i64> {
        let t0 = self.t0_mono_ns?;
        Some((mono_ns as i64 - t0 as i64).div_euclid(1_000))
    }
}

/// Load model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Model {
    /// A constant rate (requests per second) on a timetable.
    Open { rate: f64 },
    /// Each worker sends its next request as soon as the previous one ends.
    Closed,
}

/// Connection handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ConnMode {
    /// Reuse connections (HTTP/1.1 keep-alive).
    KeepAlive,
    /// A new connection for every request (`Connection: close`).
    Close,
}

impl ConnMode {
    pub fn name(self) -> &'static str {
        match self {
            ConnMode::KeepAlive => "keep-alive",
            ConnMode::Close => "close",
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    pub model: Model,
    pub conn: ConnMode,
    /// Workers, each with at most one request (and connection) at a time.
    pub concurrency: usize,
    /// Per-request timeout (connect, retry and response together).
    pub timeout: Duration,
    /// Threads of the load generator's runtime (1: current-thread).
    pub threads: usize,
}

impl LoadSpec {
    /// Open-loop load at `rate` from a current-thread client, with at
    /// least one worker.
    pub fn open(rate: f64, conn: ConnMode, concurrency: usize, timeout: Duration) -> LoadSpec {
        LoadSpec {
            model: Model::Open { rate },
            conn,
            concurrency: concurrency.max(1),
            timeout,
            threads: 1,
        }
    }
}

/// One request as it happened. Times are µs since the run's start; for
/// closed-loop load, `sched_us == start_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub sched_us: u32,
    pub start_us: u32,
    pub end_us: u32,
    pub outcome: Outcome,
    /// Sent again on a new connection after a reused one closed unanswered.
    pub retried: bool,
}

impl Record {
    /// Latency from the scheduled time (coordinated omission corrected).
    pub fn latency_us(&self) -> u64 {
        u64::from(self.end_us.saturating_sub(self.sched_us))
    }

    pub fn failed(&self) -> Option<Cause> {
        match self.outcome {
            Outcome::Ok => None,
            Outcome::Failed(c) => Some(c),
        }
    }
}

/// Counters for the live progress line, updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct Progress {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    /// Largest latency since the progress line last took it.
    pub max_us: AtomicU64,
    /// Cutovers completed so far.
    pub cutovers: AtomicU64,
}

/// What the load, the cutover driver and the progress line share.
#[derive(Debug)]
pub struct Shared {
    pub clock: Clock,
    stop_at_us: AtomicU64,
    pub progress: Progress,
}

impl Shared {
    pub fn new(clock: Clock, max: Duration) -> Arc<Shared> {
        let max = max.min(MAX_RUN);
        Arc::new(Shared {
            clock,
            stop_at_us: AtomicU64::new(clock.now_us() + max.as_micros() as u64),
            progress: Progress::default(),
        })
    }

    pub fn stop_at_us(&self) -> u64 {
        self.stop_at_us.load(Ordering::Relaxed)
    }

    /// Ends the load now (if it was to end later).
    pub fn stop_now(&self) {
        self.stop_at_us
            .fetch_min(self.clock.now_us(), Ordering::Relaxed);
    }

    pub fn stopped(&self) -> bool {
        self.clock.now_us() >= self.stop_at_us()
    }
}

/// The outcome of a load run.
#[derive(Debug)]
pub struct LoadOutput {
    /// Sorted by scheduled time.
    pub records: Vec<Record>,
    pub started_us: u64,
    pub ended_us: u64,
    /// Open loop: requests whose time came but that no worker was free to
    /// send before the run ended (a stall at the very end).
    pub unsent: u64,
    /// For each app generation that answered (`generation=N` in the body),
    /// when its first response reached the load generator (µs since the
    /// run's start).
    pub first_response: BTreeMap<u64, u32>,
}

/// Runs load against `addr` until `shared` says stop. Blocks the calling
/// thread (the load has its own runtime).
pub fn run_load(
    spec: LoadSpec,
    addr: SocketAddr,
    shared: Arc<Shared>,
) -> std::io::Result<LoadOutput> {
    let runtime = if spec.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(spec.threads)
            .enable_all()
            .build()?
    };
    let started_us = shared.clock.now_us();
    let request = request_bytes(addr, "/", spec.conn == ConnMode::KeepAlive);
    let keep_alive = spec.conn == ConnMode::KeepAlive;
    let concurrency = spec.concurrency.max(1);

    // Open loop: the pacer task and the shared slot counter.
    let pacing = match spec.model {
        Model::Open { rate } => {
            let schedule = Schedule::new(started_us + 1_000, rate)
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad rate"))?;
            Some(Pacing {
                schedule,
                sem: Arc::new(Semaphore::new(0)),
                released: Arc::new(AtomicU64::new(0)),
                claimed: Arc::new(AtomicU64::new(0)),
            })
        }
        Model::Closed => None,
    };

    // Room for the expected number of records, so pushing never reallocates
    // in the steady state.
    let expect_per_worker = match spec.model {
        Model::Open { rate } => {
            let secs = (shared.stop_at_us().saturating_sub(started_us)) as f64 / 1e6;
            ((rate * secs.min(600.0)) as usize / concurrency + 64).min(1 << 20)
        }
        Model::Closed => 1 << 14,
    };

    let pacer = match &pacing {
        Some(p) => {
            let (p, shared) = (p.clone(), shared.clone());
            Some(
                std::thread::Builder::new()
                    .name("pacer".into())
                    .spawn(move || pace(&p, &shared))?,
            )
        }
        None => None,
    };
    let (records, first_response) = runtime.block_on(async {
        let mut tasks = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            let mut client = Client::new(addr, request.clone(), keep_alive, spec.timeout);
            let shared = shared.clone();
            let pacing = pacing.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::with_capacity(expect_per_worker);
                // (generation, end) each time the answering generation changes.
                let mut changes: Vec<(u64, u32)> = Vec::new();
                let mut last_generation = None;
                let clock = shared.clock;
                loop {
                    let sched = match &pacing {
                        Some(p) => {
                            match p.sem.acquire().await {
                                Ok(permit) => permit.forget(),
                                Err(_) => break, // closed: the run is over
                            }
                            p.schedule
                                .time_of(p.claimed.fetch_add(1, Ordering::Relaxed))
                        }
                        None => {
                            if shared.stopped() {
                                break;
                            }
                            clock.now_us()
                        }
                    };
                    let start = clock.now_us();
                    let (outcome, retried) = client.get().await;
                    let end = clock.now_us();
                    let rec = Record {
                        sched_us: sched as u32,
                        start_us: start as u32,
                        end_us: end as u32,
                        outcome,
                        retried,
                    };
                    note(&shared.progress, &rec);
                    out.push(rec);
                    if outcome == Outcome::Ok && client.generation() != last_generation {
                        last_generation = client.generation();
                        if let Some(g) = last_generation {
                            changes.push((g, end as u32));
                        }
                    }
                }
                (out, changes)
            }));
        }
        let mut all = Vec::new();
        let mut first = BTreeMap::new();
        for t in tasks {
            if let Ok((v, changes)) = t.await {
                first_responses(&mut first, &changes);
                if all.is_empty() {
                    all = v;
                } else {
                    all.extend_from_slice(&v);
                }
            }
        }
        (all, first)
    });
    if let Some(p) = pacer {
        let _ = p.join();
    }
    let ended_us = shared.clock.now_us();
    let unsent = pacing.map_or(0, |p| {
        p.released
            .load(Ordering::Relaxed)
            .saturating_sub(p.claimed.load(Ordering::Relaxed))
    });
    let mut records = records;
    records.sort_unstable_by_key(|r| r.sched_us);
    Ok(LoadOutput {
        records,
        started_us,
        ended_us,
        unsent,
        first_response,
    })
}

/// Merges one worker's generation changes into the earliest response seen
/// from each generation.
fn first_responses(first: &mut BTreeMap<u64, u32>, changes: &[(u64, u32)]) {
    for &(generation, at) in changes {
        first
            .entry(generation)
            .and_modify(|t| *t = (*t).min(at))
            .or_insert(at);
    }
}

fn note(p: &Progress, r: &Record) {
    p.sent.fetch_add(1, Ordering::Relaxed);
    match r.outcome {
        Outcome::Ok => p.ok.fetch_add(1, Ordering::Relaxed),
        Outcome::Failed(_) => p.failed.fetch_add(1, Ordering::Relaxed),
    };
    if r.retried {
        p.retried.fetch_add(1, Ordering::Relaxed);
    }
    p.max_us.fetch_max(r.latency_us(), Ordering::Relaxed);
}

/// The open-loop timetable shared by the pacer and the workers.
#[derive(Clone)]
struct Pacing {
    schedule: Schedule,
    /// One permit per request whose time has come.
    sem: Arc<Semaphore>,
    released: Arc<AtomicU64>,
    /// Slots taken by workers; a worker sends slot `claimed` next.
    claimed: Arc<AtomicU64>,
}

/// The pacer thread: releases permits as the timetable comes due, then
/// closes the semaphore when the run ends, which wakes every idle worker.
/// A thread of its own sleeps with µs precision (tokio's timers tick in
/// whole milliseconds) and is never held up by the workers' tasks.
fn pace(p: &Pacing, shared: &Shared) {
    // The default 50 µs timer slack would add to every request's latency.
    let _ = nix::sys::prctl::set_timerslack(1_000);
    let mut done = 0u64;
    loop {
        let now = shared.clock.now_us();
        let stop = shared.stop_at_us();
        if now >= stop {
            break;
        }
        let due = p.schedule.due_by(now);
        if due > done {
            p.sem.add_permits((due - done) as usize);
            done = due;
            p.released.store(done, Ordering::Relaxed);
        }
        let next = p.schedule.time_of(done);
        let wake = next.max(now + PACER_TICK_US).min(now + 10_000).min(stop);
        std::thread::sleep(Duration::from_micros(
            wake.saturating_sub(shared.clock.now_us()),
        ));
    }
    p.sem.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_response_per_generation_is_the_earliest_of_all_workers() {
        let mut first = BTreeMap::new();
        first_responses(&mut first, &[(1, 100), (2, 5_000), (3, 9_000)]);
        first_responses(&mut first, &[(1, 50), (2, 4_200)]);
        first_responses(&mut first, &[(3, 9_500)]);
        assert_eq!(
            first.into_iter().collect::<Vec<_>>(),
            [(1, 50), (2, 4_200), (3, 9_000)]
        );
    }

    #[test]
    fn monotonic_stamps_on_the_run_axis() {
        let c = Clock::with_origins(0, 5_000_000_000);
        assert_eq!(c.mono_to_us(5_000_000_000), Some(0));
        assert_eq!(c.mono_to_us(5_001_234_999), Some(1_234));
        assert_eq!(c.mono_to_us(4_999_999_000), Some(-1));
        assert_eq!(Clock::with_wall(0).mono_to_us(1), None);
    }
}
