//! The liveness oracle beside the safety checker: in a schedule whose faults the backend
//! survives, a leadership ends only where the schedule ended it on purpose (its
//! participant resigned, killed, paused or cut off: a [`Record::Disrupt`]), and the
//! next one is elected within the bound that disruption states. A loss with no
//! disruption behind it is a needless failover; a successor later than the bound is a
//! vacancy too long.

use std::time::Duration;

use super::history::{CampaignOutcome, Micros, Record, Violation};
use crate::types::FencingToken;

/// What the oracle found in one history.
#[derive(Debug, Clone, Default)]
pub struct AvailabilityReport {
    /// Needless failovers and vacancies past their bound.
    pub violations: Vec<Violation>,
    /// Leaderships that ended with no disruption of their participant.
    pub needless_failovers: usize,
    /// Disruptions of a leader followed by a successor (the vacancies measured).
    pub vacancies: usize,
    /// The longest of them, from the disruption to the successor's election.
    pub longest_vacancy: Option<Duration>,
}

/// One leadership: who, elected when, and when it was seen to end.
#[derive(Debug, Clone, Copy)]
struct Tenure {
    participant: u64,
    token: FencingToken,
    elected: Micros,
    lost: Option<Micros>,
}

/// A disruption of one participant's role.
#[derive(Debug, Clone)]
struct Disruption {
    participant: u64,
    at: Micros,
    within: Duration,
    what: String,
}

/// Checks `records` (see the module doc). Records from [`Record::End`] on (the run
/// stopping its participants) are not looked at.
pub fn check(records: &[Record]) -> AvailabilityReport {
    let end = records
        .iter()
        .find_map(|r| match r {
            Record::End { at } => Some(*at),
            _ => None,
        })
        .unwrap_or(Micros::MAX);
    let mut tenures: Vec<Tenure> = Vec::new();
    let mut disruptions: Vec<Disruption> = Vec::new();
    for record in records {
        match record {
            Record::Campaign {
                participant,
                at,
                outcome: CampaignOutcome::Won(token),
                ..
            } if *at < end && !tenures.iter().any(|t| t.token == *token) => {
                tenures.push(Tenure {
                    participant: *participant,
                    token: *token,
                    elected: *at,
                    lost: None,
                });
            }
            Record::Lost {
                participant,
                token,
                at,
                ..
            } if *at < end => {
                if let Some(t) = tenures
                    .iter_mut()
                    .find(|t| t.token == *token && t.participant == *participant)
                {
                    t.lost = Some(t.lost.map_or(*at, |lost| lost.min(*at)));
                }
            }
            Record::Disrupt {
                participant,
                at,
                within,
                what,
            } if *at < end => disruptions.push(Disruption {
                participant: *participant,
                at: *at,
                within: *within,
                what: what.clone(),
            }),
            _ => {}
        }
    }
    tenures.sort_by_key(|t| (t.elected, t.token));
    let mut report = AvailabilityReport::default();
    for (i, tenure) in tenures.iter().enumerate() {
        let successor = tenures.get(i + 1);
        // It ended when it said so, or when someone else was elected.
        let Some(ended) = tenure.lost.or(successor.map(|s| s.elected)) else {
            continue; // still leading when the run ended
        };
        let until = successor.map_or(end, |s| s.elected);
        // The latest disruption of this participant while it led, before the successor.
        let disruption = disruptions
            .iter()
            .filter(|d| d.participant == tenure.participant)
            .filter(|d| d.at >= tenure.elected && d.at <= ended.max(tenure.elected))
            .max_by_key(|d| d.at);
        let Some(disruption) = disruption else {
            report.needless_failovers += 1;
            report.violations.push(Violation {
                clause: 5,
                what: format!(
                    "needless failover: p{}'s leadership (token {}) ended at {} though nothing disrupted it{}",
                    tenure.participant,
                    tenure.token,
                    secs(ended),
                    successor.map_or(String::new(), |s| format!(
                        "; p{} was elected at {}",
                        s.participant,
                        secs(s.elected)
                    ))
                ),
            });
            continue;
        };
        let vacancy = Duration::from_micros(until.saturating_sub(disruption.at));
        if successor.is_some() {
            report.vacancies += 1;
            report.longest_vacancy = report.longest_vacancy.max(Some(vacancy));
        }
        if vacancy > disruption.within {
            report.violations.push(Violation {
                clause: 6,
                what: format!(
                    "vacancy too long: p{} ({}) at {}; {} within the bound of {:?}",
                    disruption.participant,
                    disruption.what,
                    secs(disruption.at),
                    match successor {
                        Some(s) => format!("p{} was elected {vacancy:?} later, not", s.participant),
                        None => "nobody was elected before the run ended, not".to_owned(),
                    },
                    disruption.within
                ),
            });
        }
    }
    report
}

fn secs(micros: Micros) -> String {
    format!("{:.6}s", micros as f64 / 1e6)
}

#[cfg(test)]
mod tests {
    use super::super::history::tests::won;
    use super::*;

    fn lost(p: u64, token: u64, at: Micros) -> Record {
        Record::Lost {
            participant: p,
            token: FencingToken::new(token),
            at,
            reason: "self_fenced".into(),
        }
    }

    fn disrupt(p: u64, at: Micros, within_us: u64) -> Record {
        Record::Disrupt {
            participant: p,
            at,
            what: "resigned".into(),
            within: Duration::from_micros(within_us),
        }
    }

    #[test]
    fn a_disrupted_leader_replaced_in_time_passes_and_is_measured() {
        let records = [
            won(1, 1, 0),
            disrupt(1, 100, 50),
            lost(1, 1, 101),
            won(2, 2, 130),
            Record::End { at: 200 },
            lost(2, 2, 201),
        ];
        let report = check(&records);
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!(report.vacancies, 1);
        assert_eq!(report.longest_vacancy, Some(Duration::from_micros(30)));
    }

    #[test]
    fn a_loss_nobody_caused_is_a_needless_failover() {
        // p1 self-fenced with nothing done to it; p2 took over.
        let records = [won(1, 1, 0), lost(1, 1, 100), won(2, 2, 110)];
        let report = check(&records);
        assert_eq!(report.needless_failovers, 1);
        assert!(report.violations[0].what.contains("needless"));
        // Elected over a p1 that never said it lost: the same.
        let report = check(&[won(1, 1, 0), won(2, 2, 110)]);
        assert_eq!(report.needless_failovers, 1);
        // A disruption of another participant excuses nothing.
        let report = check(&[won(1, 1, 0), disrupt(2, 50, 1_000), won(2, 2, 110)]);
        assert_eq!(report.needless_failovers, 1);
    }

    #[test]
    fn a_successor_after_the_bound_or_none_at_all_is_a_vacancy_too_long() {
        let late = check(&[won(1, 1, 0), disrupt(1, 100, 50), won(2, 2, 200)]);
        assert_eq!(late.violations.len(), 1, "{:?}", late.violations);
        assert_eq!(late.violations[0].clause, 6);
        let never = check(&[
            won(1, 1, 0),
            disrupt(1, 100, 50),
            lost(1, 1, 101),
            Record::End { at: 500 },
        ]);
        assert_eq!(never.violations.len(), 1, "{:?}", never.violations);
        assert!(never.violations[0].what.contains("nobody"));
    }
}
