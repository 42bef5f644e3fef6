//! Clauses 1–3: register, keep_alive, revoke.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::testing::util::{
    election, eventually, expiry_grace, long_ttl, register, short_ttl, test_member, test_role,
};
use crate::types::{LeaseId, Member, Role, ServerId, MAX_TTL};

// ---- clause 1: register -------------------------------------------------------------

pub(super) async fn oversize_records_and_leader_values_are_too_large(
    b: Arc<dyn Backend>,
) -> Result<()> {
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

pub(super) async fn register_makes_member_visible(b: Arc<dyn Backend>) -> Result<()> {
    assert!(b.members(&test_role()).await?.is_empty());
    register(&b, 7).await?;
    assert_eq!(b.members(&test_role()).await?, vec![test_member(7)]);
    Ok(())
}

pub(super) async fn register_grants_at_least_the_requested_ttl(b: Arc<dyn Backend>) -> Result<()> {
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

pub(super) async fn register_rejects_ttl_out_of_bounds(b: Arc<dyn Backend>) -> Result<()> {
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

pub(super) async fn register_rejects_duplicate_server_id_in_role(
    b: Arc<dyn Backend>,
) -> Result<()> {
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

pub(super) async fn members_are_per_role_and_ordered_by_server_id(
    b: Arc<dyn Backend>,
) -> Result<()> {
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

pub(super) async fn keep_alive_extends_lease(b: Arc<dyn Backend>) -> Result<()> {
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

pub(super) async fn lease_expires_without_keep_alive(b: Arc<dyn Backend>) -> Result<()> {
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

pub(super) async fn keep_alive_of_unknown_lease_is_lease_expired(
    b: Arc<dyn Backend>,
) -> Result<()> {
    let unknown = LeaseId::new(0x0bad_cafe_0000_0001);
    match b.keep_alive(unknown).await {
        Err(Error::LeaseExpired { lease }) => assert_eq!(lease, unknown),
        other => panic!("keep_alive of an unknown lease gave {other:?}"),
    }
    Ok(())
}

// ---- clause 3: revoke ---------------------------------------------------------------

pub(super) async fn revoke_removes_member_and_candidacies(b: Arc<dyn Backend>) -> Result<()> {
    let e = election("revoke");
    let lease = register(&b, 1).await?;
    b.campaign(lease.id, &e, "a".into()).await?;
    b.revoke(lease.id).await?;
    assert!(b.members(&test_role()).await?.is_empty());
    assert_eq!(b.leader(&e).await?, None);
    Ok(())
}

pub(super) async fn revoke_is_idempotent(b: Arc<dyn Backend>) -> Result<()> {
    let lease = register(&b, 1).await?;
    b.revoke(lease.id).await?;
    b.revoke(lease.id).await?;
    b.revoke(LeaseId::new(0x0bad_cafe_0000_0002)).await?;
    Ok(())
}
