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
use crate::admin::membership::MembershipChange;
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
/// leader knows every member's level) or stops leading (what it asked no longer
/// holds), and once per longest election timeout.
async fn level_loop(node: WeakNode) {
    let Some(first) = node.upgrade() else { return };
    let mut metrics = first.inner.replica.raft.metrics();
    let shutdown = first.inner.replica.shutdown.clone();
    let every = first.inner.replica.config.election_timeout.1;
    drop(first);
    let mut settled = None;
    loop {
        let leading = {
            let m = metrics.borrow_and_update();
            m.state.is_leader().then_some(m.current_term)
        };
        let Some(node) = node.upgrade() else { return };
        settled = node.inner.settle_level(settled).await;
        drop(node);
        let new_leadership = async {
            loop {
                if metrics.changed().await.is_err() {
                    return std::future::pending().await;
                }
                let m = metrics.borrow();
                if m.state.is_leader().then_some(m.current_term) != leading {
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
    /// level, which every running member serves. `settled` is the term of the last
    /// look that asked every member; returns this look's.
    async fn settle_level(&self, settled: Option<u64>) -> Option<u64> {
        let replica = &self.replica;
        let recorded = replica.sm.recorded_level();
        let serves = replica.sm.serves();
        let leading = self.members_if_leader().map(|(term, _)| term);
        if leading.is_none() || leading != settled || recorded >= serves {
            // What a former leadership asked no longer holds.
            replica.writes_at.store(recorded, Ordering::Release);
        }
        if leading.is_none() || recorded >= serves {
            return None;
        }
        // No member joins between the asking and the raise: a joiner is checked against
        // what this look settles.
        let _no_joins = self.membership_lock.lock().await;
        let (term, members) = self.members_if_leader()?;
        let Some(lowest) = self.lowest_served(members).await else {
            replica.writes_at.store(recorded, Ordering::Release);
            return None;
        };
        if self.members_if_leader().map(|(now, _)| now) != Some(term) {
            replica.writes_at.store(recorded, Ordering::Release);
            return None;
        }
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
        Some(term)
    }

    /// On the leader, its term and every member of its membership (joint halves and
    /// learners included) but itself, with addresses.
    fn members_if_leader(&self) -> Option<(u64, Vec<(NodeId, String)>)> {
        let metrics = self.replica.raft.metrics();
        let metrics = metrics.borrow();
        if !metrics.state.is_leader() {
            return None;
        }
        let members = metrics
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != self.replica.config.id)
            .map(|(id, node)| (*id, node.addr.clone()))
            .collect();
        Some((metrics.current_term, members))
    }

    /// The level node `id` at `addr` serves, if it answers; one that does not know the
    /// question is ha 0.1.0.
    async fn level_of(&self, id: NodeId, addr: &str) -> Option<u32> {
        let timeout = self.replica.config.effective_rpc_timeout();
        let answer: Result<LevelReport, PeerError> = self
            .pool
            .call(id, addr, PeerRpc::FeatureLevel, &(), timeout)
            .await;
        match answer {
            Ok(report) => Some(report.serves),
            Err(PeerError::Unimplemented { .. }) => Some(LEVEL_OF_UNVERSIONED),
            Err(_) => None,
        }
    }

    /// `change`, with the level of a joiner that did not state one (ha 0.1.0's join, the
    /// library's `add_learner`) asked of the joiner itself; unstated if it does not answer.
    pub(super) async fn with_joiner_level(&self, change: &MembershipChange) -> MembershipChange {
        let mut change = change.clone();
        if let MembershipChange::AddLearner {
            id,
            address,
            feature_level: feature_level @ None,
            ..
        } = &mut change
        {
            *feature_level = self.level_of(*id, address).await;
        }
        change
    }

    /// The lowest level this member and `members` serve, if every one answered.
    async fn lowest_served(&self, members: Vec<(NodeId, String)>) -> Option<u32> {
        let asks = members.iter().map(|(id, addr)| self.level_of(*id, addr));
        let mut lowest = self.replica.sm.serves();
        for served in join_all(asks).await {
            lowest = lowest.min(served?);
        }
        Some(lowest)
    }
}
