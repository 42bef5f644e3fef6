//! Clauses 4–6: campaign, resign, proclaim.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::testing::util::{
    assert_waiting, election, expiry_grace, register, settle, short_ttl, spawn_campaign,
    test_member, test_role, won, PROMPT,
};
use crate::types::{ElectionName, FencingToken, LeaderKey, LeaseId};

// ---- clause 4: campaign -------------------------------------------------------------

pub(super) async fn campaign_uncontested_wins_at_once(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("solo");
    let lease = register(&b, 1).await?;
    let key = tokio::time::timeout(PROMPT, b.campaign(lease.id, &e, "me".into()))
        .await
        .unwrap_or_else(|_| panic!("uncontested campaign did not return"))?;
    assert_eq!(key.election, e);
    assert_eq!(key.lease, lease.id);
    assert!(key.token > FencingToken::new(0));
    Ok(())
}

pub(super) async fn campaign_is_fifo_across_five_candidates(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("fifo");
    let mut leases = Vec::new();
    for id in 0..5 {
        leases.push(register(&b, id).await?);
    }
    let first = b.campaign(leases[0].id, &e, "c0".into()).await?;
    let values = ["c1", "c2", "c3", "c4"];
    let mut waiting = Vec::new();
    for (lease, value) in leases[1..].iter().zip(values) {
        waiting.push(spawn_campaign(&b, lease, &e, value));
        settle().await;
    }
    for (i, handle) in waiting.iter().enumerate() {
        assert_waiting(handle, &format!("c{}", i + 1));
    }
    let mut previous = first;
    for (i, handle) in waiting.into_iter().enumerate() {
        b.resign(&previous).await?;
        let key = won(handle).await?;
        assert_eq!(
            key.lease,
            leases[i + 1].id,
            "candidate c{} should lead",
            i + 1
        );
        assert!(key.token > previous.token);
        let leader = b.leader(&e).await?.unwrap_or_else(|| panic!("no leader"));
        assert_eq!(leader.value_str(), Some(values[i]));
        previous = key;
    }
    Ok(())
}

pub(super) async fn campaign_fails_when_own_lease_expires_while_waiting(
    b: Arc<dyn Backend>,
) -> Result<()> {
    let e = election("expire-waiting");
    let holder = register(&b, 1).await?;
    b.campaign(holder.id, &e, "holder".into()).await?;
    let ttl = short_ttl(&*b);
    let doomed = b.register(&test_member(2), ttl).await?;
    let started = tokio::time::Instant::now();
    let outcome = tokio::time::timeout(
        ttl + expiry_grace(&*b),
        b.campaign(doomed.id, &e, "doomed".into()),
    )
    .await
    .unwrap_or_else(|_| panic!("campaign did not fail when its lease expired"));
    match outcome {
        Err(Error::LeaseExpired { lease }) => assert_eq!(lease, doomed.id),
        other => panic!("campaign on an expiring lease gave {other:?}"),
    }
    assert!(started.elapsed() >= ttl.mul_f64(0.9));
    assert_eq!(
        b.leader(&e).await?.map(|l| l.key.lease),
        Some(holder.id),
        "the holder must still lead"
    );
    Ok(())
}

pub(super) async fn campaign_fails_when_own_lease_is_revoked_while_waiting(
    b: Arc<dyn Backend>,
) -> Result<()> {
    let e = election("revoke-waiting");
    let holder = register(&b, 1).await?;
    b.campaign(holder.id, &e, "holder".into()).await?;
    let waiter = register(&b, 2).await?;
    let handle = spawn_campaign(&b, &waiter, &e, "waiter");
    settle().await;
    assert_waiting(&handle, "waiter");
    b.revoke(waiter.id).await?;
    match won(handle).await {
        Err(Error::LeaseExpired { lease }) => assert_eq!(lease, waiter.id),
        other => panic!("campaign after its lease was revoked gave {other:?}"),
    }
    Ok(())
}

pub(super) async fn campaign_with_dead_lease_is_lease_expired(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("dead");
    let lease = register(&b, 1).await?;
    b.revoke(lease.id).await?;
    match tokio::time::timeout(PROMPT, b.campaign(lease.id, &e, "x".into())).await {
        Ok(Err(Error::LeaseExpired { .. })) => {}
        other => panic!("campaign on a revoked lease gave {other:?}"),
    }
    assert_eq!(b.leader(&e).await?, None);
    Ok(())
}

pub(super) async fn dropped_campaign_withdraws_candidacy(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("withdraw");
    let holder = register(&b, 1).await?;
    let quitter = register(&b, 2).await?;
    let patient = register(&b, 3).await?;
    let first = b.campaign(holder.id, &e, "holder".into()).await?;
    let dropped = spawn_campaign(&b, &quitter, &e, "quitter");
    settle().await;
    let waiting = spawn_campaign(&b, &patient, &e, "patient");
    settle().await;
    dropped.abort();
    settle().await;
    b.resign(&first).await?;
    let key = won(waiting).await?;
    assert_eq!(
        key.lease, patient.id,
        "the withdrawn candidate must not lead"
    );
    let leader = b.leader(&e).await?.unwrap_or_else(|| panic!("no leader"));
    assert_eq!(leader.value_str(), Some("patient"));
    Ok(())
}

pub(super) async fn campaign_again_with_same_lease_resumes_candidacy(
    b: Arc<dyn Backend>,
) -> Result<()> {
    let e = election("again");
    let lease = register(&b, 1).await?;
    let first = b.campaign(lease.id, &e, "old".into()).await?;
    let again = tokio::time::timeout(PROMPT, b.campaign(lease.id, &e, "new".into()))
        .await
        .unwrap_or_else(|_| panic!("second campaign of the leader did not return"))?;
    assert_eq!(
        again, first,
        "a repeated campaign must resume the same candidacy"
    );
    let leader = b.leader(&e).await?.unwrap_or_else(|| panic!("no leader"));
    assert_eq!(leader.value_str(), Some("new"));
    assert_eq!(leader.token(), first.token);
    Ok(())
}

pub(super) async fn one_lease_leads_independent_elections(b: Arc<dyn Backend>) -> Result<()> {
    let (e1, e2) = (election("one"), election("two"));
    let lease = register(&b, 1).await?;
    let k1 = b.campaign(lease.id, &e1, "a".into()).await?;
    let k2 = b.campaign(lease.id, &e2, "b".into()).await?;
    b.resign(&k1).await?;
    assert_eq!(b.leader(&e1).await?, None);
    assert_eq!(b.leader(&e2).await?.map(|l| l.key), Some(k2));
    Ok(())
}

pub(super) async fn tokens_strictly_increase_over_100_handovers(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("tokens");
    let leases = [register(&b, 1).await?, register(&b, 2).await?];
    let mut last: Option<FencingToken> = None;
    for round in 0..100 {
        let lease = &leases[round % 2];
        let key = b
            .campaign(lease.id, &e, Bytes::from(format!("r{round}")))
            .await?;
        if let Some(last) = last {
            assert!(key.token > last, "round {round}: {} <= {last}", key.token);
        }
        last = Some(key.token);
        b.resign(&key).await?;
    }
    Ok(())
}

// ---- clause 5: resign ---------------------------------------------------------------

pub(super) async fn resign_hands_over_immediately(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("handover");
    let a = register(&b, 1).await?;
    let c = register(&b, 2).await?;
    let first = b.campaign(a.id, &e, "a".into()).await?;
    let next = spawn_campaign(&b, &c, &e, "c");
    settle().await;
    assert_waiting(&next, "c");
    let resigned_at = tokio::time::Instant::now();
    b.resign(&first).await?;
    let key = won(next).await?;
    let gap = resigned_at.elapsed();
    assert!(gap < Duration::from_secs(2), "handover took {gap:?}");
    assert_eq!(key.lease, c.id);
    Ok(())
}

pub(super) async fn resign_is_idempotent(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("twice");
    let lease = register(&b, 1).await?;
    let key = b.campaign(lease.id, &e, "a".into()).await?;
    b.resign(&key).await?;
    b.resign(&key).await?;
    b.revoke(lease.id).await?;
    b.resign(&key).await?;
    Ok(())
}

pub(super) async fn resign_of_sole_leader_leaves_election_vacant(
    b: Arc<dyn Backend>,
) -> Result<()> {
    let e = election("vacant");
    let lease = register(&b, 1).await?;
    let key = b.campaign(lease.id, &e, "a".into()).await?;
    b.resign(&key).await?;
    assert_eq!(b.leader(&e).await?, None);
    // The session itself lives on.
    assert_eq!(b.members(&test_role()).await?.len(), 1);
    Ok(())
}

// ---- clause 6: proclaim -------------------------------------------------------------

pub(super) async fn proclaim_changes_value_and_keeps_token(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("proclaim");
    let lease = register(&b, 1).await?;
    let key = b.campaign(lease.id, &e, "activating".into()).await?;
    b.proclaim(&key, "active".into()).await?;
    let leader = b.leader(&e).await?.unwrap_or_else(|| panic!("no leader"));
    assert_eq!(leader.value_str(), Some("active"));
    assert_eq!(leader.key, key);
    Ok(())
}

pub(super) async fn proclaim_after_resign_is_not_leader(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("late");
    let a = register(&b, 1).await?;
    let c = register(&b, 2).await?;
    let old = b.campaign(a.id, &e, "a".into()).await?;
    b.resign(&old).await?;
    let new = b.campaign(c.id, &e, "c".into()).await?;
    match b.proclaim(&old, "stale".into()).await {
        Err(Error::NotLeader { election, .. }) => assert_eq!(election, e),
        other => panic!("proclaim after resign gave {other:?}"),
    }
    b.revoke(c.id).await?;
    match b.proclaim(&new, "gone".into()).await {
        Err(Error::NotLeader { .. }) => {}
        other => panic!("proclaim after revoke gave {other:?}"),
    }
    Ok(())
}

/// Keys that look like `key` but do not lead: another lease with its token, its lease
/// with a token nobody holds, and its lease and token in another election.
pub(super) fn forged_keys(
    key: &LeaderKey,
    other_lease: LeaseId,
    elsewhere: ElectionName,
) -> [LeaderKey; 3] {
    [
        LeaderKey {
            lease: other_lease,
            ..key.clone()
        },
        LeaderKey {
            token: FencingToken::new(key.token.get() + 1000),
            ..key.clone()
        },
        LeaderKey {
            election: elsewhere,
            ..key.clone()
        },
    ]
}

pub(super) async fn proclaim_with_foreign_key_is_not_leader(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("forged");
    let a = register(&b, 1).await?;
    let c = register(&b, 2).await?;
    let key = b.campaign(a.id, &e, "a".into()).await?;
    let forged = forged_keys(&key, c.id, election("elsewhere"));
    for forged in forged {
        match b.proclaim(&forged, "forged".into()).await {
            Err(Error::NotLeader { .. }) => {}
            other => panic!("proclaim with {forged:?} gave {other:?}"),
        }
    }
    let leader = b.leader(&e).await?.unwrap_or_else(|| panic!("no leader"));
    assert_eq!(leader.value_str(), Some("a"));
    Ok(())
}
