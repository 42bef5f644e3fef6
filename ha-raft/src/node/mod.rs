//! `RaftNode`: one embedded member of the group, and a `Backend` in its own right.
//!
//! Writes go through the Raft leader: a follower forwards the command to it (one hop; a
//! node that is not leader never forwards again, the origin retries). Keepalives go to
//! the leader's lessor. Reads are linearizable: the leader's read index, then this node's
//! applied state. Campaigns and watches wait on this node's applied state.

mod admin;
mod backend;
mod keepalive;
mod levels;
mod placement;
mod routing;
mod snapshot;
mod transfer;

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use ha_core::watch_buffer::{self, WatchReceiver, WATCH_BUFFER};
use ha_core::{Error, Result};
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::membership::MembershipChange;
use crate::admin::{AdminError, MembershipReport, NodeStatus};
use crate::config::RaftNodeConfig;
use crate::data::command::{NodeId, Raft};
use crate::data::hub::{LeaderUpdate, MemberUpdate};
use crate::error::RaftBackendError;
use crate::net::network::PeerPool;
use crate::net::wire::Renewal;
use crate::replica::{Replica, Target};
use crate::store::db::{release_within_5s, Db};

/// An embedded member of a Raft group. Cheap to clone; every clone is the same node.
/// Call [`shutdown`](Self::shutdown) to stop it.
#[derive(Debug, Clone)]
pub struct RaftNode {
    inner: Arc<NodeInner>,
}

pub(crate) struct NodeInner {
    /// What the background loops and the peer service hold.
    pub(crate) replica: Arc<Replica>,
    pub(crate) pool: Arc<PeerPool>,
    /// Gone once openraft has dropped every handle to the log store.
    log_store_alive: std::sync::Weak<()>,
    /// The node's own handle to its database, released last by `shutdown`, so the final
    /// flush of sled's teardown happens there and not in whichever task happens to
    /// drop the last tree.
    db: Mutex<Option<Db>>,
    /// Held while one membership change is checked and carried out.
    pub(crate) membership_lock: tokio::sync::Mutex<()>,
    /// Cancelled when the admin API asks this node to leave the group.
    pub(crate) leave: CancellationToken,
    /// Whether the node's owner follows [`RaftNode::leave_requested`].
    pub(crate) leave_handled: std::sync::atomic::AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl NodeInner {
    /// The node over a started replica; `tasks` are stopped at shutdown.
    pub(crate) fn new(
        replica: Arc<Replica>,
        pool: Arc<PeerPool>,
        log_store_alive: std::sync::Weak<()>,
        db: Db,
        tasks: Vec<JoinHandle<()>>,
    ) -> Self {
        Self {
            replica,
            pool,
            log_store_alive,
            db: Mutex::new(Some(db)),
            membership_lock: tokio::sync::Mutex::new(()),
            leave: CancellationToken::new(),
            leave_handled: std::sync::atomic::AtomicBool::new(false),
            tasks: Mutex::new(tasks),
        }
    }
}

/// A handle that does not keep the node alive: what its servers hold.
#[derive(Debug, Clone)]
pub(crate) struct WeakNode(Weak<NodeInner>);

impl WeakNode {
    /// The node, while it lives.
    pub(crate) fn upgrade(&self) -> Option<RaftNode> {
        self.0.upgrade().map(|inner| RaftNode { inner })
    }
}

impl std::fmt::Debug for NodeInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.replica.config.id)
            .field("listen", &self.replica.config.listen)
            .field("cluster_id", &self.replica.config.cluster_id)
            .finish_non_exhaustive()
    }
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        self.replica.shutdown.cancel();
    }
}

impl RaftNode {
    /// Runs `task` until the node shuts down.
    pub(crate) fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.replica.config.id
    }

    pub(crate) fn inner_config(&self) -> &RaftNodeConfig {
        &self.inner.replica.config
    }

    /// The address peers and clients reach this node at.
    pub fn address(&self) -> String {
        self.inner.replica.config.advertised()
    }

    /// The openraft handle, for metrics and administration.
    pub fn raft(&self) -> &Raft {
        &self.inner.replica.raft
    }

    /// The current Raft leader, as this node knows it (`None` once its core has
    /// stopped: its last knowledge is stale).
    pub fn current_leader(&self) -> Option<NodeId> {
        let metrics = self.inner.replica.raft.metrics();
        let metrics = metrics.borrow();
        metrics
            .running_state
            .is_ok()
            .then_some(metrics.current_leader)
            .flatten()
    }

    /// Resolves, with the cause, when the Raft core stops on its own: a storage error
    /// (a full disk, failing I/O) or a panic. The node has then shut its server and
    /// tasks down; call [`shutdown`](Self::shutdown) to release the data dir, fix the
    /// cause and start it again (what it acknowledged is on disk or on a quorum). Never
    /// resolves for a node that runs or was shut down on purpose.
    pub async fn failed(&self) -> RaftBackendError {
        match crate::replica::wait_for_failure(&self.inner.replica).await {
            Some(failure) => failure,
            None => std::future::pending().await,
        }
    }

    /// Whether this node is the Raft leader now.
    pub fn is_leader(&self) -> bool {
        matches!(self.inner.replica.target(), Target::Me { .. })
    }

    /// Waits until some node is known as leader; returns its id.
    ///
    /// # Errors
    /// `Unavailable` if none is within `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId> {
        let mut metrics = self.inner.replica.raft.metrics();
        let found = tokio::time::timeout(timeout, async {
            loop {
                if let Some(leader) = metrics.borrow_and_update().current_leader {
                    return Some(leader);
                }
                if metrics.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match found {
            Ok(Some(leader)) => Ok(leader),
            _ => Err(RaftBackendError::NoLeader(timeout).into()),
        }
    }

    /// This node's status: its Raft state, log, membership and, on the leader, each
    /// member's replication (what `ha status` shows).
    pub async fn status(&self) -> NodeStatus {
        self.inner.status().await
    }

    /// Checks and carries out a membership change. Call on the Raft leader (another
    /// node answers [`AdminError::NotLeader`] naming it); [`RaftAdmin`](crate::RaftAdmin)
    /// finds the leader itself.
    ///
    /// # Errors
    /// [`AdminError::Refused`] when the change would lose quorum or clashes with the
    /// group (nothing changed), `NotLeader`, or `Timeout` (the outcome is unknown).
    pub async fn change_membership(
        &self,
        change: &MembershipChange,
    ) -> std::result::Result<MembershipReport, AdminError> {
        self.inner.change_membership(change).await
    }

    /// Resolves when `ha member remove` of this node asks it to leave the group on
    /// purpose. Calling it tells the admin API that the caller handles such requests:
    /// it resigns what runs on the node, then removes the node through the Raft leader
    /// ([`RaftAdmin::change`](crate::RaftAdmin::change)) and stops it. Without a caller
    /// the node is removed without that handover.
    pub fn leave_requested(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner
            .leave_handled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.leave.clone().cancelled_owned()
    }

    /// Whether a leave was asked of this node.
    pub fn is_leaving(&self) -> bool {
        self.inner.leave.is_cancelled()
    }

    /// Adds a node as a learner (it replicates but does not vote) and waits, within the
    /// request timeout, until it has caught up. Call on the leader.
    ///
    /// # Errors
    /// `Unavailable` if this node is not the leader, or the change is refused or fails,
    /// or the learner has not caught up in time.
    pub async fn add_learner(&self, id: NodeId, addr: impl Into<String>) -> Result<()> {
        let change = MembershipChange::AddLearner {
            id,
            address: addr.into(),
            cluster_id: self.inner.replica.config.cluster_id.clone(),
            fresh: false,
            feature_level: None,
        };
        self.membership_result(&change).await?;
        let deadline = Instant::now() + self.inner.replica.config.request_timeout;
        loop {
            if self.inner.caught_up(id) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "learner {id} has not caught up within {:?}",
                    self.inner.replica.config.request_timeout
                )));
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    /// Promotes learners to voters, each once it has caught up (waiting for that within
    /// the request timeout). Call on the leader.
    ///
    /// # Errors
    /// `Unavailable` if this node is not the leader, or a change is refused or fails.
    pub async fn promote(&self, ids: &[NodeId]) -> Result<()> {
        for id in ids {
            self.membership_result(&MembershipChange::Promote { id: *id })
                .await?;
        }
        Ok(())
    }

    /// Removes nodes from the group entirely. Call on the leader.
    ///
    /// # Errors
    /// `Unavailable` if this node is not the leader, or a change is refused (it would
    /// lose quorum) or fails.
    pub async fn remove(&self, ids: &[NodeId]) -> Result<()> {
        for id in ids {
            self.membership_result(&MembershipChange::Remove { id: *id })
                .await?;
        }
        Ok(())
    }

    /// Carries out `change`, retrying within the request timeout while the learner
    /// catches up or another change finishes.
    async fn membership_result(&self, change: &MembershipChange) -> Result<()> {
        use crate::admin::membership::MembershipRefusal::{ChangeInProgress, NotCaughtUp};
        let deadline = Instant::now() + self.inner.replica.config.request_timeout;
        loop {
            match self.change_membership(change).await {
                Ok(_) => return Ok(()),
                Err(AdminError::Refused(NotCaughtUp { .. } | ChangeInProgress))
                    if Instant::now() < deadline =>
                {
                    sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(Error::Unavailable(format!("{change:?}: {e}"))),
            }
        }
    }

    /// Stops the node: the server, Raft and every background task. Other handles to it
    /// fail with `Unavailable` afterwards. A leader first hands its leadership to a
    /// caught-up voter (within twice the shortest election timeout), so the group has a
    /// new leader in milliseconds instead of after an election timeout.
    pub async fn shutdown(&self) {
        // Before the server stops: the voter asked to take over needs this node's vote.
        self.inner.hand_over(true).await;
        self.stop().await;
    }

    /// [`shutdown`](Self::shutdown) without handing Raft leadership to another voter:
    /// the followers elect after their election timeout, as after a crash. For tests
    /// whose stop of a node stands for its crash.
    #[doc(hidden)]
    pub async fn shutdown_without_transfer(&self) {
        self.inner.replica.shutdown.cancel();
        self.inner.hand_over(false).await;
        self.stop().await;
    }

    async fn stop(&self) {
        self.inner.replica.shutdown.cancel();
        if let Err(e) = self.inner.replica.raft.shutdown().await {
            warn!(node = self.id(), error = %e, "raft shutdown");
        }
        let tasks: Vec<_> = std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        // Release the database now, as a dead process would, so the same data dir can
        // be opened again while handles to this node remain.
        self.inner.replica.sm.close();
        // openraft's replication tasks drop their log readers asynchronously after the
        // core stops, and a snapshot it was building finishes in a task of its own; wait
        // (bounded) until both are done with the database.
        let deadline = Instant::now() + Duration::from_secs(5);
        let in_use =
            || self.inner.log_store_alive.strong_count() > 0 || self.inner.replica.sm.in_use();
        while in_use() && Instant::now() < deadline {
            sleep(Duration::from_millis(5)).await;
        }
        if in_use() {
            warn!(
                node = self.id(),
                "log or snapshot store still in use 5 s after shutdown"
            );
        }
        let db = self
            .inner
            .db
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(db) = db {
            release_within_5s(db, self.id()).await;
        }
        info!(node = self.id(), "raft node stopped");
    }

    /// Watches an election. With `after == 0` the first update is the current state as of
    /// a linearizable read; otherwise every change after revision `after` (which this or
    /// another node reported) follows, so a reconnecting watcher misses nothing.
    pub(crate) async fn watch_updates(
        &self,
        election: &str,
        after: u64,
    ) -> Result<WatchReceiver<LeaderUpdate>> {
        let (tx, rx) = watch_buffer::channel(WATCH_BUFFER);
        let index = if after == 0 {
            self.inner.read_index().await?
        } else {
            0
        };
        self.inner
            .replica
            .read_at(index, |machine| {
                let applied = machine.applied_index();
                machine
                    .hub
                    .subscribe_leader(&machine.state, applied, election, after, tx);
            })
            .await?;
        Ok(rx)
    }

    /// Watches a role's members, starting with a linearizable snapshot.
    pub(crate) async fn member_updates(&self, role: &str) -> Result<WatchReceiver<MemberUpdate>> {
        let (tx, rx) = watch_buffer::channel(WATCH_BUFFER);
        let index = self.inner.read_index().await?;
        self.inner
            .replica
            .read_at(index, |machine| {
                machine.hub.subscribe_members(&machine.state, role, tx);
            })
            .await?;
        Ok(rx)
    }

    pub(crate) fn from_inner(inner: Arc<NodeInner>) -> Self {
        Self { inner }
    }

    /// A handle that does not keep this node alive.
    pub(crate) fn downgrade(&self) -> WeakNode {
        WeakNode(Arc::downgrade(&self.inner))
    }

    /// This node's replica.
    pub(crate) fn replica(&self) -> &Arc<Replica> {
        &self.inner.replica
    }

    /// Keepalives of `leases` on the leader, wherever it is; a result per lease.
    pub(crate) async fn keep_alive_batch(&self, leases: &[u64]) -> Result<Vec<Renewal>> {
        self.inner.keep_alive_batch(leases).await
    }
}
