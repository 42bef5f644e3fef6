//! Keepalives of one lease or a batch, wherever the leader is: served by this node's
//! replica when it leads, else forwarded whole.

use ha_core::Result;

use super::routing::Attempt;
use super::NodeInner;
use crate::net::limits::check_batch_size;
use crate::net::network::PeerRpc;
use crate::net::wire::{PeerFailure, Renewal};
use crate::replica::Target;

impl NodeInner {
    /// Keepalives of `leases` on the leader, wherever it is; a result per lease.
    pub(crate) async fn keep_alive_batch(&self, leases: &[u64]) -> Result<Vec<Renewal>> {
        check_batch_size(leases.len())?;
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        self.with_leader("keep_alive", |target| async move {
            match target {
                Target::Me { .. } => match self.replica.keep_alive_batch_local(leases).await {
                    Ok(renewals) => Attempt::Done(Ok(renewals)),
                    Err(PeerFailure::Error(e)) => Attempt::Done(Err(e.into())),
                    Err(PeerFailure::NotLeader) => {
                        Attempt::Retry("leadership not confirmed".into())
                    }
                },
                Target::Peer { id, addr } => {
                    self.forward(id, &addr, PeerRpc::KeepAliveBatch, &leases, true)
                        .await
                }
                Target::Unknown => Attempt::Retry("no leader known".into()),
            }
        })
        .await
    }
}
