//! The private etcd server every etcd test starts: `ha_etcd::testing`.

#![allow(unused_imports)]

pub use ha_etcd::testing::{Etcd, EtcdCluster, ServerTls};
