//! A node joining a running group through its admin API (`ha node --join`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::{sleep, Instant};

use crate::admin::membership::{MembershipChange, MembershipRefusal};
use crate::admin::AdminError;
use crate::node::RaftNode;

use super::api::RaftAdmin;

/// How a join ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinOutcome {
    /// The node is a learner (as asked).
    Learner,
    /// The node is a voter.
    Voter,
}

impl RaftNode {
    /// Joins the group reachable through `admin`: asks the leader to add this node as a
    /// learner, waits until it has caught up, and (with `as_voter`) has it promoted.
    /// A node that is already a member (a restart) only does what is left.
    ///
    /// # Errors
    /// `Refused` when the group will not take this node (another cluster id, its
    /// address taken by another id, its id a member at another address; nothing
    /// changed), `Unauthorized`, or `Timeout` when it is not done within `timeout`.
    pub async fn join(
        &self,
        admin: &RaftAdmin,
        as_voter: bool,
        timeout: Duration,
    ) -> Result<JoinOutcome, AdminError> {
        let id = self.id();
        let deadline = Instant::now() + timeout;
        let mut metrics = self.raft().metrics();
        // Asked once per run: a repeated request while this node's log is still empty
        // would look like a wiped member asking for its own place.
        let mut added = false;
        loop {
            let (voter, learner, fresh) = {
                let m = metrics.borrow_and_update();
                let membership = m.membership_config.membership();
                let voter = membership.voter_ids().any(|v| v == id);
                let learner = !voter && membership.get_node(&id).is_some();
                (voter, learner, m.last_log_index.is_none())
            };
            if voter {
                return Ok(JoinOutcome::Voter);
            }
            if learner && !as_voter {
                return Ok(JoinOutcome::Learner);
            }
            if Instant::now() >= deadline {
                return Err(AdminError::Timeout { after: timeout });
            }
            if added && !learner {
                // The membership reaches this node with the leader's next message.
                let _ = tokio::time::timeout(Duration::from_millis(500), metrics.changed()).await;
                continue;
            }
            let change = if learner {
                MembershipChange::Promote { id }
            } else {
                MembershipChange::AddLearner {
                    id,
                    address: self.address(),
                    cluster_id: self.inner_config().cluster_id.clone(),
                    fresh,
                    feature_level: Some(self.inner_config().feature_level),
                }
            };
            match admin.change(&change).await {
                Ok(_) => {
                    added = true;
                    let _ = tokio::time::timeout(Duration::from_secs(1), metrics.changed()).await;
                }
                Err(AdminError::Refused(MembershipRefusal::NotCaughtUp { .. })) => {
                    sleep(Duration::from_millis(200)).await;
                }
                Err(e) if e.is_transient() => sleep(Duration::from_millis(200)).await,
                Err(e) => return Err(e),
            }
        }
    }
}
