//! The peer service: Raft's RPCs and the requests a follower forwards to the leader,
//! each checked against the sender's certificate and the group before it is served.

use std::sync::{Arc, Weak};

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use crate::data::command::{Command, NodeId, TypeConfig};
use crate::data::level::LevelReport;
use crate::net::limits::check_batch_size;
use crate::net::tls::{names_node, node_name};
use crate::net::wire::{gone, to_status, ElectRequest, PeerFailure};
use crate::proto::peer_server::Peer;
use crate::proto::{PeerReply, PeerRequest};
use crate::replica::Replica;

pub(super) struct PeerService {
    pub(super) replica: Weak<Replica>,
}

impl PeerService {
    /// Checks the envelope and decodes the payload.
    fn open<T: DeserializeOwned>(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<(Arc<Replica>, NodeId, T), Status> {
        let node = self.replica.upgrade().ok_or_else(gone)?;
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
        reply(&node.raft.vote(rpc).await)
    }

    async fn append_entries(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerReply>, Status> {
        let (node, from, rpc): (_, _, AppendEntriesRequest<TypeConfig>) = self.open(request)?;
        own_vote(from, &rpc.vote)?;
        reply(&node.raft.append_entries(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerReply>, Status> {
        let (node, from, rpc): (_, _, InstallSnapshotRequest<TypeConfig>) = self.open(request)?;
        own_vote(from, &rpc.vote)?;
        reply(&node.raft.install_snapshot(rpc).await)
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
        check_batch_size(leases.len()).map_err(|e| to_status(&e))?;
        reply(&node.keep_alive_batch_local(&leases).await)
    }

    async fn elect(&self, request: Request<PeerRequest>) -> Result<Response<PeerReply>, Status> {
        let (node, from, asked): (_, _, ElectRequest) = self.open(request)?;
        reply(&node.elect_when_asked(from, asked).await)
    }

    async fn feature_level(
        &self,
        request: Request<PeerRequest>,
    ) -> Result<Response<PeerReply>, Status> {
        let (node, _, ()): (_, _, ()) = self.open(request)?;
        reply(&LevelReport {
            serves: node.sm.serves(),
        })
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
