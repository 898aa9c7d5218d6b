//! The mount-related system calls the agent makes while it sets up the
//! guest and the container's mount namespace, behind [`MountSys`] so the
//! order, flags and error handling of those steps are unit-tested without
//! privileges (the youki way); [`Linux`] makes the real calls.

use std::io;
use std::path::Path;

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use runvm_protocol::GuestMount;

use crate::read_ahead::BdiDir;

/// What mount setup asks of the system.
pub trait MountSys {
    /// `mkdir -p path`.
    fn mkdir_all(&mut self, path: &str) -> io::Result<()>;
    /// mount(2).
    fn mount(
        &mut self,
        source: Option<&str>,
        target: &str,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()>;
    /// umount2(2) with MNT_DETACH.
    fn umount_detach(&mut self, target: &str) -> nix::Result<()>;
    /// unshare(CLONE_NEWNS).
    fn unshare_mount_ns(&mut self) -> nix::Result<()>;
    /// chdir(2).
    fn chdir(&mut self, path: &str) -> nix::Result<()>;
    /// pivot_root(".", "."): the current directory becomes `/`, the old
    /// root stacked on it until detached.
    fn pivot_root_here(&mut self) -> nix::Result<()>;
    /// Binds the agent's copy of a host file onto `m`'s destination,
    /// resolved inside `rootfs` (see `mount_ns`).
    fn bind_copied_file(&mut self, rootfs: &Path, m: &GuestMount) -> Result<(), String>;
    /// mknod(2) of character device `major:minor` at `path`, with exactly
    /// the permissions `mode` (mknod's own mode passes through the umask).
    fn mknod_char(&mut self, path: &str, mode: u32, major: u64, minor: u64) -> nix::Result<()>;
    /// symlink(2): `path` points to `target`.
    fn symlink(&mut self, target: &str, path: &str) -> nix::Result<()>;
}

/// The real system calls. A virtio-fs mount also gets the read-ahead
/// window of [`crate::read_ahead`], through the backing-device directory
/// opened when this was made (where sysfs was mounted then).
#[derive(Debug)]
pub struct Linux {
    bdi: Option<BdiDir>,
}

impl Linux {
    /// The real calls; virtio-fs read-ahead is set where `/sys` is mounted now.
    pub fn new() -> Self {
        Linux {
            bdi: BdiDir::open(Path::new("/sys/class/bdi")).ok(),
        }
    }
}

impl Default for Linux {
    fn default() -> Self {
        Self::new()
    }
}

impl MountSys for Linux {
    fn mkdir_all(&mut self, path: &str) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn mount(
        &mut self,
        source: Option<&str>,
        target: &str,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()> {
        nix::mount::mount(source, target, fstype, flags, data)?;
        if fstype == Some("virtiofs") && !flags.contains(MsFlags::MS_REMOUNT) {
            // Only speed is at stake: a mount keeps the default window.
            let set = self.bdi.as_ref().map(|bdi| {
                bdi.set_for_mount(Path::new(target), runvm_protocol::VIRTIOFS_READ_AHEAD_KIB)
            });
            if let Some(Err(e)) = set {
                eprintln!("runvm-agent: read-ahead of {target}: {e}");
            }
        }
        Ok(())
    }

    fn umount_detach(&mut self, target: &str) -> nix::Result<()> {
        nix::mount::umount2(target, MntFlags::MNT_DETACH)
    }

    fn unshare_mount_ns(&mut self) -> nix::Result<()> {
        nix::sched::unshare(CloneFlags::CLONE_NEWNS)
    }

    fn chdir(&mut self, path: &str) -> nix::Result<()> {
        nix::unistd::chdir(path)
    }

    fn pivot_root_here(&mut self) -> nix::Result<()> {
        nix::unistd::pivot_root(".", ".")
    }

    fn bind_copied_file(&mut self, rootfs: &Path, m: &GuestMount) -> Result<(), String> {
        crate::mount_ns::bind_copied_file(rootfs, m)
    }

    fn mknod_char(&mut self, path: &str, mode: u32, major: u64, minor: u64) -> nix::Result<()> {
        use nix::sys::stat::{makedev, Mode, SFlag};
        let perm = Mode::from_bits_truncate(mode);
        nix::sys::stat::mknod(path, SFlag::S_IFCHR, perm, makedev(major, minor))?;
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            path,
            perm,
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
    }

    fn symlink(&mut self, target: &str, path: &str) -> nix::Result<()> {
        std::os::unix::fs::symlink(target, path)
            .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    }
}

/// A [`MountSys`] that records each call as a line and fails the call whose
/// line starts with `fail_at`, for tests of the steps' order and errors.
#[derive(Debug, Default)]
pub struct Recorder {
    /// The calls so far.
    pub calls: Vec<String>,
    /// Fail (EPERM) the first call whose line starts with this.
    pub fail_at: Option<String>,
}

impl Recorder {
    fn record(&mut self, line: String) -> nix::Result<()> {
        let fail = self.fail_at.as_ref().is_some_and(|f| line.starts_with(f));
        self.calls.push(line);
        if fail {
            self.fail_at = None;
            return Err(nix::errno::Errno::EPERM);
        }
        Ok(())
    }
}

impl MountSys for Recorder {
    fn mkdir_all(&mut self, path: &str) -> io::Result<()> {
        self.record(format!("mkdir {path}"))
            .map_err(io::Error::from)
    }

    fn mount(
        &mut self,
        source: Option<&str>,
        target: &str,
        fstype: Option<&str>,
        flags: MsFlags,
        data: Option<&str>,
    ) -> nix::Result<()> {
        self.record(format!(
            "mount {} {target} {} {flags:?}{}",
            source.unwrap_or("-"),
            fstype.unwrap_or("-"),
            data.map(|d| format!(" {d}")).unwrap_or_default()
        ))
    }

    fn umount_detach(&mut self, target: &str) -> nix::Result<()> {
        self.record(format!("umount-detach {target}"))
    }

    fn unshare_mount_ns(&mut self) -> nix::Result<()> {
        self.record("unshare mnt".into())
    }

    fn chdir(&mut self, path: &str) -> nix::Result<()> {
        self.record(format!("chdir {path}"))
    }

    fn pivot_root_here(&mut self) -> nix::Result<()> {
        self.record("pivot_root . .".into())
    }

    fn bind_copied_file(&mut self, rootfs: &Path, m: &GuestMount) -> Result<(), String> {
        self.record(format!(
            "bind-file {} {} {}",
            rootfs.display(),
            m.source,
            m.destination
        ))
        .map_err(|e| e.to_string())
    }

    fn mknod_char(&mut self, path: &str, mode: u32, major: u64, minor: u64) -> nix::Result<()> {
        self.record(format!("mknod {path} c {major}:{minor} {mode:o}"))
    }

    fn symlink(&mut self, target: &str, path: &str) -> nix::Result<()> {
        self.record(format!("symlink {path} -> {target}"))
    }
}
