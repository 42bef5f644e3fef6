//! Bad input to a Raft node gets a typed error, never a panic, and the node keeps working.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::Group;
use ha_core::{Backend, Error, Member, Role, ServerId};
use ha_raft::proto::coordination_client::CoordinationClient;
use ha_raft::proto::peer_client::PeerClient;
use ha_raft::proto::{self, PeerRequest};
use ha_raft::{RaftNode, RaftNodeConfig};
use tokio::io::AsyncWriteExt;

fn member(id: u64) -> Member {
    Member::new(
        ServerId::new(id),
        Role::new("coord").unwrap_or_else(|e| panic!("{e}")),
        "x",
    )
}

async fn still_works(backend: &Arc<dyn Backend>, id: u64) {
    let lease = backend
        .register(&member(id), Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("node stopped working: {e}"));
    backend
        .revoke(lease.id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_port_and_refused_peers() {
    let group = Group::start(3).await;
    let target = group.peers[&1].clone();
    let backend = group.backend(1);

    // Raw garbage, then an HTTP/1 request, on fresh connections.
    for payload in [
        (0..65_536u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect::<Vec<u8>>(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\xff\xff\xff\xff".to_vec(),
    ] {
        let mut stream = tokio::net::TcpStream::connect(&target)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = stream.write_all(&payload).await;
        let _ = stream.shutdown().await;
    }
    still_works(&backend, 1).await;

    let mut peer = PeerClient::connect(format!("http://{target}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let vote = |cluster_id: &str, from: u64, payload: &[u8]| PeerRequest {
        cluster_id: cluster_id.to_owned(),
        from,
        payload: payload.to_vec(),
    };
    // Wrong cluster id.
    let status = peer
        .vote(vote("other-cluster", 2, b"{}"))
        .await
        .err()
        .unwrap_or_else(|| panic!("a foreign cluster's vote was accepted"));
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("cluster id mismatch"),
        "{}",
        status.message()
    );
    // A node id that is not a member.
    let status = peer
        .append_entries(vote("test-cluster", 99, b"{}"))
        .await
        .err()
        .unwrap_or_else(|| panic!("an unknown node was accepted"));
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert!(
        status.message().contains("not a member"),
        "{}",
        status.message()
    );
    // A member with an undecodable payload.
    let status = peer
        .propose(vote("test-cluster", 2, b"\xff\x00 not json"))
        .await
        .err()
        .unwrap_or_else(|| panic!("garbage payload accepted"));
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // Client API: messages with missing or invalid fields.
    let mut client = CoordinationClient::connect(format!("http://{target}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = client
        .register(proto::RegisterRequest {
            member: None,
            ttl_ms: 10_000,
        })
        .await
        .err()
        .unwrap_or_else(|| panic!("register without a member accepted"));
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    for election in ["", "a/b", "nul\0"] {
        let status = client
            .campaign(proto::CampaignRequest {
                lease: 1,
                election: election.into(),
                value: vec![],
            })
            .await
            .err()
            .unwrap_or_else(|| panic!("campaign in {election:?} accepted"));
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{election:?}");
    }
    let status = client
        .register(proto::RegisterRequest {
            member: Some(proto::Member {
                server_id: 1,
                role: "coord".into(),
                address: "x".into(),
                metadata: Default::default(),
            }),
            ttl_ms: 1,
        })
        .await
        .err()
        .unwrap_or_else(|| panic!("a 1 ms TTL was accepted"));
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("ttl"), "{}", status.message());

    // A client request far over any limit is refused by its size before it is decoded
    // (the client API's limit is 4 MiB, the peer service's 16 MiB).
    let mut big_sender = client.clone().max_encoding_message_size(usize::MAX);
    let status = big_sender
        .campaign(proto::CampaignRequest {
            lease: 1,
            election: "e".into(),
            value: vec![0; 5 << 20],
        })
        .await
        .err()
        .unwrap_or_else(|| panic!("a 5 MiB client request was accepted"));
    assert!(
        status.message().contains("message length too large"),
        "{status}"
    );

    still_works(&backend, 2).await;
    drop(backend);
    group.shutdown().await;
}

fn single(dir: &std::path::Path) -> RaftNodeConfig {
    let port = common::free_ports(1)[0];
    let peers: BTreeMap<u64, String> = [(1, format!("127.0.0.1:{port}"))].into_iter().collect();
    common::test_config(1, &peers, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_corrupt_and_misconfigured_data_dirs_are_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let node = RaftNode::start(single(dir.path()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    node.shutdown().await;
    drop(node);

    // The same dir, another cluster.
    match RaftNode::start(single(dir.path()).with_cluster_id("someone-else")).await {
        Err(e) => assert!(
            e.to_string()
                .contains("belongs to node 1 of cluster \"test-cluster\""),
            "{e}"
        ),
        Ok(_) => panic!("a foreign cluster's data dir was opened"),
    }
    // The same dir, another node id.
    let mut other = single(dir.path());
    other.id = 2;
    other.peers = [(2, other.listen.to_string())].into_iter().collect();
    match RaftNode::start(other).await {
        Err(e) => assert!(e.to_string().contains("belongs to node 1"), "{e}"),
        Ok(_) => panic!("another node's data dir was opened"),
    }

    // A directory of garbage where sled expects its files.
    let corrupt = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for name in ["conf", "db", "blobs"] {
        std::fs::write(corrupt.path().join(name), b"\x00garbage\xffnot sled at all")
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let opened = RaftNode::start(single(corrupt.path())).await;
    assert!(opened.is_err(), "a corrupt data dir was opened");

    // A data dir path that is a file.
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap_or_else(|e| panic!("{e}"));
    assert!(RaftNode::start(single(&file)).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_data_dir_is_private_and_a_dir_holding_other_files_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let fresh = parent.path().join("node-1");
    let node = RaftNode::start(single(&fresh))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    node.shutdown().await;
    let mode = std::fs::metadata(&fresh)
        .unwrap_or_else(|e| panic!("{e}"))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "a new data dir is {:o}", mode & 0o777);

    // Someone's home directory, given as --data by mistake: nothing is written there.
    let home = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(home.path().join("notes.txt"), b"mine").unwrap_or_else(|e| panic!("{e}"));
    match RaftNode::start(single(home.path())).await {
        Err(e) => assert!(
            e.to_string().contains("not empty") && e.to_string().contains("notes.txt"),
            "{e}"
        ),
        Ok(_) => panic!("a directory holding other files was used as a data dir"),
    }
    let entries: Vec<_> = std::fs::read_dir(home.path())
        .unwrap_or_else(|e| panic!("{e}"))
        .collect();
    assert_eq!(entries.len(), 1, "files were written into the refused dir");
}

#[tokio::test]
async fn invalid_configurations_are_invalid_arguments() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let base = single(dir.path());
    let cases = [
        base.clone().with_cluster_id(""),
        base.clone().with_timing(
            Duration::from_millis(500),
            (Duration::from_millis(400), Duration::from_millis(800)),
        ),
        base.clone().with_timing(
            Duration::from_millis(100),
            (Duration::from_millis(800), Duration::from_millis(800)),
        ),
        base.clone().with_advertise("127.0.0.1:1"),
        base.clone().with_snapshot_every(0),
    ];
    for config in cases {
        match RaftNode::start(config.clone()).await {
            Err(Error::InvalidArgument {
                what: "raft configuration",
                ..
            }) => {}
            other => panic!("{config:?} gave {:?}", other.map(|n| n.id())),
        }
    }
    // A port that is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let addr = taken.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let peers: BTreeMap<u64, String> = [(1, addr.to_string())].into_iter().collect();
    let dir2 = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    match RaftNode::start(common::test_config(1, &peers, dir2.path())).await {
        Err(Error::InvalidArgument { reason, .. }) => {
            assert!(reason.contains("cannot listen"), "{reason}")
        }
        other => panic!("a taken port gave {:?}", other.map(|n| n.id())),
    }
}

/// A bearer token in cleartext to another host is refused before anything is sent.
#[tokio::test]
async fn a_token_without_tls_to_another_host_is_refused() {
    let options = ha_raft::RaftClientOptions {
        token: Some("secret".into()),
        ..Default::default()
    };
    match ha_raft::RaftClient::connect_with(["node.invalid:7001"], options).await {
        Err(ha_core::Error::InvalidArgument {
            what: "tls",
            reason,
        }) => {
            assert!(reason.contains("without TLS"), "{reason}")
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}
