//! Keepalives batched over real sockets: a `RaftClient` connected to a follower only
//! (so every batch is forwarded to the leader), many sessions renewed at once, each
//! with its own result; an oversize batch is refused with a typed error.

mod common;

use std::time::Duration;

use common::Group;
use ha_core::{Backend, Error, Member, Role, ServerId};
use ha_raft::proto::coordination_client::CoordinationClient;
use ha_raft::proto::KeepAliveBatchRequest;
use ha_raft::RaftClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_keepalives_through_a_follower_each_get_their_own_result() {
    let group = Group::start(3).await;
    let follower = group.follower().await;
    let endpoint = follower.address();
    let client = RaftClient::connect([endpoint.clone()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let role = Role::new("batched").unwrap_or_else(|e| panic!("{e}"));
    let ttl = Duration::from_secs(5);
    let mut leases = Vec::new();
    for id in 0..300u64 {
        let member = Member::new(ServerId::new(id), role.clone(), "");
        let lease = client
            .register(&member, ttl)
            .await
            .unwrap_or_else(|e| panic!("register {id}: {e}"));
        leases.push(lease.id);
    }
    let gone = leases[7];
    client.revoke(gone).await.unwrap_or_else(|e| panic!("{e}"));

    for round in 0..3 {
        let renewals = futures::future::join_all(leases.iter().map(|lease| {
            let client = client.clone();
            let lease = *lease;
            async move { (lease, client.keep_alive(lease).await) }
        }))
        .await;
        for (lease, renewal) in renewals {
            if lease == gone {
                assert!(
                    matches!(renewal, Err(Error::LeaseExpired { lease: l }) if l == gone),
                    "round {round}: the revoked lease {lease}: {renewal:?}"
                );
            } else {
                assert_eq!(
                    renewal.as_ref().ok(),
                    Some(&ttl),
                    "round {round}: lease {lease}: {renewal:?}"
                );
            }
        }
    }

    // More leases than one batch may carry: refused, saying why.
    let mut raw = CoordinationClient::connect(format!("http://{endpoint}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = raw
        .keep_alive_batch(KeepAliveBatchRequest {
            leases: (1..=5000).collect(),
        })
        .await
        .err()
        .unwrap_or_else(|| panic!("a batch of 5000 leases was served"));
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("at most 4096"), "{status:?}");
    // An empty batch is answered with nothing.
    let reply = raw
        .keep_alive_batch(KeepAliveBatchRequest { leases: vec![] })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(reply.into_inner().outcomes.is_empty());
    group.shutdown().await;
}
