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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::command::Command;
    use crate::data::state::register_for_test as register;

    fn campaign(state: &mut State, index: u64, lease: u64, election: &str) {
        let command = Command::Campaign {
            lease,
            election: election.into(),
            value: b"v".to_vec(),
        };
        state.apply(index, &command);
    }

    #[test]
    fn only_the_heads_of_queues_holding_an_in_process_lease_count() {
        let mut state = State::default();
        let here = register(&mut state, 1, 1);
        let there = register(&mut state, 2, 2);
        campaign(&mut state, 3, there, "a"); // led from elsewhere, `here` in line
        campaign(&mut state, 4, here, "a");
        campaign(&mut state, 5, here, "b"); // led from here
        let hosted = Hosted::default();
        hosted.add(here);
        assert_eq!(hosted.active_elections(&state), vec!["b".to_owned()]);
        state.apply(6, &Command::Revoke { lease: there });
        assert_eq!(
            hosted.active_elections(&state),
            vec!["a".to_owned(), "b".to_owned()]
        );
        hosted.remove(here);
        assert!(hosted.active_elections(&state).is_empty());
    }

    #[test]
    fn a_lease_not_yet_applied_here_is_kept_and_an_ended_one_forgotten() {
        let mut state = State::default();
        let ended = register(&mut state, 1, 1);
        let hosted = Hosted::default();
        hosted.add(ended);
        hosted.add(50); // registered through the leader, not applied here yet
        state.apply(2, &Command::Revoke { lease: ended });
        assert!(hosted.active_elections(&state).is_empty());
        let leases = hosted.leases.lock().unwrap_or_else(PoisonError::into_inner);
        assert_eq!(leases.iter().copied().collect::<Vec<_>>(), vec![50]);
    }
}
