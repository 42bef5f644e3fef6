//! Operating a running group: each node's status, and membership changes carried out
//! on the Raft leader after [`membership::check`](crate::membership) allowed them. Served
//! as the `Admin` gRPC service next to the client API; [`RaftAdmin`](crate::RaftAdmin)
//! is its client.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::{Duration, Instant};

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::command::NodeId;
use crate::membership::{self, GroupView, MembershipChange, MembershipRefusal, Plan};
use crate::node::NodeInner;
use crate::proto::admin_server::Admin;
use crate::proto::{AdminReply, AdminRequest};
use crate::tls::ClientAuth;

/// One node's view of itself and of its group, as `ha status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node's id.
    pub id: NodeId,
    /// The address it advertises.
    pub address: String,
    /// Its cluster id.
    pub cluster_id: String,
    /// The ha-raft version it runs.
    pub version: String,
    /// `leader`, `follower`, `candidate`, `learner` or `stopped`.
    pub state: String,
    /// The Raft term it is in.
    pub term: u64,
    /// The Raft leader it knows, if any.
    pub leader: Option<NodeId>,
    /// The index of its last log entry.
    pub last_log_index: Option<u64>,
    /// The index of the last entry it applied.
    pub applied_index: Option<u64>,
    /// The last entry its latest snapshot covers.
    pub snapshot_index: Option<u64>,
    /// The voters of the membership it has, id → address.
    pub voters: BTreeMap<NodeId, String>,
    /// The learners of that membership, id → address.
    pub learners: BTreeMap<NodeId, String>,
    /// The membership is a joint one: a change is half done.
    pub joint: bool,
    /// The log index of that membership.
    pub membership_index: Option<u64>,
    /// On the Raft leader: each other member's replication.
    pub peers: BTreeMap<NodeId, PeerProgress>,
    /// On the Raft leader: milliseconds since a quorum last acknowledged it.
    pub millis_since_quorum_ack: Option<u64>,
    /// Bytes in its data dir.
    pub data_dir_bytes: u64,
}

/// How far the Raft leader has replicated to one member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerProgress {
    /// The last entry the member is known to hold.
    pub matched_index: Option<u64>,
    /// Entries it is behind the leader's last one (`None`: nothing matched yet).
    pub lag: Option<u64>,
    /// Milliseconds since it last answered the leader.
    pub last_contact_ms: Option<u64>,
}

/// The membership after a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipReport {
    /// Voters, id → address.
    pub voters: BTreeMap<NodeId, String>,
    /// Learners, id → address.
    pub learners: BTreeMap<NodeId, String>,
    /// Whether the change did anything (a repeated join does not).
    pub changed: bool,
}

/// Why an admin request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AdminError {
    /// The leader refused the change; nothing changed.
    #[error("refused, nothing changed: {0}")]
    Refused(MembershipRefusal),
    /// The node asked is not the Raft leader (`leader`: the one it knows).
    #[error("node {node} is not the Raft leader{}", leader.as_ref().map_or_else(String::new, |(id, addr)| format!(" (node {id} at {addr} is)")))]
    NotLeader {
        /// The node asked.
        node: NodeId,
        /// The leader it knows, and its address.
        leader: Option<(NodeId, String)>,
    },
    /// No node could be reached, or none knew a leader, in time.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The credentials do not allow this.
    #[error("not allowed: {0}")]
    Unauthorized(String),
    /// A change did not finish in time; it may or may not have taken effect.
    #[error("no answer within {after:?}: the change may or may not have taken effect; check `ha member list`")]
    Timeout {
        /// How long was waited.
        after: Duration,
    },
    /// The request itself is malformed.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// openraft failed the change.
    #[error("raft: {0}")]
    Raft(String),
}

impl AdminError {
    /// Whether asking again (another node, a moment later) may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::NotLeader { .. }
                | Self::Unavailable(_)
                | Self::Refused(MembershipRefusal::ChangeInProgress)
        )
    }

    /// As a gRPC status, the error itself in the details.
    pub(crate) fn to_status(&self) -> Status {
        let code = match self {
            Self::Refused(_) | Self::NotLeader { .. } => tonic::Code::FailedPrecondition,
            Self::Unavailable(_) => tonic::Code::Unavailable,
            Self::Unauthorized(_) => tonic::Code::PermissionDenied,
            Self::Timeout { .. } => tonic::Code::DeadlineExceeded,
            Self::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Self::Raft(_) => tonic::Code::Internal,
        };
        let details = serde_json::to_vec(self).unwrap_or_default();
        Status::with_details(code, self.to_string(), details.into())
    }

    /// From a gRPC status: the error in its details, else what its code says.
    pub(crate) fn from_status(status: &Status) -> Self {
        if let Ok(error) = serde_json::from_slice::<Self>(status.details()) {
            return error;
        }
        let message = status.message().to_owned();
        match status.code() {
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                Self::Unauthorized(message)
            }
            tonic::Code::InvalidArgument => Self::InvalidArgument(message),
            tonic::Code::Unimplemented => Self::Unavailable(format!(
                "the node has no admin API (an older version?): {message}"
            )),
            _ => Self::Unavailable(format!("{}: {message}", status.code())),
        }
    }
}

/// A member that answered within this long counts as reachable.
fn reachable_window(node: &NodeInner) -> Duration {
    node.config
        .election_timeout
        .1
        .max(node.config.heartbeat_interval * 4)
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
    fn status_now(&self) -> NodeStatus {
        let metrics = self.raft.metrics();
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
                    .filter(|(id, _)| **id != self.config.id)
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
            id: self.config.id,
            address: self.config.advertised(),
            cluster_id: self.config.cluster_id.clone(),
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
        }
    }

    /// This node's status, with its data dir's size.
    pub(crate) async fn status(&self) -> NodeStatus {
        let mut status = self.status_now();
        let dir = self.config.data_dir.clone();
        status.data_dir_bytes = tokio::task::spawn_blocking(move || dir_size(&dir))
            .await
            .unwrap_or(0);
        status
    }

    /// What the membership checks need, as this node (the leader) sees it.
    fn group_view(&self) -> GroupView {
        let status = self.status_now();
        let window = reachable_window(self);
        let mut healthy = std::collections::BTreeSet::from([self.config.id]);
        let mut lag = BTreeMap::from([(self.config.id, Some(0))]);
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
        }
    }

    /// Whether member `id` is reachable and close enough to the leader's log to vote.
    pub(crate) fn caught_up(&self, id: NodeId) -> bool {
        self.group_view().caught_up(id)
    }

    fn not_leader(&self) -> AdminError {
        let leader = match self.target() {
            crate::node::Target::Peer { id, addr } => Some((id, addr)),
            _ => None,
        };
        AdminError::NotLeader {
            node: self.config.id,
            leader,
        }
    }

    /// Whether one membership change would be allowed now; only on the Raft leader.
    pub(crate) async fn check_membership(
        &self,
        change: &MembershipChange,
    ) -> Result<(), AdminError> {
        if !matches!(self.target(), crate::node::Target::Me { .. }) {
            return Err(self.not_leader());
        }
        let _one_at_a_time = self.membership_lock.lock().await;
        membership::check(&self.group_view(), change)
            .map(drop)
            .map_err(AdminError::Refused)
    }

    /// Checks and carries out one membership change; only on the Raft leader.
    pub(crate) async fn change_membership(
        &self,
        change: &MembershipChange,
    ) -> Result<MembershipReport, AdminError> {
        if !matches!(self.target(), crate::node::Target::Me { .. }) {
            return Err(self.not_leader());
        }
        // One change at a time: two checks passing together could each keep quorum and
        // both lose it.
        let _one_at_a_time = self.membership_lock.lock().await;
        let plan = membership::check(&self.group_view(), change).map_err(AdminError::Refused)?;
        let raft = &self.raft;
        let budget = self.config.request_timeout;
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
            info!(node = self.config.id, ?change, "membership changed");
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

/// The `Admin` gRPC service of one node.
pub(crate) struct AdminService {
    pub(crate) node: Weak<NodeInner>,
    pub(crate) auth: ClientAuth,
}

fn reply<T: Serialize>(value: &T) -> Result<Response<AdminReply>, Status> {
    serde_json::to_vec(value)
        .map(|payload| Response::new(AdminReply { payload }))
        .map_err(|e| Status::internal(format!("encode reply: {e}")))
}

impl AdminService {
    /// The node, once the request's credentials may change its group: a node
    /// certificate of a member (or of `about`, the node a change concerns), or the
    /// admin token.
    fn authorized(
        &self,
        request: &Request<AdminRequest>,
        about: Option<NodeId>,
    ) -> Result<std::sync::Arc<NodeInner>, Status> {
        let node = self.node.upgrade().ok_or_else(crate::service::gone)?;
        let status = node.status_now();
        let members = status.voters.keys().chain(status.learners.keys()).copied();
        self.auth
            .may_change_membership(request, members.chain(about))?;
        Ok(node)
    }

    /// The membership change a request carries, once its credentials allow it.
    fn authorized_change(
        &self,
        request: &Request<AdminRequest>,
    ) -> Result<(std::sync::Arc<NodeInner>, MembershipChange), Status> {
        let change: MembershipChange =
            serde_json::from_slice(&request.get_ref().payload).map_err(|e| {
                AdminError::InvalidArgument(format!("not a membership change: {e}")).to_status()
            })?;
        let node = self.authorized(request, Some(change.subject()))?;
        Ok((node, change))
    }
}

/// The largest admin request decoded: a change is a few hundred bytes.
pub(crate) const MAX_ADMIN_REQUEST: usize = 64 << 10;

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _request: Request<AdminRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let node = self.node.upgrade().ok_or_else(crate::service::gone)?;
        reply(&node.status().await)
    }

    async fn change_membership(
        &self,
        request: Request<AdminRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let (node, change) = self.authorized_change(&request)?;
        match node.change_membership(&change).await {
            Ok(report) => reply(&report),
            Err(e) => Err(e.to_status()),
        }
    }

    async fn check_membership(
        &self,
        request: Request<AdminRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let (node, change) = self.authorized_change(&request)?;
        match node.check_membership(&change).await {
            Ok(()) => reply(&()),
            Err(e) => Err(e.to_status()),
        }
    }

    async fn leave(&self, request: Request<AdminRequest>) -> Result<Response<AdminReply>, Status> {
        let node = self.authorized(&request, None)?;
        let handled = node.leave_handled.load(std::sync::atomic::Ordering::SeqCst);
        if handled {
            info!(node = node.config.id, "asked to leave the group");
            node.leave.cancel();
        }
        reply(&handled)
    }

    type SnapshotStream = futures::stream::Iter<std::vec::IntoIter<Result<AdminReply, Status>>>;

    async fn snapshot(
        &self,
        request: Request<AdminRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        // The guarded stores are in it: the same credentials as a membership change.
        let node = self.authorized(&request, None)?;
        let (header, bytes) = node.snapshot_image().await.map_err(|e| e.to_status())?;
        let header = serde_json::to_vec(&header)
            .map_err(|e| Status::internal(format!("encode the header: {e}")))?;
        info!(
            node = node.config.id,
            bytes = bytes.len(),
            "serving a snapshot"
        );
        let messages: Vec<Result<AdminReply, Status>> = std::iter::once(header)
            .chain(bytes.chunks(crate::backup::CHUNK_BYTES).map(<[u8]>::to_vec))
            .map(|payload| Ok(AdminReply { payload }))
            .collect();
        Ok(Response::new(futures::stream::iter(messages)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_wire_with_their_type() {
        let errors = [
            AdminError::Refused(MembershipRefusal::LastVoter { id: 1 }),
            AdminError::NotLeader {
                node: 2,
                leader: Some((1, "127.0.0.1:7001".into())),
            },
            AdminError::Timeout {
                after: Duration::from_secs(5),
            },
        ];
        for error in errors {
            assert_eq!(AdminError::from_status(&error.to_status()), error);
        }
        let plain = Status::permission_denied("no");
        assert!(matches!(
            AdminError::from_status(&plain),
            AdminError::Unauthorized(_)
        ));
    }

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
