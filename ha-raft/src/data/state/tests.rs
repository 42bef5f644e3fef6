//! The state machine's unit tests.

use super::*;
use crate::data::command::KvOp;

fn member(id: u64) -> MemberRecord {
    MemberRecord {
        server_id: id,
        role: "coord".into(),
        address: format!("a{id}"),
        metadata: BTreeMap::new(),
    }
}

fn register(state: &mut State, index: u64, id: u64) -> u64 {
    match state
        .apply(
            index,
            &Command::Register {
                member: member(id),
                ttl_ms: 2000,
            },
        )
        .0
    {
        CommandResult::Registered { lease, .. } => lease,
        other => panic!("{other:?}"),
    }
}

fn campaign(
    state: &mut State,
    index: u64,
    lease: u64,
    value: &str,
) -> (CommandResult, Vec<Change>) {
    state.apply(
        index,
        &Command::Campaign {
            lease,
            election: "e".into(),
            value: value.into(),
        },
    )
}

#[test]
fn lease_and_token_are_log_indexes_and_queue_is_fifo() {
    let mut s = State::default();
    let a = register(&mut s, 1, 1);
    let b = register(&mut s, 2, 2);
    assert_eq!((a, b), (1, 2));
    assert_eq!(
        s.apply(
            3,
            &Command::Register {
                member: member(1),
                ttl_ms: 2000
            }
        )
        .0,
        CommandResult::AlreadyRegistered
    );
    assert_eq!(
        campaign(&mut s, 4, a, "a").0,
        CommandResult::Campaigned {
            token: 4,
            attempt: 1
        }
    );
    let (result, changes) = campaign(&mut s, 5, b, "b");
    assert_eq!(
        result,
        CommandResult::Campaigned {
            token: 5,
            attempt: 1
        }
    );
    assert!(changes.is_empty(), "a queued candidate changes no leader");
    assert_eq!(s.head("e").map(|h| h.token), Some(4));
    // Resuming keeps the token and replaces the value.
    assert_eq!(
        campaign(&mut s, 6, a, "a2").0,
        CommandResult::Campaigned {
            token: 4,
            attempt: 2
        }
    );
    assert_eq!(s.head("e").map(|h| h.value), Some(b"a2".to_vec()));
    // The late withdrawal of the first call does not undo the second.
    let withdraw = |attempt| Command::Resign {
        election: "e".into(),
        lease: a,
        token: 4,
        attempt: Some(attempt),
    };
    let (_, changes) = s.apply(7, &withdraw(1));
    assert!(changes.is_empty());
    assert_eq!(s.head("e").map(|h| h.token), Some(4));
    let (_, changes) = s.apply(8, &withdraw(2));
    assert_eq!(s.head("e").map(|h| h.token), Some(5));
    assert!(matches!(&changes[..], [Change::Leader { head: Some(h), .. }] if h.token == 5));
}

#[test]
fn ids_in_a_batch_are_unique_and_above_every_earlier_one() {
    let mut s = State::default();
    let a = register(&mut s, 1, 1);
    let batch = Command::Batch(vec![
        Command::Register {
            member: member(2),
            ttl_ms: 2000,
        },
        Command::Campaign {
            lease: a,
            election: "e".into(),
            value: b"a".to_vec(),
        },
        Command::Register {
            member: member(3),
            ttl_ms: 2000,
        },
        Command::Register {
            member: member(2),
            ttl_ms: 2000,
        },
    ]);
    let (result, changes) = s.apply(2, &batch);
    assert_eq!(
        result,
        CommandResult::Batch(vec![
            CommandResult::Registered {
                lease: 2,
                ttl_ms: 2000
            },
            CommandResult::Campaigned {
                token: 3,
                attempt: 1
            },
            CommandResult::Registered {
                lease: 4,
                ttl_ms: 2000
            },
            CommandResult::AlreadyRegistered,
        ])
    );
    assert_eq!(
        changes.len(),
        3,
        "two joins and a leader, in order: {changes:?}"
    );
    assert!(matches!(changes[1], Change::Leader { .. }));
    // The entries after it: above the batch's ids, not at their own index.
    assert_eq!(register(&mut s, 3, 4), 5);
    assert_eq!(
        campaign(&mut s, 4, 5, "b").0,
        CommandResult::Campaigned {
            token: 6,
            attempt: 1
        }
    );
    // Past the batch's reach, ids are indexes again.
    assert_eq!(register(&mut s, 10, 5), 10);
    // A nested batch applies nothing.
    assert_eq!(
        s.apply(11, &Command::Batch(vec![Command::Batch(vec![])])).0,
        CommandResult::Batch(vec![CommandResult::None])
    );
}

#[test]
fn a_snapshot_from_before_batches_hands_out_indexes() {
    let mut s = State::default();
    register(&mut s, 1, 1);
    let mut json = serde_json::to_value(&s).unwrap_or_default();
    if let Some(map) = json.as_object_mut() {
        map.remove("last_id");
    }
    let mut old: State = serde_json::from_value(json).unwrap_or_default();
    assert_eq!(old.last_id, 0);
    assert_eq!(register(&mut old, 5, 2), 5);
}

#[test]
fn expiry_removes_member_and_candidacies_and_reports_in_order() {
    let mut s = State::default();
    let a = register(&mut s, 1, 1);
    campaign(&mut s, 2, a, "a");
    let (_, changes) = s.apply(3, &Command::Expire { lease: a });
    assert_eq!(
        changes,
        vec![
            Change::Leader {
                election: "e".into(),
                head: None
            },
            Change::Left(member(1)),
        ]
    );
    assert!(s.members_of("coord").is_empty());
    assert!(s.elections.is_empty());
    assert_eq!(
        campaign(&mut s, 4, a, "late").0,
        CommandResult::LeaseExpired
    );
    // Idempotent.
    assert!(s.apply(5, &Command::Revoke { lease: a }).1.is_empty());
}

#[test]
fn proclaim_only_from_the_head() {
    let mut s = State::default();
    let a = register(&mut s, 1, 1);
    let b = register(&mut s, 2, 2);
    campaign(&mut s, 3, a, "a");
    campaign(&mut s, 4, b, "b");
    let proclaim = |lease, token| Command::Proclaim {
        election: "e".into(),
        lease,
        token,
        value: b"new".to_vec(),
    };
    assert_eq!(
        s.apply(5, &proclaim(b, 4)).0,
        CommandResult::NotLeader { current: Some(3) }
    );
    assert_eq!(
        s.apply(6, &proclaim(b, 3)).0,
        CommandResult::NotLeader { current: Some(3) }
    );
    let (result, changes) = s.apply(7, &proclaim(a, 3));
    assert_eq!(result, CommandResult::Ok);
    assert_eq!(changes.len(), 1);
}

#[test]
fn kv_write_only_from_the_head() {
    let mut s = State::default();
    let a = register(&mut s, 1, 1);
    let b = register(&mut s, 2, 2);
    campaign(&mut s, 3, a, "a");
    campaign(&mut s, 4, b, "b");
    let write = |lease, token, value: &str| Command::KvWrite {
        election: "e".into(),
        lease,
        token,
        op: KvOp::Put {
            key: "k".into(),
            value: value.into(),
        },
    };
    assert_eq!(
        s.apply(5, &write(b, 4, "queued")).0,
        CommandResult::NotLeader { current: Some(3) }
    );
    assert_eq!(
        s.apply(6, &write(a, 3, "one")).0,
        CommandResult::KvWritten {
            applied: true,
            previous: None
        }
    );
    s.apply(7, &Command::Expire { lease: a });
    assert_eq!(
        s.apply(8, &write(a, 3, "stale")).0,
        CommandResult::NotLeader { current: Some(4) }
    );
    assert_eq!(
        s.apply(9, &write(b, 4, "two")).0,
        CommandResult::KvWritten {
            applied: true,
            previous: Some("one".into())
        }
    );
    let cas = Command::KvWrite {
        election: "e".into(),
        lease: b,
        token: 4,
        op: KvOp::CompareAndSet {
            key: "k".into(),
            expected: Some("one".into()),
            new: None,
        },
    };
    assert_eq!(
        s.apply(10, &cas).0,
        CommandResult::KvWritten {
            applied: false,
            previous: Some("two".into())
        }
    );
    // Snapshots from before the guarded store still load.
    let old = r#"{"leases":{},"members":{},"elections":{}}"#;
    let loaded: State = serde_json::from_str(old).unwrap_or_default();
    assert!(loaded.kv.is_empty());
}

#[test]
fn snapshot_round_trips() {
    let mut s = State::default();
    let a = register(&mut s, 1, 1);
    campaign(&mut s, 2, a, "a");
    let bytes = serde_json::to_vec(&s).unwrap_or_default();
    let back: State = serde_json::from_slice(&bytes).unwrap_or_default();
    assert_eq!(back, s);
}
