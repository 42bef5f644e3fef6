//! The leader's heartbeat, at its own cadence.
//!
//! openraft 0.9 uses its `heartbeat_interval` for two things: how often a leader sends
//! heartbeats, and the timeout of every AppendEntries and every leadership-confirmation
//! round. A link whose round trip exceeds the heartbeat interval then times out every
//! replication and confirmation. The node sets openraft's interval to the RPC timeout,
//! turns openraft's own heartbeats off, and sends them from here every
//! `RaftNodeConfig::heartbeat_interval`, so followers still learn the commit index (and a
//! waiting candidate that it leads) as often as before.

use std::sync::Weak;

use openraft::ServerState;
use tokio::time::sleep;

use super::handle::Replica;

/// Triggers a heartbeat every interval while this node leads; ends with the node.
pub(crate) async fn heartbeat_loop(node: Weak<Replica>) {
    loop {
        let Some(inner) = node.upgrade() else { return };
        let every = inner.config.heartbeat_interval;
        let shutdown = inner.shutdown.clone();
        let leads = inner.raft.metrics().borrow().state == ServerState::Leader;
        if leads && inner.raft.trigger().heartbeat().await.is_err() {
            // openraft stopped (shutdown or a fatal storage error): nothing to beat for.
            return;
        }
        drop(inner);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sleep(every) => {}
        }
    }
}
