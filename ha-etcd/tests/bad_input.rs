//! Crafted keys on a real etcd: tokens and lease ids beyond etcd's `i64` range are
//! typed errors, never a cast that turns them negative.

mod common;

use common::EtcdExt;

use ha_core::{Backend, ElectionName, Error, FencingToken, KvKey, KvWrite, LeaderKey, LeaseId};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_leases_at_or_above_2_pow_63_are_invalid_arguments() {
    let Some(etcd) = common::Etcd::start() else {
        return;
    };
    let backend = etcd.backend().await.unwrap_or_else(|e| panic!("{e}"));
    let election = ElectionName::new("crafted").unwrap_or_else(|e| panic!("{e}"));
    let lease = backend
        .register(
            &ha_core::testing::test_member(1),
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let crafted = LeaderKey {
        election: election.clone(),
        lease: lease.id,
        token: FencingToken::new(1 << 63),
    };
    let invalid = |what: &str, result: ha_core::Result<()>| match result {
        Err(Error::InvalidArgument { what: got, .. }) if got == what => {}
        other => panic!("expected InvalidArgument({what}), got {other:?}"),
    };
    invalid("token", backend.resign(&crafted).await);
    invalid("token", backend.proclaim(&crafted, "v".into()).await);
    let put = KvWrite::Put {
        key: KvKey::new("k").unwrap_or_else(|e| panic!("{e}")),
        value: "v".into(),
    };
    invalid("token", backend.kv_write(&crafted, put).await.map(drop));
    let huge = LeaseId::new(u64::MAX);
    invalid("lease", backend.keep_alive(huge).await.map(drop));
    invalid("lease", backend.revoke(huge).await);
    invalid(
        "lease",
        backend
            .campaign(huge, &election, "v".into())
            .await
            .map(drop),
    );
}

/// A password in cleartext to another host is refused before anything is sent (the
/// endpoint is a reserved name that never resolves, and nothing dials it).
#[tokio::test]
async fn a_password_without_tls_to_another_host_is_refused() {
    let config = ha_etcd::EtcdConfig::new(["etcd.invalid:2379"]).with_user("root", "secret");
    match ha_etcd::EtcdBackend::connect(config).await {
        Err(Error::InvalidArgument {
            what: "tls",
            reason,
        }) => {
            assert!(reason.contains("without TLS"), "{reason}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}
