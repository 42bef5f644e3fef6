//! The group's state as a snapshot file's content, served by `ha snapshot save`.

use super::{NodeInner, RaftNode};
use crate::admin::AdminError;
use crate::backup::file::{SnapshotHeader, MAX_SNAPSHOT_BYTES};

impl NodeInner {
    /// The group's state as of a linearizable read, encoded, with its header.
    pub(crate) async fn snapshot_image(&self) -> Result<(SnapshotHeader, Vec<u8>), AdminError> {
        let unavailable = |e: ha_core::Error| AdminError::Unavailable(e.to_string());
        let index = self.read_index().await.map_err(unavailable)?;
        let image = self
            .replica
            .read_at(index, |machine| {
                let last = machine.last_applied?;
                Some(serde_json::to_vec(&machine.state).map(|bytes| {
                    let header = SnapshotHeader::describe(
                        self.replica.cluster_id(),
                        self.replica.config.id,
                        last,
                        &machine.state,
                        &bytes,
                    );
                    (header, bytes)
                }))
            })
            .await
            .map_err(unavailable)?;
        match image {
            None => Err(AdminError::Unavailable(
                "the group has applied nothing yet".into(),
            )),
            Some(Err(e)) => Err(AdminError::Raft(format!("encode the state: {e}"))),
            Some(Ok((header, bytes))) if header.state_bytes > MAX_SNAPSHOT_BYTES => {
                Err(AdminError::InvalidArgument(format!(
                    "the state is {} bytes, over the snapshot limit of {MAX_SNAPSHOT_BYTES}",
                    bytes.len()
                )))
            }
            Some(Ok((header, bytes))) => Ok((header, bytes)),
        }
    }
}

impl RaftNode {
    /// The group's state as of a linearizable read, encoded, with its header.
    pub(crate) async fn snapshot_image(&self) -> Result<(SnapshotHeader, Vec<u8>), AdminError> {
        self.inner.snapshot_image().await
    }
}
