//! The full ha-core conformance suite on a 3-node Raft group over loopback, through a
//! follower (so every write is forwarded and every read goes through the read index).
//!
//! The guarded store's value limit is 64 KiB here, not the default 1 MiB: two groups run
//! at once in an unoptimized build, where one 1 MiB entry takes longer to encode than
//! a test heartbeat and replication crawls. `guarded_store.rs` writes 1 MiB values with
//! the default limits.

mod common;

use common::Group;
use ha_core::KvLimits;
use ha_raft::RaftNodeConfig;

fn small_limits() -> KvLimits {
    KvLimits {
        max_value_bytes: 64 << 10,
        ..KvLimits::default()
    }
}

fn small_values(config: RaftNodeConfig) -> RaftNodeConfig {
    config.with_kv_limits(small_limits())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_group_passes_the_conformance_suite_through_a_follower() {
    let report = ha_core::testing::run_suite(|| async {
        let group = Group::start_with(3, small_values).await;
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
        let group = Group::start_with(3, small_values).await;
        let client = ha_raft::RaftClient::connect(group.peers.values().cloned())
            .await?
            .with_kv_limits(small_limits());
        Ok((std::sync::Arc::new(client) as _, group))
    })
    .await;
    report.assert_passed();
}
