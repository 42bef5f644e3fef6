//! Bytes between processes: TLS and bearer tokens, client channels, the peer pool and
//! openraft's network over it, and the conversions between contract types and the wire.

pub(crate) mod channel;
pub(crate) mod limits;
pub(crate) mod network;
pub(crate) mod tls;
pub(crate) mod wire;
