//! The container's mount namespace: the rootfs is its `/` (pivot_root, old
//! root detached), so container processes cannot reach the agent's files
//! the way a chroot could be escaped. A small holder process (the agent
//! binary in `--hold-mount-ns` mode) keeps the namespace alive; processes
//! join it with setns between fork and exec.

use std::io::{self, BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use nix::mount::{mount, MsFlags};
use runvm_protocol::GuestMount;

use crate::mount_sys::{Linux, MountSys};

/// A live container mount namespace.
#[derive(Debug)]
pub struct MountNs {
    fd: OwnedFd,
    /// The holder's cgroup namespace (rooted at the container's cgroup),
    /// when there is a container cgroup.
    cgroup_ns: Option<OwnedFd>,
    _holder: Child,
    // The holder exits when this closes (the agent went away).
    _keepalive: Option<ChildStdin>,
}

impl MountNs {
    /// Creates the namespace with `rootfs` (already mounted, with its
    /// pseudo filesystems) as its root and `mounts` mounted in it.
    pub fn create(rootfs: &Path, mounts: &[GuestMount]) -> io::Result<Self> {
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg("--hold-mount-ns").arg(rootfs);
        if !mounts.is_empty() {
            cmd.arg(serde_json::to_string(mounts).map_err(io::Error::other)?);
        }
        let mut holder = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        let mut line = String::new();
        if let Some(out) = holder.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        if line.trim() != "ready" {
            let _ = holder.kill();
            return Err(io::Error::other("the mount namespace holder failed"));
        }
        let fd = std::fs::File::open(format!("/proc/{}/ns/mnt", holder.id()))?;
        let own_cgroup_ns = std::fs::read_link("/proc/self/ns/cgroup").ok();
        let cgroup_ns = match std::fs::read_link(format!("/proc/{}/ns/cgroup", holder.id())) {
            Ok(ns) if Some(&ns) != own_cgroup_ns.as_ref() => {
                Some(std::fs::File::open(format!("/proc/{}/ns/cgroup", holder.id()))?.into())
            }
            _ => None,
        };
        Ok(MountNs {
            fd: fd.into(),
            cgroup_ns,
            _keepalive: holder.stdin.take(),
            _holder: holder,
        })
    }

    /// The namespace, for setns.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The container's cgroup namespace, for setns.
    pub fn cgroup_ns(&self) -> Option<&OwnedFd> {
        self.cgroup_ns.as_ref()
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

/// `--hold-mount-ns ROOTFS [MOUNTS]`: sets up the namespace, says `ready`,
/// and waits until its stdin closes. Where the container has a cgroup, the
/// holder first enters a cgroup namespace rooted there, so a `cgroup2`
/// mount in `MOUNTS` shows the container its own cgroup.
pub fn hold(rootfs: &Path, mounts: &[GuestMount]) -> Result<(), String> {
    let cgroup = Path::new(crate::cgroup::HIERARCHY).join(crate::cgroup::CONTAINER);
    if cgroup.is_dir() {
        crate::cgroup::enter_namespace_at(&cgroup)?;
    }
    setup(&mut Linux::new(), rootfs, mounts)?;
    println!("ready");
    let mut sink = String::new();
    while io::stdin()
        .read_line(&mut sink)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
    Ok(())
}

/// A checked mount: its destination and flags.
struct Checked<'a> {
    m: &'a GuestMount,
    dest: &'a str,
    flags: MsFlags,
}

/// Makes this process's new mount namespace: `rootfs` as `/` with the old
/// root detached, and `mounts` in it. Every mount is checked before the
/// first system call.
pub fn setup(sys: &mut dyn MountSys, rootfs: &Path, mounts: &[GuestMount]) -> Result<(), String> {
    let mut checked = Vec::new();
    for m in mounts {
        let mut flags = MsFlags::empty();
        for f in &m.flags {
            flags |= flag(f)?;
        }
        checked.push(Checked {
            m,
            dest: destination(m)?,
            flags,
        });
    }
    let root = rootfs
        .to_str()
        .ok_or_else(|| format!("rootfs path {} is not UTF-8", rootfs.display()))?;
    sys.unshare_mount_ns()
        .map_err(|e| format!("unshare: {e}"))?;
    // Nothing done here may propagate back to the agent's namespace.
    sys.mount(None, "/", None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)
        .map_err(|e| format!("make / private: {e}"))?;
    sys.mount(
        Some(root),
        root,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .map_err(|e| format!("bind the rootfs: {e}"))?;
    container_dev(sys, root)?;
    // Copied files are bound while the agent's copies are still in view;
    // their destinations resolve inside the rootfs all the same (those
    // under /dev, as Kubernetes' /dev/termination-log, on its new tmpfs).
    let (files, others): (Vec<_>, Vec<_>) = checked.iter().partition(|c| c.m.fstype == "file");
    for c in &files {
        sys.bind_copied_file(rootfs, c.m)?;
    }
    sys.chdir(root).map_err(|e| format!("chdir rootfs: {e}"))?;
    sys.pivot_root_here()
        .map_err(|e| format!("pivot_root: {e}"))?;
    sys.umount_detach(".")
        .map_err(|e| format!("detach the old root: {e}"))?;
    sys.chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    // Only now, with the container's root as `/` and the old root gone, do
    // destinations resolve: a symlink in the rootfs cannot lead outside it.
    for c in &others {
        sys.mkdir_all(c.dest)
            .map_err(|e| format!("mount point {}: {e}", c.dest))?;
        let data = (!c.m.data.is_empty()).then_some(c.m.data.as_str());
        sys.mount(
            Some(c.m.source.as_str()),
            c.dest,
            Some(c.m.fstype.as_str()),
            c.flags,
            data,
        )
        .map_err(|e| format!("mount {} {} on {}: {e}", c.m.fstype, c.m.source, c.dest))?;
    }
    for c in files
        .iter()
        .filter(|c| c.flags.contains(MsFlags::MS_RDONLY))
    {
        let flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
        sys.mount(None, c.dest, None, flags, None)
            .map_err(|e| format!("make {} read-only: {e}", c.dest))?;
    }
    Ok(())
}

/// The character devices every container gets, as under runc:
/// (name, major, minor). `ptmx` is the device, not runc's link into a
/// devpts of the container's own: opened, it allocates from the devpts
/// beside it, the guest's (see [`container_dev`]), where the agent opens
/// container terminals.
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
    ("ptmx", 5, 2),
];

/// The links every container's /dev has: (name, target).
const DEV_LINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// The container's `/dev` (below `root`, before the pivot, while the
/// guest's /dev is still in view): a tmpfs with [`DEVICES`] and
/// [`DEV_LINKS`], and the guest's `/dev/pts` and `/dev/shm` bound into it.
/// Not the guest's own devices: its serial console, vsock, entropy source
/// and kernel log stay the agent's, as a host's stay the host's under runc.
fn container_dev(sys: &mut dyn MountSys, root: &str) -> Result<(), String> {
    let dev = format!("{root}/dev");
    sys.mkdir_all(&dev)
        .map_err(|e| format!("mkdir /dev: {e}"))?;
    sys.mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
        Some("mode=755,size=65536k"),
    )
    .map_err(|e| format!("mount tmpfs on /dev: {e}"))?;
    for &(name, major, minor) in DEVICES {
        sys.mknod_char(&format!("{dev}/{name}"), 0o666, major, minor)
            .map_err(|e| format!("mknod /dev/{name}: {e}"))?;
    }
    for &(name, target) in DEV_LINKS {
        sys.symlink(target, &format!("{dev}/{name}"))
            .map_err(|e| format!("symlink /dev/{name}: {e}"))?;
    }
    for name in ["pts", "shm"] {
        let target = format!("{dev}/{name}");
        sys.mkdir_all(&target)
            .map_err(|e| format!("mkdir /dev/{name}: {e}"))?;
        sys.mount(
            Some(&format!("/dev/{name}")),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )
        .map_err(|e| format!("bind /dev/{name}: {e}"))?;
    }
    Ok(())
}

/// Where the agent keeps the files `file` mounts copy in (the Nth is `N`).
pub const COPIED_FILES: &str = "/run/runvm-files";

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `path` below `root` as if `root` were `/` (openat2 with
/// RESOLVE_IN_ROOT): symlinks and `..` in the container's rootfs cannot
/// lead out of it.
fn open_in_root(root: &OwnedFd, path: &str, flags: i32) -> io::Result<OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let c = std::ffi::CString::new(path).map_err(io::Error::other)?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 reads the path and an open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            std::ptr::from_ref(&how),
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens directory `rel` below `root` (as [`open_in_root`]), creating the
/// missing ones on the way (mode 0755), like `mkdir -p` in a chroot.
fn mkdir_in_root(root: &OwnedFd, rel: &str) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let mut dir = open_in_root(root, ".", libc::O_DIRECTORY)?;
    let mut sofar = String::new();
    for part in rel.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if !sofar.is_empty() {
            sofar.push('/');
        }
        sofar.push_str(part);
        match open_in_root(root, &sofar, libc::O_DIRECTORY) {
            Ok(d) => dir = d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let c = std::ffi::CString::new(part).map_err(io::Error::other)?;
                // SAFETY: mkdirat on a directory we hold, with a valid name.
                if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                dir = open_in_root(root, &sofar, libc::O_DIRECTORY)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(dir)
}

/// Binds the agent's copy of a host file onto `m`'s destination in the
/// rootfs, creating an empty file (and its directories) there first if
/// need be. The bind goes through /proc/self/fd, so what is mounted on is
/// exactly the file that was resolved inside the rootfs.
pub(crate) fn bind_copied_file(rootfs: &Path, m: &GuestMount) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let dest = destination(m)?;
    if m.source.is_empty() || !m.source.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad copied file {:?} for {dest}", m.source));
    }
    let source = format!("{COPIED_FILES}/{}", m.source);
    let root: OwnedFd = std::fs::File::open(rootfs)
        .map_err(|e| format!("open the rootfs: {e}"))?
        .into();
    let rel = dest.trim_start_matches('/');
    let target = match open_in_root(&root, rel, libc::O_PATH) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let (parent, name) = rel.rsplit_once('/').unwrap_or(("", rel));
            let dir =
                mkdir_in_root(&root, parent).map_err(|e| format!("mount point {dest}: {e}"))?;
            let c = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
            // SAFETY: openat on a directory we hold, with a valid name.
            let fd = unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_WRONLY
                        | libc::O_CLOEXEC,
                    0o644,
                )
            };
            if fd < 0 {
                return Err(format!(
                    "create mount point {dest}: {}",
                    io::Error::last_os_error()
                ));
            }
            // SAFETY: closing the descriptor openat just returned.
            unsafe { libc::close(fd) };
            open_in_root(&root, rel, libc::O_PATH)
                .map_err(|e| format!("mount point {dest}: {e}"))?
        }
        Err(e) => return Err(format!("mount point {dest}: {e}")),
    };
    let via = format!("/proc/self/fd/{}", target.as_raw_fd());
    mount(
        Some(source.as_str()),
        via.as_str(),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|e| format!("bind {source} on {dest}: {e}"))
}

/// The flags an OCI mount option names (`rw`, `suid` and the like clear
/// nothing that is set by default, so they map to no flag).
fn flag(name: &str) -> Result<MsFlags, String> {
    Ok(match name {
        "ro" => MsFlags::MS_RDONLY,
        "nosuid" => MsFlags::MS_NOSUID,
        "nodev" => MsFlags::MS_NODEV,
        "noexec" => MsFlags::MS_NOEXEC,
        "noatime" => MsFlags::MS_NOATIME,
        "nodiratime" => MsFlags::MS_NODIRATIME,
        "strictatime" => MsFlags::MS_STRICTATIME,
        "relatime" => MsFlags::MS_RELATIME,
        "sync" => MsFlags::MS_SYNCHRONOUS,
        "rw" | "suid" | "dev" | "exec" | "norelatime" | "async" => MsFlags::empty(),
        other => return Err(format!("unknown mount flag {other:?}")),
    })
}

/// Checks `m`'s destination: absolute, no `..` (the host checks too; the
/// agent trusts nothing it did not check).
fn destination(m: &GuestMount) -> Result<&str, String> {
    let d = m.destination.as_str();
    if !runvm_protocol::is_container_path(d) {
        return Err(format!("bad mount destination {d:?}"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(dest: &str) -> GuestMount {
        GuestMount {
            destination: dest.into(),
            fstype: "tmpfs".into(),
            source: "tmpfs".into(),
            flags: Vec::new(),
            data: String::new(),
        }
    }

    #[test]
    fn paths_resolve_inside_the_root_whatever_its_symlinks_say() {
        let dir = tempfile::tempdir().unwrap();
        let root_path = dir.path().join("root");
        std::fs::create_dir_all(root_path.join("etc")).unwrap();
        std::fs::write(root_path.join("etc/hosts"), "inside").unwrap();
        std::fs::write(dir.path().join("outside"), "outside").unwrap();
        std::os::unix::fs::symlink("/etc/hosts", root_path.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../outside", root_path.join("up")).unwrap();
        let root: OwnedFd = std::fs::File::open(&root_path).unwrap().into();
        let read = |p: &str| {
            let fd = open_in_root(&root, p, libc::O_RDONLY).map_err(|e| e.kind())?;
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text).unwrap();
            Ok::<_, io::ErrorKind>(text)
        };
        assert_eq!(read("etc/hosts").unwrap(), "inside");
        assert_eq!(
            read("abs").unwrap(),
            "inside",
            "an absolute link stays in the root"
        );
        assert_eq!(
            read("up"),
            Err(io::ErrorKind::NotFound),
            "`..` stops at the root"
        );
        assert_eq!(read("../outside"), Err(io::ErrorKind::NotFound));

        // Directories made on the way are made inside the root; a dangling
        // link on the way is refused rather than followed out.
        mkdir_in_root(&root, "new/a/b").unwrap();
        assert!(root_path.join("new/a/b").is_dir());
        std::os::unix::fs::symlink("/made-by-runvm-test", root_path.join("via")).unwrap();
        assert!(mkdir_in_root(&root, "via/a").is_err());
        assert!(!Path::new("/made-by-runvm-test").exists());
    }

    #[test]
    fn destinations_and_flags_are_checked() {
        assert!(destination(&m("/data")).is_ok());
        for bad in ["data", "/a/../etc", "/a\0b"] {
            assert!(destination(&m(bad)).is_err(), "{bad}");
        }
        assert_eq!(flag("ro").unwrap(), MsFlags::MS_RDONLY);
        assert_eq!(flag("rw").unwrap(), MsFlags::empty());
        assert!(flag("bogus").is_err());
    }

    use crate::mount_sys::Recorder;

    fn mount(dest: &str, fstype: &str, source: &str, flags: &[&str], data: &str) -> GuestMount {
        GuestMount {
            destination: dest.into(),
            fstype: fstype.into(),
            source: source.into(),
            flags: flags.iter().map(|f| f.to_string()).collect(),
            data: data.into(),
        }
    }

    #[test]
    fn the_namespace_pivots_into_the_rootfs_before_mounting_in_it() {
        let mounts = [
            mount("/run/data", "tmpfs", "tmpfs", &["nosuid", "ro"], "size=1m"),
            mount("/etc/hosts", "file", "0", &["ro"], ""),
            mount("/proc2", "proc", "proc", &[], ""),
            mount("/etc/motd", "file", "1", &[], ""),
        ];
        let mut sys = Recorder::default();
        setup(&mut sys, Path::new("/run/rootfs"), &mounts).unwrap();
        let f = |flags: MsFlags| format!("{flags:?}");
        assert_eq!(
            sys.calls,
            [
                "unshare mnt".to_string(),
                format!("mount - / - {}", f(MsFlags::MS_REC | MsFlags::MS_PRIVATE)),
                format!(
                    "mount /run/rootfs /run/rootfs - {}",
                    f(MsFlags::MS_BIND | MsFlags::MS_REC)
                ),
                "mkdir /run/rootfs/dev".into(),
                format!(
                    "mount tmpfs /run/rootfs/dev tmpfs {} mode=755,size=65536k",
                    f(MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME)
                ),
                "mknod /run/rootfs/dev/null c 1:3 666".into(),
                "mknod /run/rootfs/dev/zero c 1:5 666".into(),
                "mknod /run/rootfs/dev/full c 1:7 666".into(),
                "mknod /run/rootfs/dev/random c 1:8 666".into(),
                "mknod /run/rootfs/dev/urandom c 1:9 666".into(),
                "mknod /run/rootfs/dev/tty c 5:0 666".into(),
                "mknod /run/rootfs/dev/ptmx c 5:2 666".into(),
                "symlink /run/rootfs/dev/fd -> /proc/self/fd".into(),
                "symlink /run/rootfs/dev/stdin -> /proc/self/fd/0".into(),
                "symlink /run/rootfs/dev/stdout -> /proc/self/fd/1".into(),
                "symlink /run/rootfs/dev/stderr -> /proc/self/fd/2".into(),
                "mkdir /run/rootfs/dev/pts".into(),
                format!(
                    "mount /dev/pts /run/rootfs/dev/pts - {}",
                    f(MsFlags::MS_BIND)
                ),
                "mkdir /run/rootfs/dev/shm".into(),
                format!(
                    "mount /dev/shm /run/rootfs/dev/shm - {}",
                    f(MsFlags::MS_BIND)
                ),
                "bind-file /run/rootfs 0 /etc/hosts".into(),
                "bind-file /run/rootfs 1 /etc/motd".into(),
                "chdir /run/rootfs".into(),
                "pivot_root . .".into(),
                "umount-detach .".into(),
                "chdir /".into(),
                "mkdir /run/data".into(),
                format!(
                    "mount tmpfs /run/data tmpfs {} size=1m",
                    f(MsFlags::MS_NOSUID | MsFlags::MS_RDONLY)
                ),
                "mkdir /proc2".into(),
                format!("mount proc /proc2 proc {}", f(MsFlags::empty())),
                format!(
                    "mount - /etc/hosts - {}",
                    f(MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY)
                ),
            ]
        );
    }

    #[test]
    fn a_bad_mount_is_refused_before_anything_changes() {
        for bad in [
            mount("/ok", "tmpfs", "tmpfs", &["bogus"], ""),
            mount("relative", "tmpfs", "tmpfs", &[], ""),
            mount("/a/../../etc", "tmpfs", "tmpfs", &[], ""),
        ] {
            let mounts = [mount("/first", "tmpfs", "tmpfs", &[], ""), bad];
            let mut sys = Recorder::default();
            assert!(setup(&mut sys, Path::new("/r"), &mounts).is_err());
            assert!(sys.calls.is_empty(), "{:?}", sys.calls);
        }
    }

    #[test]
    fn a_failed_pivot_mounts_nothing_in_the_rootfs() {
        let mounts = [mount("/data", "tmpfs", "tmpfs", &[], "")];
        let mut sys = Recorder {
            fail_at: Some("pivot_root".into()),
            ..Default::default()
        };
        let e = setup(&mut sys, Path::new("/r"), &mounts).unwrap_err();
        assert!(e.starts_with("pivot_root"), "{e}");
        assert_eq!(sys.calls.last().unwrap(), "pivot_root . .");
        let mut sys = Recorder {
            fail_at: Some("mount tmpfs /data".into()),
            ..Default::default()
        };
        let e = setup(&mut sys, Path::new("/r"), &mounts).unwrap_err();
        assert_eq!(
            e,
            "mount tmpfs tmpfs on /data: EPERM: Operation not permitted"
        );
    }

    #[test]
    fn a_device_that_cannot_be_made_stops_the_setup_before_the_pivot() {
        let mut sys = Recorder {
            fail_at: Some("mknod /r/dev/tty ".into()),
            ..Default::default()
        };
        let e = setup(&mut sys, Path::new("/r"), &[]).unwrap_err();
        assert_eq!(e, "mknod /dev/tty: EPERM: Operation not permitted");
        assert!(!sys.calls.iter().any(|c| c.starts_with("pivot_root")));
    }
}
