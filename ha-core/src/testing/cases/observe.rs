//! Clauses 7–9: leader, watch, members.

use std::sync::Arc;

use crate::backend::Backend;
use crate::error::Result;
use crate::testing::util::{
    election, expiry_grace, long_ttl, next_event, register, settle, short_ttl, spawn_campaign,
    test_member, test_role, won,
};
use crate::types::{LeaderEvent, Member, MemberEvent, Role, ServerId};

// ---- clause 7: leader ---------------------------------------------------------------

pub(super) async fn leader_reports_head_with_server_id_and_value(
    b: Arc<dyn Backend>,
) -> Result<()> {
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

pub(super) async fn leader_of_unknown_election_is_none(b: Arc<dyn Backend>) -> Result<()> {
    assert_eq!(b.leader(&election("nobody-ran")).await?, None);
    Ok(())
}

pub(super) async fn leader_expires_with_its_lease_and_next_takes_over(
    b: Arc<dyn Backend>,
) -> Result<()> {
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

pub(super) async fn watch_starts_with_current_state(b: Arc<dyn Backend>) -> Result<()> {
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

pub(super) async fn watch_reports_vacant_when_election_empties(b: Arc<dyn Backend>) -> Result<()> {
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

pub(super) async fn watch_never_skips_or_reorders_leaders(b: Arc<dyn Backend>) -> Result<()> {
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

pub(super) async fn watch_reports_proclaimed_values(b: Arc<dyn Backend>) -> Result<()> {
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

pub(super) async fn leader_agrees_with_watch(b: Arc<dyn Backend>) -> Result<()> {
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

pub(super) async fn watch_members_reports_joins_and_leaves(b: Arc<dyn Backend>) -> Result<()> {
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
