//! A small timestamp oracle (like Milvus's rootcoord TSO) run as a highly available
//! coordinator: three replicas under `ActiveStandby`, only the ACTIVE serves, and every
//! timestamp it hands out is stamped with its fencing token, so a client can tell an
//! answer from a deposed active (lower token) and drop it.
//!
//! ```text
//! cargo run --example coordinator                       # three replicas in-process (memory)
//! cargo run --example coordinator -- raft://127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 3
//! ```
//!
//! With a URL, it runs `N` replicas (default 3) against that backend. A client follows
//! the leader value (`active <address>`) and asks the ACTIVE for timestamps over TCP;
//! after two seconds the ACTIVE is shut down (a rolling restart) and the client carries on
//! with the next one, checking that (token, timestamp) only ever increases.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ha::{Active, ActiveStandby, Backend, ElectionName, Readiness, Role, ServerId};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The bits of a timestamp below the physical milliseconds (Milvus uses 18).
const LOGICAL_BITS: u32 = 18;

fn physical_now() -> u64 {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ms << LOGICAL_BITS
}

/// The activation: bind, report ready, serve `"<token> <timestamp>"` lines until stopped.
async fn serve_timestamps(active: Active, listener: Arc<TcpListener>) -> anyhow::Result<()> {
    let token = active.token();
    let last = Arc::new(AtomicU64::new(0));
    active.ready().await?;
    loop {
        let (socket, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = active.stopping().cancelled() => return Ok(()),
        };
        let (last, stopping) = (Arc::clone(&last), active.stopping().clone());
        if !active.is_valid() {
            return Ok(());
        }
        tokio::spawn(async move {
            let (read, mut write) = socket.into_split();
            let mut lines = BufReader::new(read).lines();
            loop {
                tokio::select! {
                    line = lines.next_line() => match line {
                        Ok(Some(_)) => {
                            // Strictly increasing within this leadership; across
                            // leaderships the token orders the answers.
                            let next = |prev: u64| Some(prev.max(physical_now()) + 1);
                            let prev = last
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, next)
                                .unwrap_or_else(|prev| prev);
                            let ts = prev.max(physical_now()) + 1;
                            let reply = format!("{} {ts}\n", token.get());
                            if write.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        _ => return,
                    },
                    () = stopping.cancelled() => return,
                }
            }
        });
    }
}

/// Finds the ready ACTIVE's address in the leader value.
async fn active_address(backend: &Arc<dyn Backend>, election: &ElectionName) -> Option<String> {
    let leader = backend.leader(election).await.ok()??;
    match Readiness::parse(&leader.value) {
        Some((Readiness::Active, address)) => Some(address.to_owned()),
        _ => None, // vacant or still activating: do not route yet
    }
}

/// Asks whichever replica is ACTIVE for a timestamp.
async fn ask(backend: &Arc<dyn Backend>, election: &ElectionName) -> Option<(u64, u64)> {
    let address = active_address(backend, election).await?;
    let stream = TcpStream::connect(&address).await.ok()?;
    let (read, mut write) = stream.into_split();
    write.write_all(b"ts\n").await.ok()?;
    let line = BufReader::new(read).lines().next_line().await.ok()??;
    let (token, ts) = line.split_once(' ')?;
    Some((token.parse().ok()?, ts.parse().ok()?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "memory://".to_owned());
    let replicas: u64 = args.next().map(|n| n.parse()).transpose()?.unwrap_or(3);
    let backend = ha::connect(&url).await?;
    let role = Role::new("tso")?;
    let election = ElectionName::from_role(&role);

    let mut running = Vec::new();
    for id in 1..=replicas {
        let listener = Arc::new(TcpListener::bind("127.0.0.1:0").await?);
        let address = listener.local_addr()?.to_string();
        let replica = ActiveStandby::builder(Arc::clone(&backend), role.clone(), ServerId::new(id))
            .address(address.as_str())
            .ttl(Duration::from_secs(3))
            .spawn(move |active: Active| serve_timestamps(active, Arc::clone(&listener)));
        running.push((id, replica));
    }

    let mut highest = (0u64, 0u64);
    let mut stopped = false;
    let started = tokio::time::Instant::now();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some((token, ts)) = ask(&backend, &election).await else {
            println!("no ready ACTIVE yet");
            continue;
        };
        anyhow::ensure!(
            (token, ts) > highest,
            "went backwards: {highest:?} then {:?}",
            (token, ts)
        );
        highest = (token, ts);
        println!("timestamp {ts} from the ACTIVE with fencing token {token}");
        if !stopped && started.elapsed() > Duration::from_secs(2) {
            if let Some(index) = running
                .iter()
                .position(|(_, r)| r.state().is_ready_active())
            {
                let (id, replica) = running.remove(index);
                println!("-- rolling restart: stopping the ACTIVE replica {id} --");
                replica.stop().await?;
                stopped = true;
            }
        }
    }
    for (_, replica) in running {
        replica.stop().await?;
    }
    println!("done: (token, timestamp) only increased, across a handover");
    Ok(())
}
