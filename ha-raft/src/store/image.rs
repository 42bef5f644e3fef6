//! A data dir rewritten as the start of a new group (a restore, a forced single-voter
//! group): the storage side of `backup/`.

use std::collections::BTreeMap;

use openraft::{LogId, SnapshotMeta, StoredMembership, Vote};
use serde::Serialize;

use crate::data::command::NodeId;
use crate::error::RaftBackendError;
use crate::store::sled_machine::StoredSnapshot;
use crate::store::sled_store::{COMMITTED, LAST_PURGED, SNAPSHOT, VOTE};

/// A group's state as a new data dir starts from it: the state machine, the log id it
/// is as of, and the voters of the group it now belongs to.
pub(crate) struct GroupImage<'a> {
    /// The state, JSON-encoded as snapshots hold it.
    pub state: &'a [u8],
    /// The last entry the state includes.
    pub last_log_id: LogId<NodeId>,
    /// The voters, id → address.
    pub voters: &'a BTreeMap<NodeId, String>,
    /// The term this node's vote starts from (at least `last_log_id`'s).
    pub term: u64,
}

/// Rewrites an opened database as `image`: its snapshot becomes the image, the log is
/// emptied up to the image's last entry, and the vote is this node's own in the image's
/// term, so the voters elect a leader of the next term among themselves.
pub(crate) fn write_image(
    db: &sled::Db,
    node: NodeId,
    image: &GroupImage<'_>,
) -> Result<(), RaftBackendError> {
    let storage = |e: &dyn std::fmt::Display| RaftBackendError::Storage(e.to_string());
    let tree = |name: &str| db.open_tree(name).map_err(|e| storage(&e));
    let (logs, meta, snapshots) = (tree("logs")?, tree("meta")?, tree("snapshot")?);
    let nodes: BTreeMap<NodeId, openraft::BasicNode> = image
        .voters
        .iter()
        .map(|(id, address)| (*id, openraft::BasicNode::new(address.clone())))
        .collect();
    let ids: std::collections::BTreeSet<NodeId> = nodes.keys().copied().collect();
    let membership = openraft::Membership::new(vec![ids], nodes);
    let last = Some(image.last_log_id);
    let stored = StoredSnapshot {
        meta: SnapshotMeta {
            last_log_id: last,
            last_membership: StoredMembership::new(last, membership),
            snapshot_id: format!("image-{}", image.last_log_id.index),
        },
        data: image.state.to_vec(),
    };
    logs.clear().map_err(|e| storage(&e))?;
    snapshots
        .insert(SNAPSHOT, encode(&stored)?)
        .map_err(|e| storage(&e))?;
    meta.insert(LAST_PURGED, encode(&image.last_log_id)?)
        .map_err(|e| storage(&e))?;
    meta.insert(COMMITTED, encode(&last)?)
        .map_err(|e| storage(&e))?;
    let vote = Vote::new(image.term.max(image.last_log_id.leader_id.term), node);
    meta.insert(VOTE, encode(&vote)?).map_err(|e| storage(&e))?;
    db.flush().map_err(|e| storage(&e))?;
    Ok(())
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, RaftBackendError> {
    serde_json::to_vec(value).map_err(|e| RaftBackendError::Storage(e.to_string()))
}
