//! What the container's init does to the container's mount namespace
//! between fork and exec: a /proc of its own PID namespace, and the spec's
//! masked and read-only paths over it (runc's defaults hide /proc/kcore
//! and /proc/keys and make /proc/sys read-only). It runs there because
//! only a process inside the new PID namespace can mount its /proc, and
//! the masks must lie over that /proc, not the one it replaces.
//!
//! Paths are checked and converted in the parent ([`PathRules::new`]);
//! the child only makes system calls.

use std::ffi::{CStr, CString};
use std::io;

use runvm_protocol::ContainerSetup;

use crate::os_err::os_err;

/// Replaces the container's /proc with one of the calling process's PID
/// namespace (the old one, with whatever lay over it, is detached).
pub fn remount_proc() -> io::Result<()> {
    // SAFETY: umount2 reads the NUL-terminated literal only.
    let rc = unsafe { libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH) };
    // EINVAL: nothing mounted there, which the mount below repairs.
    if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: mount reads the NUL-terminated literals only.
    os_err(unsafe {
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    })
}

/// The spec's masked and read-only paths, ready for the child.
#[derive(Debug, Default)]
pub struct PathRules {
    masked: Vec<CString>,
    readonly: Vec<CString>,
}

impl PathRules {
    /// Checks the paths (the host did too; the agent trusts nothing it
    /// did not check): absolute, no `..`, no NUL.
    pub fn new(setup: &ContainerSetup) -> io::Result<Self> {
        let convert = |list: &[String]| -> io::Result<Vec<CString>> {
            list.iter()
                .map(|p| {
                    if !runvm_protocol::is_container_path(p) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("{p:?} is not an absolute path without '..'"),
                        ));
                    }
                    CString::new(p.as_str()).map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidInput, format!("NUL byte in {p:?}"))
                    })
                })
                .collect()
        };
        Ok(PathRules {
            masked: convert(&setup.masked_paths)?,
            readonly: convert(&setup.readonly_paths)?,
        })
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.masked.is_empty() && self.readonly.is_empty()
    }

    /// Runs in the child, in the container's mount namespace: system
    /// calls only. Paths that do not exist are skipped, as runc does.
    pub fn apply(&self) -> io::Result<()> {
        for p in &self.masked {
            mask(p)?;
        }
        for p in &self.readonly {
            make_read_only(p)?;
        }
        Ok(())
    }
}

fn missing(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOENT)
}

/// An empty read-only tmpfs over a directory, /dev/null over anything else.
fn mask(path: &CStr) -> io::Result<()> {
    // SAFETY: an all-zero stat is a valid value for stat to fill in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is a valid stat buffer.
    if let Err(e) = os_err(unsafe { libc::stat(path.as_ptr(), &mut st) }) {
        return if missing(&e) { Ok(()) } else { Err(e) };
    }
    let rc = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        // SAFETY: mount reads NUL-terminated strings only.
        unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                path.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            )
        }
    } else {
        // SAFETY: as above.
        unsafe {
            libc::mount(
                c"/dev/null".as_ptr(),
                path.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        }
    };
    os_err(rc)
}

/// Binds `path` onto itself and remounts that read-only, keeping the
/// nosuid, nodev and noexec it had (a bind remount replaces them all).
fn make_read_only(path: &CStr) -> io::Result<()> {
    // SAFETY: mount reads NUL-terminated strings only.
    let bound = os_err(unsafe {
        libc::mount(
            path.as_ptr(),
            path.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    });
    if let Err(e) = bound {
        return if missing(&e) { Ok(()) } else { Err(e) };
    }
    // SAFETY: an all-zero statvfs is a valid value for statvfs to fill in.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is a valid statvfs buffer.
    // (glibc takes the flags from statfs(2), which has reported them since
    // Linux 2.6.36: no file is read.)
    os_err(unsafe { libc::statvfs(path.as_ptr(), &mut st) })?;
    // The ST_ flags are the MS_ flags' bits.
    let kept = st.f_flag & (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC);
    // SAFETY: as above.
    os_err(unsafe {
        libc::mount(
            std::ptr::null(),
            path.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | kept,
            std::ptr::null(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_in_the_parent() {
        let setup = |masked: &[&str], readonly: &[&str]| ContainerSetup {
            masked_paths: masked.iter().map(|s| s.to_string()).collect(),
            readonly_paths: readonly.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let rules = PathRules::new(&setup(&["/proc/kcore"], &["/proc/sys"])).unwrap();
        assert_eq!(rules.masked, [c"/proc/kcore"]);
        assert_eq!(rules.readonly, [c"/proc/sys"]);
        assert!(!rules.is_empty());
        assert!(PathRules::new(&setup(&[], &[])).unwrap().is_empty());
        for (m, r) in [
            (&["proc/kcore"][..], &[][..]),
            (&[], &["/proc/../etc"]),
            (&["/a\0b"], &[]),
        ] {
            let e = PathRules::new(&setup(m, r)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{m:?} {r:?}: {e}");
        }
    }

    /// In a child with a mount namespace of its own (a fork, so the test
    /// harness's namespace is untouched): a masked file reads empty, a
    /// masked directory lists nothing, a read-only one refuses writes, and
    /// missing paths are skipped.
    #[test]
    fn masks_and_read_only_paths_apply_in_a_mount_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("secret"), "s3cret").unwrap();
        std::fs::create_dir(d.join("hidden")).unwrap();
        std::fs::write(d.join("hidden/f"), "x").unwrap();
        std::fs::create_dir(d.join("ro")).unwrap();
        let p = |n: &str| d.join(n).to_str().unwrap().to_owned();
        let rules = PathRules::new(&ContainerSetup {
            masked_paths: vec![p("secret"), p("hidden"), p("absent")],
            readonly_paths: vec![p("ro"), p("absent-too")],
            ..Default::default()
        })
        .unwrap();
        let script = format!(
            "cat {s}; echo; ls -A {h} | wc -l; touch {ro}/x 2>/dev/null && echo writable || echo read-only",
            s = p("secret"),
            h = p("hidden"),
            ro = p("ro"),
        );
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", &script]);
        use std::os::unix::process::CommandExt;
        let hook = move || {
            // SAFETY: unshare takes flags only.
            os_err(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
            // SAFETY: mount reads the NUL-terminated literal only.
            os_err(unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                )
            })?;
            rules.apply()
        };
        // SAFETY: the hook makes system calls only, on prepared data.
        unsafe { cmd.pre_exec(hook) };
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "\n0\nread-only\n");
        // Outside the child nothing changed.
        assert_eq!(std::fs::read_to_string(d.join("secret")).unwrap(), "s3cret");
        std::fs::write(d.join("ro/x"), "").unwrap();
    }
}
