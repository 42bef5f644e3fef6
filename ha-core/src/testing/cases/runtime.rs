//! The runtime on top of the contract: sessions and leaderships.

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::kv::CasOutcome;
use crate::session::{LossReason, Session};
use crate::testing::util::{
    election, eventually, long_ttl, register, settle, short_ttl, test_member, test_role, PROMPT,
};

// ---- the runtime on top of the contract ---------------------------------------------

pub(super) async fn session_keeps_lease_alive_across_ttls(b: Arc<dyn Backend>) -> Result<()> {
    let ttl = short_ttl(&*b);
    let session = Session::builder(Arc::clone(&b), test_member(1))
        .ttl(ttl)
        .register()
        .await?;
    tokio::time::sleep(ttl * 3).await;
    assert!(session.is_valid(), "session lost: {:?}", session.state());
    assert_eq!(b.members(&test_role()).await?.len(), 1);
    session.close().await?;
    assert!(b.members(&test_role()).await?.is_empty());
    Ok(())
}

pub(super) async fn session_close_and_drop_revoke(b: Arc<dyn Backend>) -> Result<()> {
    let dropped = Session::builder(Arc::clone(&b), test_member(1))
        .ttl(long_ttl(&*b))
        .register()
        .await?;
    let lease = dropped.lease();
    drop(dropped);
    let backend = Arc::clone(&b);
    eventually("dropped session revoked", PROMPT, || {
        let backend = Arc::clone(&backend);
        async move {
            matches!(
                backend.keep_alive(lease).await,
                Err(Error::LeaseExpired { .. })
            )
        }
    })
    .await;
    assert!(b.members(&test_role()).await?.is_empty());
    Ok(())
}

pub(super) async fn leadership_lost_when_lease_revoked_behind_its_back(
    b: Arc<dyn Backend>,
) -> Result<()> {
    let e = election("behind-back");
    let session = Session::builder(Arc::clone(&b), test_member(1))
        .ttl(long_ttl(&*b))
        .register()
        .await?;
    let leadership = session.campaign(&e, "a").await?;
    assert!(leadership.is_valid());
    b.revoke(session.lease()).await?;
    let reason = tokio::time::timeout(PROMPT, leadership.lost())
        .await
        .unwrap_or_else(|_| panic!("leadership not lost after its lease was revoked"));
    assert!(
        matches!(reason, LossReason::Deposed | LossReason::LeaseExpired),
        "{reason:?}"
    );
    assert!(!leadership.is_valid());
    Ok(())
}

pub(super) async fn leadership_resign_hands_over_with_larger_token(
    b: Arc<dyn Backend>,
) -> Result<()> {
    let e = election("runtime-handover");
    let s1 = Session::builder(Arc::clone(&b), test_member(1))
        .ttl(long_ttl(&*b))
        .register()
        .await?;
    let s2 = Arc::new(
        Session::builder(Arc::clone(&b), test_member(2))
            .ttl(long_ttl(&*b))
            .register()
            .await?,
    );
    let l1 = s1.campaign(&e, "one").await?;
    let waiting = {
        let (s2, e) = (Arc::clone(&s2), e.clone());
        tokio::spawn(async move { s2.campaign(&e, "two").await })
    };
    settle().await;
    assert!(!waiting.is_finished());
    l1.resign().await?;
    assert!(!l1.is_valid());
    assert_eq!(l1.loss_reason(), Some(LossReason::Resigned));
    let l2 = match tokio::time::timeout(PROMPT, waiting).await {
        Ok(Ok(result)) => result?,
        other => panic!("second session not elected: {other:?}"),
    };
    assert!(l2.token() > l1.token());
    assert!(l2.is_valid());
    Ok(())
}

pub(super) async fn session_campaign_fails_when_session_lost_while_waiting(
    b: Arc<dyn Backend>,
) -> Result<()> {
    let e = election("runtime-lost");
    let holder = register(&b, 1).await?;
    b.campaign(holder.id, &e, "holder".into()).await?;
    let session = Session::builder(Arc::clone(&b), test_member(2))
        .ttl(long_ttl(&*b))
        .register()
        .await?;
    let lease = session.lease();
    let revoker = {
        let b = Arc::clone(&b);
        tokio::spawn(async move {
            settle().await;
            b.revoke(lease).await
        })
    };
    match tokio::time::timeout(PROMPT, session.campaign(&e, "waiter")).await {
        Ok(Err(Error::LeaseExpired { lease: gone })) => assert_eq!(gone, lease),
        Ok(Ok(leadership)) => panic!("a lost session won with token {}", leadership.token()),
        Ok(Err(other)) => panic!("campaign of a lost session gave {other:?}"),
        Err(_) => panic!("campaign of a lost session did not return within {PROMPT:?}"),
    }
    let _ = revoker.await;
    assert_eq!(b.leader(&e).await?.map(|l| l.key.lease), Some(holder.id));
    Ok(())
}

pub(super) async fn leadership_write_after_loss_is_rejected_and_standby_reads(
    b: Arc<dyn Backend>,
) -> Result<()> {
    let e = election("runtime-kv");
    let active = Session::builder(Arc::clone(&b), test_member(1))
        .ttl(long_ttl(&*b))
        .register()
        .await?;
    let standby = Session::builder(Arc::clone(&b), test_member(2))
        .ttl(long_ttl(&*b))
        .register()
        .await?;
    let leadership = active.campaign(&e, "one").await?;
    leadership.put("epoch", "1").await?;
    assert_eq!(
        leadership
            .compare_and_set("epoch", Some("1".into()), "2")
            .await?,
        CasOutcome::Swapped
    );
    assert_eq!(
        leadership
            .compare_and_set("epoch", Some("1".into()), "3")
            .await?,
        CasOutcome::Mismatch {
            current: Some("2".into())
        }
    );
    // The standby reads what the active wrote.
    assert_eq!(standby.get(&e, "epoch").await?.as_deref(), Some(&b"2"[..]));
    assert!(matches!(
        leadership.put("", "x").await,
        Err(Error::InvalidArgument { what: "key", .. })
    ));
    // The lease is revoked behind the active's back: its next write is refused by the
    // backend (or by its own check, if it noticed first) and the leadership is lost.
    b.revoke(active.lease()).await?;
    match leadership.put("epoch", "stale").await {
        Err(Error::NotLeader { .. }) => {}
        other => panic!("a write after losing the lease gave {other:?}"),
    }
    let reason = tokio::time::timeout(PROMPT, leadership.lost())
        .await
        .unwrap_or_else(|_| panic!("leadership not lost after a refused write"));
    assert!(
        matches!(reason, LossReason::Deposed | LossReason::LeaseExpired),
        "{reason:?}"
    );
    assert!(leadership.delete("epoch").await.is_err());
    let next = standby.campaign(&e, "two").await?;
    assert_eq!(next.get("epoch").await?.as_deref(), Some(&b"2"[..]));
    assert!(next.delete("epoch").await?);
    assert_eq!(standby.get(&e, "epoch").await?, None);
    Ok(())
}
