//! Operating a group, in types: what a node's status reports, the typed membership
//! changes and the checks that refuse one that would lose quorum. The node carries
//! changes out; the server and `RaftAdmin` carry these types over the wire.

pub(crate) mod membership;
mod status;

pub use status::{AdminError, MembershipReport, NodeStatus, PeerProgress};
