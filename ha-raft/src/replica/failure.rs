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
use crate::store::sled_store::FatalCause;

/// Why the core stopped, if it stopped on its own (`None` while it runs and after a
/// requested shutdown).
pub(crate) fn core_failure(replica: &Replica) -> Option<RaftBackendError> {
    failure_now(&replica.raft, &replica.sm.fatal_cause())
}

fn failure_now(raft: &Raft, cause: &FatalCause) -> Option<RaftBackendError> {
    let metrics = raft.metrics();
    let state = metrics.borrow();
    state
        .running_state
        .as_ref()
        .err()
        .and_then(|fatal| failure_of(fatal, cause))
}

/// The typed cause the stores recorded (an entry of a newer version, a level this
/// member does not serve), else what openraft reports.
fn failure_of(fatal: &Fatal<NodeId>, cause: &FatalCause) -> Option<RaftBackendError> {
    match fatal {
        Fatal::StorageError(e) => Some(
            cause
                .get()
                .unwrap_or_else(|| RaftBackendError::Storage(e.to_string())),
        ),
        Fatal::Panicked => Some(RaftBackendError::Stopped("the Raft core panicked".into())),
        Fatal::Stopped => None,
    }
}

/// Waits until the core stops on its own; `None` when it stopped because it was told
/// to (or the node is gone).
pub(crate) async fn wait_for_failure(replica: &Replica) -> Option<RaftBackendError> {
    wait_for_core_failure(&replica.raft, &replica.sm.fatal_cause()).await
}

/// [`wait_for_failure`] on the Raft handle and the stores' cause alone, so a waiting
/// task need not keep the replica alive.
async fn wait_for_core_failure(raft: &Raft, cause: &FatalCause) -> Option<RaftBackendError> {
    let mut metrics = raft.metrics();
    loop {
        if let Err(fatal) = &metrics.borrow_and_update().running_state {
            return failure_of(fatal, cause);
        }
        if metrics.changed().await.is_err() {
            return failure_now(raft, cause);
        }
    }
}

/// Shuts the node's server and tasks down once its core has failed.
pub(crate) async fn stop_on_failure(node: Weak<Replica>) {
    let Some((raft, cause)) = node
        .upgrade()
        .map(|replica| (replica.raft.clone(), replica.sm.fatal_cause()))
    else {
        return;
    };
    let failure = wait_for_core_failure(&raft, &cause).await;
    let Some(failure) = failure else {
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
