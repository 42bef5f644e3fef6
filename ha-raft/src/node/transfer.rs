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
use crate::net::wire::{ElectRequest, PeerFailure};

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
            self.transfer_leadership(Transfer::Stop).await;
        }
    }

    /// Asks a caught-up voter to call an election, the one that answered most recently
    /// first, and waits (for at most the shortest election timeout) until another node
    /// leads. A voter that refuses (for placement: it hosts an ACTIVE too) passes the
    /// turn to the next.
    pub(super) async fn transfer_leadership(&self, why: Transfer) -> Handed {
        let me = self.replica.config.id;
        let budget = self.replica.config.election_timeout.0;
        let deadline = Instant::now() + budget;
        let Some((last_log, targets)) = self.transfer_targets(why) else {
            return Handed::NotAsked;
        };
        let placement = matches!(why, Transfer::Placement { .. });
        // With placement on, a stopping leader too prefers a voter that hosts no
        // ACTIVE, and falls back to any: the group must have a leader first.
        let passes: &[bool] = match why {
            Transfer::Placement { .. } => &[true],
            Transfer::Stop if self.replica.config.placement => &[true, false],
            Transfer::Stop => &[false],
        };
        let mut asked = None;
        'passes: for unless_hosting_active in passes {
            let request = ElectRequest {
                caught_up_to: last_log,
                unless_hosting_active: *unless_hosting_active,
            };
            for (target, addr) in &targets {
                let left = deadline.saturating_duration_since(Instant::now());
                let answer: Result<Result<(), PeerFailure>, _> = self
                    .pool
                    .call(*target, addr, PeerRpc::Elect, &request, left)
                    .await;
                match answer {
                    Ok(Ok(())) => {
                        asked = Some(*target);
                        break 'passes;
                    }
                    Ok(Err(failure)) => {
                        debug!(
                            node = me,
                            target,
                            ?failure,
                            "the voter did not call an election"
                        );
                    }
                    Err(e) => debug!(node = me, target, error = %e, "the voter was not asked"),
                }
            }
        }
        let Some(target) = asked else {
            return Handed::NotAsked;
        };
        let mut metrics = self.replica.raft.metrics();
        let moved = tokio::time::timeout_at(
            deadline,
            metrics.wait_for(|m| m.current_leader.is_some_and(|leader| leader != me)),
        )
        .await;
        match moved {
            Ok(Ok(m)) => {
                let leader = m.current_leader;
                info!(node = me, ?leader, placement, "handed Raft leadership over");
                Handed::Asked { leader }
            }
            _ => {
                debug!(
                    node = me,
                    target, "leadership did not move within {budget:?}"
                );
                Handed::Asked { leader: None }
            }
        }
    }

    /// On a leader: its last log index, and the voters it may hand leadership to, the
    /// one that answered most recently first. For a stop, those holding the last entry;
    /// for placement, those that answered within the shortest election timeout and hold
    /// what the leader had a moment ago (`pace`).
    fn transfer_targets(&self, why: Transfer) -> Option<(u64, Vec<(NodeId, String)>)> {
        let me = self.replica.config.id;
        let metrics = self.replica.raft.metrics();
        let metrics = metrics.borrow();
        if !metrics.state.is_leader() {
            return None;
        }
        let last_log = metrics.last_log_index.unwrap_or(0);
        let membership = metrics.membership_config.membership();
        let mut targets: Vec<_> = metrics
            .replication
            .as_ref()?
            .iter()
            .filter(|(id, matched)| {
                let matched = matched.map_or(0, |log| log.index);
                **id != me
                    && membership.voter_ids().any(|voter| voter == **id)
                    && match why {
                        Transfer::Stop => matched >= last_log,
                        Transfer::Placement { pace } => {
                            matched >= pace && self.answered_lately(**id)
                        }
                    }
            })
            .filter_map(|(id, _)| Some((*id, membership.get_node(id)?.addr.clone())))
            .collect();
        targets.sort_by_key(|(id, _)| std::cmp::Reverse(self.pool.last_contact(*id)));
        if targets.is_empty() {
            debug!(node = me, ?why, "no caught-up voter to hand leadership to");
        }
        Some((last_log, targets))
    }

    /// Whether member `id` answered this leader within the shortest election timeout:
    /// one that did not is down or cut off, neither a target nor catching up.
    pub(super) fn answered_lately(&self, id: NodeId) -> bool {
        let fresh = self.replica.config.election_timeout.0;
        self.pool
            .last_contact(id)
            .is_some_and(|at| at.elapsed() < fresh)
    }
}

/// What came of a transfer.
#[derive(Debug, Clone, Copy)]
pub(super) enum Handed {
    /// No voter called an election.
    NotAsked,
    /// A voter called one; `leader` is the node that leads now, if one does in time.
    Asked {
        /// The new leader.
        leader: Option<NodeId>,
    },
}

/// Why a leader hands its leadership over.
#[derive(Debug, Clone, Copy)]
pub(super) enum Transfer {
    /// It stops on purpose.
    Stop,
    /// It hosts an ACTIVE (see `placement`); a voter must hold entry `pace`.
    Placement {
        /// What the leader had logged one look earlier: a voter behind it is catching up.
        pace: u64,
    },
}
