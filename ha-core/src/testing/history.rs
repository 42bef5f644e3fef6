//! A history checker in the manner of etcd's robustness tests and Jepsen: participants
//! record what they did and saw, and [`History::check`] looks for a moment where two
//! leaderships of an election were acted on at once, for tokens that do not order the
//! leaderships, and for an election left without a leader after the faults healed.
//!
//! Times are microseconds on one clock shared by every participant of a run: tokio's
//! clock (virtual under `pause()`) in one process, the wall clock across processes of one
//! machine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::types::FencingToken;

/// Microseconds on the run's clock.
pub type Micros = u64;

/// How a campaign ended, as far as the participant knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CampaignOutcome {
    /// Elected, with this token.
    Won(FencingToken),
    /// The backend said no (lease expired, campaign withdrawn).
    Failed,
    /// Timed out or cut off: the backend may or may not have made it leader.
    Unknown,
}

/// One thing that happened, from one participant's view (or the schedule's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A campaign ended (`at` is when the participant learned the outcome).
    Campaign {
        /// Who campaigned.
        participant: u64,
        /// The lease it campaigned with.
        lease: u64,
        /// When the campaign started.
        started: Micros,
        /// When the outcome was known.
        at: Micros,
        /// The outcome.
        outcome: CampaignOutcome,
    },
    /// The participant acted as leader: `is_valid()` was true at `at`.
    Acted {
        /// Who.
        participant: u64,
        /// Under which leadership.
        token: FencingToken,
        /// When.
        at: Micros,
    },
    /// The participant saw its leadership end.
    Lost {
        /// Who.
        participant: u64,
        /// Which leadership.
        token: FencingToken,
        /// When.
        at: Micros,
        /// Why (a `LossReason` name, or `resigned`).
        reason: String,
    },
    /// A guarded write of a counter was attempted; `accepted` is the store's answer.
    /// Each leadership reads the counter once it is elected and then writes `read + 1`,
    /// `read + 2`, ... with plain puts, never reusing a value, so only the guard can keep
    /// a stale leader from writing a value twice or a lower token above a higher one.
    Write {
        /// Who.
        participant: u64,
        /// The token the write carried.
        token: FencingToken,
        /// When the answer came.
        at: Micros,
        /// The counter value written.
        value: u64,
        /// Whether the store accepted it.
        accepted: bool,
    },
    /// The schedule injected a fault (for the timeline).
    Fault {
        /// When.
        at: Micros,
        /// What, readably.
        what: String,
    },
    /// Every fault is over; from here a leader must appear within the liveness bound.
    Healed {
        /// When.
        at: Micros,
    },
    /// The schedule ended (or may end) a participant's role on purpose: a SIGTERM (it
    /// resigns), a kill, a pause, its own link cut. For the availability oracle: a
    /// leadership may end only after one, and the next must be elected within `within`.
    Disrupt {
        /// Whose role.
        participant: u64,
        /// When.
        at: Micros,
        /// What, readably.
        what: String,
        /// The bound on the vacancy that follows, if it led.
        within: Duration,
    },
    /// The run stops its participants: what follows is not checked for availability.
    End {
        /// When.
        at: Micros,
    },
}

impl Record {
    fn at(&self) -> Micros {
        match self {
            Self::Campaign { at, .. }
            | Self::Acted { at, .. }
            | Self::Lost { at, .. }
            | Self::Write { at, .. }
            | Self::Fault { at, .. }
            | Self::Healed { at }
            | Self::Disrupt { at, .. }
            | Self::End { at } => *at,
        }
    }
}

/// One broken guarantee.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which check (1: overlap, 2: tokens, 3: guarded writes, 4: liveness after healing,
    /// 5: a needless failover, 6: a vacancy past its bound).
    pub clause: u8,
    /// What exactly.
    pub what: String,
}

/// What a check found, with counts that show the history was not empty.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    /// Every broken guarantee.
    pub violations: Vec<Violation>,
    /// Leaderships won.
    pub leaderships: usize,
    /// Leaderships that acted at least once.
    pub acted: usize,
    /// Actions recorded.
    pub actions: usize,
    /// Guarded writes accepted.
    pub writes: usize,
    /// Faults injected.
    pub faults: usize,
    /// What the availability oracle measured, when it ran.
    pub availability: Option<super::availability::AvailabilityReport>,
}

/// What the checks of many runs add up to, for one summary line per test.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    /// Runs checked.
    pub runs: usize,
    /// Faults injected.
    pub faults: usize,
    /// Leaderships won.
    pub leaderships: usize,
    /// Actions recorded.
    pub actions: usize,
    /// Guarded writes accepted.
    pub writes: usize,
    /// Broken guarantees.
    pub violations: usize,
    /// Runs the availability oracle checked.
    pub checked_available: usize,
    /// Needless failovers it found.
    pub needless_failovers: usize,
    /// Vacancies it measured (a disrupted leader replaced).
    pub vacancies: usize,
    /// The longest of them.
    pub longest_vacancy: Option<Duration>,
}

impl Totals {
    /// Adds one run's report.
    pub fn add(&mut self, report: &CheckReport) {
        self.runs += 1;
        self.faults += report.faults;
        self.leaderships += report.leaderships;
        self.actions += report.actions;
        self.writes += report.writes;
        self.violations += report.violations.len();
        if let Some(availability) = &report.availability {
            self.checked_available += 1;
            self.needless_failovers += availability.needless_failovers;
            self.vacancies += availability.vacancies;
            self.longest_vacancy = self.longest_vacancy.max(availability.longest_vacancy);
        }
    }
}

impl std::fmt::Display for Totals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} schedules, {} faults, {} leaderships, {} actions, {} accepted writes, {} violations",
            self.runs, self.faults, self.leaderships, self.actions, self.writes, self.violations
        )?;
        if self.checked_available > 0 {
            write!(
                f,
                "; availability: {} needless failovers, {} vacancies measured, the longest {:?}",
                self.needless_failovers,
                self.vacancies,
                self.longest_vacancy.unwrap_or_default()
            )?;
        }
        Ok(())
    }
}

/// The records of one run.
#[derive(Debug, Default)]
pub struct History {
    records: Mutex<Vec<Record>>,
}

/// A point in the history: the time, then the recording order, which breaks ties (two
/// records at one virtual instant happened in the order they were recorded).
type Point = (Micros, usize);

/// One leadership as the records show it.
#[derive(Debug, Clone, Copy)]
struct Tenure {
    participant: u64,
    lease: u64,
    token: FencingToken,
    elected: Point,
    first_act: Option<Point>,
    last_act: Option<Point>,
}

impl History {
    /// An empty history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a record.
    pub fn record(&self, record: Record) {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(record);
    }

    /// Every record so far, in recording order.
    pub fn records(&self) -> Vec<Record> {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Checks the history: (1) no two leaderships acted at overlapping times (each
    /// leadership's span runs from its election to its last action; at one instant,
    /// recording order decides); (2) a token names
    /// one leadership, and leaderships that acted did so in token order; (3) the guarded
    /// counter never accepted a value twice, nor a lower token above a higher one; (4) when
    /// `liveness` is given and the run recorded `Healed`, some leadership acted within
    /// that bound after it.
    pub fn check(&self, liveness: Option<Duration>) -> CheckReport {
        let records = self.records();
        let mut report = CheckReport::default();
        let mut tenures: BTreeMap<FencingToken, Tenure> = BTreeMap::new();
        for (seq, record) in records.iter().enumerate() {
            match record {
                Record::Campaign {
                    participant,
                    lease,
                    at,
                    outcome: CampaignOutcome::Won(token),
                    ..
                } => {
                    report.leaderships += 1;
                    if let Some(other) = tenures.get(token) {
                        if (other.participant, other.lease) != (*participant, *lease) {
                            report.violations.push(Violation {
                                clause: 2,
                                what: format!(
                                    "token {token} was granted to p{} (lease {:x}) and to p{participant} (lease {lease:x})",
                                    other.participant, other.lease
                                ),
                            });
                        }
                        continue;
                    }
                    tenures.insert(
                        *token,
                        Tenure {
                            participant: *participant,
                            lease: *lease,
                            token: *token,
                            elected: (*at, seq),
                            first_act: None,
                            last_act: None,
                        },
                    );
                }
                Record::Fault { .. } => report.faults += 1,
                _ => {}
            }
        }
        for (seq, record) in records.iter().enumerate() {
            if let Record::Acted {
                participant,
                token,
                at,
            } = record
            {
                report.actions += 1;
                let point = (*at, seq);
                match tenures.get_mut(token) {
                    Some(tenure) if tenure.participant == *participant => {
                        tenure.first_act = Some(tenure.first_act.map_or(point, |t| t.min(point)));
                        tenure.last_act = Some(tenure.last_act.map_or(point, |t| t.max(point)));
                    }
                    _ => report.violations.push(Violation {
                        clause: 2,
                        what: format!(
                            "p{participant} acted with token {token}, which it never won"
                        ),
                    }),
                }
            }
        }

        // 1. Overlap: sweep the acted spans in order of election.
        let mut acted: Vec<Tenure> = tenures
            .values()
            .copied()
            .filter(|t| t.last_act.is_some())
            .collect();
        report.acted = acted.len();
        acted.sort_by_key(|t| (t.elected, t.token));
        let mut latest: Option<Tenure> = None;
        for tenure in &acted {
            if let Some(previous) = latest {
                let previous_end = previous.last_act.unwrap_or(previous.elected);
                if tenure.elected <= previous_end {
                    report.violations.push(Violation {
                        clause: 1,
                        what: format!(
                            "two leaders at once: p{} (token {}) acted until {} while p{} (token {}) was elected at {}",
                            previous.participant,
                            previous.token,
                            secs(previous_end.0),
                            tenure.participant,
                            tenure.token,
                            secs(tenure.elected.0)
                        ),
                    });
                }
            }
            let end = tenure.last_act.unwrap_or(tenure.elected);
            if latest.is_none_or(|l| end > l.last_act.unwrap_or(l.elected)) {
                latest = Some(*tenure);
            }
        }

        // 2. Leaderships that acted did so in token order.
        let mut by_first_act = acted.clone();
        by_first_act.sort_by_key(|t| t.first_act);
        for pair in by_first_act.windows(2) {
            if pair[1].token <= pair[0].token {
                report.violations.push(Violation {
                    clause: 2,
                    what: format!(
                        "token order broken: p{} acted with token {} first at {}, then p{} with token {} at {}",
                        pair[0].participant,
                        pair[0].token,
                        secs(pair[0].first_act.map_or(0, |p| p.0)),
                        pair[1].participant,
                        pair[1].token,
                        secs(pair[1].first_act.map_or(0, |p| p.0))
                    ),
                });
            }
        }

        // 3. Accepted counter writes: no value twice, and in value order (the store's
        // order) tokens never go back.
        let mut writes: Vec<(u64, FencingToken, u64, Micros)> = records
            .iter()
            .filter_map(|r| match r {
                Record::Write {
                    participant,
                    token,
                    at,
                    value,
                    accepted: true,
                } => Some((*value, *token, *participant, *at)),
                _ => None,
            })
            .collect();
        report.writes = writes.len();
        writes.sort();
        for pair in writes.windows(2) {
            let ((v0, t0, p0, at0), (v1, t1, p1, at1)) = (pair[0], pair[1]);
            if v0 == v1 {
                report.violations.push(Violation {
                    clause: 3,
                    what: format!(
                        "counter value {v1} was accepted twice: from p{p0} (token {t0}) at {} and from p{p1} (token {t1}) at {}",
                        secs(at0),
                        secs(at1)
                    ),
                });
            } else if t1 < t0 {
                report.violations.push(Violation {
                    clause: 3,
                    what: format!(
                        "the counter went back in token order: {v0} was written with token {t0} (p{p0}), then {v1} with token {t1} (p{p1}) at {}",
                        secs(at1)
                    ),
                });
            }
        }

        // 4. Liveness after the faults healed.
        if let Some(bound) = liveness {
            let healed = records.iter().find_map(|r| match r {
                Record::Healed { at } => Some(*at),
                _ => None,
            });
            if let Some(healed) = healed {
                let limit = healed + bound.as_micros() as u64;
                let led = records.iter().any(
                    |r| matches!(r, Record::Acted { at, .. } if *at >= healed && *at <= limit),
                );
                if !led {
                    report.violations.push(Violation {
                        clause: 4,
                        what: format!(
                            "no leader acted within {bound:?} after the faults healed at {}",
                            secs(healed)
                        ),
                    });
                }
            }
        }
        report
    }

    /// The records as a readable timeline, actions folded into spans.
    pub fn timeline(&self) -> String {
        let mut records = self.records();
        records.sort_by_key(Record::at);
        let mut out = String::new();
        let mut acting: Option<(u64, FencingToken, Micros, Micros, usize)> = None;
        let flush =
            |out: &mut String, acting: &mut Option<(u64, FencingToken, Micros, Micros, usize)>| {
                if let Some((p, token, from, to, n)) = acting.take() {
                    let _ = writeln!(
                        out,
                        "  {:>10}  p{p} acted {n}x as token {token} until {}",
                        secs(from),
                        secs(to)
                    );
                }
            };
        for record in &records {
            if let Record::Acted {
                participant,
                token,
                at,
            } = record
            {
                match &mut acting {
                    Some((p, t, _, to, n)) if p == participant && t == token => {
                        *to = *at;
                        *n += 1;
                    }
                    _ => {
                        flush(&mut out, &mut acting);
                        acting = Some((*participant, *token, *at, *at, 1));
                    }
                }
                continue;
            }
            flush(&mut out, &mut acting);
            let line = match record {
                Record::Campaign {
                    participant,
                    lease,
                    started,
                    outcome,
                    ..
                } => format!(
                    "p{participant} campaign (lease {lease:x}, since {}): {}",
                    secs(*started),
                    match outcome {
                        CampaignOutcome::Won(token) => format!("WON token {token}"),
                        CampaignOutcome::Failed => "failed".to_owned(),
                        CampaignOutcome::Unknown => "unknown".to_owned(),
                    }
                ),
                Record::Lost {
                    participant,
                    token,
                    reason,
                    ..
                } => format!("p{participant} lost token {token}: {reason}"),
                Record::Write {
                    participant,
                    token,
                    value,
                    accepted,
                    ..
                } => format!(
                    "p{participant} write counter={value} with token {token}: {}",
                    if *accepted { "accepted" } else { "rejected" }
                ),
                Record::Fault { what, .. } => format!("FAULT {what}"),
                Record::Healed { .. } => "HEALED: every fault is over".to_owned(),
                Record::Disrupt {
                    participant,
                    what,
                    within,
                    ..
                } => format!("DISRUPT p{participant}: {what} (a successor within {within:?})"),
                Record::End { .. } => "END: the participants are stopped".to_owned(),
                Record::Acted { .. } => continue,
            };
            let _ = writeln!(out, "  {:>10}  {line}", secs(record.at()));
        }
        flush(&mut out, &mut acting);
        out
    }

    /// [`check`](Self::check), and the availability oracle
    /// ([`super::availability`]) for a schedule whose faults the backend survives and
    /// that records every disruption of a participant.
    pub fn check_available(&self, liveness: Option<Duration>) -> CheckReport {
        let mut report = self.check(liveness);
        let availability = super::availability::check(&self.records());
        report
            .violations
            .extend(availability.violations.iter().cloned());
        report.availability = Some(availability);
        report
    }

    /// Panics with the seed, the replay command and the timeline when the check found a
    /// violation; returns the report otherwise.
    pub fn assert_ok(&self, liveness: Option<Duration>, seed: u64, replay: &str) -> CheckReport {
        self.assert_report(self.check(liveness), seed, replay)
    }

    /// [`assert_ok`](Self::assert_ok) with the availability oracle
    /// ([`check_available`](Self::check_available)).
    pub fn assert_available(
        &self,
        liveness: Option<Duration>,
        seed: u64,
        replay: &str,
    ) -> CheckReport {
        self.assert_report(self.check_available(liveness), seed, replay)
    }

    fn assert_report(&self, report: CheckReport, seed: u64, replay: &str) -> CheckReport {
        if !report.violations.is_empty() {
            let mut message =
                format!("history check failed for seed {seed}\nreplay: {replay}\nviolations:\n");
            for v in &report.violations {
                let _ = writeln!(message, "  [clause {}] {}", v.clause, v.what);
            }
            let _ = write!(message, "timeline:\n{}", self.timeline());
            panic!("{message}");
        }
        report
    }
}

fn secs(micros: Micros) -> String {
    format!("{:.6}s", micros as f64 / 1e6)
}

/// The seeds a fault-schedule test runs: `HA_FAULT_SEEDS=1,5,9` (exactly those), else
/// `HA_FAULT_RUNS=N` seeds from 0, else `default_runs` seeds from 0.
pub fn fault_seeds(default_runs: u64) -> Vec<u64> {
    if let Ok(list) = std::env::var("HA_FAULT_SEEDS") {
        let seeds: Vec<u64> = list
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        if !seeds.is_empty() {
            return seeds;
        }
    }
    let runs = std::env::var("HA_FAULT_RUNS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default_runs);
    (0..runs).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `p` won `token` at `at` (with lease `p`).
    pub(crate) fn won(p: u64, token: u64, at: Micros) -> Record {
        Record::Campaign {
            participant: p,
            lease: p,
            started: 0,
            at,
            outcome: CampaignOutcome::Won(FencingToken::new(token)),
        }
    }

    fn acted(p: u64, token: u64, at: Micros) -> Record {
        Record::Acted {
            participant: p,
            token: FencingToken::new(token),
            at,
        }
    }

    #[test]
    fn a_clean_handover_passes() {
        let h = History::new();
        for r in [
            won(1, 1, 0),
            acted(1, 1, 10),
            acted(1, 1, 20),
            won(2, 2, 21),
            acted(2, 2, 30),
        ] {
            h.record(r);
        }
        h.record(Record::Healed { at: 25 });
        let report = h.check(Some(Duration::from_micros(10)));
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!(
            (report.leaderships, report.acted, report.actions),
            (2, 2, 3)
        );
    }

    #[test]
    fn each_clause_catches_its_violation() {
        let h = History::new();
        // p1 acts after p2 was elected (clause 1); p3 gets p2's token (clause 2).
        for r in [
            won(1, 1, 0),
            won(2, 2, 10),
            acted(1, 1, 15),
            acted(2, 2, 16),
            won(3, 2, 40),
        ] {
            h.record(r);
        }
        // A lower token accepted above a higher one in the counter (clause 3).
        for (token, value) in [(2, 7), (1, 8)] {
            h.record(Record::Write {
                participant: 1,
                token: FencingToken::new(token),
                at: 20 + value,
                value,
                accepted: true,
            });
        }
        // Nothing acts after healing (clause 4).
        h.record(Record::Healed { at: 100 });
        let report = h.check(Some(Duration::from_micros(50)));
        let clauses: Vec<u8> = report.violations.iter().map(|v| v.clause).collect();
        for clause in [1, 2, 3, 4] {
            assert!(
                clauses.contains(&clause),
                "clause {clause} missed: {:?}",
                report.violations
            );
        }
        assert!(h.timeline().contains("p1 acted 1x as token 1"));
    }

    fn write(p: u64, token: u64, value: u64, accepted: bool) -> Record {
        Record::Write {
            participant: p,
            token: FencingToken::new(token),
            at: value,
            value,
            accepted,
        }
    }

    #[test]
    fn guarded_writes_counted_twice_or_going_back_are_caught() {
        let clean = History::new();
        for r in [
            write(1, 1, 1, true),
            write(1, 1, 2, true),
            write(1, 1, 3, false),
            write(2, 4, 3, true),
            write(2, 4, 4, true),
        ] {
            clean.record(r);
        }
        let report = clean.check(None);
        assert!(report.violations.is_empty(), "{:?}", report.violations);
        assert_eq!(report.writes, 4);
        // A stale leader's write of a value the next leader also wrote.
        let twice = History::new();
        for r in [write(1, 1, 5, true), write(2, 4, 5, true)] {
            twice.record(r);
        }
        let report = twice.check(None);
        assert!(
            report
                .violations
                .iter()
                .any(|v| v.clause == 3 && v.what.contains("twice")),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn acting_out_of_token_order_is_caught() {
        let h = History::new();
        for r in [won(1, 5, 0), won(2, 3, 1), acted(1, 5, 2), acted(2, 3, 9)] {
            h.record(r);
        }
        let report = h.check(None);
        assert!(
            report.violations.iter().any(|v| v.clause == 2),
            "{:?}",
            report.violations
        );
    }
}
