//! Test support shared by the workspace's tests: faults that live on real sockets, outside
//! the processes under test, so they hold, delay and drop bytes the way real networks do.

pub mod netns;
pub mod proxy;

pub use netns::{lab_for_test, Lab, LabError};
pub use proxy::{Direction, Fault, Proxy};
