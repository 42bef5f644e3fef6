//! The full ha-core conformance suite on a 3-node Raft group over loopback, through a
//! follower (so every write is forwarded and every read goes through the read index).

mod common;

use common::Group;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_group_passes_the_conformance_suite_through_a_follower() {
    let report = ha_core::testing::run_suite(|| async {
        let group = Group::start(3).await;
        let follower = group.follower().await;
        Ok((std::sync::Arc::new(follower) as _, group))
    })
    .await;
    report.assert_passed();
}

/// The same suite through `RaftClient`, a process outside the group, given every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_group_passes_the_conformance_suite_through_a_remote_client() {
    let report = ha_core::testing::run_suite(|| async {
        let group = Group::start(3).await;
        let client = ha_raft::RaftClient::connect(group.peers.values().cloned()).await?;
        Ok((std::sync::Arc::new(client) as _, group))
    })
    .await;
    report.assert_passed();
}
