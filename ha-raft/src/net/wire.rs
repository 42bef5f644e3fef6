//! Conversions between the contract's types and what crosses the wire: protobuf messages
//! of the client API, `ha_core::Error` carried inside a gRPC status, and the state
//! machine's views and hub updates as the contract's leaders and events.

use std::time::Duration;

use bytes::Bytes;
use ha_core::{
    AuthFailure, ElectionName, Error, FencingToken, KvKey, KvWrite, KvWriteOutcome, Leader,
    LeaderEvent, LeaderKey, LeaseId, Member, MemberEvent, Role, ServerId,
};
use serde::{Deserialize, Serialize};

use crate::data::command::MemberRecord;
use crate::data::hub::{LeaderUpdate, MemberUpdate};
use crate::data::state::HeadView;
use crate::proto;

/// What a server answers once its node is shutting down.
pub(crate) fn gone() -> tonic::Status {
    tonic::Status::unavailable("raft node is shutting down")
}

/// Why a peer could not serve a forwarded request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerFailure {
    /// It is not the leader (any more); ask again.
    NotLeader,
    /// It answered with a contract error.
    Error(WireError),
}

/// A Raft leader's request that a voter call an election now.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ElectRequest {
    /// The leader's last log index; the voter waits (briefly) until it holds it.
    pub caught_up_to: u64,
    /// Refuse if an election's ACTIVE runs in the voter's process: placement moves the
    /// leader away from an ACTIVE, never onto another one.
    #[serde(default)]
    pub unless_hosting_active: bool,
}

/// One lease's answer to a keepalive: its TTL in milliseconds, or why it was not
/// renewed (the lease is gone or being expired).
pub type Renewal = std::result::Result<u64, WireError>;

/// `ha_core::Error` in a form that survives serialization, so a remote caller gets the
/// same typed error a local one would.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WireError {
    /// `Error::LeaseExpired`.
    LeaseExpired(u64),
    /// `Error::NotLeader`.
    NotLeader {
        /// Election.
        election: String,
        /// Current token.
        current: Option<u64>,
    },
    /// `Error::AlreadyRegistered`.
    AlreadyRegistered {
        /// Role.
        role: String,
        /// Server id.
        server_id: u64,
    },
    /// `Error::InvalidArgument`.
    InvalidArgument {
        /// What.
        what: String,
        /// Why.
        reason: String,
    },
    /// `Error::TooLarge`.
    TooLarge {
        /// `key` or `value`.
        what: String,
        /// Bytes.
        size: u64,
        /// Limit in bytes.
        limit: u64,
    },
    /// `Error::Auth`.
    Auth {
        /// Which check failed (`AuthFailure` as text).
        failure: String,
        /// Why.
        reason: String,
    },
    /// `Error::Unavailable` (and anything retryable).
    Unavailable(String),
    /// `Error::Timeout`.
    Timeout {
        /// Operation.
        operation: String,
        /// Milliseconds.
        after_ms: u64,
    },
    /// Everything else.
    Other(String),
}

/// `AuthFailure` on the wire, both directions from one table; an unknown name (a newer
/// peer) reads as `PermissionDenied`, the most cautious answer.
const AUTH_FAILURES: [(AuthFailure, &str); 4] = [
    (AuthFailure::UntrustedServer, "UntrustedServer"),
    (AuthFailure::ClientCertificate, "ClientCertificate"),
    (AuthFailure::BadCredentials, "BadCredentials"),
    (AuthFailure::PermissionDenied, "PermissionDenied"),
];

fn auth_failure_name(failure: AuthFailure) -> &'static str {
    AUTH_FAILURES
        .iter()
        .find(|(f, _)| *f == failure)
        .map_or("PermissionDenied", |(_, name)| name)
}

/// The `what` of a `TooLarge` must be `'static`; anything unknown is a `value`.
fn too_large_what(what: &str) -> &'static str {
    ["key", "leader value", "address", "metadata"]
        .into_iter()
        .find(|known| *known == what)
        .unwrap_or("value")
}

/// The `what` of an `InvalidArgument` must be `'static`; the known ones map back, the
/// rest become "argument".
fn static_what(what: &str) -> &'static str {
    match what {
        "ttl" => "ttl",
        "role" => "role",
        "election name" => "election name",
        "url" => "url",
        "drift" => "drift",
        "margin" => "margin",
        "member" => "member",
        "raft configuration" => "raft configuration",
        "key" => "key",
        "value" => "value",
        _ => "argument",
    }
}

fn static_operation(operation: &str) -> &'static str {
    match operation {
        "keep_alive" => "keep_alive",
        "revoke" => "revoke",
        "resign" => "resign",
        "campaign" => "campaign",
        "propose" => "propose",
        "read_index" => "read_index",
        "kv_write" => "kv_write",
        "kv_read" => "kv_read",
        _ => "request",
    }
}

impl From<&Error> for WireError {
    fn from(error: &Error) -> Self {
        match error {
            Error::LeaseExpired { lease } => Self::LeaseExpired(lease.get()),
            Error::NotLeader { election, current } => Self::NotLeader {
                election: election.as_str().to_owned(),
                current: current.map(FencingToken::get),
            },
            Error::AlreadyRegistered { role, server_id } => Self::AlreadyRegistered {
                role: role.as_str().to_owned(),
                server_id: server_id.get(),
            },
            Error::InvalidArgument { what, reason } => Self::InvalidArgument {
                what: (*what).to_owned(),
                reason: reason.clone(),
            },
            Error::TooLarge { what, size, limit } => Self::TooLarge {
                what: (*what).to_owned(),
                size: *size as u64,
                limit: *limit as u64,
            },
            Error::Auth { failure, reason } => Self::Auth {
                failure: auth_failure_name(*failure).to_owned(),
                reason: reason.clone(),
            },
            Error::Unavailable(reason) => Self::Unavailable(reason.clone()),
            Error::Timeout { operation, after } => Self::Timeout {
                operation: (*operation).to_owned(),
                after_ms: after.as_millis() as u64,
            },
            other => Self::Other(other.to_string()),
        }
    }
}

impl From<WireError> for Error {
    fn from(wire: WireError) -> Self {
        let invalid = |reason: String| Error::InvalidArgument {
            what: "argument",
            reason,
        };
        match wire {
            WireError::LeaseExpired(lease) => Error::LeaseExpired {
                lease: LeaseId::new(lease),
            },
            WireError::NotLeader { election, current } => match ElectionName::new(election) {
                Ok(election) => Error::NotLeader {
                    election,
                    current: current.map(FencingToken::new),
                },
                Err(e) => e,
            },
            WireError::AlreadyRegistered { role, server_id } => match Role::new(role) {
                Ok(role) => Error::AlreadyRegistered {
                    role,
                    server_id: ServerId::new(server_id),
                },
                Err(e) => e,
            },
            WireError::InvalidArgument { what, reason } => Error::InvalidArgument {
                what: static_what(&what),
                reason,
            },
            WireError::TooLarge { what, size, limit } => Error::TooLarge {
                what: too_large_what(&what),
                size: usize::try_from(size).unwrap_or(usize::MAX),
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
            },
            WireError::Auth { failure, reason } => Error::Auth {
                failure: AUTH_FAILURES
                    .iter()
                    .find(|(_, name)| *name == failure)
                    .map_or(AuthFailure::PermissionDenied, |(f, _)| *f),
                reason,
            },
            WireError::Unavailable(reason) => Error::Unavailable(reason),
            WireError::Timeout {
                operation,
                after_ms,
            } => Error::Timeout {
                operation: static_operation(&operation),
                after: Duration::from_millis(after_ms),
            },
            WireError::Other(reason) => {
                if reason.is_empty() {
                    invalid("empty error".into())
                } else {
                    Error::Backend {
                        backend: "raft",
                        source: reason.into(),
                    }
                }
            }
        }
    }
}

/// An error as a gRPC status: a code that fits, the message, and the typed error as JSON
/// in the details.
pub fn to_status(error: &Error) -> tonic::Status {
    let code = match error {
        Error::LeaseExpired { .. } | Error::NotLeader { .. } => tonic::Code::FailedPrecondition,
        Error::AlreadyRegistered { .. } => tonic::Code::AlreadyExists,
        Error::InvalidArgument { .. } => tonic::Code::InvalidArgument,
        Error::TooLarge { .. } => tonic::Code::OutOfRange,
        Error::Auth { .. } => tonic::Code::PermissionDenied,
        Error::Unavailable(_) => tonic::Code::Unavailable,
        Error::Timeout { .. } => tonic::Code::DeadlineExceeded,
        _ => tonic::Code::Internal,
    };
    let details = serde_json::to_vec(&WireError::from(error)).unwrap_or_default();
    tonic::Status::with_details(code, error.to_string(), details.into())
}

/// Back from a gRPC status: the typed error if the server sent one, else by code.
pub fn from_status(status: &tonic::Status) -> Error {
    if let Ok(wire) = serde_json::from_slice::<WireError>(status.details()) {
        return wire.into();
    }
    match status.code() {
        tonic::Code::Unauthenticated => {
            return Error::Auth {
                failure: ha_core::auth_failure_in(status.message())
                    .unwrap_or(AuthFailure::BadCredentials),
                reason: status.message().to_owned(),
            }
        }
        tonic::Code::PermissionDenied => {
            return Error::Auth {
                failure: AuthFailure::PermissionDenied,
                reason: status.message().to_owned(),
            }
        }
        _ => {}
    }
    if let Some(error) = crate::net::tls::auth_error(status) {
        return error;
    }
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => {
            Error::Unavailable(status.message().to_owned())
        }
        tonic::Code::DeadlineExceeded => Error::Timeout {
            operation: "request",
            after: Duration::ZERO,
        },
        tonic::Code::InvalidArgument => Error::InvalidArgument {
            what: "argument",
            reason: status.message().to_owned(),
        },
        _ => Error::Backend {
            backend: "raft",
            source: format!("{}: {}", status.code(), status.message()).into(),
        },
    }
}

/// A member into protobuf.
pub fn member_to_proto(member: &Member) -> proto::Member {
    proto::Member {
        server_id: member.server_id.get(),
        role: member.role.as_str().to_owned(),
        address: member.address.clone(),
        metadata: member.metadata.clone().into_iter().collect(),
    }
}

/// A member from protobuf, validated.
pub fn member_from_proto(member: proto::Member) -> Result<Member, Error> {
    let mut out = Member::new(
        ServerId::new(member.server_id),
        Role::new(member.role)?,
        member.address,
    );
    out.metadata = member.metadata.into_iter().collect();
    Ok(out)
}

/// A leader key into protobuf.
pub fn key_to_proto(key: &LeaderKey) -> proto::LeaderKey {
    proto::LeaderKey {
        election: key.election.as_str().to_owned(),
        lease: key.lease.get(),
        token: key.token.get(),
    }
}

/// A leader key from protobuf, validated.
pub fn key_from_proto(key: proto::LeaderKey) -> Result<LeaderKey, Error> {
    Ok(LeaderKey {
        election: ElectionName::new(key.election)?,
        lease: LeaseId::new(key.lease),
        token: FencingToken::new(key.token),
    })
}

fn kv_value(value: Option<&Bytes>) -> Option<proto::KvValue> {
    value.map(|v| proto::KvValue { data: v.to_vec() })
}

fn kv_bytes(value: Option<proto::KvValue>) -> Option<Bytes> {
    value.map(|v| Bytes::from(v.data))
}

/// A guarded write into protobuf.
pub fn kv_write_to_proto(guard: &LeaderKey, write: &KvWrite) -> proto::KvWriteRequest {
    use proto::kv_write_request::Op;
    let op = match write {
        KvWrite::Put { value, .. } => Op::Put(proto::KvValue {
            data: value.to_vec(),
        }),
        KvWrite::Delete { .. } => Op::Delete(proto::Empty {}),
        KvWrite::CompareAndSet { expected, new, .. } => Op::CompareAndSet(proto::KvCompareAndSet {
            expected: kv_value(expected.as_ref()),
            new: kv_value(new.as_ref()),
        }),
    };
    proto::KvWriteRequest {
        guard: Some(key_to_proto(guard)),
        key: write.key().as_str().to_owned(),
        op: Some(op),
    }
}

/// A guarded write from protobuf, validated.
pub fn kv_write_from_proto(request: proto::KvWriteRequest) -> Result<(LeaderKey, KvWrite), Error> {
    use proto::kv_write_request::Op;
    let guard = key_from_proto(required(request.guard, "guard")?)?;
    let key = KvKey::new(request.key)?;
    let write = match required(request.op, "op")? {
        Op::Put(value) => KvWrite::Put {
            key,
            value: Bytes::from(value.data),
        },
        Op::Delete(_) => KvWrite::Delete { key },
        Op::CompareAndSet(cas) => KvWrite::CompareAndSet {
            key,
            expected: kv_bytes(cas.expected),
            new: kv_bytes(cas.new),
        },
    };
    Ok((guard, write))
}

/// A guarded write's outcome into protobuf.
pub fn kv_outcome_to_proto(outcome: &KvWriteOutcome) -> proto::KvWriteReply {
    proto::KvWriteReply {
        applied: outcome.applied,
        previous: kv_value(outcome.previous.as_ref()),
    }
}

/// A guarded write's outcome from protobuf.
pub fn kv_outcome_from_proto(reply: proto::KvWriteReply) -> KvWriteOutcome {
    KvWriteOutcome {
        applied: reply.applied,
        previous: kv_bytes(reply.previous),
    }
}

/// A read's answer into protobuf.
pub fn kv_read_to_proto(value: Option<&Bytes>) -> proto::KvReadReply {
    proto::KvReadReply {
        value: kv_value(value),
    }
}

/// A read's answer from protobuf.
pub fn kv_read_from_proto(reply: proto::KvReadReply) -> Option<Bytes> {
    kv_bytes(reply.value)
}

/// A leader into protobuf.
pub fn leader_to_proto(leader: &Leader) -> proto::Leader {
    proto::Leader {
        key: Some(key_to_proto(&leader.key)),
        value: leader.value.to_vec(),
        server_id: leader.server_id.map_or(0, ServerId::get),
        has_server_id: leader.server_id.is_some(),
    }
}

/// A leader from protobuf, validated.
pub fn leader_from_proto(leader: proto::Leader) -> Result<Leader, Error> {
    let key = leader.key.ok_or_else(|| Error::InvalidArgument {
        what: "argument",
        reason: "leader without a key".into(),
    })?;
    Ok(Leader {
        key: key_from_proto(key)?,
        value: Bytes::from(leader.value),
        server_id: leader
            .has_server_id
            .then(|| ServerId::new(leader.server_id)),
    })
}

/// A required message field, or a typed error naming it.
pub fn required<T>(field: Option<T>, name: &str) -> Result<T, Error> {
    field.ok_or_else(|| Error::InvalidArgument {
        what: "argument",
        reason: format!("missing field {name}"),
    })
}

pub(crate) fn head_to_leader(election: &ElectionName, head: HeadView) -> Leader {
    Leader {
        key: LeaderKey {
            election: election.clone(),
            lease: LeaseId::new(head.lease),
            token: FencingToken::new(head.token),
        },
        value: Bytes::from(head.value),
        server_id: head.server_id.map(ServerId::new),
    }
}

pub(crate) fn update_to_event(election: &ElectionName, update: LeaderUpdate) -> LeaderEvent {
    match update.head {
        Some(head) => LeaderEvent::Elected(head_to_leader(election, head)),
        None => LeaderEvent::Vacant,
    }
}

pub(crate) fn member_update_to_event(update: MemberUpdate) -> ha_core::Result<MemberEvent> {
    let convert = |m: MemberRecord| m.to_member().map_err(Error::from);
    Ok(match update {
        MemberUpdate::Snapshot(members) => MemberEvent::Snapshot(
            members
                .into_iter()
                .map(convert)
                .collect::<ha_core::Result<Vec<_>>>()?,
        ),
        MemberUpdate::Joined(m) => MemberEvent::Joined(convert(m)?),
        MemberUpdate::Left(m) => MemberEvent::Left(convert(m)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_auth_failure_crosses_the_wire_unchanged() {
        for (failure, _) in AUTH_FAILURES {
            let error = Error::Auth {
                failure,
                reason: "r".into(),
            };
            match from_status(&to_status(&error)) {
                Error::Auth { failure: back, .. } => assert_eq!(back, failure),
                other => panic!("{failure:?} came back as {other:?}"),
            }
        }
    }
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// Whatever status a peer or server sends, with whatever details bytes, becomes
        /// a typed error.
        #[test]
        fn any_status_becomes_an_error(
            code in 0i32..20,
            message in ".{0,100}",
            details in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let status = tonic::Status::with_details(tonic::Code::from_i32(code), message, details.into());
            let _ = from_status(&status);
        }

        /// Errors that went out as JSON details come back as the same kind.
        #[test]
        fn mutated_error_details_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        ) {
            let sent = to_status(&Error::NotLeader {
                election: ElectionName::new("rootcoord").map_err(|e| TestCaseError::fail(e.to_string()))?,
                current: Some(FencingToken::new(7)),
            });
            let mut details = sent.details().to_vec();
            for (at, byte) in flips {
                let i = at.index(details.len());
                details[i] = byte;
            }
            let _ = from_status(&tonic::Status::with_details(sent.code(), "x", details.into()));
        }

        /// Protobuf records with any field values convert or give a typed error.
        #[test]
        fn any_proto_record_converts_or_is_refused(
            server_id in any::<u64>(),
            role in ".{0,300}",
            address in ".{0,50}",
            election in ".{0,300}",
            lease in any::<u64>(),
            token in any::<u64>(),
            has_key in any::<bool>(),
            has_server_id in any::<bool>(),
        ) {
            let _ = member_from_proto(proto::Member {
                server_id, role, address, metadata: Default::default(),
            });
            let key = proto::LeaderKey { election, lease, token };
            let _ = key_from_proto(key.clone());
            let _ = leader_from_proto(proto::Leader {
                key: has_key.then_some(key),
                value: Vec::new(),
                server_id,
                has_server_id,
            });
        }
    }
}
