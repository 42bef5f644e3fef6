//! Two coordinators on the in-process memory backend, in real time: a crash-like
//! takeover (the active's keepalives are cut off, it fences itself, the standby takes
//! over after the TTL) and a graceful handover (resign), with the fencing tokens and a
//! store that rejects the deposed active's stale write.
//!
//! Run: `cargo run --example failover`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use ha::memory::MemoryBackend;
use ha::{
    Backend, ElectionName, FencingToken, LeaderEvent, Leadership, Member, Role, ServerId, Session,
};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(2);

/// A store outside `ha` that accepts a write only with the highest token it has seen.
#[derive(Default)]
struct FencedStore {
    highest: AtomicU64,
}

impl FencedStore {
    fn write(&self, token: FencingToken) -> bool {
        self.highest.fetch_max(token.get(), Ordering::SeqCst) <= token.get()
    }
}

struct Clock(Instant);

impl Clock {
    fn say(&self, what: impl std::fmt::Display) {
        println!("{:>7.1} ms  {what}", self.0.elapsed().as_secs_f64() * 1e3);
    }
}

async fn coordinator(backend: &Arc<MemoryBackend>, id: u64) -> ha::Result<Session> {
    let me = Member::new(
        ServerId::new(id),
        Role::new("rootcoord")?,
        format!("127.0.0.1:5310{id}"),
    );
    Session::builder(Arc::clone(backend) as Arc<dyn Backend>, me)
        .ttl(TTL)
        .register()
        .await
}

fn spawn_campaign(
    session: Arc<Session>,
    election: ElectionName,
) -> tokio::task::JoinHandle<ha::Result<Leadership>> {
    tokio::spawn(async move {
        let value = session.member().address.clone();
        session.campaign(&election, value).await
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let clock = Arc::new(Clock(Instant::now()));
    let backend = Arc::new(MemoryBackend::new());
    let election = ElectionName::new("rootcoord")?;
    let store = FencedStore::default();
    println!("ha failover demo: memory backend, TTL {TTL:?}\n");

    // A client that follows the active coordinator, as a proxy would.
    let mut leaders = backend.watch(&election);
    let follower = {
        let clock = Arc::clone(&clock);
        tokio::spawn(async move {
            while let Some(Ok(event)) = leaders.next().await {
                match event {
                    LeaderEvent::Elected(l) => clock.say(format_args!(
                        "  client sees leader {} (token {})",
                        l.value_str().unwrap_or("?"),
                        l.token()
                    )),
                    LeaderEvent::Vacant => clock.say("  client sees no leader"),
                }
            }
        })
    };

    let c1 = coordinator(&backend, 1).await?;
    let c2 = Arc::new(coordinator(&backend, 2).await?);
    clock.say("coordinators 1 and 2 registered");
    let l1 = c1.campaign(&election, "127.0.0.1:53101").await?;
    clock.say(format_args!(
        "coordinator 1 is ACTIVE, token {}",
        l1.token()
    ));
    assert!(store.write(l1.token()));
    let standby2 = spawn_campaign(Arc::clone(&c2), election.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    clock.say("coordinator 2 is in STANDBY");

    // Crash-like failure: coordinator 1 is cut off from the backend.
    backend.fail_keep_alive_fault(c1.lease(), true);
    let cut_at = Instant::now();
    clock.say("fault: coordinator 1's keepalives are dropped (partition)");
    let reason = l1.lost().await;
    clock.say(format_args!(
        "coordinator 1 stops: leadership lost ({reason}), is_valid = {}",
        l1.is_valid()
    ));
    let l2 = standby2.await??;
    let gap = cut_at.elapsed();
    clock.say(format_args!(
        "coordinator 2 is ACTIVE, token {} ({:.0} ms after the cut; TTL {:?})",
        l2.token(),
        gap.as_secs_f64() * 1e3,
        TTL
    ));
    assert!(store.write(l2.token()));
    let stale = store.write(l1.token());
    clock.say(format_args!(
        "coordinator 1's late write with token {}: {}",
        l1.token(),
        if stale {
            "ACCEPTED (bug!)"
        } else {
            "rejected by the store"
        }
    ));

    // Graceful handover: coordinator 3 waits, coordinator 2 resigns.
    let c3 = Arc::new(coordinator(&backend, 3).await?);
    let standby3 = spawn_campaign(Arc::clone(&c3), election.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    clock.say("coordinator 3 registered, in STANDBY");
    let resign_at = Instant::now();
    l2.resign().await?;
    let l3 = standby3.await??;
    clock.say(format_args!(
        "coordinator 2 resigned; coordinator 3 is ACTIVE, token {} (handover {:.2} ms)",
        l3.token(),
        resign_at.elapsed().as_secs_f64() * 1e3
    ));

    tokio::time::sleep(Duration::from_millis(50)).await;
    follower.abort();
    let tokens = [l1.token(), l2.token(), l3.token()];
    println!("\ntokens: {} < {} < {}", tokens[0], tokens[1], tokens[2]);
    if !(tokens[0] < tokens[1] && tokens[1] < tokens[2]) || stale {
        return Err("fencing tokens did not increase or a stale write was accepted".into());
    }
    l3.resign().await?;
    drop(c1);
    for session in [c2, c3] {
        if let Some(session) = Arc::into_inner(session) {
            session.close().await?;
        }
    }
    Ok(())
}
