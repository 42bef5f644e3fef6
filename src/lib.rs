#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod connect;

#[cfg(feature = "etcd")]
pub use connect::etcd_config;
pub use connect::{connect, connect_with, ConnectOptions};
pub use ha_core::*;

/// The in-process backend, for unit tests and demos.
#[cfg(feature = "memory")]
#[cfg_attr(docsrs, doc(cfg(feature = "memory")))]
pub use ha_memory as memory;

/// The embedded Raft backend: [`raft::RaftNode`] (a member) and [`raft::RaftClient`].
#[cfg(feature = "raft")]
#[cfg_attr(docsrs, doc(cfg(feature = "raft")))]
pub use ha_raft as raft;

/// The etcd backend: [`etcd::EtcdBackend`], [`etcd::EtcdConfig`].
#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub use ha_etcd as etcd;
