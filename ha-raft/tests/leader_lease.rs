//! The leader lease the lessor's shortened grant rests on (src/lessor.rs): a follower
//! that heard from its leader refuses votes for `RaftNodeConfig::leader_lease()`, and a
//! restarted node refuses votes for as long. If an openraft upgrade changes either, this
//! fails; recheck the grant before changing the test.

mod common;

use std::time::Duration;

use common::Group;
use ha_raft::proto::peer_client::PeerClient;
use ha_raft::proto::PeerRequest;
use ha_raft::RaftNode;
use openraft::raft::VoteRequest;
use openraft::{CommittedLeaderId, LogId, Vote};

/// A vote request from `candidate` in `term` whose log is ahead of everyone's, so only
/// the leader lease can make a voter refuse it.
fn vote_request(term: u64, candidate: u64) -> VoteRequest<u64> {
    VoteRequest::new(
        Vote::new(term, candidate),
        Some(LogId::new(
            CommittedLeaderId::new(term, candidate),
            u64::MAX / 2,
        )),
    )
}

fn term_of(node: &RaftNode) -> u64 {
    node.raft().metrics().borrow().current_term
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_refuses_votes_for_the_leader_lease_after_its_leader_went_silent() {
    // A long lease, so the margins are hundreds of milliseconds.
    let heartbeat = Duration::from_millis(50);
    let mut group = Group::start_with(3, move |config| {
        config.with_timing(
            heartbeat,
            (Duration::from_millis(1500), Duration::from_millis(3000)),
        )
    })
    .await;
    let leader = group.wait_for_leader().await;
    let follower = group.follower().await;
    let lease = Duration::from_millis(3000);
    let candidate = (1..=3u64)
        .find(|id| *id != leader && *id != follower.raft().metrics().borrow().id)
        .unwrap_or_else(|| panic!("no third node"));
    // Let the follower hear a few heartbeats, then silence the leader.
    tokio::time::sleep(heartbeat * 4).await;
    group.kill(leader).await;
    let silenced = tokio::time::Instant::now();

    // 90 % of the lease after the last heartbeat at the latest: the lessor's shortened
    // grant assumes a refusal this long (2 * CLOCK_DRIFT of the lease is its margin).
    tokio::time::sleep_until(silenced + lease.mul_f64(0.9) - heartbeat * 2).await;
    let term = term_of(&follower);
    let reply = follower
        .raft()
        .vote(vote_request(term + 10, candidate))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !reply.vote_granted,
        "the follower granted a vote within the leader lease: openraft no longer refuses \
         votes for election_timeout_max after hearing from its leader; the lessor's \
         shortened grant (src/lessor.rs) is unsafe until this is rechecked"
    );

    // After the lease (and before the third node's own election, at lease + 1.5 s at
    // the earliest) the same request is granted: the refusal was the lease.
    tokio::time::sleep_until(silenced + lease + Duration::from_millis(300)).await;
    let reply = follower
        .raft()
        .vote(vote_request(term + 20, candidate))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        reply.vote_granted,
        "no vote after the leader lease passed: {reply:?}"
    );
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_votes_for_no_one_for_a_leader_lease() {
    let mut group = Group::start(3).await;
    let follower = group.follower().await;
    let id = follower.raft().metrics().borrow().id;
    let lease = Duration::from_millis(800); // test_config's longest election timeout
    let candidate = (1..=3u64)
        .find(|other| *other != id)
        .unwrap_or_else(|| panic!("no other node"));
    group.kill(id).await;
    group.restart(id).await;
    let restarted = tokio::time::Instant::now();
    let mut peer = PeerClient::connect(format!("http://{}", group.peers[&id]))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let request = |term: u64| PeerRequest {
        cluster_id: "test-cluster".to_owned(),
        from: candidate,
        payload: serde_json::to_vec(&vote_request(term, candidate))
            .unwrap_or_else(|e| panic!("{e}")),
    };
    let term = term_of(&group.nodes[&id]);
    let status = peer
        .vote(request(term + 10))
        .await
        .err()
        .unwrap_or_else(|| panic!("a node restarted just now answered a vote request"));
    assert!(
        restarted.elapsed() < lease,
        "the check came too late to mean anything"
    );
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("leader lease"), "{status:?}");

    tokio::time::sleep_until(restarted + lease + Duration::from_millis(100)).await;
    let reply = peer.vote(request(term + 20)).await;
    assert!(
        reply.is_ok(),
        "still no answer a leader lease after the restart: {reply:?}"
    );
    group.shutdown().await;
}
