//! Size limits of what a backend stores outside the guarded store: leader values and
//! member records. Every backend enforces the same ones, so a coordinator that works on
//! one works on all; on the Raft backend they also keep one entry from outgrowing what
//! a peer message can carry within the replication timeout.

use crate::{Error, Member, Result};

/// Longest campaign or proclaim value, in bytes.
pub const MAX_LEADER_VALUE_BYTES: usize = 64 * 1024;
/// Longest member address, in bytes.
pub const MAX_ADDRESS_BYTES: usize = 1024;
/// Most bytes of member metadata: every label's key and value added up.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// The record size limits, part of [`Capabilities`](crate::Capabilities). The same on
/// every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLimits {
    /// Longest campaign or proclaim value.
    pub max_leader_value_bytes: usize,
    /// Longest member address.
    pub max_address_bytes: usize,
    /// Most metadata bytes (keys and values).
    pub max_metadata_bytes: usize,
}

impl Default for RecordLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl RecordLimits {
    /// The limits every backend applies.
    pub const DEFAULT: Self = Self {
        max_leader_value_bytes: MAX_LEADER_VALUE_BYTES,
        max_address_bytes: MAX_ADDRESS_BYTES,
        max_metadata_bytes: MAX_METADATA_BYTES,
    };

    /// Checks a campaign or proclaim value.
    ///
    /// # Errors
    /// [`Error::TooLarge`] naming the `leader value`.
    pub fn check_leader_value(&self, value: &[u8]) -> Result<()> {
        within("leader value", value.len(), self.max_leader_value_bytes)
    }

    /// Checks a member record's address and metadata.
    ///
    /// # Errors
    /// [`Error::TooLarge`] naming the `address` or the `metadata`.
    pub fn check_member(&self, member: &Member) -> Result<()> {
        within("address", member.address.len(), self.max_address_bytes)?;
        let metadata = member
            .metadata
            .iter()
            .map(|(key, value)| key.len() + value.len())
            .sum();
        within("metadata", metadata, self.max_metadata_bytes)
    }
}

fn within(what: &'static str, size: usize, limit: usize) -> Result<()> {
    if size > limit {
        return Err(Error::TooLarge { what, size, limit });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Role, ServerId};

    fn member(address: usize, metadata: usize) -> Member {
        let role = Role::new("r").unwrap_or_else(|e| panic!("{e}"));
        let member = Member::new(ServerId::new(1), role, "a".repeat(address));
        if metadata == 0 {
            member
        } else {
            member.with_metadata("k", "v".repeat(metadata - 1))
        }
    }

    #[test]
    fn at_the_limit_fits_and_one_more_is_too_large_naming_what() {
        let limits = RecordLimits::DEFAULT;
        assert!(limits
            .check_leader_value(&vec![0; MAX_LEADER_VALUE_BYTES])
            .is_ok());
        assert!(matches!(
            limits.check_leader_value(&vec![0; MAX_LEADER_VALUE_BYTES + 1]),
            Err(Error::TooLarge { what: "leader value", size, limit })
                if size == MAX_LEADER_VALUE_BYTES + 1 && limit == MAX_LEADER_VALUE_BYTES
        ));
        assert!(limits
            .check_member(&member(MAX_ADDRESS_BYTES, MAX_METADATA_BYTES))
            .is_ok());
        assert!(matches!(
            limits.check_member(&member(MAX_ADDRESS_BYTES + 1, 0)),
            Err(Error::TooLarge {
                what: "address",
                ..
            })
        ));
        assert!(matches!(
            limits.check_member(&member(1, MAX_METADATA_BYTES + 1)),
            Err(Error::TooLarge {
                what: "metadata",
                ..
            })
        ));
    }
}
