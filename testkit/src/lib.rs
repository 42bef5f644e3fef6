//! Test support shared by the workspace's tests: faults that live outside the processes
//! under test, on real sockets (held, delayed and dropped bytes), real networks (network
//! namespaces on a bridge) and real disks (a tmpfs that fills up).

pub mod disk;
pub mod netns;
pub mod ports;
pub mod proxy;

pub use disk::{small_disk_for_test, SmallDisk};
pub use netns::{lab_for_test, Lab, LabError};
pub use ports::{free_port, free_ports, unix_us};
pub use proxy::{Direction, Fault, Proxy};
