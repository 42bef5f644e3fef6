//! Seeded fault schedules on the memory backend in virtual time: the same seed gives the
//! same history. Shared by `fault_schedules.rs` and `mutant.rs`.

use std::sync::Arc;
use std::time::Duration;

use ha_core::testing::history::{CheckReport, History, Record};
use ha_core::testing::participant::{Command, Participant, Setup};
use ha_core::{Backend, ElectionName};
use ha_memory::MemoryBackend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{sleep, Instant};

pub const TTL: Duration = Duration::from_secs(5);
pub const PARTICIPANTS: u64 = 3;
pub const STEPS: usize = 24;
/// After healing: a dead lease can hold the election for one TTL, then re-registration
/// and campaign retries take well under another.
pub const LIVENESS: Duration = Duration::from_secs(11);

/// Runs schedule `seed` on a fresh paused-clock runtime; returns the history.
pub fn run(seed: u64) -> Arc<History> {
    run_with(seed, false)
}

/// [`run`], with the backend's write guard switched off when `unguarded`.
pub fn run_with(seed: u64, unguarded: bool) -> Arc<History> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    runtime.block_on(schedule(seed, unguarded))
}

async fn schedule(seed: u64, unguarded: bool) -> Arc<History> {
    let mut rng = StdRng::seed_from_u64(seed);
    let backend = MemoryBackend::new();
    backend.unguarded_writes_fault(unguarded);
    let history = Arc::new(History::new());
    let setup = Setup {
        election: ElectionName::new("schedule").unwrap_or_else(|e| panic!("{e}")),
        ttl: TTL,
        act_every: Duration::from_millis(rng.random_range(20..200)),
        epoch: Instant::now(),
        history: Arc::clone(&history),
    };
    let participants: Vec<Participant> = (1..=PARTICIPANTS)
        .map(|id| Participant::spawn(id, Arc::new(backend.clone()), setup.clone()))
        .collect();
    let fault = |what: String| {
        history.record(Record::Fault {
            at: setup.now(),
            what,
        })
    };
    let mut heal_at = Instant::now();
    for _ in 0..STEPS {
        sleep(Duration::from_millis(rng.random_range(0..3000))).await;
        let p = &participants[rng.random_range(0..participants.len())];
        let long = Duration::from_millis(rng.random_range(100..(TTL.as_millis() as u64 * 2)));
        match rng.random_range(0..8) {
            0 => {
                if let Some(lease) = p.lease() {
                    fault(format!("p{} keepalives fail for {long:?}", p.id));
                    backend.fail_keep_alive_fault(lease, true);
                    let backend = backend.clone();
                    tokio::spawn(async move {
                        sleep(long).await;
                        backend.fail_keep_alive_fault(lease, false);
                    });
                    heal_at = heal_at.max(Instant::now() + long);
                }
            }
            1 => {
                // A pause: nothing of the participant runs, its keepalives included.
                fault(format!("p{} paused for {long:?}", p.id));
                p.send(Command::Pause(long));
                if let Some(lease) = p.lease() {
                    backend.fail_keep_alive_fault(lease, true);
                    let backend = backend.clone();
                    tokio::spawn(async move {
                        sleep(long).await;
                        backend.fail_keep_alive_fault(lease, false);
                    });
                }
                heal_at = heal_at.max(Instant::now() + long);
            }
            2 => {
                // An early revoke of the *leader's* lease is outside what self-fencing can
                // cover (only tokens protect then: docs/guarantees.md); revoke a
                // candidate's lease early instead.
                let leader_lease = backend
                    .leader(&setup.election)
                    .await
                    .ok()
                    .flatten()
                    .map(|l| l.key.lease);
                let candidate = p
                    .lease()
                    .filter(|lease| !p.is_leading() && Some(*lease) != leader_lease);
                if let Some(lease) = candidate {
                    fault(format!(
                        "p{}'s lease {lease} (a candidate's) expires now",
                        p.id
                    ));
                    backend.expire_lease_fault(lease);
                }
            }
            3 => {
                fault(format!("p{} drops its campaign", p.id));
                p.send(Command::DropCampaign);
            }
            4 => {
                fault(format!("p{} resigns", p.id));
                p.send(Command::Resign);
            }
            5 => {
                fault(format!("p{} restarts", p.id));
                p.send(Command::Restart);
            }
            6 => {
                let delay = Duration::from_millis(rng.random_range(1..1500));
                fault(format!("notifications delayed by {delay:?} for {long:?}"));
                backend.notification_delay_fault(delay);
                let backend = backend.clone();
                tokio::spawn(async move {
                    sleep(long).await;
                    backend.notification_delay_fault(Duration::ZERO);
                });
                heal_at = heal_at.max(Instant::now() + long);
            }
            _ => {
                fault(format!("backend unavailable for {long:?}"));
                backend.unavailable_fault(true);
                let backend = backend.clone();
                tokio::spawn(async move {
                    sleep(long).await;
                    backend.unavailable_fault(false);
                });
                heal_at = heal_at.max(Instant::now() + long);
            }
        }
    }
    tokio::time::sleep_until(heal_at).await;
    // Belt and braces: every fault off.
    backend.notification_delay_fault(Duration::ZERO);
    backend.unavailable_fault(false);
    for p in &participants {
        if let Some(lease) = p.lease() {
            backend.fail_keep_alive_fault(lease, false);
        }
    }
    history.record(Record::Healed { at: setup.now() });
    sleep(LIVENESS + TTL).await;
    for p in participants {
        p.stop().await;
    }
    history
}

/// The replay command for a seed.
#[allow(dead_code)] // each test binary uses part of this module
pub fn replay(seed: u64, test: &str) -> String {
    format!("HA_FAULT_SEEDS={seed} cargo test -p ha-memory --test {test}")
}

/// Checks a run's history.
#[allow(dead_code)]
pub fn check(history: &History) -> CheckReport {
    history.check(Some(LIVENESS))
}
