//! A scripted participant for fault schedules: it registers, campaigns, acts as leader
//! (recording each action it takes while `is_valid()`), and obeys the schedule's
//! commands (pause, resign, drop its campaign, restart), recording everything in a
//! [`History`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};

use super::history::{CampaignOutcome, History, Micros, Record};
use crate::backend::Backend;
use crate::error::Error;
use crate::session::{Session, SessionState};
use crate::types::{ElectionName, LeaseId, Member, Role, ServerId};

/// What the schedule can tell a participant to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Stop being polled for this long (a GC pause, a SIGSTOP): no actions, no campaign
    /// progress. The schedule makes its keepalives fail meanwhile where the backend can.
    Pause(Duration),
    /// Resign the leadership, if held.
    Resign,
    /// Withdraw the campaign in progress, if any, and campaign again.
    DropCampaign,
    /// Drop the session (as a crash would) and register a new one.
    Restart,
}

/// Shared settings of the participants of one run.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The election they compete in.
    pub election: ElectionName,
    /// The session TTL.
    pub ttl: Duration,
    /// How often a leader acts (records an action if still valid).
    pub act_every: Duration,
    /// The run's clock origin.
    pub epoch: Instant,
    /// Where everything is recorded.
    pub history: Arc<History>,
}

impl Setup {
    /// Microseconds since the run's epoch, on tokio's clock.
    pub fn now(&self) -> Micros {
        self.epoch.elapsed().as_micros() as u64
    }
}

/// A running participant.
#[derive(Debug)]
pub struct Participant {
    /// Its id (also its server id).
    pub id: u64,
    commands: mpsc::UnboundedSender<Command>,
    lease: watch::Receiver<Option<LeaseId>>,
    leading: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Participant {
    /// Starts a participant on `backend`.
    pub fn spawn(id: u64, backend: Arc<dyn Backend>, setup: Setup) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let (lease_tx, lease) = watch::channel(None);
        let (leading_tx, leading) = watch::channel(false);
        let task = tokio::spawn(run(id, backend, setup, rx, lease_tx, leading_tx));
        Self {
            id,
            commands,
            lease,
            leading,
            task,
        }
    }

    /// Sends a command (ignored if the participant is gone).
    pub fn send(&self, command: Command) {
        let _ = self.commands.send(command);
    }

    /// The lease of its current session, if it has one.
    pub fn lease(&self) -> Option<LeaseId> {
        *self.lease.borrow()
    }

    /// Whether it holds a leadership it won (until it sees it end).
    pub fn is_leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// Stops it; its session is dropped (revoked in the background).
    pub async fn stop(self) {
        drop(self.commands);
        let _ = self.task.await;
    }
}

fn role() -> Option<Role> {
    Role::new("participant").ok()
}

async fn run(
    id: u64,
    backend: Arc<dyn Backend>,
    setup: Setup,
    mut commands: mpsc::UnboundedReceiver<Command>,
    lease_tx: watch::Sender<Option<LeaseId>>,
    leading: watch::Sender<bool>,
) {
    let Some(role) = role() else { return };
    let member = Member::new(ServerId::new(id), role, format!("p{id}"));
    let history = Arc::clone(&setup.history);
    loop {
        lease_tx.send_replace(None);
        let registered = Session::builder(Arc::clone(&backend), member.clone())
            .ttl(setup.ttl)
            .register()
            .await;
        let session = match registered {
            Ok(session) => session,
            Err(_) => {
                // Backend down or our old lease still holds our id: try again soon.
                tokio::select! {
                    biased;
                    () = sleep(Duration::from_millis(200)) => continue,
                    command = commands.recv() => match command {
                        None => return,
                        Some(Command::Pause(d)) => { sleep(d).await; continue }
                        Some(_) => continue,
                    }
                }
            }
        };
        lease_tx.send_replace(Some(session.lease()));
        let lease = session.lease().get();
        // Campaign and lead on this session until it is lost or restarted.
        'session: loop {
            if session.state() != SessionState::Alive {
                break 'session;
            }
            let started = setup.now();
            let campaign = session.campaign(&setup.election, format!("p{id}"));
            tokio::pin!(campaign);
            let won = loop {
                tokio::select! {
                    biased;
                    won = &mut campaign => break won,
                    command = commands.recv() => match command {
                        None => return,
                        Some(Command::Pause(d)) => sleep(d).await, // the campaign is not polled
                        Some(Command::DropCampaign) => {
                            history.record(Record::Campaign {
                                participant: id, lease, started, at: setup.now(),
                                outcome: CampaignOutcome::Failed,
                            });
                            continue 'session;
                        }
                        Some(Command::Restart) => break 'session,
                        Some(Command::Resign) => {}
                    }
                }
            };
            let leadership = match won {
                Ok(leadership) => leadership,
                Err(error) => {
                    let outcome = match error {
                        Error::Timeout { .. } | Error::Unavailable(_) => CampaignOutcome::Unknown,
                        _ => CampaignOutcome::Failed,
                    };
                    history.record(Record::Campaign {
                        participant: id,
                        lease,
                        started,
                        at: setup.now(),
                        outcome,
                    });
                    tokio::select! {
                        biased;
                        () = sleep(Duration::from_millis(100)) => continue 'session,
                        command = commands.recv() => match command {
                            None => return,
                            Some(Command::Restart) => break 'session,
                            Some(Command::Pause(d)) => { sleep(d).await; continue 'session }
                            Some(_) => continue 'session,
                        }
                    }
                }
            };
            let token = leadership.token();
            leading.send_replace(true);
            history.record(Record::Campaign {
                participant: id,
                lease,
                started,
                at: setup.now(),
                outcome: CampaignOutcome::Won(token),
            });
            // The guarded counter continues from what the store holds now (a linearizable
            // read); if that read fails, this leadership only acts, it does not write.
            let mut counter = read_counter(&leadership).await;
            let mut restart = false;
            loop {
                tokio::select! {
                    biased;
                    () = sleep(setup.act_every) => {
                        // Check and record in one step: no await in between.
                        if leadership.is_valid() {
                            history.record(Record::Acted { participant: id, token, at: setup.now() });
                            if let Some(value) = counter.as_mut() {
                                write_counter(id, &leadership, value, &setup).await;
                            }
                        } else {
                            let reason = leadership
                                .loss_reason()
                                .map_or_else(|| "invalid".to_owned(), |r| r.to_string());
                            history.record(Record::Lost { participant: id, token, at: setup.now(), reason });
                            break;
                        }
                    }
                    reason = leadership.lost() => {
                        history.record(Record::Lost { participant: id, token, at: setup.now(), reason: reason.to_string() });
                        break;
                    }
                    command = commands.recv() => match command {
                        None => return,
                        Some(Command::Pause(d)) => sleep(d).await,
                        Some(Command::Resign) => {
                            let resigned = leadership.resign().await;
                            history.record(Record::Lost {
                                participant: id, token, at: setup.now(),
                                reason: match resigned { Ok(()) => "resigned".to_owned(), Err(e) => format!("resign failed: {e}") },
                            });
                            break;
                        }
                        Some(Command::Restart) => {
                            history.record(Record::Lost { participant: id, token, at: setup.now(), reason: "restart".to_owned() });
                            restart = true;
                            break;
                        }
                        Some(Command::DropCampaign) => {}
                    }
                }
            }
            leading.send_replace(false);
            drop(leadership);
            if restart {
                break 'session;
            }
        }
        drop(session);
    }
}

/// The key of the counter the participants write.
pub const COUNTER_KEY: &str = "counter";

async fn read_counter(leadership: &crate::Leadership) -> Option<u64> {
    match leadership.get(COUNTER_KEY).await {
        Ok(None) => Some(0),
        Ok(Some(bytes)) => std::str::from_utf8(&bytes).ok()?.parse().ok(),
        Err(_) => None,
    }
}

/// Writes `*last + 1` with a plain guarded put and records the answer. The value is
/// never reused, whatever the answer: a write whose outcome is unknown may have landed.
async fn write_counter(id: u64, leadership: &crate::Leadership, last: &mut u64, setup: &Setup) {
    let value = *last + 1;
    *last = value;
    let result = leadership.put(COUNTER_KEY, value.to_string()).await;
    let accepted = match result {
        Ok(()) => true,
        Err(Error::NotLeader { .. } | Error::LeaseExpired { .. }) => false,
        // Unknown outcome: not recorded as accepted, and not as rejected either.
        Err(_) => return,
    };
    setup.history.record(Record::Write {
        participant: id,
        token: leadership.token(),
        at: setup.now(),
        value,
        accepted,
    });
}
