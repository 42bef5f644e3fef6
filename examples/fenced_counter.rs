//! A counter that only the ACTIVE replica may increment, kept in the backend's guarded
//! store. Run several replicas against one backend; kill, pause (SIGSTOP) and resume
//! them as you like: the counter never goes back and no value is counted twice, because
//! a replica that lost its leadership cannot write, even if it has not noticed yet.
//!
//! ```text
//! cargo run --example fenced_counter -- --backend etcd://127.0.0.1:2379 --id 1
//! cargo run --example fenced_counter -- --backend raft://127.0.0.1:7001,127.0.0.1:7002 --id 2
//! ```
//!
//! Options: `--backend URL` (default `memory://`, which only makes sense for one
//! process), `--id N` (required), `--ttl SECS` (default 2), `--every-ms MS` (default
//! 50), `--election NAME` (default `counter`).
//!
//! Each accepted increment prints one JSON line on stdout:
//! `{"event":"increment","id":1,"token":42,"value":17,"at_unix_us":...}`; a write the
//! store refused because another replica leads now prints `"event":"refused"` with the
//! value it tried and the `current` leader's token (0 if none).
//! The increment is a plain guarded put of `value + 1`, not a compare-and-set: the
//! leadership guard alone keeps a stale ACTIVE from writing.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ha::{Active, ActiveStandby, ElectionName, Error, Leadership, LossPolicy, Role, ServerId};

/// The key of the counter in the election's guarded store.
const KEY: &str = "counter";

struct Options {
    backend: String,
    id: u64,
    ttl: Duration,
    every: Duration,
    election: String,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        backend: "memory://".to_owned(),
        id: 0,
        ttl: Duration::from_secs(2),
        every: Duration::from_millis(50),
        election: "counter".to_owned(),
    };
    let mut id = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--backend" => options.backend = value()?,
            "--id" => id = Some(value()?.parse()?),
            "--ttl" => options.ttl = Duration::from_secs(value()?.parse()?),
            "--every-ms" => options.every = Duration::from_millis(value()?.parse()?),
            "--election" => options.election = value()?,
            other => anyhow::bail!(
                "unknown option {other:?}; usage: fenced_counter --backend URL --id N \
                 [--ttl SECS] [--every-ms MS] [--election NAME]"
            ),
        }
    }
    options.id = id.ok_or_else(|| anyhow::anyhow!("--id N is required"))?;
    Ok(options)
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The counter's value now (linearizable: every acknowledged increment is in it).
async fn read_counter(leadership: &Leadership) -> ha::Result<u64> {
    match leadership.get(KEY).await? {
        None => Ok(0),
        Some(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| Error::InvalidArgument {
                what: "argument",
                reason: format!("the counter holds {bytes:?}, not a number"),
            }),
    }
}

/// The activation: continue from the stored value and increment it every `every`.
async fn count(active: Active, id: u64, every: Duration) -> ha::Result<()> {
    let leadership = active.leadership();
    active.ready().await?;
    let mut value = read_counter(leadership).await?;
    loop {
        tokio::select! {
            biased;
            () = active.stopping().cancelled() => return Ok(()),
            () = tokio::time::sleep(every) => {}
        }
        match leadership.put(KEY, (value + 1).to_string()).await {
            Ok(()) => {
                value += 1;
                println!(
                    "{{\"event\":\"increment\",\"id\":{id},\"token\":{},\"value\":{value},\"at_unix_us\":{}}}",
                    active.token().get(),
                    unix_us()
                );
            }
            // Deposed (or our own check found the session past its deadline): the
            // leadership is marked lost, and ActiveStandby stops this activation.
            Err(Error::NotLeader { current, .. }) => {
                println!(
                    "{{\"event\":\"refused\",\"id\":{id},\"token\":{},\"value\":{},\"current\":{},\"at_unix_us\":{}}}",
                    active.token().get(),
                    value + 1,
                    current.map_or(0, |t| t.get()),
                    unix_us()
                );
                active.stopping().cancelled().await;
                return Ok(());
            }
            Err(Error::LeaseExpired { .. }) => {
                active.stopping().cancelled().await;
                return Ok(());
            }
            // Unknown outcome: the put may have landed. Read the truth before going on,
            // so a value is never written twice.
            Err(error) if error.is_retryable() => {
                tracing::warn!(%error, "increment outcome unknown; re-reading the counter");
                if let Ok(now) = read_counter(leadership).await {
                    value = now;
                }
            }
            Err(error) => return Err(error),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let options = parse_options()?;
    let backend = ha::connect(&options.backend).await?;
    let role = Role::new("counter")?;
    let (id, every) = (options.id, options.every);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = ActiveStandby::builder(Arc::clone(&backend), role, ServerId::new(id))
        .election(ElectionName::new(options.election)?)
        .address(format!("counter-{id}"))
        .ttl(options.ttl)
        .on_loss(LossPolicy::Recampaign)
        .shutdown_on(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        })
        .run(move |active: Active| count(active, id, every))
        .await?;
    eprintln!("fenced_counter {id}: {outcome:?}");
    Ok(())
}
