#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
// openraft's error types (StorageError, RaftError) are large by design and its traits
// return them; boxing them at every call would only move the size around.
#![allow(clippy::result_large_err)]

// The layers, bottom to top: error, data, store, net, config, admin, backup, replica,
// node, server, startup, client, admin_client. A module imports only from layers below
// its own (`scripts/check-layers.sh`, docs/architecture.md).
mod admin;
mod admin_client;
mod backup;
mod client;
mod config;
mod data;
mod error;
mod net;
mod node;
mod replica;
mod server;
mod startup;
mod store;

/// Generated gRPC code for the peer and client services (`proto/ha_raft.proto`).
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]
pub mod proto {
    tonic::include_proto!("ha_raft.v1");
}

pub use admin::membership::{MembershipChange, MembershipRefusal};
pub use admin::{AdminError, MembershipReport, NodeStatus, PeerProgress};
pub use admin_client::{GroupStatus, JoinOutcome, MemberKind, MemberStatus, RaftAdmin, Removal};
pub use backup::{
    force_new_group, read_snapshot_file, restore, BackupError, ForcedGroup, RestoreOptions,
    SnapshotHeader, MAX_SNAPSHOT_BYTES, SNAPSHOT_FORMAT,
};
pub use client::{RaftClient, RaftClientOptions, DEFAULT_REQUEST_TIMEOUT};
pub use config::{RaftNodeConfig, MIN_TTL};
pub use data::command::{NodeId, Raft, TypeConfig};
pub use data::level::FEATURE_LEVEL;
pub use error::RaftBackendError;
pub use ha_core::ClientTls;
pub use net::network::FaultInjector;
pub use net::tls::{node_name, RaftTls};
pub use node::RaftNode;
pub use store::db::DATA_DIR_FORMAT;

/// Internals for this crate's own tests (decoders, openraft's storage suite, raw peer
/// messages); not part of the API and may change in any release.
#[doc(hidden)]
pub mod testing {
    pub use crate::data::command::{Blob, Command, CommandResult, KvOp, MemberRecord};
    pub use crate::data::level::LevelReport;
    pub use crate::data::state::State;
    pub use crate::net::wire::{ElectRequest, PeerFailure, Renewal, WireError};
    pub use crate::store::db::{open_db, Identity};
    pub use crate::store::sled_machine::StateMachineStore;
    pub use crate::store::sled_store::{FatalCause, LogStore};
}
