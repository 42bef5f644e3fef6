//! The whole backend state, behind one mutex. Every method here runs under that lock,
//! so each contract operation is atomic and notifications leave in the order the
//! changes happened.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use ha_core::watch_buffer::WatchSender;
use ha_core::{
    ElectionName, FencingToken, KvKey, Leader, LeaderEvent, LeaderKey, LeaseId, Member,
    MemberEvent, Role, ServerId,
};
use tokio::time::Instant;

/// A watcher's channel: each event carries the instant it may be delivered at, so a
/// notification delay keeps the order. Bounded: a watcher that stops reading is ended.
pub(crate) type Subscriber<T> = WatchSender<(Instant, T)>;

#[derive(Debug)]
pub(crate) struct LeaseEntry {
    pub(crate) ttl: Duration,
    pub(crate) deadline: Instant,
    pub(crate) member: Member,
    /// Elections this lease has a candidacy in, and the candidacy's token.
    pub(crate) candidacies: HashMap<ElectionName, FencingToken>,
}

#[derive(Debug)]
pub(crate) struct Candidate {
    pub(crate) lease: LeaseId,
    pub(crate) value: Bytes,
}

#[derive(Debug, Default)]
pub(crate) struct Election {
    /// The queue, in token (= enqueue) order; the first entry leads.
    pub(crate) queue: BTreeMap<FencingToken, Candidate>,
    pub(crate) watchers: Vec<Subscriber<LeaderEvent>>,
    /// What the watchers were last told, to report only real changes.
    last_reported: Option<(FencingToken, Bytes)>,
}

/// Test-only faults; see the hooks on [`MemoryBackend`](crate::MemoryBackend).
#[derive(Debug, Default)]
pub(crate) struct Faults {
    pub(crate) failing_keep_alives: HashSet<LeaseId>,
    pub(crate) notification_delay: Duration,
    pub(crate) unavailable: bool,
    pub(crate) unguarded_writes: bool,
    pub(crate) granted_ttl: Option<Duration>,
}

#[derive(Debug)]
pub(crate) struct State {
    next_lease: u64,
    /// The global counter tokens are drawn from; it never goes back.
    revision: u64,
    pub(crate) leases: HashMap<LeaseId, LeaseEntry>,
    pub(crate) members: BTreeMap<(Role, ServerId), LeaseId>,
    pub(crate) elections: HashMap<ElectionName, Election>,
    /// The guarded store of every election; it outlives leaderships.
    pub(crate) kv: HashMap<(ElectionName, KvKey), Bytes>,
    pub(crate) member_watchers: Vec<(Role, Subscriber<MemberEvent>)>,
    pub(crate) faults: Faults,
    pub(crate) reaper_started: bool,
}

impl Default for State {
    fn default() -> Self {
        Self {
            next_lease: 0x7a00,
            revision: 0,
            leases: HashMap::new(),
            members: BTreeMap::new(),
            elections: HashMap::new(),
            kv: HashMap::new(),
            member_watchers: Vec::new(),
            faults: Faults::default(),
            reaper_started: false,
        }
    }
}

impl State {
    pub(crate) fn new_lease(&mut self, member: Member, ttl: Duration, now: Instant) -> LeaseId {
        self.next_lease += 1;
        let id = LeaseId::new(self.next_lease);
        self.members
            .insert((member.role.clone(), member.server_id), id);
        self.publish_member(&member.role, MemberEvent::Joined(member.clone()), now);
        self.leases.insert(
            id,
            LeaseEntry {
                ttl,
                deadline: now + ttl,
                member,
                candidacies: HashMap::new(),
            },
        );
        id
    }

    pub(crate) fn next_token(&mut self) -> FencingToken {
        self.revision += 1;
        FencingToken::new(self.revision)
    }

    /// Ends every lease whose deadline has passed; returns the earliest deadline left.
    pub(crate) fn expire_due(&mut self, now: Instant) -> Option<Instant> {
        let due: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            tracing::debug!(lease = %id, "memory: lease expired");
            self.remove_lease(id, now);
        }
        self.leases.values().map(|lease| lease.deadline).min()
    }

    /// Removes a lease with its member record and candidacies; false if it was gone.
    pub(crate) fn remove_lease(&mut self, id: LeaseId, now: Instant) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        for (election, token) in &lease.candidacies {
            if let Some(state) = self.elections.get_mut(election) {
                state.queue.remove(token);
            }
            self.publish_leader(election, now);
        }
        let role = lease.member.role.clone();
        self.members.remove(&(role.clone(), lease.member.server_id));
        self.publish_member(&role, MemberEvent::Left(lease.member), now);
        true
    }

    /// Removes one candidacy if it still stands.
    pub(crate) fn remove_candidacy(&mut self, key: &LeaderKey, now: Instant) {
        let Some(election) = self.elections.get_mut(&key.election) else {
            return;
        };
        if election
            .queue
            .get(&key.token)
            .is_some_and(|c| c.lease == key.lease)
        {
            election.queue.remove(&key.token);
            if let Some(lease) = self.leases.get_mut(&key.lease) {
                lease.candidacies.remove(&key.election);
            }
            self.publish_leader(&key.election, now);
        }
    }

    pub(crate) fn leader(&self, election: &ElectionName) -> Option<Leader> {
        let (token, candidate) = self.elections.get(election)?.queue.iter().next()?;
        Some(Leader {
            key: LeaderKey {
                election: election.clone(),
                lease: candidate.lease,
                token: *token,
            },
            value: candidate.value.clone(),
            server_id: self
                .leases
                .get(&candidate.lease)
                .map(|lease| lease.member.server_id),
        })
    }

    fn event_for(&self, election: &ElectionName) -> LeaderEvent {
        match self.leader(election) {
            Some(leader) => LeaderEvent::Elected(leader),
            None => LeaderEvent::Vacant,
        }
    }

    fn deliver_at(&self, now: Instant) -> Instant {
        now + self.faults.notification_delay
    }

    /// Tells the election's watchers if its leader or the leader's value changed, and
    /// forgets an election nobody runs in or watches.
    pub(crate) fn publish_leader(&mut self, election: &ElectionName, now: Instant) {
        let event = self.event_for(election);
        let at = self.deliver_at(now);
        let Some(state) = self.elections.get_mut(election) else {
            return;
        };
        let current = event.leader().map(|l| (l.token(), l.value.clone()));
        if current != state.last_reported {
            state.last_reported = current;
            state
                .watchers
                .retain(|watcher| watcher.offer((at, event.clone())));
        }
        if state.queue.is_empty() && state.watchers.is_empty() {
            self.elections.remove(election);
        }
    }

    /// Adds a watcher and sends it the current state first.
    pub(crate) fn subscribe_leader(
        &mut self,
        election: &ElectionName,
        watcher: Subscriber<LeaderEvent>,
        now: Instant,
    ) {
        let event = self.event_for(election);
        let at = self.deliver_at(now);
        let state = self.elections.entry(election.clone()).or_default();
        state.last_reported = event.leader().map(|l| (l.token(), l.value.clone()));
        // Watchers that went away are otherwise pruned only when the election changes.
        state.watchers.retain(|w| !w.is_closed());
        if watcher.offer((at, event)) {
            state.watchers.push(watcher);
        }
    }

    fn publish_member(&mut self, role: &Role, event: MemberEvent, now: Instant) {
        let at = self.deliver_at(now);
        self.member_watchers
            .retain(|(watched, watcher)| watched != role || watcher.offer((at, event.clone())));
    }

    pub(crate) fn members(&self, role: &Role) -> Vec<Member> {
        self.members
            .iter()
            .filter(|((r, _), _)| r == role)
            .filter_map(|(_, lease)| self.leases.get(lease).map(|l| l.member.clone()))
            .collect()
    }

    pub(crate) fn subscribe_members(
        &mut self,
        role: &Role,
        watcher: Subscriber<MemberEvent>,
        now: Instant,
    ) {
        let snapshot = MemberEvent::Snapshot(self.members(role));
        self.member_watchers.retain(|(_, w)| !w.is_closed());
        if watcher.offer((self.deliver_at(now), snapshot)) {
            self.member_watchers.push((role.clone(), watcher));
        }
    }
}
