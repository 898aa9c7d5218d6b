//! The container's cgroup on the host. The monitor (the VMM, whose process
//! holds the guest's RAM) moves into the spec's `linux.cgroupsPath` as runc
//! moves the container's init there, so the engine's accounting (`podman
//! stats`, a kubelet's pod cgroups) and the limits of the cgroups above it
//! cover the VM. With a memory limit in the spec, the leaf's `memory.max` is
//! the guest's RAM plus [`VMM_OVERHEAD_MIB`]; the spec's CPU shares become its
//! `cpu.weight`. The CPU quota is enforced inside the guest (and sizes its
//! vCPUs), not on the host, where it would throttle the device threads too.
//! `runvm update` changes the weight with the guest's; the memory limit
//! stays, as the VM cannot grow past the size it booted with.
//!
//! A spec without `cgroupsPath` (`runc spec`'s) leaves the VM in the
//! caller's cgroup, where runc would make one named after the container:
//! engines always pass a path, and two scripts' containers of one ID under
//! different `--root`s must not share a cgroup.
//!
//! cgroup v2 only: on a host without a unified hierarchy (cgroup v1 or the
//! hybrid layout) the VM stays in the caller's cgroup, with a debug line.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

/// What the VMM itself may use beyond the guest's RAM in a memory-limited
/// cgroup: its own memory (about 3 MiB), the page cache its virtio-fs
/// server reads through, and a template's files while one is built.
pub const VMM_OVERHEAD_MIB: u64 = 64;
/// How long removing the cgroup waits for a monitor that is still exiting.
const REMOVE_WAIT: Duration = Duration::from_secs(2);

/// Limits for the host cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostLimits {
    /// `memory.max`, in bytes.
    pub memory_max: Option<u64>,
    /// `cpu.weight`.
    pub cpu_weight: Option<u64>,
}

impl HostLimits {
    /// The limits of a VM of `mem_mib` whose guest cgroup gets `guest`.
    pub fn for_vm(mem_mib: u64, guest: &runvm_protocol::Resources) -> Self {
        HostLimits {
            memory_max: guest
                .memory_max
                .filter(|&m| m > 0)
                .map(|_| (mem_mib + VMM_OVERHEAD_MIB) << 20),
            cpu_weight: guest.cpu_weight,
        }
    }
}

/// The cgroup v2 mount point, when the host's hierarchy is unified only
/// (`mountinfo`'s text): a cgroup2 mount and no cgroup v1 mount.
pub fn unified_root(mountinfo: &str) -> Option<PathBuf> {
    let mut v2 = None;
    for line in mountinfo.lines() {
        // Fields after " - " are the file system type and source.
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        match fstype {
            "cgroup" => return None,
            "cgroup2" if v2.is_none() => v2 = Some(PathBuf::from(unescape(mount_point))),
            _ => {}
        }
    }
    v2
}

/// `mountinfo` escapes spaces, tabs, newlines and backslashes as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(b) => {
                out.push(b as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// This process's cgroup v2 path from `/proc/self/cgroup`'s text.
pub fn own_cgroup(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Where the container's cgroup lies below the hierarchy's root, as runc
/// places it: an absolute `cgroupsPath` from the root, a relative one
/// below `own` (runvm's cgroup). The path is cleaned lexically first, so
/// `..` cannot climb out.
pub fn resolve(spec: &str, own: &str) -> anyhow::Result<PathBuf> {
    let cleaned = clean(spec);
    if cleaned.is_empty() {
        anyhow::bail!(
            "linux.cgroupsPath {spec:?} names no cgroup of its own (the root's, or runvm's)"
        );
    }
    let rel = if spec.starts_with('/') {
        cleaned
    } else {
        let mut base = clean(own);
        base.extend(cleaned);
        base
    };
    Ok(rel.iter().collect())
}

/// Components of `path` with `.`, empty ones and `..` resolved lexically,
/// never above the start.
fn clean(path: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Makes `root/rel` (and its parents), enables the controllers the limits
/// need on the way down where the parent has them, writes the limits and
/// moves this process in. A limit whose controller cannot be had is left
/// unset and returned, with why; failing to move in is an error.
pub fn join(root: &Path, rel: &Path, limits: &HostLimits) -> anyhow::Result<Vec<String>> {
    let leaf = root.join(rel);
    std::fs::create_dir_all(&leaf)
        .with_context(|| format!("cannot create the cgroup {}", leaf.display()))?;
    let mut unset = Vec::new();
    let wanted = [
        ("memory", "memory.max", limits.memory_max),
        ("cpu", "cpu.weight", limits.cpu_weight),
    ];
    for (controller, file, value) in wanted {
        let Some(value) = value else { continue };
        match enable_down(root, rel, controller)
            .and_then(|()| write(&leaf.join(file), &value.to_string()))
        {
            Ok(()) => {}
            Err(e) => unset.push(format!("{file} {value}: {e:#}")),
        }
    }
    write(&leaf.join("cgroup.procs"), "0")
        .with_context(|| format!("cannot move the container's VM into {}", leaf.display()))?;
    Ok(unset)
}

/// Enables `controller` in `subtree_control` from the root down to the
/// leaf's parent.
fn enable_down(root: &Path, rel: &Path, controller: &str) -> anyhow::Result<()> {
    let mut dir = root.to_path_buf();
    for c in rel.components() {
        let available = std::fs::read_to_string(dir.join("cgroup.controllers"))
            .with_context(|| format!("reading {}", dir.join("cgroup.controllers").display()))?;
        if !available.split_whitespace().any(|a| a == controller) {
            anyhow::bail!(
                "{} does not offer the {controller} controller",
                dir.display()
            );
        }
        let enabled =
            std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        if !enabled.split_whitespace().any(|a| a == controller) {
            write(
                &dir.join("cgroup.subtree_control"),
                &format!("+{controller}"),
            )?;
        }
        dir.push(c);
    }
    Ok(())
}

/// `runvm update`'s new CPU shares, as the weight of the cgroup `dir`.
pub fn set_cpu_weight(dir: &Path, weight: u64) -> anyhow::Result<()> {
    write(&dir.join("cpu.weight"), &weight.to_string())
}

fn write(path: &Path, value: &str) -> anyhow::Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

/// Removes the container's cgroup `dir` once the VM left it (a monitor that
/// was just killed leaves it as it exits); parents stay, as with runc.
pub fn remove(dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + REMOVE_WAIT;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot remove the cgroup {}", dir.display()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_like_runcs_and_never_climb_out() {
        let r = |p: &str| resolve(p, "/user.slice/term").unwrap();
        assert_eq!(r("/default/c1"), PathBuf::from("default/c1"));
        assert_eq!(r("/a/../../b/./c//"), PathBuf::from("b/c"));
        assert_eq!(r("box/c1"), PathBuf::from("user.slice/term/box/c1"));
        // A relative path stays below runvm's own cgroup.
        assert_eq!(r("../../../x"), PathBuf::from("user.slice/term/x"));
        assert_eq!(resolve("c1", "/").unwrap(), PathBuf::from("c1"));
        for bad in ["/..", "/", ".", "a/.."] {
            let e = resolve(bad, "/user.slice").unwrap_err().to_string();
            assert!(e.contains("names no cgroup of its own"), "{e}");
        }
    }

    #[test]
    fn only_a_unified_hierarchy_is_used() {
        let v2 = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n\
                  31 1 0:27 / /proc rw - proc proc rw\n";
        assert_eq!(unified_root(v2), Some(PathBuf::from("/sys/fs/cgroup")));
        let hybrid = "30 1 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                      32 1 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(unified_root(hybrid), None);
        assert_eq!(unified_root("31 1 0:27 / /proc rw - proc proc rw\n"), None);
        let spaced = "30 1 0:26 / /my\\040cgroups rw - cgroup2 none rw\n";
        assert_eq!(unified_root(spaced), Some(PathBuf::from("/my cgroups")));
        assert_eq!(own_cgroup("0::/docker/x\n").as_deref(), Some("/docker/x"));
        assert_eq!(own_cgroup("1:memory:/x\n"), None);
    }

    #[test]
    fn limits_follow_the_guest_and_add_the_vmms_overhead() {
        let guest = runvm_protocol::Resources {
            memory_max: Some(64 << 20),
            cpu_weight: Some(39),
            ..Default::default()
        };
        let l = HostLimits::for_vm(128, &guest);
        assert_eq!(l.memory_max, Some((128 + VMM_OVERHEAD_MIB) << 20));
        assert_eq!(l.cpu_weight, Some(39));
        // No memory limit asked for: none on the host either.
        let l = HostLimits::for_vm(256, &runvm_protocol::Resources::default());
        assert_eq!(l, HostLimits::default());
    }

    /// A directory tree laid out like cgroupfs stands in for it: the files
    /// written are what the kernel would be asked.
    #[test]
    fn joining_enables_controllers_on_the_way_down_writes_limits_and_moves_in() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::write(r.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        std::fs::write(r.join("cgroup.subtree_control"), "").unwrap();
        std::fs::create_dir(r.join("default")).unwrap();
        std::fs::write(r.join("default/cgroup.controllers"), "cpu memory\n").unwrap();
        std::fs::write(r.join("default/cgroup.subtree_control"), "memory").unwrap();
        let limits = HostLimits {
            memory_max: Some(192 << 20),
            cpu_weight: Some(39),
        };
        let unset = join(r, Path::new("default/c1"), &limits).unwrap();
        assert!(unset.is_empty(), "{unset:?}");
        let read = |p: &str| std::fs::read_to_string(r.join(p)).unwrap();
        // Enabled where it was not, left alone where it was.
        assert_eq!(read("cgroup.subtree_control"), "+cpu");
        assert_eq!(read("default/cgroup.subtree_control"), "+cpu");
        assert_eq!(read("default/c1/memory.max"), (192u64 << 20).to_string());
        assert_eq!(read("default/c1/cpu.weight"), "39");
        assert_eq!(read("default/c1/cgroup.procs"), "0");

        // A controller a parent does not offer: that limit is reported
        // unset, and the process still moves in.
        std::fs::write(r.join("default/cgroup.controllers"), "cpu\n").unwrap();
        let unset = join(r, Path::new("default/c2"), &limits).unwrap();
        assert_eq!(unset.len(), 1, "{unset:?}");
        assert!(unset[0].contains("memory"), "{unset:?}");
        assert_eq!(read("default/c2/cgroup.procs"), "0");
    }

    #[test]
    fn removing_a_missing_cgroup_is_done_and_a_full_one_fails() {
        let root = tempfile::tempdir().unwrap();
        remove(&root.path().join("gone")).unwrap();
        let full = root.path().join("full");
        std::fs::create_dir(&full).unwrap();
        std::fs::write(full.join("cgroup.procs"), "").unwrap();
        // A plain directory with a file is not empty (ENOTEMPTY, not EBUSY):
        // reported at once.
        let e = remove(&full).unwrap_err().to_string();
        assert!(e.contains("cannot remove the cgroup"), "{e}");
        std::fs::remove_file(full.join("cgroup.procs")).unwrap();
        remove(&full).unwrap();
        assert!(!full.exists());
    }
}
