#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod active_standby;
mod backend;
mod clock;
mod endpoint;
pub mod endpoints;
mod error;
mod kv;
mod leadership;
mod limits;
mod session;
mod tls;
mod types;
pub mod watch_buffer;
mod withdraw;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use active_standby::{
    Active, ActiveStandby, ActiveStandbyBuilder, BoxError, CoordinatorEvent, LossPolicy, Outcome,
    Readiness, RoleState, DEFAULT_STANDBY_LOG_INTERVAL,
};
pub use backend::{Backend, Capabilities, LeaderStream, MemberStream};
pub use endpoint::is_loopback_endpoint;
pub use error::{auth_failure_in, error_chain, AuthFailure, Error, Result};
pub use kv::{
    CasOutcome, KvKey, KvLimits, KvWrite, KvWriteOutcome, DEFAULT_MAX_KEY_BYTES,
    DEFAULT_MAX_VALUE_BYTES,
};
pub use leadership::Leadership;
pub use limits::{RecordLimits, MAX_ADDRESS_BYTES, MAX_LEADER_VALUE_BYTES, MAX_METADATA_BYTES};
pub use session::{
    LossReason, Session, SessionBuilder, SessionOptions, SessionState, DEFAULT_DRIFT, DEFAULT_TTL,
};
pub use tls::{read_pem, ClientTls};
pub use types::{
    ElectionName, FencingToken, Leader, LeaderEvent, LeaderKey, Lease, LeaseId, Member,
    MemberEvent, Role, ServerId, MAX_NAME_LEN, MAX_TTL,
};
pub use withdraw::WithdrawOnDrop;

/// Re-exported so backends and users name the same `Bytes` type.
pub use bytes::Bytes;
