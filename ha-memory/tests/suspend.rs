//! A host suspend: the process's clock (tokio's, CLOCK_MONOTONIC) stops while the lease
//! owner's runs on. On resume the session must call itself invalid at once and report
//! the loss without waiting for timers that count only awake time. Alone in its binary:
//! the injected suspend is process-wide.

use std::sync::Arc;
use std::time::Duration;

use ha_core::{ElectionName, LossReason, Member, Role, ServerId, Session};
use ha_memory::MemoryBackend;

#[tokio::test(start_paused = true)]
async fn a_suspend_longer_than_the_ttl_fences_the_session_at_once_on_resume() {
    let backend = MemoryBackend::new();
    let ttl = Duration::from_secs(10);
    let member = Member::new(
        ServerId::new(1),
        Role::new("rootcoord").unwrap_or_else(|e| panic!("{e}")),
        "127.0.0.1:53101",
    );
    let session = Session::builder(Arc::new(backend), member)
        .ttl(ttl)
        .register()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let leadership = session
        .campaign(
            &ElectionName::new("rootcoord").unwrap_or_else(|e| panic!("{e}")),
            "a",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    tokio::time::sleep(ttl).await;
    assert!(leadership.is_valid());

    ha_core::testing::suspend_host(2 * ttl);
    assert!(
        !leadership.is_valid(),
        "valid after a suspend twice the TTL: the server expired the lease meanwhile"
    );
    // Reported within the resume check, not a renewal period of awake time later.
    let lost = tokio::time::timeout(Duration::from_millis(300), leadership.lost())
        .await
        .unwrap_or_else(|_| panic!("the loss was not reported within 300 ms of the resume"));
    assert_eq!(lost, LossReason::SelfFenced);
}
