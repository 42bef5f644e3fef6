//! Identifiers and records shared by the contract and every backend.
//!
//! Every identifier that could be confused with another is its own type, and the
//! ones that come from configuration or the network are validated where they are built,
//! so a backend never sees a malformed name.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Error, Result};

/// Longest role or election name, in bytes. Names become parts of storage keys, and
/// etcd keeps the whole key in memory for every revision, so they stay short.
pub const MAX_NAME_LEN: usize = 255;

/// Longest TTL any backend accepts. A session that may stay silent for more than an
/// hour is no longer a liveness signal.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

/// The identity of one coordinator process, unique within its role (Milvus's server ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerId(u64);

impl ServerId {
    /// Wraps a server ID. Any `u64` is a valid ID; uniqueness is checked at registration.
    pub const fn new(id: u64) -> Self {
        Self(id)
    }

    /// The raw number, for storage keys and wire formats.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Checks a role or election name: 1..=255 bytes, no control characters (NUL
/// included), no `/` (names are single path segments in every backend's key layout,
/// so `a` must never be a prefix of `a/b`).
fn validate_name(what: &'static str, name: &str) -> Result<()> {
    let invalid = |reason: String| Err(Error::InvalidArgument { what, reason });
    if name.is_empty() {
        return invalid("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return invalid(format!(
            "is {} bytes long, the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if let Some((at, c)) = name.char_indices().find(|(_, c)| c.is_control()) {
        return invalid(format!(
            "contains the control character {c:?} at byte {at}; names must be printable"
        ));
    }
    if let Some(at) = name.find('/') {
        return invalid(format!(
            "contains '/' at byte {at}; a name is one key segment"
        ));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a name: 1..=255 bytes, printable, no `/`.
            ///
            /// # Errors
            /// [`Error::InvalidArgument`] saying which rule the name breaks.
            pub fn new(name: impl Into<String>) -> Result<Self> {
                let name = name.into();
                validate_name($what, &name)?;
                Ok(Self(name))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// The kind of coordinator (`rootcoord`, `scheduler`): members are discovered by role,
    /// and a server ID is unique within its role.
    Role,
    "role"
);

name_type!(
    /// The name of one election: the candidates for the same job campaign under the same
    /// name, and one of them at a time is its leader.
    ElectionName,
    "election name"
);

impl ElectionName {
    /// The election a role's replicas campaign in by default: the role's own name (one
    /// active per role). Infallible: both names follow the same rules.
    pub fn from_role(role: &Role) -> Self {
        Self(role.as_str().to_owned())
    }
}

/// A liveness session on the backend. It lives while it is kept alive; when it ends,
/// its member record and its candidacies end with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseId(u64);

impl LeaseId {
    /// Wraps a backend-assigned lease ID.
    pub const fn new(id: u64) -> Self {
        Self(id)
    }

    /// The raw number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for LeaseId {
    /// Lowercase hex without padding, as etcd prints lease IDs and uses them in keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A number that strictly increases across every leadership of one election, ever.
///
/// Pass it with everything a leader writes; a store that remembers the highest token it
/// has seen and rejects lower ones cannot be written by a deposed leader, whatever the
/// clocks do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(u64);

impl FencingToken {
    /// Wraps a backend-assigned token.
    pub const fn new(token: u64) -> Self {
        Self(token)
    }

    /// The raw number, for passing to systems outside `ha`.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One registered coordinator: who it is, what it does and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Unique within `role`.
    pub server_id: ServerId,
    /// What kind of coordinator this is.
    pub role: Role,
    /// Where clients reach it (host:port, URL; free-form).
    pub address: String,
    /// Free-form labels (version, zone, ...), published with the record.
    pub metadata: BTreeMap<String, String>,
}

impl Member {
    /// A member with no metadata.
    pub fn new(server_id: ServerId, role: Role, address: impl Into<String>) -> Self {
        Self {
            server_id,
            role,
            address: address.into(),
            metadata: BTreeMap::new(),
        }
    }

    /// Adds one metadata label.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// What [`Backend::register`](crate::Backend::register) grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The session's lease.
    pub id: LeaseId,
    /// The TTL the server granted (it may round the request up, never down).
    pub ttl: Duration,
}

/// Identifies one candidacy in one election: the handle for resign and proclaim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaderKey {
    /// The election campaigned in.
    pub election: ElectionName,
    /// The lease the candidacy is bound to; it ends when the lease ends.
    pub lease: LeaseId,
    /// The candidacy's fencing token (its position in the queue, ever increasing).
    pub token: FencingToken,
}

/// The current leader of an election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leader {
    /// The leader's candidacy.
    pub key: LeaderKey,
    /// The value the leader campaigned with or last proclaimed (its address, its state).
    pub value: Bytes,
    /// The server ID registered with the leader's lease; `None` when the leader is a
    /// foreign client with no member record (for example `etcdctl elect`).
    pub server_id: Option<ServerId>,
}

impl Leader {
    /// The leadership's fencing token.
    pub fn token(&self) -> FencingToken {
        self.key.token
    }

    /// The value as text, when it is UTF-8.
    pub fn value_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok()
    }
}

/// One change of an election, as [`Backend::watch`](crate::Backend::watch) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderEvent {
    /// This candidate is the leader now (a new leadership, or a new proclaimed value).
    Elected(Leader),
    /// Nobody leads the election.
    Vacant,
}

impl LeaderEvent {
    /// The leader, if there is one.
    pub fn leader(&self) -> Option<&Leader> {
        match self {
            Self::Elected(leader) => Some(leader),
            Self::Vacant => None,
        }
    }
}

/// One change of a role's live members, as
/// [`Backend::watch_members`](crate::Backend::watch_members) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberEvent {
    /// First event of every stream: the members alive when the watch started.
    Snapshot(Vec<Member>),
    /// A member registered.
    Joined(Member),
    /// A member's session ended (revoked or expired).
    Left(Member),
}

impl MemberEvent {
    /// What a watcher that knew `old` must be told once the members are `fresh` (a
    /// watch that resumed on a new snapshot): `Left` for each member gone or changed,
    /// then `Joined` for each member new or changed. Keyed by whatever identifies a
    /// record to the backend.
    pub fn changes<K: Ord>(old: &BTreeMap<K, Member>, fresh: &BTreeMap<K, Member>) -> Vec<Self> {
        let left = old
            .iter()
            .filter(|(key, member)| fresh.get(*key) != Some(*member))
            .map(|(_, member)| Self::Left(member.clone()));
        let joined = fresh
            .iter()
            .filter(|(key, member)| old.get(*key) != Some(*member))
            .map(|(_, member)| Self::Joined(member.clone()));
        left.chain(joined).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_accept_printable_text() {
        for ok in [
            "rootcoord",
            "a",
            "data-coord.v2",
            "Ünïcode name",
            &"x".repeat(255),
        ] {
            assert!(Role::new(ok).is_ok(), "{ok:?}");
            assert!(ElectionName::new(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn names_reject_bad_input_with_the_reason() {
        let cases = [
            ("", "empty"),
            (&*"x".repeat(256), "256 bytes"),
            ("a\0b", "control character"),
            ("tab\there", "control character"),
            ("a/b", "'/'"),
        ];
        for (bad, reason) in cases {
            match ElectionName::new(bad) {
                Err(Error::InvalidArgument { what, reason: got }) => {
                    assert_eq!(what, "election name");
                    assert!(got.contains(reason), "{bad:?}: {got}");
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
            assert!(matches!(
                Role::new(bad),
                Err(Error::InvalidArgument { what: "role", .. })
            ));
        }
    }

    #[test]
    fn member_changes_say_left_then_joined_for_gone_changed_and_new() {
        let role = Role::new("rootcoord").unwrap_or_else(|e| panic!("{e}"));
        let member = |id: u64, address: &str| Member::new(ServerId::new(id), role.clone(), address);
        let old: BTreeMap<u64, Member> = [(1, member(1, "a:1")), (2, member(2, "a:2"))].into();
        let fresh: BTreeMap<u64, Member> = [(2, member(2, "b:2")), (3, member(3, "a:3"))].into();
        assert_eq!(
            MemberEvent::changes(&old, &fresh),
            vec![
                MemberEvent::Left(member(1, "a:1")),
                MemberEvent::Left(member(2, "a:2")),
                MemberEvent::Joined(member(2, "b:2")),
                MemberEvent::Joined(member(3, "a:3")),
            ]
        );
        assert!(MemberEvent::changes(&fresh, &fresh).is_empty());
    }

    #[test]
    fn lease_ids_print_as_etcd_does() {
        assert_eq!(LeaseId::new(0x694d_7a1b_2c3d).to_string(), "694d7a1b2c3d");
    }
}
