//! Changing a running group's members: the typed requests, and the checks that refuse a
//! change that would lose quorum or clash with the group before anything is proposed.
//! The checks are pure functions of what the Raft leader sees (`GroupView`), so they are
//! unit-tested here; `node/admin.rs` applies what they allow.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::data::command::NodeId;

/// One change to a group's membership, as `ha member` and `ha node --join` ask for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MembershipChange {
    /// Add node `id` at `address` as a learner (it replicates but does not vote).
    /// `cluster_id` is the joiner's: a node of another cluster is refused.
    AddLearner {
        /// The new member's node id.
        id: NodeId,
        /// The address peers dial to reach it.
        address: String,
        /// The cluster id the new member was configured with.
        cluster_id: String,
        /// The new member's log is empty (a fresh or wiped data dir).
        #[serde(default)]
        fresh: bool,
        /// The feature level the new member serves; one below the level the group
        /// writes at is refused. `None`: not stated (ha 0.1.0, or a library caller);
        /// the leader asks the joiner, and admits one that does not answer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        feature_level: Option<u32>,
    },
    /// Make learner `id` a voter, once it has caught up with the leader's log.
    Promote {
        /// The learner.
        id: NodeId,
    },
    /// Take node `id` (voter or learner) out of the group.
    Remove {
        /// The member.
        id: NodeId,
    },
}

impl MembershipChange {
    /// The node the change is about.
    pub fn subject(&self) -> NodeId {
        match self {
            Self::AddLearner { id, .. } | Self::Promote { id } | Self::Remove { id } => *id,
        }
    }
}

/// Why the leader refused a membership change. Nothing was proposed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "refusal", rename_all = "snake_case")]
#[non_exhaustive]
pub enum MembershipRefusal {
    /// The joiner was configured for another cluster.
    #[error("cluster id mismatch: the group is {group:?}, the joining node is configured for {requested:?}")]
    ClusterMismatch {
        /// The group's cluster id.
        group: String,
        /// The one in the request.
        requested: String,
    },
    /// Another member already has this address.
    #[error("address {address} is already node {holder}'s; remove node {holder} first")]
    AddressTaken {
        /// The address.
        address: String,
        /// The member that has it.
        holder: NodeId,
    },
    /// The id is a member already, at another address.
    #[error(
        "node {id} is already a member at {address}; remove it first to give it another address"
    )]
    IdTaken {
        /// The id.
        id: NodeId,
        /// Its address in the group.
        address: String,
    },
    /// A member asks to join again with an empty log: its data dir was wiped, and with
    /// it its votes and log, which Raft's safety rests on.
    #[error("node {id} is a member already and the node joining as it has an empty log (a wiped data dir): it cannot take its own place; remove node {id} first, then join")]
    WipedMember {
        /// The id.
        id: NodeId,
    },
    /// The node is not a member of the group.
    #[error("node {id} is not a member of the group")]
    NotAMember {
        /// The id.
        id: NodeId,
    },
    /// A learner to promote is too far behind the leader's log.
    #[error("node {id} has not caught up yet: {} entries behind the leader (at most {allowed})", lag.map_or_else(|| "unknown".to_owned(), |l| l.to_string()))]
    NotCaughtUp {
        /// The learner.
        id: NodeId,
        /// How far behind it is (`None`: nothing replicated yet).
        lag: Option<u64>,
        /// The most a promoted learner may be behind.
        allowed: u64,
    },
    /// Removing the only voter would leave a group nobody can lead.
    #[error("node {id} is the group's last voter")]
    LastVoter {
        /// The voter.
        id: NodeId,
    },
    /// After the change, fewer voters than a majority of the new configuration would be
    /// reachable: the group would stop committing.
    #[error("the change would lose quorum: {healthy} of the {voters} voters it leaves are reachable and {needed} are needed (reachable now: {reachable:?})")]
    WouldLoseQuorum {
        /// Voters after the change.
        voters: usize,
        /// Of those, how many the leader heard from recently (itself included).
        healthy: usize,
        /// A majority of `voters`.
        needed: usize,
        /// The voters the leader heard from recently.
        reachable: Vec<NodeId>,
    },
    /// Another change is still going through its joint configuration.
    #[error("another membership change is in progress; retry in a moment")]
    ChangeInProgress,
    /// The joiner serves a lower feature level than the group writes at: it could not
    /// apply the group's log.
    #[error("node {id} serves feature level {serves} and the group writes at level {group}: it could not apply the group's log; run ha serving level {group} or later on it")]
    BelowGroupLevel {
        /// The joiner.
        id: NodeId,
        /// The level it serves.
        serves: u32,
        /// The level the group writes at.
        group: u32,
    },
}

/// What the Raft leader sees when it checks a change.
#[derive(Debug, Clone, Default)]
pub(crate) struct GroupView {
    pub(crate) cluster_id: String,
    pub(crate) voters: BTreeMap<NodeId, String>,
    pub(crate) learners: BTreeMap<NodeId, String>,
    /// The leader, and every member it heard from recently.
    pub(crate) healthy: BTreeSet<NodeId>,
    /// Entries each member is behind the leader's last log entry (`None`: unknown).
    pub(crate) lag: BTreeMap<NodeId, Option<u64>>,
    /// A change is in its joint configuration.
    pub(crate) joint: bool,
    /// The feature level the group writes at (see `node::levels`).
    pub(crate) level: u32,
}

impl GroupView {
    /// Whether member `id` answered recently and is close enough to the leader's log to
    /// vote without holding up the commits after its promotion.
    pub(crate) fn caught_up(&self, id: NodeId) -> bool {
        self.healthy.contains(&id)
            && self
                .lag
                .get(&id)
                .copied()
                .flatten()
                .is_some_and(|lag| lag <= CAUGHT_UP_ENTRIES)
    }
}

/// What a change allowed by [`check`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// The group is already as asked (a restarted joiner asking again).
    Nothing,
    AddLearner {
        id: NodeId,
        address: String,
    },
    Promote {
        id: NodeId,
    },
    RemoveVoter {
        id: NodeId,
    },
    RemoveLearner {
        id: NodeId,
    },
}

/// The most entries a learner may be behind the leader to be promoted: close enough that
/// the first commits of the new configuration do not wait for it to catch up.
pub(crate) const CAUGHT_UP_ENTRIES: u64 = 64;

fn majority(voters: usize) -> usize {
    voters / 2 + 1
}

/// Whether `voters` (the configuration after a change) keeps a reachable majority.
fn keeps_quorum(view: &GroupView, voters: &BTreeSet<NodeId>) -> Result<(), MembershipRefusal> {
    let healthy: Vec<NodeId> = voters
        .iter()
        .copied()
        .filter(|id| view.healthy.contains(id))
        .collect();
    let needed = majority(voters.len());
    if healthy.len() < needed {
        return Err(MembershipRefusal::WouldLoseQuorum {
            voters: voters.len(),
            healthy: healthy.len(),
            needed,
            reachable: view
                .voters
                .keys()
                .copied()
                .filter(|id| view.healthy.contains(id))
                .collect(),
        });
    }
    Ok(())
}

/// Decides whether `change` may go ahead, and what it does.
pub(crate) fn check(
    view: &GroupView,
    change: &MembershipChange,
) -> Result<Plan, MembershipRefusal> {
    let member_address = |id: &NodeId| view.voters.get(id).or_else(|| view.learners.get(id));
    match change {
        MembershipChange::AddLearner {
            id,
            address,
            cluster_id,
            fresh,
            feature_level,
        } => {
            if *cluster_id != view.cluster_id {
                return Err(MembershipRefusal::ClusterMismatch {
                    group: view.cluster_id.clone(),
                    requested: cluster_id.clone(),
                });
            }
            if let Some(serves) = feature_level.filter(|serves| *serves < view.level) {
                return Err(MembershipRefusal::BelowGroupLevel {
                    id: *id,
                    serves,
                    group: view.level,
                });
            }
            if let Some(known) = member_address(id) {
                return if *fresh {
                    Err(MembershipRefusal::WipedMember { id: *id })
                } else if known == address {
                    Ok(Plan::Nothing)
                } else {
                    Err(MembershipRefusal::IdTaken {
                        id: *id,
                        address: known.clone(),
                    })
                };
            }
            let holder = view
                .voters
                .iter()
                .chain(&view.learners)
                .find(|(_, known)| *known == address);
            if let Some((holder, _)) = holder {
                return Err(MembershipRefusal::AddressTaken {
                    address: address.clone(),
                    holder: *holder,
                });
            }
            if view.joint {
                return Err(MembershipRefusal::ChangeInProgress);
            }
            Ok(Plan::AddLearner {
                id: *id,
                address: address.clone(),
            })
        }
        MembershipChange::Promote { id } => {
            if view.voters.contains_key(id) {
                return Ok(Plan::Nothing);
            }
            if !view.learners.contains_key(id) {
                return Err(MembershipRefusal::NotAMember { id: *id });
            }
            if !view.caught_up(*id) {
                return Err(MembershipRefusal::NotCaughtUp {
                    id: *id,
                    lag: view.lag.get(id).copied().flatten(),
                    allowed: CAUGHT_UP_ENTRIES,
                });
            }
            if view.joint {
                return Err(MembershipRefusal::ChangeInProgress);
            }
            let mut after: BTreeSet<NodeId> = view.voters.keys().copied().collect();
            after.insert(*id);
            keeps_quorum(view, &after)?;
            Ok(Plan::Promote { id: *id })
        }
        MembershipChange::Remove { id } => {
            if view.learners.contains_key(id) {
                return if view.joint {
                    Err(MembershipRefusal::ChangeInProgress)
                } else {
                    Ok(Plan::RemoveLearner { id: *id })
                };
            }
            if !view.voters.contains_key(id) {
                return Err(MembershipRefusal::NotAMember { id: *id });
            }
            let after: BTreeSet<NodeId> = view.voters.keys().copied().filter(|v| v != id).collect();
            if after.is_empty() {
                return Err(MembershipRefusal::LastVoter { id: *id });
            }
            if view.joint {
                return Err(MembershipRefusal::ChangeInProgress);
            }
            keeps_quorum(view, &after)?;
            Ok(Plan::RemoveVoter { id: *id })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(voters: &[NodeId], learners: &[NodeId], healthy: &[NodeId]) -> GroupView {
        let address = |id: &NodeId| format!("127.0.0.1:{}", 7000 + id);
        GroupView {
            cluster_id: "ha".into(),
            voters: voters.iter().map(|id| (*id, address(id))).collect(),
            learners: learners.iter().map(|id| (*id, address(id))).collect(),
            healthy: healthy.iter().copied().collect(),
            lag: voters
                .iter()
                .chain(learners)
                .map(|id| (*id, Some(0)))
                .collect(),
            joint: false,
            level: 3,
        }
    }

    fn add(id: NodeId, port: u16, cluster: &str) -> MembershipChange {
        MembershipChange::AddLearner {
            id,
            address: format!("127.0.0.1:{port}"),
            cluster_id: cluster.into(),
            fresh: false,
            feature_level: Some(3),
        }
    }

    #[test]
    fn a_joiner_below_the_level_the_group_writes_at_is_refused() {
        let group = view(&[1, 2, 3], &[], &[1, 2, 3]);
        let at = |feature_level| MembershipChange::AddLearner {
            id: 4,
            address: "127.0.0.1:7004".into(),
            cluster_id: "ha".into(),
            fresh: true,
            feature_level,
        };
        assert_eq!(
            check(&group, &at(Some(2))),
            Err(MembershipRefusal::BelowGroupLevel {
                id: 4,
                serves: 2,
                group: 3
            })
        );
        // Newer than the group, or not stated: admitted.
        for level in [Some(3), Some(4), None] {
            assert!(matches!(
                check(&group, &at(level)),
                Ok(Plan::AddLearner { .. })
            ));
        }
    }

    #[test]
    fn a_new_learner_is_added_and_a_repeated_join_changes_nothing() {
        let group = view(&[1, 2, 3], &[], &[1, 2, 3]);
        assert_eq!(
            check(&group, &add(4, 7004, "ha")),
            Ok(Plan::AddLearner {
                id: 4,
                address: "127.0.0.1:7004".into()
            })
        );
        assert_eq!(check(&group, &add(3, 7003, "ha")), Ok(Plan::Nothing));
        let wiped = MembershipChange::AddLearner {
            id: 3,
            address: "127.0.0.1:7003".into(),
            cluster_id: "ha".into(),
            fresh: true,
            feature_level: None,
        };
        assert_eq!(
            check(&group, &wiped),
            Err(MembershipRefusal::WipedMember { id: 3 })
        );
    }

    #[test]
    fn joins_that_clash_with_the_group_are_refused_with_the_reason() {
        let group = view(&[1, 2, 3], &[], &[1, 2, 3]);
        assert!(matches!(
            check(&group, &add(4, 7004, "other")),
            Err(MembershipRefusal::ClusterMismatch { .. })
        ));
        assert_eq!(
            check(&group, &add(4, 7002, "ha")),
            Err(MembershipRefusal::AddressTaken {
                address: "127.0.0.1:7002".into(),
                holder: 2
            })
        );
        assert!(matches!(
            check(&group, &add(2, 7009, "ha")),
            Err(MembershipRefusal::IdTaken { id: 2, .. })
        ));
    }

    #[test]
    fn removing_a_voter_is_refused_when_the_rest_has_no_reachable_majority() {
        // 3 voters, 3 down: removing a healthy one leaves {1, 3} with only 1 reachable.
        let group = view(&[1, 2, 3], &[], &[1, 2]);
        assert!(matches!(
            check(&group, &MembershipChange::Remove { id: 2 }),
            Err(MembershipRefusal::WouldLoseQuorum {
                voters: 2,
                healthy: 1,
                needed: 2,
                ..
            })
        ));
        // Removing the dead one is what a replacement starts with.
        assert_eq!(
            check(&group, &MembershipChange::Remove { id: 3 }),
            Ok(Plan::RemoveVoter { id: 3 })
        );
        let alone = view(&[1], &[], &[1]);
        assert_eq!(
            check(&alone, &MembershipChange::Remove { id: 1 }),
            Err(MembershipRefusal::LastVoter { id: 1 })
        );
        assert_eq!(
            check(&group, &MembershipChange::Remove { id: 9 }),
            Err(MembershipRefusal::NotAMember { id: 9 })
        );
    }

    #[test]
    fn a_learner_is_promoted_only_once_caught_up_and_never_into_a_lost_quorum() {
        let mut group = view(&[1, 2, 3], &[4], &[1, 2, 3, 4]);
        group.lag.insert(4, Some(CAUGHT_UP_ENTRIES + 1));
        assert!(matches!(
            check(&group, &MembershipChange::Promote { id: 4 }),
            Err(MembershipRefusal::NotCaughtUp { id: 4, .. })
        ));
        group.lag.insert(4, Some(3));
        assert_eq!(
            check(&group, &MembershipChange::Promote { id: 4 }),
            Ok(Plan::Promote { id: 4 })
        );
        // 2 voters of 4 reachable after the promotion: no majority of 4.
        let mut weak = view(&[1, 2, 3], &[4], &[1, 4]);
        weak.lag.insert(4, Some(0));
        assert!(matches!(
            check(&weak, &MembershipChange::Promote { id: 4 }),
            Err(MembershipRefusal::WouldLoseQuorum { needed: 3, .. })
        ));
        assert_eq!(
            check(&group, &MembershipChange::Promote { id: 1 }),
            Ok(Plan::Nothing)
        );
    }

    #[test]
    fn nothing_changes_while_a_joint_configuration_is_in_progress() {
        let mut group = view(&[1, 2, 3], &[4], &[1, 2, 3, 4]);
        group.joint = true;
        assert_eq!(
            check(&group, &MembershipChange::Remove { id: 2 }),
            Err(MembershipRefusal::ChangeInProgress)
        );
        assert_eq!(
            check(&group, &add(5, 7005, "ha")),
            Err(MembershipRefusal::ChangeInProgress)
        );
    }

    #[test]
    fn changes_and_refusals_travel_as_json() {
        let change = add(4, 7004, "ha");
        let text = serde_json::to_string(&change).unwrap_or_default();
        assert!(text.contains("\"op\":\"add_learner\""), "{text}");
        let refusal = MembershipRefusal::LastVoter { id: 1 };
        let text = serde_json::to_string(&refusal).unwrap_or_default();
        let back: Result<MembershipRefusal, _> = serde_json::from_str(&text);
        assert_eq!(back.ok(), Some(refusal));
    }
}
