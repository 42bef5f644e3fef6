#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod backend;
mod config;
mod error;
pub mod keys;

pub use backend::EtcdBackend;
pub use config::{EtcdConfig, EtcdTls, MIN_TTL};
pub use error::EtcdBackendError;
