//! What a caller asks for, before any validation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::devices::virtio::fs::CacheMode;
pub use crate::devices::virtio::net::MacAddr;

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
    /// Initramfs parts (newc cpio, each optionally compressed), loaded one
    /// after another: Linux unpacks concatenated archives in order, so a
    /// large part shared by many VMs can be combined with a small one of
    /// their own without copying the large one into a new file.
    #[serde(default)]
    pub initramfs: Vec<PathBuf>,
    /// Place the kernel in guest memory by mapping its pages (private, copy
    /// on write) instead of copying them, so VMs booting the same kernel
    /// share those pages. Only for a file that is never changed in place
    /// while a VM runs (see `file_map`). The initramfs is always copied.
    #[serde(default)]
    pub map_boot_files: bool,
    /// Advise guest RAM for transparent huge pages once the guest is
    /// loaded (the default): faster first touches and 2 MiB KVM mappings
    /// where the host's shmem THP setting honours the advice, at the price
    /// of holding whole 2 MiB pages of guest memory. `false` keeps guest RAM
    /// on 4 KiB pages for hosts that value density over boot time.
    #[serde(default = "yes")]
    pub huge_pages: bool,
    /// Extra kernel command line, appended after the VMM's own arguments.
    #[serde(default)]
    pub cmdline: String,
    /// Give the guest a virtio-rng device fed from the host's getrandom.
    #[serde(default)]
    pub rng: bool,
    /// A virtio-vsock device with its host side on a Unix socket.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Host directories shared over virtio-fs, one device each.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// virtio-net NICs, each on a host TAP device.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// Start from the snapshot in this directory instead of booting (see
    /// [`crate::snapshot`]): `kernel`, `initramfs`, `map_boot_files` and
    /// `cmdline` are then not used; vCPUs, memory and the kinds and order
    /// of devices must be the snapshot's.
    #[serde(default)]
    pub restore: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

/// Which TAP device a NIC's frames go through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TapSource {
    /// The interface of that name, created when it does not exist (and
    /// then gone when the VM ends).
    Name(String),
    /// A TAP fd the caller opened and passed down (IFF_TAP, IFF_NO_PI,
    /// IFF_VNET_HDR); the VMM takes it over.
    Fd(i32),
}

/// A virtio-net NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Where its frames go.
    pub tap: TapSource,
    /// The guest's address; a random locally administered one when absent.
    #[serde(default)]
    pub mac: Option<MacAddr>,
}

impl std::str::FromStr for NetConfig {
    type Err = String;

    /// `tap=NAME[,mac=MAC]` or `fd=N[,mac=MAC]`
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tap, mut mac) = (None, None);
        for part in s.split(',') {
            let source = match part.split_once('=') {
                Some(("tap", v)) => TapSource::Name(v.to_owned()),
                Some(("fd", v)) => TapSource::Fd(
                    v.parse()
                        .map_err(|_| format!("fd={v:?} is not a file descriptor number"))?,
                ),
                Some(("mac", v)) => {
                    mac = Some(v.parse()?);
                    continue;
                }
                _ => return Err(format!("unknown NIC option {part:?}")),
            };
            if tap.replace(source).is_some() {
                return Err("a NIC takes one of tap= or fd=".into());
            }
        }
        Ok(NetConfig {
            tap: tap.ok_or("a NIC needs tap=NAME or fd=N")?,
            mac,
        })
    }
}

/// A host directory the guest mounts with `mount -t virtiofs TAG DIR`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The mount tag (1 to 36 bytes, unique per VM).
    pub tag: String,
    /// The shared directory.
    pub path: PathBuf,
    /// Refuse every change on the host side.
    #[serde(default)]
    pub read_only: bool,
    /// How much the guest may cache.
    #[serde(default)]
    pub cache: CacheMode,
}

impl std::str::FromStr for FsConfig {
    type Err = String;

    /// `tag=T,path=P[,ro][,cache=never|auto|always]`
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tag, mut path, mut read_only, mut cache) = (None, None, false, CacheMode::Auto);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("tag", v)) => tag = Some(v.to_owned()),
                Some(("path", v)) => path = Some(PathBuf::from(v)),
                Some(("cache", v)) => cache = v.parse()?,
                None if part == "ro" => read_only = true,
                None if part == "rw" => read_only = false,
                _ => return Err(format!("unknown share option {part:?}")),
            }
        }
        Ok(FsConfig {
            tag: tag.ok_or("a share needs tag=")?,
            path: path.ok_or("a share needs path=")?,
            read_only,
            cache,
        })
    }
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
