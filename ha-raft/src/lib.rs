#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
// openraft's error types (StorageError, RaftError) are large by design and its traits
// return them; boxing them at every call would only move the size around.
#![allow(clippy::result_large_err)]

mod admin;
mod admin_client;
mod backup;
mod channel;
mod client;
mod command;
mod config;
mod error;
mod failure;
mod heartbeat;
mod hub;
mod image;
mod lessor;
mod membership;
mod network;
mod node;
mod service;
mod state;
mod storage;
mod tls;
mod watchdog;
mod wire;

/// Generated gRPC code for the peer and client services (`proto/ha_raft.proto`).
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]
pub mod proto {
    tonic::include_proto!("ha_raft.v1");
}

pub use admin::{AdminError, MembershipReport, NodeStatus, PeerProgress};
pub use admin_client::{GroupStatus, JoinOutcome, MemberKind, MemberStatus, RaftAdmin, Removal};
pub use backup::{
    force_new_group, read_snapshot_file, restore, BackupError, ForcedGroup, RestoreOptions,
    SnapshotHeader, MAX_SNAPSHOT_BYTES, SNAPSHOT_FORMAT,
};
pub use client::{RaftClient, RaftClientOptions, DEFAULT_REQUEST_TIMEOUT};
pub use command::{NodeId, Raft, TypeConfig};
pub use config::{RaftNodeConfig, MIN_TTL};
pub use error::RaftBackendError;
pub use ha_core::ClientTls;
pub use membership::{MembershipChange, MembershipRefusal};
pub use network::FaultInjector;
pub use node::RaftNode;
pub use tls::{node_name, RaftTls};

/// Internals for this crate's own tests (decoders, openraft's storage suite, raw peer
/// messages); not part of the API and may change in any release.
#[doc(hidden)]
pub mod testing {
    pub use crate::command::{Blob, Command, KvOp, MemberRecord};
    pub use crate::state::State;
    pub use crate::storage::{open_db, Identity, LogStore, StateMachineStore};
}
