//! The replica handle: what serving the log on this member needs, and the answers it
//! gives on its own (local proposals, reads and keepalives on the leader, where the
//! leader is).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::Arc;

use ha_core::{Error, Result};
use openraft::ServerState;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{MessageLimits, RaftNodeConfig};
use crate::data::command::{Command, CommandResult, NodeId, Raft};
use crate::net::wire::{ElectRequest, PeerFailure, WireError};
use crate::store::sled_machine::{Machine, StateMachineStore};

use super::hosted::Hosted;
use super::lessor::{Confirmer, Lessor};
use super::proposer::Proposer;

/// Where requests that need the leader go right now.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Me { term: u64 },
    Peer { id: NodeId, addr: String },
    Unknown,
}

/// The narrow handle below the node; see the module documentation.
pub(crate) struct Replica {
    pub(crate) config: RaftNodeConfig,
    pub(crate) raft: Raft,
    pub(crate) sm: StateMachineStore,
    pub(crate) lessor: Lessor,
    pub(super) confirmer: Confirmer,
    proposer: Proposer,
    /// The leases of sessions in this process.
    pub(crate) hosted: Hosted,
    /// Raft leadership moves this member made away from an in-process ACTIVE.
    pub(crate) placement_moves: AtomicU64,
    /// The feature level the group writes at, as far as this member knows (0: not
    /// known yet): what its proposer may write while it leads (see `node::levels`).
    pub(crate) writes_at: Arc<AtomicU32>,
    pub(crate) shutdown: CancellationToken,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("id", &self.config.id)
            .field("cluster_id", &self.config.cluster_id)
            .finish_non_exhaustive()
    }
}

impl Replica {
    /// The replica over a started Raft, with its confirmer and proposer running; the
    /// tasks are the caller's to stop.
    pub(crate) fn new(
        config: RaftNodeConfig,
        raft: Raft,
        sm: StateMachineStore,
    ) -> (Arc<Self>, Vec<JoinHandle<()>>) {
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
        // What the data dir recorded is safe from the start: no member below it runs.
        let writes_at = Arc::new(AtomicU32::new(sm.recorded_level()));
        let (proposer, propose_task) =
            Proposer::spawn(raft.clone(), config.request_timeout, Arc::clone(&writes_at));
        let replica = Arc::new(Self {
            config,
            raft,
            sm,
            lessor: Lessor::default(),
            confirmer,
            proposer,
            hosted: Hosted::default(),
            placement_moves: AtomicU64::new(0),
            writes_at,
            shutdown: CancellationToken::new(),
        });
        (replica, vec![confirm_task, propose_task])
    }

    /// Where requests that need the leader go now, as this member knows it.
    pub(crate) fn target(&self) -> Target {
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

    /// Appends a command on this node, which believes it leads, in an entry of its own
    /// or batched with others proposed meanwhile.
    pub(crate) async fn propose_local(
        &self,
        command: Command,
    ) -> std::result::Result<(u64, CommandResult), PeerFailure> {
        if matches!(command, Command::Batch(_)) {
            // Batches are the proposer's own; one from a peer is refused, not nested.
            return Err(PeerFailure::Error(WireError::InvalidArgument {
                what: "command".into(),
                reason: "a batch cannot be proposed, only its commands".into(),
            }));
        }
        self.proposer.propose(command).await
    }

    /// The elections whose ACTIVE runs in this process, as this member has applied them.
    pub(crate) fn active_here(&self) -> Vec<String> {
        self.hosted.active_elections(&self.sm.lock().state)
    }

    /// Calls an election now because `from`, the leader this node follows, asked it to
    /// (it stops, or placement moves its leadership here), once this node's log reaches
    /// the leader's last entry: a leader granting a vote to a log behind its own would
    /// refuse it anyway. Waits for that entry at most one heartbeat interval.
    pub(crate) async fn elect_when_asked(
        &self,
        from: NodeId,
        request: ElectRequest,
    ) -> std::result::Result<(), PeerFailure> {
        let unavailable = |reason: String| Err(PeerFailure::Error(WireError::Unavailable(reason)));
        let mut metrics = self.raft.metrics();
        if metrics.borrow().current_leader != Some(from) {
            return Err(PeerFailure::NotLeader);
        }
        let caught_up = |m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>| {
            m.last_log_index.unwrap_or(0) >= request.caught_up_to
        };
        let waited = matches!(
            tokio::time::timeout(self.config.heartbeat_interval, metrics.wait_for(caught_up)).await,
            Ok(Ok(_))
        );
        if !waited {
            let last_log = self.raft.metrics().borrow().last_log_index.unwrap_or(0);
            return unavailable(format!(
                "node {} has the log up to {last_log}, not yet {}",
                self.config.id, request.caught_up_to
            ));
        }
        if request.unless_hosting_active {
            let here = self.active_here();
            if !here.is_empty() {
                return unavailable(format!(
                    "node {} hosts the ACTIVE of {here:?}",
                    self.config.id
                ));
            }
        }
        if self.raft.metrics().borrow().current_leader != Some(from) {
            return Err(PeerFailure::NotLeader);
        }
        info!(
            node = self.config.id,
            from,
            placement = request.unless_hosting_active,
            "the leader hands its leadership over: calling an election"
        );
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| PeerFailure::Error(WireError::Unavailable(e.to_string())))
    }

    /// The leader's read index, on this node, which believes it leads.
    pub(crate) async fn read_index_local(&self) -> std::result::Result<u64, PeerFailure> {
        match tokio::time::timeout(self.config.request_timeout, self.raft.get_read_log_id()).await {
            Ok(Ok((read, _applied))) => Ok(read.map_or(0, |l| l.index)),
            _ => Err(PeerFailure::NotLeader),
        }
    }

    /// Waits until this node has applied `index`, then reads under the state lock.
    pub(crate) async fn read_at<T>(
        &self,
        index: u64,
        read: impl FnOnce(&mut Machine) -> T,
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

    pub(crate) fn cluster_id(&self) -> &str {
        &self.config.cluster_id
    }

    /// Whether peers must prove their node id with a certificate.
    pub(crate) fn peers_need_certificates(&self) -> bool {
        self.config.tls.is_some()
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
        ids.iter().any(|id| crate::net::tls::names_node(certs, *id))
    }

    /// The largest message each service decodes.
    pub(crate) fn message_limits(&self) -> MessageLimits {
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
