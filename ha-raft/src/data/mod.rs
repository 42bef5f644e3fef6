//! What the log holds: the commands, the deterministic state they build, and the watch
//! fan-out over that state. Nothing here knows about storage, the network or the node.

pub(crate) mod command;
pub(crate) mod hub;
pub(crate) mod level;
pub(crate) mod state;
