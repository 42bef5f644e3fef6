//! Seeded fault schedules on real 3-node Raft groups (loopback gRPC, real sled dirs),
//! each checked by the history checker. Faults: the Raft leader isolated, a minority
//! node partitioned, one link cut (a partial partition), message delay and drop, a node
//! killed and restarted from its data dir (its co-located participant paused for the
//! downtime, as one process), and the participants' own resigns, dropped campaigns and
//! restarts. Several groups run at once.
//! Placement is on: the schedules also bound its moves (no churn).
//!
//! `HA_FAULT_RUNS=N` / `HA_FAULT_SEEDS=a,b` pick the seeds (CI runs 100). Real time: a
//! seed gives the same fault schedule, not the same interleaving.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use common::Group;
use futures::StreamExt;
use ha_core::testing::history::{fault_seeds, History, Record, Totals};
use ha_core::testing::participant::{Command, Participant, Setup};
use ha_core::{
    Backend, Capabilities, ElectionName, Error, KvKey, KvWrite, KvWriteOutcome, LeaderKey,
    LeaderStream, Lease, LeaseId, Member, MemberStream, Result, Role,
};
use ha_raft::RaftNode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{sleep, Instant};

const TTL: Duration = Duration::from_secs(2);
/// A leader must act this soon after healing: a Raft election, then a stale lease's fresh
/// TTL on the new Raft leader, then a campaign, with room for a loaded machine.
const LIVENESS: Duration = Duration::from_secs(12);
const STEPS: usize = 4;
const CONCURRENT: usize = 16;

/// The node a co-located participant talks to; empty while the node is down (calls
/// fail as they would in the dead process), refilled when it restarts.
#[derive(Debug, Clone, Default)]
struct Slot(Arc<RwLock<Option<RaftNode>>>);

impl Slot {
    fn node(&self) -> Result<RaftNode> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| Error::Unavailable("the node is down".into()))
    }

    fn set(&self, node: Option<RaftNode>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = node;
    }
}

#[async_trait]
impl Backend for Slot {
    fn name(&self) -> &'static str {
        "raft"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::new(ha_raft::MIN_TTL)
    }
    async fn register(&self, member: &Member, ttl: Duration) -> Result<Lease> {
        self.node()?.register(member, ttl).await
    }
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        self.node()?.keep_alive(lease).await
    }
    async fn revoke(&self, lease: LeaseId) -> Result<()> {
        self.node()?.revoke(lease).await
    }
    async fn campaign(
        &self,
        lease: LeaseId,
        election: &ElectionName,
        value: Bytes,
    ) -> Result<LeaderKey> {
        self.node()?.campaign(lease, election, value).await
    }
    async fn resign(&self, key: &LeaderKey) -> Result<()> {
        self.node()?.resign(key).await
    }
    async fn proclaim(&self, key: &LeaderKey, value: Bytes) -> Result<()> {
        self.node()?.proclaim(key, value).await
    }
    async fn leader(&self, election: &ElectionName) -> Result<Option<ha_core::Leader>> {
        self.node()?.leader(election).await
    }
    fn watch(&self, election: &ElectionName) -> LeaderStream {
        match self.node() {
            Ok(node) => node.watch(election),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }
    async fn members(&self, role: &Role) -> Result<Vec<Member>> {
        self.node()?.members(role).await
    }
    fn watch_members(&self, role: &Role) -> MemberStream {
        match self.node() {
            Ok(node) => node.watch_members(role),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }
    async fn kv_write(&self, guard: &LeaderKey, write: KvWrite) -> Result<KvWriteOutcome> {
        self.node()?.kv_write(guard, write).await
    }
    async fn kv_read(&self, election: &ElectionName, key: &KvKey) -> Result<Option<Bytes>> {
        self.node()?.kv_read(election, key).await
    }
}

/// What a schedule left: its history, and the Raft leadership moves placement made
/// (counted on the nodes running at the end) against every term change.
struct Ran {
    history: Arc<History>,
    moves: u64,
    terms: u64,
}

async fn schedule(seed: u64) -> Ran {
    let mut rng = StdRng::seed_from_u64(seed);
    // The participants are co-located with the nodes: placement keeps the Raft leader
    // off the ACTIVE's node while the faults run.
    let mut group = Group::start_with(3, |config| config.with_placement(true)).await;
    let first_term = term(&group);
    let history = Arc::new(History::new());
    let setup = Setup {
        election: ElectionName::new("schedule").unwrap_or_else(|e| panic!("{e}")),
        ttl: TTL,
        act_every: Duration::from_millis(rng.random_range(20..100)),
        epoch: Instant::now(),
        history: Arc::clone(&history),
    };
    let slots: BTreeMap<u64, Slot> = (1..=3)
        .map(|id| {
            let slot = Slot::default();
            slot.set(group.nodes.get(&id).cloned());
            (id, slot)
        })
        .collect();
    let participants: BTreeMap<u64, Participant> = slots
        .iter()
        .map(|(id, slot)| {
            (
                *id,
                Participant::spawn(*id, Arc::new(slot.clone()), setup.clone()),
            )
        })
        .collect();
    let fault = |what: String| {
        history.record(Record::Fault {
            at: setup.now(),
            what,
        })
    };
    for _ in 0..STEPS {
        sleep(Duration::from_millis(rng.random_range(100..1000))).await;
        let node = rng.random_range(1..=3u64);
        let others: Vec<u64> = (1..=3).filter(|n| *n != node).collect();
        let long = Duration::from_millis(rng.random_range(300..(TTL.as_millis() as u64 * 2)));
        match rng.random_range(0..8) {
            0 => {
                // The Raft leader (whoever it is now) cut off from both followers.
                let leader = group
                    .nodes
                    .values()
                    .find_map(RaftNode::current_leader)
                    .unwrap_or(node);
                let followers: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
                fault(format!("raft leader n{leader} isolated for {long:?}"));
                group.faults.partition(&[leader], &followers);
                sleep(long).await;
                group.faults.heal();
            }
            1 => {
                fault(format!("n{node} partitioned from {others:?} for {long:?}"));
                group.faults.partition(&[node], &others);
                sleep(long).await;
                group.faults.heal();
            }
            2 => {
                let delay = Duration::from_millis(rng.random_range(5..150));
                fault(format!("peer messages delayed {delay:?} for {long:?}"));
                group.faults.set_delay(delay);
                sleep(long).await;
                group.faults.set_delay(Duration::ZERO);
            }
            3 => {
                let n = rng.random_range(2..6);
                fault(format!("one peer message in {n} dropped for {long:?}"));
                group.faults.drop_one_in(n);
                sleep(long).await;
                group.faults.drop_one_in(0);
            }
            4 => {
                // The process dies: its node stops and its participant is not polled;
                // both come back after the downtime, the node from its data dir.
                fault(format!(
                    "n{node} and p{node} killed for {long:?}, then restarted"
                ));
                participants[&node].send(Command::Pause(long));
                slots[&node].set(None);
                group.kill(node).await;
                sleep(long).await;
                group.restart(node).await;
                slots[&node].set(group.nodes.get(&node).cloned());
            }
            7 => {
                // A partial partition: one link cut, each end still reaching the third.
                let other = others[rng.random_range(0..others.len())];
                fault(format!("link n{node}-n{other} cut for {long:?}"));
                group.faults.partition(&[node], &[other]);
                sleep(long).await;
                group.faults.heal();
            }
            5 => {
                fault(format!("p{node} resigns"));
                participants[&node].send(Command::Resign);
            }
            _ => {
                let command = if rng.random_bool(0.5) {
                    Command::DropCampaign
                } else {
                    Command::Restart
                };
                fault(format!("p{node}: {command:?}"));
                participants[&node].send(command);
            }
        }
    }
    group.faults.heal();
    group.faults.set_delay(Duration::ZERO);
    group.faults.drop_one_in(0);
    history.record(Record::Healed { at: setup.now() });
    sleep(LIVENESS + Duration::from_secs(1)).await;
    for (_, p) in participants {
        p.stop().await;
    }
    for slot in slots.values() {
        slot.set(None);
    }
    let terms = term(&group).saturating_sub(first_term);
    let mut moves = 0;
    for node in group.nodes.values() {
        moves += node.status().await.placement_moves;
    }
    group.shutdown().await;
    Ran {
        history,
        moves,
        terms,
    }
}

/// The highest term among the running nodes.
fn term(group: &Group) -> u64 {
    group
        .nodes
        .values()
        .map(|node| node.raft().metrics().borrow().current_term)
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_schedules_never_show_two_leaders() {
    let seeds = fault_seeds(100);
    let started = std::time::Instant::now();
    let results: Vec<(u64, Ran)> = futures::stream::iter(seeds.clone())
        .map(|seed| async move { (seed, schedule(seed).await) })
        .buffer_unordered(CONCURRENT)
        .collect()
        .await;
    let mut totals = Totals::default();
    let (mut moves, mut terms) = (0, 0);
    for (seed, ran) in &results {
        let replay = format!("HA_FAULT_SEEDS={seed} cargo test -p ha-raft --test fault_schedules");
        let seen = ran.history.assert_ok(Some(LIVENESS), *seed, &replay);
        // No churn: every move answers an election the faults caused or a new ACTIVE
        // (the first may answer the group's first leader).
        let caused = ran.terms.saturating_sub(ran.moves) + seen.leaderships as u64 + 1;
        assert!(
            ran.moves <= caused,
            "seed {seed}: {} placement moves for {} term changes and {} leaderships; replay: {replay}",
            ran.moves,
            ran.terms,
            seen.leaderships
        );
        moves += ran.moves;
        terms += ran.terms;
        totals.add(&seen);
    }
    eprintln!(
        "raft: {totals}, {moves} placement moves in {terms} term changes, in {:?}",
        started.elapsed()
    );
    assert!(
        totals.leaderships >= seeds.len(),
        "the schedules elected almost nobody"
    );
    assert!(
        totals.writes >= seeds.len(),
        "the schedules made almost no guarded writes: {totals}"
    );
}
