//! One member's replica: the handle the background loops and the peer service hold
//! instead of the whole node. It owns what serving the log needs (configuration, the
//! Raft handle, the state machine, the lessor, the confirmer, the proposer and the
//! shutdown token), and answers what arrives on this member: local proposals, reads
//! and keepalives on the leader, and where the leader is. The node above it adds
//! forwarding, the peer pool, the data dir and membership administration.

mod expiry;
mod failure;
mod handle;
mod heartbeat;
mod hosted;
mod keepalive;
mod lessor;
mod proposer;
mod watchdog;

use std::sync::Arc;

use tokio::task::JoinHandle;

pub(crate) use failure::{core_failure, wait_for_failure};
pub(crate) use handle::{Replica, Target};

/// Starts the loops that run beside Raft while the replica lives: lease expiry on the
/// leader, the heartbeat, the election watchdog and the failure watch. Each holds the
/// replica weakly and ends with it or at shutdown.
pub(crate) fn spawn_loops(replica: &Arc<Replica>) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(expiry::expiry_loop(Arc::downgrade(replica))),
        tokio::spawn(heartbeat::heartbeat_loop(Arc::downgrade(replica))),
        tokio::spawn(watchdog::watchdog(Arc::downgrade(replica))),
        tokio::spawn(failure::stop_on_failure(Arc::downgrade(replica))),
    ]
}
