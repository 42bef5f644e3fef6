//! Test support shared by the workspace's tests and its benchmark: the real processes
//! under test (started, read, signalled and stopped by PID), and faults that live outside
//! them, on real sockets (held, delayed and dropped bytes), real networks (network
//! namespaces on a bridge) and real disks (a tmpfs that fills up); and a private etcd
//! server or cluster on loopback.

pub mod disk;
pub mod etcd;
pub mod netns;
pub mod ports;
pub mod procs;
pub mod proxy;

pub use disk::{small_disk_for_test, SmallDisk};
pub use netns::{lab_for_test, Lab, LabError};
pub use ports::{free_port, free_ports, unix_us};
pub use procs::{signal_pid, Line, Processes, Signal, WaitError};
pub use proxy::{proxies_to, Direction, Fault, Proxy};
