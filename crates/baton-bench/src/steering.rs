//! Steered traffic, measured from outside baton: how fast a rollback during
//! a bake gives new connections back to the old processes, and how close a
//! canary's share of new connections is to the share asked for.
//!
//! Both are observed the way a client sees them: new TCP connections to
//! the app's port, one `GET /` each, and the `generation=N pid=P` the
//! example app writes in its body. baton's own events only say when it
//! *thinks* it switched; the figures here come from the responses and the
//! bench's clock.
//!
//! - **Rollback** ([`RollbackDeploy`], a deploy of the load's driver, so
//!   the load runs throughout): a new connection learns which generation
//!   and process serve now; `upgrade` with `no_wait` (baton runs with a
//!   bake window, so the old generation is parked, still running); new
//!   connections until one reaches the new generation; a pause under load;
//!   then `rollback` is sent while new connections are opened back to back,
//!   and the rollback latency is the time from sending the request to the
//!   first response, on a new connection, from the old generation. That
//!   response must come from the same old process (pid): nothing restarted.
//! - **Canary** ([`canary`]): `upgrade` with `canary: PCT` (the stream
//!   ends once the canary runs); N new connections, counted by the
//!   generation that answered; `promote`; then new connections again, which
//!   must all reach the new generation.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton::protocol::{EventKind, Reply, Request};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::{generation_of, parse_head, request_bytes, BodyLen, Cause, MAX_HEAD};
use crate::cutover::{AppId, Cutover};
use crate::load::Clock;

/// One probe (connect, request, response) may take this long.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// After `rollback` is sent, new connections are opened for at most this
/// long looking for the old generation.
const ROLLBACK_DEADLINE: Duration = Duration::from_secs(3);
/// After an upgrade, new connections are opened for at most this long
/// looking for the new generation.
const SWITCH_DEADLINE: Duration = Duration::from_secs(3);
/// A control request (upgrade, rollback, promote) may take this long.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);
/// The canary measurement as a whole may take this long.
const CANARY_DEADLINE: Duration = Duration::from_secs(120);

/// Who answered a request: the example app's `generation=N pid=P`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Answer {
    pub generation: Option<u64>,
    pub pid: Option<i32>,
}

/// The number after `key` in `body` (e.g. `pid=` in `... pid=345`).
fn number_after(body: &[u8], key: &[u8]) -> Option<u64> {
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = body[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&body[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// The `pid=P` of the example app's body.
pub fn pid_of(body: &[u8]) -> Option<i32> {
    number_after(body, b" pid=").and_then(|p| i32::try_from(p).ok())
}

/// One request on a new connection (`Connection: close`); returns who
/// answered and when the response was complete (µs on `clock`).
pub async fn probe(addr: SocketAddr, clock: &Clock) -> Result<(Answer, u64), Cause> {
    match tokio::time::timeout(PROBE_TIMEOUT, probe_inner(addr, clock)).await {
        Ok(r) => r,
        Err(_) => Err(Cause::Timeout),
    }
}

async fn probe_inner(addr: SocketAddr, clock: &Clock) -> Result<(Answer, u64), Cause> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Cause::of_io(&e))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(&request_bytes(addr, "/", false))
        .await
        .map_err(|e| Cause::of_io(&e))?;
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    loop {
        let n = stream
            .read_buf(&mut buf)
            .await
            .map_err(|e| Cause::of_io(&e))?;
        let head = parse_head(&buf).map_err(|_| Cause::BadResponse)?;
        let complete = match head {
            Some(h) => match h.body {
                BodyLen::Exact(len) => (buf.len() >= h.head_len + len).then_some((h, len)),
                BodyLen::UntilClose => (n == 0).then(|| (h, buf.len() - h.head_len)),
            },
            None => None,
        };
        if let Some((h, len)) = complete {
            let at = clock.now_us();
            if !(200..300).contains(&h.status) {
                return Err(Cause::Non2xx);
            }
            let body = &buf[h.head_len..h.head_len + len];
            let answer = Answer {
                generation: generation_of(body),
                pid: pid_of(body),
            };
            if n != 0 {
                // Let the server close first, so it (not this port) holds
                // the TIME_WAIT; not part of the timing.
                let mut byte = [0u8; 1];
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), stream.read(&mut byte)).await;
            }
            return Ok((answer, at));
        }
        if n == 0 {
            return Err(if buf.is_empty() {
                Cause::ClosedBeforeResponse
            } else {
                Cause::Truncated
            });
        }
        if buf.len() > MAX_HEAD * 4 {
            return Err(Cause::BadResponse);
        }
    }
}

/// A response the prober saw after the rollback request went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    /// When its connection was opened (connect() called), µs on the run's
    /// clock.
    pub started_us: i64,
    /// When the response was complete, µs on the run's clock.
    pub at_us: i64,
    pub answer: Answer,
}

/// One rollback, from outside baton.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RollbackNote {
    /// The generation and process that served before the upgrade (and must
    /// serve again after the rollback).
    pub to: AppId,
    /// When the `rollback` request was sent, µs on the run's clock.
    pub sent_us: i64,
    /// From sending the request to the first response, on a new
    /// connection, from the old generation (`None`: none within the
    /// deadline).
    pub latency_us: Option<i64>,
    /// When the connection of that response was opened, from sending the
    /// request: the kernel picked its socket at connect, so the switch
    /// happened before then, and `latency_us` minus this is the probe's
    /// own round trip (the measurement's resolution).
    pub opened_after_us: Option<i64>,
    /// Responses seen up to and including that one (new connections
    /// opened one after the other).
    pub probes: usize,
    /// Probes that failed meanwhile (each is also a failure to report).
    pub probe_failures: usize,
    /// The pid of that response.
    pub answered_pid: Option<i32>,
    /// It is the process that served before: no restart happened.
    pub same_pid: Option<bool>,
}

/// The rollback latency from what the prober saw: the first response from
/// generation `to.generation` after `sent_us`, and whether it came from
/// process `to.pid`.
pub fn rollback_note(
    to: AppId,
    sent_us: i64,
    seen: &[Seen],
    probe_failures: usize,
) -> RollbackNote {
    let first = seen
        .iter()
        .enumerate()
        .find(|(_, s)| s.at_us >= sent_us && s.answer.generation == Some(to.generation));
    RollbackNote {
        to,
        sent_us,
        latency_us: first.map(|(_, s)| s.at_us - sent_us),
        opened_after_us: first.map(|(_, s)| s.started_us - sent_us),
        probes: first.map_or(seen.len(), |(i, _)| i + 1),
        probe_failures,
        answered_pid: first.and_then(|(_, s)| s.answer.pid),
        same_pid: first.map(|(_, s)| to.pid.is_some() && s.answer.pid == to.pid),
    }
}

fn small_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Sends one control request; every reply, or why it failed.
async fn control(path: &Path, req: &Request) -> Result<Vec<Reply>, String> {
    let mut replies = Vec::new();
    match tokio::time::timeout(
        CONTROL_TIMEOUT,
        baton::control::request(path, req, |r| replies.push(r)),
    )
    .await
    {
        Ok(Ok(())) => Ok(replies),
        Ok(Err(e)) => Err(format!("control: {}", baton::error_chain(&e))),
        Err(_) => Err(format!("no result within {CONTROL_TIMEOUT:?}")),
    }
}

/// The stream's verdict: `Ok(upgrade)` if it ended in success.
fn outcome(replies: &[Reply]) -> Result<u64, String> {
    for r in replies {
        match r {
            Reply::Done(o) if o.success => return Ok(o.upgrade),
            Reply::Done(o) => {
                return Err(o.reason.clone().unwrap_or_else(|| "failed".into()));
            }
            Reply::Error(e) => return Err(format!("refused: {:?}: {}", e.kind, e.message)),
            _ => {}
        }
    }
    Err("the stream ended without a result".into())
}

/// Opens new connections one after the other until one is answered by a
/// generation `want` accepts, or `deadline` passes; every answer goes to
/// `seen`, failures are counted.
async fn probe_until(
    addr: SocketAddr,
    clock: &Clock,
    deadline: Instant,
    want: impl Fn(&Answer) -> bool,
    stop: &Cell<bool>,
    seen: &mut Vec<Seen>,
) -> (Option<Answer>, usize) {
    let mut failures = 0;
    while Instant::now() < deadline && !stop.get() {
        let started = clock.now_us() as i64;
        match probe(addr, clock).await {
            Ok((answer, at)) => {
                seen.push(Seen {
                    started_us: started,
                    at_us: at as i64,
                    answer,
                });
                if want(&answer) {
                    return (Some(answer), failures);
                }
            }
            Err(_) => {
                failures += 1;
                // Do not spin on a refused port.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    (None, failures)
}

/// Upgrades without waiting for the bake, then rolls back, under the
/// load of the run that drives it (see the module docs).
pub struct RollbackDeploy {
    control: PathBuf,
    addr: SocketAddr,
    /// How long the new generation serves before the rollback.
    pause: Duration,
    rt: tokio::runtime::Runtime,
}

impl RollbackDeploy {
    pub fn new(control: PathBuf, addr: SocketAddr, pause: Duration) -> std::io::Result<Self> {
        Ok(RollbackDeploy {
            control,
            addr,
            pause,
            rt: small_runtime()?,
        })
    }

    pub fn cutover(&mut self, index: u32, clock: &Clock) -> Cutover {
        let now = || clock.now_us() as i64;
        let mut c = Cutover::new(index, now());
        let (addr, control_path) = (self.addr, self.control.clone());
        // Who serves new connections now: where the rollback must return.
        let before = self.rt.block_on(probe(addr, clock));
        let to = match before {
            Ok((
                Answer {
                    generation: Some(generation),
                    pid: Some(pid),
                },
                _,
            )) => AppId {
                generation,
                pid: Some(pid),
            },
            Ok((a, _)) => {
                c.fail(format!("the app's answer names no generation/pid: {a:?}"));
                return c;
            }
            Err(cause) => {
                c.fail(format!("probe before the upgrade: {}", cause.name()));
                return c;
            }
        };
        c.old_app = Some(to);
        c.start_us = now();
        c.mark("requested", c.start_us);
        // The upgrade: the stream ends once the new generation is active;
        // baton's bake window keeps the old one parked.
        let upgrade = Request::Upgrade {
            wait_drain: false,
            no_wait: true,
            canary: None,
            canary_for_ms: None,
            bake_ms: None,
        };
        let replies = match self.rt.block_on(control(&control_path, &upgrade)) {
            Ok(r) => r,
            Err(e) => {
                c.fail(format!("upgrade: {e}"));
                return c;
            }
        };
        let new_gen = match outcome(&replies) {
            Ok(g) => g,
            Err(e) => {
                c.fail(format!("upgrade: {e}"));
                return c;
            }
        };
        c.mark("active", now());
        c.new_app = replies.iter().find_map(|r| match r {
            Reply::Event(e) if e.generation == new_gen => match e.kind {
                EventKind::Spawned { pid, .. } => Some(AppId {
                    generation: new_gen,
                    pid: Some(pid),
                }),
                _ => None,
            },
            _ => None,
        });
        // New connections reach the new generation...
        let stop = Cell::new(false);
        let mut seen = Vec::new();
        let (got, _) = self.rt.block_on(probe_until(
            addr,
            clock,
            Instant::now() + SWITCH_DEADLINE,
            |a| a.generation == Some(new_gen),
            &stop,
            &mut seen,
        ));
        if got.is_none() {
            c.fail(format!(
                "no new connection reached generation {new_gen} within {SWITCH_DEADLINE:?}"
            ));
            return c;
        }
        c.mark("new_serving", now());
        // ...and serve the load for a while.
        std::thread::sleep(self.pause);
        // The rollback, with new connections opened back to back meanwhile.
        let mut seen = Vec::new();
        let failed = Cell::new(false);
        let sent = now();
        let (res, (_, probe_failures)) = self.rt.block_on(async {
            let rollback = async {
                let r = control(&control_path, &Request::Rollback { wait_drain: false }).await;
                if r.as_ref().map_or(true, |r| outcome(r).is_err()) {
                    failed.set(true);
                }
                r
            };
            let watch = probe_until(
                addr,
                clock,
                Instant::now() + ROLLBACK_DEADLINE,
                |a| a.generation == Some(to.generation),
                &failed,
                &mut seen,
            );
            tokio::join!(rollback, watch)
        });
        c.mark("rollback_sent", sent);
        let note = rollback_note(to, sent, &seen, probe_failures);
        // baton's own moment (its event), then the client's.
        match res.and_then(|r| {
            let rolled = r.iter().find_map(|r| match r {
                Reply::Event(e) if matches!(e.kind, EventKind::RolledBack { .. }) => {
                    Some(clock.wall_to_us(e.time_us))
                }
                _ => None,
            });
            outcome(&r).map(|_| rolled)
        }) {
            Ok(Some(at)) => c.mark("rolled_back", at),
            Ok(None) => c.fail("the rollback stream had no rolled_back event"),
            Err(e) => c.fail(format!("rollback: {e}")),
        }
        if let Some(l) = note.latency_us {
            c.mark("old_serving", sent + l);
        }
        if note.latency_us.is_none() {
            c.fail(format!(
                "no new connection reached generation {} within {ROLLBACK_DEADLINE:?} of the rollback",
                to.generation
            ));
        } else if note.same_pid != Some(true) {
            c.fail(format!(
                "generation {} answered from pid {:?}, not {:?}: a restart, not a rollback",
                to.generation, note.answered_pid, to.pid
            ));
        }
        if note.probe_failures > 0 {
            c.fail(format!(
                "{} probe connections failed during the rollback",
                note.probe_failures
            ));
        }
        c.rollback = Some(note);
        c
    }
}

/// What a canary did to new connections.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CanaryShare {
    /// The `canary` percentage asked for.
    pub requested_pct: u8,
    /// Percent of the answered new connections the candidate answered.
    pub measured_pct: f64,
    /// New connections answered during the canary.
    pub n: u64,
    pub from_candidate: u64,
    /// Answered by neither the candidate nor the active generation.
    pub from_other: u64,
    /// New connections that failed during the canary.
    pub failed: u64,
    pub candidate: u64,
    pub active: Option<u64>,
    /// After `promote`: new connections answered, how many by the new
    /// generation, and how many failed.
    pub after_promote_n: u64,
    pub after_promote_new: u64,
    pub after_promote_failed: u64,
}

/// `part` of `n` in percent, to two decimals; 0 when `n` is 0.
pub fn share_pct(part: u64, n: u64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    (part as f64 * 10_000.0 / n as f64).round() / 100.0
}

impl CanaryShare {
    /// Fills the counts from who answered (generation → connections).
    pub fn count(&mut self, by_generation: &BTreeMap<u64, u64>) {
        self.n = by_generation.values().sum();
        self.from_candidate = by_generation.get(&self.candidate).copied().unwrap_or(0);
        let from_active = self
            .active
            .and_then(|a| by_generation.get(&a))
            .copied()
            .unwrap_or(0);
        self.from_other = self.n - self.from_candidate - from_active;
        self.measured_pct = share_pct(self.from_candidate, self.n);
    }

    /// Within `tolerance_pp` percentage points of the share asked for,
    /// with every connection answered by one of the two generations, and
    /// every one after the promotion by the new one.
    pub fn accurate(&self, tolerance_pp: f64) -> bool {
        self.n > 0
            && self.failed == 0
            && self.from_other == 0
            && (self.measured_pct - f64::from(self.requested_pct)).abs() <= tolerance_pp
            && self.after_promote_n > 0
            && self.after_promote_new == self.after_promote_n
            && self.after_promote_failed == 0
    }
}

/// Counts, over `n` new connections opened one after the other, which
/// generation answered; the number that failed.
async fn census(
    addr: SocketAddr,
    clock: &Clock,
    n: u64,
    deadline: Instant,
) -> (BTreeMap<u64, u64>, u64) {
    let mut by_gen: BTreeMap<u64, u64> = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        if Instant::now() >= deadline {
            break;
        }
        match probe(addr, clock).await {
            Ok((a, _)) => *by_gen.entry(a.generation.unwrap_or(u64::MAX)).or_default() += 1,
            Err(_) => failed += 1,
        }
    }
    (by_gen, failed)
}

/// The canary measurement (see the module docs): `n` new connections
/// during a `pct` % canary, then `confirm` after `promote`.
pub fn canary(
    control_path: &Path,
    addr: SocketAddr,
    pct: u8,
    n: u64,
    confirm: u64,
) -> Result<CanaryShare, String> {
    let rt = small_runtime().map_err(|e| format!("starting a runtime: {e}"))?;
    let clock = Clock::new();
    let deadline = Instant::now() + CANARY_DEADLINE;
    rt.block_on(async {
        let (before, _) = probe(addr, &clock)
            .await
            .map_err(|c| format!("probe before the canary: {}", c.name()))?;
        let upgrade = Request::Upgrade {
            wait_drain: false,
            no_wait: false,
            canary: Some(pct),
            canary_for_ms: None,
            bake_ms: None,
        };
        let replies = control(control_path, &upgrade).await?;
        let candidate = outcome(&replies).map_err(|e| format!("canary upgrade: {e}"))?;
        let mut share = CanaryShare {
            requested_pct: pct,
            candidate,
            active: before.generation,
            ..CanaryShare::default()
        };
        let (by_gen, failed) = census(addr, &clock, n, deadline).await;
        share.count(&by_gen);
        share.failed = failed;
        let promote = Request::Promote {
            wait_drain: false,
            no_wait: true,
        };
        let replies = control(control_path, &promote).await?;
        outcome(&replies).map_err(|e| format!("promote: {e}"))?;
        let (by_gen, failed) = census(addr, &clock, confirm, deadline).await;
        share.after_promote_n = by_gen.values().sum();
        share.after_promote_new = by_gen.get(&candidate).copied().unwrap_or(0);
        share.after_promote_failed = failed;
        if share.n + share.failed < n || share.after_promote_n + failed < confirm {
            return Err(format!(
                "the canary measurement did not finish within {CANARY_DEADLINE:?}"
            ));
        }
        Ok(share)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(at_us: i64, generation: u64, pid: i32) -> Seen {
        Seen {
            started_us: at_us - 200,
            at_us,
            answer: Answer {
                generation: Some(generation),
                pid: Some(pid),
            },
        }
    }

    const OLD: AppId = AppId {
        generation: 1,
        pid: Some(100),
    };

    #[test]
    fn pid_from_the_body() {
        assert_eq!(pid_of(b"version=dev generation=12 pid=345\n"), Some(345));
        assert_eq!(pid_of(b"version=dev generation=12\n"), None);
        assert_eq!(pid_of(b"version=dev generation=1 pid=99999999999\n"), None);
        // `pid=` inside another word is not the pid.
        assert_eq!(pid_of(b"version=rapid=7 generation=1 pid=8\n"), Some(8));
    }

    #[test]
    fn rollback_latency_is_the_first_old_answer_after_sending() {
        // Sent at 1 000 µs; two answers from the new generation, then the
        // old process answers at 4 250 µs, then again.
        let s = [
            seen(1_300, 2, 200),
            seen(2_900, 2, 200),
            seen(4_250, 1, 100),
            seen(5_000, 1, 100),
        ];
        let n = rollback_note(OLD, 1_000, &s, 0);
        assert_eq!(n.latency_us, Some(3_250));
        assert_eq!(n.opened_after_us, Some(3_050));
        assert_eq!(n.probes, 3);
        assert_eq!(n.answered_pid, Some(100));
        assert_eq!(n.same_pid, Some(true));
    }

    #[test]
    fn rollback_to_another_process_is_flagged() {
        // The old generation's number, but another pid: it was restarted.
        let s = [seen(2_000, 2, 200), seen(2_500, 1, 101)];
        let n = rollback_note(OLD, 1_000, &s, 1);
        assert_eq!(n.latency_us, Some(1_500));
        assert_eq!(n.same_pid, Some(false));
        assert_eq!(n.probe_failures, 1);
    }

    #[test]
    fn no_old_answer_means_no_latency() {
        let s = [seen(2_000, 2, 200), seen(3_000, 2, 200)];
        let n = rollback_note(OLD, 1_000, &s, 0);
        assert_eq!(n.latency_us, None);
        assert_eq!(n.opened_after_us, None);
        assert_eq!(n.probes, 2);
        assert_eq!(n.same_pid, None);
        // Answers before the request was sent do not count.
        let n = rollback_note(OLD, 1_000, &[seen(900, 1, 100)], 0);
        assert_eq!(n.latency_us, None);
    }

    /// Against a scripted server on loopback: the answer's generation and
    /// pid are read from the body, and a fresh connection closed unanswered
    /// is a failure.
    #[test]
    fn probe_reads_generation_and_pid() {
        let rt = small_runtime().expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let server = tokio::spawn(async move {
                const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 35\r\nConnection: close\r\n\r\nversion=dev generation=3 pid=77\n\n\n\n";
                let mut buf = vec![0u8; 1024];
                let (mut s, _) = listener.accept().await.expect("accept");
                let _ = s.read(&mut buf).await;
                s.write_all(OK).await.expect("write");
                drop(s);
                let (mut s, _) = listener.accept().await.expect("accept");
                let _ = s.read(&mut buf).await;
                drop(s);
            });
            let clock = Clock::new();
            let (a, at) = probe(addr, &clock).await.expect("answered");
            assert_eq!(
                a,
                Answer {
                    generation: Some(3),
                    pid: Some(77)
                }
            );
            assert!(at <= clock.now_us());
            assert_eq!(
                probe(addr, &clock).await,
                Err(Cause::ClosedBeforeResponse)
            );
            server.await.expect("server");
        });
    }

    #[test]
    fn share_in_percent() {
        assert_eq!(share_pct(0, 0), 0.0);
        assert_eq!(share_pct(1_000, 10_000), 10.0);
        assert_eq!(share_pct(197, 2_000), 9.85);
        assert_eq!(share_pct(1, 3), 33.33);
        assert_eq!(share_pct(2, 3), 66.67);
    }

    #[test]
    fn canary_counts_and_accuracy() {
        let mut s = CanaryShare {
            requested_pct: 10,
            candidate: 3,
            active: Some(1),
            after_promote_n: 200,
            after_promote_new: 200,
            ..CanaryShare::default()
        };
        s.count(&[(1, 1_790), (3, 210)].into());
        assert_eq!((s.n, s.from_candidate, s.from_other), (2_000, 210, 0));
        assert_eq!(s.measured_pct, 10.5);
        assert!(s.accurate(2.0));
        assert!(!s.accurate(0.4));
        // 12.05 % is 2.05 points off: outside ±2.
        s.count(&[(1, 1_759), (3, 241)].into());
        assert_eq!(s.measured_pct, 12.05);
        assert!(!s.accurate(2.0));
        // A third generation answering is wrong whatever the share.
        s.count(&[(1, 1_799), (3, 200), (2, 1)].into());
        assert_eq!(s.from_other, 1);
        assert!(!s.accurate(2.0));
        // So is an old process answering after the promotion.
        s.count(&[(1, 1_800), (3, 200)].into());
        assert!(s.accurate(2.0));
        s.after_promote_new = 199;
        assert!(!s.accurate(2.0));
    }
}
