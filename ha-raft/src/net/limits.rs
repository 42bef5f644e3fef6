//! Names and limits both ends of a connection agree on: the servers enforce them, the
//! clients stay inside them.

use ha_core::{Error, Result};

/// Streams one connection may have open at once.
pub(crate) const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// The reply metadata that names the Raft leader's address.
pub(crate) const LEADER_METADATA: &str = "ha-raft-leader";

/// The largest admin request decoded: a change is a few hundred bytes.
pub(crate) const MAX_ADMIN_REQUEST: usize = 64 << 10;

/// Most leases one keepalive batch may carry; the client splits larger batches.
pub const MAX_KEEPALIVE_BATCH: usize = 4096;

/// A refusal of `leases.len()` leases, said as an argument error.
pub(crate) fn check_batch_size(leases: usize) -> Result<()> {
    if leases > MAX_KEEPALIVE_BATCH {
        return Err(Error::InvalidArgument {
            what: "leases",
            reason: format!("a keepalive batch of {leases} leases; at most {MAX_KEEPALIVE_BATCH}"),
        });
    }
    Ok(())
}
