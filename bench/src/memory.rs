//! Graceful handoff in one process on the memory backend: two replicas, the ACTIVE
//! stopped, the gap until the other is ACTIVE. The floor under every backend's handoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use ha::{Active, ActiveStandby, Backend, Role, RoleState, ServerId};

use crate::report::Series;

/// `trials` handoffs between in-process replicas.
pub async fn handoffs(trials: usize) -> Result<Series> {
    let backend: Arc<dyn Backend> = Arc::new(ha::memory::MemoryBackend::new());
    let role = Role::new("bench")?;
    let spawn = |id: u64| {
        ActiveStandby::builder(Arc::clone(&backend), role.clone(), ServerId::new(id))
            .ttl(Duration::from_secs(2))
            .spawn(|active: Active| async move {
                active.ready().await?;
                active.stopping().cancelled().await;
                Ok::<_, ha::Error>(())
            })
    };
    let is_active = |state: &RoleState| matches!(state, RoleState::Active { .. });
    let mut replicas = vec![spawn(1), spawn(2)];
    let mut gaps = Vec::new();
    for next_id in (3..).take(trials) {
        let Some(index) = wait_until(Duration::from_secs(10), || {
            replicas.iter().position(|r| is_active(&r.state()))
        })
        .await
        else {
            return Err(anyhow!("memory: no ACTIVE within 10 s"));
        };
        let leaving = replicas.remove(index);
        let mut other = replicas[0].watch_state();
        let started = Instant::now();
        leaving.shutdown();
        tokio::time::timeout(Duration::from_secs(10), other.wait_for(is_active))
            .await
            .context("memory: no handoff within 10 s")?
            .context("memory: the other replica stopped")?;
        gaps.push(started.elapsed().as_secs_f64() * 1000.0);
        let _ = leaving.wait().await;
        replicas.push(spawn(next_id));
    }
    for replica in replicas {
        let _ = replica.stop().await;
    }
    Ok(Series {
        scenario: "handoff",
        backend: "memory",
        variant: "in-process, ActiveStandby::stop".to_owned(),
        ttl: None,
        gaps_ms: gaps,
    })
}

/// Polls `check` every millisecond until it returns `Some`, for at most `within`.
async fn wait_until<T>(within: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
