//! Which sessions live in this member's process: the leases registered through the
//! node's own `Backend`. Placement needs to know whether an election's ACTIVE shares a
//! process with the Raft leader, and only the process itself knows that; the log does
//! not record where a session was opened.

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use crate::data::state::State;

/// The leases of in-process sessions; see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct Hosted {
    leases: Mutex<BTreeSet<u64>>,
}

/// At most this many in-process leases are remembered: a process opens a handful of
/// sessions, and a lease that expired without a revoke is pruned at the next look.
const MAX_HOSTED: usize = 4096;

impl Hosted {
    /// A session of this process got `lease`.
    pub(crate) fn add(&self, lease: u64) {
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        if leases.len() < MAX_HOSTED {
            leases.insert(lease);
        }
    }

    /// A session of this process ended `lease`.
    pub(crate) fn remove(&self, lease: u64) {
        self.leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&lease);
    }

    /// The elections whose ACTIVE (the head of the queue) holds an in-process lease, as
    /// `state` has them. Leases `state` has handed out and no longer knows are
    /// forgotten; a newer one may not be applied here yet, and stays.
    pub(crate) fn active_elections(&self, state: &State) -> Vec<String> {
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        if leases.is_empty() {
            return Vec::new();
        }
        leases.retain(|lease| *lease > state.last_id || state.leases.contains_key(lease));
        state
            .elections
            .iter()
            .filter(|(_, queue)| {
                queue
                    .values()
                    .next()
                    .is_some_and(|head| leases.contains(&head.lease))
            })
            .map(|(election, _)| election.clone())
            .collect()
    }
}
