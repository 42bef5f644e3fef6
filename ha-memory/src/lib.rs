#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod backend;
mod state;

pub use backend::{MemoryBackend, MIN_TTL};
