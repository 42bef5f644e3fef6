//! `ha snapshot save | restore | status`: a backup of an embedded Raft group's state,
//! a new group's data dirs built from one, and what a file holds.

use std::path::PathBuf;

use clap::Subcommand;
use ha::raft::{BackupError, RestoreOptions, SnapshotHeader};

use crate::admin::{connect, exit_of, fail, AdminTarget};
use crate::Exit;

/// `ha snapshot` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum SnapshotAction {
    /// Save the group's state, as of a linearizable read, to FILE (streamed from a
    /// member, checked against its CRC-32, written to FILE.partial and renamed). Needs a
    /// node certificate or the admin token under TLS: the guarded stores are in it.
    Save {
        /// Where to write it.
        file: PathBuf,
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Build the data dir of one voter of a new group from FILE; run it for every voter
    /// with the same --peers, then start each with `ha node` (same --id, --data,
    /// --peers). Tokens continue above the snapshot's index.
    Restore {
        /// The snapshot file.
        file: PathBuf,
        /// The data dir to create (absent or empty).
        #[arg(long)]
        data: PathBuf,
        /// The node it is for.
        #[arg(long)]
        id: u64,
        /// Every voter of the new group: ID=HOST:PORT,...
        #[arg(long, value_delimiter = ',', required = true)]
        peers: Vec<String>,
        /// The new group's cluster id (default: the snapshot's).
        #[arg(long)]
        cluster: Option<String>,
        /// Restore a snapshot of another cluster id under --cluster.
        #[arg(long)]
        allow_other_cluster: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check FILE (header, length, CRC-32, that the state decodes) and print its header.
    Status {
        /// The snapshot file.
        file: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The exit code for a backup error: bad files are bad input, a refused restore
/// changed nothing (7).
fn exit_of_backup(error: &BackupError) -> Exit {
    match error {
        BackupError::Admin(e) => exit_of(e),
        BackupError::NotASnapshot { .. }
        | BackupError::Damaged { .. }
        | BackupError::TooLarge { .. } => Exit::Usage,
        BackupError::OtherCluster { .. }
        | BackupError::DataDirNotEmpty { .. }
        | BackupError::NotAPeer { .. } => Exit::ChangeRefused,
        BackupError::Io { .. } => Exit::Failed,
        _ => Exit::Unavailable,
    }
}

fn describe(header: &SnapshotHeader) -> String {
    format!(
        "cluster {:?}, index {}, term {}, {} bytes, crc32 {:08x}, {} sessions, {} elections, {} keys, taken by node {}",
        header.cluster_id,
        header.index(),
        header.term(),
        header.state_bytes,
        header.crc32,
        header.sessions,
        header.elections,
        header.keys,
        header.taken_by
    )
}

fn report(header: &SnapshotHeader, json: bool, text: String) {
    if json {
        println!("{}", serde_json::to_string(header).unwrap_or_default());
    } else {
        println!("{text}");
    }
}

/// `ha snapshot ...`.
pub async fn snapshot(action: &SnapshotAction) -> Exit {
    match action {
        SnapshotAction::Save { file, target } => {
            let admin = match connect(target) {
                Ok(admin) => admin,
                Err((exit, reason)) => return fail("snapshot save", exit, &reason),
            };
            match admin.save_snapshot(file).await {
                Ok(header) => {
                    let text = format!("saved {}: {}", file.display(), describe(&header));
                    report(&header, target.json, text);
                    Exit::Clean
                }
                Err(e) => fail("snapshot save", exit_of_backup(&e), &e.to_string()),
            }
        }
        SnapshotAction::Restore {
            file,
            data,
            id,
            peers,
            cluster,
            allow_other_cluster,
            json,
        } => {
            let peers = match crate::node::parse_peers(peers) {
                Ok(peers) => peers,
                Err(reason) => return fail("snapshot restore", Exit::Usage, &reason),
            };
            let options = RestoreOptions {
                data_dir: data.clone(),
                id: *id,
                peers,
                cluster_id: cluster.clone(),
                allow_other_cluster: *allow_other_cluster,
            };
            match ha::raft::restore(file, &options).await {
                Ok(header) => {
                    let text = format!(
                        "restored node {id} into {}: {}",
                        data.display(),
                        describe(&header)
                    );
                    report(&header, *json, text);
                    Exit::Clean
                }
                Err(e) => fail("snapshot restore", exit_of_backup(&e), &e.to_string()),
            }
        }
        SnapshotAction::Status { file, json } => match ha::raft::read_snapshot_file(file) {
            Ok((header, _)) => {
                report(&header, *json, describe(&header));
                Exit::Clean
            }
            Err(e) => fail("snapshot status", exit_of_backup(&e), &e.to_string()),
        },
    }
}
