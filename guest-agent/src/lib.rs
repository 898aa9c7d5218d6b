//! The guest agent's core, usable outside a guest: [`server::Agent`] runs
//! the host<->agent protocol over any byte stream (vsock in the guest, a
//! Unix socket in tests), and [`reaper::Reaper`] collects exit statuses.

pub mod cgroup;
pub mod child_setup;
pub mod device_nodes;
pub mod entropy;
pub mod figures;
pub mod held;
pub mod masks;
pub mod mount_ns;
pub mod mount_sys;
pub mod namespaces;
pub mod network;
pub mod os_err;
pub mod procfs;
pub mod read_ahead;
pub mod reaper;
pub mod seccomp;
pub mod server;
pub mod stdin_feed;
pub mod sysctl;
pub mod tty;
