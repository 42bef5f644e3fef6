//! `ha::connect`: every URL either gives a backend or a typed error that says what is wrong.

use ha::Error;

#[tokio::test]
async fn memory_url_gives_a_memory_backend() {
    for url in ["memory://", "memory:///"] {
        let backend = ha::connect(url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(backend.name(), "memory");
    }
}

#[tokio::test]
async fn malformed_and_unknown_urls_are_invalid_arguments() {
    for (url, says) in [
        ("", "no scheme"),
        ("localhost:2379", "no scheme"),
        ("zookeeper://h:2181", "unknown scheme"),
        ("MEMORY://", "unknown scheme"),
        ("memory://somewhere", "takes no host"),
    ] {
        match ha::connect(url).await {
            Err(Error::InvalidArgument {
                what: "url",
                reason,
            }) => {
                assert!(reason.contains(says), "{url:?}: {reason}")
            }
            other => panic!("{url:?} gave {other:?}"),
        }
    }
}

#[cfg(not(feature = "etcd"))]
#[tokio::test]
async fn backends_not_compiled_in_name_their_feature() {
    for (url, feature) in [("etcd://127.0.0.1:2379", "etcd")] {
        match ha::connect(url).await {
            Err(Error::FeatureDisabled { feature: f, .. }) => {
                assert_eq!(f, feature);
                let message = Error::FeatureDisabled {
                    scheme: f,
                    feature: f,
                }
                .to_string();
                assert!(message.contains("enable the Cargo feature"), "{message}");
            }
            other => panic!("{url} gave {other:?}"),
        }
    }
}

#[tokio::test]
async fn raft_urls_are_checked_and_unreachable_groups_are_unavailable() {
    for url in [
        "raft://",
        "raft://127.0.0.1:1,",
        "raft://127.0.0.1:1/x",
        "raft://nohostport",
    ] {
        match ha::connect(url).await {
            Err(Error::InvalidArgument { what: "url", .. }) => {}
            other => panic!("{url:?} gave {other:?}"),
        }
    }
    // Nothing listens on port 1 of loopback.
    let started = std::time::Instant::now();
    match ha::connect("raft://127.0.0.1:1").await {
        Err(Error::Unavailable(reason)) => assert!(reason.contains("127.0.0.1:1"), "{reason}"),
        other => panic!("unreachable group gave {other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[cfg(feature = "etcd")]
#[tokio::test]
async fn etcd_urls_are_checked_and_unreachable_clusters_are_unavailable() {
    for url in ["etcd://", "etcd://127.0.0.1:1,", "etcd://nohostport/x"] {
        match ha::connect(url).await {
            Err(Error::InvalidArgument { what: "url", .. }) => {}
            other => panic!("{url:?} gave {other:?}"),
        }
    }
    let started = std::time::Instant::now();
    match ha::connect("etcd://127.0.0.1:1/prefix").await {
        Err(Error::Unavailable(_)) | Err(Error::Timeout { .. }) => {}
        other => panic!("unreachable etcd gave {other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

/// A CA file that is not PEM gets the same typed error on every backend, naming it.
#[cfg(all(feature = "raft", feature = "etcd"))]
#[tokio::test]
async fn a_bad_tls_file_says_the_same_on_raft_and_etcd() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let junk = dir.path().join("ca.pem");
    std::fs::write(&junk, b"not a certificate").unwrap_or_else(|e| panic!("{e}"));
    let options = ha::ConnectOptions {
        ca_file: Some(junk.clone()),
        ..ha::ConnectOptions::default()
    };
    for url in ["raft://127.0.0.1:1", "etcd://127.0.0.1:1"] {
        match ha::connect_with(url, &options).await {
            Err(Error::InvalidArgument {
                what: "tls",
                reason,
            }) => assert!(
                reason.contains("is not PEM") && reason.contains(&junk.display().to_string()),
                "{url}: {reason}"
            ),
            other => panic!("{url} with a non-PEM CA gave {other:?}"),
        }
    }
}
