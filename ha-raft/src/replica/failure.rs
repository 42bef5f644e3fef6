//! A Raft core that stopped on its own: openraft ends its core on a storage error (a
//! full disk, an I/O error) or a panic, and from then on the node can neither vote nor
//! lead nor apply. Its last metrics still name it as leader, and without this watch the
//! node went on serving, answering peers and clients with errors while it looked alive.
//! On such a stop the node shuts its server and background tasks down and reports the
//! cause through [`RaftNode::failed`](crate::RaftNode::failed), so a process can exit
//! and be restarted once the cause is fixed.

use std::sync::Weak;

use openraft::error::Fatal;
use tracing::error;

use super::handle::Replica;
use crate::data::command::{NodeId, Raft};
use crate::error::RaftBackendError;

/// Why the core stopped, if it stopped on its own (`None` while it runs and after a
/// requested shutdown).
pub(crate) fn core_failure(raft: &Raft) -> Option<RaftBackendError> {
    let metrics = raft.metrics();
    let state = metrics.borrow();
    state.running_state.as_ref().err().and_then(failure_of)
}

fn failure_of(fatal: &Fatal<NodeId>) -> Option<RaftBackendError> {
    match fatal {
        Fatal::StorageError(e) => Some(RaftBackendError::Storage(e.to_string())),
        Fatal::Panicked => Some(RaftBackendError::Stopped("the Raft core panicked".into())),
        Fatal::Stopped => None,
    }
}

/// Waits until the core stops on its own; `None` when it stopped because it was told
/// to (or the node is gone).
pub(crate) async fn wait_for_failure(raft: &Raft) -> Option<RaftBackendError> {
    let mut metrics = raft.metrics();
    loop {
        if let Err(fatal) = &metrics.borrow_and_update().running_state {
            return failure_of(fatal);
        }
        if metrics.changed().await.is_err() {
            return core_failure(raft);
        }
    }
}

/// Shuts the node's server and tasks down once its core has failed.
pub(crate) async fn stop_on_failure(node: Weak<Replica>) {
    let Some(raft) = node.upgrade().map(|inner| inner.raft.clone()) else {
        return;
    };
    let Some(failure) = wait_for_failure(&raft).await else {
        return;
    };
    if let Some(inner) = node.upgrade() {
        error!(
            node = inner.config.id,
            error = %failure,
            "the Raft core stopped; this node no longer votes, leads or serves"
        );
        inner.shutdown.cancel();
    }
}
