//! The Raft port with TLS (certificates made at test time with rcgen): the whole
//! conformance suite passes through a client with a certificate; a client with the token
//! works too; a client without credentials, with a wrong token, or trusting another CA is
//! refused with an error that says which; a peer with a certificate from another CA
//! cannot vote or append; a peer whose certificate names another node cannot claim to be
//! node 1; a node refuses a non-loopback address without TLS unless told `insecure`;
//! only a node certificate or the admin token may change the membership or take a
//! snapshot (a client certificate or the client token reads the status).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Group;
use ha_core::testing::pki::Ca;
use ha_core::{AuthFailure, Backend, Error};
use ha_raft::proto::peer_client::PeerClient;
use ha_raft::proto::PeerRequest;
use ha_raft::{ClientTls, RaftClient, RaftClientOptions, RaftNode, RaftNodeConfig, RaftTls};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::Vote;
use tonic::transport::{Certificate as TonicCert, ClientTlsConfig, Endpoint, Identity};

const TOKEN: &str = "s3cret-token";

/// The certificate of node `id`: names `node-<id>` and localhost.
fn node_leaf(ca: &Ca, id: u64) -> (String, String) {
    let name = ha_raft::node_name(id);
    ca.leaf(&name, &[&name, "localhost"])
}

struct Pki {
    ca_pem: String,
    nodes: BTreeMap<u64, (String, String)>,
    client: (String, String),
}

fn pki(ca: &Ca) -> Pki {
    Pki {
        ca_pem: ca.pem(),
        nodes: (1..=3).map(|id| (id, node_leaf(ca, id))).collect(),
        client: ca.leaf("rootcoord", &["client-rootcoord"]),
    }
}

async fn tls_group(pki: &Pki) -> Group {
    tls_group_with(pki, None).await
}

/// Three nodes with their certificates, the client token and maybe an admin token.
async fn tls_group_with(pki: &Pki, admin_token: Option<&'static str>) -> Group {
    let ca_pem = pki.ca_pem.clone();
    let nodes = pki.nodes.clone();
    Group::start_with(3, move |config| {
        let (cert, key) = nodes[&config.id].clone();
        let config = config
            .with_tls(RaftTls {
                ca_pem: ca_pem.clone().into_bytes(),
                cert_pem: cert.into_bytes(),
                key_pem: key.into_bytes(),
            })
            .with_client_token(TOKEN);
        match admin_token {
            Some(token) => config.with_admin_token(token),
            None => config,
        }
    })
    .await
}

fn client_options(ca_pem: &str, identity: Option<&(String, String)>) -> RaftClientOptions {
    RaftClientOptions {
        request_timeout: Duration::from_secs(5),
        tls: Some(ClientTls {
            ca_pem: ca_pem.as_bytes().to_vec(),
            identity: identity.map(|(c, k)| (c.clone().into_bytes(), k.clone().into_bytes())),
        }),
        token: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_conformance_suite_passes_over_mutual_tls() {
    let cluster = Ca::new("ha raft test CA");
    let pki = Arc::new(pki(&cluster));
    let report = ha_core::testing::run_suite(|| {
        let pki = Arc::clone(&pki);
        async move {
            let group = tls_group(&pki).await;
            let options = client_options(&pki.ca_pem, Some(&pki.client));
            let client = RaftClient::connect_with(group.peers.values().cloned(), options).await?;
            Ok((Arc::new(client) as Arc<dyn Backend>, group))
        }
    })
    .await;
    report.assert_passed();
}

/// Expects `Error::Auth` with `failure`, within a bound.
async fn refused(what: &str, failure: AuthFailure, options: RaftClientOptions, group: &Group) {
    let started = Instant::now();
    match RaftClient::connect_with(group.peers.values().cloned(), options).await {
        Err(Error::Auth {
            failure: got,
            reason,
        }) => {
            eprintln!("{what}: refused ({got:?}): {reason}");
            assert_eq!(got, failure, "{what}: {reason}");
        }
        Err(other) => panic!("{what}: expected Auth({failure:?}), got {other}"),
        Ok(_) => panic!("{what}: connected"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{what}: took {:?}",
        started.elapsed()
    );
}

/// A TLS channel to a node dialled as `server_name`, presenting `identity`.
fn peer_channel(
    addr: &str,
    ca_pem: &str,
    server_name: &str,
    identity: Option<&(String, String)>,
) -> tonic::transport::Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(TonicCert::from_pem(ca_pem))
        .domain_name(server_name);
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap_or_else(|e| panic!("{e}"))
        .tls_config(tls)
        .unwrap_or_else(|e| panic!("{e}"))
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy()
}

/// Sends one peer RPC with a raw client: `identity` is what the sender presents.
async fn peer_call(
    addr: &str,
    ca_pem: &str,
    server_name: &str,
    identity: Option<&(String, String)>,
    from: u64,
    rpc: &str,
) -> Result<(), tonic::Status> {
    peer_call_naming(addr, ca_pem, server_name, identity, from, from, rpc).await
}

/// [`peer_call`] whose payload's vote names `candidate` (the envelope says `from`).
async fn peer_call_naming(
    addr: &str,
    ca_pem: &str,
    server_name: &str,
    identity: Option<&(String, String)>,
    from: u64,
    candidate: u64,
    rpc: &str,
) -> Result<(), tonic::Status> {
    let mut client = PeerClient::new(peer_channel(addr, ca_pem, server_name, identity));
    let payload = match rpc {
        "vote" => serde_json::to_vec(&VoteRequest::<u64>::new(Vote::new(1, candidate), None)),
        _ => serde_json::to_vec(&AppendEntriesRequest::<ha_raft::TypeConfig> {
            vote: Vote::new(1, candidate),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        }),
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let request = PeerRequest {
        cluster_id: "test-cluster".to_owned(),
        from,
        payload,
    };
    let call = async {
        match rpc {
            "vote" => client.vote(request).await.map(|_| ()),
            _ => client.append_entries(request).await.map(|_| ()),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .unwrap_or_else(|_| panic!("{rpc} from {from}: no answer in 10 s"))
}

/// A vote envelope from `from` whose payload is `size` bytes of padding.
async fn raw_peer_vote(
    addr: &str,
    ca_pem: &str,
    server_name: &str,
    identity: Option<&(String, String)>,
    from: u64,
    size: usize,
) -> Result<(), tonic::Status> {
    let mut client = PeerClient::new(peer_channel(addr, ca_pem, server_name, identity))
        .max_encoding_message_size(usize::MAX);
    let request = PeerRequest {
        cluster_id: "test-cluster".to_owned(),
        from,
        payload: vec![b' '; size],
    };
    tokio::time::timeout(Duration::from_secs(30), client.vote(request))
        .await
        .unwrap_or_else(|_| panic!("no answer in 30 s"))
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_and_say_why() {
    let cluster = Ca::new("ha raft test CA");
    let pki = pki(&cluster);
    let group = tls_group(&pki).await;

    // Clients: the token admits; no credentials, a wrong token, another CA do not.
    let mut with_token = client_options(&pki.ca_pem, None);
    with_token.token = Some(TOKEN.to_owned());
    let client = RaftClient::connect_with(group.peers.values().cloned(), with_token)
        .await
        .unwrap_or_else(|e| panic!("token client: {e}"));
    let lease = client
        .register(&ha_core::testing::test_member(1), Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("token client register: {e}"));
    client
        .campaign(
            lease.id,
            &ha_core::ElectionName::new("tls").unwrap_or_else(|e| panic!("{e}")),
            "a".into(),
        )
        .await
        .unwrap_or_else(|e| panic!("token client campaign: {e}"));

    refused(
        "no certificate, no token",
        AuthFailure::ClientCertificate,
        client_options(&pki.ca_pem, None),
        &group,
    )
    .await;
    let mut wrong_token = client_options(&pki.ca_pem, None);
    wrong_token.token = Some("guess".to_owned());
    refused(
        "wrong token",
        AuthFailure::BadCredentials,
        wrong_token,
        &group,
    )
    .await;
    let stranger = Ca::new("someone else");
    let stranger_client = stranger.leaf("intruder", &["intruder"]);
    refused(
        "trusting another CA",
        AuthFailure::UntrustedServer,
        client_options(&stranger.pem(), Some(&stranger_client)),
        &group,
    )
    .await;

    // Peers. Node 1's address; the caller trusts the real CA (it is public) to get
    // past the server's certificate.
    let addr = group.peers[&1].clone();
    let ca_pem = &pki.ca_pem;
    let rogue_node = node_leaf(&stranger, 4);
    for rpc in ["vote", "append"] {
        let result = peer_call(&addr, ca_pem, "node-1", Some(&rogue_node), 4, rpc).await;
        let status = result
            .err()
            .unwrap_or_else(|| panic!("a rogue CA's node could {rpc}"));
        eprintln!("rogue CA {rpc}: {status}");
        let result = peer_call(&addr, ca_pem, "node-1", None, 2, rpc).await;
        let status = result
            .err()
            .unwrap_or_else(|| panic!("a peer without a certificate could {rpc}"));
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    }
    // Node 2's real certificate, claiming to be node 3: refused; as itself: answered.
    let node2 = &pki.nodes[&2];
    let status = peer_call(&addr, ca_pem, "node-1", Some(node2), 3, "vote")
        .await
        .err()
        .unwrap_or_else(|| panic!("node 2 could vote as node 3"));
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(
        status.message().contains("does not name node 3"),
        "{status}"
    );
    peer_call(&addr, ca_pem, "node-1", Some(node2), 2, "vote")
        .await
        .unwrap_or_else(|e| panic!("node 2 as itself was refused: {e}"));
    // Node 2 as itself, but asking votes for (or leading as) node 3 inside the payload.
    for rpc in ["vote", "append"] {
        let status = peer_call_naming(&addr, ca_pem, "node-1", Some(node2), 2, 3, rpc)
            .await
            .err()
            .unwrap_or_else(|| panic!("node 2 could {rpc} in node 3's name"));
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
        assert!(status.message().contains("node 3"), "{status}");
    }
    // A huge peer message without a certificate is refused for the missing certificate,
    // before its body is read (a body over the size limit would say so instead).
    let huge = raw_peer_vote(&addr, ca_pem, "node-1", None, 2, 80 << 20).await;
    let status = huge
        .err()
        .unwrap_or_else(|| panic!("an 80 MiB stranger's message passed"));
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    // A server that is not who it is dialled as: node 2's address, expected as node 1.
    let other = group.peers[&2].clone();
    let status = peer_call(&other, ca_pem, "node-1", Some(node2), 2, "vote")
        .await
        .err()
        .unwrap_or_else(|| panic!("node 2 passed as node 1"));
    eprintln!("node 2 dialled as node 1: {status}");
    group.shutdown().await;
}

#[tokio::test]
async fn a_non_loopback_address_needs_tls_or_insecure() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    // An address this machine does not have: nothing is ever bound on it.
    let listen = "10.255.255.1:7001"
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let peers: BTreeMap<u64, String> = [(1, "10.255.255.1:7001".to_owned())].into();
    let config = RaftNodeConfig::new(1, listen, peers, dir.path());
    let refused = RaftNode::start(config.clone())
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| panic!("started without TLS on a non-loopback address"));
    assert!(refused.contains("without TLS"), "{refused}");
    assert!(refused.contains("--insecure"), "{refused}");
    // With insecure, it gets past that check (and then fails to bind the address).
    let bind = RaftNode::start(config.with_insecure(true))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(!bind.contains("without TLS"), "{bind}");
    // A client token without TLS would only look like protection: refused.
    let loopback = "127.0.0.1:1".parse().unwrap_or_else(|e| panic!("{e}"));
    let peers: BTreeMap<u64, String> = [(1, "127.0.0.1:1".to_owned())].into();
    let token_only = RaftNodeConfig::new(1, loopback, peers, dir.path()).with_client_token("t");
    let refused = RaftNode::start(token_only)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| panic!("started with a token and no TLS"));
    assert!(refused.contains("needs TLS"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_node_certificates_or_the_admin_token_change_members_or_take_snapshots() {
    use ha_raft::{AdminError, BackupError, MembershipChange, RaftAdmin};
    const ADMIN: &str = "admin-s3cret";
    let cluster = Ca::new("ha raft test CA");
    let pki = pki(&cluster);
    let group = tls_group_with(&pki, Some(ADMIN)).await;
    let endpoints: Vec<String> = group.peers.values().cloned().collect();
    let admin = |options: RaftClientOptions| {
        RaftAdmin::new(endpoints.clone(), options).unwrap_or_else(|e| panic!("{e}"))
    };
    let removal = MembershipChange::Remove { id: 3 };
    let files = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let file = files.path().join("s.snap");

    // A client certificate, or the client token, reads the status and nothing more.
    let mut with_client_token = client_options(&pki.ca_pem, None);
    with_client_token.token = Some(TOKEN.to_owned());
    for (what, options) in [
        (
            "client certificate",
            client_options(&pki.ca_pem, Some(&pki.client)),
        ),
        ("client token", with_client_token),
    ] {
        let client = admin(options);
        assert!(
            client.group_status().await.quorum,
            "{what} reads the status"
        );
        let refused = client.check(&removal).await;
        assert!(
            matches!(refused, Err(AdminError::Unauthorized(_))),
            "{what} may not check a change: {refused:?}"
        );
        let refused = client.change(&removal).await;
        assert!(
            matches!(refused, Err(AdminError::Unauthorized(_))),
            "{what} may not change the membership: {refused:?}"
        );
        let refused = client.save_snapshot(&file).await;
        assert!(
            matches!(
                refused,
                Err(BackupError::Admin(AdminError::Unauthorized(_)))
            ),
            "{what} may not take a snapshot: {refused:?}"
        );
        assert!(!file.exists());
    }

    // A node certificate, or the admin token, may.
    let mut with_admin_token = client_options(&pki.ca_pem, None);
    with_admin_token.token = Some(ADMIN.to_owned());
    for (what, options) in [
        (
            "node certificate",
            client_options(&pki.ca_pem, Some(&pki.nodes[&1])),
        ),
        ("admin token", with_admin_token),
    ] {
        let client = admin(options);
        client
            .check(&removal)
            .await
            .unwrap_or_else(|e| panic!("{what} checks a change: {e}"));
        let header = client
            .save_snapshot(&file)
            .await
            .unwrap_or_else(|e| panic!("{what} takes a snapshot: {e}"));
        let status = client
            .node_status(&endpoints[0])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(header.cluster_id, status.cluster_id);
        assert!(header.index() > 0);
        ha_raft::read_snapshot_file(&file).unwrap_or_else(|e| panic!("{e}"));
        std::fs::remove_file(&file).unwrap_or_else(|e| panic!("{e}"));
    }
    group.shutdown().await;
}
