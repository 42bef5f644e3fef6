//! The gRPC server of one node: the peer service (Raft RPCs and forwarding) and the
//! client API, on one port.

use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::{Stream, StreamExt};
use ha_core::watch_buffer::WatchReceiver;
use ha_core::{Backend, ElectionName, KvKey, LeaseId, Role};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::command::{Command, NodeId, TypeConfig};
use crate::node::{check_batch_size, NodeInner, PeerFailure, RaftNode};
use crate::proto::coordination_server::{Coordination, CoordinationServer};
use crate::proto::peer_server::{Peer, PeerServer};
use crate::proto::{self, PeerReply, PeerRequest};
use crate::tls::{names_node, node_name, ClientAuth, RaftTls};
use crate::wire::{
    key_from_proto, key_to_proto, kv_outcome_to_proto, kv_read_to_proto, kv_write_from_proto,
    leader_to_proto, member_from_proto, member_to_proto, required, to_status,
};
use crate::wire::{member_update_to_event, update_to_event, WireError};

/// Serves both services on `listener` until `shutdown`.
pub(crate) async fn serve(
    node: Weak<NodeInner>,
    listener: tokio::net::TcpListener,
    tls: Option<RaftTls>,
    auth: ClientAuth,
    shutdown: CancellationToken,
) {
    let Some(limits) = node.upgrade().map(|n| n.message_limits()) else {
        return;
    };
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Each stream may buffer up to a message limit: bound how many one connection has.
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION));
    if let Some(tls) = &tls {
        builder = match builder.tls_config(tls.server_config()) {
            Ok(builder) => builder,
            Err(e) => {
                warn!(error = %e, "raft gRPC server not started: bad TLS configuration");
                return;
            }
        };
    }
    let clients = CoordinationServer::new(ClientService { node: node.clone() })
        .max_decoding_message_size(limits.client)
        .max_encoding_message_size(limits.client);
    let admin = crate::proto::admin_server::AdminServer::new(crate::admin::AdminService {
        node: node.clone(),
        auth: auth.clone(),
    })
    .max_decoding_message_size(crate::admin::MAX_ADMIN_REQUEST);
    let admin_auth = auth.clone();
    let peers = PeerServer::new(PeerService { node: node.clone() })
        .max_decoding_message_size(limits.peer)
        .max_encoding_message_size(limits.peer);
    let result = builder
        .add_service(InterceptedService::new(peers, move |request| {
            peer_gate(&node, request)
        }))
        .add_service(InterceptedService::new(clients, move |request| {
            auth.check(request)
        }))
        .add_service(InterceptedService::new(admin, move |request| {
            admin_auth.check(request)
        }))
        // The builder's tcp_nodelay covers only the listeners it binds itself: set it on
        // ours, or a reply's trailers can wait out the peer's 40 ms delayed ACK.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        )
        .await;
    if let Err(e) = result {
        warn!(error = %e, "raft gRPC server stopped");
    }
}

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

/// Streams one connection may have open at once.
pub(crate) const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Runs before a peer message's body is read: with TLS, the sender's certificate must
/// name a member (`node-<id>`), so a stranger cannot make the node buffer peer-sized
/// messages. Which member it speaks for is checked against the body afterwards.
fn peer_gate(node: &Weak<NodeInner>, request: Request<()>) -> Result<Request<()>, Status> {
    let node = node.upgrade().ok_or_else(gone)?;
    if !node.peers_need_certificates() {
        return Ok(request);
    }
    match request.peer_certs() {
        Some(certs) if node.names_a_peer(&certs) => Ok(request),
        _ => Err(Status::permission_denied(
            "peer messages need a certificate from the cluster CA naming node-<id> of a member",
        )),
    }
}

pub(crate) fn gone() -> Status {
    Status::unavailable("raft node is shutting down")
}

struct PeerService {
    node: Weak<NodeInner>,
}

impl PeerService {
    /// Checks the envelope and decodes the payload.
    fn open<T: DeserializeOwned>(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<(Arc<NodeInner>, NodeId, T), Status> {
        let node = self.node.upgrade().ok_or_else(gone)?;
        let certs = request.peer_certs();
        let request = request.into_inner();
        // With TLS, a peer proves the node id it claims: its client certificate (already
        // verified against the cluster CA) must name `node-<from>`.
        if node.peers_need_certificates()
            && !certs.is_some_and(|certs| names_node(&certs, request.from))
        {
            return Err(Status::permission_denied(format!(
                "the peer's certificate does not name node {} ({}), the node it claims to be",
                request.from,
                node_name(request.from)
            )));
        }
        if request.cluster_id != node.cluster_id() {
            return Err(Status::permission_denied(format!(
                "cluster id mismatch: this node belongs to {:?}, the request to {:?}",
                node.cluster_id(),
                request.cluster_id
            )));
        }
        if !node.knows_peer(request.from) {
            return Err(Status::permission_denied(format!(
                "node {} is not a member of this group",
                request.from
            )));
        }
        let payload = serde_json::from_slice(&request.payload)
            .map_err(|e| Status::invalid_argument(format!("undecodable payload: {e}")))?;
        Ok((node, request.from, payload))
    }
}

/// The vote inside a Raft payload must be the sender's own: a candidate asks votes for
/// itself, a leader replicates as itself. The envelope's `from` is what the certificate
/// proved; a payload naming another node would let one member speak for another.
fn own_vote(from: NodeId, vote: &openraft::Vote<NodeId>) -> Result<(), Status> {
    match vote.leader_id().voted_for() {
        Some(named) if named == from => Ok(()),
        named => Err(Status::permission_denied(format!(
            "node {from} sent a Raft message in the name of node {}",
            named.map_or_else(|| "none".to_owned(), |n| n.to_string())
        ))),
    }
}

fn reply<T: Serialize>(value: &T) -> Result<Response<PeerReply>, Status> {
    serde_json::to_vec(value)
        .map(|payload| Response::new(PeerReply { payload }))
        .map_err(|e| Status::internal(format!("encode reply: {e}")))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn vote(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let (node, from, rpc): (_, _, VoteRequest<NodeId>) = self.open(request)?;
        own_vote(from, &rpc.vote)?;
        reply(&node.raft().vote(rpc).await)
    }

    async fn append_entries(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerReply>, Status> {
        let (node, from, rpc): (_, _, AppendEntriesRequest<TypeConfig>) = self.open(request)?;
        own_vote(from, &rpc.vote)?;
        reply(&node.raft().append_entries(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerReply>, Status> {
        let (node, from, rpc): (_, _, InstallSnapshotRequest<TypeConfig>) = self.open(request)?;
        own_vote(from, &rpc.vote)?;
        reply(&node.raft().install_snapshot(rpc).await)
    }

    async fn propose(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let (node, _, command): (_, _, Command) = self.open(request)?;
        reply(&node.propose_local(command).await)
    }

    async fn keep_alive_batch(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerReply>, Status> {
        let (node, _, leases): (_, _, Vec<u64>) = self.open(request)?;
        check_batch_size(leases.len()).map_err(status)?;
        reply(&node.keep_alive_batch_local(&leases).await)
    }

    async fn read_index(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerReply>, Status> {
        let (node, _, ()): (_, _, ()) = self.open(request)?;
        let result: Result<u64, PeerFailure> = node.read_index_local().await;
        reply(&result)
    }
}

/// The reply metadata that names the Raft leader's address.
pub(crate) const LEADER_METADATA: &str = "ha-raft-leader";

struct ClientService {
    node: Weak<NodeInner>,
}

impl ClientService {
    /// Names the Raft leader in a reply's metadata (`ha-raft-leader`), so that a
    /// client can send its next calls there instead of through this node: a write
    /// through a follower costs a forward, and the follower's apply before it answers.
    fn pinned<T>(&self, reply: Result<Response<T>, Status>) -> Result<Response<T>, Status> {
        let Some(leader) = self.node.upgrade().and_then(|node| match node.target() {
            crate::node::Target::Me { .. } => Some(node.config.advertised()),
            crate::node::Target::Peer { addr, .. } => Some(addr),
            crate::node::Target::Unknown => None,
        }) else {
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
        self.node
            .upgrade()
            .map(RaftNode::from_inner)
            .ok_or_else(gone)
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
            let lease = node
                .register(&member, Duration::from_millis(request.ttl_ms))
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
