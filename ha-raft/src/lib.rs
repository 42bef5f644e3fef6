#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
// openraft's error types (StorageError, RaftError) are large by design and its traits
// return them; boxing them at every call would only move the size around.
#![allow(clippy::result_large_err)]

pub mod command;
mod error;
pub mod hub;
pub mod state;
pub mod storage;

/// Generated gRPC code for the peer and client services (`proto/ha_raft.proto`).
#[allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]
pub mod proto {
    tonic::include_proto!("ha_raft.v1");
}

pub use error::RaftBackendError;
