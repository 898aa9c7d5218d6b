//! VM templates: a guest booted once without a container, snapshotted
//! where its agent waits, and restored for each container instead of
//! booting one (Kata's VM templating, with Firecracker-style snapshots; see
//! `vmm::snapshot`).
//!
//! A template fits the VMs of one shape: the kernel and agent files, vCPUs,
//! memory, the extra kernel parameters, the virtio-fs tags and the number
//! of NICs (the key of its directory). The first container of a shape
//! builds it (its `create` boots twice: the template, then its own copy);
//! every later one restores it, hands its agent what the boot would have
//! read from the command line and the VM's own archive ([`Op::Setup`]:
//! rootfs, mounts, hostname, copied files, a fresh random seed that
//! reseeds the guest's pool, the wall clock, the NICs' addresses), and goes
//! on as a booted VM would.
//!
//! Off unless asked for (the [`ANN_TEMPLATE`] annotation, or
//! [`TEMPLATE_ENV`] for every container without one): copies of one
//! template start from the same guest memory, which they share through
//! the page cache until they write it, as Kata's templates do. That is
//! density and speed, and also the same kernel address layout (KASLR) in
//! every copy and shared pages that a side channel could probe, which a
//! host running mutually hostile tenants may not want.
//!
//! [`Op::Setup`]: runvm_protocol::Op::Setup

use std::fs::File;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runvm_protocol::GuestSetup;
use vmm::config::{FsConfig, NetConfig, TapSource, VmConfig, VsockConfig};
use vmm::exit::ExitReason;
use vmm::resources::VmResources;
use vmm::snapshot::SnapshotRequest;
use vmm::vm::{self, RunOptions};

use crate::bundle::Plan;
use crate::{assets, logger};

/// Annotation: `true` restores the VM from a template instead of booting
/// it, `false` boots it (overrides [`TEMPLATE_ENV`]).
pub const ANN_TEMPLATE: &str = "io.runvm.template";
/// Environment: `1` or `true` makes templates the default.
pub const TEMPLATE_ENV: &str = "RUNVM_TEMPLATE";
/// What a template's agent prints where the snapshot is taken (the agent's
/// `TEMPLATE_MARKER`).
const TEMPLATE_MARKER: &str = "RUNVM_AGENT_TEMPLATE_READY";
/// The most the copied files of one setup may hold: the setup travels in
/// one frame, as JSON (up to four bytes per byte).
const MAX_SETUP_FILES: usize = 192 << 10;

/// Whether a container's VM is to come from a template.
pub fn wanted(annotations: &std::collections::BTreeMap<String, String>) -> anyhow::Result<bool> {
    match annotations.get(ANN_TEMPLATE).map(String::as_str) {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(v) => bail!("{ANN_TEMPLATE}={v:?} must be true or false"),
        None => Ok(matches!(
            std::env::var(TEMPLATE_ENV).as_deref(),
            Ok("1") | Ok("true")
        )),
    }
}

/// Where templates are kept: beside the boot files' cache, memory-backed
/// by default (a template's memory file holds what its guest touched
/// while booting, tens of MiB).
pub fn templates_dir() -> PathBuf {
    assets::cache_dir().join("templates")
}

/// The VM a template is made for, less what each copy brings itself.
#[derive(Debug, Clone)]
pub struct Shape<'a> {
    /// The kernel file booted.
    pub kernel: &'a Path,
    /// Whether it is mapped rather than copied.
    pub map_boot_files: bool,
    /// The agent's archive.
    pub agent: &'a Path,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub mem_mib: u64,
    /// Extra kernel parameters.
    pub kernel_params: &'a [String],
    /// The virtio-fs tags, in device order.
    pub fs_tags: Vec<String>,
    /// How many NICs.
    pub nics: usize,
    /// Advise the template's RAM for huge pages while it boots.
    pub huge_pages: bool,
    /// How long the template's boot may take.
    pub boot_timeout: Duration,
}

/// The files a template was made from, each with its identity then
/// ([`assets::file_key`]), kept beside the snapshot: a template whose files
/// have changed since can never be used again.
const FILES: &str = "files.json";

/// `(path, file key)` of the files a template depends on; the runvm binary
/// last.
fn file_keys(kernel: &Path, agent: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let exe = std::env::current_exe().context("cannot find the runvm binary")?;
    [kernel, agent, exe.as_path()]
        .into_iter()
        .map(|file| {
            let meta = std::fs::metadata(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            Ok((file.to_owned(), assets::file_key(&meta)))
        })
        .collect()
}

/// Removes the templates whose files have changed or gone since they were
/// made (a rebuilt agent, kernel or runvm): their keys can never come
/// again, and they hold memory (`templates_dir` is tmpfs by default).
fn prune(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for dir in entries.flatten().map(|e| e.path()) {
        let hidden = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if hidden || !dir.is_dir() {
            continue;
        }
        let files: Option<Vec<(PathBuf, String)>> = std::fs::read(dir.join(FILES))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let stale = match files {
            Some(files) => files.iter().any(|(path, key)| {
                std::fs::metadata(path)
                    .map(|m| assets::file_key(&m))
                    .ok()
                    .as_ref()
                    != Some(key)
            }),
            // Not one of ours, or from before this file existed.
            None => true,
        };
        if stale {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => logger::debug(&format!("removed stale template {}", dir.display())),
                Err(e) => logger::debug(&format!("cannot remove {}: {e}", dir.display())),
            }
        }
    }
}

impl Shape<'_> {
    /// The template's directory name: a hash of everything that makes the
    /// guest what it is at the snapshot, this runvm binary included (it
    /// holds the VMM that reads the snapshot).
    fn key(&self) -> anyhow::Result<String> {
        let mut h = DefaultHasher::new();
        file_keys(self.kernel, self.agent)?.hash(&mut h);
        (
            vmm::snapshot::FORMAT_VERSION,
            self.vcpus,
            self.mem_mib,
            self.kernel_params,
            &self.fs_tags,
            self.nics,
            self.map_boot_files,
        )
            .hash(&mut h);
        Ok(format!("{:016x}", h.finish()))
    }

    /// The virtio device types of this shape's VMs, in the order the
    /// monitor gives them (rng, vsock, shares, NICs).
    fn device_types(&self) -> Vec<u32> {
        use vmm::devices::virtio::{fs::TYPE_FS, net::TYPE_NET, vsock::TYPE_VSOCK, TYPE_RNG};
        [TYPE_RNG, TYPE_VSOCK]
            .into_iter()
            .chain(self.fs_tags.iter().map(|_| TYPE_FS))
            .chain((0..self.nics).map(|_| TYPE_NET))
            .collect()
    }

    /// Whether the template in `dir` can be restored into this shape's VM:
    /// it is there, this runvm reads it, and its VM is this shape's. One
    /// that is there but cannot serve (damaged, of another format) is
    /// removed, to be built again.
    fn usable(&self, dir: &Path) -> bool {
        if !dir.join(vmm::snapshot::STATE_FILE).is_file() {
            return false;
        }
        let checked = vmm::snapshot::VmSnapshot::load(dir).and_then(|snap| {
            snap.check_shape(self.vcpus, self.mem_mib << 20)?;
            snap.check_devices(&self.device_types())
        });
        match checked {
            Ok(()) => true,
            Err(e) => {
                logger::warn(&format!(
                    "template {} cannot serve ({e}); building it again",
                    dir.display()
                ));
                let _ = std::fs::remove_dir_all(dir);
                false
            }
        }
    }
}

/// Each NIC's address in templates: locally administered, by position.
pub fn template_mac(index: usize) -> String {
    format!("02:72:76:74:70:{:02x}", index as u8)
}

/// The template for `shape`, built first if there is none yet (another
/// `create` building it is waited for). `None`, with the reason logged,
/// where no template can be had: the container's VM then boots.
pub fn get(shape: &Shape<'_>) -> Option<PathBuf> {
    match get_or_build(shape) {
        Ok(dir) => Some(dir),
        Err(e) => {
            logger::warn(&format!("booting without a template: {e:#}"));
            None
        }
    }
}

fn get_or_build(shape: &Shape<'_>) -> anyhow::Result<PathBuf> {
    let root = templates_dir();
    let key = shape.key()?;
    let dir = root.join(&key);
    if shape.usable(&dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let lock_path = root.join(format!(".{key}.lock"));
    let lock = File::create(&lock_path)
        .with_context(|| format!("cannot create {}", lock_path.display()))?;
    let deadline = Instant::now() + shape.boot_timeout;
    loop {
        // SAFETY: flock on a descriptor this function owns.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            break;
        }
        if Instant::now() >= deadline {
            bail!("another runvm has been building template {key} for too long");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Built while this one waited?
    if shape.usable(&dir) {
        return Ok(dir);
    }
    let started = Instant::now();
    build(shape, &root, &key)?;
    prune(&root);
    logger::debug(&format!(
        "template {key} built in {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0
    ));
    Ok(dir)
}

/// Boots the template's guest, snapshots it where its agent waits, and
/// moves the snapshot into place. Everything else it made goes with its
/// work directory.
fn build(shape: &Shape<'_>, root: &Path, key: &str) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix(&format!(".{key}."))
        .tempdir_in(root)
        .with_context(|| format!("cannot create a work directory in {}", root.display()))?;
    // The template's shares are never mounted: an empty directory serves.
    let empty = work.path().join("empty");
    std::fs::create_dir(&empty)?;
    let snap = work.path().join("snapshot");
    let console_path = work.path().join("console.log");
    let console = File::create(&console_path)?;
    let config = VmConfig {
        vcpus: shape.vcpus,
        mem_mib: shape.mem_mib,
        kernel: shape.kernel.to_owned(),
        initramfs: vec![shape.agent.to_owned()],
        map_boot_files: shape.map_boot_files,
        huge_pages: shape.huge_pages,
        cmdline: cmdline(shape.kernel_params),
        rng: true,
        vsock: Some(VsockConfig {
            guest_cid: crate::monitor::GUEST_CID,
            uds_path: work.path().join("v.sock"),
        }),
        fs: shape
            .fs_tags
            .iter()
            .map(|tag| FsConfig {
                tag: tag.clone(),
                path: empty.clone(),
                read_only: true,
                cache: Default::default(),
            })
            .collect(),
        // TAPs of this process's own, never up, gone when the VM closes them.
        net: (0..shape.nics)
            .map(|i| {
                Ok(NetConfig {
                    tap: TapSource::Name(format!("rvtpl{}.{i}", std::process::id())),
                    mac: Some(
                        template_mac(i)
                            .parse()
                            .map_err(|e: String| anyhow::anyhow!(e))?,
                    ),
                })
            })
            .collect::<anyhow::Result<_>>()?,
        restore: None,
    };
    let kvm = vm::open_kvm()?;
    let resources = VmResources::validate(&config, vm::host_limits(&kvm))?;
    let opts = RunOptions {
        console: Some(Box::new(console)),
        timeout: Some(shape.boot_timeout),
        snapshot: Some(SnapshotRequest {
            dir: snap.clone(),
            after_console_line: TEMPLATE_MARKER.into(),
        }),
        ..Default::default()
    };
    let reason = vm::run(&kvm, &resources, opts)?;
    if reason != ExitReason::Snapshotted {
        bail!(
            "the template's guest ended before its agent waited ({reason}): {}",
            crate::console_log::tail(&console_path, 10)
        );
    }
    let files = file_keys(shape.kernel, shape.agent)?;
    std::fs::write(snap.join(FILES), serde_json::to_vec(&files)?)
        .with_context(|| format!("cannot write {}", snap.join(FILES).display()))?;
    let dest = root.join(key);
    match std::fs::rename(&snap, &dest) {
        Ok(()) => Ok(()),
        // Another builder got there first (without the lock: a cache
        // directory shared with an older runvm); theirs serves as well.
        Err(_) if dest.join(vmm::snapshot::STATE_FILE).is_file() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot move the template to {}", dest.display())),
    }
}

/// A template's kernel command line: the agent waits as a template, then
/// the annotation's words, as a booting container's would have them.
fn cmdline(kernel_params: &[String]) -> String {
    let mut cmdline = String::from("quiet runvm.template");
    for word in kernel_params {
        cmdline.push(' ');
        cmdline.push_str(word);
    }
    cmdline
}

/// What a copy of a template is told it is: what a booting guest reads
/// from its command line (see `monitor::guest_cmdline`) and its own
/// archive (`assets::write_vm_archive`).
pub fn setup(plan: &Plan, rootfs_tag: &str, macs: &[String]) -> anyhow::Result<GuestSetup> {
    let copied_files = assets::copied_files(&plan.mounts)?;
    let copied: usize = copied_files.iter().map(Vec::len).sum();
    if copied > MAX_SETUP_FILES {
        bail!("the files copied into the container ({copied} bytes) are too large for a template's setup");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the host's clock is before 1970")?;
    Ok(GuestSetup {
        seed: assets::guest_seed()?,
        realtime: (now.as_secs() as i64, now.subsec_nanos()),
        macs: macs
            .iter()
            .enumerate()
            .map(|(i, mac)| (template_mac(i), mac.to_ascii_lowercase()))
            .collect(),
        rootfs_tag: rootfs_tag.into(),
        rootfs_ro: plan.rootfs_ro,
        rootfs_overlay: plan.overlay(),
        hostname: plan.hostname.clone(),
        mounts: plan.mounts.mounts.clone(),
        copied_files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape<'a>(kernel: &'a Path, agent: &'a Path, params: &'a [String]) -> Shape<'a> {
        Shape {
            kernel,
            map_boot_files: true,
            agent,
            vcpus: 1,
            mem_mib: 256,
            kernel_params: params,
            fs_tags: vec!["rootfs".into()],
            nics: 0,
            huge_pages: true,
            boot_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_key_changes_with_whatever_shapes_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let (k, a) = (dir.path().join("k"), dir.path().join("a"));
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&a, b"agent").unwrap();
        let base = shape(&k, &a, &[]).key().unwrap();
        assert_eq!(shape(&k, &a, &[]).key().unwrap(), base, "stable");
        let params = ["mitigations=off".to_string()];
        let mut variants = vec![shape(&k, &a, &params)];
        let mut s = shape(&k, &a, &[]);
        s.vcpus = 2;
        variants.push(s);
        let mut s = shape(&k, &a, &[]);
        s.mem_mib = 512;
        variants.push(s);
        let mut s = shape(&k, &a, &[]);
        s.fs_tags.push("m0".into());
        variants.push(s);
        let mut s = shape(&k, &a, &[]);
        s.nics = 1;
        variants.push(s);
        for v in &variants {
            assert_ne!(v.key().unwrap(), base, "{v:?}");
        }
        // Neither the boot's own settings nor its time limit matter.
        let mut s = shape(&k, &a, &[]);
        s.huge_pages = false;
        s.boot_timeout = Duration::from_secs(9);
        assert_eq!(s.key().unwrap(), base);
        // A rebuilt agent is another template.
        std::thread::sleep(Duration::from_millis(10));
        std::fs::write(&a, b"agent v2").unwrap();
        assert_ne!(shape(&k, &a, &[]).key().unwrap(), base);
        std::fs::remove_file(&k).unwrap();
        assert!(shape(&k, &a, &[]).key().is_err());
    }

    #[test]
    fn templates_of_changed_files_are_pruned_and_current_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (k, a) = (dir.path().join("k"), dir.path().join("a"));
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&a, b"agent").unwrap();
        let root = dir.path().join("templates");
        let make = |name: &str, files: Option<&Vec<(PathBuf, String)>>| {
            let t = root.join(name);
            std::fs::create_dir_all(&t).unwrap();
            if let Some(f) = files {
                std::fs::write(t.join(FILES), serde_json::to_vec(f).unwrap()).unwrap();
            }
        };
        let current = file_keys(&k, &a).unwrap();
        make("current", Some(&current));
        make("unknown", None);
        make(".work", None);
        let mut old = current.clone();
        old[1].1 = "not-the-agent-now".into();
        make("old", Some(&old));
        let mut gone = current.clone();
        gone[0].0 = dir.path().join("no-such-kernel");
        make("gone", Some(&gone));
        prune(&root);
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".work", "current"]);
    }

    #[test]
    fn a_template_that_cannot_serve_is_removed_and_a_missing_one_is_not_usable() {
        let dir = tempfile::tempdir().unwrap();
        let (k, a) = (dir.path().join("k"), dir.path().join("a"));
        let s = shape(&k, &a, &[]);
        assert_eq!(s.device_types(), [4, 19, 26]);
        let t = dir.path().join("t");
        assert!(!s.usable(&t));
        std::fs::create_dir(&t).unwrap();
        std::fs::write(t.join(vmm::snapshot::STATE_FILE), b"{ damaged").unwrap();
        assert!(!s.usable(&t));
        assert!(!t.exists(), "removed, to be built again");
    }

    #[test]
    fn the_annotation_decides_over_the_environment() {
        let mut ann = std::collections::BTreeMap::new();
        ann.insert(ANN_TEMPLATE.to_string(), "true".to_string());
        assert!(wanted(&ann).unwrap());
        ann.insert(ANN_TEMPLATE.to_string(), "false".to_string());
        assert!(!wanted(&ann).unwrap());
        ann.insert(ANN_TEMPLATE.to_string(), "yes".to_string());
        let e = wanted(&ann).unwrap_err();
        assert_eq!(
            e.to_string(),
            "io.runvm.template=\"yes\" must be true or false"
        );
    }

    #[test]
    fn template_macs_are_local_and_distinct() {
        assert_eq!(template_mac(0), "02:72:76:74:70:00");
        assert_ne!(template_mac(1), template_mac(0));
        assert_eq!(cmdline(&["a=b".into()]), "quiet runvm.template a=b");
    }
}
