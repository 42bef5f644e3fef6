//! `RaftNode`: one embedded member of the group, and a `Backend` in its own right.
//!
//! Writes go through the Raft leader: a follower forwards the command to it (one hop; a
//! node that is not leader never forwards again, the origin retries). Keepalives go to
//! the leader's lessor. Reads are linearizable: the leader's read index, then this node's
//! applied state. Campaigns and watches wait on this node's applied state.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use ha_core::watch_buffer::{self, WatchReceiver, WATCH_BUFFER};
use ha_core::{
    Backend, Capabilities, ElectionName, Error, FencingToken, KvKey, KvWrite, KvWriteOutcome,
    Leader, LeaderEvent, LeaderKey, LeaderStream, Lease, LeaseId, Member, MemberEvent,
    MemberStream, RecordLimits, Result, Role, ServerId,
};
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::command::{Command, CommandResult, KvOp, MemberRecord, NodeId, Raft};
use crate::config::{RaftNodeConfig, MIN_TTL};
use crate::error::RaftBackendError;
use crate::hub::{LeaderUpdate, MemberUpdate};
use crate::lessor::{Confirmer, Lessor};
use crate::network::{Network, PeerError, PeerPool, PeerRpc};
use crate::state::HeadView;
use crate::storage::{open_db, Identity, LogStore, StateMachineStore};
use crate::tls::ClientAuth;
use crate::wire::WireError;

/// Why a peer could not serve a forwarded request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum PeerFailure {
    /// It is not the leader (any more); ask again.
    NotLeader,
    /// It answered with a contract error.
    Error(WireError),
}

/// Where requests that need the leader go right now.
#[derive(Debug, Clone)]
enum Target {
    Me { term: u64 },
    Peer { id: NodeId, addr: String },
    Unknown,
}

/// One attempt at something that needs the leader.
enum Attempt<T> {
    Done(Result<T>),
    Retry(String),
}

/// An embedded member of a Raft group. Cheap to clone; every clone is the same node.
/// Call [`shutdown`](Self::shutdown) to stop it.
#[derive(Debug, Clone)]
pub struct RaftNode {
    inner: Arc<NodeInner>,
}

pub(crate) struct NodeInner {
    pub(crate) config: RaftNodeConfig,
    pub(crate) raft: Raft,
    sm: StateMachineStore,
    pool: Arc<PeerPool>,
    lessor: Lessor,
    confirmer: Confirmer,
    /// Gone once openraft has dropped every handle to the log store.
    log_store_alive: std::sync::Weak<()>,
    /// The node's own handle to its database, released last by `shutdown`, so the final
    /// flush of sled's teardown happens there and not in whichever task happens to
    /// drop the last tree.
    db: Mutex<Option<sled::Db>>,
    pub(crate) shutdown: CancellationToken,
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
        let inner = Arc::new(NodeInner {
            config,
            raft,
            sm,
            pool,
            lessor: Lessor::default(),
            confirmer,
            log_store_alive,
            db: Mutex::new(Some(db)),
            shutdown: CancellationToken::new(),
            tasks: Mutex::new(vec![confirm_task]),
        });
        let node = Self { inner };
        node.spawn(crate::service::serve(
            Arc::downgrade(&node.inner),
            listener,
            node.inner.config.tls.clone(),
            ClientAuth {
                tls: node.inner.config.tls.is_some(),
                token: node.inner.config.client_token.as_deref().map(Arc::from),
            },
            node.inner.shutdown.clone(),
        ));
        node.spawn(lessor_loop(Arc::downgrade(&node.inner)));
        node.spawn(crate::heartbeat::heartbeat_loop(Arc::downgrade(
            &node.inner,
        )));
        node.spawn(watchdog(Arc::downgrade(&node.inner)));
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

    /// Adds a node as a learner (it replicates but does not vote). Call on the leader.
    ///
    /// # Errors
    /// `Unavailable` if this node is not the leader, or the change fails.
    pub async fn add_learner(&self, id: NodeId, addr: impl Into<String>) -> Result<()> {
        self.inner
            .raft
            .add_learner(id, BasicNode::new(addr.into()), true)
            .await
            .map(|_| ())
            .map_err(|e| Error::Unavailable(format!("add learner {id}: {e}")))
    }

    /// Promotes learners to voters. Call on the leader.
    ///
    /// # Errors
    /// `Unavailable` if this node is not the leader, or the change fails.
    pub async fn promote(&self, ids: &[NodeId]) -> Result<()> {
        let ids: BTreeSet<NodeId> = ids.iter().copied().collect();
        self.inner
            .raft
            .change_membership(openraft::ChangeMembers::AddVoterIds(ids), true)
            .await
            .map(|_| ())
            .map_err(|e| Error::Unavailable(format!("promote: {e}")))
    }

    /// Removes nodes from the group entirely. Call on the leader.
    ///
    /// # Errors
    /// `Unavailable` if this node is not the leader, or the change fails.
    pub async fn remove(&self, ids: &[NodeId]) -> Result<()> {
        let ids: BTreeSet<NodeId> = ids.iter().copied().collect();
        let raft = &self.inner.raft;
        raft.change_membership(openraft::ChangeMembers::RemoveVoters(ids.clone()), false)
            .await
            .map_err(|e| Error::Unavailable(format!("remove voters: {e}")))?;
        raft.change_membership(openraft::ChangeMembers::RemoveNodes(ids), false)
            .await
            .map(|_| ())
            .map_err(|e| Error::Unavailable(format!("remove nodes: {e}")))
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
    /// leader stopped right after a resign could leave the next candidate waiting for a
    /// new Raft leader to learn that it leads (`ha bench`: an 838 ms handoff).
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

    fn target(&self) -> Target {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        match metrics.current_leader {
            Some(id) if id == self.config.id => {
                if metrics.state == ServerState::Leader {
                    Target::Me {
                        term: metrics.current_term,
                    }
                } else {
                    Target::Unknown
                }
            }
            Some(id) => match metrics.membership_config.membership().get_node(&id) {
                Some(node) => Target::Peer {
                    id,
                    addr: node.addr.clone(),
                },
                None => Target::Unknown,
            },
            None => Target::Unknown,
        }
    }

    /// Runs `attempt` against the current leader until it is done or the request
    /// timeout passes.
    async fn with_leader<T, F, Fut>(&self, operation: &'static str, mut attempt: F) -> Result<T>
    where
        F: FnMut(Target) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let deadline = Instant::now() + self.config.request_timeout;
        let mut metrics = self.raft.metrics();
        loop {
            if let Some(failure) = crate::failure::core_failure(&self.raft) {
                return Err(failure.into());
            }
            if self.shutdown.is_cancelled() {
                return Err(Error::Unavailable(format!(
                    "raft node {} is shut down",
                    self.config.id
                )));
            }
            let target = self.target();
            tracing::trace!(node = self.config.id, operation, ?target, "attempt");
            let reason = match attempt(target).await {
                Attempt::Done(result) => return result,
                Attempt::Retry(reason) => reason,
            };
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "{operation}: no Raft leader reachable within {:?} ({reason})",
                    self.config.request_timeout
                )));
            }
            debug!(
                node = self.config.id,
                operation, reason, "retrying against the leader"
            );
            // At least a short pause (a minority leader's metrics change constantly, so
            // waking on every change would spin), at most until the leader changes.
            sleep(Duration::from_millis(10)).await;
            tokio::select! {
                _ = metrics.changed() => {}
                _ = sleep(Duration::from_millis(40)) => {}
            }
        }
    }

    /// Appends a command through the leader; returns its log index and result.
    async fn propose(&self, command: Command) -> Result<(u64, CommandResult)> {
        // Lease and election commands are idempotent: retried after an unknown outcome
        // they do no harm. A Register retried could meet its own first attempt, and a
        // guarded write retried would report on itself (a compare-and-set that applied
        // would come back as a mismatch), so those surface the unknown outcome instead.
        let idempotent = !matches!(command, Command::Register { .. } | Command::KvWrite { .. });
        self.with_leader("propose", |target| {
            let command = command.clone();
            async move {
                match target {
                    Target::Me { .. } => match self.propose_local(command).await {
                        Ok(done) => Attempt::Done(Ok(done)),
                        Err(PeerFailure::NotLeader) => Attempt::Retry("leadership moved".into()),
                        Err(PeerFailure::Error(e)) => Attempt::Done(Err(e.into())),
                    },
                    Target::Peer { id, addr } => {
                        self.forward(id, &addr, PeerRpc::Propose, &command, idempotent)
                            .await
                    }
                    Target::Unknown => Attempt::Retry("no leader known".into()),
                }
            }
        })
        .await
    }

    /// Sends a request to the leader `id` and maps its answer: "not leader" and an RPC
    /// that never arrived are worth retrying; one that may have arrived is retried only
    /// if `idempotent`.
    async fn forward<Req: Serialize, T: DeserializeOwned>(
        &self,
        id: NodeId,
        addr: &str,
        rpc: PeerRpc,
        request: &Req,
        idempotent: bool,
    ) -> Attempt<T> {
        let reply: std::result::Result<std::result::Result<T, PeerFailure>, PeerError> = self
            .pool
            .call(id, addr, rpc, request, self.config.request_timeout)
            .await;
        match reply {
            Ok(Ok(value)) => Attempt::Done(Ok(value)),
            Ok(Err(PeerFailure::Error(e))) => Attempt::Done(Err(e.into())),
            Ok(Err(PeerFailure::NotLeader)) => Attempt::Retry(format!("node {id} is not leader")),
            Err(e @ PeerError::Unreachable { .. }) => Attempt::Retry(e.to_string()),
            Err(e @ PeerError::Failed { .. }) if idempotent => Attempt::Retry(e.to_string()),
            Err(e) => Attempt::Done(Err(Error::Unavailable(e.to_string()))),
        }
    }

    /// Appends a command on this node, which believes it leads.
    pub(crate) async fn propose_local(
        &self,
        command: Command,
    ) -> std::result::Result<(u64, CommandResult), PeerFailure> {
        // A leader cut off from its quorum accepts the entry but can never commit it:
        // bound the wait, and report the outcome as unknown.
        let timeout = self.config.request_timeout;
        match tokio::time::timeout(timeout, self.raft.client_write(command)).await {
            Ok(Ok(response)) => Ok((response.log_id.index, response.data)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                Err(PeerFailure::NotLeader)
            }
            Ok(Err(e)) => Err(PeerFailure::Error(WireError::Unavailable(e.to_string()))),
            Err(_) => Err(PeerFailure::Error(WireError::Timeout {
                operation: "propose".into(),
                after_ms: timeout.as_millis() as u64,
            })),
        }
    }

    /// A keepalive on this node, which believes it leads in `term`.
    pub(crate) async fn keep_alive_local(
        &self,
        lease: u64,
    ) -> std::result::Result<u64, PeerFailure> {
        let Target::Me { term } = self.target() else {
            return Err(PeerFailure::NotLeader);
        };
        let expired = || PeerFailure::Error(WireError::LeaseExpired(lease));
        let ttl = |sm: &StateMachineStore| sm.lock().state.leases.get(&lease).map(|l| l.ttl_ms);
        // Records the renewal in this term, or says why it cannot be.
        let renew = |ttl_ms: u64| {
            if self
                .lessor
                .renew(term, lease, Duration::from_millis(ttl_ms))
            {
                Ok(())
            } else if self.lessor.is_expiring(lease) {
                Err(expired())
            } else {
                Err(PeerFailure::NotLeader)
            }
        };
        let known = ttl(&self.sm);
        if let Some(ttl_ms) = known {
            renew(ttl_ms)?;
        }
        // A quorum round that starts after the renewal was recorded: a deposed leader
        // fails here and the keepalive is not acknowledged.
        self.confirmer
            .confirm()
            .await
            .map_err(|_| PeerFailure::NotLeader)?;
        let Some(ttl_ms) = ttl(&self.sm) else {
            return Err(expired());
        };
        if known.is_none() {
            renew(ttl_ms)?;
        }
        if self.lessor.is_expiring(lease) {
            return Err(expired());
        }
        Ok(ttl_ms)
    }

    /// The leader's read index, on this node, which believes it leads.
    pub(crate) async fn read_index_local(&self) -> std::result::Result<u64, PeerFailure> {
        match tokio::time::timeout(self.config.request_timeout, self.raft.get_read_log_id()).await {
            Ok(Ok((read, _applied))) => Ok(read.map_or(0, |l| l.index)),
            _ => Err(PeerFailure::NotLeader),
        }
    }

    /// Waits until this node has applied `index`, then reads under the state lock.
    async fn read_at<T>(
        &self,
        index: u64,
        read: impl FnOnce(&mut crate::storage::Machine) -> T,
    ) -> Result<T> {
        let mut applied = self.sm.applied();
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            {
                let mut machine = self.sm.lock();
                if machine.applied_index() >= index {
                    return Ok(read(&mut machine));
                }
            }
            tokio::select! {
                changed = applied.changed() => if changed.is_err() {
                    return Err(Error::Unavailable("raft node stopped".into()));
                },
                _ = sleep_until(deadline) => {
                    return Err(Error::Timeout { operation: "read_index", after: self.config.request_timeout });
                }
            }
        }
    }

    /// A linearizable read: the leader's read index, then this node's state.
    async fn linearizable<T>(
        &self,
        read: impl FnOnce(&mut crate::storage::Machine) -> T,
    ) -> Result<T> {
        let index = self.read_index().await?;
        self.read_at(index, read).await
    }

    /// The leader's read index: every change completed before this call is at or below it.
    async fn read_index(&self) -> Result<u64> {
        self.with_leader("read_index", |target| async move {
            match target {
                Target::Me { .. } => {
                    match tokio::time::timeout(
                        self.config.request_timeout,
                        self.raft.ensure_linearizable(),
                    )
                    .await
                    {
                        Ok(Ok(read)) => Attempt::Done(Ok(read.map_or(0, |l| l.index))),
                        Ok(Err(e)) => Attempt::Retry(e.to_string()),
                        Err(_) => Attempt::Retry("leadership not confirmed by a quorum".into()),
                    }
                }
                Target::Peer { id, addr } => {
                    self.forward(id, &addr, PeerRpc::ReadIndex, &(), true).await
                }
                Target::Unknown => Attempt::Retry("no leader known".into()),
            }
        })
        .await
    }
}

/// Drops a node's last database handle, which makes sled flush and unlock the data
/// dir. On a thread of its own, waited for at most 5 s: every acknowledged write was
/// flushed already, and a teardown flush that never returns (seen once with sled 0.34
/// on a tokio worker, racing a snapshot write) must not hang the runtime's shutdown.
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

/// Expires leases whose deadline passed, while this node leads.
async fn lessor_loop(node: Weak<NodeInner>) {
    const TICK: Duration = Duration::from_millis(100);
    loop {
        let Some(inner) = node.upgrade() else { return };
        let now = Instant::now();
        let wake = inner
            .lessor
            .next_deadline()
            .map_or(now + TICK, |d| d.min(now + TICK))
            .max(now + Duration::from_millis(5));
        let shutdown = inner.shutdown.clone();
        drop(inner);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sleep_until(wake) => {}
        }
        let Some(inner) = node.upgrade() else { return };
        let Target::Me { term } = inner.target() else {
            inner.lessor.step_down();
            continue;
        };
        if inner.lessor.term() != Some(term) {
            // Apply everything committed in earlier terms before trusting the lease set.
            let confirmed = tokio::time::timeout(
                inner.config.request_timeout,
                inner.raft.ensure_linearizable(),
            )
            .await;
            if !matches!(confirmed, Ok(Ok(_))) {
                continue;
            }
            inner.lessor.lead(term);
        }
        let leases: Vec<(u64, Duration)> = inner
            .sm
            .lock()
            .state
            .leases
            .iter()
            .map(|(id, l)| (*id, Duration::from_millis(l.ttl_ms)))
            .collect();
        for lease in inner.lessor.due(term, &leases) {
            let node = Weak::clone(&node);
            tokio::spawn(async move {
                let Some(inner) = node.upgrade() else { return };
                info!(node = inner.config.id, lease = %LeaseId::new(lease), "lease expired, revoking");
                if inner
                    .propose_local(Command::Expire { lease })
                    .await
                    .is_err()
                {
                    inner.lessor.expire_failed(lease);
                }
            });
        }
    }
}

/// openraft draws its election timeout once per node, so a split vote can repeat; when
/// there has been no leader for 2× the maximum election timeout, call an election after
/// a random pause.
async fn watchdog(node: Weak<NodeInner>) {
    let mut leaderless_since: Option<Instant> = None;
    loop {
        let Some(inner) = node.upgrade() else { return };
        let max = inner.config.election_timeout.1;
        let shutdown = inner.shutdown.clone();
        let (leader, voter) = {
            let metrics = inner.raft.metrics();
            let metrics = metrics.borrow();
            let voter = metrics
                .membership_config
                .membership()
                .voter_ids()
                .any(|id| id == inner.config.id);
            (metrics.current_leader, voter)
        };
        drop(inner);
        if leader.is_some() || !voter {
            leaderless_since = None;
        } else {
            let since = *leaderless_since.get_or_insert_with(Instant::now);
            if since.elapsed() > max * 2 {
                let jitter = Duration::from_millis(rand::random_range(0..=max.as_millis() as u64));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = sleep(jitter) => {}
                }
                if let Some(inner) = node.upgrade() {
                    if inner.raft.metrics().borrow().current_leader.is_none() {
                        info!(
                            node = inner.config.id,
                            "no leader for a while, calling an election"
                        );
                        let _ = inner.raft.trigger().elect().await;
                    }
                }
                leaderless_since = None;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sleep(max / 2) => {}
        }
    }
}

/// Withdraws a candidacy if the campaign is dropped before it wins.
struct WithdrawOnDrop {
    node: Option<Arc<NodeInner>>,
    command: Command,
}

impl WithdrawOnDrop {
    fn disarm(&mut self) {
        self.node = None;
    }
}

impl Drop for WithdrawOnDrop {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            let command = self.command.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Err(e) = node.propose(command).await {
                        warn!(node = node.config.id, error = %e, "withdrawing a dropped campaign failed");
                    }
                });
            }
        }
    }
}

pub(crate) fn head_to_leader(election: &ElectionName, head: HeadView) -> Leader {
    Leader {
        key: LeaderKey {
            election: election.clone(),
            lease: LeaseId::new(head.lease),
            token: FencingToken::new(head.token),
        },
        value: Bytes::from(head.value),
        server_id: head.server_id.map(ServerId::new),
    }
}

/// A local leader watch. A watcher that fell behind is ended by the hub; this one then
/// subscribes again after the last revision it saw, so its reader sees every change
/// once, in order, however slowly it reads.
fn follow_leader(node: RaftNode, election: ElectionName) -> LeaderStream {
    struct Follow {
        node: RaftNode,
        election: ElectionName,
        updates: Option<WatchReceiver<LeaderUpdate>>,
        after: u64,
        /// The head last reported, so a resume that starts with the current state
        /// does not report it twice.
        last: Option<Option<(u64, Vec<u8>)>>,
        done: bool,
    }
    let start = Follow {
        node,
        election,
        updates: None,
        after: 0,
        last: None,
        done: false,
    };
    futures::stream::unfold(start, |mut follow| async move {
        if follow.done {
            return None;
        }
        loop {
            let mut updates = match follow.updates.take() {
                Some(updates) => updates,
                None => match follow
                    .node
                    .watch_updates(follow.election.as_str(), follow.after)
                    .await
                {
                    Ok(updates) => updates,
                    Err(e) => {
                        follow.done = true;
                        return Some((Err(e), follow));
                    }
                },
            };
            let Some(update) = updates.recv().await else {
                if updates.lagged() {
                    continue; // resume after `after`
                }
                return None;
            };
            follow.updates = Some(updates);
            follow.after = follow.after.max(update.revision);
            let head = update.head.as_ref().map(|h| (h.token, h.value.clone()));
            if follow.last.as_ref() == Some(&head) {
                continue;
            }
            follow.last = Some(head);
            let event = update_to_event(&follow.election, update);
            return Some((Ok(event), follow));
        }
    })
    .boxed()
}

pub(crate) fn update_to_event(election: &ElectionName, update: LeaderUpdate) -> LeaderEvent {
    match update.head {
        Some(head) => LeaderEvent::Elected(head_to_leader(election, head)),
        None => LeaderEvent::Vacant,
    }
}

pub(crate) fn member_update_to_event(update: MemberUpdate) -> Result<MemberEvent> {
    let convert = |m: MemberRecord| m.to_member().map_err(Error::from);
    Ok(match update {
        MemberUpdate::Snapshot(members) => MemberEvent::Snapshot(
            members
                .into_iter()
                .map(convert)
                .collect::<Result<Vec<_>>>()?,
        ),
        MemberUpdate::Joined(m) => MemberEvent::Joined(convert(m)?),
        MemberUpdate::Left(m) => MemberEvent::Left(convert(m)?),
    })
}

fn unexpected(result: CommandResult) -> Error {
    RaftBackendError::Corrupt(format!("unexpected command result {result:?}")).into()
}

#[async_trait]
impl Backend for RaftNode {
    fn name(&self) -> &'static str {
        "raft"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(MIN_TTL).with_kv_limits(self.inner.config.kv_limits)
    }

    async fn register(&self, member: &Member, ttl: Duration) -> Result<Lease> {
        self.capabilities().check_ttl(ttl)?;
        RecordLimits::DEFAULT.check_member(member)?;
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let command = Command::Register {
            member: MemberRecord::from(member),
            ttl_ms,
        };
        match self.inner.propose(command).await?.1 {
            CommandResult::Registered { lease, ttl_ms } => Ok(Lease {
                id: LeaseId::new(lease),
                ttl: Duration::from_millis(ttl_ms),
            }),
            CommandResult::AlreadyRegistered => Err(Error::AlreadyRegistered {
                role: member.role.clone(),
                server_id: member.server_id,
            }),
            other => Err(unexpected(other)),
        }
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let inner = &self.inner;
        let ttl_ms = inner
            .with_leader("keep_alive", |target| async move {
                match target {
                    Target::Me { .. } => match inner.keep_alive_local(lease.get()).await {
                        Ok(ttl) => Attempt::Done(Ok(ttl)),
                        Err(PeerFailure::Error(e)) => Attempt::Done(Err(e.into())),
                        Err(PeerFailure::NotLeader) => {
                            Attempt::Retry("leadership not confirmed".into())
                        }
                    },
                    Target::Peer { id, addr } => {
                        inner
                            .forward(id, &addr, PeerRpc::KeepAlive, &lease.get(), true)
                            .await
                    }
                    Target::Unknown => Attempt::Retry("no leader known".into()),
                }
            })
            .await?;
        Ok(Duration::from_millis(ttl_ms))
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.inner
            .propose(Command::Revoke { lease: lease.get() })
            .await?;
        Ok(())
    }

    async fn campaign(
        &self,
        lease: LeaseId,
        election: &ElectionName,
        value: Bytes,
    ) -> Result<LeaderKey> {
        RecordLimits::DEFAULT.check_leader_value(&value)?;
        let command = Command::Campaign {
            lease: lease.get(),
            election: election.as_str().to_owned(),
            value: value.to_vec(),
        };
        let (index, token) = match self.inner.propose(command).await? {
            (index, CommandResult::Campaigned { token }) => (index, token),
            (_, CommandResult::LeaseExpired) => return Err(Error::LeaseExpired { lease }),
            (_, other) => return Err(unexpected(other)),
        };
        let key = LeaderKey {
            election: election.clone(),
            lease,
            token: FencingToken::new(token),
        };
        let mut guard = WithdrawOnDrop {
            node: Some(Arc::clone(&self.inner)),
            command: Command::Resign {
                election: election.as_str().to_owned(),
                lease: lease.get(),
                token,
            },
        };
        let mut applied = self.inner.sm.applied();
        loop {
            {
                let machine = self.inner.sm.lock();
                if machine.applied_index() >= index {
                    let state = &machine.state;
                    if !state.leases.contains_key(&lease.get()) {
                        guard.disarm();
                        return Err(Error::LeaseExpired { lease });
                    }
                    let queue = state.elections.get(election.as_str());
                    match queue.and_then(|q| q.keys().next()) {
                        Some(head) if *head == token => {
                            guard.disarm();
                            return Ok(key);
                        }
                        _ if !queue.is_some_and(|q| q.contains_key(&token)) => {
                            guard.disarm();
                            return Err(Error::NotLeader {
                                election: election.clone(),
                                current: state
                                    .head(election.as_str())
                                    .map(|h| FencingToken::new(h.token)),
                            });
                        }
                        _ => {}
                    }
                }
            }
            // A node shut down under a waiting campaign must answer it: nothing will be
            // applied on it again (found by the Raft fault schedules: a campaign waiting on
            // a stopped node hung while its lease, renewed elsewhere, held the election).
            tokio::select! {
                biased;
                () = self.inner.shutdown.cancelled() => {
                    return Err(Error::Unavailable("raft node shut down".into()));
                }
                changed = applied.changed() => {
                    if changed.is_err() {
                        return Err(Error::Unavailable("raft node stopped".into()));
                    }
                }
            }
        }
    }

    async fn resign(&self, key: &LeaderKey) -> Result<()> {
        self.inner
            .propose(Command::Resign {
                election: key.election.as_str().to_owned(),
                lease: key.lease.get(),
                token: key.token.get(),
            })
            .await?;
        Ok(())
    }

    async fn proclaim(&self, key: &LeaderKey, value: Bytes) -> Result<()> {
        RecordLimits::DEFAULT.check_leader_value(&value)?;
        let command = Command::Proclaim {
            election: key.election.as_str().to_owned(),
            lease: key.lease.get(),
            token: key.token.get(),
            value: value.to_vec(),
        };
        match self.inner.propose(command).await?.1 {
            CommandResult::Ok => Ok(()),
            CommandResult::NotLeader { current } => Err(Error::NotLeader {
                election: key.election.clone(),
                current: current.map(FencingToken::new),
            }),
            other => Err(unexpected(other)),
        }
    }

    async fn leader(&self, election: &ElectionName) -> Result<Option<Leader>> {
        let head = self
            .inner
            .linearizable(|machine| machine.state.head(election.as_str()))
            .await?;
        Ok(head.map(|head| head_to_leader(election, head)))
    }

    fn watch(&self, election: &ElectionName) -> LeaderStream {
        follow_leader(self.clone(), election.clone())
    }

    async fn members(&self, role: &Role) -> Result<Vec<Member>> {
        let records = self
            .inner
            .linearizable(|machine| machine.state.members_of(role.as_str()))
            .await?;
        records
            .iter()
            .map(|r| r.to_member().map_err(Error::from))
            .collect()
    }

    async fn kv_write(&self, guard: &LeaderKey, write: KvWrite) -> Result<KvWriteOutcome> {
        self.inner.config.kv_limits.check(&write)?;
        let command = Command::KvWrite {
            election: guard.election.as_str().to_owned(),
            lease: guard.lease.get(),
            token: guard.token.get(),
            op: KvOp::from_write(&write),
        };
        match self.inner.propose(command).await?.1 {
            CommandResult::KvWritten { applied, previous } => Ok(KvWriteOutcome {
                applied,
                previous: previous.map(|blob| Bytes::from(blob.0)),
            }),
            CommandResult::NotLeader { current } => Err(Error::NotLeader {
                election: guard.election.clone(),
                current: current.map(FencingToken::new),
            }),
            other => Err(unexpected(other)),
        }
    }

    async fn kv_read(&self, election: &ElectionName, key: &KvKey) -> Result<Option<Bytes>> {
        self.inner.config.kv_limits.check_key(key)?;
        let value = self
            .inner
            .linearizable(|machine| {
                machine
                    .state
                    .kv
                    .get(election.as_str())
                    .and_then(|store| store.get(key.as_str()))
                    .map(|blob| Bytes::copy_from_slice(&blob.0))
            })
            .await?;
        Ok(value)
    }

    fn watch_members(&self, role: &Role) -> MemberStream {
        let node = self.clone();
        let role = role.clone();
        futures::stream::once(async move { node.member_updates(role.as_str()).await })
            .flat_map(|updates| match updates {
                Ok(updates) => updates
                    .into_stream()
                    .map(|update| update.and_then(member_update_to_event))
                    .boxed(),
                Err(e) => futures::stream::iter([Err(e)]).boxed(),
            })
            .boxed()
    }
}
