//! The `Admin` gRPC service: status for anyone the client API admits; membership
//! changes, leave requests and snapshots only for a member's certificate or the admin
//! token.

use serde::Serialize;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::admin::membership::MembershipChange;
use crate::admin::AdminError;
use crate::data::command::NodeId;
use crate::net::tls::ClientAuth;
use crate::net::wire::gone;
use crate::node::{RaftNode, WeakNode};
use crate::proto::admin_server::Admin;
use crate::proto::{AdminReply, AdminRequest};

/// The `Admin` gRPC service of one node.
pub(super) struct AdminService {
    pub(super) node: WeakNode,
    pub(super) auth: ClientAuth,
}

fn reply<T: Serialize>(value: &T) -> Result<Response<AdminReply>, Status> {
    serde_json::to_vec(value)
        .map(|payload| Response::new(AdminReply { payload }))
        .map_err(|e| Status::internal(format!("encode reply: {e}")))
}

impl AdminService {
    /// The node, once the request's credentials may change its group: a node
    /// certificate of a member (or of `about`, the node a change concerns), or the
    /// admin token.
    fn authorized(
        &self,
        request: &Request<AdminRequest>,
        about: Option<NodeId>,
    ) -> Result<RaftNode, Status> {
        let node = self.node.upgrade().ok_or_else(gone)?;
        let status = node.status_now();
        let members = status.voters.keys().chain(status.learners.keys()).copied();
        self.auth
            .may_change_membership(request, members.chain(about))?;
        Ok(node)
    }

    /// The membership change a request carries, once its credentials allow it.
    fn authorized_change(
        &self,
        request: &Request<AdminRequest>,
    ) -> Result<(RaftNode, MembershipChange), Status> {
        let change: MembershipChange =
            serde_json::from_slice(&request.get_ref().payload).map_err(|e| {
                AdminError::InvalidArgument(format!("not a membership change: {e}")).to_status()
            })?;
        let node = self.authorized(request, Some(change.subject()))?;
        Ok((node, change))
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        _request: Request<AdminRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let node = self.node.upgrade().ok_or_else(gone)?;
        reply(&node.status().await)
    }

    async fn change_membership(
        &self,
        request: Request<AdminRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let (node, change) = self.authorized_change(&request)?;
        match node.change_membership(&change).await {
            Ok(report) => reply(&report),
            Err(e) => Err(e.to_status()),
        }
    }

    async fn check_membership(
        &self,
        request: Request<AdminRequest>,
    ) -> Result<Response<AdminReply>, Status> {
        let (node, change) = self.authorized_change(&request)?;
        match node.check_membership(&change).await {
            Ok(()) => reply(&()),
            Err(e) => Err(e.to_status()),
        }
    }

    async fn leave(&self, request: Request<AdminRequest>) -> Result<Response<AdminReply>, Status> {
        let node = self.authorized(&request, None)?;
        reply(&node.ask_to_leave())
    }

    type SnapshotStream = futures::stream::Iter<std::vec::IntoIter<Result<AdminReply, Status>>>;

    async fn snapshot(
        &self,
        request: Request<AdminRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        // The guarded stores are in it: the same credentials as a membership change.
        let node = self.authorized(&request, None)?;
        let (header, bytes) = node.snapshot_image().await.map_err(|e| e.to_status())?;
        let header = serde_json::to_vec(&header)
            .map_err(|e| Status::internal(format!("encode the header: {e}")))?;
        info!(node = node.id(), bytes = bytes.len(), "serving a snapshot");
        let messages: Vec<Result<AdminReply, Status>> = std::iter::once(header)
            .chain(
                bytes
                    .chunks(crate::backup::file::CHUNK_BYTES)
                    .map(<[u8]>::to_vec),
            )
            .map(|payload| Ok(AdminReply { payload }))
            .collect();
        Ok(Response::new(futures::stream::iter(messages)))
    }
}
