//! What the Raft log carries: commands to the lease/election state machine and their
//! results, plus the openraft type configuration.

use std::collections::BTreeMap;
use std::io::Cursor;

use ha_core::{Member, Role, ServerId};
use serde::{Deserialize, Serialize};

use crate::error::RaftBackendError;

/// A Raft node's id.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The openraft type configuration of ha-raft.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The openraft instance type.
pub type Raft = openraft::Raft<TypeConfig>;

/// A member record as the log and snapshots store it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Server ID.
    pub server_id: u64,
    /// Role name.
    pub role: String,
    /// Address.
    pub address: String,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
}

impl From<&Member> for MemberRecord {
    fn from(member: &Member) -> Self {
        Self {
            server_id: member.server_id.get(),
            role: member.role.as_str().to_owned(),
            address: member.address.clone(),
            metadata: member.metadata.clone(),
        }
    }
}

impl MemberRecord {
    /// Back to the contract's type, validating the role (the log may come from disk).
    pub fn to_member(&self) -> Result<Member, RaftBackendError> {
        let role = Role::new(self.role.clone())
            .map_err(|e| RaftBackendError::Corrupt(format!("member record: {e}")))?;
        let mut member = Member::new(ServerId::new(self.server_id), role, self.address.clone());
        member.metadata = self.metadata.clone();
        Ok(member)
    }
}

/// A command to the replicated state machine. Nothing in it depends on a clock: lease
/// deadlines live in the leader's lessor, which proposes `Expire` when one passes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Start a session; the lease id is the entry's log index.
    Register {
        /// The member record bound to the lease.
        member: MemberRecord,
        /// Granted TTL.
        ttl_ms: u64,
    },
    /// End a session on its owner's request.
    Revoke {
        /// The lease.
        lease: u64,
    },
    /// End a session whose TTL passed on the leader's lessor.
    Expire {
        /// The lease.
        lease: u64,
    },
    /// Enqueue a candidacy (or resume the lease's existing one); the token is the entry's
    /// log index.
    Campaign {
        /// The candidate's lease.
        lease: u64,
        /// Election name.
        election: String,
        /// Value to publish while leading.
        value: Vec<u8>,
    },
    /// Remove a candidacy if it still stands.
    Resign {
        /// Election name.
        election: String,
        /// Candidate's lease.
        lease: u64,
        /// Candidacy's token.
        token: u64,
    },
    /// Replace the leader's value, if the key leads.
    Proclaim {
        /// Election name.
        election: String,
        /// Leader's lease.
        lease: u64,
        /// Leader's token.
        token: u64,
        /// New value.
        value: Vec<u8>,
    },
}

/// The outcome of one applied entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Blank and membership entries.
    None,
    /// Done.
    Ok,
    /// A lease was granted.
    Registered {
        /// Lease id.
        lease: u64,
        /// Granted TTL.
        ttl_ms: u64,
    },
    /// The server id is taken in the role.
    AlreadyRegistered,
    /// The lease is gone.
    LeaseExpired,
    /// A candidacy stands (new or resumed).
    Campaigned {
        /// Its token.
        token: u64,
    },
    /// The key does not lead.
    NotLeader {
        /// The current leader's token.
        current: Option<u64>,
    },
}
