//! Placement: the Raft leader kept off the member whose process hosts an election's
//! ACTIVE. When both share a process, one crash costs a Raft election and then a TTL;
//! apart, it costs a TTL. A leader that finds an ACTIVE among its own sessions hands
//! its leadership to a caught-up voter that hosts none (see `transfer`): at most once
//! per leadership, never in its first two leader leases (the voter would be refused),
//! never while a member that answers is catching up or the membership is changing, and
//! only in a group of three voters, where the voter's vote and the leader's are a
//! majority. In a larger group the other followers, whose leader leases are fresh,
//! would refuse, and the move would cost the election it is meant to save.

use std::sync::atomic::Ordering;

use openraft::{BasicNode, RaftMetrics};
use tokio::time::{sleep, Instant};
use tracing::{debug, info};

use super::transfer::{Handed, Transfer};
use super::{NodeInner, RaftNode, WeakNode};
use crate::data::command::NodeId;

/// Voters in a group where placement moves leadership: see the module documentation.
const PLACEMENT_VOTERS: usize = 3;

impl RaftNode {
    /// Starts the placement loop if the configuration asks for it.
    pub(crate) fn keep_leader_apart(&self) {
        if self.inner.replica.config.placement {
            self.spawn(placement_loop(self.downgrade()));
        }
    }
}

/// What the loop remembers of the leadership it watches.
struct Leadership {
    term: u64,
    since: Instant,
    /// A voter was asked to take over in this term: never twice.
    moved: bool,
    /// After every voter refused (each hosts an ACTIVE too): not before this.
    next_try: Instant,
    /// The leader's last log index one look earlier: a member that answers and holds
    /// less is catching up.
    pace: Option<u64>,
}

/// Looks every two heartbeat intervals while the node lives.
async fn placement_loop(node: WeakNode) {
    let mut watched: Option<Leadership> = None;
    loop {
        let Some(node) = node.upgrade() else { return };
        let every = node.inner.replica.config.heartbeat_interval * 2;
        let shutdown = node.inner.replica.shutdown.clone();
        node.inner.look(&mut watched).await;
        drop(node);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sleep(every) => {}
        }
    }
}

impl NodeInner {
    /// One look: on a leader that hosts an ACTIVE and may move, hand leadership over.
    async fn look(&self, watched: &mut Option<Leadership>) {
        let config = &self.replica.config;
        let now = Instant::now();
        let (term, pace) = {
            let metrics = self.replica.raft.metrics();
            let metrics = metrics.borrow();
            if !metrics.state.is_leader() {
                *watched = None;
                return;
            }
            let term = metrics.current_term;
            let leadership = match watched {
                Some(w) if w.term == term => w,
                _ => watched.insert(Leadership {
                    term,
                    since: now,
                    moved: false,
                    next_try: now,
                    pace: None,
                }),
            };
            let membership = metrics.membership_config.membership();
            let voters = membership.voter_ids().count();
            let joint = membership.get_joint_config().len() > 1;
            let settled =
                now.saturating_duration_since(leadership.since) >= config.election_timeout.1 * 2;
            let last_log = metrics.last_log_index.unwrap_or(0);
            let pace = leadership.pace.replace(last_log);
            let ready = !leadership.moved
                && settled
                && now >= leadership.next_try
                && voters == PLACEMENT_VOTERS
                && !joint
                && pace.is_some_and(|pace| !self.catching_up(&metrics, pace));
            (term, pace.filter(|_| ready))
        };
        let Some(pace) = pace else {
            return;
        };
        let here = self.replica.active_here();
        if here.is_empty() {
            return;
        }
        debug!(node = config.id, term, active = ?here, "the Raft leader hosts an ACTIVE");
        match self.transfer_leadership(Transfer::Placement { pace }).await {
            Handed::NotAsked => {
                // Nobody could take over (all host an ACTIVE, or none is caught up):
                // look again later, not at every heartbeat.
                if let Some(w) = watched.as_mut() {
                    w.next_try = Instant::now() + config.election_timeout.1 * 2;
                }
            }
            Handed::Asked { leader } => {
                if let Some(w) = watched.as_mut() {
                    w.moved = true;
                }
                if leader.is_some() {
                    self.replica.placement_moves.fetch_add(1, Ordering::Relaxed);
                    info!(
                        node = config.id,
                        term,
                        ?leader,
                        active = ?here,
                        "moved Raft leadership away from the ACTIVE"
                    );
                }
            }
        }
    }

    /// Whether a member that answered within the shortest election timeout holds less
    /// than `pace`. A silent member is not catching up: it is down or cut off.
    fn catching_up(&self, metrics: &RaftMetrics<NodeId, BasicNode>, pace: u64) -> bool {
        let me = self.replica.config.id;
        metrics.replication.as_ref().is_some_and(|members| {
            members.iter().any(|(id, matched)| {
                *id != me && self.answered_lately(*id) && matched.is_none_or(|log| log.index < pace)
            })
        })
    }
}
