//! The container's mount namespace: the rootfs is its `/` (pivot_root, old
//! root detached), so container processes cannot reach the agent's files
//! the way a chroot could be escaped. A small holder process (the agent
//! binary in `--hold-mount-ns` mode) keeps the namespace alive; processes
//! join it with setns between fork and exec.

use std::io::{self, BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// A live container mount namespace.
#[derive(Debug)]
pub struct MountNs {
    fd: OwnedFd,
    _holder: Child,
    // The holder exits when this closes (the agent went away).
    _keepalive: Option<ChildStdin>,
}

impl MountNs {
    /// Creates the namespace with `rootfs` (already mounted, with its
    /// pseudo filesystems) as its root.
    pub fn create(rootfs: &Path) -> io::Result<Self> {
        let mut holder = Command::new("/proc/self/exe")
            .arg("--hold-mount-ns")
            .arg(rootfs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        if let Some(out) = holder.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        if line.trim() != "ready" {
            let _ = holder.kill();
            return Err(io::Error::other("the mount namespace holder failed"));
        }
        let fd = std::fs::File::open(format!("/proc/{}/ns/mnt", holder.id()))?;
        Ok(MountNs {
            fd: fd.into(),
            _keepalive: holder.stdin.take(),
            _holder: holder,
        })
    }

    /// The namespace, for setns.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Whether process `pid` lives in this namespace (the holder aside).
    pub fn contains(&self, pid: i32) -> bool {
        let holder = self._holder.id() as i32;
        if pid == holder {
            return false;
        }
        let ns = |p: i32| std::fs::read_link(format!("/proc/{p}/ns/mnt")).ok();
        match (ns(pid), ns(holder)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }
}

/// `--hold-mount-ns ROOTFS`: sets up the namespace, says `ready`, and waits
/// until its stdin closes.
pub fn hold(rootfs: &Path) -> Result<(), String> {
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare: {e}"))?;
    // Nothing done here may propagate back to the agent's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("make / private: {e}"))?;
    mount(
        Some(rootfs),
        rootfs,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("bind the rootfs: {e}"))?;
    nix::unistd::chdir(rootfs).map_err(|e| format!("chdir rootfs: {e}"))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detach the old root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    println!("ready");
    let mut sink = String::new();
    while io::stdin()
        .read_line(&mut sink)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
    Ok(())
}
