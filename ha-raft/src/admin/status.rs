//! What operating a running group reports: each node's status and its peers'
//! progress, the outcome of a membership change, and the admin API's typed errors.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::Status;

use super::membership::MembershipRefusal;
use crate::data::command::NodeId;

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
    /// Whether it keeps its Raft leadership apart from an in-process ACTIVE.
    #[serde(default)]
    pub placement: bool,
    /// The elections whose ACTIVE runs in this node's process.
    #[serde(default)]
    pub active_here: Vec<String>,
    /// Raft leadership moves it made away from an in-process ACTIVE since it started.
    #[serde(default)]
    pub placement_moves: u64,
    /// The feature level it serves (2 for ha 0.1.0, which does not report one).
    #[serde(default = "level_of_unversioned")]
    pub feature_level: u32,
    /// The group's feature level recorded in its log (0: none recorded yet).
    #[serde(default)]
    pub group_level: u32,
    /// On the Raft leader: the level it writes at now (0: not known yet, while a
    /// member does not answer).
    #[serde(default)]
    pub writes_at: Option<u32>,
}

fn level_of_unversioned() -> u32 {
    crate::data::level::LEVEL_OF_UNVERSIONED
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
}
