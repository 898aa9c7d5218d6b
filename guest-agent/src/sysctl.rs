//! The spec's `linux.sysctl`, written in the guest. The guest kernel is
//! the container's alone, so unlike runc (which takes only keys of a
//! namespace the container has of its own) any key that kernel has is
//! allowed: `vm.max_map_count` for a search engine, `net.*` for the VM's
//! network. Keys of the IPC and UTS namespaces (`kernel.shm*`,
//! `kernel.msg*`, `kernel.sem`, `fs.mqueue.*`, `kernel.hostname`,
//! `kernel.domainname`) set the namespace of the thread that writes them,
//! so the agent writes those while it is in the container's new ones (see
//! `namespaces`), and the rest guest-wide.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// Where the guest's sysctls are.
const PROC_SYS: &str = "/proc/sys";

/// One checked sysctl.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    key: String,
    file: String,
    value: String,
}

/// The container's sysctls, checked against the guest kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sysctls {
    entries: Vec<Entry>,
}

/// Whether `file` (below /proc/sys) belongs to the IPC or UTS namespace.
fn per_namespace(file: &str) -> bool {
    matches!(
        file,
        "kernel/msgmax"
            | "kernel/msgmnb"
            | "kernel/msgmni"
            | "kernel/sem"
            | "kernel/shmall"
            | "kernel/shmmax"
            | "kernel/shmmni"
            | "kernel/shm_rmid_forced"
            | "kernel/hostname"
            | "kernel/domainname"
    ) || file.starts_with("fs/mqueue/")
}

impl Sysctls {
    /// Checks `map` (the host did too): names of files below `root` that
    /// exist there, one-line values.
    fn new_in(root: &Path, map: &BTreeMap<String, String>) -> io::Result<Self> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        let mut entries = Vec::with_capacity(map.len());
        for (key, value) in map {
            let file = runvm_protocol::sysctl_file(key)
                .ok_or_else(|| invalid(format!("sysctl {key:?} is not a sysctl name")))?;
            if value.contains(['\0', '\n']) {
                return Err(invalid(format!("sysctl {key}: the value is not one line")));
            }
            if !root.join(&file).is_file() {
                return Err(invalid(format!(
                    "sysctl {key}: the guest kernel has no such parameter"
                )));
            }
            entries.push(Entry {
                key: key.clone(),
                file,
                value: value.clone(),
            });
        }
        Ok(Sysctls { entries })
    }

    /// Checks `map` against the guest's /proc/sys: names of files there,
    /// one-line values.
    pub fn new(map: &BTreeMap<String, String>) -> io::Result<Self> {
        Self::new_in(Path::new(PROC_SYS), map)
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn write_in(&self, root: &Path, namespaced: bool) -> io::Result<()> {
        for e in self
            .entries
            .iter()
            .filter(|e| per_namespace(&e.file) == namespaced)
        {
            let path: PathBuf = root.join(&e.file);
            std::fs::write(&path, &e.value).map_err(|err| {
                io::Error::new(err.kind(), format!("sysctl {}={}: {err}", e.key, e.value))
            })?;
        }
        Ok(())
    }

    /// Writes the guest-wide ones.
    pub fn write_guest_wide(&self) -> io::Result<()> {
        self.write_in(Path::new(PROC_SYS), false)
    }

    /// Writes the IPC and UTS ones, into the namespaces the calling
    /// thread is in.
    pub fn write_per_namespace(&self) -> io::Result<()> {
        self.write_in(Path::new(PROC_SYS), true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for /proc/sys with the files the tests name.
    fn fake_proc_sys() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "vm/max_map_count",
            "kernel/shmmax",
            "fs/mqueue/msg_max",
            "net/ipv4/ip_forward",
        ] {
            let p = d.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "0\n").unwrap();
        }
        d
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn namespace_keys_are_written_apart_from_guest_wide_ones() {
        let root = fake_proc_sys();
        let r = root.path();
        let s = Sysctls::new_in(
            r,
            &map(&[
                ("vm.max_map_count", "262144"),
                ("kernel.shmmax", "4096"),
                ("fs.mqueue.msg_max", "20"),
                ("net/ipv4/ip_forward", "1"),
            ]),
        )
        .unwrap();
        let read = |f: &str| std::fs::read_to_string(r.join(f)).unwrap();
        s.write_in(r, false).unwrap();
        assert_eq!(read("vm/max_map_count"), "262144");
        assert_eq!(read("net/ipv4/ip_forward"), "1");
        assert_eq!(read("kernel/shmmax"), "0\n");
        s.write_in(r, true).unwrap();
        assert_eq!(read("kernel/shmmax"), "4096");
        assert_eq!(read("fs/mqueue/msg_max"), "20");
    }

    #[test]
    fn unknown_or_malformed_keys_and_multi_line_values_are_refused() {
        let root = fake_proc_sys();
        for (pairs, why) in [
            (&[("vm.no_such_knob", "1")][..], "no such parameter"),
            (&[("vm", "1")], "no such parameter"),
            (&[("../etc/passwd", "1")], "not a sysctl name"),
            (&[("vm.max_map_count", "1\n2")], "not one line"),
        ] {
            let e = Sysctls::new_in(root.path(), &map(pairs)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(e.to_string().contains(why), "{pairs:?}: {e}");
        }
        assert!(Sysctls::new_in(root.path(), &BTreeMap::new())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_write_the_kernel_refuses_names_the_key() {
        let root = fake_proc_sys();
        let s = Sysctls::new_in(root.path(), &map(&[("vm.max_map_count", "9")])).unwrap();
        std::fs::remove_file(root.path().join("vm/max_map_count")).unwrap();
        std::fs::create_dir(root.path().join("vm/max_map_count")).unwrap();
        let e = s.write_in(root.path(), false).unwrap_err();
        assert!(
            e.to_string().starts_with("sysctl vm.max_map_count=9: "),
            "{e}"
        );
    }
}
