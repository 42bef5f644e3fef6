//! Measures campaign and handoff latency of the etcd backend against a local etcd that it
//! starts itself (the `etcd` binary from PATH, loopback ports, a temp data dir) and stops
//! by PID. A measurement, not a test: it prints what it saw.
//!
//! Run: `cargo run --release -p ha-etcd --example etcd_measure`

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ha_core::{Backend, ElectionName, Member, Role, ServerId};
use ha_etcd::{EtcdBackend, EtcdConfig};

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{name:<36} n={:<5} p50={:>9.3?} p90={:>9.3?} p99={:>9.3?} max={:>9.3?}",
        samples.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        samples[samples.len() - 1]
    );
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (client, peer) = (free_port()?, free_port()?);
    let endpoint = format!("127.0.0.1:{client}");
    let mut etcd = Command::new("etcd")
        .arg("--name=measure")
        .arg(format!("--data-dir={}", dir.path().display()))
        .arg(format!("--listen-client-urls=http://{endpoint}"))
        .arg(format!("--advertise-client-urls=http://{endpoint}"))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!(
            "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
        ))
        .arg(format!("--initial-cluster=measure=http://127.0.0.1:{peer}"))
        .arg("--log-level=error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let result = measure(&endpoint).await;
    let _ = etcd.kill();
    let _ = etcd.wait();
    result
}

async fn measure(endpoint: &str) -> Result<(), Box<dyn std::error::Error>> {
    let started = Instant::now();
    let backend = loop {
        match EtcdBackend::connect(EtcdConfig::new([endpoint.to_owned()])).await {
            Ok(backend) => break Arc::new(backend),
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    println!(
        "{} on loopback, {} cores",
        etcd_version(),
        std::thread::available_parallelism()?.get()
    );
    let election = ElectionName::new("measure")?;
    let role = Role::new("measure")?;
    let ttl = Duration::from_secs(60);
    let a = backend
        .register(&Member::new(ServerId::new(1), role.clone(), "a"), ttl)
        .await?;
    let b = backend
        .register(&Member::new(ServerId::new(2), role.clone(), "b"), ttl)
        .await?;

    let mut campaign = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        let key = backend.campaign(a.id, &election, "a".into()).await?;
        campaign.push(t.elapsed());
        backend.resign(&key).await?;
    }
    report("campaign (uncontested)", campaign);

    let mut handoff = Vec::new();
    let mut holder = backend.campaign(a.id, &election, "a".into()).await?;
    let mut waiting = b.id;
    for _ in 0..200 {
        let waiter = {
            let (backend, election) = (Arc::clone(&backend), election.clone());
            tokio::spawn(async move {
                let key = backend.campaign(waiting, &election, "w".into()).await;
                (Instant::now(), key)
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = Instant::now();
        backend.resign(&holder).await?;
        let (at, key) = waiter.await?;
        handoff.push(at - t);
        waiting = holder.lease;
        holder = key?;
    }
    report("handoff (resign -> next elected)", handoff);
    Ok(())
}

fn etcd_version() -> String {
    Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_default()
}
