//! The cases, grouped by contract clause. Each name says what it checks.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::util::{
    assert_waiting, election, eventually, expiry_grace, long_ttl, next_event, register, settle,
    short_ttl, spawn_campaign, test_member, test_role, won, PROMPT,
};
use super::Case;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::kv::{CasOutcome, KvKey, KvWrite};
use crate::session::{LossReason, Session};
use crate::types::{
    ElectionName, FencingToken, LeaderEvent, LeaderKey, LeaseId, Member, MemberEvent, Role,
    ServerId, MAX_TTL,
};

macro_rules! cases {
    ($($clause:literal $name:ident),* $(,)?) => {
        /// Every conformance case, in the order they run.
        pub const CASES: &[Case] = &[
            $(Case { name: stringify!($name), clause: $clause, run: |b| Box::pin($name(b)) },)*
        ];
    };
}

cases! {
    1 register_makes_member_visible,
    1 register_grants_at_least_the_requested_ttl,
    1 register_rejects_ttl_out_of_bounds,
    1 register_rejects_duplicate_server_id_in_role,
    1 members_are_per_role_and_ordered_by_server_id,
    1 oversize_records_and_leader_values_are_too_large,
    2 keep_alive_extends_lease,
    2 lease_expires_without_keep_alive,
    2 keep_alive_of_unknown_lease_is_lease_expired,
    3 revoke_removes_member_and_candidacies,
    3 revoke_is_idempotent,
    4 campaign_uncontested_wins_at_once,
    4 campaign_is_fifo_across_five_candidates,
    4 campaign_fails_when_own_lease_expires_while_waiting,
    4 campaign_fails_when_own_lease_is_revoked_while_waiting,
    4 campaign_with_dead_lease_is_lease_expired,
    4 dropped_campaign_withdraws_candidacy,
    4 campaign_again_with_same_lease_resumes_candidacy,
    4 one_lease_leads_independent_elections,
    4 tokens_strictly_increase_over_100_handovers,
    5 resign_hands_over_immediately,
    5 resign_is_idempotent,
    5 resign_of_sole_leader_leaves_election_vacant,
    6 proclaim_changes_value_and_keeps_token,
    6 proclaim_after_resign_is_not_leader,
    6 proclaim_with_foreign_key_is_not_leader,
    7 leader_reports_head_with_server_id_and_value,
    7 leader_of_unknown_election_is_none,
    7 leader_expires_with_its_lease_and_next_takes_over,
    8 watch_starts_with_current_state,
    8 watch_reports_vacant_when_election_empties,
    8 watch_never_skips_or_reorders_leaders,
    8 watch_reports_proclaimed_values,
    8 leader_agrees_with_watch,
    9 watch_members_reports_joins_and_leaves,
    10 kv_leader_writes_and_everyone_reads,
    10 kv_compare_and_set_swaps_only_on_match,
    10 kv_write_after_resign_is_not_leader,
    10 kv_write_after_lease_loss_is_not_leader,
    10 kv_write_with_foreign_key_is_not_leader,
    10 kv_new_leader_reads_old_leaders_last_write,
    10 kv_concurrent_stale_and_fresh_writers_only_fresh_lands,
    10 kv_namespaces_are_per_election,
    10 kv_sizes_over_the_limits_are_too_large,
    0 session_keeps_lease_alive_across_ttls,
    0 session_close_and_drop_revoke,
    0 leadership_lost_when_lease_revoked_behind_its_back,
    0 leadership_resign_hands_over_with_larger_token,
    0 session_campaign_fails_when_session_lost_while_waiting,
    0 leadership_write_after_loss_is_rejected_and_standby_reads,
}

// ---- clause 1: register -------------------------------------------------------------

async fn oversize_records_and_leader_values_are_too_large(b: Arc<dyn Backend>) -> Result<()> {
    let limits = b.capabilities().record_limits;
    let ttl = long_ttl(&*b);
    let too_large = |result: Result<()>, what: &str, size: usize, limit: usize| match result {
        Err(Error::TooLarge {
            what: got,
            size: got_size,
            limit: got_limit,
        }) if got == what => assert_eq!((got_size, got_limit), (size, limit), "{what}"),
        other => panic!("an oversize {what} gave {other:?}"),
    };
    let mut long_address = test_member(1);
    long_address.address = "a".repeat(limits.max_address_bytes + 1);
    too_large(
        b.register(&long_address, ttl).await.map(drop),
        "address",
        limits.max_address_bytes + 1,
        limits.max_address_bytes,
    );
    let mut heavy = test_member(2);
    heavy.metadata.clear();
    heavy = heavy.with_metadata("k", "v".repeat(limits.max_metadata_bytes));
    too_large(
        b.register(&heavy, ttl).await.map(drop),
        "metadata",
        limits.max_metadata_bytes + 1,
        limits.max_metadata_bytes,
    );
    assert!(b.members(&test_role()).await?.is_empty());

    // At the limits exactly, it fits.
    let mut exact = test_member(3);
    exact.metadata.clear();
    exact = exact.with_metadata("k", "v".repeat(limits.max_metadata_bytes - 1));
    exact.address = "a".repeat(limits.max_address_bytes);
    let lease = b.register(&exact, ttl).await?;
    assert_eq!(b.members(&test_role()).await?, vec![exact]);

    let e = election("record-limits");
    let max = limits.max_leader_value_bytes;
    too_large(
        b.campaign(lease.id, &e, Bytes::from(vec![b'x'; max + 1]))
            .await
            .map(drop),
        "leader value",
        max + 1,
        max,
    );
    assert_eq!(b.leader(&e).await?, None);
    let key = b
        .campaign(lease.id, &e, Bytes::from(vec![b'x'; max]))
        .await?;
    too_large(
        b.proclaim(&key, Bytes::from(vec![b'y'; max + 1])).await,
        "leader value",
        max + 1,
        max,
    );
    let leader = b.leader(&e).await?.map(|l| l.value);
    assert_eq!(leader, Some(Bytes::from(vec![b'x'; max])));
    Ok(())
}

async fn register_makes_member_visible(b: Arc<dyn Backend>) -> Result<()> {
    assert!(b.members(&test_role()).await?.is_empty());
    register(&b, 7).await?;
    assert_eq!(b.members(&test_role()).await?, vec![test_member(7)]);
    Ok(())
}

async fn register_grants_at_least_the_requested_ttl(b: Arc<dyn Backend>) -> Result<()> {
    let ttl = long_ttl(&*b);
    let lease = b.register(&test_member(1), ttl).await?;
    assert!(
        lease.ttl >= ttl,
        "granted {:?} < requested {ttl:?}",
        lease.ttl
    );
    let renewed = b.keep_alive(lease.id).await?;
    assert!(renewed >= ttl, "renewed {renewed:?} < requested {ttl:?}");
    Ok(())
}

async fn register_rejects_ttl_out_of_bounds(b: Arc<dyn Backend>) -> Result<()> {
    let min = b.capabilities().min_ttl;
    let mut bad = vec![Duration::ZERO, MAX_TTL + Duration::from_secs(1)];
    if min > Duration::from_millis(1) {
        bad.push(min - Duration::from_millis(1));
    }
    for ttl in bad {
        match b.register(&test_member(1), ttl).await {
            Err(Error::InvalidArgument { what: "ttl", .. }) => {}
            other => panic!("ttl {ttl:?} gave {other:?}, expected InvalidArgument(ttl)"),
        }
    }
    assert!(b.members(&test_role()).await?.is_empty());
    Ok(())
}

async fn register_rejects_duplicate_server_id_in_role(b: Arc<dyn Backend>) -> Result<()> {
    let first = register(&b, 1).await?;
    match register(&b, 1).await {
        Err(Error::AlreadyRegistered { server_id, role }) => {
            assert_eq!(server_id, ServerId::new(1));
            assert_eq!(role, test_role());
        }
        other => panic!("duplicate gave {other:?}"),
    }
    // The same ID in another role is another member.
    let other_role = Member::new(ServerId::new(1), Role::new("other")?, "x");
    b.register(&other_role, long_ttl(&*b)).await?;
    // Once the first session ends, the ID is free again.
    b.revoke(first.id).await?;
    register(&b, 1).await?;
    Ok(())
}

async fn members_are_per_role_and_ordered_by_server_id(b: Arc<dyn Backend>) -> Result<()> {
    for id in [3, 1, 2] {
        register(&b, id).await?;
    }
    let other = Role::new("querycoord")?;
    let stranger = Member::new(ServerId::new(9), other.clone(), "10.0.0.9:1");
    b.register(&stranger, long_ttl(&*b)).await?;
    let ids: Vec<u64> = b
        .members(&test_role())
        .await?
        .iter()
        .map(|m| m.server_id.get())
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    assert_eq!(b.members(&other).await?, vec![stranger]);
    assert!(b.members(&Role::new("nobody")?).await?.is_empty());
    Ok(())
}

// ---- clause 2: keep_alive -----------------------------------------------------------

async fn keep_alive_extends_lease(b: Arc<dyn Backend>) -> Result<()> {
    let ttl = short_ttl(&*b);
    let lease = b.register(&test_member(1), ttl).await?;
    // Keep it alive for 2.5 TTLs; without renewals it would be gone by then.
    for _ in 0..10 {
        tokio::time::sleep(ttl / 4).await;
        let granted = b.keep_alive(lease.id).await?;
        assert!(granted >= ttl);
    }
    assert_eq!(b.members(&test_role()).await?.len(), 1);
    Ok(())
}

async fn lease_expires_without_keep_alive(b: Arc<dyn Backend>) -> Result<()> {
    let ttl = short_ttl(&*b);
    let lease = b.register(&test_member(1), ttl).await?;
    let started = tokio::time::Instant::now();
    let backend = Arc::clone(&b);
    eventually("member gone after ttl", ttl + expiry_grace(&*b), || {
        let backend = Arc::clone(&backend);
        async move {
            backend
                .members(&test_role())
                .await
                .map(|m| m.is_empty())
                .unwrap_or(false)
        }
    })
    .await;
    assert!(
        started.elapsed() >= ttl.mul_f64(0.9),
        "lease expired after {:?}, before its ttl {ttl:?}",
        started.elapsed()
    );
    match b.keep_alive(lease.id).await {
        Err(Error::LeaseExpired { lease: gone }) => assert_eq!(gone, lease.id),
        other => panic!("keep_alive after expiry gave {other:?}"),
    }
    Ok(())
}

async fn keep_alive_of_unknown_lease_is_lease_expired(b: Arc<dyn Backend>) -> Result<()> {
    let unknown = LeaseId::new(0x0bad_cafe_0000_0001);
    match b.keep_alive(unknown).await {
        Err(Error::LeaseExpired { lease }) => assert_eq!(lease, unknown),
        other => panic!("keep_alive of an unknown lease gave {other:?}"),
    }
    Ok(())
}

// ---- clause 3: revoke ---------------------------------------------------------------

async fn revoke_removes_member_and_candidacies(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("revoke");
    let lease = register(&b, 1).await?;
    b.campaign(lease.id, &e, "a".into()).await?;
    b.revoke(lease.id).await?;
    assert!(b.members(&test_role()).await?.is_empty());
    assert_eq!(b.leader(&e).await?, None);
    Ok(())
}

async fn revoke_is_idempotent(b: Arc<dyn Backend>) -> Result<()> {
    let lease = register(&b, 1).await?;
    b.revoke(lease.id).await?;
    b.revoke(lease.id).await?;
    b.revoke(LeaseId::new(0x0bad_cafe_0000_0002)).await?;
    Ok(())
}

// ---- clause 4: campaign -------------------------------------------------------------

async fn campaign_uncontested_wins_at_once(b: Arc<dyn Backend>) -> Result<()> {
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

async fn campaign_is_fifo_across_five_candidates(b: Arc<dyn Backend>) -> Result<()> {
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

async fn campaign_fails_when_own_lease_expires_while_waiting(b: Arc<dyn Backend>) -> Result<()> {
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

async fn campaign_fails_when_own_lease_is_revoked_while_waiting(b: Arc<dyn Backend>) -> Result<()> {
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

async fn campaign_with_dead_lease_is_lease_expired(b: Arc<dyn Backend>) -> Result<()> {
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

async fn dropped_campaign_withdraws_candidacy(b: Arc<dyn Backend>) -> Result<()> {
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

async fn campaign_again_with_same_lease_resumes_candidacy(b: Arc<dyn Backend>) -> Result<()> {
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

async fn one_lease_leads_independent_elections(b: Arc<dyn Backend>) -> Result<()> {
    let (e1, e2) = (election("one"), election("two"));
    let lease = register(&b, 1).await?;
    let k1 = b.campaign(lease.id, &e1, "a".into()).await?;
    let k2 = b.campaign(lease.id, &e2, "b".into()).await?;
    b.resign(&k1).await?;
    assert_eq!(b.leader(&e1).await?, None);
    assert_eq!(b.leader(&e2).await?.map(|l| l.key), Some(k2));
    Ok(())
}

async fn tokens_strictly_increase_over_100_handovers(b: Arc<dyn Backend>) -> Result<()> {
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

async fn resign_hands_over_immediately(b: Arc<dyn Backend>) -> Result<()> {
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

async fn resign_is_idempotent(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("twice");
    let lease = register(&b, 1).await?;
    let key = b.campaign(lease.id, &e, "a".into()).await?;
    b.resign(&key).await?;
    b.resign(&key).await?;
    b.revoke(lease.id).await?;
    b.resign(&key).await?;
    Ok(())
}

async fn resign_of_sole_leader_leaves_election_vacant(b: Arc<dyn Backend>) -> Result<()> {
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

async fn proclaim_changes_value_and_keeps_token(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("proclaim");
    let lease = register(&b, 1).await?;
    let key = b.campaign(lease.id, &e, "activating".into()).await?;
    b.proclaim(&key, "active".into()).await?;
    let leader = b.leader(&e).await?.unwrap_or_else(|| panic!("no leader"));
    assert_eq!(leader.value_str(), Some("active"));
    assert_eq!(leader.key, key);
    Ok(())
}

async fn proclaim_after_resign_is_not_leader(b: Arc<dyn Backend>) -> Result<()> {
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
fn forged_keys(key: &LeaderKey, other_lease: LeaseId, elsewhere: ElectionName) -> [LeaderKey; 3] {
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

async fn proclaim_with_foreign_key_is_not_leader(b: Arc<dyn Backend>) -> Result<()> {
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

// ---- clause 7: leader ---------------------------------------------------------------

async fn leader_reports_head_with_server_id_and_value(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("head");
    let a = register(&b, 11).await?;
    let c = register(&b, 12).await?;
    let key = b.campaign(a.id, &e, "10.0.0.11:53100".into()).await?;
    let _waiting = spawn_campaign(&b, &c, &e, "10.0.0.12:53100");
    settle().await;
    let leader = b.leader(&e).await?.unwrap_or_else(|| panic!("no leader"));
    assert_eq!(leader.key, key);
    assert_eq!(leader.server_id, Some(ServerId::new(11)));
    assert_eq!(leader.value_str(), Some("10.0.0.11:53100"));
    Ok(())
}

async fn leader_of_unknown_election_is_none(b: Arc<dyn Backend>) -> Result<()> {
    assert_eq!(b.leader(&election("nobody-ran")).await?, None);
    Ok(())
}

async fn leader_expires_with_its_lease_and_next_takes_over(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("expire-leader");
    let ttl = short_ttl(&*b);
    let doomed = b.register(&test_member(1), ttl).await?;
    let heir = register(&b, 2).await?;
    let old = b.campaign(doomed.id, &e, "doomed".into()).await?;
    let next = spawn_campaign(&b, &heir, &e, "heir");
    let key = match tokio::time::timeout(ttl + expiry_grace(&*b), next).await {
        Ok(Ok(result)) => result?,
        other => panic!("heir not elected after the leader's lease expired: {other:?}"),
    };
    assert!(key.token > old.token);
    assert_eq!(b.leader(&e).await?.map(|l| l.key), Some(key));
    Ok(())
}

// ---- clause 8: watch ----------------------------------------------------------------

async fn watch_starts_with_current_state(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("watch-start");
    let mut empty = b.watch(&e);
    assert_eq!(next_event(&mut empty).await, LeaderEvent::Vacant);
    let lease = register(&b, 1).await?;
    let key = b.campaign(lease.id, &e, "a".into()).await?;
    let mut held = b.watch(&e);
    match next_event(&mut held).await {
        LeaderEvent::Elected(leader) => assert_eq!(leader.key, key),
        other => panic!("first event {other:?}, expected the current leader"),
    }
    Ok(())
}

async fn watch_reports_vacant_when_election_empties(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("watch-vacant");
    let lease = register(&b, 1).await?;
    let key = b.campaign(lease.id, &e, "a".into()).await?;
    let mut events = b.watch(&e);
    assert!(matches!(
        next_event(&mut events).await,
        LeaderEvent::Elected(_)
    ));
    b.resign(&key).await?;
    assert_eq!(next_event(&mut events).await, LeaderEvent::Vacant);
    b.campaign(lease.id, &e, "b".into()).await?;
    assert!(matches!(
        next_event(&mut events).await,
        LeaderEvent::Elected(_)
    ));
    b.revoke(lease.id).await?;
    assert_eq!(next_event(&mut events).await, LeaderEvent::Vacant);
    Ok(())
}

async fn watch_never_skips_or_reorders_leaders(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("watch-order");
    let mut events = b.watch(&e);
    assert_eq!(next_event(&mut events).await, LeaderEvent::Vacant);
    let mut leases = Vec::new();
    for id in 0..5 {
        leases.push(register(&b, id).await?);
    }
    let first = b.campaign(leases[0].id, &e, "c0".into()).await?;
    let names = ["c1", "c2", "c3", "c4"];
    let mut waiting = Vec::new();
    for (lease, value) in leases[1..].iter().zip(names) {
        waiting.push(spawn_campaign(&b, lease, &e, value));
        settle().await;
    }
    // Hand over as fast as possible, without reading the watch in between.
    let mut previous = first;
    for handle in waiting {
        b.resign(&previous).await?;
        previous = won(handle).await?;
    }
    b.resign(&previous).await?;
    let mut last_token = None;
    for expected in ["c0", "c1", "c2", "c3", "c4"] {
        match next_event(&mut events).await {
            LeaderEvent::Elected(leader) => {
                assert_eq!(leader.value_str(), Some(expected));
                if let Some(last) = last_token {
                    assert!(leader.token() > last);
                }
                last_token = Some(leader.token());
            }
            LeaderEvent::Vacant => panic!("Vacant before {expected}"),
        }
    }
    assert_eq!(next_event(&mut events).await, LeaderEvent::Vacant);
    Ok(())
}

async fn watch_reports_proclaimed_values(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("watch-proclaim");
    let lease = register(&b, 1).await?;
    let key = b.campaign(lease.id, &e, "activating".into()).await?;
    let mut events = b.watch(&e);
    let token = match next_event(&mut events).await {
        LeaderEvent::Elected(leader) => leader.token(),
        other => panic!("{other:?}"),
    };
    b.proclaim(&key, "active".into()).await?;
    match next_event(&mut events).await {
        LeaderEvent::Elected(leader) => {
            assert_eq!(leader.value_str(), Some("active"));
            assert_eq!(leader.token(), token);
        }
        other => panic!("{other:?}"),
    }
    Ok(())
}

async fn leader_agrees_with_watch(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("agree");
    let mut events = b.watch(&e);
    assert_eq!(next_event(&mut events).await, LeaderEvent::Vacant);
    let a = register(&b, 1).await?;
    let c = register(&b, 2).await?;
    let ka = b.campaign(a.id, &e, "a".into()).await?;
    let next = spawn_campaign(&b, &c, &e, "c");
    settle().await;
    let seen = next_event(&mut events).await;
    assert_eq!(seen.leader().cloned(), b.leader(&e).await?);
    b.resign(&ka).await?;
    won(next).await?;
    let seen = next_event(&mut events).await;
    assert_eq!(seen.leader().cloned(), b.leader(&e).await?);
    assert_eq!(
        seen.leader().and_then(|l| l.server_id),
        Some(ServerId::new(2))
    );
    Ok(())
}

// ---- clause 9: members --------------------------------------------------------------

async fn watch_members_reports_joins_and_leaves(b: Arc<dyn Backend>) -> Result<()> {
    let first = register(&b, 1).await?;
    let mut events = b.watch_members(&test_role());
    assert_eq!(
        next_event(&mut events).await,
        MemberEvent::Snapshot(vec![test_member(1)])
    );
    let second = register(&b, 2).await?;
    assert_eq!(
        next_event(&mut events).await,
        MemberEvent::Joined(test_member(2))
    );
    b.revoke(first.id).await?;
    assert_eq!(
        next_event(&mut events).await,
        MemberEvent::Left(test_member(1))
    );
    // Other roles do not show up.
    b.register(
        &Member::new(ServerId::new(5), Role::new("other")?, "x"),
        long_ttl(&*b),
    )
    .await?;
    b.revoke(second.id).await?;
    assert_eq!(
        next_event(&mut events).await,
        MemberEvent::Left(test_member(2))
    );
    Ok(())
}

// ---- clause 10: the guarded store ---------------------------------------------------

fn kv_key(key: &str) -> KvKey {
    KvKey::new(key).unwrap_or_else(|e| panic!("{e}"))
}

fn put(key: &str, value: &str) -> KvWrite {
    KvWrite::Put {
        key: kv_key(key),
        value: Bytes::copy_from_slice(value.as_bytes()),
    }
}

async fn read_str(b: &Arc<dyn Backend>, e: &ElectionName, key: &str) -> Result<Option<String>> {
    Ok(b.kv_read(e, &kv_key(key))
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// Fails the case unless `result` is `NotLeader` of election `e`; returns its token.
fn expect_not_leader<T: std::fmt::Debug>(
    result: Result<T>,
    e: &ElectionName,
    what: &str,
) -> Option<FencingToken> {
    match result {
        Err(Error::NotLeader { election, current }) => {
            assert_eq!(&election, e, "{what}: NotLeader names the wrong election");
            current
        }
        other => panic!("{what} gave {other:?}, expected NotLeader"),
    }
}

async fn kv_leader_writes_and_everyone_reads(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-basic");
    let leader = register(&b, 1).await?;
    let _reader = register(&b, 2).await?;
    let key = b.campaign(leader.id, &e, "a".into()).await?;
    assert_eq!(read_str(&b, &e, "config").await?, None);
    let first = b.kv_write(&key, put("config", "v1")).await?;
    assert!(first.applied);
    assert_eq!(first.previous, None);
    let second = b.kv_write(&key, put("config", "v2")).await?;
    assert_eq!(second.previous.as_deref(), Some(&b"v1"[..]));
    // A reader needs no leadership (and no session).
    assert_eq!(read_str(&b, &e, "config").await?.as_deref(), Some("v2"));
    b.kv_write(&key, put("segments/7/state", "sealed")).await?;
    assert_eq!(
        read_str(&b, &e, "segments/7/state").await?.as_deref(),
        Some("sealed")
    );
    let deleted = b
        .kv_write(
            &key,
            KvWrite::Delete {
                key: kv_key("config"),
            },
        )
        .await?;
    assert!(deleted.applied);
    assert_eq!(deleted.previous.as_deref(), Some(&b"v2"[..]));
    let again = b
        .kv_write(
            &key,
            KvWrite::Delete {
                key: kv_key("config"),
            },
        )
        .await?;
    assert!(
        !again.applied,
        "deleting an absent key reports it was absent"
    );
    assert_eq!(read_str(&b, &e, "config").await?, None);
    Ok(())
}

async fn kv_compare_and_set_swaps_only_on_match(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-cas");
    let lease = register(&b, 1).await?;
    let key = b.campaign(lease.id, &e, "a".into()).await?;
    let cas = |expected: Option<&'static str>, new: Option<&'static str>| KvWrite::CompareAndSet {
        key: kv_key("counter"),
        expected: expected.map(|v| Bytes::from_static(v.as_bytes())),
        new: new.map(|v| Bytes::from_static(v.as_bytes())),
    };
    // Create only if absent.
    assert!(b.kv_write(&key, cas(None, Some("1"))).await?.applied);
    let taken = b.kv_write(&key, cas(None, Some("x"))).await?;
    assert!(!taken.applied);
    assert_eq!(taken.previous.as_deref(), Some(&b"1"[..]));
    // Swap on match; a stale expectation reports the current value.
    assert!(b.kv_write(&key, cas(Some("1"), Some("2"))).await?.applied);
    let stale = b.kv_write(&key, cas(Some("1"), Some("3"))).await?;
    assert!(!stale.applied);
    assert_eq!(stale.previous.as_deref(), Some(&b"2"[..]));
    assert_eq!(read_str(&b, &e, "counter").await?.as_deref(), Some("2"));
    // Delete on match.
    assert!(b.kv_write(&key, cas(Some("2"), None)).await?.applied);
    assert_eq!(read_str(&b, &e, "counter").await?, None);
    Ok(())
}

async fn kv_write_after_resign_is_not_leader(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-resign");
    let a = register(&b, 1).await?;
    let c = register(&b, 2).await?;
    let old = b.campaign(a.id, &e, "a".into()).await?;
    b.kv_write(&old, put("k", "old")).await?;
    b.resign(&old).await?;
    // Rejected while nobody leads...
    expect_not_leader(
        b.kv_write(&old, put("k", "stale")).await,
        &e,
        "write after resign",
    );
    // ...and once another leads, the rejection names the new token.
    let new = b.campaign(c.id, &e, "c".into()).await?;
    let current = expect_not_leader(
        b.kv_write(&old, put("k", "stale")).await,
        &e,
        "write after a new leader",
    );
    assert_eq!(current, Some(new.token));
    assert_eq!(read_str(&b, &e, "k").await?.as_deref(), Some("old"));
    Ok(())
}

async fn kv_write_after_lease_loss_is_not_leader(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-lease-loss");
    let ttl = short_ttl(&*b);
    let lease = b.register(&test_member(1), ttl).await?;
    let key = b.campaign(lease.id, &e, "a".into()).await?;
    b.kv_write(&key, put("k", "before")).await?;
    // No keepalives: the lease expires by its TTL.
    let backend = Arc::clone(&b);
    let e2 = e.clone();
    eventually(
        "lease expiry empties the election",
        ttl + expiry_grace(&*b),
        || {
            let backend = Arc::clone(&backend);
            let e = e2.clone();
            async move { matches!(backend.leader(&e).await, Ok(None)) }
        },
    )
    .await;
    expect_not_leader(
        b.kv_write(&key, put("k", "after")).await,
        &e,
        "write after lease expiry",
    );
    // And after an explicit revoke.
    let revoked = register(&b, 2).await?;
    let key2 = b.campaign(revoked.id, &e, "c".into()).await?;
    b.revoke(revoked.id).await?;
    expect_not_leader(
        b.kv_write(&key2, put("k", "after revoke")).await,
        &e,
        "write after revoke",
    );
    assert_eq!(read_str(&b, &e, "k").await?.as_deref(), Some("before"));
    Ok(())
}

async fn kv_write_with_foreign_key_is_not_leader(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-forged");
    let a = register(&b, 1).await?;
    let c = register(&b, 2).await?;
    let key = b.campaign(a.id, &e, "a".into()).await?;
    // A waiting candidate's lease cannot write either.
    let _waiting = spawn_campaign(&b, &c, &e, "c");
    settle().await;
    let forged = forged_keys(&key, c.id, election("kv-elsewhere"));
    for forged in forged {
        expect_not_leader(
            b.kv_write(&forged, put("k", "forged")).await,
            &forged.election,
            "write with a forged key",
        );
    }
    assert_eq!(read_str(&b, &e, "k").await?, None);
    assert_eq!(read_str(&b, &election("kv-elsewhere"), "k").await?, None);
    Ok(())
}

async fn kv_new_leader_reads_old_leaders_last_write(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-takeover");
    let a = register(&b, 1).await?;
    let c = register(&b, 2).await?;
    let old = b.campaign(a.id, &e, "a".into()).await?;
    let next = spawn_campaign(&b, &c, &e, "c");
    settle().await;
    for i in 0..20 {
        b.kv_write(&old, put("meta", &format!("v{i}"))).await?;
    }
    // The old leader dies: its lease is revoked, the standby takes over.
    b.revoke(a.id).await?;
    let new = won(next).await?;
    assert!(new.token > old.token);
    assert_eq!(read_str(&b, &e, "meta").await?.as_deref(), Some("v19"));
    // The new leader continues from there; the old one is shut out.
    b.kv_write(&new, put("meta", "v20")).await?;
    expect_not_leader(
        b.kv_write(&old, put("meta", "v19-stale")).await,
        &e,
        "the old leader's write",
    );
    assert_eq!(read_str(&b, &e, "meta").await?.as_deref(), Some("v20"));
    Ok(())
}

async fn kv_concurrent_stale_and_fresh_writers_only_fresh_lands(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-race");
    let a = register(&b, 1).await?;
    let c = register(&b, 2).await?;
    let old = b.campaign(a.id, &e, "a".into()).await?;
    let next = spawn_campaign(&b, &c, &e, "c");
    settle().await;
    // The stale writer keeps writing across the handover, as an old active that has not
    // noticed would; it stops at its first rejection or after 200 writes.
    let stale = {
        let (b, old) = (Arc::clone(&b), old.clone());
        tokio::spawn(async move {
            let mut accepted = Vec::new();
            for i in 0..200 {
                match b.kv_write(&old, put("owner", &format!("stale-{i}"))).await {
                    Ok(_) => accepted.push(i),
                    Err(Error::NotLeader { .. }) => return (accepted, true),
                    Err(other) => panic!("stale write {i} gave {other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (accepted, false)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.resign(&old).await?;
    let new = won(next).await?;
    // From here on, the fresh leader's writes land and no stale write can.
    let fresh = {
        let (b, new) = (Arc::clone(&b), new.clone());
        tokio::spawn(async move {
            for i in 0..20 {
                b.kv_write(&new, put("owner", &format!("fresh-{i}")))
                    .await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, Error>(())
        })
    };
    let (accepted, rejected) = match tokio::time::timeout(PROMPT * 3, stale).await {
        Ok(Ok(result)) => result,
        other => panic!("stale writer did not finish: {other:?}"),
    };
    assert!(rejected, "the stale writer was never rejected");
    match tokio::time::timeout(PROMPT * 3, fresh).await {
        Ok(Ok(result)) => result?,
        other => panic!("fresh writer did not finish: {other:?}"),
    }
    assert_eq!(
        read_str(&b, &e, "owner").await?.as_deref(),
        Some("fresh-19")
    );
    // Even now, with the fresh leader done, a stale write is refused.
    let current = expect_not_leader(
        b.kv_write(&old, put("owner", "stale-late")).await,
        &e,
        "a late stale write",
    );
    assert_eq!(current, Some(new.token));
    assert!(accepted.len() < 200, "{accepted:?}");
    Ok(())
}

async fn kv_namespaces_are_per_election(b: Arc<dyn Backend>) -> Result<()> {
    let (one, two) = (election("kv-one"), election("kv-two"));
    let lease = register(&b, 1).await?;
    let k1 = b.campaign(lease.id, &one, "a".into()).await?;
    let k2 = b.campaign(lease.id, &two, "a".into()).await?;
    b.kv_write(&k1, put("k", "one")).await?;
    b.kv_write(&k2, put("k", "two")).await?;
    assert_eq!(read_str(&b, &one, "k").await?.as_deref(), Some("one"));
    assert_eq!(read_str(&b, &two, "k").await?.as_deref(), Some("two"));
    // Leading one election does not let a key write into another.
    expect_not_leader(
        b.kv_write(
            &LeaderKey {
                election: election("kv-three"),
                ..k1.clone()
            },
            put("k", "three"),
        )
        .await,
        &election("kv-three"),
        "a write into an election not led",
    );
    // The store outlives the leaderships and the session.
    b.revoke(lease.id).await?;
    assert_eq!(read_str(&b, &one, "k").await?.as_deref(), Some("one"));
    Ok(())
}

async fn kv_sizes_over_the_limits_are_too_large(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("kv-limits");
    let limits = b.capabilities().kv_limits;
    let lease = register(&b, 1).await?;
    let key = b.campaign(lease.id, &e, "a".into()).await?;
    let long_key = "k".repeat(limits.max_key_bytes + 1);
    match b.kv_write(&key, put(&long_key, "v")).await {
        Err(Error::TooLarge {
            what: "key",
            size,
            limit,
        }) => {
            assert_eq!(
                (size, limit),
                (limits.max_key_bytes + 1, limits.max_key_bytes)
            );
        }
        other => panic!("an over-long key gave {other:?}"),
    }
    match b.kv_read(&e, &kv_key(&long_key)).await {
        Err(Error::TooLarge { what: "key", .. }) => {}
        other => panic!("reading an over-long key gave {other:?}"),
    }
    let big = KvWrite::Put {
        key: kv_key("big"),
        value: Bytes::from(vec![b'x'; limits.max_value_bytes + 1]),
    };
    match b.kv_write(&key, big).await {
        Err(Error::TooLarge {
            what: "value",
            size,
            ..
        }) => {
            assert_eq!(size, limits.max_value_bytes + 1);
        }
        other => panic!("an over-long value gave {other:?}"),
    }
    // At the limits exactly, it fits.
    let exact = KvWrite::Put {
        key: kv_key(&"k".repeat(limits.max_key_bytes)),
        value: Bytes::from(vec![b'x'; limits.max_value_bytes]),
    };
    b.kv_write(&key, exact).await?;
    let back = b
        .kv_read(&e, &kv_key(&"k".repeat(limits.max_key_bytes)))
        .await?;
    assert_eq!(back.map(|v| v.len()), Some(limits.max_value_bytes));
    assert!(matches!(
        KvKey::new(""),
        Err(Error::InvalidArgument { what: "key", .. })
    ));
    Ok(())
}

// ---- the runtime on top of the contract ---------------------------------------------

async fn session_keeps_lease_alive_across_ttls(b: Arc<dyn Backend>) -> Result<()> {
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

async fn session_close_and_drop_revoke(b: Arc<dyn Backend>) -> Result<()> {
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

async fn leadership_lost_when_lease_revoked_behind_its_back(b: Arc<dyn Backend>) -> Result<()> {
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

async fn leadership_resign_hands_over_with_larger_token(b: Arc<dyn Backend>) -> Result<()> {
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

async fn session_campaign_fails_when_session_lost_while_waiting(b: Arc<dyn Backend>) -> Result<()> {
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

async fn leadership_write_after_loss_is_rejected_and_standby_reads(
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
