//! A `RaftClient`'s keepalives, batched: every keepalive asked within `PACE` of the
//! previous batch goes out in one `KeepAliveBatch` call (as etcd's client multiplexes
//! its keepalives over one stream), so 10,000 sessions cost at most 20 calls a second
//! and one quorum round each; a lone keepalive goes out at once.

use std::future::Future;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use ha_core::{Error, KvLimits, LeaseId, Result};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{sleep_until, Instant};
use tonic::Status;

use super::connection::{CallFailure, RaftClient, Repeat, Waiter};
use crate::net::limits::MAX_KEEPALIVE_BATCH;
use crate::proto::{self, KeepAliveOutcome};

/// Least time between the starts of two batches of one client: each batch is a call and
/// a quorum round on the leader, its main cost. A session measures its lease from before
/// it queues the keepalive, so this wait costs margin (2.5 % of the shortest TTL), never
/// safety.
pub(crate) const PACE: Duration = Duration::from_millis(50);

/// Most batches of one client in flight at once: behind a slow leader the next batch
/// waits and grows instead of adding calls.
const MAX_IN_FLIGHT: usize = 4;

/// Starts the batching task; `send` makes one `KeepAliveBatch` call. The task ends
/// when the returned sender is dropped.
pub(crate) fn start<F, Fut>(send: F) -> mpsc::UnboundedSender<Waiter>
where
    F: Fn(Vec<u64>) -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<Vec<KeepAliveOutcome>, CallFailure>> + Send + 'static,
{
    let (queue, mut waiting) = mpsc::unbounded_channel::<Waiter>();
    tokio::spawn(async move {
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut last_sent: Option<Instant> = None;
        while let Some(first) = waiting.recv().await {
            let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                return;
            };
            let mut batch = vec![first];
            let until = last_sent.map_or_else(Instant::now, |at| at + PACE);
            while batch.len() < MAX_KEEPALIVE_BATCH {
                tokio::select! {
                    biased;
                    more = waiting.recv() => match more {
                        Some(waiter) => batch.push(waiter),
                        None => break,
                    },
                    _ = sleep_until(until) => break,
                }
            }
            last_sent = Some(Instant::now());
            let reply = send(batch.iter().map(|(lease, _)| *lease).collect());
            tokio::spawn(async move {
                deliver(batch, reply.await);
                drop(permit);
            });
        }
    });
    queue
}

/// Hands each waiter of `batch` its lease's result.
fn deliver(batch: Vec<Waiter>, reply: std::result::Result<Vec<KeepAliveOutcome>, CallFailure>) {
    let outcomes = match reply {
        Ok(outcomes) if outcomes.len() == batch.len() => outcomes,
        Ok(outcomes) => {
            let (asked, answered) = (batch.len(), outcomes.len());
            for (_, waiter) in batch {
                let _ = waiter.send(Err(Error::Unavailable(format!(
                    "a keepalive batch of {asked} leases was answered with {answered} results"
                ))));
            }
            return;
        }
        Err(failure) => {
            for (_, waiter) in batch {
                let _ = waiter.send(Err(failure.error("keep_alive")));
            }
            return;
        }
    };
    for ((lease, waiter), outcome) in batch.into_iter().zip(outcomes) {
        let result = if outcome.lease != lease {
            Err(Error::Unavailable(format!(
                "a keepalive batch answered for lease {} where {lease} was asked",
                outcome.lease
            )))
        } else if outcome.expired {
            Err(Error::LeaseExpired {
                lease: LeaseId::new(lease),
            })
        } else {
            Ok(Duration::from_millis(outcome.ttl_ms))
        };
        let _ = waiter.send(result);
    }
}

impl RaftClient {
    /// Queues a keepalive of `lease` for this client's next batch, starting the
    /// batching task on first use (or again, when the runtime that ran it has stopped).
    pub(super) fn queue_keep_alive(
        &self,
        lease: u64,
    ) -> tokio::sync::oneshot::Receiver<Result<Duration>> {
        let (result, received) = tokio::sync::oneshot::channel();
        let mut queue = self
            .inner
            .keepalives
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut waiter = (lease, result);
        if let Some(running) = queue.as_ref() {
            match running.send(waiter) {
                Ok(()) => return received,
                Err(tokio::sync::mpsc::error::SendError(back)) => waiter = back,
            }
        }
        let weak = Arc::downgrade(&self.inner);
        let started = start(move |leases: Vec<u64>| {
            let inner = weak.upgrade();
            async move {
                let Some(inner) = inner else {
                    return Err(CallFailure::Status(Status::cancelled(
                        "the client was dropped",
                    )));
                };
                let client = RaftClient {
                    inner,
                    kv_limits: KvLimits::default(),
                };
                let request = proto::KeepAliveBatchRequest { leases };
                let reply = client
                    .call_status(Repeat::Always, |mut c| {
                        let request = request.clone();
                        async move { c.keep_alive_batch(request).await }
                    })
                    .await?;
                Ok(reply.into_inner().outcomes)
            }
        });
        let _ = started.send(waiter);
        *queue = Some(started);
        received
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::oneshot;

    fn renewed(leases: &[u64]) -> Vec<KeepAliveOutcome> {
        leases
            .iter()
            .map(|lease| KeepAliveOutcome {
                lease: *lease,
                ttl_ms: 2000,
                expired: *lease == 13,
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn keepalives_asked_together_share_one_call_and_get_their_own_result() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&calls);
        let queue = start(move |leases: Vec<u64>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { Ok(renewed(&leases)) }
        });
        // One alone goes at once.
        let (tx, rx) = oneshot::channel();
        assert!(queue.send((1, tx)).is_ok());
        let started = Instant::now();
        assert_eq!(
            rx.await.ok().and_then(|r| r.ok()),
            Some(Duration::from_secs(2))
        );
        assert_eq!(started.elapsed(), Duration::ZERO, "a lone keepalive waited");
        // 1,000 within the pace: one more call.
        let receivers: Vec<_> = (10..1010u64)
            .map(|lease| {
                let (tx, rx) = oneshot::channel();
                assert!(queue.send((lease, tx)).is_ok());
                (lease, rx)
            })
            .collect();
        for (lease, rx) in receivers {
            let result = rx.await.unwrap_or_else(|e| panic!("{e}"));
            match lease {
                13 => assert!(
                    matches!(result, Err(Error::LeaseExpired { .. })),
                    "{result:?}"
                ),
                _ => assert_eq!(result.ok(), Some(Duration::from_secs(2))),
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_call_fails_every_keepalive_of_its_batch_with_a_typed_error() {
        let queue =
            start(|_leases: Vec<u64>| async { Err(CallFailure::Timeout(Duration::from_secs(10))) });
        let receivers: Vec<_> = (0..3u64)
            .map(|lease| {
                let (tx, rx) = oneshot::channel();
                assert!(queue.send((lease, tx)).is_ok());
                rx
            })
            .collect();
        for rx in receivers {
            let result = rx.await.unwrap_or_else(|e| panic!("{e}"));
            assert!(
                matches!(
                    result,
                    Err(Error::Timeout {
                        operation: "keep_alive",
                        ..
                    })
                ),
                "{result:?}"
            );
        }
        // A short answer is a typed error too, never a panic.
        let queue = start(|_leases: Vec<u64>| async { Ok(renewed(&[1])) });
        let (a, first) = oneshot::channel();
        let (b, second) = oneshot::channel();
        assert!(queue.send((1, a)).is_ok() && queue.send((2, b)).is_ok());
        for rx in [first, second] {
            let result = rx.await.unwrap_or_else(|e| panic!("{e}"));
            assert!(matches!(result, Err(Error::Unavailable(_))), "{result:?}");
        }
    }
}
