//! The spec's `linux.devices`, made by the container's init between fork
//! and exec in the container's mount namespace (on its `/dev` tmpfs, see
//! `mount_ns`): each is the guest kernel's device of that number. A node
//! that is already there is left as it is, as runc leaves it.
//!
//! Checked and converted in the parent ([`DeviceNodes::new`]); the child
//! only makes system calls.

use std::ffi::CString;
use std::io;

use runvm_protocol::GuestDevice;

use crate::os_err::os_err;

struct Node {
    path: CString,
    /// Directories above it, outermost first, made when missing.
    parents: Vec<CString>,
    kind: libc::mode_t,
    perm: libc::mode_t,
    dev: libc::dev_t,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

/// The device nodes to make, ready for the child.
#[derive(Default)]
pub struct DeviceNodes {
    nodes: Vec<Node>,
}

impl std::fmt::Debug for DeviceNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.nodes.iter().map(|n| &n.path))
            .finish()
    }
}

impl DeviceNodes {
    /// Checks `devices` (the host did too).
    pub fn new(devices: &[GuestDevice]) -> io::Result<Self> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        let cstring =
            |s: &str| CString::new(s).map_err(|_| invalid(format!("NUL byte in device {s:?}")));
        let mut nodes = Vec::with_capacity(devices.len());
        for d in devices {
            let p = d.path.as_str();
            if !runvm_protocol::is_container_path(p) || p.ends_with('/') {
                return Err(invalid(format!(
                    "device {p:?} is not an absolute path without '..' or NUL bytes"
                )));
            }
            let kind = match d.kind {
                'c' => libc::S_IFCHR,
                'b' => libc::S_IFBLK,
                'p' => libc::S_IFIFO,
                other => return Err(invalid(format!("device {p}: unknown type {other:?}"))),
            };
            let perm = d.mode.unwrap_or(0o666);
            if perm > 0o7777 {
                return Err(invalid(format!("device {p}: mode {perm:o} is not a mode")));
            }
            let mut parents = Vec::new();
            let mut at = 0;
            while let Some(i) = p[at + 1..].find('/') {
                at += 1 + i;
                parents.push(cstring(&p[..at])?);
            }
            nodes.push(Node {
                path: cstring(p)?,
                parents,
                kind,
                perm,
                dev: libc::makedev(d.major, d.minor),
                uid: d.uid,
                gid: d.gid,
            });
        }
        Ok(DeviceNodes { nodes })
    }

    /// Whether there is nothing to make.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Runs in the child, in the container's mount namespace and still
    /// privileged: system calls only.
    pub fn apply(&self) -> io::Result<()> {
        for n in &self.nodes {
            for dir in &n.parents {
                // SAFETY: mkdir reads the NUL-terminated path only.
                let rc = unsafe { libc::mkdir(dir.as_ptr(), 0o755) };
                if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                    return Err(io::Error::last_os_error());
                }
            }
            // SAFETY: mknod reads the NUL-terminated path only.
            let rc = unsafe { libc::mknod(n.path.as_ptr(), n.kind | n.perm, n.dev) };
            if rc < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EEXIST) {
                    continue;
                }
                return Err(io::Error::last_os_error());
            }
            // mknod's mode went through the umask; the spec's is exact.
            // SAFETY: chmod and chown read the NUL-terminated path only.
            os_err(unsafe { libc::chmod(n.path.as_ptr(), n.perm) })?;
            // SAFETY: as above.
            os_err(unsafe { libc::chown(n.path.as_ptr(), n.uid, n.gid) })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    fn dev(path: &str, kind: char, mode: Option<u32>) -> GuestDevice {
        GuestDevice {
            path: path.into(),
            kind,
            major: 1,
            minor: 3,
            mode,
            ..Default::default()
        }
    }

    #[test]
    fn bad_devices_are_refused_in_the_parent() {
        for (d, why) in [
            (dev("dev/x", 'c', None), "absolute"),
            (dev("/dev/../x", 'c', None), "absolute"),
            (dev("/dev/x/", 'c', None), "absolute"),
            (dev("/dev/x", 'z', None), "unknown type"),
            (dev("/dev/x", 'c', Some(0o17777)), "not a mode"),
            (dev("/dev/a\0b", 'c', None), "NUL"),
        ] {
            let e = DeviceNodes::new(std::slice::from_ref(&d)).unwrap_err();
            assert!(e.to_string().contains(why), "{d:?}: {e}");
        }
        let ok = DeviceNodes::new(&[dev("/dev/a/b/c", 'p', None)]).unwrap();
        assert_eq!(ok.nodes[0].parents, [c"/dev", c"/dev/a", c"/dev/a/b"]);
    }

    /// FIFOs need no privilege: made with their parents and exact mode,
    /// and one already there is left alone.
    #[test]
    fn nodes_are_made_with_their_directories_and_exact_modes() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| format!("{}/{n}", dir.path().display());
        std::fs::write(p("taken"), "mine").unwrap();
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let mut fifo = dev(&p("sub/dir/fifo"), 'p', Some(0o640));
        (fifo.uid, fifo.gid) = (uid, gid);
        let mut taken = dev(&p("taken"), 'p', None);
        (taken.uid, taken.gid) = (uid, gid);
        DeviceNodes::new(&[fifo, taken]).unwrap().apply().unwrap();
        let meta = std::fs::metadata(p("sub/dir/fifo")).unwrap();
        assert!(meta.file_type().is_fifo());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        assert_eq!((meta.uid(), meta.gid()), (uid, gid));
        assert_eq!(std::fs::read_to_string(p("taken")).unwrap(), "mine");
    }
}
