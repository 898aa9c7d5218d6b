//! What a caller asks for, before any validation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A micro-VM as requested by the runtime or a config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Guest kernel: an ELF vmlinux with a PVH note, or a bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs (cpio, optionally compressed).
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command line, appended after the VMM's own arguments.
    #[serde(default)]
    pub cmdline: String,
    /// Give the guest a virtio-rng device fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    /// A virtio-vsock device with its host side on a Unix socket.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
}

/// Hybrid vsock: host programs reach the guest through `uds_path`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u32,
    /// Socket the VMM creates for host-initiated connections; guest
    /// connections to port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}
