//! The replicated lease/election state: deterministic, no clocks, serializable as a
//! snapshot. Applying a command returns its result and what changed, so the node can
//! notify watchers and its lessor in log order.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::data::command::{Blob, Command, CommandResult, MemberRecord};

/// One session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// TTL granted at registration.
    pub ttl_ms: u64,
    /// The member record bound to the lease.
    pub member: MemberRecord,
    /// Election → token of this lease's candidacy there.
    pub candidacies: BTreeMap<String, u64>,
}

/// One candidate in an election's queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateRecord {
    /// Its lease.
    pub lease: u64,
    /// Its published value.
    #[serde(with = "crate::data::command::compact_bytes")]
    pub value: Vec<u8>,
    /// Campaign calls that made or resumed it (0 in snapshots written before this was
    /// counted); see `Command::Resign::attempt`.
    #[serde(default)]
    pub campaigns: u64,
}

/// The head of an election's queue, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadView {
    /// Leader's token.
    pub token: u64,
    /// Leader's lease.
    pub lease: u64,
    /// Leader's value.
    pub value: Vec<u8>,
    /// Leader's server id.
    pub server_id: Option<u64>,
}

/// A change caused by one applied command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An election's leader or its value changed (`None` = vacant).
    Leader {
        /// Election name.
        election: String,
        /// The new head.
        head: Option<HeadView>,
    },
    /// A member registered.
    Joined(MemberRecord),
    /// A member's session ended.
    Left(MemberRecord),
}

/// All leases, members and elections.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Lease id → session.
    pub leases: BTreeMap<u64, LeaseRecord>,
    /// Role → server id → lease.
    pub members: BTreeMap<String, BTreeMap<u64, u64>>,
    /// Election → token → candidate; the first entry leads.
    pub elections: BTreeMap<String, BTreeMap<u64, CandidateRecord>>,
    /// Election → key → value: the guarded stores. Absent from snapshots written before
    /// the guarded store existed, hence the default.
    #[serde(default)]
    pub kv: BTreeMap<String, BTreeMap<String, Blob>>,
    /// The last lease id or token handed out. Absent (0) from snapshots written before
    /// batches, whose ids were all log indexes at or below the snapshot's.
    #[serde(default)]
    pub last_id: u64,
    /// The group's recorded feature level (0: none recorded; see `data::level`).
    /// Written only once recorded, so a snapshot without one is as 0.1.0 wrote it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub level: u32,
}

fn is_zero(level: &u32) -> bool {
    *level == 0
}

/// A new lease id or token for a command of the entry at `index`: the entry's index, or
/// one past the last id if a batch at an earlier index (or earlier in this one) reached
/// it. Strictly increasing and unique; in a log without batches, the index itself, as
/// before batches existed.
fn next_id(last_id: &mut u64, index: u64) -> u64 {
    let id = index.max(last_id.saturating_add(1));
    *last_id = id;
    id
}

impl State {
    /// The head of an election's queue.
    pub fn head(&self, election: &str) -> Option<HeadView> {
        let (token, candidate) = self.elections.get(election)?.iter().next()?;
        Some(HeadView {
            token: *token,
            lease: candidate.lease,
            value: candidate.value.clone(),
            server_id: self
                .leases
                .get(&candidate.lease)
                .map(|l| l.member.server_id),
        })
    }

    /// The live members of a role, by server id.
    pub fn members_of(&self, role: &str) -> Vec<MemberRecord> {
        self.members
            .get(role)
            .into_iter()
            .flat_map(|ids| ids.values())
            .filter_map(|lease| self.leases.get(lease).map(|l| l.member.clone()))
            .collect()
    }

    /// Applies the command of the entry at log index `index`.
    pub fn apply(&mut self, index: u64, command: &Command) -> (CommandResult, Vec<Change>) {
        let mut changes = Vec::new();
        let result = self.apply_one(index, command, &mut changes);
        (result, changes)
    }

    fn apply_one(
        &mut self,
        index: u64,
        command: &Command,
        changes: &mut Vec<Change>,
    ) -> CommandResult {
        match command {
            Command::Batch(commands) => CommandResult::Batch(
                commands
                    .iter()
                    .map(|command| match command {
                        // Only the proposer builds batches, and never nested ones.
                        Command::Batch(_) => CommandResult::None,
                        command => self.apply_one(index, command, changes),
                    })
                    .collect(),
            ),
            Command::Register { member, ttl_ms } => {
                let ids = self.members.entry(member.role.clone()).or_default();
                match ids.entry(member.server_id) {
                    std::collections::btree_map::Entry::Occupied(_) => {
                        CommandResult::AlreadyRegistered
                    }
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        let lease = next_id(&mut self.last_id, index);
                        slot.insert(lease);
                        self.leases.insert(
                            lease,
                            LeaseRecord {
                                ttl_ms: *ttl_ms,
                                member: member.clone(),
                                candidacies: BTreeMap::new(),
                            },
                        );
                        changes.push(Change::Joined(member.clone()));
                        CommandResult::Registered {
                            lease,
                            ttl_ms: *ttl_ms,
                        }
                    }
                }
            }
            Command::Revoke { lease } | Command::Expire { lease } => {
                self.remove_lease(*lease, changes);
                CommandResult::Ok
            }
            Command::Handover => CommandResult::Ok,
            Command::SetLevel { level } => {
                self.level = self.level.max(*level);
                CommandResult::Ok
            }
            Command::Campaign {
                lease,
                election,
                value,
            } => match self.leases.get_mut(lease) {
                None => CommandResult::LeaseExpired,
                Some(record) => {
                    let last_id = &mut self.last_id;
                    let token = *record
                        .candidacies
                        .entry(election.clone())
                        .or_insert_with(|| next_id(last_id, index));
                    let before = self.head(election);
                    let queue = self.elections.entry(election.clone()).or_default();
                    let attempt = queue.get(&token).map_or(0, |c| c.campaigns) + 1;
                    queue.insert(
                        token,
                        CandidateRecord {
                            lease: *lease,
                            value: value.clone(),
                            campaigns: attempt,
                        },
                    );
                    self.note_head_change(election, before, changes);
                    CommandResult::Campaigned { token, attempt }
                }
            },
            Command::Resign {
                election,
                lease,
                token,
                attempt,
            } => {
                let resumed = attempt.is_some_and(|attempt| {
                    self.elections
                        .get(election)
                        .and_then(|queue| queue.get(token))
                        .is_some_and(|c| c.campaigns != attempt)
                });
                if !resumed {
                    self.remove_candidacy(election, *lease, *token, changes);
                }
                CommandResult::Ok
            }
            Command::Proclaim {
                election,
                lease,
                token,
                value,
            } => {
                let before = self.head(election);
                match &before {
                    Some(head) if head.token == *token && head.lease == *lease => {
                        if let Some(candidate) = self
                            .elections
                            .get_mut(election)
                            .and_then(|queue| queue.get_mut(token))
                        {
                            candidate.value = value.clone();
                        }
                        self.note_head_change(election, before, changes);
                        CommandResult::Ok
                    }
                    other => CommandResult::NotLeader {
                        current: other.as_ref().map(|h| h.token),
                    },
                }
            }
            Command::KvWrite {
                election,
                lease,
                token,
                op,
            } => match self.head(election) {
                // The guard, checked in the same apply that writes: nothing can come
                // between them, and every replica decides the same.
                Some(head) if head.token == *token && head.lease == *lease => {
                    let store = self.kv.entry(election.clone()).or_default();
                    let previous = store.get(op.key()).cloned();
                    let (next, applied) = op.apply(previous.as_ref());
                    match next {
                        Some(value) => {
                            store.insert(op.key().to_owned(), value);
                        }
                        None => {
                            store.remove(op.key());
                        }
                    }
                    if store.is_empty() {
                        self.kv.remove(election);
                    }
                    CommandResult::KvWritten { applied, previous }
                }
                other => CommandResult::NotLeader {
                    current: other.as_ref().map(|h| h.token),
                },
            },
        }
    }

    fn remove_lease(&mut self, lease: u64, changes: &mut Vec<Change>) {
        let Some(record) = self.leases.remove(&lease) else {
            return;
        };
        for (election, token) in &record.candidacies {
            let before = self.head(election);
            if let Some(queue) = self.elections.get_mut(election) {
                queue.remove(token);
            }
            // The lease is gone, so `before` names a server id that `head` no longer can;
            // compare by token and value only.
            self.note_head_change(election, before, changes);
        }
        if let Some(ids) = self.members.get_mut(&record.member.role) {
            if ids.get(&record.member.server_id) == Some(&lease) {
                ids.remove(&record.member.server_id);
            }
            if ids.is_empty() {
                self.members.remove(&record.member.role);
            }
        }
        changes.push(Change::Left(record.member));
    }

    fn remove_candidacy(
        &mut self,
        election: &str,
        lease: u64,
        token: u64,
        changes: &mut Vec<Change>,
    ) {
        let stands = self
            .elections
            .get(election)
            .and_then(|queue| queue.get(&token))
            .is_some_and(|c| c.lease == lease);
        if !stands {
            return;
        }
        let before = self.head(election);
        if let Some(queue) = self.elections.get_mut(election) {
            queue.remove(&token);
        }
        if let Some(record) = self.leases.get_mut(&lease) {
            record.candidacies.remove(election);
        }
        self.note_head_change(election, before, changes);
    }

    /// Records a leader change if the head's token or value moved, and forgets an empty
    /// election.
    fn note_head_change(
        &mut self,
        election: &str,
        before: Option<HeadView>,
        changes: &mut Vec<Change>,
    ) {
        let after = self.head(election);
        let same = |a: &Option<HeadView>, b: &Option<HeadView>| match (a, b) {
            (Some(a), Some(b)) => a.token == b.token && a.value == b.value,
            (None, None) => true,
            _ => false,
        };
        if !same(&before, &after) {
            changes.push(Change::Leader {
                election: election.to_owned(),
                head: after,
            });
        }
        if self.elections.get(election).is_some_and(|q| q.is_empty()) {
            self.elections.remove(election);
        }
    }
}

#[cfg(test)]
mod tests;

/// A session registered in `state` at `index` for server `id` of role `coord`, for the
/// unit tests of the modules that read the state.
#[cfg(test)]
pub(crate) fn register_for_test(state: &mut State, index: u64, id: u64) -> u64 {
    let member = MemberRecord {
        server_id: id,
        role: "coord".into(),
        address: format!("a{id}"),
        metadata: BTreeMap::new(),
    };
    match state
        .apply(
            index,
            &Command::Register {
                member,
                ttl_ms: 2000,
            },
        )
        .0
    {
        CommandResult::Registered { lease, .. } => lease,
        other => panic!("{other:?}"),
    }
}
