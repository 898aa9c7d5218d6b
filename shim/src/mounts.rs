//! The OCI spec's `mounts` mapped onto a micro-VM: a bind mount of a host
//! directory becomes a virtio-fs share of its own (read-only with `ro`) that
//! the agent mounts at the destination; tmpfs and the kernel's pseudo
//! filesystems are mounted in the guest as the spec says; a bind mount of a
//! single small file copies it in. What cannot be mapped (a block device)
//! is reported.

use std::path::{Path, PathBuf};

use anyhow::bail;
use oci_spec::runtime::Mount;
use runvm_protocol::GuestMount;

/// A host directory shared with the guest for one bind mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The virtio-fs tag.
    pub tag: String,
    /// The host directory.
    pub path: PathBuf,
    /// Shared read-only.
    pub read_only: bool,
}

/// Largest file a bind mount of a single file copies into the guest.
pub const MAX_COPIED_FILE: u64 = 1 << 20;

/// What the VM needs for the spec's mounts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountPlan {
    /// Extra virtio-fs shares.
    pub shares: Vec<Share>,
    /// Files bound into the container, copied into the guest at create
    /// (mount source `N` is the Nth): sharing a file's directory would
    /// expose its siblings, so the guest gets a snapshot (as Kata does for
    /// /etc/hosts and the like).
    pub files: Vec<PathBuf>,
    /// What the agent mounts, in spec order.
    pub mounts: Vec<GuestMount>,
    /// Mounts left out (destination and why), for a warning.
    pub unsupported: Vec<String>,
}

/// Mount destinations the agent provides itself in every container.
const GUEST_PROVIDED: &[&str] = &[
    "/proc",
    "/dev",
    "/dev/pts",
    "/dev/shm",
    "/dev/mqueue",
    "/sys",
    "/tmp",
];

/// Where a container finds its cgroup.
const CGROUP_DIR: &str = "/sys/fs/cgroup";

/// Filesystems the guest kernel mounts itself (no host source).
const GUEST_FILESYSTEMS: &[&str] = &["tmpfs", "proc", "sysfs", "mqueue", "devpts"];

/// Options that are mount flags (the agent maps them); the rest is data.
const FLAG_OPTIONS: &[&str] = &[
    "ro",
    "rw",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "relatime",
    "norelatime",
    "strictatime",
    "noatime",
    "nodiratime",
    "sync",
    "async",
];

/// Options that only say how to bind or propagate: the share does that.
const BIND_OPTIONS: &[&str] = &[
    "bind",
    "rbind",
    "private",
    "rprivate",
    "slave",
    "rslave",
    "shared",
    "rshared",
    "unbindable",
    "runbindable",
];

/// The mount options runvm understands (for `runvm features`); others are
/// passed to the filesystem as data.
pub fn known_options() -> Vec<&'static str> {
    FLAG_OPTIONS.iter().chain(BIND_OPTIONS).copied().collect()
}

/// Maps `mounts` (relative sources resolve against `bundle`).
pub fn plan(bundle: &Path, mounts: &[Mount]) -> anyhow::Result<MountPlan> {
    let mut plan = MountPlan::default();
    for m in mounts {
        let dest = m.destination().to_str().unwrap_or("");
        if GUEST_PROVIDED.contains(&dest) {
            continue;
        }
        check_destination(dest)?;
        let options = m.options().clone().unwrap_or_default();
        let fstype = m.typ().clone().unwrap_or_else(|| "bind".into());
        // Whatever an engine mounts there (a cgroup mount, or with a host
        // cgroup namespace a bind of the host's hierarchy), the container
        // gets its own cgroup: the host's is never shared into a VM.
        let fstype = if dest == CGROUP_DIR {
            "cgroup2".to_string()
        } else {
            fstype
        };
        let bind = fstype != "cgroup2"
            && (fstype == "bind" || options.iter().any(|o| o == "bind" || o == "rbind"));
        let flags: Vec<String> = options
            .iter()
            .filter(|o| FLAG_OPTIONS.contains(&o.as_str()))
            .cloned()
            .collect();
        let data: Vec<&str> = options
            .iter()
            .map(String::as_str)
            .filter(|o| !FLAG_OPTIONS.contains(o) && !BIND_OPTIONS.contains(o))
            .collect();
        if bind {
            let Some(source) = m.source() else {
                bail!("bind mount {dest} has no source");
            };
            let source = bundle.join(source);
            if source.is_file() {
                let size = source.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
                if size > MAX_COPIED_FILE {
                    plan.unsupported.push(format!(
                        "{dest} (a bind mount of a file over {MAX_COPIED_FILE} bytes)"
                    ));
                    continue;
                }
                plan.mounts.push(GuestMount {
                    destination: dest.to_owned(),
                    fstype: "file".into(),
                    source: plan.files.len().to_string(),
                    flags,
                    data: String::new(),
                });
                plan.files.push(source);
                continue;
            }
            if !source.is_dir() {
                let why = if source.exists() {
                    "neither a directory nor a regular file"
                } else {
                    "its source does not exist"
                };
                plan.unsupported.push(format!("{dest} ({why})"));
                continue;
            }
            let tag = format!("m{}", plan.shares.len());
            plan.shares.push(Share {
                tag: tag.clone(),
                path: source,
                read_only: flags.iter().any(|f| f == "ro"),
            });
            plan.mounts.push(GuestMount {
                destination: dest.to_owned(),
                fstype: "virtiofs".into(),
                source: tag,
                flags,
                data: String::new(),
            });
        } else if fstype == "cgroup" || fstype == "cgroup2" {
            // The guest has only cgroup v2; mounted from the container's
            // cgroup namespace, it shows the container its own cgroup and
            // limits, as runc's does. v1 options (controller names) have
            // no meaning there.
            plan.mounts.push(GuestMount {
                destination: dest.to_owned(),
                source: "cgroup2".into(),
                fstype: "cgroup2".into(),
                flags,
                data: String::new(),
            });
        } else if GUEST_FILESYSTEMS.contains(&fstype.as_str()) {
            plan.mounts.push(GuestMount {
                destination: dest.to_owned(),
                source: fstype.clone(),
                fstype,
                flags,
                data: data.join(","),
            });
        } else {
            plan.unsupported.push(format!("{dest} ({fstype})"));
        }
    }
    Ok(plan)
}

/// An absolute path without `..`: the agent resolves it inside the
/// container's root, and refuses anything else too.
fn check_destination(dest: &str) -> anyhow::Result<()> {
    if !dest.starts_with('/') || dest.split('/').any(|c| c == "..") {
        bail!("mount destination {dest:?} must be an absolute path without '..'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(json: &str) -> Mount {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn binds_become_shares_and_the_rest_guest_mounts() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("vol")).unwrap();
        std::fs::write(dir.path().join("hosts"), "").unwrap();
        let mounts = [
            mount(r#"{"destination":"/proc","type":"proc","source":"proc"}"#),
            mount(
                r#"{"destination":"/data","type":"bind","source":"vol","options":["rbind","rw"]}"#,
            ),
            mount(r#"{"destination":"/ro","source":"vol","options":["bind","ro","nosuid"]}"#),
            mount(
                r#"{"destination":"/etc/hosts","type":"bind","source":"hosts","options":["bind"]}"#,
            ),
            mount(r#"{"destination":"/gone","type":"bind","source":"nope","options":["bind"]}"#),
            mount(
                r#"{"destination":"/scratch","type":"tmpfs","source":"tmpfs","options":["nosuid","size=1m","mode=1777"]}"#,
            ),
            mount(r#"{"destination":"/disk","type":"ext4","source":"/dev/sda1"}"#),
            mount(
                r#"{"destination":"/sys/fs/cgroup","type":"cgroup","source":"cgroup","options":["nosuid","noexec","nodev","relatime","ro"]}"#,
            ),
        ];
        let p = plan(dir.path(), &mounts).unwrap();
        assert_eq!(
            p.shares,
            [
                Share {
                    tag: "m0".into(),
                    path: dir.path().join("vol"),
                    read_only: false
                },
                Share {
                    tag: "m1".into(),
                    path: dir.path().join("vol"),
                    read_only: true
                },
            ]
        );
        let dests: Vec<&str> = p.mounts.iter().map(|m| m.destination.as_str()).collect();
        assert_eq!(
            dests,
            ["/data", "/ro", "/etc/hosts", "/scratch", "/sys/fs/cgroup"]
        );
        assert_eq!(p.mounts[1].flags, ["ro", "nosuid"]);
        assert_eq!(
            (p.mounts[2].fstype.as_str(), p.mounts[2].source.as_str()),
            ("file", "0")
        );
        assert_eq!(p.files, [dir.path().join("hosts")]);
        assert_eq!(p.mounts[3].fstype, "tmpfs");
        assert_eq!(p.mounts[3].data, "size=1m,mode=1777");
        let cgroup = &p.mounts[4];
        assert_eq!(
            (cgroup.fstype.as_str(), cgroup.source.as_str()),
            ("cgroup2", "cgroup2")
        );
        assert_eq!(
            cgroup.flags,
            ["nosuid", "noexec", "nodev", "relatime", "ro"]
        );
        assert_eq!(cgroup.data, "");
        assert_eq!(p.unsupported.len(), 2, "{:?}", p.unsupported);
        assert!(p.unsupported[0].contains("does not exist"));
        assert!(p.unsupported[1].contains("ext4"));
    }

    #[test]
    fn the_host_cgroup_hierarchy_is_never_shared() {
        let bind = mount(
            r#"{"destination":"/sys/fs/cgroup","type":"bind","source":"/sys/fs/cgroup","options":["rbind","nosuid","ro"]}"#,
        );
        let p = plan(Path::new("/"), &[bind]).unwrap();
        assert!(p.shares.is_empty(), "{:?}", p.shares);
        assert_eq!(p.mounts[0].fstype, "cgroup2");
        assert_eq!(p.mounts[0].flags, ["nosuid", "ro"]);
    }

    #[test]
    fn destinations_must_stay_absolute_and_without_dotdot() {
        for bad in ["data", "/a/../../etc", ".."] {
            let m = mount(&format!(
                r#"{{"destination":"{bad}","type":"tmpfs","source":"tmpfs"}}"#
            ));
            assert!(plan(Path::new("/"), &[m]).is_err(), "{bad}");
        }
    }
}
