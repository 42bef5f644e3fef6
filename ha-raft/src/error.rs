//! ha-raft's own failures, and how each maps onto the contract's `Error`.

use std::time::Duration;

/// What can go wrong inside the Raft backend.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RaftBackendError {
    /// The data directory could not be opened or written.
    #[error("storage: {0}")]
    Storage(String),
    /// The data directory belongs to another cluster or node.
    #[error("data directory {dir} belongs to {found}, not to {expected}")]
    ForeignDataDir {
        /// The directory.
        dir: String,
        /// What it holds.
        found: String,
        /// What this node is.
        expected: String,
    },
    /// The data directory holds files that are not an ha-raft data dir (a home
    /// directory given by mistake); nothing was written to it.
    #[error("data directory {dir} is not empty and holds no ha-raft data (it has {found}); give an empty or new directory")]
    NotADataDir {
        /// The directory.
        dir: String,
        /// One of the files found.
        found: String,
    },
    /// The data directory was written by a newer binary in a format this one cannot read;
    /// nothing in it was changed.
    #[error(
        "data directory {dir} is in format {found}, newer than this binary reads (formats 1 to {supported}); it was left untouched: run the newer ha"
    )]
    NewerDataDir {
        /// The directory.
        dir: String,
        /// The format it records.
        found: u32,
        /// The newest format this binary reads.
        supported: u32,
    },
    /// Stored or received bytes do not decode.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// A log entry holds a command this binary does not know: a newer ha wrote it.
    #[error("log entry {index} holds a command this binary does not know ({name}): a newer ha wrote it; run that version or later on this member")]
    UnknownCommand {
        /// The entry's log index.
        index: u64,
        /// The command's name as the entry spells it.
        name: String,
    },
    /// A log entry holds a command that needs a higher feature level than this member
    /// serves (a member started at a lower level than the group writes at).
    #[error("log entry {index} holds a {command} command, which needs feature level {needs}; this member serves {serves}")]
    UnsupportedCommand {
        /// The entry's log index.
        index: u64,
        /// The command's name.
        command: String,
        /// The level it needs.
        needs: u32,
        /// The level this member serves.
        serves: u32,
    },
    /// The group recorded a feature level above the one this member serves: starting it
    /// would be a downgrade that cannot apply entries already written. Nothing changed.
    #[error("the group's feature level is {group} and this member serves {serves}: a binary below the group's level cannot apply what the group writes; run ha serving level {group} or later (see docs/operations.md, \"Upgrades\")")]
    BelowGroupLevel {
        /// The level this member serves.
        serves: u32,
        /// The group's recorded level.
        group: u32,
    },
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// No Raft leader could be reached in time.
    #[error("no Raft leader reachable within {0:?}")]
    NoLeader(Duration),
    /// A peer or the network failed.
    #[error("network: {0}")]
    Network(String),
    /// The Raft core stopped (node shut down or fatal storage error).
    #[error("raft stopped: {0}")]
    Stopped(String),
}

impl From<RaftBackendError> for ha_core::Error {
    fn from(error: RaftBackendError) -> Self {
        match error {
            RaftBackendError::NoLeader(_) | RaftBackendError::Network(_) => {
                ha_core::Error::Unavailable(error.to_string())
            }
            RaftBackendError::Config(reason) => ha_core::Error::InvalidArgument {
                what: "raft configuration",
                reason,
            },
            other => ha_core::Error::Backend {
                backend: "raft",
                source: Box::new(other),
            },
        }
    }
}
