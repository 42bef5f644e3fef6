//! `RaftAdmin`: the admin API from outside the group (`ha status`, `ha member`) or from
//! a node joining it (`ha node --join`). Status is asked of every member; a change goes
//! to whichever node leads, following the "not the leader" answers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures::future::join_all;
use serde::{Deserialize, Serialize};
use tokio::time::{sleep, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::admin::{AdminError, MembershipReport, NodeStatus};
use crate::backup::{BackupError, SnapshotHeader, SnapshotWriter, CHUNK_BYTES};
use crate::channel::{channel, BearerToken};
use crate::command::NodeId;
use crate::membership::{MembershipChange, MembershipRefusal};
use crate::proto::admin_client::AdminClient;
use crate::proto::AdminRequest;
use crate::{RaftClientOptions, RaftNode};
use ha_core::ClientTls;

type Api = AdminClient<InterceptedService<Channel, BearerToken>>;

/// The most one node's status may take to arrive before it counts as unreachable.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest admin reply decoded (a status lists every member).
const MAX_REPLY: usize = 4 << 20;

/// A client of a group's admin API. Cheap to create; connects on first use.
#[derive(Debug)]
pub struct RaftAdmin {
    endpoints: Vec<String>,
    tls: Option<ClientTls>,
    token: Option<String>,
    request_timeout: Duration,
    channels: Mutex<HashMap<String, Api>>,
}

/// A member's place in the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberKind {
    /// Votes and counts for quorum.
    Voter,
    /// Replicates, does not vote.
    Learner,
    /// Answered, but is not in the group's membership (removed, or not joined yet).
    Outside,
}

/// One member in [`GroupStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Its node id.
    pub id: NodeId,
    /// Its address in the membership (or the one it answered at).
    pub address: String,
    /// Voter, learner or outside.
    pub kind: MemberKind,
    /// What it said of itself; `None` when it did not answer.
    pub status: Option<NodeStatus>,
    /// Why it did not answer.
    pub error: Option<String>,
    /// Entries behind the Raft leader, as the leader sees it.
    pub lag: Option<u64>,
    /// Milliseconds since it last answered the Raft leader.
    pub last_contact_ms: Option<u64>,
}

/// The group as its members describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// The Raft leader, when one answered as leader.
    pub leader: Option<NodeId>,
    /// Whether a majority of the voters answered and a leader leads them.
    pub quorum: bool,
    /// Every member, voters first, then learners, then nodes outside the membership.
    pub members: Vec<MemberStatus>,
    /// Addresses that were asked and did not answer, with the reason, that the
    /// membership does not name (a wrong endpoint, or a member known by another address).
    pub unreachable: BTreeMap<String, String>,
}

/// How [`RaftAdmin::remove`] removed a member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    /// The membership afterwards.
    pub report: MembershipReport,
    /// The member resigned its role and removed itself (it answered and runs under an
    /// owner that handles leave requests); false: the leader removed it.
    pub left_on_its_own: bool,
}

/// The two requests only the Raft leader answers.
#[derive(Debug, Clone, Copy)]
enum LeaderCall {
    Change,
    Check,
}

/// How a join ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinOutcome {
    /// The node is a learner (as asked).
    Learner,
    /// The node is a voter.
    Voter,
}

impl RaftAdmin {
    /// An admin client of the group reachable at `endpoints` (`host:port`), with the
    /// TLS settings, token and per-request timeout of `options`.
    ///
    /// # Errors
    /// `InvalidArgument` for no endpoints, a malformed one, or a token that would go
    /// out without TLS.
    pub fn new<I, S>(endpoints: I, options: RaftClientOptions) -> Result<Self, AdminError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let endpoints: Vec<String> = endpoints.into_iter().map(Into::into).collect();
        if endpoints.is_empty() {
            return Err(AdminError::InvalidArgument(
                "a raft:// URL needs at least one host:port".into(),
            ));
        }
        let admin = Self {
            endpoints,
            tls: options.tls,
            token: options.token,
            request_timeout: options.request_timeout,
            channels: Mutex::new(HashMap::new()),
        };
        for endpoint in &admin.endpoints {
            admin.api(endpoint)?;
        }
        Ok(admin)
    }

    fn api(&self, address: &str) -> Result<Api, AdminError> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(api) = channels.get(address) {
            return Ok(api.clone());
        }
        let invalid = |e: ha_core::Error| AdminError::InvalidArgument(e.to_string());
        let token = BearerToken::new(
            self.token.as_deref(),
            self.tls.is_some(),
            &[address.to_owned()],
        )
        .map_err(invalid)?;
        let api = AdminClient::with_interceptor(
            channel(address, self.tls.as_ref()).map_err(invalid)?,
            token,
        )
        .max_decoding_message_size(MAX_REPLY);
        channels.insert(address.to_owned(), api.clone());
        Ok(api)
    }

    /// What the node at `address` says of itself and its group.
    ///
    /// # Errors
    /// `Unavailable` when it does not answer within 2 s (or the request timeout),
    /// `Unauthorized` when the credentials are refused.
    pub async fn node_status(&self, address: &str) -> Result<NodeStatus, AdminError> {
        let mut api = self.api(address)?;
        let wait = STATUS_TIMEOUT.min(self.request_timeout);
        let call = api.status(AdminRequest { payload: vec![] });
        let reply = tokio::time::timeout(wait, call)
            .await
            .map_err(|_| {
                AdminError::Unavailable(format!("{address} did not answer within {wait:?}"))
            })?
            .map_err(|status| AdminError::from_status(&status))?;
        serde_json::from_slice(&reply.get_ref().payload).map_err(|e| {
            AdminError::Unavailable(format!("{address} sent an undecodable status: {e}"))
        })
    }

    /// Asks every endpoint, then every member they name, for its status.
    pub async fn group_status(&self) -> GroupStatus {
        self.group_status_via(&self.endpoints).await
    }

    async fn group_status_via(&self, endpoints: &[String]) -> GroupStatus {
        let mut answers: BTreeMap<String, Result<NodeStatus, AdminError>> = BTreeMap::new();
        self.ask(endpoints, &mut answers).await;
        let reference = reference_status(&answers).cloned();
        let named: Vec<String> = reference
            .iter()
            .flat_map(|s| s.voters.values().chain(s.learners.values()))
            .filter(|address| !answers.contains_key(*address))
            .cloned()
            .collect();
        self.ask(&named, &mut answers).await;
        // The leader may be among the members only now asked.
        let reference = reference_status(&answers).cloned();
        assemble(reference.as_ref(), answers)
    }

    async fn ask(
        &self,
        addresses: &[String],
        answers: &mut BTreeMap<String, Result<NodeStatus, AdminError>>,
    ) {
        let asked = join_all(
            addresses
                .iter()
                .map(|address| async move { (address.clone(), self.node_status(address).await) }),
        )
        .await;
        answers.extend(asked);
    }

    /// Carries out a membership change on the Raft leader, found through the
    /// endpoints and the "not the leader" answers, retrying while no leader is known
    /// or another change is in progress, until the request timeout.
    ///
    /// # Errors
    /// `Refused` (nothing changed), `Unauthorized`, `Timeout` (the outcome is unknown),
    /// or `Unavailable` when no leader answered in time.
    pub async fn change(&self, change: &MembershipChange) -> Result<MembershipReport, AdminError> {
        let (address, payload) = self.on_leader(LeaderCall::Change, change).await?;
        serde_json::from_slice(&payload)
            .map_err(|e| AdminError::Unavailable(format!("undecodable reply from {address}: {e}")))
    }

    /// Whether the Raft leader would allow `change` now, without making it.
    ///
    /// # Errors
    /// As [`change`](Self::change); `Refused` says why not.
    pub async fn check(&self, change: &MembershipChange) -> Result<(), AdminError> {
        self.on_leader(LeaderCall::Check, change).await.map(drop)
    }

    /// Removes member `id` from the group. A member that answers and whose owner
    /// handles leave requests (`ha node`) leaves on purpose: it resigns its coordinator
    /// role, then removes itself and stops; this waits, within the request timeout,
    /// until the membership no longer names it. A member that does not answer (a dead
    /// device) is removed by the leader directly. The change is checked first: a
    /// refused one changes nothing and asks nothing of the member.
    ///
    /// # Errors
    /// As [`change`](Self::change).
    pub async fn remove(&self, id: NodeId) -> Result<Removal, AdminError> {
        let change = MembershipChange::Remove { id };
        self.check(&change).await?;
        let group = self.group_status().await;
        let member = group
            .members
            .iter()
            .find(|m| m.id == id && m.kind != MemberKind::Outside && m.status.is_some());
        if let Some(member) = member {
            if self.ask_to_leave(&member.address).await {
                // The member stops once it is out: ask the others how it went.
                let others: Vec<String> = group
                    .members
                    .iter()
                    .filter(|m| m.id != id)
                    .map(|m| m.address.clone())
                    .chain(self.endpoints.iter().cloned())
                    .collect();
                return self.until_gone(id, &others).await;
            }
        }
        let report = self.change(&change).await?;
        Ok(Removal {
            report,
            left_on_its_own: false,
        })
    }

    /// Asks the node at `address` to leave; true when its owner took the request.
    async fn ask_to_leave(&self, address: &str) -> bool {
        let Ok(mut api) = self.api(address) else {
            return false;
        };
        let wait = STATUS_TIMEOUT.min(self.request_timeout);
        match tokio::time::timeout(wait, api.leave(AdminRequest { payload: vec![] })).await {
            Ok(Ok(reply)) => {
                serde_json::from_slice::<bool>(&reply.get_ref().payload).unwrap_or(false)
            }
            _ => false,
        }
    }

    /// Waits until the group's membership no longer names `id`.
    async fn until_gone(&self, id: NodeId, via: &[String]) -> Result<Removal, AdminError> {
        let deadline = Instant::now() + self.request_timeout;
        loop {
            let group = self.group_status_via(via).await;
            let named = group
                .members
                .iter()
                .any(|m| m.id == id && m.kind != MemberKind::Outside);
            if group.quorum && !named {
                let of = |kind: MemberKind| {
                    group
                        .members
                        .iter()
                        .filter(|m| m.kind == kind)
                        .map(|m| (m.id, m.address.clone()))
                        .collect()
                };
                let report = MembershipReport {
                    voters: of(MemberKind::Voter),
                    learners: of(MemberKind::Learner),
                    changed: true,
                };
                return Ok(Removal {
                    report,
                    left_on_its_own: true,
                });
            }
            if Instant::now() >= deadline {
                return Err(AdminError::Timeout {
                    after: self.request_timeout,
                });
            }
            sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends one leader-only request, following the "not the leader" answers and
    /// retrying transient errors until the request timeout; the leader's address and
    /// its reply.
    async fn on_leader(
        &self,
        call: LeaderCall,
        change: &MembershipChange,
    ) -> Result<(String, Vec<u8>), AdminError> {
        let deadline = Instant::now() + self.request_timeout;
        let payload = serde_json::to_vec(change)
            .map_err(|e| AdminError::InvalidArgument(format!("encode: {e}")))?;
        let mut next: VecDeque<String> = VecDeque::new();
        let mut last = AdminError::Unavailable(format!(
            "no Raft leader answered through {:?} within {:?}",
            self.endpoints, self.request_timeout
        ));
        while Instant::now() < deadline {
            let Some(address) = next.pop_front() else {
                next.extend(self.endpoints.iter().cloned());
                sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut api = self.api(&address)?;
            let request = AdminRequest {
                payload: payload.clone(),
            };
            let answer = match call {
                LeaderCall::Change => {
                    tokio::time::timeout_at(deadline, api.change_membership(request)).await
                }
                LeaderCall::Check => {
                    tokio::time::timeout_at(deadline, api.check_membership(request)).await
                }
            };
            let outcome = match answer {
                Err(_) => {
                    return Err(AdminError::Timeout {
                        after: self.request_timeout,
                    })
                }
                Ok(Ok(reply)) => return Ok((address, reply.into_inner().payload)),
                Ok(Err(status)) => AdminError::from_status(&status),
            };
            match outcome {
                AdminError::NotLeader {
                    leader: Some((_, leader)),
                    ..
                } if leader != address => next.push_front(leader),
                error if error.is_transient() => {
                    last = error;
                    if next.is_empty() {
                        sleep(Duration::from_millis(100)).await;
                    }
                }
                error => return Err(error),
            }
        }
        Err(last)
    }
}

impl RaftAdmin {
    /// Saves the group's state, as of a linearizable read, to `path`: streamed from the
    /// first endpoint that serves it, each part within the request timeout, checked
    /// against the header's length and checksum, synced, then renamed into place.
    ///
    /// # Errors
    /// `Admin` when no endpoint served it (`Unauthorized` without a node certificate
    /// or the admin token), `Damaged` for a transfer that does not match its header,
    /// `Io` for the file.
    pub async fn save_snapshot(&self, path: &Path) -> Result<SnapshotHeader, BackupError> {
        let mut last = AdminError::Unavailable("no endpoint".into());
        for address in &self.endpoints {
            match self.snapshot_from(address, path).await {
                Err(BackupError::Admin(e)) if e.is_transient() => last = e,
                done => return done,
            }
        }
        Err(BackupError::Admin(last))
    }

    async fn snapshot_from(
        &self,
        address: &str,
        path: &Path,
    ) -> Result<SnapshotHeader, BackupError> {
        let mut api = self
            .api(address)?
            .max_decoding_message_size(CHUNK_BYTES + (64 << 10));
        let wait = self.request_timeout;
        let late = || {
            BackupError::Admin(AdminError::Unavailable(format!(
                "{address} sent no part of the snapshot within {wait:?}"
            )))
        };
        let status = |s: tonic::Status| BackupError::Admin(AdminError::from_status(&s));
        let call = api.snapshot(AdminRequest { payload: vec![] });
        let mut stream = tokio::time::timeout(wait, call)
            .await
            .map_err(|_| late())?
            .map_err(status)?
            .into_inner();
        let first = tokio::time::timeout(wait, stream.message())
            .await
            .map_err(|_| late())?
            .map_err(status)?;
        let first = first.ok_or_else(|| {
            BackupError::Admin(AdminError::Unavailable(format!(
                "{address} sent an empty snapshot stream"
            )))
        })?;
        let header: SnapshotHeader =
            serde_json::from_slice(&first.payload).map_err(|e| BackupError::NotASnapshot {
                path: path.to_path_buf(),
                reason: format!("{address} sent an undecodable header: {e}"),
            })?;
        let mut writer = SnapshotWriter::create(path, header)?;
        // Bounded: the writer refuses more bytes than the header announced.
        while let Some(part) = tokio::time::timeout(wait, stream.message())
            .await
            .map_err(|_| late())?
            .map_err(status)?
        {
            writer.write(&part.payload)?;
        }
        writer.finish()
    }
}

/// The status whose membership the group view is built on: the leader's of the highest
/// term, else the newest membership any member has.
fn reference_status(
    answers: &BTreeMap<String, Result<NodeStatus, AdminError>>,
) -> Option<&NodeStatus> {
    let answered = || answers.values().filter_map(|a| a.as_ref().ok());
    answered()
        .filter(|s| s.state == "leader")
        .max_by_key(|s| s.term)
        .or_else(|| answered().max_by_key(|s| (s.membership_index, s.term)))
}

fn assemble(
    reference: Option<&NodeStatus>,
    mut answers: BTreeMap<String, Result<NodeStatus, AdminError>>,
) -> GroupStatus {
    let leading = reference.filter(|s| s.state == "leader");
    let mut members = Vec::new();
    let listed = reference
        .iter()
        .flat_map(|s| {
            let voters = s
                .voters
                .iter()
                .map(|(id, a)| (*id, a.clone(), MemberKind::Voter));
            let learners = s
                .learners
                .iter()
                .map(|(id, a)| (*id, a.clone(), MemberKind::Learner));
            voters.chain(learners).collect::<Vec<_>>()
        })
        .collect::<Vec<_>>();
    for (id, address, kind) in listed {
        let answer = answers.remove(&address);
        let progress = leading.and_then(|l| l.peers.get(&id));
        let is_leader = leading.is_some_and(|l| l.id == id);
        let (status, error) = match answer {
            Some(Ok(status)) if status.id == id => (Some(status), None),
            Some(Ok(status)) => (
                None,
                Some(format!("node {} answered at this address", status.id)),
            ),
            Some(Err(e)) => (None, Some(e.to_string())),
            None => (None, Some("not asked".to_owned())),
        };
        members.push(MemberStatus {
            id,
            address,
            kind,
            status,
            error,
            lag: if is_leader {
                Some(0)
            } else {
                progress.and_then(|p| p.lag)
            },
            last_contact_ms: progress.and_then(|p| p.last_contact_ms),
        });
    }
    let mut unreachable = BTreeMap::new();
    for (address, answer) in answers {
        match answer {
            Ok(status) => members.push(MemberStatus {
                id: status.id,
                address,
                kind: MemberKind::Outside,
                status: Some(status),
                error: None,
                lag: None,
                last_contact_ms: None,
            }),
            Err(e) => {
                unreachable.insert(address, e.to_string());
            }
        }
    }
    let voters = members
        .iter()
        .filter(|m| m.kind == MemberKind::Voter)
        .count();
    let answering_voters = members
        .iter()
        .filter(|m| m.kind == MemberKind::Voter)
        .filter(|m| m.status.as_ref().is_some_and(|s| s.state != "stopped"))
        .count();
    GroupStatus {
        leader: leading.map(|l| l.id),
        quorum: leading.is_some() && voters > 0 && answering_voters > voters / 2,
        members,
        unreachable,
    }
}

impl RaftNode {
    /// Joins the group reachable through `admin`: asks the leader to add this node as a
    /// learner, waits until it has caught up, and (with `as_voter`) has it promoted.
    /// A node that is already a member (a restart) only does what is left.
    ///
    /// # Errors
    /// `Refused` when the group will not take this node (another cluster id, its
    /// address taken by another id, its id a member at another address; nothing
    /// changed), `Unauthorized`, or `Timeout` when it is not done within `timeout`.
    pub async fn join(
        &self,
        admin: &RaftAdmin,
        as_voter: bool,
        timeout: Duration,
    ) -> Result<JoinOutcome, AdminError> {
        let id = self.id();
        let deadline = Instant::now() + timeout;
        let mut metrics = self.raft().metrics();
        // Asked once per run: a repeated request while this node's log is still empty
        // would look like a wiped member asking for its own place.
        let mut added = false;
        loop {
            let (voter, learner, fresh) = {
                let m = metrics.borrow_and_update();
                let membership = m.membership_config.membership();
                let voter = membership.voter_ids().any(|v| v == id);
                let learner = !voter && membership.get_node(&id).is_some();
                (voter, learner, m.last_log_index.is_none())
            };
            if voter {
                return Ok(JoinOutcome::Voter);
            }
            if learner && !as_voter {
                return Ok(JoinOutcome::Learner);
            }
            if Instant::now() >= deadline {
                return Err(AdminError::Timeout { after: timeout });
            }
            if added && !learner {
                // The membership reaches this node with the leader's next message.
                let _ = tokio::time::timeout(Duration::from_millis(500), metrics.changed()).await;
                continue;
            }
            let change = if learner {
                MembershipChange::Promote { id }
            } else {
                MembershipChange::AddLearner {
                    id,
                    address: self.address(),
                    cluster_id: self.inner_config().cluster_id.clone(),
                    fresh,
                }
            };
            match admin.change(&change).await {
                Ok(_) => {
                    added = true;
                    let _ = tokio::time::timeout(Duration::from_secs(1), metrics.changed()).await;
                }
                Err(AdminError::Refused(MembershipRefusal::NotCaughtUp { .. })) => {
                    sleep(Duration::from_millis(200)).await;
                }
                Err(e) if e.is_transient() => sleep(Duration::from_millis(200)).await,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: NodeId, state: &str, term: u64, voters: &[NodeId]) -> NodeStatus {
        NodeStatus {
            id,
            address: format!("n{id}"),
            cluster_id: "ha".into(),
            version: "0".into(),
            state: state.into(),
            term,
            leader: None,
            last_log_index: Some(10),
            applied_index: Some(10),
            snapshot_index: None,
            voters: voters.iter().map(|v| (*v, format!("n{v}"))).collect(),
            learners: BTreeMap::new(),
            joint: false,
            membership_index: Some(1),
            peers: BTreeMap::new(),
            millis_since_quorum_ack: None,
            data_dir_bytes: 0,
        }
    }

    #[test]
    fn quorum_needs_a_leader_and_a_majority_of_voters_answering() {
        let mut answers = BTreeMap::new();
        answers.insert("n1".to_owned(), Ok(status(1, "leader", 3, &[1, 2, 3])));
        answers.insert("n2".to_owned(), Ok(status(2, "follower", 3, &[1, 2, 3])));
        answers.insert("n3".to_owned(), Err(AdminError::Unavailable("down".into())));
        let reference = reference_status(&answers).cloned();
        let group = assemble(reference.as_ref(), answers.clone());
        assert_eq!(group.leader, Some(1));
        assert!(group.quorum);
        assert_eq!(group.members.len(), 3);
        assert!(group.members[2]
            .error
            .as_deref()
            .is_some_and(|e| e.contains("down")));

        answers.insert("n2".to_owned(), Err(AdminError::Unavailable("down".into())));
        let reference = reference_status(&answers).cloned();
        assert!(!assemble(reference.as_ref(), answers.clone()).quorum);

        // Followers alone: no leader, no quorum, members still listed.
        answers.remove("n1");
        answers.insert("n2".to_owned(), Ok(status(2, "follower", 3, &[1, 2, 3])));
        let reference = reference_status(&answers).cloned();
        let group = assemble(reference.as_ref(), answers);
        assert_eq!(group.leader, None);
        assert!(!group.quorum);
        assert_eq!(group.members.len(), 3);
    }

    #[test]
    fn a_node_outside_the_membership_is_listed_as_such() {
        let mut answers = BTreeMap::new();
        answers.insert("n1".to_owned(), Ok(status(1, "leader", 3, &[1])));
        answers.insert("n9".to_owned(), Ok(status(9, "learner", 0, &[])));
        let reference = reference_status(&answers).cloned();
        let group = assemble(reference.as_ref(), answers);
        assert_eq!(group.members[1].kind, MemberKind::Outside);
        assert!(group.quorum);
    }
}
