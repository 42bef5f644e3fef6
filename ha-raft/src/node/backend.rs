//! `impl Backend for RaftNode`: the contract on top of the node's routing, and the
//! local leader watch.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use ha_core::watch_buffer::WatchReceiver;
use ha_core::{
    Backend, Capabilities, ElectionName, Error, FencingToken, KvKey, KvWrite, KvWriteOutcome,
    Leader, LeaderKey, LeaderStream, Lease, LeaseId, Member, MemberStream, RecordLimits, Result,
    Role, WithdrawOnDrop,
};
use tracing::warn;

use crate::config::MIN_TTL;
use crate::data::command::{Command, CommandResult, KvOp, MemberRecord};
use crate::data::hub::LeaderUpdate;
use crate::error::RaftBackendError;

use super::RaftNode;
use crate::net::wire::{head_to_leader, member_update_to_event, update_to_event};

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

fn unexpected(result: CommandResult) -> Error {
    RaftBackendError::Corrupt(format!("unexpected command result {result:?}")).into()
}

impl RaftNode {
    /// Registers a session, for a caller in this process or one of the client API's.
    pub(crate) async fn register_session(&self, member: &Member, ttl: Duration) -> Result<Lease> {
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
}

#[async_trait]
impl Backend for RaftNode {
    fn name(&self) -> &'static str {
        "raft"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(MIN_TTL).with_kv_limits(self.inner.replica.config.kv_limits)
    }

    async fn register(&self, member: &Member, ttl: Duration) -> Result<Lease> {
        let lease = self.register_session(member, ttl).await?;
        // A session of this very process: what placement keeps the Raft leader from.
        self.inner.replica.hosted.add(lease.id.get());
        Ok(lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        match self.inner.keep_alive_batch(&[lease.get()]).await?.pop() {
            Some(Ok(ttl_ms)) => Ok(Duration::from_millis(ttl_ms)),
            Some(Err(error)) => Err(error.into()),
            None => {
                Err(RaftBackendError::Corrupt("a keepalive answered with nothing".into()).into())
            }
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.inner
            .propose(Command::Revoke { lease: lease.get() })
            .await?;
        self.inner.replica.hosted.remove(lease.get());
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
        let (index, token, attempt) = match self.inner.propose(command).await? {
            (index, CommandResult::Campaigned { token, attempt }) => (index, token, attempt),
            (_, CommandResult::LeaseExpired) => return Err(Error::LeaseExpired { lease }),
            (_, other) => return Err(unexpected(other)),
        };
        let key = LeaderKey {
            election: election.clone(),
            lease,
            token: FencingToken::new(token),
        };
        let mut guard = {
            let node = Arc::clone(&self.inner);
            // Only this call's candidacy: if the client campaigned again elsewhere since
            // (it gave up on this call), this withdrawal must not undo that.
            let command = Command::Resign {
                election: election.as_str().to_owned(),
                lease: lease.get(),
                token,
                attempt: (attempt > 0).then_some(attempt),
            };
            WithdrawOnDrop::new(async move {
                if let Err(e) = node.propose(command).await {
                    warn!(node = node.replica.config.id, error = %e, "withdrawing a dropped campaign failed");
                }
            })
        };
        let mut applied = self.inner.replica.sm.applied();
        loop {
            {
                let machine = self.inner.replica.sm.lock();
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
                () = self.inner.replica.shutdown.cancelled() => {
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
                attempt: None,
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
        self.inner.replica.config.kv_limits.check(&write)?;
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
        self.inner.replica.config.kv_limits.check_key(key)?;
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
