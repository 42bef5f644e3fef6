//! `RaftClient`: the contract for a process that is not a member of the group, over the
//! client API of any member (which forwards to the leader). Replies name the Raft
//! leader and the client sends its next calls there; an endpoint that fails (no answer
//! within an attempt, a broken connection, a probe unanswered) is left for the one that
//! failed least recently and every stream on it is opened again there (see
//! `ha_core::endpoints`); watches resume after the last revision they saw.

mod backend;
mod connection;
mod held;
mod keepalives;
mod watch;

pub use connection::{RaftClient, RaftClientOptions, DEFAULT_REQUEST_TIMEOUT};
