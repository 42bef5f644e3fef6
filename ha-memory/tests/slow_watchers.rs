//! A watcher that stops reading is ended once its buffer is full, with a typed error
//! after everything it buffered, instead of growing the backend's memory or skipping.

use std::time::Duration;

use futures::StreamExt;
use ha_core::{Backend, ElectionName, Error, LeaderEvent, Member, Role, ServerId};
use ha_memory::MemoryBackend;

#[tokio::test]
async fn a_stalled_watcher_is_ended_with_watch_lagged_after_its_buffer() {
    let backend = MemoryBackend::with_watch_buffer(8);
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
    let mut reading = backend.watch(&election);
    for i in 1..=1000 {
        backend
            .proclaim(&key, format!("v{i}").into())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // The reading watcher keeps up and sees every value.
        if i % 4 == 0 {
            for _ in 0..4 {
                let _ = reading.next().await;
            }
        }
    }
    let mut values = Vec::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(5), stalled.next()).await {
            Ok(Some(Ok(LeaderEvent::Elected(leader)))) => values.push(leader.value),
            Ok(Some(Err(e))) => break e,
            other => panic!("the stalled watcher went on: {other:?}"),
        }
    };
    assert!(matches!(end, Error::WatchLagged { buffered: 8 }), "{end}");
    assert_eq!(values.len(), 8, "it got what fit its buffer, in order");
    assert_eq!(values[0], "v0");
    assert_eq!(values[7], "v7");
    assert!(
        stalled.next().await.is_none(),
        "the stream ended after the error"
    );
    // The one that kept up is still there.
    backend
        .proclaim(&key, "last".into())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut last = None;
    while let Ok(Some(Ok(LeaderEvent::Elected(leader)))) =
        tokio::time::timeout(Duration::from_millis(100), reading.next()).await
    {
        last = Some(leader.value);
    }
    assert_eq!(last.as_deref(), Some(&b"last"[..]));
}
