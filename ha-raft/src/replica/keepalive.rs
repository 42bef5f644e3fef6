//! Keepalives on the leader, one lease or a batch: every renewal recorded under one
//! lessor lock, then one quorum round that started after all were recorded, then a
//! result per lease.

use std::collections::HashSet;
use std::time::Duration;

use super::handle::{Replica, Target};
use crate::net::wire::{PeerFailure, Renewal, WireError};
use crate::store::sled_machine::StateMachineStore;

/// Each lease's TTL in milliseconds, as this node has applied it (`None`: not live).
fn ttls(sm: &StateMachineStore, leases: &[u64]) -> Vec<Option<u64>> {
    let sm = sm.lock();
    leases
        .iter()
        .map(|lease| sm.state.leases.get(lease).map(|l| l.ttl_ms))
        .collect()
}

impl Replica {
    /// Keepalives of `leases` on this node, which believes it leads.
    pub(crate) async fn keep_alive_batch_local(
        &self,
        leases: &[u64],
    ) -> std::result::Result<Vec<Renewal>, PeerFailure> {
        let Target::Me { term } = self.target() else {
            return Err(PeerFailure::NotLeader);
        };
        let ms = Duration::from_millis;
        let known = ttls(&self.sm, leases);
        let live: Vec<(u64, Duration)> = leases
            .iter()
            .zip(&known)
            .filter_map(|(lease, ttl)| ttl.map(|t| (*lease, ms(t))))
            .collect();
        // Refused now (being expired) stays refused: `expire_failed` may clear the mark
        // before the answer, and such a lease has no deadline recorded.
        let mut refused: HashSet<u64> = self
            .lessor
            .renew_all(term, &live)
            .ok_or(PeerFailure::NotLeader)?
            .into_iter()
            .collect();
        // A quorum round that starts after the renewals were recorded: a deposed leader
        // fails here and none of them is acknowledged.
        self.confirmer
            .confirm()
            .await
            .map_err(|_| PeerFailure::NotLeader)?;
        let now_known = ttls(&self.sm, leases);
        // Registered while this ran (applied since): recorded now.
        let late: Vec<(u64, Duration)> = leases
            .iter()
            .zip(known.iter().zip(&now_known))
            .filter_map(|(lease, ttls)| match ttls {
                (None, Some(t)) => Some((*lease, ms(*t))),
                _ => None,
            })
            .collect();
        refused.extend(
            self.lessor
                .renew_all(term, &late)
                .ok_or(PeerFailure::NotLeader)?,
        );
        Ok(leases
            .iter()
            .zip(now_known)
            .map(|(lease, ttl)| match ttl {
                Some(ttl) if !refused.contains(lease) && !self.lessor.is_expiring(*lease) => {
                    Ok(ttl)
                }
                _ => Err(WireError::LeaseExpired(*lease)),
            })
            .collect())
    }
}
