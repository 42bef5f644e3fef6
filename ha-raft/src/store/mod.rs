//! Where the log and the state machine live on disk: the sled log store and state
//! machine store, and a data dir rewritten as the start of a new group. sled stays
//! behind this folder, so the log can move to another engine without touching the rest.

pub(crate) mod db;
pub(crate) mod image;
pub(crate) mod records;
pub(crate) mod sled_machine;
pub(crate) mod sled_store;
