//! Watch notifications on one node: changes are published under the state machine's lock
//! in log order, so a watcher never sees them skipped or reordered, and a bounded history
//! lets a reconnecting watcher resume after the last revision it saw.

use std::collections::{HashMap, HashSet, VecDeque};

use ha_core::watch_buffer::WatchSender;

use crate::data::command::MemberRecord;
use crate::data::state::{Change, HeadView, State};

/// How many leader changes a node keeps for watchers that resume.
pub const HISTORY: usize = 4096;

/// One change of an election's leader, at a revision (log index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderUpdate {
    /// The log index that caused it.
    pub revision: u64,
    /// The election.
    pub election: String,
    /// The new head (`None` = vacant).
    pub head: Option<HeadView>,
}

/// One change of a role's members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberUpdate {
    /// The members when the watch started.
    Snapshot(Vec<MemberRecord>),
    /// Registered.
    Joined(MemberRecord),
    /// Session ended.
    Left(MemberRecord),
}

/// Watchers and recent history of one node.
#[derive(Debug, Default)]
pub struct Hub {
    leader_watchers: HashMap<String, Vec<WatchSender<LeaderUpdate>>>,
    member_watchers: Vec<(String, WatchSender<MemberUpdate>)>,
    history: VecDeque<LeaderUpdate>,
    /// `history` holds every change after this revision: the newest one that fell out,
    /// or the index of a snapshot the state was loaded from (whose changes it never
    /// saw one by one).
    forgotten: u64,
}

impl Hub {
    /// The state now comes from a snapshot at `revision`: changes up to it are not in
    /// the history, so a watcher resuming from before it gets the current state.
    pub fn restored_at(&mut self, revision: u64) {
        self.forgotten = self.forgotten.max(revision);
        self.history.retain(|update| update.revision > revision);
    }

    /// Sends what one applied entry changed to the watchers concerned. An election's
    /// leader changes once per revision at most: a batch entry that moved it several
    /// times is reported as where it ended, since watchers resume and skip by revision.
    pub fn publish(&mut self, revision: u64, changes: Vec<Change>) {
        let superseded = superseded(&changes);
        for (change, superseded) in changes.into_iter().zip(superseded) {
            match change {
                Change::Leader { .. } if superseded => {}
                Change::Leader { election, head } => {
                    let update = LeaderUpdate {
                        revision,
                        election,
                        head,
                    };
                    if let Some(watchers) = self.leader_watchers.get_mut(&update.election) {
                        watchers.retain(|w| w.offer(update.clone()));
                        if watchers.is_empty() {
                            self.leader_watchers.remove(&update.election);
                        }
                    }
                    if self.history.len() == HISTORY {
                        if let Some(old) = self.history.pop_front() {
                            self.forgotten = old.revision;
                        }
                    }
                    self.history.push_back(update);
                }
                Change::Joined(member) => {
                    self.publish_member(&member.role.clone(), MemberUpdate::Joined(member))
                }
                Change::Left(member) => {
                    self.publish_member(&member.role.clone(), MemberUpdate::Left(member))
                }
            }
        }
    }

    fn publish_member(&mut self, role: &str, update: MemberUpdate) {
        self.member_watchers
            .retain(|(watched, w)| watched != role || w.offer(update.clone()));
    }

    /// Adds a leader watcher. With `after == 0` it first gets the current state at
    /// `applied`; otherwise every retained change after `after` (or, if some were
    /// forgotten, the current state), then live changes.
    pub fn subscribe_leader(
        &mut self,
        state: &State,
        applied: u64,
        election: &str,
        after: u64,
        watcher: WatchSender<LeaderUpdate>,
    ) {
        let current = LeaderUpdate {
            revision: applied,
            election: election.to_owned(),
            head: state.head(election),
        };
        let mut ok = true;
        if after == 0 || after < self.forgotten {
            ok = watcher.offer(current);
        } else {
            for update in self
                .history
                .iter()
                .filter(|u| u.revision > after && u.election == election)
            {
                ok = ok && watcher.offer(update.clone());
            }
        }
        // Watchers that went away are otherwise pruned only when their election changes.
        if let Some(watchers) = self.leader_watchers.get_mut(election) {
            watchers.retain(|w| !w.is_closed());
        }
        if ok {
            self.leader_watchers
                .entry(election.to_owned())
                .or_default()
                .push(watcher);
        }
    }

    /// Adds a member watcher; it first gets the current members.
    pub fn subscribe_members(
        &mut self,
        state: &State,
        role: &str,
        watcher: WatchSender<MemberUpdate>,
    ) {
        self.member_watchers.retain(|(_, w)| !w.is_closed());
        if watcher.offer(MemberUpdate::Snapshot(state.members_of(role))) {
            self.member_watchers.push((role.to_owned(), watcher));
        }
    }
}

/// For each change, whether a later one of the same list changes the same election's
/// leader.
fn superseded(changes: &[Change]) -> Vec<bool> {
    let mut later: HashSet<&str> = HashSet::new();
    let mut out = vec![false; changes.len()];
    for (position, change) in changes.iter().enumerate().rev() {
        if let Change::Leader { election, .. } = change {
            out[position] = !later.insert(election.as_str());
        }
    }
    out
}

/// The changes that turn `old` into `new`, for a node that installs a snapshot: every
/// election whose head differs, every member that appeared or vanished.
pub fn diff(old: &State, new: &State) -> Vec<Change> {
    let mut changes = Vec::new();
    let elections: std::collections::BTreeSet<&String> =
        old.elections.keys().chain(new.elections.keys()).collect();
    for election in elections {
        let (before, after) = (old.head(election), new.head(election));
        let same = match (&before, &after) {
            (Some(a), Some(b)) => a.token == b.token && a.value == b.value,
            (None, None) => true,
            _ => false,
        };
        if !same {
            changes.push(Change::Leader {
                election: election.clone(),
                head: after,
            });
        }
    }
    for (lease, record) in &old.leases {
        if !new.leases.contains_key(lease) {
            changes.push(Change::Left(record.member.clone()));
        }
    }
    for (lease, record) in &new.leases {
        if !old.leases.contains_key(lease) {
            changes.push(Change::Joined(record.member.clone()));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use ha_core::watch_buffer;

    use super::*;
    use crate::data::command::Command;
    use crate::data::state::register_for_test as register;

    fn campaign(lease: u64) -> Command {
        Command::Campaign {
            lease,
            election: "e".into(),
            value: b"v".to_vec(),
        }
    }

    #[tokio::test]
    async fn a_batch_that_moves_a_leader_twice_is_one_update_at_its_revision() {
        let mut state = State::default();
        let mut hub = Hub::default();
        let a = register(&mut state, 1, 1);
        let b = register(&mut state, 2, 2);
        let (_, changes) = state.apply(3, &campaign(a));
        hub.publish(3, changes);
        let (tx, mut rx) = watch_buffer::channel(16);
        hub.subscribe_leader(&state, 3, "e", 3, tx);

        // The leader resigns and another candidate campaigns, in one entry: vacant, then
        // b leads, both at revision 4.
        let batch = Command::Batch(vec![
            Command::Resign {
                election: "e".into(),
                lease: a,
                token: 3,
                attempt: None,
            },
            campaign(b),
        ]);
        let (_, changes) = state.apply(4, &batch);
        assert_eq!(changes.len(), 2, "{changes:?}");
        hub.publish(4, changes);
        let update = rx.recv().await.unwrap_or_else(|| panic!("no update"));
        assert_eq!(update.revision, 4);
        assert_eq!(update.head.map(|h| h.lease), Some(b));
        drop(hub);
        assert!(rx.recv().await.is_none(), "a second update at revision 4");

        // The same again at revision 5; a watcher resuming after 4 gets one update.
        let mut hub = Hub::default();
        hub.publish(
            5,
            state
                .apply(
                    5,
                    &Command::Batch(vec![
                        Command::Resign {
                            election: "e".into(),
                            lease: b,
                            token: 4,
                            attempt: None,
                        },
                        campaign(a),
                    ]),
                )
                .1,
        );
        let (tx, mut rx) = watch_buffer::channel(16);
        hub.subscribe_leader(&state, 5, "e", 4, tx);
        drop(hub);
        let update = rx.recv().await.unwrap_or_else(|| panic!("no update"));
        assert_eq!(update.head.map(|h| h.lease), Some(a));
        assert!(rx.recv().await.is_none(), "a second update at one revision");
    }
}
