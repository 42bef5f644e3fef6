//! The client API (`Coordination`): the contract over gRPC, served by the node, each
//! reply naming the Raft leader so a client can go there next.

use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use ha_core::watch_buffer::WatchReceiver;
use ha_core::{Backend, ElectionName, KvKey, LeaseId, Role};
use tonic::{Request, Response, Status};

use crate::net::limits::LEADER_METADATA;
use crate::net::wire::gone;
use crate::net::wire::{
    key_from_proto, key_to_proto, kv_outcome_to_proto, kv_read_to_proto, kv_write_from_proto,
    leader_to_proto, member_from_proto, member_to_proto, required, to_status,
};
use crate::net::wire::{member_update_to_event, update_to_event, WireError};
use crate::node::{RaftNode, WeakNode};
use crate::proto;
use crate::proto::coordination_server::Coordination;
use crate::replica::Target;

/// A hub watcher's updates; one ended for falling behind (a client that stopped
/// reading) ends its stream with `ResourceExhausted`, and `RaftClient` resumes after
/// the last revision it saw.
fn lagging_ends_with_status<T: Send + 'static>(
    updates: WatchReceiver<T>,
) -> impl Stream<Item = Result<T, Status>> {
    updates
        .into_stream()
        .map(|update| update.map_err(|e| Status::resource_exhausted(e.to_string())))
}

pub(super) struct ClientService {
    pub(super) node: WeakNode,
}

impl ClientService {
    /// Names the Raft leader in a reply's metadata (`ha-raft-leader`), so that a
    /// client can send its next calls there instead of through this node: a write
    /// through a follower costs a forward, and the follower's apply before it answers.
    fn pinned<T>(&self, reply: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
        let Some(leader) = self
            .node
            .upgrade()
            .and_then(|node| match node.replica().target() {
                Target::Me { .. } => Some(node.address()),
                Target::Peer { addr, .. } => Some(addr),
                Target::Unknown => None,
            })
        else {
            return reply;
        };
        let Ok(value) = tonic::metadata::MetadataValue::try_from(leader.as_str()) else {
            return reply;
        };
        match reply {
            Ok(mut response) => {
                response.metadata_mut().insert(LEADER_METADATA, value);
                Ok(response)
            }
            Err(mut status) => {
                status.metadata_mut().insert(LEADER_METADATA, value);
                Err(status)
            }
        }
    }

    fn node(&self) -> Result<RaftNode, Status> {
        self.node.upgrade().ok_or_else(gone)
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn status(e: ha_core::Error) -> Status {
    to_status(&e)
}

#[tonic::async_trait]
impl Coordination for ClientService {
    async fn register(
        &self,
        request: Request<proto::RegisterRequest>,
    ) -> Result<Response<proto::RegisterReply>, Status> {
        let reply: Result<Response<proto::RegisterReply>, Status> = async {
            let node = self.node()?;
            let request = request.into_inner();
            let member = member_from_proto(required(request.member, "member").map_err(status)?)
                .map_err(status)?;
            // Not `Backend::register`: a client's session is not this process's.
            let lease = node
                .register_session(&member, Duration::from_millis(request.ttl_ms))
                .await
                .map_err(status)?;
            Ok(Response::new(proto::RegisterReply {
                lease: lease.id.get(),
                ttl_ms: lease.ttl.as_millis() as u64,
            }))
        }
        .await;
        self.pinned(reply)
    }

    async fn keep_alive(
        &self,
        request: Request<proto::LeaseRequest>,
    ) -> Result<Response<proto::KeepAliveReply>, Status> {
        let reply: Result<Response<proto::KeepAliveReply>, Status> = async {
            let ttl = self
                .node()?
                .keep_alive(LeaseId::new(request.into_inner().lease))
                .await
                .map_err(status)?;
            Ok(Response::new(proto::KeepAliveReply {
                ttl_ms: ttl.as_millis() as u64,
            }))
        }
        .await;
        self.pinned(reply)
    }

    async fn keep_alive_batch(
        &self,
        request: Request<proto::KeepAliveBatchRequest>,
    ) -> Result<Response<proto::KeepAliveBatchReply>, Status> {
        let reply: Result<Response<proto::KeepAliveBatchReply>, Status> = async {
            let leases = request.into_inner().leases;
            let renewals = self
                .node()?
                .keep_alive_batch(&leases)
                .await
                .map_err(status)?;
            let mut outcomes = Vec::with_capacity(leases.len());
            for (lease, renewal) in leases.iter().zip(renewals) {
                let (ttl_ms, expired) = match renewal {
                    Ok(ttl_ms) => (ttl_ms, false),
                    Err(WireError::LeaseExpired(_)) => (0, true),
                    // Only an expiry ends one session: anything else fails the call.
                    Err(other) => return Err(status(other.into())),
                };
                outcomes.push(proto::KeepAliveOutcome {
                    lease: *lease,
                    ttl_ms,
                    expired,
                });
            }
            Ok(Response::new(proto::KeepAliveBatchReply { outcomes }))
        }
        .await;
        self.pinned(reply)
    }

    async fn revoke(
        &self,
        request: Request<proto::LeaseRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let reply: Result<Response<proto::Empty>, Status> = async {
            self.node()?
                .revoke(LeaseId::new(request.into_inner().lease))
                .await
                .map_err(status)?;
            Ok(Response::new(proto::Empty {}))
        }
        .await;
        self.pinned(reply)
    }

    async fn campaign(
        &self,
        request: Request<proto::CampaignRequest>,
    ) -> Result<Response<proto::LeaderKey>, Status> {
        let reply: Result<Response<proto::LeaderKey>, Status> = async {
            let node = self.node()?;
            let request = request.into_inner();
            let election = ElectionName::new(request.election).map_err(status)?;
            // If the client goes away, tonic drops this future, which withdraws the candidacy.
            let key = node
                .campaign(LeaseId::new(request.lease), &election, request.value.into())
                .await
                .map_err(status)?;
            Ok(Response::new(key_to_proto(&key)))
        }
        .await;
        self.pinned(reply)
    }

    async fn resign(
        &self,
        request: Request<proto::LeaderKey>,
    ) -> Result<Response<proto::Empty>, Status> {
        let reply: Result<Response<proto::Empty>, Status> = async {
            let key = key_from_proto(request.into_inner()).map_err(status)?;
            self.node()?.resign(&key).await.map_err(status)?;
            Ok(Response::new(proto::Empty {}))
        }
        .await;
        self.pinned(reply)
    }

    async fn proclaim(
        &self,
        request: Request<proto::ProclaimRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let reply: Result<Response<proto::Empty>, Status> = async {
            let request = request.into_inner();
            let key =
                key_from_proto(required(request.key, "key").map_err(status)?).map_err(status)?;
            self.node()?
                .proclaim(&key, request.value.into())
                .await
                .map_err(status)?;
            Ok(Response::new(proto::Empty {}))
        }
        .await;
        self.pinned(reply)
    }

    async fn kv_write(
        &self,
        request: Request<proto::KvWriteRequest>,
    ) -> Result<Response<proto::KvWriteReply>, Status> {
        let reply: Result<Response<proto::KvWriteReply>, Status> = async {
            let (guard, write) = kv_write_from_proto(request.into_inner()).map_err(status)?;
            let outcome = self.node()?.kv_write(&guard, write).await.map_err(status)?;
            Ok(Response::new(kv_outcome_to_proto(&outcome)))
        }
        .await;
        self.pinned(reply)
    }

    async fn kv_read(
        &self,
        request: Request<proto::KvReadRequest>,
    ) -> Result<Response<proto::KvReadReply>, Status> {
        let reply: Result<Response<proto::KvReadReply>, Status> = async {
            let request = request.into_inner();
            let election = ElectionName::new(request.election).map_err(status)?;
            let key = KvKey::new(request.key).map_err(status)?;
            let value = self
                .node()?
                .kv_read(&election, &key)
                .await
                .map_err(status)?;
            Ok(Response::new(kv_read_to_proto(value.as_ref())))
        }
        .await;
        self.pinned(reply)
    }

    async fn leader(
        &self,
        request: Request<proto::ElectionRequest>,
    ) -> Result<Response<proto::LeaderReply>, Status> {
        let reply: Result<Response<proto::LeaderReply>, Status> = async {
            let election = ElectionName::new(request.into_inner().election).map_err(status)?;
            let leader = self.node()?.leader(&election).await.map_err(status)?;
            Ok(Response::new(proto::LeaderReply {
                leader: leader.as_ref().map(leader_to_proto),
            }))
        }
        .await;
        self.pinned(reply)
    }

    type WatchStream = EventStream<proto::LeaderEvent>;

    async fn watch(
        &self,
        request: Request<proto::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        let election = ElectionName::new(request.election).map_err(status)?;
        let updates = self
            .node()?
            .watch_updates(election.as_str(), request.after_revision)
            .await
            .map_err(status)?;
        let stream = lagging_ends_with_status(updates).map(move |update| {
            let update = update?;
            let revision = update.revision;
            let event = update_to_event(&election, update);
            Ok(proto::LeaderEvent {
                revision,
                leader: event.leader().map(leader_to_proto),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn members(
        &self,
        request: Request<proto::RoleRequest>,
    ) -> Result<Response<proto::MembersReply>, Status> {
        let reply: Result<Response<proto::MembersReply>, Status> = async {
            let role = Role::new(request.into_inner().role).map_err(status)?;
            let members = self.node()?.members(&role).await.map_err(status)?;
            Ok(Response::new(proto::MembersReply {
                members: members.iter().map(member_to_proto).collect(),
            }))
        }
        .await;
        self.pinned(reply)
    }

    type WatchMembersStream = EventStream<proto::MemberEvent>;

    async fn watch_members(
        &self,
        request: Request<proto::RoleRequest>,
    ) -> Result<Response<Self::WatchMembersStream>, Status> {
        let role = Role::new(request.into_inner().role).map_err(status)?;
        let updates = self
            .node()?
            .member_updates(role.as_str())
            .await
            .map_err(status)?;
        let stream = lagging_ends_with_status(updates).map(|update| {
            use proto::member_event::Kind;
            let (kind, members) = match member_update_to_event(update?).map_err(status)? {
                ha_core::MemberEvent::Snapshot(members) => (Kind::Snapshot, members),
                ha_core::MemberEvent::Joined(member) => (Kind::Joined, vec![member]),
                ha_core::MemberEvent::Left(member) => (Kind::Left, vec![member]),
            };
            Ok(proto::MemberEvent {
                kind: kind as i32,
                members: members.iter().map(member_to_proto).collect(),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
