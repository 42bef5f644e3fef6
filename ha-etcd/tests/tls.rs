//! etcd serving clients over TLS and requiring client certificates (certificates made at
//! test time): the right CA and client certificate pass the whole conformance suite; a
//! client that trusts another CA, or presents no certificate, is refused in time.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Etcd, ServerTls};
use ha_core::testing::pki::Ca;
use ha_etcd::{EtcdBackend, EtcdConfig};

fn config(etcd: &Etcd, ca_pem: &str, identity: Option<(String, String)>) -> EtcdConfig {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    EtcdConfig::new([etcd.endpoint.clone()])
        .with_prefix(format!("tls-{}", NEXT.fetch_add(1, Ordering::Relaxed)))
        .with_timeouts(Duration::from_secs(5), Duration::from_secs(5))
        .with_tls(
            ca_pem.as_bytes().to_vec(),
            identity.map(|(c, k)| (c.into_bytes(), k.into_bytes())),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_works_and_strangers_are_refused() {
    let files = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cluster_ca = Ca::new("ha test CA");
    let (server_cert, server_key) = cluster_ca.leaf("etcd", &["localhost"]);
    let write = |name: &str, body: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, body).unwrap_or_else(|e| panic!("{e}"));
        path
    };
    let tls = ServerTls {
        ca: write("ca.pem", &cluster_ca.pem()),
        cert: write("server.pem", &server_cert),
        key: write("server-key.pem", &server_key),
    };
    let Some(etcd) = Etcd::start_tls(tls.clone()) else {
        return;
    };
    let client = cluster_ca.leaf("rootcoord", &["localhost"]);
    let ca_pem = cluster_ca.pem();

    // Files work as well as bytes.
    let client_cert = write("client.pem", &client.0);
    let client_key = write("client-key.pem", &client.1);
    let from_files = EtcdConfig::new([etcd.endpoint.clone()])
        .with_tls_files(&tls.ca, Some((client_cert.as_path(), client_key.as_path())))
        .unwrap_or_else(|e| panic!("{e}"));
    EtcdBackend::connect(from_files)
        .await
        .unwrap_or_else(|e| panic!("mTLS from files: {e}"));
    assert!(EtcdConfig::new([etcd.endpoint.clone()])
        .with_tls_files(files.path().join("missing.pem"), None)
        .is_err());

    let report = ha_core::testing::run_suite(|| {
        let config = config(&etcd, &ca_pem, Some(client.clone()));
        async move { Ok((Arc::new(EtcdBackend::connect(config).await?) as _, ())) }
    })
    .await;
    report.assert_passed();

    // A client that trusts another CA, and one without a certificate, are refused.
    let stranger = Ca::new("someone else");
    let stranger_client = stranger.leaf("intruder", &["localhost"]);
    for (what, expected, config) in [
        (
            "wrong CA",
            ha_core::AuthFailure::UntrustedServer,
            config(&etcd, &stranger.pem(), Some(stranger_client.clone())),
        ),
        (
            "no client certificate",
            ha_core::AuthFailure::ClientCertificate,
            config(&etcd, &ca_pem, None),
        ),
        (
            "a client certificate from another CA",
            ha_core::AuthFailure::ClientCertificate,
            config(&etcd, &ca_pem, Some(stranger_client.clone())),
        ),
    ] {
        let started = Instant::now();
        match EtcdBackend::connect(config).await {
            Err(ha_core::Error::Auth { failure, reason }) => {
                eprintln!("{what}: refused ({failure:?}): {reason}");
                assert_eq!(failure, expected, "{what}: {reason}");
            }
            Err(e) => panic!("{what}: expected Auth({expected:?}), got {e:?}"),
            Ok(_) => panic!("{what}: connected"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{what}: took {:?}",
            started.elapsed()
        );
    }
}
