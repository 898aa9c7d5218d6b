//! Where the guest kernel and the agent come from: an annotation or
//! `RUNVM_KERNEL` / `RUNVM_AGENT`, else the directories setup.sh installs to.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use runvm_protocol::{COPIED_FILES_DIR, MOUNTS_FILE, SEED_FILE};
use vmm::initramfs::Initramfs;

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

/// Writes the initramfs (the agent as /init, the container's mounts for
/// it to set up and the files they copy in) to `dest`.
pub fn write_initramfs(agent: &Path, mounts: &MountPlan, dest: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(agent).with_context(|| format!("cannot read {}", agent.display()))?;
    let mut ar = Initramfs::with_init(bytes)?;
    // Fresh for every VM: two guests never start from the same pool.
    let mut seed = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .context("cannot draw the guest's random seed")?;
    ar.file(SEED_FILE, 0o600, seed)?;
    if !mounts.mounts.is_empty() {
        ar.file(MOUNTS_FILE, 0o644, serde_json::to_vec(&mounts.mounts)?)?;
    }
    if !mounts.files.is_empty() {
        ar.dir(COPIED_FILES_DIR, 0o755)?;
    }
    for (i, path) in mounts.files.iter().enumerate() {
        let data = std::fs::read(path)
            .with_context(|| format!("cannot read mount source {}", path.display()))?;
        if data.len() as u64 > MAX_COPIED_FILE {
            bail!(
                "mount source {} grew over {MAX_COPIED_FILE} bytes",
                path.display()
            );
        }
        ar.file(&format!("{COPIED_FILES_DIR}/{i}"), 0o644, data)?;
    }
    std::fs::write(dest, ar.to_bytes()?).with_context(|| format!("cannot write {}", dest.display()))
}
