//! Lease renewals on one cached keepalive stream per lease, and what makes them safe:
//! a round that does not complete poisons its stream. A stream lives on the endpoint in
//! use when it was opened; once the backend leaves that endpoint, the next renewal opens
//! a new one where the backend went.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use ha_core::{Error, LeaseId, Result};
use tokio::time::timeout;

use ha_core::endpoints::is_endpoint_failure;

use crate::error::{is_lease_not_found, map};

use super::endpoints::Conn;
use super::{lease_i64, EtcdBackend};

/// One lease's keepalive stream; `None` once a round on it was abandoned or failed.
type Stream = tokio::sync::Mutex<Option<(LeaseKeeper, LeaseKeepAliveStream)>>;

/// One lease's keepalive stream and the endpoint it was opened on.
pub(super) struct Keeper {
    stream: Stream,
    conn: Conn,
}

/// One request and its reply on a lease's keepalive stream. etcd's replies carry no
/// request id, so a reply belongs to the oldest unanswered request: a round dropped
/// between send and reply (the caller's timeout) leaves its reply in the stream, where
/// the next round would read it and credit it to its own, later send time. Unless the
/// round completes, dropping it poisons the stream (the next call opens a new one).
struct KeepAliveRound<'a> {
    slot: &'a mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    keeper: &'a Arc<Keeper>,
    keepers: &'a Mutex<HashMap<i64, Arc<Keeper>>>,
    id: i64,
    /// The round got its reply (or its error) instead of being dropped mid-way.
    answered: bool,
    completed: bool,
    reuse_when_abandoned: bool,
}

impl KeepAliveRound<'_> {
    async fn run(&mut self, request_timeout: Duration, lease: LeaseId) -> Result<Duration> {
        let Some((sender, stream)) = self.slot.as_mut() else {
            return Err(Error::Unavailable("the keepalive stream was reset".into()));
        };
        let round = async {
            sender.keep_alive().await?;
            stream.message().await
        };
        match timeout(request_timeout, round).await {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {
                Ok(Duration::from_secs(response.ttl() as u64))
            }
            Ok(Ok(Some(_))) => Err(Error::LeaseExpired { lease }),
            Ok(Ok(None)) => Err(Error::Unavailable(
                "etcd closed the keepalive stream".into(),
            )),
            Ok(Err(e)) if is_lease_not_found(&e) => Err(Error::LeaseExpired { lease }),
            Ok(Err(e)) => Err(map(e)),
            Err(_) => Err(Error::Timeout {
                operation: "keep_alive",
                after: request_timeout,
            }),
        }
    }
}

impl Drop for KeepAliveRound<'_> {
    fn drop(&mut self) {
        if self.completed || (self.reuse_when_abandoned && !self.answered) {
            return;
        }
        *self.slot = None;
        let mut keepers = self.keepers.lock().unwrap_or_else(PoisonError::into_inner);
        if keepers
            .get(&self.id)
            .is_some_and(|cached| Arc::ptr_eq(cached, self.keeper))
        {
            keepers.remove(&self.id);
        }
    }
}

impl EtcdBackend {
    /// Test-only mutant: keeps a keepalive stream after a round on it was abandoned, so
    /// the abandoned round's late reply answers the next one. The proxy tests must catch
    /// it (`tests/stale_keepalive.rs`).
    #[cfg(feature = "testing")]
    #[doc(hidden)]
    pub fn with_stale_keepalive_mutant(mut self) -> Self {
        self.reuse_abandoned_streams = true;
        self
    }

    /// The lease's cached keepalive stream if it is on the endpoint in use, else a new
    /// one opened there (which renews the lease once on its own).
    async fn keeper(&self, id: i64, lease: LeaseId) -> Result<Arc<Keeper>> {
        let cached = self
            .keepers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned();
        if let Some(keeper) = cached.filter(|k| self.endpoints.is_live(&k.conn)) {
            return Ok(keeper);
        }
        let conn = self.endpoints.current().await?;
        let mut client = conn.client.clone();
        let within = self.endpoints.attempt_timeout();
        let opened = match timeout(within, client.lease_keep_alive(id)).await {
            Ok(Ok(opened)) => Ok(opened),
            Ok(Err(e)) if is_lease_not_found(&e) => return Err(Error::LeaseExpired { lease }),
            Ok(Err(e)) => Err(map(e)),
            Err(_) => Err(Error::Timeout {
                operation: "keep_alive",
                after: within,
            }),
        }
        .inspect_err(|error| {
            self.endpoints.failed(&conn, error);
        })?;
        let keeper = Arc::new(Keeper {
            stream: tokio::sync::Mutex::new(Some(opened)),
            conn,
        });
        self.keepers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&keeper));
        Ok(keeper)
    }

    /// One renewal: `keep_alive` of the contract. A round that fails on a dead endpoint
    /// is tried once more on the endpoint the backend moved to.
    pub(super) async fn renew(&self, lease: LeaseId) -> Result<Duration> {
        let id = lease_i64(lease)?;
        let mut endpoint_failures = 0;
        // A stream poisoned by an abandoned round while this call waited for it is
        // replaced once; the replacement is fresh, so a later pass always has a stream.
        for _ in 0..3 {
            let keeper = match self.keeper(id, lease).await {
                Ok(keeper) => keeper,
                Err(e) if is_endpoint_failure(&e) && endpoint_failures == 0 => {
                    endpoint_failures += 1;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut slot = keeper.stream.lock().await;
            if slot.is_none() {
                continue;
            }
            let mut round = KeepAliveRound {
                slot: &mut slot,
                keeper: &keeper,
                keepers: &self.keepers,
                id,
                answered: false,
                completed: false,
                reuse_when_abandoned: self.reuse_abandoned_streams,
            };
            let started = tokio::time::Instant::now();
            let result = round.run(self.endpoints.attempt_timeout(), lease).await;
            if result.is_ok() {
                self.endpoints.set().observe(started.elapsed());
            }
            round.answered = true;
            round.completed = result.is_ok();
            drop(round);
            match result {
                Err(e) if self.endpoints.failed(&keeper.conn, &e) && endpoint_failures == 0 => {
                    endpoint_failures += 1;
                }
                other => return other,
            }
        }
        Err(Error::Unavailable(
            "the keepalive stream was reset twice while waiting for it".into(),
        ))
    }
}
