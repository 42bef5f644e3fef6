//! What the Raft log carries: commands to the lease/election state machine and their
//! results, plus the openraft type configuration.

use std::collections::BTreeMap;
use std::io::Cursor;

use ha_core::{KvWrite, Member, Role, ServerId};
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
    /// Start a session; the lease id is the entry's log index (see `State::last_id`).
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
    /// log index (see `State::last_id`).
    Campaign {
        /// The candidate's lease.
        lease: u64,
        /// Election name.
        election: String,
        /// Value to publish while leading.
        #[serde(with = "compact_bytes")]
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
        /// Set by the withdrawal of a dropped campaign call: remove the candidacy only
        /// if no later campaign call resumed it (a client that abandoned a stalled call
        /// campaigns again elsewhere, and the late withdrawal of the first call must not
        /// undo that). Absent from entries written before it existed: unconditional.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u64>,
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
        #[serde(with = "compact_bytes")]
        value: Vec<u8>,
    },
    /// A write to an election's guarded store, applied only if the key leads.
    KvWrite {
        /// Election name.
        election: String,
        /// Writer's lease.
        lease: u64,
        /// Writer's token.
        token: u64,
        /// The write.
        op: KvOp,
    },
    /// Changes nothing. A leader stopping on purpose commits one and waits until every
    /// follower has stored it: the entry travels with the commit index of everything
    /// before it, so the followers apply the leader's last writes (a resign) without
    /// waiting for the next Raft leader.
    Handover,
    /// Commands proposed concurrently, packed into one entry by the leader's proposer
    /// (one flush and one replication for all of them), applied in order. Every lease id
    /// and token they create is unique and above all before it (`State::last_id`).
    Batch(Vec<Command>),
    /// Records the group's feature level (see `data::level`): every member serves it, so
    /// a member below it refuses to start from now on. A lower level than the one
    /// recorded changes nothing: the level never goes back.
    SetLevel {
        /// The level.
        level: u32,
    },
}

impl Command {
    /// About how many bytes the command takes in the log, for cutting batches.
    pub(crate) fn approx_bytes(&self) -> usize {
        const FIXED: usize = 96;
        // Byte fields are base64 in the log.
        let blob = |bytes: &[u8]| bytes.len() / 3 * 4 + 4;
        FIXED
            + match self {
                Self::Register { member, .. } => {
                    member.role.len()
                        + member.address.len()
                        + member
                            .metadata
                            .iter()
                            .map(|(k, v)| k.len() + v.len() + 8)
                            .sum::<usize>()
                }
                Self::Campaign {
                    election, value, ..
                }
                | Self::Proclaim {
                    election, value, ..
                } => election.len() + blob(value),
                Self::KvWrite { election, op, .. } => {
                    let value = |v: &Option<Blob>| v.as_ref().map_or(0, |b| blob(&b.0));
                    election.len()
                        + op.key().len()
                        + match op {
                            KvOp::Put { value: v, .. } => blob(&v.0),
                            KvOp::Delete { .. } => 0,
                            KvOp::CompareAndSet { expected, new, .. } => {
                                value(expected) + value(new)
                            }
                        }
                }
                Self::Resign { election, .. } => election.len(),
                Self::Batch(commands) => commands.iter().map(Self::approx_bytes).sum(),
                Self::Revoke { .. }
                | Self::Expire { .. }
                | Self::Handover
                | Self::SetLevel { .. } => 0,
            }
    }
}

/// Bytes that the log, the peer messages and the snapshots (all JSON) carry as base64
/// instead of a JSON array of numbers: a 1 MiB value costs 1.33 MiB, not up to 4.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        compact_bytes::serialize(&self.0, serializer)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        compact_bytes::deserialize(deserializer).map(Blob)
    }
}

/// `#[serde(with)]` for byte fields of the log and snapshots: written as base64, read
/// from base64 or from the array of numbers that data dirs written before carry.
pub mod compact_bytes {
    use base64::Engine as _;

    /// Writes base64.
    pub fn serialize<S: serde::Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// Reads base64 or an array of numbers.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_any(Visitor)
    }

    struct Visitor;

    impl<'de> serde::de::Visitor<'de> for Visitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("base64 text or an array of bytes")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Vec<u8>, E> {
            base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(E::custom)
        }

        fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
            Ok(bytes.to_vec())
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            // The hint comes from the input: cap it, so a claimed length costs nothing.
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element::<u8>()? {
                bytes.push(byte);
            }
            Ok(bytes)
        }
    }
}

impl From<&[u8]> for Blob {
    fn from(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }
}

impl From<&str> for Blob {
    fn from(text: &str) -> Self {
        Self(text.as_bytes().to_vec())
    }
}

/// A guarded write, as the log stores it; the guard travels in [`Command::KvWrite`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvOp {
    /// Set a key.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: Blob,
    },
    /// Remove a key.
    Delete {
        /// Key.
        key: String,
    },
    /// Set (or remove, `new = None`) a key if its value is `expected` (`None` = absent).
    CompareAndSet {
        /// Key.
        key: String,
        /// Expected value.
        expected: Option<Blob>,
        /// New value.
        new: Option<Blob>,
    },
}

impl KvOp {
    /// The key written.
    pub fn key(&self) -> &str {
        match self {
            Self::Put { key, .. } | Self::Delete { key } | Self::CompareAndSet { key, .. } => key,
        }
    }

    /// From the contract's write.
    pub fn from_write(write: &KvWrite) -> Self {
        let key = write.key().as_str().to_owned();
        match write {
            KvWrite::Put { value, .. } => Self::Put {
                key,
                value: Blob(value.to_vec()),
            },
            KvWrite::Delete { .. } => Self::Delete { key },
            KvWrite::CompareAndSet { expected, new, .. } => Self::CompareAndSet {
                key,
                expected: expected.as_ref().map(|v| Blob(v.to_vec())),
                new: new.as_ref().map(|v| Blob(v.to_vec())),
            },
        }
    }

    /// The key's next value and whether the write applied, given its value now. The
    /// same semantics as `ha_core::KvWrite::apply_to`, on the log's types.
    pub fn apply(&self, current: Option<&Blob>) -> (Option<Blob>, bool) {
        match self {
            Self::Put { value, .. } => (Some(value.clone()), true),
            Self::Delete { .. } => (None, current.is_some()),
            Self::CompareAndSet { expected, new, .. } => {
                if current == expected.as_ref() {
                    (new.clone(), true)
                } else {
                    (current.cloned(), false)
                }
            }
        }
    }
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
        /// How many campaign calls made or resumed it, this one included.
        #[serde(default)]
        attempt: u64,
    },
    /// A guarded write was applied (or its comparison failed).
    KvWritten {
        /// Whether it changed the key (see `ha_core::KvWriteOutcome::applied`).
        applied: bool,
        /// The key's value before.
        previous: Option<Blob>,
    },
    /// The key does not lead.
    NotLeader {
        /// The current leader's token.
        current: Option<u64>,
    },
    /// The results of a [`Command::Batch`], in its order.
    Batch(Vec<CommandResult>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn campaign(value: Vec<u8>) -> Command {
        Command::Campaign {
            lease: 7,
            election: "e".into(),
            value,
        }
    }

    #[test]
    fn leader_values_are_base64_in_the_log_and_old_number_arrays_still_load() {
        let value = vec![0xffu8; 64 * 1024];
        let encoded =
            serde_json::to_vec(&campaign(value.clone())).unwrap_or_else(|e| panic!("{e}"));
        // base64 is 4/3 of the bytes; a JSON array of 255s was 4x.
        assert!(
            encoded.len() < value.len() * 14 / 10,
            "{} bytes",
            encoded.len()
        );
        let back: Command = serde_json::from_slice(&encoded).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, campaign(value));

        let old = br#"{"Campaign":{"lease":7,"election":"e","value":[104,105]}}"#;
        let back: Command = serde_json::from_slice(old).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, campaign(b"hi".to_vec()));
        let bad = br#"{"Campaign":{"lease":7,"election":"e","value":[104,300]}}"#;
        assert!(serde_json::from_slice::<Command>(bad).is_err());
    }
}
