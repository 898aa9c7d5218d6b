//! runvm's virtual machine monitor.
//!
//! Configuration flows in three layers, as in Firecracker: plain serde
//! [`config`] structs, validated into [`resources::VmResources`], which the
//! builder turns into a running VM without reading files or the environment
//! again.

pub mod config;
pub mod initramfs;
pub mod resources;
