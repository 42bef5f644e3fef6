//! The contract over a `RaftClient`'s connections.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use ha_core::watch_buffer::{self, WATCH_BUFFER};
use ha_core::{
    Backend, Capabilities, ElectionName, Error, KvKey, KvWrite, KvWriteOutcome, Leader, LeaderKey,
    LeaderStream, Lease, LeaseId, Member, MemberStream, RecordLimits, Result, Role,
};
use tokio::time::sleep;

use super::connection::{transient, RaftClient, Repeat};
use super::keepalives;
use super::watch::{follow_leader, follow_members};
use crate::config::MIN_TTL;
use crate::net::wire::{
    from_status, key_from_proto, key_to_proto, kv_outcome_from_proto, kv_read_from_proto,
    kv_write_to_proto, leader_from_proto, member_from_proto, member_to_proto,
};
use crate::proto;

#[async_trait]
impl Backend for RaftClient {
    fn name(&self) -> &'static str {
        "raft"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::new(MIN_TTL).with_kv_limits(self.kv_limits)
    }

    async fn register(&self, member: &Member, ttl: Duration) -> Result<Lease> {
        self.capabilities().check_ttl(ttl)?;
        RecordLimits::DEFAULT.check_member(member)?;
        self.inner.set.note_ttl(ttl);
        let request = proto::RegisterRequest {
            member: Some(member_to_proto(member)),
            ttl_ms: ttl.as_millis() as u64,
        };
        let reply = self
            .call_status(Repeat::NotAfterTimeout, |mut c| {
                let request = request.clone();
                async move { c.register(request).await }
            })
            .await
            .map_err(|failure| failure.error("register"))?
            .into_inner();
        Ok(Lease {
            id: LeaseId::new(reply.lease),
            ttl: Duration::from_millis(reply.ttl_ms),
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let result = self.queue_keep_alive(lease.get());
        // The call inside is bounded by the request timeout; this bounds the wait for
        // the batch to be sent too.
        let patience = self.inner.request_timeout + keepalives::PACE * 2;
        match tokio::time::timeout(patience, result).await {
            Ok(Ok(renewal)) => renewal,
            Ok(Err(_)) => Err(Error::Unavailable(
                "the keepalive batcher stopped (its runtime shut down)".into(),
            )),
            Err(_) => Err(Error::Timeout {
                operation: "keep_alive",
                after: patience,
            }),
        }
    }

    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.call(
            |mut c| async move { c.revoke(proto::LeaseRequest { lease: lease.get() }).await },
        )
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
        let request = proto::CampaignRequest {
            lease: lease.get(),
            election: election.as_str().to_owned(),
            value: value.to_vec(),
        };
        // No overall timeout: a campaign waits in line as long as it takes. A broken
        // connection, or an endpoint found dead while waiting, resumes the same
        // candidacy elsewhere (campaign is idempotent per lease and election, and the
        // abandoned call's withdrawal spares a resumed candidacy); dropping this future
        // cancels the call, and the serving node withdraws the candidacy.
        loop {
            let (at, mut client, _slot) = self.held_client()?;
            let reply = tokio::select! {
                biased;
                () = self.failed_since(at) => continue,
                reply = client.campaign(request.clone()) => reply,
            };
            match reply {
                Ok(reply) => {
                    self.follow_hint(reply.metadata());
                    return key_from_proto(reply.into_inner());
                }
                Err(status) if transient(&status) => {
                    self.leave(at, status.message());
                    sleep(Duration::from_millis(100)).await;
                }
                Err(status) => return Err(from_status(&status)),
            }
        }
    }

    async fn resign(&self, key: &LeaderKey) -> Result<()> {
        let request = key_to_proto(key);
        self.call(|mut c| {
            let request = request.clone();
            async move { c.resign(request).await }
        })
        .await?;
        Ok(())
    }

    async fn proclaim(&self, key: &LeaderKey, value: Bytes) -> Result<()> {
        RecordLimits::DEFAULT.check_leader_value(&value)?;
        let request = proto::ProclaimRequest {
            key: Some(key_to_proto(key)),
            value: value.to_vec(),
        };
        self.call(|mut c| {
            let request = request.clone();
            async move { c.proclaim(request).await }
        })
        .await?;
        Ok(())
    }

    async fn leader(&self, election: &ElectionName) -> Result<Option<Leader>> {
        let request = proto::ElectionRequest {
            election: election.as_str().to_owned(),
        };
        let reply = self
            .call(|mut c| {
                let request = request.clone();
                async move { c.leader(request).await }
            })
            .await?
            .into_inner();
        reply.leader.map(leader_from_proto).transpose()
    }

    async fn kv_write(&self, guard: &LeaderKey, write: KvWrite) -> Result<KvWriteOutcome> {
        self.kv_limits.check(&write)?;
        let request = kv_write_to_proto(guard, &write);
        // One attempt: a write that failed in transit may have been applied, and a retry
        // would report on that instead of on itself. The caller learns the outcome is
        // unknown; the next call goes to the next endpoint.
        let (at, mut client) = self.client();
        let timeout = self.inner.request_timeout;
        match tokio::time::timeout(timeout, client.kv_write(request)).await {
            Ok(Ok(reply)) => Ok(kv_outcome_from_proto(reply.into_inner())),
            Ok(Err(status)) => {
                if transient(&status) {
                    self.leave(at, status.message());
                }
                Err(from_status(&status))
            }
            Err(_) => {
                self.leave(at, "no answer to a guarded write");
                Err(Error::Timeout {
                    operation: "kv_write",
                    after: timeout,
                })
            }
        }
    }

    async fn kv_read(&self, election: &ElectionName, key: &KvKey) -> Result<Option<Bytes>> {
        self.kv_limits.check_key(key)?;
        let request = proto::KvReadRequest {
            election: election.as_str().to_owned(),
            key: key.as_str().to_owned(),
        };
        let reply = self
            .call(|mut c| {
                let request = request.clone();
                async move { c.kv_read(request).await }
            })
            .await?
            .into_inner();
        Ok(kv_read_from_proto(reply))
    }

    fn watch(&self, election: &ElectionName) -> LeaderStream {
        let (tx, rx) = watch_buffer::channel(WATCH_BUFFER);
        tokio::spawn(follow_leader(self.clone(), election.clone(), tx));
        // A reader that stopped reading gets `WatchLagged` after what was buffered (its
        // follower task ended) and watches again.
        rx.into_flat_stream()
    }

    async fn members(&self, role: &Role) -> Result<Vec<Member>> {
        let request = proto::RoleRequest {
            role: role.as_str().to_owned(),
        };
        let reply = self
            .call(|mut c| {
                let request = request.clone();
                async move { c.members(request).await }
            })
            .await?
            .into_inner();
        reply.members.into_iter().map(member_from_proto).collect()
    }

    fn watch_members(&self, role: &Role) -> MemberStream {
        let (tx, rx) = watch_buffer::channel(WATCH_BUFFER);
        tokio::spawn(follow_members(self.clone(), role.clone(), tx));
        rx.into_flat_stream()
    }
}
