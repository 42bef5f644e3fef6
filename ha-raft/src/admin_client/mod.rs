//! `RaftAdmin`: the admin API from outside the group (`ha status`, `ha member`) or from
//! a node joining it (`ha node --join`). Status is asked of every member; a change goes
//! to whichever node leads, following the "not the leader" answers.

mod api;
mod group;
mod join;

pub use api::{RaftAdmin, Removal};
pub use group::{GroupStatus, MemberKind, MemberStatus};
pub use join::JoinOutcome;
