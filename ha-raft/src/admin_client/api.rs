//! `RaftAdmin`'s requests: status from every member, a change on whichever node leads
//! (following the "not the leader" answers), graceful removal, and snapshots.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use futures::future::join_all;
use serde::{Deserialize, Serialize};
use tokio::time::{sleep, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::admin::membership::MembershipChange;
use crate::admin::{AdminError, MembershipReport, NodeStatus};
use crate::backup::file::{BackupError, SnapshotHeader, SnapshotWriter, CHUNK_BYTES};
use crate::client::RaftClientOptions;
use crate::data::command::NodeId;
use crate::net::channel::{channel, BearerToken};
use crate::proto::admin_client::AdminClient;
use crate::proto::AdminRequest;
use ha_core::ClientTls;

use super::group::{assemble, reference_status, GroupStatus, MemberKind};

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
