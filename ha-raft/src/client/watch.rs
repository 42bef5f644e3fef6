//! A `RaftClient`'s watches: a server stream followed across endpoints and failures,
//! resumed after the last revision seen, so no change is lost or repeated.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use ha_core::endpoints::At;
use ha_core::watch_buffer::WatchSender;
use ha_core::{ElectionName, LeaderEvent, Member, MemberEvent, Result, Role, ServerId};
use tokio::time::sleep;
use tonic::Status;

use super::connection::{transient, Api, RaftClient};
use super::held::HeldSlot;
use crate::net::wire::{from_status, leader_from_proto, member_from_proto};
use crate::proto::{self, member_event::Kind};

/// Opens a server stream on the endpoint in use (on a held-call connection, the slot
/// kept as long as the stream), moving to another after a transient failure (at most
/// 100 in a row). `None` once the consumer is gone or a final error was sent to it.
async fn open_stream<T, E, F, Fut>(
    client: &RaftClient,
    tx: &WatchSender<Result<E>>,
    mut open: F,
) -> Option<(At, tonic::Streaming<T>, HeldSlot)>
where
    F: FnMut(Api) -> Fut,
    Fut: Future<Output = std::result::Result<tonic::Response<tonic::Streaming<T>>, Status>>,
{
    let mut failures = 0u32;
    loop {
        let (at, c, slot) = match client.held_client() {
            Ok(held) => held,
            Err(e) => {
                let _ = tx.offer(Err(e));
                return None;
            }
        };
        let within = client.inner.set.attempt_timeout();
        let opened = tokio::select! {
            _ = tx.closed() => return None,
            opened = tokio::time::timeout(within, open(c)) => opened,
        };
        let opened = match opened {
            Ok(opened) => opened,
            Err(_) => Err(Status::unavailable("no answer within the attempt timeout")),
        };
        match opened {
            Ok(stream) => return Some((at, stream.into_inner(), slot)),
            Err(status) if transient(&status) && failures < 100 => {
                failures += 1;
                client.leave(at, status.message());
                sleep(Duration::from_millis(100)).await;
            }
            Err(status) => {
                let _ = tx.offer(Err(from_status(&status)));
                return None;
            }
        }
    }
}

/// Feeds a leader watch, reconnecting after failures and resuming after the last
/// revision seen, so no change is lost or repeated.
pub(super) async fn follow_leader(
    client: RaftClient,
    election: ElectionName,
    tx: WatchSender<Result<LeaderEvent>>,
) {
    let mut after = 0u64;
    let mut last: Option<Option<(u64, Vec<u8>)>> = None;
    loop {
        let request = proto::WatchRequest {
            election: election.as_str().to_owned(),
            after_revision: after,
        };
        let Some((at, mut stream, _slot)) = open_stream(&client, &tx, |mut c| {
            let request = request.clone();
            async move { c.watch(request).await }
        })
        .await
        else {
            return;
        };
        loop {
            let message = tokio::select! {
                biased;
                _ = tx.closed() => return,
                // The endpoint was found dead: resume on the one in use.
                () = client.failed_since(at) => break,
                message = stream.message() => message,
            };
            match message {
                Ok(Some(event)) => {
                    if event.revision <= after && last.is_some() {
                        continue;
                    }
                    after = after.max(event.revision);
                    let state = event
                        .leader
                        .as_ref()
                        .map(|l| (l.key.as_ref().map_or(0, |k| k.token), l.value.clone()));
                    if last.as_ref() == Some(&state) {
                        continue; // the same state again after a reconnect
                    }
                    last = Some(state);
                    let item = match event.leader {
                        Some(leader) => leader_from_proto(leader).map(LeaderEvent::Elected),
                        None => Ok(LeaderEvent::Vacant),
                    };
                    if !tx.offer(item) {
                        return;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    if transient(&status) {
                        client.leave(at, status.message());
                    }
                    break;
                }
            }
        }
        sleep(Duration::from_millis(100)).await;
    }
}

/// Feeds a member watch; after a reconnect, the difference between the old and new
/// snapshots is reported as joins and leaves.
pub(super) async fn follow_members(
    client: RaftClient,
    role: Role,
    tx: WatchSender<Result<MemberEvent>>,
) {
    let mut known: Option<BTreeMap<ServerId, Member>> = None;
    loop {
        let request = proto::RoleRequest {
            role: role.as_str().to_owned(),
        };
        let Some((at, mut stream, _slot)) = open_stream(&client, &tx, |mut c| {
            let request = request.clone();
            async move { c.watch_members(request).await }
        })
        .await
        else {
            return;
        };
        loop {
            let message = tokio::select! {
                biased;
                _ = tx.closed() => return,
                // The endpoint was found dead: resume on the one in use.
                () = client.failed_since(at) => break,
                message = stream.message() => message,
            };
            let event = match message {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(status) => {
                    if transient(&status) {
                        client.leave(at, status.message());
                    }
                    break;
                }
            };
            let members: Result<Vec<Member>> =
                event.members.into_iter().map(member_from_proto).collect();
            let members = match members {
                Ok(members) => members,
                Err(e) => {
                    let _ = tx.offer(Err(e));
                    return;
                }
            };
            let mut out = Vec::new();
            match (
                Kind::try_from(event.kind).unwrap_or(Kind::Snapshot),
                known.as_mut(),
            ) {
                (Kind::Snapshot, None) => {
                    known = Some(members.iter().map(|m| (m.server_id, m.clone())).collect());
                    out.push(MemberEvent::Snapshot(members));
                }
                (Kind::Snapshot, Some(known)) => {
                    let fresh: BTreeMap<ServerId, Member> =
                        members.into_iter().map(|m| (m.server_id, m)).collect();
                    out.extend(MemberEvent::changes(known, &fresh));
                    *known = fresh;
                }
                (Kind::Joined, Some(known)) => {
                    for member in members {
                        known.insert(member.server_id, member.clone());
                        out.push(MemberEvent::Joined(member));
                    }
                }
                (Kind::Left, Some(known)) => {
                    for member in members {
                        known.remove(&member.server_id);
                        out.push(MemberEvent::Left(member));
                    }
                }
                (_, None) => {} // a change before the snapshot cannot happen; ignore it
            }
            for event in out {
                if !tx.offer(Ok(event)) {
                    return;
                }
            }
        }
        sleep(Duration::from_millis(100)).await;
    }
}
