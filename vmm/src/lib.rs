//! runvm's virtual machine monitor.
//!
//! Configuration flows in three layers, as in Firecracker: plain serde
//! [`config`] structs, validated into [`resources::VmResources`], which
//! [`vm::run`] turns into a running VM without reading configuration again.

pub mod boot;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod fd_limit;
pub mod file_map;
pub mod guest_profile;
pub mod initramfs;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod pause;
pub mod resources;
pub mod snapshot;
pub mod threads;
pub mod unix_path;
pub mod vm;
