//! Concurrent writes batched into shared log entries, over real sockets: a `RaftClient`
//! on a follower (so every write is forwarded to the leader) campaigns in many
//! elections at once. Each campaign gets its own token, all distinct, and above every
//! token handed out before; the group's log grows by fewer entries than it got writes.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use common::Group;
use ha_core::{Backend, ElectionName, Member, Role, ServerId};
use ha_raft::RaftClient;

const WRITERS: u64 = 64;

/// The token of one member's campaign in an election of its own, alone.
async fn lone_campaign(
    client: &RaftClient,
    role: &Role,
    ttl: Duration,
    id: u64,
) -> ha_core::FencingToken {
    let lease = client
        .register(&Member::new(ServerId::new(id), role.clone(), ""), ttl)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let election = ElectionName::new(format!("e{id}")).unwrap_or_else(|e| panic!("{e}"));
    client
        .campaign(lease.id, &election, Bytes::from_static(b"alone"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_campaigns_share_entries_and_keep_tokens_unique_and_increasing() {
    let group = Group::start(3).await;
    let follower = group.follower().await;
    let client = RaftClient::connect([follower.address()])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let role = Role::new("batched").unwrap_or_else(|e| panic!("{e}"));
    let ttl = Duration::from_secs(10);
    let election = |i: u64| ElectionName::new(format!("e{i}")).unwrap_or_else(|e| panic!("{e}"));

    // One lease and one token before the burst: every token after it must be above.
    let before = lone_campaign(&client, &role, ttl, 1000).await;

    let leases = futures::future::join_all((0..WRITERS).map(|i| {
        let client = client.clone();
        let member = Member::new(ServerId::new(i), role.clone(), "");
        async move { client.register(&member, ttl).await }
    }))
    .await
    .into_iter()
    .map(|lease| lease.unwrap_or_else(|e| panic!("register: {e}")).id)
    .collect::<Vec<_>>();
    let distinct_leases: BTreeSet<_> = leases.iter().map(|l| l.get()).collect();
    assert_eq!(
        distinct_leases.len(),
        leases.len(),
        "lease ids repeat: {leases:?}"
    );

    let log_before = group
        .leader()
        .await
        .status()
        .await
        .last_log_index
        .unwrap_or(0);
    let keys = futures::future::join_all(leases.iter().enumerate().map(|(i, lease)| {
        let client = client.clone();
        let election = election(i as u64);
        let lease = *lease;
        async move {
            client
                .campaign(lease, &election, Bytes::from_static(b"v"))
                .await
        }
    }))
    .await
    .into_iter()
    .map(|key| key.unwrap_or_else(|e| panic!("campaign: {e}")))
    .collect::<Vec<_>>();
    let log_after = group
        .leader()
        .await
        .status()
        .await
        .last_log_index
        .unwrap_or(0);

    let tokens: BTreeSet<u64> = keys.iter().map(|k| k.token.get()).collect();
    assert_eq!(tokens.len(), keys.len(), "tokens repeat: {tokens:?}");
    assert!(
        tokens.iter().all(|t| *t > before.get()),
        "a token at or below the earlier {before:?}: {tokens:?}"
    );
    // Each leads its own election, as the watchers on every node see it.
    for (i, key) in keys.iter().enumerate() {
        let leader = client
            .leader(&election(i as u64))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("election {i} has no leader"));
        assert_eq!(leader.token(), key.token, "election {i}");
    }
    // Heartbeats and expiries add entries too, but far fewer than one per campaign.
    let entries = log_after.saturating_sub(log_before);
    assert!(
        entries < WRITERS / 2,
        "{WRITERS} concurrent campaigns took {entries} log entries"
    );

    // After the burst, a new campaign is still above every token before it.
    let after = lone_campaign(&client, &role, ttl, 2000).await;
    assert!(
        tokens.iter().all(|t| *t < after.get()),
        "{after:?} vs {tokens:?}"
    );
    group.shutdown().await;
}
