//! A watcher that stops reading, on a real etcd, is ended once its buffer is full, with a
//! typed error after everything it buffered, instead of growing the client's memory; a
//! new watch then starts from the current leader.

mod common;

use common::EtcdExt;

use std::time::Duration;

use futures::StreamExt;
use ha_core::watch_buffer::WATCH_BUFFER;
use ha_core::{Backend, ElectionName, Error, LeaderEvent, Member, Role, ServerId};

const CHANGES: usize = WATCH_BUFFER + 150;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_etcd_watcher_is_ended_with_watch_lagged_after_its_buffer() {
    let Some(etcd) = common::Etcd::start() else {
        return;
    };
    let backend = etcd.backend().await.unwrap_or_else(|e| panic!("{e}"));
    let election = ElectionName::new("slow").unwrap_or_else(|e| panic!("{e}"));
    let member = Member::new(
        ServerId::new(1),
        Role::new("r").unwrap_or_else(|e| panic!("{e}")),
        "127.0.0.1:1",
    );
    let lease = backend
        .register(&member, Duration::from_secs(60))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let key = backend
        .campaign(lease.id, &election, "v0".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut stalled = backend.watch(&election);
    for i in 1..=CHANGES {
        backend
            .proclaim(&key, format!("v{i}").into())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // Time for etcd's watch to deliver every change to the follower task.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut values = Vec::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), stalled.next()).await {
            Ok(Some(Ok(LeaderEvent::Elected(leader)))) => values.push(leader.value),
            Ok(Some(Ok(LeaderEvent::Vacant))) => {}
            Ok(Some(Err(e))) => break e,
            other => panic!(
                "the stalled watcher went on after {} events: {other:?}",
                values.len()
            ),
        }
    };
    assert!(
        matches!(end, Error::WatchLagged { buffered } if buffered == WATCH_BUFFER),
        "{end}"
    );
    assert!(
        !values.is_empty() && values.len() <= WATCH_BUFFER,
        "it got {} events, more than its buffer of {WATCH_BUFFER}",
        values.len()
    );
    let numbers: Vec<usize> = values
        .iter()
        .filter_map(|v| std::str::from_utf8(v).ok()?.strip_prefix('v')?.parse().ok())
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "out of order: {numbers:?}"
    );
    // Watching again starts from the current state.
    let mut fresh = backend.watch(&election);
    match tokio::time::timeout(Duration::from_secs(5), fresh.next()).await {
        Ok(Some(Ok(LeaderEvent::Elected(leader)))) => {
            assert_eq!(leader.value, format!("v{CHANGES}").as_bytes());
        }
        other => panic!("a new watch gave {other:?}"),
    }
}
