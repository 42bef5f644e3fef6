//! etcd with everything on: TLS, client certificates required (`--client-cert-auth`) and
//! `auth enable` with a least-privilege role (certificates made at test time). A client
//! with the right CA, certificate, user and password passes the whole conformance suite;
//! a wrong CA, a missing client certificate, a wrong password and a user without the
//! role each get `Error::Auth` saying which, in time.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Etcd, ServerTls};
use ha_core::testing::pki::Ca;
use ha_core::{AuthFailure, Backend, Error};
use ha_etcd::{EtcdBackend, EtcdConfig};

/// Runs `etcdctl` against the TLS etcd as root (or before auth is on), with `stdin`.
fn etcdctl(etcd: &Etcd, files: &Path, args: &[&str], stdin: &str) {
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=https://{}", etcd.endpoint))
        .arg(format!("--cacert={}", files.join("ca.pem").display()))
        .arg(format!("--cert={}", files.join("admin.pem").display()))
        .arg(format!("--key={}", files.join("admin-key.pem").display()))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("etcdctl: {e}"));
    if let Some(mut input) = child.stdin.take() {
        use std::io::Write;
        let _ = input.write_all(stdin.as_bytes());
    }
    let output = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("etcdctl: {e}"));
    assert!(
        output.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn config(
    etcd: &Etcd,
    ca_pem: &str,
    identity: Option<&(String, String)>,
    user: Option<(&str, &str)>,
) -> EtcdConfig {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut config = EtcdConfig::new([etcd.endpoint.clone()])
        .with_prefix(format!("coord/{}", NEXT.fetch_add(1, Ordering::Relaxed)))
        .with_timeouts(Duration::from_secs(5), Duration::from_secs(5))
        .with_tls(
            ca_pem.as_bytes().to_vec(),
            identity.map(|(c, k)| (c.clone().into_bytes(), k.clone().into_bytes())),
        );
    if let Some((user, password)) = user {
        config = config.with_user(user, password);
    }
    config
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap_or_else(|e| panic!("{e}"));
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_enabled_etcd_admits_the_right_user_and_names_every_wrong_credential() {
    let files = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let dir = files.path();
    let cluster = Ca::new("etcd test CA");
    let (server_cert, server_key) = cluster.leaf("etcd", &["localhost"]);
    let admin = cluster.leaf("root", &["localhost"]);
    let client = cluster.leaf("rootcoord", &["localhost"]);
    let tls = ServerTls {
        ca: write(dir, "ca.pem", &cluster.pem()),
        cert: write(dir, "server.pem", &server_cert),
        key: write(dir, "server-key.pem", &server_key),
    };
    write(dir, "admin.pem", &admin.0);
    write(dir, "admin-key.pem", &admin.1);
    let Some(etcd) = Etcd::start_tls(tls) else {
        return;
    };
    // Users, the least role (docs/security.md), then auth on. With client-cert-auth, the
    // admin certificate's CN ("root") is the user etcdctl acts as.
    etcdctl(
        &etcd,
        dir,
        &["user", "add", "root", "--interactive=false"],
        "rootpw\n",
    );
    etcdctl(&etcd, dir, &["user", "grant-role", "root", "root"], "");
    etcdctl(&etcd, dir, &["role", "add", "ha-coordinator"], "");
    etcdctl(
        &etcd,
        dir,
        &[
            "role",
            "grant-permission",
            "ha-coordinator",
            "--prefix=true",
            "readwrite",
            "coord/",
        ],
        "",
    );
    etcdctl(
        &etcd,
        dir,
        &["user", "add", "coord", "--interactive=false"],
        "coordpw\n",
    );
    etcdctl(
        &etcd,
        dir,
        &["user", "grant-role", "coord", "ha-coordinator"],
        "",
    );
    etcdctl(
        &etcd,
        dir,
        &["user", "add", "nobody", "--interactive=false"],
        "nobodypw\n",
    );
    etcdctl(&etcd, dir, &["auth", "enable"], "");

    let ca_pem = cluster.pem();
    let report = ha_core::testing::run_suite(|| {
        let config = config(&etcd, &ca_pem, Some(&client), Some(("coord", "coordpw")));
        async move {
            Ok((
                Arc::new(EtcdBackend::connect(config).await?) as Arc<dyn Backend>,
                (),
            ))
        }
    })
    .await;
    report.assert_passed();

    let stranger = Ca::new("someone else");
    let stranger_client = stranger.leaf("intruder", &["localhost"]);
    let cases = [
        (
            "wrong CA",
            AuthFailure::UntrustedServer,
            config(
                &etcd,
                &stranger.pem(),
                Some(&stranger_client),
                Some(("coord", "coordpw")),
            ),
        ),
        (
            "no client certificate",
            AuthFailure::ClientCertificate,
            config(&etcd, &ca_pem, None, Some(("coord", "coordpw"))),
        ),
        (
            "wrong password",
            AuthFailure::BadCredentials,
            config(&etcd, &ca_pem, Some(&client), Some(("coord", "guess"))),
        ),
    ];
    for (what, expected, config) in cases {
        let started = Instant::now();
        match EtcdBackend::connect(config).await {
            Err(Error::Auth { failure, reason }) => {
                eprintln!("{what}: {failure:?}: {reason}");
                assert_eq!(failure, expected, "{what}: {reason}");
            }
            Err(other) => panic!("{what}: expected Auth({expected:?}), got {other:?}"),
            Ok(_) => panic!("{what}: connected"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: took {:?}",
            started.elapsed()
        );
    }
    // A real user without the role: connected, but refused where it writes.
    let backend = EtcdBackend::connect(config(
        &etcd,
        &ca_pem,
        Some(&client),
        Some(("nobody", "nobodypw")),
    ))
    .await
    .unwrap_or_else(|e| panic!("nobody connects: {e}"));
    match backend
        .register(&ha_core::testing::test_member(1), Duration::from_secs(5))
        .await
    {
        Err(Error::Auth {
            failure: AuthFailure::PermissionDenied,
            reason,
        }) => eprintln!("no role: {reason}"),
        other => panic!("a user without the role registered: {other:?}"),
    }
    drop(etcd);
}
