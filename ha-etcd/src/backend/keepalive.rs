//! Lease renewals on one cached keepalive stream per lease, and what makes them safe:
//! a round that does not complete poisons its stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use ha_core::{Error, LeaseId, Result};
use tokio::time::timeout;

use crate::error::{is_lease_not_found, map};

use super::{lease_i64, EtcdBackend};

/// One lease's keepalive stream; `None` once a round on it was abandoned or failed.
pub(super) type Keeper = Arc<tokio::sync::Mutex<Option<(LeaseKeeper, LeaseKeepAliveStream)>>>;

/// One request and its reply on a lease's keepalive stream. etcd's replies carry no
/// request id, so a reply belongs to the oldest unanswered request: a round dropped
/// between send and reply (the caller's timeout) leaves its reply in the stream, where
/// the next round would read it and credit it to its own, later send time. Unless the
/// round completes, dropping it poisons the stream (the next call opens a new one).
struct KeepAliveRound<'a> {
    slot: &'a mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    keeper: &'a Keeper,
    keepers: &'a Mutex<HashMap<i64, Keeper>>,
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

    /// The lease's cached keepalive stream, opened if there is none.
    async fn keeper(&self, id: i64, lease: LeaseId) -> Result<Keeper> {
        let cached = self
            .keepers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .cloned();
        if let Some(keeper) = cached {
            return Ok(keeper);
        }
        let mut client = self.client.clone();
        let opened = match timeout(self.config.request_timeout, client.lease_keep_alive(id)).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) if is_lease_not_found(&e) => return Err(Error::LeaseExpired { lease }),
            Ok(Err(e)) => return Err(map(e)),
            Err(_) => {
                return Err(Error::Timeout {
                    operation: "keep_alive",
                    after: self.config.request_timeout,
                })
            }
        };
        let keeper = Arc::new(tokio::sync::Mutex::new(Some(opened)));
        self.keepers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&keeper));
        Ok(keeper)
    }

    /// One renewal: `keep_alive` of the contract.
    pub(super) async fn renew(&self, lease: LeaseId) -> Result<Duration> {
        let id = lease_i64(lease)?;
        // A stream poisoned by an abandoned round while this call waited for it is
        // replaced once; the replacement is fresh, so a second pass always has a stream.
        for _ in 0..2 {
            let keeper = self.keeper(id, lease).await?;
            let mut slot = keeper.lock().await;
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
            let result = round.run(self.config.request_timeout, lease).await;
            round.answered = true;
            round.completed = result.is_ok();
            return result;
        }
        Err(Error::Unavailable(
            "the keepalive stream was reset twice while waiting for it".into(),
        ))
    }
}
