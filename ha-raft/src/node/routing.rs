//! Requests that need the leader: where they go now (this node or a peer), retried
//! until the request timeout, forwarded one hop, and served locally when they arrive
//! from a peer.

use std::future::Future;
use std::time::Duration;

use ha_core::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::{sleep, Instant};
use tracing::debug;

use crate::data::command::{Command, CommandResult, NodeId};
use crate::net::network::{PeerError, PeerRpc};
use crate::net::wire::PeerFailure;
use crate::replica::Target;
use crate::store::sled_machine::Machine;

use super::NodeInner;

/// One attempt at something that needs the leader.
pub(super) enum Attempt<T> {
    Done(Result<T>),
    Retry(String),
}

impl NodeInner {
    /// Runs `attempt` against the current leader until it is done or the request
    /// timeout passes.
    pub(super) async fn with_leader<T, F, Fut>(
        &self,
        operation: &'static str,
        mut attempt: F,
    ) -> Result<T>
    where
        F: FnMut(Target) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let deadline = Instant::now() + self.replica.config.request_timeout;
        let mut metrics = self.replica.raft.metrics();
        loop {
            if let Some(failure) = crate::replica::core_failure(&self.replica) {
                return Err(failure.into());
            }
            if self.replica.shutdown.is_cancelled() {
                return Err(Error::Unavailable(format!(
                    "raft node {} is shut down",
                    self.replica.config.id
                )));
            }
            let target = self.replica.target();
            tracing::trace!(node = self.replica.config.id, operation, ?target, "attempt");
            let reason = match attempt(target).await {
                Attempt::Done(result) => return result,
                Attempt::Retry(reason) => reason,
            };
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "{operation}: no Raft leader reachable within {:?} ({reason})",
                    self.replica.config.request_timeout
                )));
            }
            debug!(
                node = self.replica.config.id,
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
    pub(super) async fn propose(&self, command: Command) -> Result<(u64, CommandResult)> {
        // Lease and election commands are idempotent: retried after an unknown outcome
        // they do no harm. A Register retried could meet its own first attempt, and a
        // guarded write retried would report on itself (a compare-and-set that applied
        // would come back as a mismatch), so those surface the unknown outcome instead.
        let idempotent = !matches!(command, Command::Register { .. } | Command::KvWrite { .. });
        self.with_leader("propose", |target| {
            let command = command.clone();
            async move {
                match target {
                    Target::Me { .. } => match self.replica.propose_local(command).await {
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
    pub(super) async fn forward<Req: Serialize, T: DeserializeOwned>(
        &self,
        id: NodeId,
        addr: &str,
        rpc: PeerRpc,
        request: &Req,
        idempotent: bool,
    ) -> Attempt<T> {
        let call = self
            .pool
            .call(id, addr, rpc, request, self.replica.config.request_timeout);
        // A leader that went silent holds the call until its timeout; once this node
        // learns of another leader, the call is given up (asked again there, or its
        // outcome unknown) instead of waiting it out.
        let reply: std::result::Result<std::result::Result<T, PeerFailure>, PeerError> = tokio::select! {
            reply = call => reply,
            () = self.leader_moved_from(id) => {
                return if idempotent {
                    Attempt::Retry(format!("the leader moved from node {id} during the call"))
                } else {
                    Attempt::Done(Err(Error::Unavailable(format!(
                        "the leader moved from node {id} while the request was forwarded to it: it may or may not have been applied"
                    ))))
                };
            }
        };
        match reply {
            Ok(Ok(value)) => Attempt::Done(Ok(value)),
            Ok(Err(PeerFailure::Error(e))) => Attempt::Done(Err(e.into())),
            Ok(Err(PeerFailure::NotLeader)) => Attempt::Retry(format!("node {id} is not leader")),
            Err(e @ PeerError::Unreachable { .. }) => Attempt::Retry(e.to_string()),
            Err(e @ PeerError::Failed { .. }) if idempotent => Attempt::Retry(e.to_string()),
            Err(e) => Attempt::Done(Err(Error::Unavailable(e.to_string()))),
        }
    }

    /// Resolves once this node knows a leader other than `id` (pending while it knows
    /// none, or `id`).
    async fn leader_moved_from(&self, id: NodeId) {
        let mut metrics = self.replica.raft.metrics();
        loop {
            let leader = metrics.borrow_and_update().current_leader;
            if leader.is_some_and(|leader| leader != id) {
                return;
            }
            if metrics.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// A linearizable read: the leader's read index, then this node's state.
    pub(super) async fn linearizable<T>(&self, read: impl FnOnce(&mut Machine) -> T) -> Result<T> {
        let index = self.read_index().await?;
        self.replica.read_at(index, read).await
    }

    /// The leader's read index: every change completed before this call is at or below it.
    pub(crate) async fn read_index(&self) -> Result<u64> {
        self.with_leader("read_index", |target| async move {
            match target {
                Target::Me { .. } => {
                    match tokio::time::timeout(
                        self.replica.config.request_timeout,
                        self.replica.raft.ensure_linearizable(),
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
