//! `ha status` on etcd: each member's Raft state as etcd's maintenance API reports it,
//! the counterpart of `etcdctl endpoint status --cluster`.

use std::time::Duration;

use etcd_client::Client;
use futures::future::join_all;
use ha_core::{Error, Result};
use serde::{Deserialize, Serialize};
use tokio::time::timeout;

use crate::backend::connect::connect_options;
use crate::config::EtcdConfig;
use crate::error::map;

/// The most one member's status may take before it counts as unreachable.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(2);

/// One etcd member, as the cluster lists it and as it describes itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdMemberStatus {
    /// etcd's member id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// Its first client URL (where it was asked).
    pub endpoint: String,
    /// A learner (does not vote).
    pub learner: bool,
    /// What it said of itself; `None` when it did not answer.
    pub status: Option<EtcdEndpointStatus>,
    /// Why it did not answer.
    pub error: Option<String>,
}

/// A member's own report (etcd's `StatusResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdEndpointStatus {
    /// The leader's member id, as this member knows it.
    pub leader: u64,
    /// The Raft term.
    pub raft_term: u64,
    /// The last Raft log index.
    pub raft_index: u64,
    /// The last applied index.
    pub raft_applied_index: u64,
    /// The database size in bytes.
    pub db_size: i64,
    /// The etcd version.
    pub version: String,
    /// Errors the member reports (an alarm, a corrupt member).
    pub errors: Vec<String>,
    /// It says it is a learner.
    pub learner: bool,
}

/// The cluster as its members describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdClusterStatus {
    /// The leader a majority of the voters that answered agree on.
    pub leader: Option<u64>,
    /// A majority of the voters answered and name the same leader.
    pub quorum: bool,
    /// Every member, in etcd's order.
    pub members: Vec<EtcdMemberStatus>,
}

/// Lists the members through `config`'s endpoints, then asks each for its status.
/// Without a quorum (etcd's member list needs one) it reports the endpoints given.
///
/// # Errors
/// `Unavailable` when no endpoint lists the members in time, `Auth` for refused
/// credentials.
pub async fn cluster_status(config: &EtcdConfig) -> Result<EtcdClusterStatus> {
    let connect = Client::connect(config.endpoints.clone(), Some(connect_options(config)));
    let late = || {
        Error::Unavailable(format!(
            "etcd at {:?} did not answer within {:?}",
            config.endpoints, config.connect_timeout
        ))
    };
    let listed = async {
        let mut client = timeout(config.connect_timeout, connect)
            .await
            .map_err(|_| late())?
            .map_err(map)?;
        timeout(config.connect_timeout, client.member_list())
            .await
            .map_err(|_| late())?
            .map_err(map)
    };
    let members = match listed.await {
        Ok(list) => {
            let asked = list.members().iter().map(|member| async move {
                let endpoint = member.client_urls().first().cloned().unwrap_or_default();
                let (status, error) = match member_status(config, &endpoint).await {
                    Ok((_, status)) => (Some(status), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                EtcdMemberStatus {
                    id: member.id(),
                    name: member.name().to_owned(),
                    endpoint,
                    learner: member.is_learner(),
                    status,
                    error,
                }
            });
            join_all(asked).await
        }
        Err(e @ Error::Auth { .. }) => return Err(e),
        // The member list is a linearizable read: without a quorum, say what each
        // endpoint given reports of itself instead.
        Err(_) => {
            join_all(config.endpoints.iter().map(|endpoint| async move {
                let (id, learner, status, error) = match member_status(config, endpoint).await {
                    Ok((id, status)) => (id, status.learner, Some(status), None),
                    Err(e) => (0, false, None, Some(e.to_string())),
                };
                EtcdMemberStatus {
                    id,
                    name: String::new(),
                    endpoint: endpoint.clone(),
                    learner,
                    status,
                    error,
                }
            }))
            .await
        }
    };
    let voters = members.iter().filter(|m| !m.learner).count();
    let mut votes: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
    for status in members
        .iter()
        .filter(|m| !m.learner)
        .filter_map(|m| m.status.as_ref())
    {
        if status.leader != 0 {
            *votes.entry(status.leader).or_default() += 1;
        }
    }
    let leader = votes
        .iter()
        .max_by_key(|(_, n)| **n)
        .filter(|(_, n)| **n > voters / 2)
        .map(|(id, _)| *id);
    Ok(EtcdClusterStatus {
        leader,
        quorum: leader.is_some(),
        members,
    })
}

/// One member's own report, and its member id.
async fn member_status(config: &EtcdConfig, endpoint: &str) -> Result<(u64, EtcdEndpointStatus)> {
    if endpoint.is_empty() {
        return Err(Error::Unavailable("not started: no client URL".into()));
    }
    let wait = MEMBER_TIMEOUT.min(config.connect_timeout);
    let late = || Error::Unavailable(format!("{endpoint} did not answer within {wait:?}"));
    let connect = Client::connect([endpoint], Some(connect_options(config)));
    let mut client = timeout(wait, connect)
        .await
        .map_err(|_| late())?
        .map_err(map)?;
    let status = timeout(wait, client.status())
        .await
        .map_err(|_| late())?
        .map_err(map)?;
    let id = status.header().map_or(0, |h| h.member_id());
    Ok((
        id,
        EtcdEndpointStatus {
            learner: status.is_learner(),
            leader: status.leader(),
            raft_term: status.raft_term(),
            raft_index: status.raft_index(),
            raft_applied_index: status.raft_applied_index(),
            db_size: status.db_size(),
            version: status.version().to_owned(),
            errors: status.errors().to_vec(),
        },
    ))
}
