//! Load on a backend from this process: campaign+resign throughput, many live sessions
//! (what their keepalives cost the servers), many elections at once, and a long run of
//! cycles (what the Raft log and sled keep on disk).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use futures::{stream, StreamExt, TryStreamExt};
use ha::{Backend, Bytes, ElectionName, LeaseId, Member, Role, ServerId};
use serde_json::{json, Value};

use crate::procfs;
use crate::report::summary;

/// Registrations and revocations in flight at once.
const SETUP_CONCURRENCY: usize = 64;

static NEXT_SERVER: AtomicU64 = AtomicU64::new(1_000_000);

/// Connects, retrying while a fresh group elects its Raft leader.
pub async fn connect(url: &str) -> Result<Arc<dyn Backend>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let backend = ha::connect(url).await?;
            // A round trip that needs a leader: a session, at once revoked.
            let lease = register(&*backend, Duration::from_secs(10)).await?;
            backend.revoke(lease).await?;
            Ok::<_, ha::Error>(backend)
        };
        match attempt.await {
            Ok(backend) => return Ok(backend),
            Err(error) if Instant::now() >= deadline => {
                return Err(error).with_context(|| format!("cannot use {url} within 30 s"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn register(backend: &dyn Backend, ttl: Duration) -> ha::Result<LeaseId> {
    let role = Role::new("bench-load")?;
    let id = ServerId::new(NEXT_SERVER.fetch_add(1, Ordering::Relaxed));
    Ok(backend.register(&Member::new(id, role, ""), ttl).await?.id)
}

async fn register_many(
    backend: &Arc<dyn Backend>,
    n: usize,
    ttl: Duration,
) -> Result<Vec<LeaseId>> {
    stream::iter(0..n)
        .map(|_| register(&**backend, ttl))
        .buffer_unordered(SETUP_CONCURRENCY)
        .try_collect()
        .await
        .context("registering sessions")
}

async fn revoke_many(backend: &Arc<dyn Backend>, leases: Vec<LeaseId>) {
    stream::iter(leases)
        .for_each_concurrent(SETUP_CONCURRENCY, |lease| async move {
            let _ = backend.revoke(lease).await;
        })
        .await;
}

/// Campaign+resign cycles in `elections` elections at once, one candidate each, for
/// `duration` (or until `max_cycles` in all). Returns cycles done, seconds and each
/// cycle's latency in ms.
async fn cycles(
    backend: &Arc<dyn Backend>,
    elections: usize,
    duration: Duration,
    max_cycles: u64,
    tag: &str,
) -> Result<(u64, f64, Vec<f64>)> {
    let leases = register_many(backend, elections, Duration::from_secs(60)).await?;
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let workers = leases.iter().enumerate().map(|(index, lease)| {
        let backend = Arc::clone(backend);
        let done = Arc::clone(&done);
        let lease = *lease;
        let election = ElectionName::new(format!("bench-{tag}-{index}"));
        async move {
            let election = election?;
            let mut latencies = Vec::new();
            let mut renewed = Instant::now();
            while Instant::now() < deadline && done.load(Ordering::Relaxed) < max_cycles {
                let cycle = Instant::now();
                let key = backend
                    .campaign(lease, &election, Bytes::from_static(b"bench"))
                    .await?;
                backend.resign(&key).await?;
                latencies.push(cycle.elapsed().as_secs_f64() * 1000.0);
                done.fetch_add(1, Ordering::Relaxed);
                if renewed.elapsed() > Duration::from_secs(20) {
                    backend.keep_alive(lease).await?;
                    renewed = Instant::now();
                }
            }
            Ok::<_, ha::Error>(latencies)
        }
    });
    let per_worker = futures::future::try_join_all(workers)
        .await
        .context("campaign+resign cycles")?;
    let seconds = started.elapsed().as_secs_f64();
    revoke_many(backend, leases).await;
    let latencies: Vec<f64> = per_worker.into_iter().flatten().collect();
    Ok((done.load(Ordering::Relaxed), seconds, latencies))
}

/// Throughput rows: campaign+resign cycles per second with each count of elections.
pub async fn throughput(
    backend: &Arc<dyn Backend>,
    name: &str,
    concurrencies: &[usize],
    duration: Duration,
) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for &elections in concurrencies {
        println!("{name}: campaign+resign in {elections} elections for {duration:?}");
        let (done, seconds, latencies) = cycles(
            backend,
            elections,
            duration,
            u64::MAX,
            &format!("tp{elections}"),
        )
        .await?;
        let stats = summary(&latencies);
        rows.push(json!({
            "backend": name,
            "elections": elections,
            "cycles": done,
            "seconds": seconds,
            "cycles_per_s": done as f64 / seconds,
            "cycle_p50_ms": stats.map(|s| s.1),
            "cycle_p99_ms": stats.map(|s| s.3),
        }));
    }
    Ok(rows)
}

/// `n` live sessions of `ttl`, each renewed every ttl/3 as the runtime does; what the
/// servers `pids` spend on them over `window`.
pub async fn sessions(
    backend: &Arc<dyn Backend>,
    name: &str,
    pids: &[u32],
    n: usize,
    ttl: Duration,
    window: Duration,
) -> Result<Value> {
    println!("{name}: {n} sessions of TTL {ttl:?}, CPU measured over {window:?}");
    let idle_cpu = procfs::cpu_share(pids, Duration::from_secs(2)).await?;
    let interval = ttl / 3;
    let failures = Arc::new(AtomicU64::new(0));
    let renewals = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let setup = Instant::now();
    let mut registered = stream::iter(0..n)
        .map(|_| register(&**backend, ttl))
        .buffer_unordered(SETUP_CONCURRENCY);
    let mut leases = Vec::with_capacity(n);
    // Each session renews every TTL/3 from its registration on, as `Session` does: a
    // lease that waited for all 10,000 to register (7-8 s on Raft, and more on a busy
    // machine) could expire before its first renewal. Registrations are spread over
    // seconds, so the renewals are spread over the interval.
    while let Some(lease) = registered.next().await {
        let lease = lease.context("registering sessions")?;
        leases.push(lease);
        let (backend, failures, renewals) = (
            Arc::clone(backend),
            Arc::clone(&failures),
            Arc::clone(&renewals),
        );
        tasks.spawn(async move {
            let mut next = tokio::time::Instant::now() + interval;
            loop {
                tokio::time::sleep_until(next).await;
                match backend.keep_alive(lease).await {
                    Ok(_) => renewals.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failures.fetch_add(1, Ordering::Relaxed),
                };
                next += interval;
            }
        });
    }
    drop(registered);
    let setup_s = setup.elapsed().as_secs_f64();
    // One interval first, so every session is in its renewal rhythm.
    tokio::time::sleep(interval).await;
    let renewed_before = renewals.load(Ordering::Relaxed);
    let cpu = procfs::cpu_share(pids, window).await?;
    let renewals_per_s =
        (renewals.load(Ordering::Relaxed) - renewed_before) as f64 / window.as_secs_f64();
    let rss = pids
        .iter()
        .map(|p| procfs::rss_bytes(*p))
        .collect::<Result<Vec<_>>>()?;
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    revoke_many(backend, leases).await;
    Ok(json!({
        "backend": name,
        "sessions": n,
        "ttl_s": ttl.as_secs_f64(),
        "register_s": setup_s,
        "renewals_per_s": renewals_per_s,
        "renewal_failures": failures.load(Ordering::Relaxed),
        "idle_cpu_per_server": idle_cpu,
        "cpu_per_server": cpu,
        "rss_mib_per_server": rss.iter().map(|b| procfs::mib(*b)).collect::<Vec<_>>(),
    }))
}

/// `elections` elections with three candidates each: how long until all have a leader,
/// then every leader resigns at once and each election's handoff is timed.
pub async fn elections(backend: &Arc<dyn Backend>, name: &str, elections: usize) -> Result<Value> {
    println!("{name}: {elections} elections x 3 candidates");
    let leases = register_many(backend, elections * 3, Duration::from_secs(60)).await?;
    let started = Instant::now();
    let (elected_tx, mut elected_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut candidates = tokio::task::JoinSet::new();
    for (index, lease) in leases.iter().enumerate() {
        let (backend, elected_tx, lease) = (Arc::clone(backend), elected_tx.clone(), *lease);
        let election = ElectionName::new(format!("bench-many-{}", index / 3))?;
        candidates.spawn(async move {
            if let Ok(key) = backend
                .campaign(lease, &election, Bytes::from_static(b"c"))
                .await
            {
                let _ = elected_tx.send((index / 3, key, Instant::now()));
            }
        });
    }
    drop(elected_tx);
    let patience = Duration::from_secs(120);
    let mut leaders = Vec::with_capacity(elections);
    while leaders.len() < elections {
        let next = tokio::time::timeout_at((started + patience).into(), elected_rx.recv()).await;
        match next {
            Ok(Some(elected)) => leaders.push(elected),
            Ok(None) => return Err(anyhow!("{name}: candidates ended before all were elected")),
            Err(_) => {
                return Err(anyhow!(
                    "{name}: not all {elections} elections had a leader within {patience:?}"
                ))
            }
        }
    }
    let all_elected_s = started.elapsed().as_secs_f64();
    // Every leader resigns at once; each election's next candidate takes over.
    let resigned_at = Instant::now();
    let mut resign_started = vec![resigned_at; elections];
    let started_resigns: Vec<(usize, Instant)> = stream::iter(leaders)
        .map(|(election, key, _)| {
            let backend = Arc::clone(backend);
            async move {
                let at = Instant::now();
                let _ = backend.resign(&key).await;
                (election, at)
            }
        })
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect()
        .await;
    for (election, at) in started_resigns {
        resign_started[election] = at;
    }
    let mut handoffs = Vec::with_capacity(elections);
    while handoffs.len() < elections {
        let next =
            tokio::time::timeout_at((resigned_at + patience).into(), elected_rx.recv()).await;
        match next {
            Ok(Some((election, _, at))) => handoffs.push(
                at.saturating_duration_since(resign_started[election])
                    .as_secs_f64()
                    * 1000.0,
            ),
            Ok(None) => return Err(anyhow!("{name}: candidates ended before every handoff")),
            Err(_) => {
                return Err(anyhow!(
                    "{name}: not every election handed off within {patience:?}"
                ))
            }
        }
    }
    let all_handed_off_s = resigned_at.elapsed().as_secs_f64();
    candidates.abort_all();
    revoke_many(backend, leases).await;
    let stats = summary(&handoffs);
    Ok(json!({
        "backend": name,
        "elections": elections,
        "candidates": elections * 3,
        "all_elected_s": all_elected_s,
        "all_handed_off_s": all_handed_off_s,
        "handoff_p50_ms": stats.map(|s| s.1),
        "handoff_p99_ms": stats.map(|s| s.3),
    }))
}

/// `total` campaign+resign cycles in 16 elections, then what the Raft members keep:
/// disk under each data dir and each process's RSS.
pub async fn endurance(
    backend: &Arc<dyn Backend>,
    name: &str,
    total: u64,
    members: &[(u32, std::path::PathBuf)],
) -> Result<Value> {
    println!("{name}: {total} campaign+resign cycles in 16 elections");
    let (done, seconds, latencies) = cycles(
        backend,
        16,
        Duration::from_secs(24 * 3600),
        total,
        "endurance",
    )
    .await?;
    // Let the last snapshot and log purge land.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let disk = members
        .iter()
        .map(|(_, dir)| procfs::disk_usage(dir).map(procfs::mib))
        .collect::<Result<Vec<_>>>()?;
    let rss = members
        .iter()
        .map(|(pid, _)| procfs::rss_bytes(*pid).map(procfs::mib))
        .collect::<Result<Vec<_>>>()?;
    let stats = summary(&latencies);
    Ok(json!({
        "backend": name,
        "cycles": done,
        "seconds": seconds,
        "cycles_per_s": done as f64 / seconds,
        "cycle_p99_ms": stats.map(|s| s.3),
        "disk_mib_per_member": disk,
        "rss_mib_per_member": rss,
    }))
}
