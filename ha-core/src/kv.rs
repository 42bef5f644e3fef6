//! The guarded store: a small key-value namespace per election whose writes are applied
//! only while the writer's leadership is the election's current one (contract clause 10).
//!
//! Milvus's coordinators keep their metadata in etcd with plain puts, so an active that
//! lost its lease can keep writing after the standby took over. Here every write carries
//! the writer's [`LeaderKey`](crate::LeaderKey) and the backend checks it in the same
//! atomic step that applies the write: an etcd transaction, a Raft state-machine apply,
//! or the memory backend's lock.

use std::fmt;

use bytes::Bytes;

use crate::error::{Error, Result};

/// Default longest key, in bytes.
pub const DEFAULT_MAX_KEY_BYTES: usize = 1024;

/// Default longest value, in bytes (1 MiB). etcd refuses requests above 1.5 MiB by
/// default, and every write passes through the Raft log of the embedded backend.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;

/// A key of an election's guarded store: non-empty UTF-8 without control characters.
/// `/` is allowed, so keys can be paths (`segments/7/state`); the election name is a
/// single segment, so one election's keys never share a prefix with another's.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KvKey(String);

impl KvKey {
    /// Validates and wraps a key. Its length is checked against the backend's
    /// [`KvLimits`] when it is used, since that limit is configurable.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`what = "key"`) for an empty key or one with a control
    /// character.
    pub fn new(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        if key.is_empty() {
            return Err(Error::InvalidArgument {
                what: "key",
                reason: "must not be empty".into(),
            });
        }
        if let Some((at, c)) = key.char_indices().find(|(_, c)| c.is_control()) {
            return Err(Error::InvalidArgument {
                what: "key",
                reason: format!("contains the control character {c:?} at byte {at}"),
            });
        }
        Ok(Self(key))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KvKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for KvKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

/// One guarded write; see [`Backend::kv_write`](crate::Backend::kv_write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvWrite {
    /// Sets the key to the value.
    Put {
        /// The key.
        key: KvKey,
        /// The new value.
        value: Bytes,
    },
    /// Removes the key (a key that is absent stays absent).
    Delete {
        /// The key.
        key: KvKey,
    },
    /// Sets the key to `new` (or removes it when `new` is `None`) only if its value is
    /// `expected` now (`None` = the key is absent).
    CompareAndSet {
        /// The key.
        key: KvKey,
        /// The value the key must hold; `None` means it must be absent.
        expected: Option<Bytes>,
        /// The value to store; `None` removes the key.
        new: Option<Bytes>,
    },
}

impl KvWrite {
    /// The key written.
    pub fn key(&self) -> &KvKey {
        match self {
            Self::Put { key, .. } | Self::Delete { key } | Self::CompareAndSet { key, .. } => key,
        }
    }

    /// The values the write carries (stored or compared), for size checks.
    fn values(&self) -> impl Iterator<Item = &Bytes> {
        let (a, b) = match self {
            Self::Put { value, .. } => (Some(value), None),
            Self::Delete { .. } => (None, None),
            Self::CompareAndSet { expected, new, .. } => (expected.as_ref(), new.as_ref()),
        };
        a.into_iter().chain(b)
    }

    /// Applies the write to `current` (the key's value now) and returns the new value and
    /// the outcome; every backend uses this, so they agree on the semantics.
    pub fn apply_to(&self, current: Option<&Bytes>) -> (Option<Bytes>, KvWriteOutcome) {
        let previous = current.cloned();
        match self {
            Self::Put { value, .. } => (
                Some(value.clone()),
                KvWriteOutcome {
                    applied: true,
                    previous,
                },
            ),
            Self::Delete { .. } => (
                None,
                KvWriteOutcome {
                    applied: previous.is_some(),
                    previous,
                },
            ),
            Self::CompareAndSet { expected, new, .. } => {
                if current == expected.as_ref() {
                    (
                        new.clone(),
                        KvWriteOutcome {
                            applied: true,
                            previous,
                        },
                    )
                } else {
                    (
                        previous.clone(),
                        KvWriteOutcome {
                            applied: false,
                            previous,
                        },
                    )
                }
            }
        }
    }
}

/// What a guarded write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvWriteOutcome {
    /// `Put`: always true. `Delete`: the key existed. `CompareAndSet`: the comparison
    /// held and the key was set.
    pub applied: bool,
    /// The key's value just before the write (for a failed compare-and-set: its value
    /// now).
    pub previous: Option<Bytes>,
}

/// The answer of [`Leadership::compare_and_set`](crate::Leadership::compare_and_set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// The key held the expected value and now holds the new one.
    Swapped,
    /// The key did not hold the expected value; this is what it holds.
    Mismatch {
        /// The key's value (`None` = absent).
        current: Option<Bytes>,
    },
}

/// Size limits of the guarded store, part of a backend's
/// [`Capabilities`](crate::Capabilities) and configured on the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLimits {
    /// Longest key, in bytes.
    pub max_key_bytes: usize,
    /// Longest value, in bytes (also the longest `expected` of a compare-and-set).
    pub max_value_bytes: usize,
}

impl Default for KvLimits {
    fn default() -> Self {
        Self {
            max_key_bytes: DEFAULT_MAX_KEY_BYTES,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

impl KvLimits {
    /// Checks a key's length.
    ///
    /// # Errors
    /// [`Error::TooLarge`] naming the key.
    pub fn check_key(&self, key: &KvKey) -> Result<()> {
        if key.as_str().len() > self.max_key_bytes {
            return Err(Error::TooLarge {
                what: "key",
                size: key.as_str().len(),
                limit: self.max_key_bytes,
            });
        }
        Ok(())
    }

    /// Checks a write's key and values.
    ///
    /// # Errors
    /// [`Error::TooLarge`] naming the key or the value.
    pub fn check(&self, write: &KvWrite) -> Result<()> {
        self.check_key(write.key())?;
        if let Some(value) = write.values().find(|v| v.len() > self.max_value_bytes) {
            return Err(Error::TooLarge {
                what: "value",
                size: value.len(),
                limit: self.max_value_bytes,
            });
        }
        Ok(())
    }
}

/// A linearizable read of `key` in `election`'s store, bounded by `request_timeout`.
pub(crate) async fn read(
    backend: &dyn crate::Backend,
    request_timeout: std::time::Duration,
    election: &crate::ElectionName,
    key: &str,
) -> Result<Option<Bytes>> {
    let key = KvKey::new(key)?;
    backend.capabilities().kv_limits.check_key(&key)?;
    match tokio::time::timeout(request_timeout, backend.kv_read(election, &key)).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout {
            operation: "kv_read",
            after: request_timeout,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> KvKey {
        KvKey::new(k).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn keys_are_validated() {
        assert!(KvKey::new("").is_err());
        assert!(KvKey::new("a\0b").is_err());
        assert_eq!(key("segments/7/state").as_str(), "segments/7/state");
    }

    #[test]
    fn limits_name_what_is_too_large() {
        let limits = KvLimits {
            max_key_bytes: 3,
            max_value_bytes: 2,
        };
        let e = limits
            .check(&KvWrite::Delete { key: key("abcd") })
            .err()
            .map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("key too large: 4 bytes, the limit is 3"));
        let cas = KvWrite::CompareAndSet {
            key: key("k"),
            expected: Some(Bytes::from_static(b"abc")),
            new: None,
        };
        assert!(matches!(
            limits.check(&cas),
            Err(Error::TooLarge {
                what: "value",
                size: 3,
                limit: 2
            })
        ));
        assert!(limits
            .check(&KvWrite::Put {
                key: key("abc"),
                value: Bytes::from_static(b"ab")
            })
            .is_ok());
    }

    #[test]
    fn semantics() {
        let v = |s: &'static str| Bytes::from_static(s.as_bytes());
        let put = KvWrite::Put {
            key: key("k"),
            value: v("1"),
        };
        assert_eq!(put.apply_to(None).0, Some(v("1")));
        let del = KvWrite::Delete { key: key("k") };
        assert!(!del.apply_to(None).1.applied);
        assert!(del.apply_to(Some(&v("1"))).1.applied);
        let cas = KvWrite::CompareAndSet {
            key: key("k"),
            expected: None,
            new: Some(v("2")),
        };
        assert_eq!(
            cas.apply_to(None),
            (
                Some(v("2")),
                KvWriteOutcome {
                    applied: true,
                    previous: None
                }
            )
        );
        let (kept, outcome) = cas.apply_to(Some(&v("1")));
        assert_eq!(kept, Some(v("1")));
        assert_eq!(outcome.previous, Some(v("1")));
        assert!(!outcome.applied);
    }
}
