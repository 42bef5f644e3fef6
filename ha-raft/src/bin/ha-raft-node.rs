//! `ha-raft-node`: runs one member of an `ha` Raft group as a process of its own, for
//! groups whose coordinators are all remote clients (`raft://...`) and for tests that
//! kill real processes. Coordinators that embed their member use `RaftNode` directly.
//!
//! ```text
//! ha-raft-node --id 1 --listen 127.0.0.1:7001 \
//!     --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 \
//!     --data /var/lib/ha/1 [--cluster ID]
//! ```
//!
//! Prints `ready <id>` once serving and `leader <id>` whenever the Raft leader it knows
//! changes; stops cleanly on SIGINT or SIGTERM. Exit codes: 0 clean, 2 bad usage,
//! 4 the node could not start, or its Raft core stopped (a storage error such as a
//! full disk).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use ha_raft::{RaftNode, RaftNodeConfig};

const USAGE: &str = "usage: ha-raft-node --id N --listen HOST:PORT --peers ID=HOST:PORT,... --data DIR [--cluster ID]";

fn parse(args: &[String]) -> Result<RaftNodeConfig, String> {
    let mut id = None;
    let mut listen = None;
    let mut peers = BTreeMap::new();
    let mut data = None;
    let mut cluster = None;
    let mut iter = args.iter();
    while let Some(flag) = iter.next() {
        let mut value = || iter.next().cloned().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--id" => id = Some(value()?.parse::<u64>().map_err(|e| format!("--id: {e}"))?),
            "--listen" => {
                listen = Some(value()?.parse().map_err(|e| format!("--listen: {e}"))?);
            }
            "--peers" => {
                for pair in value()?.split(',') {
                    let (peer, addr) = pair
                        .split_once('=')
                        .ok_or(format!("--peers: {pair:?} is not ID=HOST:PORT"))?;
                    let peer = peer
                        .parse::<u64>()
                        .map_err(|e| format!("--peers: {peer:?}: {e}"))?;
                    peers.insert(peer, addr.to_owned());
                }
            }
            "--data" => data = Some(PathBuf::from(value()?)),
            "--cluster" => cluster = Some(value()?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let id = id.ok_or("--id is required")?;
    let listen = listen.ok_or("--listen is required")?;
    let data = data.ok_or("--data is required")?;
    let mut config = RaftNodeConfig::new(id, listen, peers, data);
    if let Some(cluster) = cluster {
        config = config.with_cluster_id(cluster);
    }
    Ok(config)
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match parse(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ha-raft-node: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let id = config.id;
    let node = match RaftNode::start(config).await {
        Ok(node) => node,
        Err(e) => {
            eprintln!("ha-raft-node: cannot start node {id}: {e}");
            return ExitCode::from(4);
        }
    };
    say(format!("ready {id}"));
    let mut metrics = node.raft().metrics();
    let mut known = None;
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(e) => {
                eprintln!("ha-raft-node: cannot handle SIGTERM: {e}");
                return ExitCode::from(4);
            }
        };
    let mut exit = ExitCode::SUCCESS;
    loop {
        let leader = node.current_leader();
        if leader != known {
            known = leader;
            if let Some(leader) = leader {
                say(format!("leader {leader}"));
            }
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { break },
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            failure = node.failed() => {
                eprintln!("ha-raft-node: node {id} stopped: {failure}");
                exit = ExitCode::from(4);
                break;
            }
        }
    }
    node.shutdown().await;
    exit
}
