//! The guarded store at its default limits on a real group: a 1 MiB value (the default
//! limit) written through a follower, then the whole group stopped and started again
//! from its sled dirs, with the entry once in the log and once inside a snapshot:
//! nothing acknowledged is lost.

mod common;

use std::time::Duration;

use common::Group;
use ha_core::{Backend, Bytes, ElectionName, KvKey, KvLimits, KvWrite};
use ha_raft::RaftNodeConfig;

fn key(k: &str) -> KvKey {
    KvKey::new(k).unwrap_or_else(|e| panic!("{e}"))
}

async fn write_restart_read(tweak: fn(RaftNodeConfig) -> RaftNodeConfig, entries: usize) {
    let mut group = Group::start_with(3, tweak).await;
    let node = group.follower().await;
    assert_eq!(node.capabilities().kv_limits, KvLimits::default());
    let lease = node
        .register(&ha_core::testing::test_member(1), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("register: {e}"));
    let election = ElectionName::new("store").unwrap_or_else(|e| panic!("{e}"));
    let guard = node
        .campaign(lease.id, &election, "a".into())
        .await
        .unwrap_or_else(|e| panic!("campaign: {e}"));
    let big = Bytes::from(
        (0..KvLimits::default().max_value_bytes)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let put = KvWrite::Put {
        key: key("big"),
        value: big.clone(),
    };
    node.kv_write(&guard, put)
        .await
        .unwrap_or_else(|e| panic!("1 MiB write: {e}"));
    // Small writes after it, enough to pass the snapshot threshold when it is low.
    for i in 0..entries {
        let put = KvWrite::Put {
            key: key(&format!("small/{i}")),
            value: Bytes::from(i.to_string()),
        };
        node.kv_write(&guard, put)
            .await
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    for id in 1..=3 {
        group.kill(id).await;
    }
    for id in 1..=3 {
        group.restart(id).await;
    }
    let node = group.follower().await;
    let back = node
        .kv_read(&election, &key("big"))
        .await
        .unwrap_or_else(|e| panic!("read after restart: {e}"));
    assert!(
        back == Some(big),
        "the 1 MiB value did not survive a restart"
    );
    if entries > 0 {
        let last = node
            .kv_read(&election, &key(&format!("small/{}", entries - 1)))
            .await
            .unwrap_or_else(|e| panic!("read after restart: {e}"));
        assert_eq!(last, Some(Bytes::from((entries - 1).to_string())));
    }
    group.shutdown().await;
}

/// One test, so the two groups do not run at once: an unoptimized build under load
/// replicates 1 MiB entries slowly enough to hit request timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_mib_value_survives_a_restart_from_the_log_and_from_a_snapshot() {
    write_restart_read(|config| config, 0).await;
    write_restart_read(|config| config.with_snapshot_every(20), 60).await;
}
