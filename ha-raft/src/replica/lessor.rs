//! The lessor: lease deadlines, kept in memory on the Raft leader only.
//!
//! Keepalives are not logged. The leader records the renewal, then confirms it still
//! leads with a quorum round that started after the record (one round per batch of
//! keepalives), and only then acknowledges. A deposed leader cut off from the majority
//! cannot confirm, so it never extends a client's self-fence deadline. A node that
//! becomes leader gives every lease a fresh full TTL, which never shortens one: the old
//! leader's acknowledgements all came before its last confirmed round, and so before
//! the new term began.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

/// Deadlines for one leadership term.
#[derive(Debug, Default)]
pub struct Lessor {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The term these deadlines belong to; `None` while not leader.
    term: Option<u64>,
    deadlines: HashMap<u64, Instant>,
    /// Leases with an `Expire` proposal in flight: renewals of them are refused, so no
    /// keepalive is acknowledged for a lease that is about to be revoked.
    expiring: HashSet<u64>,
    /// An `Expire` proposal failed since the last scan: scan again even if nothing
    /// was applied.
    retry: bool,
}

impl Lessor {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Starts or continues leading in `term`; a new term starts with no deadlines, so
    /// every lease gets a full TTL from when it is first seen.
    pub fn lead(&self, term: u64) {
        self.with(|inner| {
            if inner.term != Some(term) {
                tracing::info!(term, "lessor: leading, every lease gets a fresh TTL");
                inner.term = Some(term);
                inner.deadlines.clear();
                inner.expiring.clear();
            }
        });
    }

    /// Stops leading: forgets every deadline.
    pub fn step_down(&self) {
        self.with(|inner| {
            if inner.term.take().is_some() {
                inner.deadlines.clear();
                inner.expiring.clear();
            }
        });
    }

    /// The term led, if any.
    pub fn term(&self) -> Option<u64> {
        self.with(|inner| inner.term)
    }

    /// Records renewals now, under one lock, and returns the leases refused because
    /// they are being expired; `None` if not leading in `term`.
    pub fn renew_all(&self, term: u64, renewals: &[(u64, Duration)]) -> Option<Vec<u64>> {
        let now = Instant::now();
        self.with(|inner| {
            if inner.term != Some(term) {
                return None;
            }
            let mut refused = Vec::new();
            for (lease, ttl) in renewals {
                if inner.expiring.contains(lease) {
                    refused.push(*lease);
                } else {
                    inner.deadlines.insert(*lease, now + *ttl);
                }
            }
            Some(refused)
        })
    }

    /// Whether a lease is being expired.
    pub fn is_expiring(&self, lease: u64) -> bool {
        self.with(|inner| inner.expiring.contains(&lease))
    }

    /// Given every live lease and its TTL, returns those past their deadline and marks
    /// them expiring. Leases seen for the first time get a full TTL from now; leases no
    /// longer live are forgotten.
    pub fn due(&self, term: u64, leases: &[(u64, Duration)]) -> Vec<u64> {
        let now = Instant::now();
        self.with(|inner| {
            if inner.term != Some(term) {
                return Vec::new();
            }
            let live: HashSet<u64> = leases.iter().map(|(id, _)| *id).collect();
            inner.deadlines.retain(|id, _| live.contains(id));
            inner.expiring.retain(|id| live.contains(id));
            let mut due = Vec::new();
            for (id, ttl) in leases {
                let deadline = *inner.deadlines.entry(*id).or_insert(now + *ttl);
                if deadline <= now && inner.expiring.insert(*id) {
                    due.push(*id);
                }
            }
            due
        })
    }

    /// An `Expire` proposal failed; let the next tick try again.
    pub fn expire_failed(&self, lease: u64) {
        self.with(|inner| {
            inner.expiring.remove(&lease);
            inner.retry = true;
        });
    }

    /// Whether an `Expire` proposal failed since the last call.
    pub(crate) fn take_retry(&self) -> bool {
        self.with(|inner| std::mem::take(&mut inner.retry))
    }

    /// The earliest deadline of a lease not already being expired, to know when to
    /// look again. (An expiring lease keeps its past deadline until its `Expire` entry
    /// applies, which a leader without quorum never sees.)
    pub fn next_deadline(&self) -> Option<Instant> {
        self.with(|inner| {
            inner
                .deadlines
                .iter()
                .filter(|(id, _)| !inner.expiring.contains(id))
                .map(|(_, deadline)| *deadline)
                .min()
        })
    }
}

/// Least time between the starts of two confirmation rounds.
const ROUND_PACE: Duration = Duration::from_millis(5);

/// Batches leadership confirmations: every waiter that arrives while a round is running,
/// or within [`ROUND_PACE`] of its start, shares the next round, so 10,000 keepalives
/// cost a handful of quorum rounds.
#[derive(Debug, Clone)]
pub struct Confirmer {
    requests: mpsc::UnboundedSender<oneshot::Sender<Result<(), String>>>,
}

impl Confirmer {
    /// Starts the batching loop; `confirm` runs one quorum round.
    pub fn spawn<F, Fut>(confirm: F) -> (Self, tokio::task::JoinHandle<()>)
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send,
    {
        let (requests, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<Result<(), String>>>();
        let task = tokio::spawn(async move {
            let mut last_round: Option<Instant> = None;
            while let Some(first) = rx.recv().await {
                // Paced: waiters that arrive meanwhile share the round.
                if let Some(at) = last_round {
                    sleep_until(at + ROUND_PACE).await;
                }
                let mut waiters = vec![first];
                while let Ok(more) = rx.try_recv() {
                    waiters.push(more);
                }
                // The round starts now, after every waiter in this batch recorded its
                // renewal.
                last_round = Some(Instant::now());
                let result = confirm().await;
                for waiter in waiters {
                    let _ = waiter.send(result.clone());
                }
            }
        });
        (Self { requests }, task)
    }

    /// Waits for a quorum round that starts after this call.
    pub async fn confirm(&self) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .map_err(|_| "node is shutting down".to_owned())?;
        rx.await.map_err(|_| "node is shutting down".to_owned())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One renewal: whether it was recorded.
    fn renew(lessor: &Lessor, term: u64, lease: u64, ttl: Duration) -> bool {
        lessor.renew_all(term, &[(lease, ttl)]) == Some(vec![])
    }

    #[tokio::test(start_paused = true)]
    async fn new_term_grants_fresh_ttls_and_expiry_is_marked_once() {
        let lessor = Lessor::default();
        let ttl = Duration::from_secs(2);
        assert!(!renew(&lessor, 1, 7, ttl), "not leading yet");
        lessor.lead(1);
        assert!(lessor.due(1, &[(7, ttl)]).is_empty());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(renew(&lessor, 1, 7, ttl));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(lessor.due(1, &[(7, ttl)]).is_empty(), "renewed 1.5 s ago");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(lessor.due(1, &[(7, ttl)]), vec![7]);
        assert!(lessor.due(1, &[(7, ttl)]).is_empty(), "already expiring");
        assert_eq!(
            lessor.next_deadline(),
            None,
            "an expiring lease sets no wake-up"
        );
        assert!(
            !renew(&lessor, 1, 7, ttl),
            "expiring leases are not renewed"
        );
        // A new term forgets it all: fresh TTL.
        lessor.lead(2);
        assert!(lessor.due(2, &[(7, ttl)]).is_empty());
        assert!(renew(&lessor, 2, 7, ttl));
        assert!(!renew(&lessor, 1, 7, ttl), "stale term");
    }

    #[tokio::test]
    async fn confirmer_batches_waiters_behind_one_round() {
        let rounds = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = std::sync::Arc::clone(&rounds);
        let (confirmer, _task) = Confirmer::spawn(move || {
            let counted = std::sync::Arc::clone(&counted);
            async move {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(())
            }
        });
        let waiters: Vec<_> = (0..100)
            .map(|_| {
                let c = confirmer.clone();
                tokio::spawn(async move { c.confirm().await })
            })
            .collect();
        for w in waiters {
            assert!(matches!(w.await, Ok(Ok(()))));
        }
        let rounds = rounds.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            rounds <= 3,
            "{rounds} rounds for 100 concurrent confirmations"
        );
    }
}
