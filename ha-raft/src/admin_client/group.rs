//! The group as its members describe it: each member's status gathered into one view
//! (`ha status`), with the quorum judged from who answered.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::admin::{AdminError, NodeStatus};
use crate::data::command::NodeId;

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

/// The status whose membership the group view is built on: the leader's of the highest
/// term, else the newest membership any member has.
pub(super) fn reference_status(
    answers: &BTreeMap<String, Result<NodeStatus, AdminError>>,
) -> Option<&NodeStatus> {
    let answered = || answers.values().filter_map(|a| a.as_ref().ok());
    answered()
        .filter(|s| s.state == "leader")
        .max_by_key(|s| s.term)
        .or_else(|| answered().max_by_key(|s| (s.membership_index, s.term)))
}

pub(super) fn assemble(
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
            placement: false,
            active_here: Vec::new(),
            placement_moves: 0,
            feature_level: 3,
            group_level: 0,
            writes_at: None,
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
