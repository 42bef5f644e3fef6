//! The gRPC server of one node, on one port: the peer service (Raft RPCs and
//! forwarded requests, served by the replica), the client API and the admin API
//! (served by the node).

mod admin;
mod coordination;
mod peer;

use std::sync::Weak;

use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Status};
use tracing::warn;

use crate::net::limits::{MAX_ADMIN_REQUEST, MAX_STREAMS_PER_CONNECTION};
use crate::net::tls::{ClientAuth, RaftTls};
use crate::net::wire::gone;
use crate::node::WeakNode;
use crate::proto::admin_server::AdminServer;
use crate::proto::coordination_server::CoordinationServer;
use crate::proto::peer_server::PeerServer;
use crate::replica::Replica;
use admin::AdminService;
use coordination::ClientService;
use peer::PeerService;

/// Serves the three services on `listener` until `shutdown`.
pub(crate) async fn serve(
    replica: Weak<Replica>,
    node: WeakNode,
    listener: tokio::net::TcpListener,
    tls: Option<RaftTls>,
    auth: ClientAuth,
    shutdown: CancellationToken,
) {
    let Some(limits) = replica.upgrade().map(|r| r.message_limits()) else {
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
    let admin = AdminServer::new(AdminService {
        node,
        auth: auth.clone(),
    })
    .max_decoding_message_size(MAX_ADMIN_REQUEST);
    let admin_auth = auth.clone();
    let peers = PeerServer::new(PeerService {
        replica: replica.clone(),
    })
    .max_decoding_message_size(limits.peer)
    .max_encoding_message_size(limits.peer);
    let result = builder
        .add_service(InterceptedService::new(peers, move |request| {
            peer_gate(&replica, request)
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

/// Runs before a peer message's body is read: with TLS, the sender's certificate must
/// name a member (`node-<id>`), so a stranger cannot make the node buffer peer-sized
/// messages. Which member it speaks for is checked against the body afterwards.
fn peer_gate(replica: &Weak<Replica>, request: Request<()>) -> Result<Request<()>, Status> {
    let replica = replica.upgrade().ok_or_else(gone)?;
    if !replica.peers_need_certificates() {
        return Ok(request);
    }
    match request.peer_certs() {
        Some(certs) if replica.names_a_peer(&certs) => Ok(request),
        _ => Err(Status::permission_denied(
            "peer messages need a certificate from the cluster CA naming node-<id> of a member",
        )),
    }
}
