//! The cases, grouped by contract clause in files of their own. Each name says what it
//! checks.

mod election;
mod kv;
mod lease;
mod observe;
mod runtime;

use super::Case;

macro_rules! cases {
    ($($clause:literal $group:ident::$name:ident),* $(,)?) => {
        /// Every conformance case, in the order they run.
        pub const CASES: &[Case] = &[
            $(Case { name: stringify!($name), clause: $clause, run: |b| Box::pin($group::$name(b)) },)*
        ];
    };
}

cases! {
    1 lease::register_makes_member_visible,
    1 lease::register_grants_at_least_the_requested_ttl,
    1 lease::register_rejects_ttl_out_of_bounds,
    1 lease::register_rejects_duplicate_server_id_in_role,
    1 lease::members_are_per_role_and_ordered_by_server_id,
    1 lease::oversize_records_and_leader_values_are_too_large,
    2 lease::keep_alive_extends_lease,
    2 lease::lease_expires_without_keep_alive,
    2 lease::keep_alive_of_unknown_lease_is_lease_expired,
    3 lease::revoke_removes_member_and_candidacies,
    3 lease::revoke_is_idempotent,
    4 election::campaign_uncontested_wins_at_once,
    4 election::campaign_is_fifo_across_five_candidates,
    4 election::campaign_fails_when_own_lease_expires_while_waiting,
    4 election::campaign_fails_when_own_lease_is_revoked_while_waiting,
    4 election::campaign_with_dead_lease_is_lease_expired,
    4 election::dropped_campaign_withdraws_candidacy,
    4 election::campaign_again_with_same_lease_resumes_candidacy,
    4 election::one_lease_leads_independent_elections,
    4 election::tokens_strictly_increase_over_100_handovers,
    5 election::resign_hands_over_immediately,
    5 election::resign_is_idempotent,
    5 election::resign_of_sole_leader_leaves_election_vacant,
    6 election::proclaim_changes_value_and_keeps_token,
    6 election::proclaim_after_resign_is_not_leader,
    6 election::proclaim_with_foreign_key_is_not_leader,
    7 observe::leader_reports_head_with_server_id_and_value,
    7 observe::leader_of_unknown_election_is_none,
    7 observe::leader_expires_with_its_lease_and_next_takes_over,
    8 observe::watch_starts_with_current_state,
    8 observe::watch_reports_vacant_when_election_empties,
    8 observe::watch_never_skips_or_reorders_leaders,
    8 observe::watch_reports_proclaimed_values,
    8 observe::leader_agrees_with_watch,
    9 observe::watch_members_reports_joins_and_leaves,
    10 kv::kv_leader_writes_and_everyone_reads,
    10 kv::kv_compare_and_set_swaps_only_on_match,
    10 kv::kv_write_after_resign_is_not_leader,
    10 kv::kv_write_after_lease_loss_is_not_leader,
    10 kv::kv_write_with_foreign_key_is_not_leader,
    10 kv::kv_new_leader_reads_old_leaders_last_write,
    10 kv::kv_concurrent_stale_and_fresh_writers_only_fresh_lands,
    10 kv::kv_namespaces_are_per_election,
    10 kv::kv_sizes_over_the_limits_are_too_large,
    0 runtime::session_keeps_lease_alive_across_ttls,
    0 runtime::session_close_and_drop_revoke,
    0 runtime::leadership_lost_when_lease_revoked_behind_its_back,
    0 runtime::leadership_resign_hands_over_with_larger_token,
    0 runtime::session_campaign_fails_when_session_lost_while_waiting,
    0 runtime::leadership_write_after_loss_is_rejected_and_standby_reads,
}
