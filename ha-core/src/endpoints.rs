//! For backends with several server endpoints: which one is in use, when to leave it,
//! and how long a dead one may go unnoticed.
//!
//! A member that dies silently (power, cable: no RST, no FIN) leaves its connections
//! open and quiet. A client that spreads calls over every endpoint, or reopens a broken
//! stream on whichever is "ready", can land on it again and wait there for good. So a
//! backend uses one endpoint at a time, leaves it on the first sign of death for the one
//! that failed least recently (never the one that just failed), abandons every stream
//! opened before the move, and probes the endpoint in use often enough to find a silent
//! one within a quarter of the shortest TTL it granted.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::error::{Error, Result};

/// The probe's cadence and its patience before any lease was granted through the
/// backend (a watcher only): a dead endpoint is found within their sum.
const IDLE_PROBE_EVERY: Duration = Duration::from_secs(1);
const IDLE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// No attempt is cut shorter: a busy but healthy member (a read waits for a heartbeat
/// round, a write for a disk flush) would read as a dead one.
const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
const MIN_PROBE_EVERY: Duration = Duration::from_millis(100);

/// Where a call or a stream went: an endpoint, and how often it had failed by then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct At {
    /// The endpoint's index.
    pub slot: usize,
    /// Its failures before the call: a stream is abandoned once this changes.
    epoch: u64,
}

/// One endpoint and its failures.
#[derive(Debug)]
struct Slot {
    endpoint: String,
    failed_at: Mutex<Option<Instant>>,
    epoch: AtomicU64,
}

/// A backend's endpoints, the one in use, and the timing derived from its TTLs.
#[derive(Debug)]
pub struct EndpointSet {
    backend: &'static str,
    slots: Vec<Slot>,
    in_use: AtomicUsize,
    /// Bumped on every failure, to wake the streams that wait for theirs.
    failures: watch::Sender<u64>,
    /// Serializes failures, so one failure of an endpoint moves the backend once.
    moving: Mutex<()>,
    /// The longest any attempt may take (the backend's request timeout).
    request_timeout: Duration,
    /// The shortest TTL granted through the backend, in ms (0: none yet).
    shortest_ttl_ms: AtomicU64,
    /// The slowest recent answer, in µs, decaying as faster ones come (see
    /// [`EndpointSet::observe`]).
    slowest_us: AtomicU64,
}

/// Whether an error says the endpoint failed rather than the request: nothing came
/// back in time, or the member cannot serve (no leader, cut off from its peers).
pub fn is_endpoint_failure(error: &Error) -> bool {
    matches!(error, Error::Unavailable(_) | Error::Timeout { .. })
}

impl EndpointSet {
    /// `endpoints` of `backend` (its name, for logs and metric labels), the first in
    /// use; no attempt longer than `request_timeout`.
    pub fn new(backend: &'static str, endpoints: Vec<String>, request_timeout: Duration) -> Self {
        Self {
            backend,
            slots: endpoints
                .into_iter()
                .map(|endpoint| Slot {
                    endpoint,
                    failed_at: Mutex::new(None),
                    epoch: AtomicU64::new(0),
                })
                .collect(),
            in_use: AtomicUsize::new(0),
            failures: watch::channel(0).0,
            moving: Mutex::new(()),
            request_timeout,
            shortest_ttl_ms: AtomicU64::new(0),
            slowest_us: AtomicU64::new(0),
        }
    }

    /// How many endpoints there are.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Endpoint `slot`'s address.
    pub fn endpoint(&self, slot: usize) -> &str {
        &self.slots[slot].endpoint
    }

    /// The endpoint in use now, for a call or a stream about to start.
    pub fn in_use(&self) -> At {
        let slot = self.in_use.load(Ordering::SeqCst) % self.slots.len().max(1);
        self.at(slot)
    }

    /// Endpoint `slot` as of now.
    pub fn at(&self, slot: usize) -> At {
        At {
            slot,
            epoch: self.slots[slot].epoch.load(Ordering::SeqCst),
        }
    }

    /// Whether the endpoint of `at` has not failed since.
    pub fn is_live(&self, at: At) -> bool {
        self.at(at.slot) == at
    }

    /// Resolves once the endpoint of `at` has failed: a stream opened on it is to be
    /// abandoned and opened again on the endpoint in use.
    pub async fn failed_since(&self, at: At) {
        let mut failures = self.failures.subscribe();
        // The sender lives as long as `self`, so this only ends on a failure.
        let _ = failures.wait_for(|_| !self.is_live(at)).await;
    }

    /// Reports `error` from the endpoint of `at`. An endpoint failure (reported once per
    /// failure, whoever reports first) moves every later call to another endpoint if it
    /// was the one in use, and ends every stream on it. Returns whether it was one.
    pub fn failed(&self, at: At, error: &Error) -> bool {
        if !is_endpoint_failure(error) {
            return false;
        }
        self.leave(at, &error.to_string());
        true
    }

    /// Records that the endpoint of `at` failed, unless that was recorded since `at`;
    /// if it is in use, moves to the endpoint that failed least recently (never the one
    /// that just failed while there is another).
    pub fn leave(&self, at: At, why: &str) {
        let moved_to = {
            let _moving = self.moving.lock().unwrap_or_else(PoisonError::into_inner);
            if !self.is_live(at) {
                return; // reported already
            }
            self.slots[at.slot].epoch.fetch_add(1, Ordering::SeqCst);
            self.mark_failed(at.slot);
            let n = self.slots.len();
            if self.in_use.load(Ordering::SeqCst) % n != at.slot {
                None
            } else {
                let next = (1..n)
                    .map(|step| (at.slot + step) % n)
                    .min_by_key(|&slot| self.last_failure(slot))
                    .unwrap_or(at.slot);
                self.in_use.store(next, Ordering::SeqCst);
                Some(next)
            }
        };
        self.failures.send_modify(|n| *n += 1);
        warn!(
            backend = self.backend,
            endpoint = self.endpoint(at.slot),
            moved_to = moved_to.map(|next| self.endpoint(next)),
            reason = why,
            "endpoint failed"
        );
        if let Some(next) = moved_to {
            metrics::counter!(
                "ha_backend_reconnects_total",
                "backend" => self.backend,
                "endpoint" => self.endpoint(next).to_owned()
            )
            .increment(1);
        }
    }

    /// Sends later calls to `slot` (a server named it the leader), unless it failed
    /// within four [`detection_bound`](Self::detection_bound)s: a hint must not lead
    /// back to a member just found dead. Streams stay where they are.
    pub fn prefer(&self, slot: usize) {
        if slot >= self.slots.len() {
            return;
        }
        let quarantine = self.detection_bound() * 4;
        if self
            .last_failure(slot)
            .is_some_and(|at| at.elapsed() < quarantine)
        {
            return;
        }
        self.in_use.store(slot, Ordering::SeqCst);
    }

    /// Marks endpoint `slot` as failed now without moving (it failed to connect before
    /// it was ever in use).
    pub fn mark_failed(&self, slot: usize) {
        *self.slots[slot]
            .failed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        metrics::counter!(
            "ha_backend_endpoint_failures_total",
            "backend" => self.backend,
            "endpoint" => self.endpoint(slot).to_owned()
        )
        .increment(1);
    }

    /// Makes `slot` the endpoint in use (the first to answer at connect).
    pub fn start_at(&self, slot: usize) {
        self.in_use.store(slot, Ordering::SeqCst);
    }

    fn last_failure(&self, slot: usize) -> Option<Instant> {
        *self.slots[slot]
            .failed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes a TTL granted through the backend: the probe and the attempt timeout are
    /// sized from the shortest.
    pub fn note_ttl(&self, ttl: Duration) {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .shortest_ttl_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                (now == 0 || ms < now).then_some(ms)
            });
    }

    fn shortest_ttl(&self) -> Option<Duration> {
        match self.shortest_ttl_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Notes how long an answered call took. On slow links (or a slow disk) the attempt
    /// timeout grows to twice the slowest recent answer, so a member that is merely slow
    /// is not taken for a dead one.
    pub fn observe(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let _ = self
            .slowest_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |slowest| {
                // A slower answer counts at once; faster ones wear it down by 1/16 each.
                Some(us.max(slowest - slowest / 16))
            });
    }

    /// How long one attempt of a call that may go to another endpoint may take: TTL/6
    /// of the shortest TTL, so an attempt and its repeat elsewhere fit in a session's
    /// TTL/3, or twice the slowest recent answer if that is longer (at least 0.5 s, at
    /// most the request timeout).
    pub fn attempt_timeout(&self) -> Duration {
        let cap = self.request_timeout;
        let slow = Duration::from_micros(self.slowest_us.load(Ordering::Relaxed)) * 2;
        let base = match self.shortest_ttl() {
            Some(ttl) => (ttl / 6).max(MIN_ATTEMPT_TIMEOUT),
            None => IDLE_ATTEMPT_TIMEOUT,
        };
        base.max(slow).min(cap)
    }

    /// How often the probe asks the endpoint in use: TTL/12 (0.1 s to 1 s).
    pub fn probe_every(&self) -> Duration {
        match self.shortest_ttl() {
            Some(ttl) => (ttl / 12).clamp(MIN_PROBE_EVERY, IDLE_PROBE_EVERY),
            None => IDLE_PROBE_EVERY,
        }
    }

    /// The longest a dead, paused or cut-off endpoint in use goes unnoticed: one probe
    /// interval plus one attempt. TTL/4 for TTLs from 6 s to 12 s, TTL/3 at 2 s.
    pub fn detection_bound(&self) -> Duration {
        self.probe_every() + self.attempt_timeout()
    }

    /// Probes the endpoint in use every [`probe_every`](Self::probe_every) with
    /// `probe(slot)`, bounded by the attempt timeout; a failed or late answer leaves the
    /// endpoint. Runs until `owner` is dropped; `probe` must not keep it alive.
    pub fn spawn_probe<O, F>(self: &Arc<Self>, owner: Weak<O>, probe: F)
    where
        O: Send + Sync + 'static,
        F: Fn(Arc<O>, usize) -> BoxFuture<'static, Result<()>> + Send + 'static,
    {
        let set = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(every) = set.upgrade().map(|s| s.probe_every()) else {
                    return;
                };
                tokio::time::sleep(every).await;
                let (Some(set), Some(owner)) = (set.upgrade(), owner.upgrade()) else {
                    return;
                };
                let at = set.in_use();
                let within = set.attempt_timeout();
                let started = Instant::now();
                let outcome = match tokio::time::timeout(within, probe(owner, at.slot)).await {
                    Ok(outcome) => {
                        set.observe(started.elapsed());
                        outcome
                    }
                    Err(_) => Err(Error::Timeout {
                        operation: "health probe",
                        after: within,
                    }),
                };
                if let Err(error) = outcome {
                    debug!(backend = set.backend, endpoint = set.endpoint(at.slot), error = %error, "health probe failed");
                    set.failed(at, &error);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> EndpointSet {
        let endpoints = (0..n).map(|i| format!("10.0.0.{i}:2379")).collect();
        EndpointSet::new("test", endpoints, Duration::from_secs(5))
    }

    fn dead() -> Error {
        Error::Unavailable("dead".into())
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_moves_to_the_least_recently_failed_never_back() {
        let set = set(3);
        let first = set.in_use();
        assert!(set.failed(first, &dead()));
        assert_eq!(set.in_use().slot, 1);
        assert!(!set.is_live(first));
        // A second report of the same failure moves nothing.
        let second = set.in_use();
        assert!(set.failed(first, &dead()));
        assert_eq!(set.in_use(), second);
        tokio::time::advance(Duration::from_secs(1)).await;
        set.failed(second, &dead());
        // 2 never failed; 0 failed longer ago than 1.
        assert_eq!(set.in_use().slot, 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        set.failed(set.in_use(), &dead());
        assert_eq!(set.in_use().slot, 0);
        // Not an endpoint failure: nothing moves.
        let at = set.in_use();
        let expired = Error::LeaseExpired {
            lease: crate::LeaseId::new(1),
        };
        assert!(!set.failed(at, &expired));
        assert_eq!(set.in_use(), at);
        // An endpoint not in use fails: the one in use stays.
        set.failed(set.at(1), &dead());
        assert_eq!(set.in_use(), at);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_learns_its_endpoint_failed_and_a_hint_does_not_lead_back_to_it() {
        let set = Arc::new(set(2));
        let at = set.in_use();
        let waiter = {
            let set = Arc::clone(&set);
            tokio::spawn(async move { set.failed_since(at).await })
        };
        tokio::task::yield_now().await;
        // A hint moves later calls, not the streams.
        set.prefer(1);
        assert_eq!(set.in_use().slot, 1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        set.prefer(0);
        set.leave(at, "test");
        waiter.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.in_use().slot, 1);
        set.prefer(0);
        assert_eq!(set.in_use().slot, 1, "0 just failed");
        tokio::time::advance(set.detection_bound() * 5).await;
        set.prefer(0);
        assert_eq!(set.in_use().slot, 0);
    }

    #[test]
    fn slow_answers_stretch_the_attempt_timeout_and_wear_off() {
        let set = set(3);
        set.note_ttl(Duration::from_secs(3));
        assert_eq!(set.attempt_timeout(), MIN_ATTEMPT_TIMEOUT);
        set.observe(Duration::from_millis(600));
        assert_eq!(set.attempt_timeout(), Duration::from_millis(1200));
        for _ in 0..64 {
            set.observe(Duration::from_millis(5));
        }
        assert_eq!(set.attempt_timeout(), MIN_ATTEMPT_TIMEOUT);
    }

    #[test]
    fn timing_follows_the_shortest_ttl() {
        let set = set(3);
        assert_eq!(set.detection_bound(), Duration::from_secs(3));
        set.note_ttl(Duration::from_secs(6));
        assert_eq!(set.attempt_timeout(), Duration::from_secs(1));
        assert_eq!(set.detection_bound(), Duration::from_millis(1500));
        set.note_ttl(Duration::from_secs(60));
        set.note_ttl(Duration::from_secs(2));
        assert_eq!(set.attempt_timeout(), MIN_ATTEMPT_TIMEOUT);
        assert!(set.detection_bound() <= Duration::from_secs(2) / 3 + Duration::from_millis(1));
    }
}
