//! etcd serving clients over TLS and requiring client certificates (certificates made at
//! test time): the right CA and client certificate pass the whole conformance suite; a
//! client that trusts another CA, or presents no certificate, is refused in time.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Etcd, ServerTls};
use ha_etcd::{EtcdBackend, EtcdConfig};
use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair, SanType};

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
    Ca { cert, key }
}

/// A certificate for 127.0.0.1 signed by `ca`: (cert PEM, key PEM).
fn leaf(ca: &Ca, name: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned()]).unwrap_or_else(|e| panic!("{e}"));
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params
        .signed_by(&key, &ca.cert, &ca.key)
        .unwrap_or_else(|e| panic!("{e}"));
    (cert.pem(), key.serialize_pem())
}

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
    let cluster_ca = ca("ha test CA");
    let (server_cert, server_key) = leaf(&cluster_ca, "etcd");
    let write = |name: &str, body: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, body).unwrap_or_else(|e| panic!("{e}"));
        path
    };
    let tls = ServerTls {
        ca: write("ca.pem", &cluster_ca.cert.pem()),
        cert: write("server.pem", &server_cert),
        key: write("server-key.pem", &server_key),
    };
    let Some(etcd) = Etcd::start_tls(tls.clone()) else {
        return;
    };
    let client = leaf(&cluster_ca, "rootcoord");
    let ca_pem = cluster_ca.cert.pem();

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
    let stranger = ca("someone else");
    let stranger_client = leaf(&stranger, "intruder");
    for (what, config) in [
        (
            "wrong CA",
            config(&etcd, &stranger.cert.pem(), Some(stranger_client)),
        ),
        ("no client certificate", config(&etcd, &ca_pem, None)),
    ] {
        let started = Instant::now();
        match EtcdBackend::connect(config).await {
            Err(e) => eprintln!("{what}: refused with {e}"),
            Ok(_) => panic!("{what}: connected"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{what}: took {:?}",
            started.elapsed()
        );
    }
}
