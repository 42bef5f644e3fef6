//! Backups and recovery. A snapshot file holds the group's whole state as of a
//! linearizable read (`ha snapshot save`); a new group's data dirs are built from one
//! (`ha snapshot restore`); and a member that survived the loss of its quorum becomes a
//! single-voter group from its own data (`ha node --force-new-group`). All three end in
//! the same place: a data dir whose snapshot is the state, whose log is empty up to the
//! state's last entry, and whose membership is the new voters. New entries take indexes
//! after that entry, and new lease ids and fencing tokens are above both it and the
//! state's last id: tokens never go back.

pub(crate) mod file;
mod restore;

pub use file::{
    read_snapshot_file, BackupError, SnapshotHeader, MAX_SNAPSHOT_BYTES, SNAPSHOT_FORMAT,
};
pub use restore::{force_new_group, restore, ForcedGroup, RestoreOptions};
