//! Validated VM resources: everything the builder needs, already checked.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::{FsConfig, MacAddr, NetConfig, TapSource, VmConfig, VsockConfig};
use crate::unix_path::MAX_SOCKET_NAME;

/// Smallest guest that can boot the runvm kernel with an initramfs.
pub const MIN_MEM_MIB: u64 = 32;
/// The x86 boot protocol's command-line limit for the kernels runvm builds
/// (COMMAND_LINE_SIZE), including the terminating NUL.
pub const MAX_CMDLINE_LEN: usize = 2048;

/// Why a [`VmConfig`] cannot be turned into a VM.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// `vcpus` is 0.
    #[error("a VM needs at least one vCPU")]
    NoVcpus,
    /// More vCPUs than the limit the caller passed (KVM's, at build time).
    #[error("{requested} vCPUs requested, but at most {max} are supported")]
    TooManyVcpus {
        /// What was asked for.
        requested: u32,
        /// The limit.
        max: u32,
    },
    /// Memory below [`MIN_MEM_MIB`].
    #[error("guest memory of {0} MiB is too small (at least {MIN_MEM_MIB} MiB)")]
    MemTooSmall(u64),
    /// Memory above the host limit passed in.
    #[error("guest memory of {requested} MiB exceeds the host limit of {max} MiB")]
    MemTooLarge {
        /// What was asked for.
        requested: u64,
        /// The limit.
        max: u64,
    },
    /// The kernel (or initramfs) could not be opened or read.
    #[error("cannot read {what} {path}")]
    Unreadable {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A reserved or out-of-range vsock context ID.
    #[error("vsock guest CID {0} is reserved (use 3 to 4294967294)")]
    VsockCid(u32),
    /// The vsock socket path cannot be used.
    #[error("vsock socket {path}: {why}")]
    VsockPath {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A virtio-fs share that cannot be used.
    #[error("virtio-fs share {tag:?} ({path}): {why}")]
    FsShare {
        /// Its tag.
        tag: String,
        /// Its directory.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
    /// A NIC that cannot be used.
    #[error("NIC {nic}: {why}")]
    Nic {
        /// `tap=NAME` or `fd=N`.
        nic: String,
        /// What is wrong.
        why: String,
    },
    /// The kernel file is neither format the loader takes.
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat(PathBuf),
    /// The command line does not fit the boot protocol.
    #[error("kernel command line of {len} bytes exceeds the limit of {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit, without the NUL.
        max: usize,
    },
    /// The command line holds a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
}

/// How the guest kernel is laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF vmlinux, entered through its PVH note.
    Elf,
    /// A bzImage, entered through the Linux 64-bit boot protocol.
    BzImage,
}

/// Host limits that validation checks against.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    /// Most vCPUs per VM (KVM_CAP_MAX_VCPUS).
    pub max_vcpus: u32,
    /// Most guest memory in MiB.
    pub max_mem_mib: u64,
}

/// A configuration that passed validation.
#[derive(Debug, Clone)]
pub struct VmResources {
    /// Number of vCPUs, at least 1.
    pub vcpus: u32,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// Guest kernel path.
    pub kernel: PathBuf,
    /// Detected kernel format (`None` when restoring a snapshot).
    pub kernel_format: Option<KernelFormat>,
    /// Initramfs parts, in order.
    pub initramfs: Vec<PathBuf>,
    /// Map the kernel instead of copying it (the initramfs is always copied).
    pub map_boot_files: bool,
    /// Advise guest RAM for transparent huge pages.
    pub huge_pages: bool,
    /// Caller's part of the command line.
    pub cmdline: String,
    /// A virtio-rng device.
    pub rng: bool,
    /// A virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// virtio-fs shares.
    pub fs: Vec<FsConfig>,
    /// virtio-net NICs, each with its address settled.
    pub net: Vec<NicResources>,
    /// The snapshot directory to start from instead of booting.
    pub restore: Option<PathBuf>,
}

/// A validated NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicResources {
    /// Its TAP device.
    pub tap: TapSource,
    /// The guest's address.
    pub mac: MacAddr,
}

/// Most NICs per VM.
pub const MAX_NICS: usize = 8;

impl VmResources {
    /// Checks everything that can be checked before touching KVM.
    pub fn validate(config: &VmConfig, limits: HostLimits) -> Result<Self, ConfigError> {
        if config.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if config.vcpus > limits.max_vcpus {
            return Err(ConfigError::TooManyVcpus {
                requested: config.vcpus,
                max: limits.max_vcpus,
            });
        }
        if config.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemTooSmall(config.mem_mib));
        }
        if config.mem_mib > limits.max_mem_mib {
            return Err(ConfigError::MemTooLarge {
                requested: config.mem_mib,
                max: limits.max_mem_mib,
            });
        }
        if config.cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        if config.cmdline.len() >= MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong {
                len: config.cmdline.len(),
                max: MAX_CMDLINE_LEN - 1,
            });
        }
        let kernel_format = match &config.restore {
            // The snapshot is checked when it is read.
            Some(_) => None,
            None => {
                let format = detect_kernel_format(&config.kernel)?;
                for initramfs in &config.initramfs {
                    File::open(initramfs).map_err(|source| ConfigError::Unreadable {
                        what: "initramfs",
                        path: initramfs.clone(),
                        source,
                    })?;
                }
                Some(format)
            }
        };
        if let Some(vsock) = &config.vsock {
            validate_vsock(vsock)?;
        }
        for (i, share) in config.fs.iter().enumerate() {
            validate_share(share, &config.fs[..i])?;
        }
        let net = validate_nics(&config.net)?;
        Ok(VmResources {
            vcpus: config.vcpus,
            mem_bytes: config.mem_mib << 20,
            kernel: config.kernel.clone(),
            kernel_format,
            initramfs: config.initramfs.clone(),
            map_boot_files: config.map_boot_files,
            huge_pages: config.huge_pages,
            cmdline: config.cmdline.clone(),
            rng: config.rng,
            vsock: config.vsock.clone(),
            fs: config.fs.clone(),
            net,
            restore: config.restore.clone(),
        })
    }
}

fn nic_name(tap: &TapSource) -> String {
    match tap {
        TapSource::Name(n) => format!("tap={n}"),
        TapSource::Fd(fd) => format!("fd={fd}"),
    }
}

fn validate_nics(nics: &[NetConfig]) -> Result<Vec<NicResources>, ConfigError> {
    let mut out: Vec<NicResources> = Vec::with_capacity(nics.len());
    for nic in nics {
        let bad = |why: &str| ConfigError::Nic {
            nic: nic_name(&nic.tap),
            why: why.to_owned(),
        };
        if out.len() == MAX_NICS {
            return Err(bad(&format!("at most {MAX_NICS} NICs per VM")));
        }
        match &nic.tap {
            TapSource::Name(name) => {
                let valid = (1..=crate::devices::virtio::net::tap::MAX_NAME).contains(&name.len())
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !valid {
                    return Err(bad(
                        "an interface name is 1 to 15 letters, digits, '-', '_' or '.'",
                    ));
                }
            }
            TapSource::Fd(fd) => {
                // SAFETY: F_GETFD only reads the descriptor's flags.
                if *fd < 3 || unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                    return Err(bad("not an open file descriptor (3 or above)"));
                }
            }
        }
        if out.iter().any(|o| o.tap == nic.tap) {
            return Err(bad("the same TAP is given twice"));
        }
        let mac = match nic.mac {
            Some(mac) if !mac.is_unicast() || mac.0 == [0; 6] => {
                return Err(bad(&format!("{mac} is not a unicast address")));
            }
            Some(mac) => mac,
            None => MacAddr::random().map_err(|e| bad(&format!("no random MAC: {e}")))?,
        };
        if out.iter().any(|o| o.mac == mac) {
            return Err(bad(&format!("MAC {mac} is used twice")));
        }
        out.push(NicResources {
            tap: nic.tap.clone(),
            mac,
        });
    }
    Ok(out)
}

fn validate_share(share: &FsConfig, earlier: &[FsConfig]) -> Result<(), ConfigError> {
    let bad = |why| ConfigError::FsShare {
        tag: share.tag.clone(),
        path: share.path.clone(),
        why,
    };
    if share.tag.is_empty() || share.tag.len() > crate::devices::virtio::fs::TAG_LEN {
        return Err(bad("the tag must be 1 to 36 bytes"));
    }
    if share.tag.contains(['\0', ',', ' ']) {
        return Err(bad("the tag must not contain NUL, comma or space"));
    }
    if earlier.iter().any(|s| s.tag == share.tag) {
        return Err(bad("the tag is used twice"));
    }
    if !share.path.is_dir() {
        return Err(bad("not a directory"));
    }
    Ok(())
}

fn validate_vsock(vsock: &VsockConfig) -> Result<(), ConfigError> {
    if vsock.guest_cid <= 2 || vsock.guest_cid == u32::MAX {
        return Err(ConfigError::VsockCid(vsock.guest_cid));
    }
    let bad = |why| ConfigError::VsockPath {
        path: vsock.uds_path.clone(),
        why,
    };
    // Any directory depth works (see `unix_path`); the name must leave
    // room for `_<port>` suffixes.
    if vsock
        .uds_path
        .file_name()
        .is_some_and(|n| n.len() > MAX_SOCKET_NAME)
    {
        return Err(bad("file name too long for a Unix socket"));
    }
    if vsock.uds_path.symlink_metadata().is_ok() {
        return Err(bad("already exists"));
    }
    let parent = match vsock.uds_path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => return Err(bad("not a file path")),
    };
    if !parent.is_dir() {
        return Err(bad("its directory does not exist"));
    }
    Ok(())
}

/// ELF magic at offset 0; bzImage: "HdrS" at 0x202 of the setup header.
fn detect_kernel_format(path: &Path) -> Result<KernelFormat, ConfigError> {
    let unreadable = |source| ConfigError::Unreadable {
        what: "kernel",
        path: path.to_owned(),
        source,
    };
    let mut head = Vec::with_capacity(0x206);
    File::open(path)
        .and_then(|f| f.take(0x206).read_to_end(&mut head))
        .map_err(unreadable)?;
    if head.starts_with(b"\x7fELF") {
        Ok(KernelFormat::Elf)
    } else if head.len() >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        Ok(KernelFormat::BzImage)
    } else {
        Err(ConfigError::UnknownKernelFormat(path.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LIMITS: HostLimits = HostLimits {
        max_vcpus: 8,
        max_mem_mib: 4096,
    };

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn elf() -> tempfile::NamedTempFile {
        file_with(b"\x7fELF\x02\x01\x01")
    }

    fn config(kernel: &Path) -> VmConfig {
        VmConfig {
            vcpus: 1,
            mem_mib: 128,
            kernel: kernel.to_owned(),
            initramfs: Vec::new(),
            map_boot_files: false,
            huge_pages: true,
            cmdline: "quiet".into(),
            rng: false,
            vsock: None,
            fs: Vec::new(),
            net: Vec::new(),
            restore: None,
        }
    }

    #[test]
    fn nics_need_a_valid_tap_and_unique_unicast_macs() {
        let k = elf();
        let mut c = config(k.path());
        let nic = |s: &str| s.parse::<NetConfig>().unwrap();
        c.net = vec![nic("tap=rvm0,mac=02:00:00:00:00:01"), nic("tap=rvm1")];
        let r = VmResources::validate(&c, LIMITS).unwrap();
        assert_eq!(r.net[0].mac.to_string(), "02:00:00:00:00:01");
        assert!(r.net[1].mac.is_unicast(), "a random address is made up");
        let cases = [
            (vec![nic("tap=a/b")], "interface name"),
            (
                vec![nic(&format!("tap={}", "x".repeat(16)))],
                "interface name",
            ),
            (vec![nic("fd=1")], "not an open file descriptor"),
            (vec![nic("fd=99999")], "not an open file descriptor"),
            (vec![nic("tap=t0"), nic("tap=t0")], "twice"),
            (vec![nic("tap=t0,mac=01:00:00:00:00:01")], "unicast"),
            (
                vec![
                    nic("tap=t0,mac=02:00:00:00:00:01"),
                    nic("tap=t1,mac=02:00:00:00:00:01"),
                ],
                "used twice",
            ),
            (
                (0..9).map(|i| nic(&format!("tap=t{i}"))).collect(),
                "at most 8",
            ),
        ];
        for (net, why) in cases {
            c.net = net;
            let err = VmResources::validate(&c, LIMITS).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        for bad in [
            "",
            "tap=a,fd=3",
            "fd=x",
            "mac=02:00:00:00:00:01",
            "tap=a,mtu=9000",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_sane_config_validates() {
        let k = elf();
        let r = VmResources::validate(&config(k.path()), LIMITS).unwrap();
        assert_eq!(r.mem_bytes, 128 << 20);
        assert_eq!(r.kernel_format, Some(KernelFormat::Elf));
    }

    #[test]
    fn bzimage_is_detected_by_its_setup_header() {
        let mut img = vec![0u8; 0x300];
        img[0x202..0x206].copy_from_slice(b"HdrS");
        let k = file_with(&img);
        let r = VmResources::validate(&config(k.path()), LIMITS).unwrap();
        assert_eq!(r.kernel_format, Some(KernelFormat::BzImage));
    }

    #[test]
    fn vcpu_and_memory_bounds_are_enforced() {
        let k = elf();
        let mut c = config(k.path());
        c.vcpus = 0;
        assert!(matches!(
            VmResources::validate(&c, LIMITS),
            Err(ConfigError::NoVcpus)
        ));
        c.vcpus = 9;
        assert!(matches!(
            VmResources::validate(&c, LIMITS),
            Err(ConfigError::TooManyVcpus {
                requested: 9,
                max: 8
            })
        ));
        c.vcpus = 8;
        c.mem_mib = 0;
        assert!(matches!(
            VmResources::validate(&c, LIMITS),
            Err(ConfigError::MemTooSmall(0))
        ));
        c.mem_mib = 4097;
        assert!(matches!(
            VmResources::validate(&c, LIMITS),
            Err(ConfigError::MemTooLarge { .. })
        ));
    }

    #[test]
    fn bad_kernels_are_reported_with_their_path() {
        let missing = config(Path::new("/nonexistent/vmlinux"));
        let err = VmResources::validate(&missing, LIMITS).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
        let text = file_with(b"#!/bin/sh\necho not a kernel\n");
        assert!(matches!(
            VmResources::validate(&config(text.path()), LIMITS),
            Err(ConfigError::UnknownKernelFormat(_))
        ));
    }

    #[test]
    fn command_line_limits() {
        let k = elf();
        let mut c = config(k.path());
        c.cmdline = "x".repeat(MAX_CMDLINE_LEN - 1);
        assert!(VmResources::validate(&c, LIMITS).is_ok());
        c.cmdline.push('x');
        assert!(matches!(
            VmResources::validate(&c, LIMITS),
            Err(ConfigError::CmdlineTooLong { .. })
        ));
        c.cmdline = "a\0b".into();
        assert!(matches!(
            VmResources::validate(&c, LIMITS),
            Err(ConfigError::CmdlineNul)
        ));
    }

    #[test]
    fn vsock_cid_and_socket_path_are_checked() {
        let k = elf();
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(k.path());
        let vsock = |cid, path: PathBuf| {
            Some(VsockConfig {
                guest_cid: cid,
                uds_path: path,
            })
        };
        c.vsock = vsock(3, dir.path().join("v.sock"));
        assert!(VmResources::validate(&c, LIMITS).is_ok());
        for cid in [0, 1, 2, u32::MAX] {
            c.vsock = vsock(cid, dir.path().join("v.sock"));
            assert!(matches!(
                VmResources::validate(&c, LIMITS),
                Err(ConfigError::VsockCid(_))
            ));
        }
        let cases = [
            (dir.path().to_owned(), "already exists"),
            (dir.path().join("missing/v.sock"), "does not exist"),
            (dir.path().join("x".repeat(100)), "too long"),
        ];
        for (path, why) in cases {
            c.vsock = vsock(3, path);
            let err = VmResources::validate(&c, LIMITS).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn fs_shares_need_a_directory_and_a_unique_short_tag() {
        let k = elf();
        let dir = tempfile::tempdir().unwrap();
        let share = |tag: &str, path: &Path| FsConfig {
            tag: tag.into(),
            path: path.to_owned(),
            read_only: false,
            cache: Default::default(),
        };
        let mut c = config(k.path());
        c.fs = vec![share("root", dir.path()), share("data", dir.path())];
        assert!(VmResources::validate(&c, LIMITS).is_ok());
        let cases = [
            (vec![share("", dir.path())], "1 to 36"),
            (vec![share(&"t".repeat(37), dir.path())], "1 to 36"),
            (vec![share("a b", dir.path())], "must not contain"),
            (
                vec![share("x", dir.path()), share("x", dir.path())],
                "used twice",
            ),
            (
                vec![share("x", &dir.path().join("missing"))],
                "not a directory",
            ),
        ];
        for (shares, why) in cases {
            c.fs = shares;
            let err = VmResources::validate(&c, LIMITS).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn share_options_parse() {
        let s: FsConfig = "tag=root,path=/srv/a,ro,cache=always".parse().unwrap();
        assert_eq!((s.tag.as_str(), s.read_only), ("root", true));
        assert_eq!(s.path, Path::new("/srv/a"));
        assert_eq!(s.cache, crate::config::CacheMode::Always);
        let s: FsConfig = "path=/x,tag=t".parse().unwrap();
        assert!(!s.read_only);
        for bad in [
            "path=/x",
            "tag=t",
            "tag=t,path=/x,cache=maybe",
            "tag=t,path=/x,rx",
        ] {
            assert!(bad.parse::<FsConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_initramfs_is_rejected() {
        let k = elf();
        let mut c = config(k.path());
        c.initramfs = vec!["/nonexistent/initrd".into()];
        let err = VmResources::validate(&c, LIMITS).unwrap_err();
        assert!(err.to_string().contains("initramfs"), "{err}");
    }
}
