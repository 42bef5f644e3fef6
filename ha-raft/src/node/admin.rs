//! Operating a running group from its leader: this node's status, and membership
//! changes carried out after [`membership::check`](crate::admin::membership) allowed
//! them, one at a time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use tracing::info;

use super::{NodeInner, RaftNode};
use crate::admin::membership::{self, GroupView, MembershipChange, MembershipRefusal, Plan};
use crate::admin::{AdminError, MembershipReport, NodeStatus, PeerProgress};
use crate::data::command::NodeId;
use crate::replica::Target;

/// A member that answered within this long counts as reachable.
fn reachable_window(node: &NodeInner) -> Duration {
    node.replica
        .config
        .election_timeout
        .1
        .max(node.replica.config.heartbeat_interval * 4)
}

fn state_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "stopped",
    }
}

impl NodeInner {
    /// This node's status, its data dir's size aside.
    pub(super) fn status_now(&self) -> NodeStatus {
        // Before borrowing the metrics: this locks the state machine.
        let group_level = self.replica.sm.recorded_level();
        let metrics = self.replica.raft.metrics();
        let metrics = metrics.borrow();
        let stored = &metrics.membership_config;
        let membership = stored.membership();
        let address = |id: NodeId| {
            membership
                .get_node(&id)
                .map(|n| n.addr.clone())
                .unwrap_or_default()
        };
        let last_log = metrics.last_log_index;
        let now = Instant::now();
        let peers = metrics
            .replication
            .as_ref()
            .map(|replication| {
                replication
                    .iter()
                    .filter(|(id, _)| **id != self.replica.config.id)
                    .map(|(id, matched)| {
                        let matched_index = matched.as_ref().map(|log| log.index);
                        let progress = PeerProgress {
                            matched_index,
                            lag: matched_index.map(|m| last_log.unwrap_or(0).saturating_sub(m)),
                            last_contact_ms: self
                                .pool
                                .last_contact(*id)
                                .map(|at| now.saturating_duration_since(at).as_millis() as u64),
                        };
                        (*id, progress)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let state = if metrics.running_state.is_err() {
            "stopped"
        } else {
            state_name(metrics.state)
        };
        NodeStatus {
            id: self.replica.config.id,
            address: self.replica.config.advertised(),
            cluster_id: self.replica.config.cluster_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            state: state.to_owned(),
            term: metrics.current_term,
            leader: metrics.current_leader,
            last_log_index: last_log,
            applied_index: metrics.last_applied.as_ref().map(|log| log.index),
            snapshot_index: metrics.snapshot.as_ref().map(|log| log.index),
            voters: membership.voter_ids().map(|id| (id, address(id))).collect(),
            learners: membership
                .learner_ids()
                .map(|id| (id, address(id)))
                .collect(),
            joint: membership.get_joint_config().len() > 1,
            membership_index: stored.log_id().as_ref().map(|log| log.index),
            peers,
            millis_since_quorum_ack: metrics.millis_since_quorum_ack,
            data_dir_bytes: 0,
            placement: self.replica.config.placement,
            active_here: Vec::new(),
            placement_moves: self
                .replica
                .placement_moves
                .load(std::sync::atomic::Ordering::Relaxed),
            feature_level: self.replica.sm.serves(),
            group_level,
            writes_at: (metrics.state == ServerState::Leader).then(|| {
                self.replica
                    .writes_at
                    .load(std::sync::atomic::Ordering::Acquire)
            }),
        }
    }

    /// This node's status, with its data dir's size.
    pub(crate) async fn status(&self) -> NodeStatus {
        let mut status = self.status_now();
        status.active_here = self.replica.active_here();
        let dir = self.replica.config.data_dir.clone();
        status.data_dir_bytes = tokio::task::spawn_blocking(move || dir_size(&dir))
            .await
            .unwrap_or(0);
        status
    }

    /// What the membership checks need, as this node (the leader) sees it.
    fn group_view(&self) -> GroupView {
        let status = self.status_now();
        let window = reachable_window(self);
        let mut healthy = std::collections::BTreeSet::from([self.replica.config.id]);
        let mut lag = BTreeMap::from([(self.replica.config.id, Some(0))]);
        for (id, progress) in &status.peers {
            if progress
                .last_contact_ms
                .is_some_and(|ms| Duration::from_millis(ms) <= window)
            {
                healthy.insert(*id);
            }
            lag.insert(*id, progress.lag);
        }
        GroupView {
            cluster_id: status.cluster_id,
            voters: status.voters,
            learners: status.learners,
            healthy,
            lag,
            joint: status.joint,
            level: self
                .replica
                .writes_at
                .load(std::sync::atomic::Ordering::Acquire),
        }
    }

    /// Whether member `id` is reachable and close enough to the leader's log to vote.
    pub(crate) fn caught_up(&self, id: NodeId) -> bool {
        self.group_view().caught_up(id)
    }

    fn not_leader(&self) -> AdminError {
        let leader = match self.replica.target() {
            Target::Peer { id, addr } => Some((id, addr)),
            _ => None,
        };
        AdminError::NotLeader {
            node: self.replica.config.id,
            leader,
        }
    }

    /// Whether one membership change would be allowed now; only on the Raft leader.
    pub(crate) async fn check_membership(
        &self,
        change: &MembershipChange,
    ) -> Result<(), AdminError> {
        if !matches!(self.replica.target(), Target::Me { .. }) {
            return Err(self.not_leader());
        }
        let _one_at_a_time = self.membership_lock.lock().await;
        let change = self.with_joiner_level(change).await;
        membership::check(&self.group_view(), &change)
            .map(drop)
            .map_err(AdminError::Refused)
    }

    /// Checks and carries out one membership change; only on the Raft leader.
    pub(crate) async fn change_membership(
        &self,
        change: &MembershipChange,
    ) -> Result<MembershipReport, AdminError> {
        if !matches!(self.replica.target(), Target::Me { .. }) {
            return Err(self.not_leader());
        }
        // One change at a time: two checks passing together could each keep quorum and
        // both lose it.
        let _one_at_a_time = self.membership_lock.lock().await;
        let change = self.with_joiner_level(change).await;
        let plan = membership::check(&self.group_view(), &change).map_err(AdminError::Refused)?;
        let raft = &self.replica.raft;
        let budget = self.replica.config.request_timeout;
        let changed = !matches!(plan, Plan::Nothing);
        let done = match &plan {
            Plan::Nothing => Ok(Ok(())),
            Plan::AddLearner { id, address } => tokio::time::timeout(
                budget,
                raft.add_learner(*id, BasicNode::new(address.clone()), false),
            )
            .await
            .map(|r| r.map(drop)),
            Plan::Promote { id } => tokio::time::timeout(
                budget,
                raft.change_membership(ChangeMembers::AddVoterIds([*id].into()), false),
            )
            .await
            .map(|r| r.map(drop)),
            Plan::RemoveVoter { id } => tokio::time::timeout(
                budget,
                raft.change_membership(ChangeMembers::RemoveVoters([*id].into()), false),
            )
            .await
            .map(|r| r.map(drop)),
            Plan::RemoveLearner { id } => tokio::time::timeout(
                budget,
                raft.change_membership(ChangeMembers::RemoveNodes([*id].into()), false),
            )
            .await
            .map(|r| r.map(drop)),
        }
        .map_err(|_| AdminError::Timeout { after: budget })?;
        done.map_err(|e| self.raft_error(e))?;
        if changed {
            info!(node = self.replica.config.id, ?change, "membership changed");
        }
        let status = self.status_now();
        Ok(MembershipReport {
            voters: status.voters,
            learners: status.learners,
            changed,
        })
    }

    fn raft_error(
        &self,
        error: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
    ) -> AdminError {
        match error {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => self.not_leader(),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            )) => AdminError::Refused(MembershipRefusal::ChangeInProgress),
            RaftError::APIError(e) => AdminError::Raft(e.to_string()),
            RaftError::Fatal(e) => AdminError::Unavailable(format!("the Raft core stopped: {e}")),
        }
    }
}

impl RaftNode {
    /// This node's status now, its data dir's size aside (0).
    pub(crate) fn status_now(&self) -> NodeStatus {
        self.inner.status_now()
    }

    /// Whether one membership change would be allowed now; only on the Raft leader.
    pub(crate) async fn check_membership(
        &self,
        change: &MembershipChange,
    ) -> Result<(), AdminError> {
        self.inner.check_membership(change).await
    }

    /// Asks this node to leave the group, if its owner handles such requests
    /// ([`RaftNode::leave_requested`]); returns whether it does.
    pub(crate) fn ask_to_leave(&self) -> bool {
        let handled = self
            .inner
            .leave_handled
            .load(std::sync::atomic::Ordering::SeqCst);
        if handled {
            info!(node = self.id(), "asked to leave the group");
            self.inner.leave.cancel();
        }
        handled
    }
}

/// Bytes under `dir`, following no links; stops counting after 100,000 entries (a data
/// dir has a handful).
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > 100_000 {
                return total;
            }
            match entry.metadata() {
                Ok(meta) if meta.is_dir() => pending.push(entry.path()),
                Ok(meta) => total = total.saturating_add(meta.len()),
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_dir_is_measured_with_its_subdirectories() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let sub = dir.path().join("blobs");
        std::fs::create_dir(&sub).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("db"), [0u8; 100]).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(sub.join("1"), [0u8; 20]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(dir_size(dir.path()), 120);
    }
}
