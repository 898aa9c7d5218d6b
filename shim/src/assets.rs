//! Where the guest kernel and the agent come from: an annotation or
//! `RUNVM_KERNEL` / `RUNVM_AGENT`, else the directories setup.sh installs to.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use runvm_protocol::{COPIED_FILES_DIR, MOUNTS_FILE, SEED_FILE};
use vmm::initramfs::Initramfs;

use crate::logger;
use crate::mounts::{MountPlan, MAX_COPIED_FILE};

/// Searched in order when no variable or annotation names a file.
pub const SEARCH_DIRS: &[&str] = &["/usr/local/share/runvm", "/usr/share/runvm"];

fn find(var: &str, name: &str, explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let (path, source) = match (explicit, std::env::var_os(var)) {
        (Some(p), _) => (p.to_owned(), "annotation"),
        (None, Some(v)) => (PathBuf::from(v), var),
        (None, None) => {
            return SEARCH_DIRS
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "{name} not found in {} (run setup.sh, or set {var})",
                        SEARCH_DIRS.join(", ")
                    )
                })
        }
    };
    if !path.is_file() {
        bail!("{name} {} (from {source}) not found", path.display());
    }
    Ok(path)
}

/// The guest kernel (`vmlinux`).
pub fn kernel(annotation: Option<&Path>) -> anyhow::Result<PathBuf> {
    find("RUNVM_KERNEL", "vmlinux", annotation)
}

/// The static guest agent.
pub fn agent() -> anyhow::Result<PathBuf> {
    find("RUNVM_AGENT", "runvm-agent", None)
}

/// The initramfs part with the agent as /init, shared by every VM booted
/// with this agent binary: built once into the cache and reused while the
/// binary stays the same file, unchanged (the key is its inode, size and
/// times). Without a usable cache it is built into `fallback`.
pub fn agent_archive(agent: &Path, fallback: &Path) -> anyhow::Result<PathBuf> {
    agent_archive_in(&cache_dir(), agent, fallback)
}

fn agent_archive_in(dir: &Path, agent: &Path, fallback: &Path) -> anyhow::Result<PathBuf> {
    let meta =
        std::fs::metadata(agent).with_context(|| format!("cannot read {}", agent.display()))?;
    let name = agent_archive_name(&meta);
    let cached = dir.join(&name);
    if cached.is_file() {
        return Ok(cached);
    }
    let bytes = std::fs::read(agent).with_context(|| format!("cannot read {}", agent.display()))?;
    let archive = Initramfs::with_init(bytes)?.to_bytes()?;
    match store_in_cache(dir, &name, &archive) {
        Ok(path) => Ok(path),
        Err(e) => {
            logger::debug(&format!(
                "not caching the agent's initramfs in {}: {e:#}",
                dir.display()
            ));
            std::fs::write(fallback, archive)
                .with_context(|| format!("cannot write {}", fallback.display()))?;
            Ok(fallback.to_owned())
        }
    }
}

/// Where boot files are kept (archives built from the agent, copies of the
/// kernel): `RUNVM_INITRAMFS_CACHE`,
/// else /run/runvm-cache (memory-backed, so a boot empties it, and beside
/// the default state root rather than in it, where `list` would see it).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("RUNVM_INITRAMFS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/runvm-cache"))
}

/// The cache name of the agent binary described by `meta`: a binary
/// rebuilt or replaced in place gets a new name (ctime changes on every
/// write, even one that restores the mtime).
fn agent_archive_name(meta: &std::fs::Metadata) -> String {
    format!("agent-{}.cpio", file_key(meta))
}

/// Identifies one version of a file: a file replaced or changed in place
/// gets a new key.
pub(crate) fn file_key(meta: &std::fs::Metadata) -> String {
    format!(
        "{:x}-{:x}-{:x}-{:x}.{:x}-{:x}.{:x}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

/// How long an archive of another agent binary stays in the cache (a
/// monitor booting with it may be about to open it).
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// Puts `archive` into the cache as `name`, whole or not at all, and drops
/// archives of older agent binaries.
fn store_in_cache(dir: &Path, name: &str, archive: &[u8]) -> anyhow::Result<PathBuf> {
    store_with(dir, "agent-", name, |tmp| Ok(tmp.write_all(archive)?))
}

/// Writes a cache entry `name` (which starts with `kind`) through `fill`
/// into a temporary file renamed into place, so the entry is whole or
/// absent and, once there, never changes: monitors map cache entries into
/// guest memory. Entries of the same kind older than [`STALE_AFTER`] go.
fn store_with(
    dir: &Path,
    kind: &str,
    name: &str,
    fill: impl FnOnce(&mut std::fs::File) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{kind}"))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    fill(tmp.as_file_mut())?;
    let path = dir.join(name);
    tmp.persist(&path)?;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let other = entry.file_name();
        let other = other.to_string_lossy();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_AFTER);
        if other.starts_with(kind) && other != name && old {
            // A VM that has it mapped keeps its pages until it ends.
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(path)
}

/// A copy of the guest kernel in the cache, which the VMM may map into
/// guest memory instead of copying it (`map_boot_files`): cache entries are
/// never changed in place, while the kernel the user named could be
/// rewritten under a running VM. Every VM booting it then shares its pages.
/// `None` when the cache cannot be written; the kernel is then copied from
/// where it is.
pub fn shared_kernel(kernel: &Path) -> Option<PathBuf> {
    shared_kernel_in(&cache_dir(), kernel)
        .map_err(|e| {
            logger::debug(&format!(
                "not sharing the kernel through {}: {e:#}",
                cache_dir().display()
            ))
        })
        .ok()
}

fn shared_kernel_in(dir: &Path, kernel: &Path) -> anyhow::Result<PathBuf> {
    let mut src =
        std::fs::File::open(kernel).with_context(|| format!("cannot open {}", kernel.display()))?;
    let name = format!("kernel-{}", file_key(&src.metadata()?));
    let cached = dir.join(&name);
    if cached.is_file() {
        return Ok(cached);
    }
    store_with(dir, "kernel-", &name, |tmp| {
        std::io::copy(&mut src, tmp)?;
        Ok(())
    })
}

/// Writes the initramfs part of this VM alone (its random seed, the
/// container's mounts for the agent to set up and the files they copy in)
/// to `dest`; it follows the agent's archive.
pub fn write_vm_archive(mounts: &MountPlan, dest: &Path) -> anyhow::Result<()> {
    let mut ar = Initramfs::new();
    ar.file(SEED_FILE, 0o600, guest_seed()?)?;
    if !mounts.mounts.is_empty() {
        ar.file(MOUNTS_FILE, 0o644, serde_json::to_vec(&mounts.mounts)?)?;
    }
    if !mounts.files.is_empty() {
        ar.dir(COPIED_FILES_DIR, 0o755)?;
    }
    for (i, data) in copied_files(mounts)?.into_iter().enumerate() {
        ar.file(&format!("{COPIED_FILES_DIR}/{i}"), 0o644, data)?;
    }
    std::fs::write(dest, ar.to_bytes()?).with_context(|| format!("cannot write {}", dest.display()))
}

/// The contents of the files the container's `file` mounts copy in, by number.
pub fn copied_files(mounts: &MountPlan) -> anyhow::Result<Vec<Vec<u8>>> {
    mounts
        .files
        .iter()
        .map(|path| {
            let data = std::fs::read(path)
                .with_context(|| format!("cannot read mount source {}", path.display()))?;
            if data.len() as u64 > MAX_COPIED_FILE {
                bail!(
                    "mount source {} grew over {MAX_COPIED_FILE} bytes",
                    path.display()
                );
            }
            Ok(data)
        })
        .collect()
}

/// Random bytes for a guest's pool: fresh for every VM, so two guests never
/// start from the same pool.
pub fn guest_seed() -> anyhow::Result<Vec<u8>> {
    let mut seed = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .context("cannot draw the guest's random seed")?;
    Ok(seed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries of a newc archive, by name.
    fn names(archive: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = archive;
        loop {
            let reader = cpio::NewcReader::new(rest).unwrap();
            if reader.entry().is_trailer() {
                return names;
            }
            names.push(reader.entry().name().to_owned());
            rest = reader.finish().unwrap();
        }
    }

    #[test]
    fn the_agents_archive_is_built_once_per_binary_and_rebuilt_when_it_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let agent = tmp.path().join("agent");
        let fallback = tmp.path().join("fallback.cpio");
        std::fs::write(&agent, b"agent v1").unwrap();
        let first = agent_archive_in(&cache, &agent, &fallback).unwrap();
        assert!(first.starts_with(&cache), "{}", first.display());
        let archive = std::fs::read(&first).unwrap();
        assert_eq!(
            names(&archive),
            ["dev", "dev/console", "proc", "sys", "init"]
        );
        assert!(archive.windows(8).any(|w| w == b"agent v1"));
        assert_eq!(agent_archive_in(&cache, &agent, &fallback).unwrap(), first);

        // Rewritten in place (same inode): a new archive.
        std::fs::write(&agent, b"agent v2").unwrap();
        let second = agent_archive_in(&cache, &agent, &fallback).unwrap();
        assert_ne!(second, first);
        assert!(std::fs::read(&second)
            .unwrap()
            .windows(8)
            .any(|w| w == b"agent v2"));
        assert!(!fallback.exists());
        let leftovers: Vec<_> = std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with("agent-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn an_unusable_cache_falls_back_to_the_state_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let not_a_dir = tmp.path().join("file");
        std::fs::write(&not_a_dir, b"").unwrap();
        let agent = tmp.path().join("agent");
        std::fs::write(&agent, b"agent").unwrap();
        let fallback = tmp.path().join("fallback.cpio");
        let got = agent_archive_in(&not_a_dir.join("cache"), &agent, &fallback).unwrap();
        assert_eq!(got, fallback);
        assert_eq!(names(&std::fs::read(&got).unwrap()).last().unwrap(), "init");
        let missing = tmp.path().join("no-agent");
        let err = agent_archive_in(tmp.path(), &missing, &fallback).unwrap_err();
        assert!(format!("{err:#}").contains("no-agent"), "{err:#}");
    }

    #[test]
    fn the_shared_kernel_is_a_cache_copy_renewed_when_the_kernel_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let kernel = tmp.path().join("vmlinux");
        std::fs::write(&kernel, b"kernel v1").unwrap();
        let first = shared_kernel_in(&cache, &kernel).unwrap();
        assert!(first.starts_with(&cache), "{}", first.display());
        assert_eq!(std::fs::read(&first).unwrap(), b"kernel v1");
        let inode = std::fs::metadata(&first).unwrap().ino();
        assert_eq!(shared_kernel_in(&cache, &kernel).unwrap(), first);
        assert_eq!(
            std::fs::metadata(&first).unwrap().ino(),
            inode,
            "reused, not rewritten"
        );

        // The user's kernel rewritten in place: a new copy; the old one
        // (which running VMs may map) is left as it was.
        std::fs::write(&kernel, b"kernel v2").unwrap();
        let second = shared_kernel_in(&cache, &kernel).unwrap();
        assert_ne!(second, first);
        assert_eq!(std::fs::read(&second).unwrap(), b"kernel v2");
        assert_eq!(std::fs::read(&first).unwrap(), b"kernel v1");

        let err = shared_kernel_in(&cache, &tmp.path().join("none")).unwrap_err();
        assert!(format!("{err:#}").contains("none"), "{err:#}");
        let not_a_dir = tmp.path().join("file");
        std::fs::write(&not_a_dir, b"").unwrap();
        assert!(shared_kernel_in(&not_a_dir.join("cache"), &kernel).is_err());
    }

    #[test]
    fn the_vms_own_archive_holds_its_seed_mounts_and_copied_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("vm.cpio");
        write_vm_archive(&MountPlan::default(), &dest).unwrap();
        assert_eq!(names(&std::fs::read(&dest).unwrap()), [SEED_FILE]);
        let a = std::fs::read(&dest).unwrap();
        write_vm_archive(&MountPlan::default(), &dest).unwrap();
        assert_ne!(
            std::fs::read(&dest).unwrap(),
            a,
            "every VM draws a fresh seed"
        );
    }
}
