//! The one place that wires a member together, bottom to top: storage (the data dir,
//! the log and state machine stores), the network (the peer pool and openraft's
//! network over it), Raft, the replica and its loops, the node, and the servers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ha_core::Result;
use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use tracing::info;

use crate::config::RaftNodeConfig;
use crate::data::command::{NodeId, Raft};
use crate::error::RaftBackendError;
use crate::net::network::{Network, PeerPool};
use crate::net::tls::ClientAuth;
use crate::node::{NodeInner, RaftNode};
use crate::replica::Replica;
use crate::store::db::{open_db, release_within_5s, Identity};
use crate::store::records;
use crate::store::sled_machine::StateMachineStore;
use crate::store::sled_store::LogStore;

/// Most entries in one AppendEntries; the byte budget usually binds first.
const MAX_PAYLOAD_ENTRIES: u64 = 300;

impl RaftNode {
    /// Opens the data dir, starts Raft and the gRPC server, and bootstraps the group if
    /// this node is one of `peers` and has never been initialized.
    ///
    /// # Errors
    /// Invalid configuration, a data dir of another cluster or node, a port that cannot
    /// be bound, or a storage failure.
    pub async fn start(config: RaftNodeConfig) -> Result<Self> {
        config.validate()?;
        // Bind first: a taken port must fail before anything is started.
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| {
                RaftBackendError::Config(format!("cannot listen on {}: {e}", config.listen))
            })?;
        let identity = Identity {
            cluster_id: config.cluster_id.clone(),
            node_id: config.id,
        };
        let below = |group: u32| RaftBackendError::BelowGroupLevel {
            serves: config.feature_level,
            group,
        };
        // Refused before the database is opened: the data dir is as it was.
        let group = records::group_level(&config.data_dir)?;
        if group > config.feature_level {
            return Err(below(group).into());
        }
        let db = open_db(&config.data_dir, &identity, config.cache_capacity).await?;
        let sm = StateMachineStore::serving(&db, config.feature_level, Some(&config.data_dir))?;
        // A snapshot (restored or installed) may record a level the file does not yet.
        let group = sm.recorded_level();
        if group > config.feature_level {
            sm.close();
            drop(sm);
            release_within_5s(db, config.id).await;
            return Err(below(group).into());
        }
        let log_store = LogStore::new(&db)?.reporting_to(sm.fatal_cause());
        let log_store_alive = log_store.liveness();
        let pool = Arc::new(PeerPool::new(
            config.id,
            config.cluster_id.clone(),
            config.tls.clone(),
            config.faults.clone(),
        ));
        let cause = sm.fatal_cause();
        let raft = Raft::new(
            config.id,
            Arc::new(openraft_config(&config)?),
            Network::new(Arc::clone(&pool)),
            log_store,
            sm.clone(),
        )
        .await
        // Reading the log at start can meet an entry of a newer version: say so.
        .map_err(|e| {
            cause
                .get()
                .unwrap_or(RaftBackendError::Stopped(e.to_string()))
        })?;

        let (replica, mut tasks) = Replica::new(config, raft, sm);
        tasks.extend(crate::replica::spawn_loops(&replica));
        let node = Self::from_inner(Arc::new(NodeInner::new(
            Arc::clone(&replica),
            pool,
            log_store_alive,
            db,
            tasks,
        )));
        let config = &replica.config;
        node.spawn(crate::server::serve(
            Arc::downgrade(&replica),
            node.downgrade(),
            listener,
            config.tls.clone(),
            ClientAuth {
                tls: config.tls.is_some(),
                token: config.client_token.as_deref().map(Arc::from),
                admin_token: config.admin_token.as_deref().map(Arc::from),
            },
            replica.shutdown.clone(),
        ));
        if let Err(e) = bootstrap(&replica).await {
            node.shutdown().await;
            return Err(e);
        }
        node.keep_leader_apart();
        node.keep_feature_level();
        info!(
            node = config.id,
            listen = %config.listen,
            cluster = %config.cluster_id,
            "raft node started"
        );
        Ok(node)
    }
}

/// openraft's configuration for this node's.
fn openraft_config(config: &RaftNodeConfig) -> Result<openraft::Config> {
    let ms = |d: Duration| d.as_millis() as u64;
    let raft_config = openraft::Config {
        cluster_name: config.cluster_id.clone(),
        // openraft bounds every replication and confirmation RPC by this interval;
        // heartbeats at `heartbeat_interval` come from the replica's heartbeat loop.
        heartbeat_interval: ms(config.effective_rpc_timeout()),
        enable_heartbeat: false,
        election_timeout_min: ms(config.election_timeout.0),
        election_timeout_max: ms(config.election_timeout.1),
        install_snapshot_timeout: ms(config.request_timeout),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
        max_in_snapshot_log_to_keep: config.snapshot_every / 10,
        // Batches are cut to `MAX_APPEND_BYTES` by their encoded size in the network.
        max_payload_entries: MAX_PAYLOAD_ENTRIES,
        ..Default::default()
    }
    .validate()
    .map_err(|e| RaftBackendError::Config(e.to_string()))?;
    Ok(raft_config)
}

/// Initializes the group if this node is one of its initial voters and never was.
async fn bootstrap(replica: &Replica) -> Result<()> {
    let config = &replica.config;
    if !config.peers.contains_key(&config.id) {
        return Ok(());
    }
    let initialized = replica
        .raft
        .is_initialized()
        .await
        .map_err(|e| RaftBackendError::Stopped(e.to_string()))?;
    if initialized {
        return Ok(());
    }
    let members: BTreeMap<NodeId, BasicNode> = config
        .peers
        .iter()
        .map(|(id, addr)| (*id, BasicNode::new(addr.clone())))
        .collect();
    // Every initial voter initializes with the same set; openraft documents this as
    // safe, and it means the group forms whichever voter starts first.
    match replica.raft.initialize(members).await {
        Ok(()) => info!(node = config.id, "bootstrapped the group"),
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
        Err(e) => return Err(RaftBackendError::Stopped(e.to_string()).into()),
    }
    Ok(())
}
