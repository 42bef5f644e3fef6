#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod backend;
mod config;
mod error;
pub mod keys;
mod status;

pub use backend::EtcdBackend;
pub use config::{EtcdConfig, EtcdTls, MIN_TTL};
pub use error::EtcdBackendError;
pub use status::{cluster_status, EtcdClusterStatus, EtcdEndpointStatus, EtcdMemberStatus};
