//! A leader that stops on purpose leaves no gap: it commits a handover entry that
//! carries its commit index to every follower, then asks a caught-up voter to call an
//! election at once. openraft 0.9 has no leadership transfer; this is one built from
//! what it has: the voter's `trigger().elect()`, and the leader's own vote, which it
//! grants to a log as long as its own once it has led longer than its leader lease.
//! The other followers refuse while the leader's heartbeats are fresh, so in a group of
//! three the two votes win at once; in a larger one the candidate wins when the
//! followers' leases run out, as it would have without being asked, only sooner.

use openraft::BasicNode;
use tokio::time::Instant;
use tracing::{debug, info};

use super::NodeInner;
use crate::data::command::{Command, NodeId};
use crate::net::network::PeerRpc;
use crate::net::wire::PeerFailure;

impl NodeInner {
    /// On a leader: commits a [`Command::Handover`] and waits until every follower has
    /// stored it, for at most the shortest election timeout (after that the followers
    /// elect a new leader anyway). The entry carries the commit index of the leader's
    /// last writes, which otherwise reaches a follower only with the next heartbeat: a
    /// leader stopped right after a resign would leave the next candidate waiting for a
    /// new Raft leader to learn that it leads, a Raft election instead of milliseconds.
    /// Then it hands leadership to a caught-up voter, so that nobody waits for an
    /// election timeout either.
    pub(super) async fn hand_over(&self, transfer: bool) {
        if !self.replica.raft.metrics().borrow().state.is_leader() {
            return;
        }
        let budget = self.replica.config.election_timeout.0;
        let deadline = tokio::time::Instant::now() + budget;
        let written =
            tokio::time::timeout(budget, self.replica.raft.client_write(Command::Handover)).await;
        let index = match written {
            Ok(Ok(response)) => response.log_id.index,
            // Not the leader any more, or no quorum: nothing to hand over.
            Ok(Err(e)) => {
                debug!(node = self.replica.config.id, error = %e, "no handover entry");
                return;
            }
            Err(_) => {
                debug!(
                    node = self.replica.config.id,
                    "no handover entry within {budget:?}"
                );
                return;
            }
        };
        let mut metrics = self.replica.raft.metrics();
        let stored_everywhere = |m: &openraft::RaftMetrics<NodeId, BasicNode>| {
            m.replication.as_ref().is_some_and(|followers| {
                followers
                    .values()
                    .all(|matched| matched.is_some_and(|log| log.index >= index))
            })
        };
        let stored = matches!(
            tokio::time::timeout_at(deadline, metrics.wait_for(stored_everywhere)).await,
            Ok(Ok(_))
        );
        if stored {
            debug!(
                node = self.replica.config.id,
                index, "every follower has the handover"
            );
        } else {
            debug!(
                node = self.replica.config.id,
                index, "not every follower stored the handover in time"
            );
        }
        if transfer {
            self.transfer_leadership().await;
        }
    }

    /// Asks the caught-up voter that answered most recently to call an election, and
    /// waits (for at most the shortest election timeout) until another node leads.
    /// Returns it, if one does.
    async fn transfer_leadership(&self) -> Option<NodeId> {
        let me = self.replica.config.id;
        let budget = self.replica.config.election_timeout.0;
        let deadline = Instant::now() + budget;
        let (last_log, target) = {
            let metrics = self.replica.raft.metrics();
            let metrics = metrics.borrow();
            if !metrics.state.is_leader() {
                return None;
            }
            let last_log = metrics.last_log_index.unwrap_or(0);
            let membership = metrics.membership_config.membership();
            let target = metrics
                .replication
                .as_ref()?
                .iter()
                .filter(|(id, matched)| {
                    **id != me
                        && membership.voter_ids().any(|voter| voter == **id)
                        && matched.is_some_and(|log| log.index >= last_log)
                })
                .filter_map(|(id, _)| Some((*id, membership.get_node(id)?.addr.clone())))
                .max_by_key(|(id, _)| self.pool.last_contact(*id));
            (last_log, target)
        };
        let Some((target, addr)) = target else {
            debug!(node = me, "no caught-up voter to hand leadership to");
            return None;
        };
        let asked: Result<Result<(), PeerFailure>, _> = self
            .pool
            .call(target, &addr, PeerRpc::Elect, &last_log, budget)
            .await;
        match asked {
            Ok(Ok(())) => {}
            Ok(Err(failure)) => {
                debug!(
                    node = me,
                    target,
                    ?failure,
                    "the voter did not call an election"
                );
                return None;
            }
            Err(e) => {
                debug!(node = me, target, error = %e, "the voter was not asked");
                return None;
            }
        }
        let mut metrics = self.replica.raft.metrics();
        let moved = tokio::time::timeout_at(
            deadline,
            metrics.wait_for(|m| m.current_leader.is_some_and(|leader| leader != me)),
        )
        .await;
        match moved {
            Ok(Ok(m)) => {
                let leader = m.current_leader;
                info!(node = me, ?leader, "handed Raft leadership over");
                leader
            }
            _ => {
                debug!(
                    node = me,
                    target, "leadership did not move within {budget:?}"
                );
                None
            }
        }
    }
}
