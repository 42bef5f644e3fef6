//! The group's feature level, kept by its Raft leader (see `data::level`). Until a level
//! is recorded in the log, the leader asks every member which level it serves and
//! writes at the lowest of them (batches only from level 2); once every member serves a
//! level of 3 or more it records that level with `SetLevel`, and from then on a member
//! below it refuses to start: the level never goes back, and nothing needs asking.

use std::sync::atomic::Ordering;

use futures::future::join_all;
use tokio::time::sleep;
use tracing::{info, warn};

use super::{NodeInner, RaftNode, WeakNode};
use crate::data::command::{Command, NodeId};
use crate::data::level::{LevelReport, FIRST_RECORDED_LEVEL, LEVEL_OF_UNVERSIONED};
use crate::net::network::{PeerError, PeerRpc};

impl RaftNode {
    /// Starts the loop that keeps the level the group writes at.
    pub(crate) fn keep_feature_level(&self) {
        self.spawn(level_loop(self.downgrade()));
    }
}

/// Looks at once when this node becomes leader (a fresh group batches only once its
/// leader knows every member's level), and once per longest election timeout.
async fn level_loop(node: WeakNode) {
    let Some(first) = node.upgrade() else { return };
    let mut metrics = first.inner.replica.raft.metrics();
    let shutdown = first.inner.replica.shutdown.clone();
    let every = first.inner.replica.config.election_timeout.1;
    drop(first);
    loop {
        let leading = {
            let m = metrics.borrow_and_update();
            m.state.is_leader().then_some(m.current_term)
        };
        let Some(node) = node.upgrade() else { return };
        node.inner.settle_level().await;
        drop(node);
        let new_leadership = async {
            loop {
                if metrics.changed().await.is_err() {
                    return std::future::pending().await;
                }
                let m = metrics.borrow();
                let now = m.state.is_leader().then_some(m.current_term);
                if now.is_some() && now != leading {
                    return;
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sleep(every) => {}
            () = new_leadership => {}
        }
    }
}

impl NodeInner {
    /// One look: on the leader, the level to write at, and a raise recorded once every
    /// member serves it. Elsewhere, or while a member does not answer, the recorded
    /// level, which every running member serves.
    async fn settle_level(&self) {
        let replica = &self.replica;
        let recorded = replica.sm.recorded_level();
        let serves = replica.sm.serves();
        let members = self.members_if_leader();
        let lowest = match members {
            Some(members) if recorded < serves => self.lowest_served(members).await,
            _ => None,
        };
        let Some(lowest) = lowest else {
            replica.writes_at.store(recorded, Ordering::Release);
            return;
        };
        let level = lowest.min(serves).max(recorded);
        replica.writes_at.store(level, Ordering::Release);
        if level > recorded && level >= FIRST_RECORDED_LEVEL {
            info!(
                node = replica.config.id,
                level, recorded, "every member serves feature level {level}: recording it"
            );
            if let Err(e) = replica.propose_local(Command::SetLevel { level }).await {
                warn!(node = replica.config.id, level, error = ?e, "the level was not recorded; trying again");
            }
        }
    }

    /// On the leader, every member of its membership (joint halves and learners
    /// included) but itself, with addresses.
    fn members_if_leader(&self) -> Option<Vec<(NodeId, String)>> {
        let metrics = self.replica.raft.metrics();
        let metrics = metrics.borrow();
        if !metrics.state.is_leader() {
            return None;
        }
        Some(
            metrics
                .membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != self.replica.config.id)
                .map(|(id, node)| (*id, node.addr.clone()))
                .collect(),
        )
    }

    /// The lowest level this member and `members` serve, if every one answered; a member
    /// that does not know the question is ha 0.1.0.
    async fn lowest_served(&self, members: Vec<(NodeId, String)>) -> Option<u32> {
        let timeout = self.replica.config.effective_rpc_timeout();
        let asks = members.iter().map(|(id, addr)| async move {
            let answer: Result<LevelReport, PeerError> = self
                .pool
                .call(*id, addr, PeerRpc::FeatureLevel, &(), timeout)
                .await;
            match answer {
                Ok(report) => Some(report.serves),
                Err(PeerError::Unimplemented { .. }) => Some(LEVEL_OF_UNVERSIONED),
                Err(_) => None,
            }
        });
        let mut lowest = self.replica.sm.serves();
        for served in join_all(asks).await {
            lowest = lowest.min(served?);
        }
        Some(lowest)
    }
}
