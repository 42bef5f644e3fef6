//! A watcher that stops reading does not grow the node's memory: the hub ends it once
//! its buffer is full, and the local watch resumes after the last revision it saw, so
//! its reader still sees every change once, in order.

mod common;

use std::time::Duration;

use common::Group;
use futures::StreamExt;
use ha_core::watch_buffer::WATCH_BUFFER;
use ha_core::{Backend, ElectionName, LeaderEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_local_watch_resumes_and_misses_nothing() {
    let group = Group::start(3).await;
    let node = group.leader().await;
    let election = ElectionName::new("slow").unwrap_or_else(|e| panic!("{e}"));
    let lease = node
        .register(&ha_core::testing::test_member(1), Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let key = node
        .campaign(lease.id, &election, "v0".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut stalled = node.watch(&election);
    match tokio::time::timeout(Duration::from_secs(10), stalled.next()).await {
        Ok(Some(Ok(LeaderEvent::Elected(leader)))) => assert_eq!(leader.value, "v0"),
        other => panic!("first event: {other:?}"),
    }
    let changes = WATCH_BUFFER * 2 + 10;
    for i in 1..=changes {
        node.proclaim(&key, format!("v{i}").into())
            .await
            .unwrap_or_else(|e| panic!("proclaim {i}: {e}"));
    }
    for i in 1..=changes {
        match tokio::time::timeout(Duration::from_secs(10), stalled.next()).await {
            Ok(Some(Ok(LeaderEvent::Elected(leader)))) => {
                assert_eq!(
                    leader.value,
                    format!("v{i}"),
                    "change {i} skipped or reordered"
                )
            }
            other => panic!("change {i}: {other:?}"),
        }
    }
    drop(stalled);
    group.shutdown().await;
}
