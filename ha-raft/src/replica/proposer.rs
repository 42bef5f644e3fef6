//! The leader's proposer: commands proposed while earlier ones are being written are
//! packed into one [`Command::Batch`] entry, so one flush and one AppendEntries carry
//! them all. openraft appends a client write and waits for its flush before the next,
//! so without this every concurrent campaign and resign paid a flush of its own.
//! Batches need feature level 2: below it (a member that cannot apply them), every
//! command goes in an entry of its own.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::data::command::{Command, CommandResult, Raft};
use crate::net::wire::PeerFailure;
use crate::net::wire::WireError;

/// Most commands in one entry.
pub(crate) const MAX_BATCH_COMMANDS: usize = 256;

/// Most bytes (estimated, as the log stores them) of one batch entry. A command larger
/// than this alone goes in an entry of its own, as it did before batches, so no entry
/// exceeds what one command may take.
pub(crate) const MAX_BATCH_BYTES: usize = 1 << 20;

/// Entries being written at once. While they are, new commands gather for the next.
const IN_FLIGHT: usize = 2;

/// A command's log index and result, or why it has none.
pub(crate) type Proposed = std::result::Result<(u64, CommandResult), PeerFailure>;

struct Pending {
    command: Command,
    reply: oneshot::Sender<Proposed>,
    /// The request timeout counts from the proposal, time in the queue included.
    deadline: Instant,
}

/// Hands commands to the batching loop.
#[derive(Debug, Clone)]
pub(crate) struct Proposer {
    requests: mpsc::UnboundedSender<Pending>,
    timeout: Duration,
}

impl Proposer {
    /// Starts the batching loop, writing through `raft`; a proposal not committed
    /// within `timeout` is reported as a timeout (its outcome unknown if it was written).
    /// Batches only while `level` (the feature level the group writes at) allows.
    pub(crate) fn spawn(
        raft: Raft,
        timeout: Duration,
        level: Arc<AtomicU32>,
    ) -> (Self, JoinHandle<()>) {
        let (requests, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(batching_loop(raft, timeout, level, rx));
        (Self { requests, timeout }, task)
    }

    /// Appends `command` (alone or in a batch) on this node, which believes it leads.
    pub(crate) async fn propose(&self, command: Command) -> Proposed {
        let (reply, answer) = oneshot::channel();
        let stopped = || {
            PeerFailure::Error(WireError::Unavailable(
                "the raft node is shutting down".into(),
            ))
        };
        let deadline = Instant::now() + self.timeout;
        self.requests
            .send(Pending {
                command,
                reply,
                deadline,
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The feature level that [`Command::Batch`] needs.
const BATCH_LEVEL: u32 = 2;

async fn batching_loop(
    raft: Raft,
    timeout: Duration,
    level: Arc<AtomicU32>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut carried: Option<Pending> = None;
    loop {
        let first = match carried.take() {
            Some(pending) => pending,
            None => match rx.recv().await {
                Some(pending) => pending,
                None => return,
            },
        };
        // Waiting for a slot is where the next batch gathers.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let most = if level.load(Ordering::Acquire) >= BATCH_LEVEL {
            MAX_BATCH_COMMANDS
        } else {
            1
        };
        let (batch, rest) = gather(first, &mut rx, most);
        carried = rest;
        let batch = answer_late(batch, Instant::now(), timeout);
        if batch.is_empty() {
            continue;
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            write(&raft, timeout, batch).await;
            drop(slot);
        });
    }
}

/// `first` and what else is queued, up to `most` commands and a batch's byte limit; the
/// first command that did not fit comes back to start the next batch.
fn gather(
    first: Pending,
    rx: &mut mpsc::UnboundedReceiver<Pending>,
    most: usize,
) -> (Vec<Pending>, Option<Pending>) {
    let mut bytes = first.command.approx_bytes();
    let mut batch = vec![first];
    while batch.len() < most {
        let Ok(next) = rx.try_recv() else { break };
        let size = next.command.approx_bytes();
        if bytes.saturating_add(size) > MAX_BATCH_BYTES {
            return (batch, Some(next));
        }
        bytes += size;
        batch.push(next);
    }
    (batch, None)
}

/// Answers the commands whose deadline passed while they were queued with a timeout:
/// they are not written, so their outcome is known. The rest come back.
fn answer_late(batch: Vec<Pending>, now: Instant, timeout: Duration) -> Vec<Pending> {
    let (batch, late): (Vec<Pending>, Vec<Pending>) =
        batch.into_iter().partition(|p| p.deadline > now);
    for pending in late {
        let _ = pending.reply.send(Err(timed_out(timeout)));
    }
    batch
}

/// Writes one entry (the command itself if alone) and answers each of its proposers;
/// the write waits until the earliest of their deadlines.
async fn write(raft: &Raft, timeout: Duration, mut batch: Vec<Pending>) {
    let Some(deadline) = batch.iter().map(|p| p.deadline).min() else {
        return;
    };
    if batch.len() == 1 {
        if let Some(Pending { command, reply, .. }) = batch.pop() {
            let _ = reply.send(client_write(raft, deadline, timeout, command).await);
        }
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<oneshot::Sender<Proposed>>) = batch
        .into_iter()
        .map(|Pending { command, reply, .. }| (command, reply))
        .unzip();
    let expected = commands.len();
    match client_write(raft, deadline, timeout, Command::Batch(commands)).await {
        Ok((index, CommandResult::Batch(results))) if results.len() == expected => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok((index, result)));
            }
        }
        Ok((index, other)) => {
            // Committed, so not worth retrying: an internal error, not an unavailable node.
            let failure = WireError::Other(format!(
                "the batch of {expected} commands at index {index} was answered {other:?}"
            ));
            for reply in replies {
                let _ = reply.send(Err(PeerFailure::Error(failure.clone())));
            }
        }
        Err(failure) => {
            for reply in replies {
                let _ = reply.send(Err(failure.clone()));
            }
        }
    }
}

fn timed_out(timeout: Duration) -> PeerFailure {
    PeerFailure::Error(WireError::Timeout {
        operation: "propose".into(),
        after_ms: timeout.as_millis() as u64,
    })
}

async fn client_write(
    raft: &Raft,
    deadline: Instant,
    timeout: Duration,
    command: Command,
) -> Proposed {
    // A leader cut off from its quorum accepts the entry but can never commit it: bound
    // the wait, and report the outcome as unknown.
    match tokio::time::timeout_at(deadline, raft.client_write(command)).await {
        Ok(Ok(response)) => Ok((response.log_id.index, response.data)),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
            Err(PeerFailure::NotLeader)
        }
        Ok(Err(e)) => Err(PeerFailure::Error(WireError::Unavailable(e.to_string()))),
        Err(_) => Err(timed_out(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(value_bytes: usize) -> Pending {
        Pending {
            command: Command::Campaign {
                lease: 1,
                election: "e".into(),
                value: vec![7; value_bytes],
            },
            reply: oneshot::channel().0,
            deadline: Instant::now() + Duration::from_secs(5),
        }
    }

    fn queue(items: impl IntoIterator<Item = Pending>) -> mpsc::UnboundedReceiver<Pending> {
        let (tx, rx) = mpsc::unbounded_channel();
        for item in items {
            let _ = tx.send(item);
        }
        rx
    }

    #[test]
    fn a_command_queued_past_its_deadline_is_answered_a_timeout_and_not_written() {
        let now = Instant::now();
        let (reply, answer) = oneshot::channel();
        let late = Pending {
            reply,
            deadline: now,
            ..pending(10)
        };
        let kept = answer_late(vec![pending(10), late], now, Duration::from_secs(5));
        assert_eq!(kept.len(), 1, "only the command still in time is written");
        match answer.blocking_recv() {
            Ok(Err(PeerFailure::Error(WireError::Timeout { after_ms, .. }))) => {
                assert_eq!(after_ms, 5000)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_batch_stops_at_its_command_count() {
        let mut rx = queue((0..300).map(|_| pending(10)));
        let (batch, carried) = gather(pending(10), &mut rx, MAX_BATCH_COMMANDS);
        assert_eq!(batch.len(), MAX_BATCH_COMMANDS);
        assert!(carried.is_none());
        let (batch, _) = gather(pending(10), &mut rx, MAX_BATCH_COMMANDS);
        assert_eq!(batch.len(), 300 - (MAX_BATCH_COMMANDS - 1) + 1);
    }

    #[test]
    fn below_the_batch_level_every_command_goes_alone() {
        let mut rx = queue((0..3).map(|_| pending(10)));
        let (batch, carried) = gather(pending(10), &mut rx, 1);
        assert_eq!(batch.len(), 1);
        assert!(
            carried.is_none(),
            "the rest stay queued for entries of their own"
        );
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn a_batch_stops_before_its_byte_limit_and_a_large_command_goes_alone() {
        // 600 KiB values take 800 KiB as base64: two do not fit in one entry.
        let mut rx = queue([pending(600 << 10), pending(10)]);
        let (batch, carried) = gather(pending(600 << 10), &mut rx, MAX_BATCH_COMMANDS);
        assert_eq!(batch.len(), 1);
        let next = carried.unwrap_or_else(|| panic!("nothing carried over"));
        let (batch, carried) = gather(next, &mut rx, MAX_BATCH_COMMANDS);
        assert_eq!(batch.len(), 2, "the large one and the small one after it");
        assert!(carried.is_none());
        assert!(
            batch
                .iter()
                .map(|p| p.command.approx_bytes())
                .sum::<usize>()
                <= MAX_BATCH_BYTES
        );
        // Larger than a batch may be: alone, as before batches.
        let mut rx = queue([pending(10)]);
        let (batch, carried) = gather(pending(2 << 20), &mut rx, MAX_BATCH_COMMANDS);
        assert_eq!(batch.len(), 1);
        assert!(carried.is_some());
    }
}
