//! Connections for calls that may stay open for hours: a campaign waiting in line, a
//! watch. Each holds a stream of its connection, and a node allows a connection only so
//! many: on the connection shared with short calls, enough waiting campaigns would take
//! every stream, and the resigns that would let them win would queue behind them. So held
//! calls go on connections of their own, at most [`HELD_PER_CONNECTION`] to each, opened
//! as needed and closed when their last call ends (but one per endpoint, kept open so a
//! lone campaign does not pay a handshake).

use std::sync::{Arc, Mutex, PoisonError};

use ha_core::{ClientTls, Result};
use tonic::transport::Channel;

use crate::net::channel::channel;

/// Held calls on one connection: half of what a node allows, so a connection is never
/// refused a stream.
pub(super) const HELD_PER_CONNECTION: usize =
    crate::net::limits::MAX_STREAMS_PER_CONNECTION as usize / 2;

/// The held-call connections to one endpoint.
#[derive(Debug)]
pub(super) struct HeldChannels {
    endpoint: String,
    tls: Option<ClientTls>,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    connections: Vec<Held>,
    next_id: u64,
}

#[derive(Debug)]
struct Held {
    id: u64,
    channel: Channel,
    calls: usize,
}

/// A place on one connection, given back when dropped.
#[derive(Debug)]
pub(super) struct HeldSlot {
    pool: Arc<HeldChannels>,
    id: u64,
}

impl HeldChannels {
    pub(super) fn new(endpoint: &str, tls: Option<&ClientTls>) -> Arc<Self> {
        Arc::new(Self {
            endpoint: endpoint.to_owned(),
            tls: tls.cloned(),
            open: Mutex::new(Open::default()),
        })
    }

    /// A connection with room for one more held call, opened if none has (which needs a
    /// Tokio runtime: the channel's connection task is spawned on it).
    ///
    /// # Errors
    /// `InvalidArgument` if the endpoint cannot make a channel (checked at connect, so
    /// only if that check and this one disagree).
    pub(super) fn take(self: &Arc<Self>) -> Result<(Channel, HeldSlot)> {
        let mut open = self.lock();
        let Open {
            connections,
            next_id,
        } = &mut *open;
        let at = match connections
            .iter()
            .position(|h| h.calls < HELD_PER_CONNECTION)
        {
            Some(at) => at,
            None => {
                let channel = channel(&self.endpoint, self.tls.as_ref())?;
                connections.push(Held {
                    id: *next_id,
                    channel,
                    calls: 0,
                });
                *next_id += 1;
                connections.len() - 1
            }
        };
        let held = &mut connections[at];
        held.calls += 1;
        let slot = HeldSlot {
            pool: Arc::clone(self),
            id: held.id,
        };
        Ok((held.channel.clone(), slot))
    }

    /// Connections open and the held calls on each, in order.
    #[cfg(test)]
    fn calls(&self) -> Vec<usize> {
        self.lock().connections.iter().map(|h| h.calls).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        let mut open = self.pool.lock();
        let connections = &mut open.connections;
        let Some(at) = connections.iter().position(|h| h.id == self.id) else {
            return;
        };
        connections[at].calls -= 1;
        // A connection closes once the calls using its channel are gone too.
        if connections[at].calls == 0 && connections.len() > 1 {
            connections.remove(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(pool: &Arc<HeldChannels>) -> HeldSlot {
        pool.take().unwrap_or_else(|e| panic!("{e}")).1
    }

    #[tokio::test]
    async fn a_connection_takes_at_most_its_share_and_closes_when_empty() {
        let pool = HeldChannels::new("127.0.0.1:1", None);
        let mut slots: Vec<HeldSlot> = (0..HELD_PER_CONNECTION * 2 + 1)
            .map(|_| take(&pool))
            .collect();
        assert_eq!(
            pool.calls(),
            vec![HELD_PER_CONNECTION, HELD_PER_CONNECTION, 1]
        );
        // The first connection empties and closes; a new call fills the gap elsewhere.
        let mut second: Vec<HeldSlot> = slots.drain(HELD_PER_CONNECTION..).collect();
        drop(slots);
        assert_eq!(pool.calls(), vec![HELD_PER_CONNECTION, 1]);
        let again = take(&pool);
        assert_eq!(pool.calls(), vec![HELD_PER_CONNECTION, 2]);
        // The last connection empties and closes; a new one opens when one is full.
        drop(second.pop());
        drop(again);
        assert_eq!(pool.calls(), vec![HELD_PER_CONNECTION]);
        let more: Vec<HeldSlot> = (0..2).map(|_| take(&pool)).collect();
        assert_eq!(pool.calls(), vec![HELD_PER_CONNECTION, 2]);
        // The one connection left stays open, empty, for the next lone call.
        drop((second, more));
        assert_eq!(pool.calls(), vec![0]);
    }
}
