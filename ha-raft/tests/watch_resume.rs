//! A watch that resumes on a node restarted from a snapshot must not skip what the
//! snapshot holds (contract clause 8). The client watches through a proxy in front of
//! node 2 that holds what node 2 sends, so it misses a handover; node 1 restarts from a
//! snapshot that contains the handover; node 2 goes away; the client resumes on node 1
//! from the revision it saw last, which is older than node 1's whole history.

mod common;

use std::time::Duration;

use common::Group;
use futures::StreamExt;
use ha_core::{Backend, ElectionName, LeaderEvent};
use ha_raft::RaftClient;
use ha_testkit::{Direction, Fault, Proxy};
use tokio::time::timeout;

async fn next(watch: &mut ha_core::LeaderStream, what: &str) -> LeaderEvent {
    match timeout(Duration::from_secs(15), watch.next()).await {
        Ok(Some(Ok(event))) => event,
        other => panic!("{what}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_from_before_a_restored_snapshot_reads_the_current_state() {
    let mut group = Group::start_with(3, |mut config| {
        config.snapshot_every = 10;
        config
    })
    .await;
    let election = ElectionName::new("resume").unwrap_or_else(|e| panic!("{e}"));
    let n2 = group.peers[&2].parse().unwrap_or_else(|e| panic!("{e}"));
    let to_n2 = Proxy::start(n2).await.unwrap_or_else(|e| panic!("{e}"));
    let client = RaftClient::connect([to_n2.addr().to_string(), group.peers[&1].clone()])
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let mut watch = client.watch(&election);
    assert_eq!(
        next(&mut watch, "the first state").await,
        LeaderEvent::Vacant
    );

    let backend = group.backend(3);
    let a = backend
        .register(&ha_core::testing::test_member(1), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let b = backend
        .register(&ha_core::testing::test_member(2), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let a_key = backend
        .campaign(a.id, &election, "a".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match next(&mut watch, "a elected").await {
        LeaderEvent::Elected(leader) => assert_eq!(leader.key, a_key),
        other => panic!("expected a elected, got {other:?}"),
    }

    // The client hears nothing more from node 2; a hands over to b, and enough entries
    // follow that every node snapshots past the handover.
    to_n2.set(Direction::ToClient, Fault::Hold);
    let waiting = {
        let backend = group.backend(3);
        let election = election.clone();
        tokio::spawn(async move { backend.campaign(b.id, &election, "b".into()).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    backend
        .resign(&a_key)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let b_key = waiting
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    for id in 10..40 {
        backend
            .register(&ha_core::testing::test_member(id), Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Node 1 restarts from its snapshot, which holds the handover; then node 2 goes.
    group.kill(1).await;
    group.restart(1).await;
    group.wait_for_leader().await;
    to_n2.set(Direction::ToClient, Fault::Drop);
    group.kill(2).await;

    match next(&mut watch, "the state after resuming on node 1").await {
        LeaderEvent::Elected(leader) => assert_eq!(
            leader.key, b_key,
            "resumed on a node restored from a snapshot, the watch skipped the handover"
        ),
        other => panic!("expected b elected, got {other:?}"),
    }
    drop(watch);
    drop(client);
    group.shutdown().await;
}

/// A watch over a connection that went silent (no FIN, no RST: a black-holing link)
/// must notice and resume on another node, not wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_over_a_black_holed_connection_resumes_elsewhere() {
    let group = Group::start(3).await;
    let election = ElectionName::new("black-hole").unwrap_or_else(|e| panic!("{e}"));
    let n2 = group.peers[&2].parse().unwrap_or_else(|e| panic!("{e}"));
    let to_n2 = Proxy::start(n2).await.unwrap_or_else(|e| panic!("{e}"));
    let client = RaftClient::connect([to_n2.addr().to_string(), group.peers[&1].clone()])
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let mut watch = client.watch(&election);
    assert_eq!(
        next(&mut watch, "the first state").await,
        LeaderEvent::Vacant
    );

    to_n2.set_both(Fault::Drop);
    let backend = group.backend(3);
    let a = backend
        .register(&ha_core::testing::test_member(1), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let key = backend
        .campaign(a.id, &election, "a".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match next(&mut watch, "the election, through another node").await {
        LeaderEvent::Elected(leader) => assert_eq!(leader.key, key),
        other => panic!("expected a elected, got {other:?}"),
    }
    drop(watch);
    drop(client);
    group.shutdown().await;
}
