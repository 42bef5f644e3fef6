//! `RaftNode`: one embedded member of the group, and a `Backend` in its own right.
//!
//! Writes go through the Raft leader: a follower forwards the command to it (one hop; a
//! node that is not leader never forwards again, the origin retries). Keepalives go to
//! the leader's lessor. Reads are linearizable: the leader's read index, then this node's
//! applied state. Campaigns and watches wait on this node's applied state.

mod backend;
mod keepalive;
mod proposer;
mod routing;

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ha_core::watch_buffer::{self, WatchReceiver, WATCH_BUFFER};
use ha_core::{Error, Result};
use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::admin::{AdminError, MembershipReport, NodeStatus};
use crate::command::{Command, NodeId, Raft};
use crate::config::RaftNodeConfig;
use crate::error::RaftBackendError;
use crate::hub::{LeaderUpdate, MemberUpdate};
use crate::lessor::{Confirmer, Lessor};
use crate::membership::MembershipChange;
use crate::network::{Network, PeerPool};
use crate::storage::{open_db, Identity, LogStore, StateMachineStore};
use crate::tls::ClientAuth;

pub(crate) use keepalive::{check_batch_size, Renewal, MAX_KEEPALIVE_BATCH};
pub(crate) use routing::{PeerFailure, Target};

/// An embedded member of a Raft group. Cheap to clone; every clone is the same node.
/// Call [`shutdown`](Self::shutdown) to stop it.
#[derive(Debug, Clone)]
pub struct RaftNode {
    inner: Arc<NodeInner>,
}

pub(crate) struct NodeInner {
    pub(crate) config: RaftNodeConfig,
    pub(crate) raft: Raft,
    pub(crate) sm: StateMachineStore,
    pub(crate) pool: Arc<PeerPool>,
    pub(crate) lessor: Lessor,
    confirmer: Confirmer,
    proposer: proposer::Proposer,
    /// Gone once openraft has dropped every handle to the log store.
    log_store_alive: std::sync::Weak<()>,
    /// The node's own handle to its database, released last by `shutdown`, so the final
    /// flush of sled's teardown happens there and not in whichever task happens to
    /// drop the last tree.
    db: Mutex<Option<sled::Db>>,
    pub(crate) shutdown: CancellationToken,
    /// Held while one membership change is checked and carried out.
    pub(crate) membership_lock: tokio::sync::Mutex<()>,
    /// Cancelled when the admin API asks this node to leave the group.
    pub(crate) leave: CancellationToken,
    /// Whether the node's owner follows [`RaftNode::leave_requested`].
    pub(crate) leave_handled: std::sync::atomic::AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for NodeInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.config.id)
            .field("listen", &self.config.listen)
            .field("cluster_id", &self.config.cluster_id)
            .finish_non_exhaustive()
    }
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl RaftNode {
    /// Opens the data dir, starts Raft and the gRPC server, and bootstraps the group if
    /// this node is one of `peers` and has never been initialized.
    ///
    /// # Errors
    /// Invalid configuration, a data dir of another cluster or node, a port that cannot
    /// be bound, or a storage failure.
    pub async fn start(config: RaftNodeConfig) -> Result<Self> {
        config.validate()?;
        // Bind first: a taken port must fail before anything is started.
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| {
                RaftBackendError::Config(format!("cannot listen on {}: {e}", config.listen))
            })?;
        let identity = Identity {
            cluster_id: config.cluster_id.clone(),
            node_id: config.id,
        };
        let db = open_db(&config.data_dir, &identity, config.cache_capacity).await?;
        let log_store = LogStore::new(&db)?;
        let log_store_alive = log_store.liveness();
        let sm = StateMachineStore::new(&db)?;
        let pool = Arc::new(PeerPool::new(
            config.id,
            config.cluster_id.clone(),
            config.tls.clone(),
            config.faults.clone(),
        ));
        let ms = |d: Duration| d.as_millis() as u64;
        let raft_config = openraft::Config {
            cluster_name: config.cluster_id.clone(),
            // openraft bounds every replication and confirmation RPC by this interval;
            // heartbeats at `heartbeat_interval` come from `heartbeat_loop` instead.
            heartbeat_interval: ms(config.effective_rpc_timeout()),
            enable_heartbeat: false,
            election_timeout_min: ms(config.election_timeout.0),
            election_timeout_max: ms(config.election_timeout.1),
            install_snapshot_timeout: ms(config.request_timeout),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.snapshot_every / 10,
            // Batches are cut to `MAX_APPEND_BYTES` by their encoded size in the network.
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            ..Default::default()
        }
        .validate()
        .map_err(|e| RaftBackendError::Config(e.to_string()))?;
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            Network::new(Arc::clone(&pool)),
            log_store,
            sm.clone(),
        )
        .await
        .map_err(|e| RaftBackendError::Stopped(e.to_string()))?;

        let confirm_raft = raft.clone();
        let confirm_timeout = config.request_timeout;
        let (confirmer, confirm_task) = Confirmer::spawn(move || {
            let raft = confirm_raft.clone();
            async move {
                match tokio::time::timeout(confirm_timeout, raft.ensure_linearizable()).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no quorum within {confirm_timeout:?}")),
                }
            }
        });
        let (proposer, propose_task) =
            proposer::Proposer::spawn(raft.clone(), config.request_timeout);
        let inner = Arc::new(NodeInner {
            config,
            raft,
            sm,
            pool,
            lessor: Lessor::default(),
            confirmer,
            proposer,
            log_store_alive,
            db: Mutex::new(Some(db)),
            shutdown: CancellationToken::new(),
            membership_lock: tokio::sync::Mutex::new(()),
            leave: CancellationToken::new(),
            leave_handled: std::sync::atomic::AtomicBool::new(false),
            tasks: Mutex::new(vec![confirm_task, propose_task]),
        });
        let node = Self { inner };
        node.spawn(crate::service::serve(
            Arc::downgrade(&node.inner),
            listener,
            node.inner.config.tls.clone(),
            ClientAuth {
                tls: node.inner.config.tls.is_some(),
                token: node.inner.config.client_token.as_deref().map(Arc::from),
                admin_token: node.inner.config.admin_token.as_deref().map(Arc::from),
            },
            node.inner.shutdown.clone(),
        ));
        node.spawn(crate::lessor::lessor_loop(Arc::downgrade(&node.inner)));
        node.spawn(crate::heartbeat::heartbeat_loop(Arc::downgrade(
            &node.inner,
        )));
        node.spawn(crate::watchdog::watchdog(Arc::downgrade(&node.inner)));
        node.spawn(crate::failure::stop_on_failure(Arc::downgrade(&node.inner)));
        if let Err(e) = node.bootstrap().await {
            node.shutdown().await;
            return Err(e);
        }
        info!(
            node = node.inner.config.id,
            listen = %node.inner.config.listen,
            cluster = %node.inner.config.cluster_id,
            "raft node started"
        );
        Ok(node)
    }

    fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
    }

    async fn bootstrap(&self) -> Result<()> {
        let config = &self.inner.config;
        if !config.peers.contains_key(&config.id) {
            return Ok(());
        }
        let initialized = self
            .inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| RaftBackendError::Stopped(e.to_string()))?;
        if initialized {
            return Ok(());
        }
        let members: BTreeMap<NodeId, BasicNode> = config
            .peers
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
            .collect();
        // Every initial voter initializes with the same set; openraft documents this as
        // safe, and it means the group forms whichever voter starts first.
        match self.inner.raft.initialize(members).await {
            Ok(()) => info!(node = config.id, "bootstrapped the group"),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
            Err(e) => return Err(RaftBackendError::Stopped(e.to_string()).into()),
        }
        Ok(())
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.config.id
    }

    pub(crate) fn inner_config(&self) -> &RaftNodeConfig {
        &self.inner.config
    }

    /// The address peers and clients reach this node at.
    pub fn address(&self) -> String {
        self.inner.config.advertised()
    }

    /// The openraft handle, for metrics and administration.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The current Raft leader, as this node knows it (`None` once its core has
    /// stopped: its last knowledge is stale).
    pub fn current_leader(&self) -> Option<NodeId> {
        let metrics = self.inner.raft.metrics();
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
        match crate::failure::wait_for_failure(&self.inner.raft).await {
            Some(failure) => failure,
            None => std::future::pending().await,
        }
    }

    /// Whether this node is the Raft leader now.
    pub fn is_leader(&self) -> bool {
        matches!(self.inner.target(), Target::Me { .. })
    }

    /// Waits until some node is known as leader; returns its id.
    ///
    /// # Errors
    /// `Unavailable` if none is within `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId> {
        let mut metrics = self.inner.raft.metrics();
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
            cluster_id: self.inner.config.cluster_id.clone(),
            fresh: false,
        };
        self.membership_result(&change).await?;
        let deadline = Instant::now() + self.inner.config.request_timeout;
        loop {
            if self.inner.caught_up(id) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "learner {id} has not caught up within {:?}",
                    self.inner.config.request_timeout
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
        use crate::membership::MembershipRefusal::{ChangeInProgress, NotCaughtUp};
        let deadline = Instant::now() + self.inner.config.request_timeout;
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
    /// fail with `Unavailable` afterwards.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.hand_over().await;
        if let Err(e) = self.inner.raft.shutdown().await {
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
        self.inner.sm.close();
        // openraft's replication tasks drop their log readers asynchronously after the
        // core stops, and a snapshot it was building finishes in a task of its own; wait
        // (bounded) until both are done with the database.
        let deadline = Instant::now() + Duration::from_secs(5);
        let in_use = || self.inner.log_store_alive.strong_count() > 0 || self.inner.sm.in_use();
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
            release(db, self.id()).await;
        }
        info!(node = self.id(), "raft node stopped");
    }

    /// On a leader: commits a [`Command::Handover`] and waits until every follower has
    /// stored it, for at most the shortest election timeout (after that the followers
    /// elect a new leader anyway). The entry carries the commit index of the leader's
    /// last writes, which otherwise reaches a follower only with the next heartbeat: a
    /// leader stopped right after a resign would leave the next candidate waiting for a
    /// new Raft leader to learn that it leads, a Raft election instead of milliseconds.
    async fn hand_over(&self) {
        if !self.inner.raft.metrics().borrow().state.is_leader() {
            return;
        }
        let budget = self.inner.config.election_timeout.0;
        let deadline = tokio::time::Instant::now() + budget;
        let written =
            tokio::time::timeout(budget, self.inner.raft.client_write(Command::Handover)).await;
        let index = match written {
            Ok(Ok(response)) => response.log_id.index,
            // Not the leader any more, or no quorum: nothing to hand over.
            Ok(Err(e)) => {
                debug!(node = self.id(), error = %e, "no handover entry");
                return;
            }
            Err(_) => {
                debug!(node = self.id(), "no handover entry within {budget:?}");
                return;
            }
        };
        let mut metrics = self.inner.raft.metrics();
        let stored_everywhere = |m: &openraft::RaftMetrics<NodeId, BasicNode>| {
            m.replication.as_ref().is_some_and(|followers| {
                followers
                    .values()
                    .all(|matched| matched.is_some_and(|log| log.index >= index))
            })
        };
        let stored = matches!(
            tokio::time::timeout_at(deadline, metrics.wait_for(stored_everywhere)).await,
            Ok(Ok(_))
        );
        if stored {
            debug!(node = self.id(), index, "every follower has the handover");
        } else {
            debug!(
                node = self.id(),
                index, "not every follower stored the handover in time"
            );
        }
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
            .read_at(index, |machine| {
                machine.hub.subscribe_members(&machine.state, role, tx);
            })
            .await?;
        Ok(rx)
    }

    pub(crate) fn from_inner(inner: Arc<NodeInner>) -> Self {
        Self { inner }
    }

    /// Keepalives of `leases` on the leader, wherever it is; a result per lease.
    pub(crate) async fn keep_alive_batch(&self, leases: &[u64]) -> Result<Vec<Renewal>> {
        self.inner.keep_alive_batch(leases).await
    }
}

impl NodeInner {
    pub(crate) fn cluster_id(&self) -> &str {
        &self.config.cluster_id
    }

    /// Whether peers must prove their node id with a certificate.
    pub(crate) fn peers_need_certificates(&self) -> bool {
        self.config.tls.is_some()
    }

    pub(crate) fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Whether a certificate names some member (or some initial peer, or any node while
    /// this node has no configuration yet).
    pub(crate) fn names_a_peer(&self, certs: &[tonic::transport::CertificateDer<'static>]) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let mut ids: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        if ids.is_empty() {
            // A learner not yet told its group: the body check decides.
            return !certs.is_empty();
        }
        ids.extend(self.config.peers.keys());
        ids.iter().any(|id| crate::tls::names_node(certs, *id))
    }

    /// The largest message each service decodes.
    pub(crate) fn message_limits(&self) -> crate::config::MessageLimits {
        self.config.message_limits()
    }

    /// Whether `from` may talk to this node: a member of its configuration, or anyone
    /// while this node has no configuration yet (a learner being added).
    pub(crate) fn knows_peer(&self, from: NodeId) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let mut nodes = membership.nodes().peekable();
        nodes.peek().is_none() || membership.get_node(&from).is_some()
    }
}

/// Drops a node's last database handle, which makes sled flush and unlock the data
/// dir. On a thread of its own, waited for at most 5 s: every acknowledged write was
/// flushed already, and sled 0.34's teardown flush can fail to return when it races a
/// snapshot write; that must not hang the runtime's shutdown.
async fn release(db: sled::Db, node: NodeId) {
    let (released, done) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("sled-release-{node}"))
        .spawn(move || {
            drop(db);
            let _ = released.send(());
        });
    if let Err(e) = spawned {
        warn!(node, error = %e, "no thread to release the database on; released in place");
        return;
    }
    if tokio::time::timeout(Duration::from_secs(5), done)
        .await
        .is_err()
    {
        error!(
            node,
            "the database was not released within 5 s; its data dir stays locked"
        );
    }
}

/// Most entries in one AppendEntries; the byte budget usually binds first.
const MAX_PAYLOAD_ENTRIES: u64 = 300;
