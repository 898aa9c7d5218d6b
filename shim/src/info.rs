//! `state`, `list`, `spec` and `features`: commands that only report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::bundle::{
    ANN_BOOT_TIMEOUT, ANN_HUGE_PAGES, ANN_KERNEL, ANN_MEMORY, ANN_ROOTFS_OVERLAY, ANN_VCPUS,
};
use crate::state::{Record, Root, Status};

/// The OCI runtime spec version runvm implements.
pub const OCI_VERSION: &str = "1.2.0";

/// `runvm state` output: the OCI state plus runc's extra fields.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StateOut {
    oci_version: &'static str,
    id: String,
    /// The monitor's PID (the container's init from the host's view); 0
    /// once stopped, as runc reports.
    pid: i32,
    status: Status,
    bundle: PathBuf,
    rootfs: PathBuf,
    created: String,
    owner: &'static str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

impl From<Record> for StateOut {
    fn from(r: Record) -> Self {
        StateOut {
            oci_version: OCI_VERSION,
            pid: if r.status == Status::Stopped {
                0
            } else {
                r.pid.unwrap_or(0)
            },
            id: r.id,
            status: r.status,
            bundle: r.bundle,
            rootfs: r.rootfs,
            created: r.created,
            owner: "",
            annotations: r.annotations,
        }
    }
}

/// `runvm state ID`.
pub fn state(root: &Path, id: &str) -> anyhow::Result<String> {
    let r = Root::new(root).open(id)?.load_live()?;
    Ok(serde_json::to_string_pretty(&StateOut::from(r))?)
}

/// `runvm list`.
pub fn list(root: &Path, format: &str, quiet: bool) -> anyhow::Result<String> {
    let root = Root::new(root);
    let mut states = Vec::new();
    for id in root.ids()? {
        // A container deleted meanwhile is simply not listed.
        if let Ok(r) = root.open(&id).and_then(|d| d.load_live()) {
            states.push(StateOut::from(r));
        }
    }
    if quiet {
        return Ok(states.iter().map(|s| format!("{}\n", s.id)).collect());
    }
    match format {
        "json" => Ok(serde_json::to_string(&states)? + "\n"),
        "table" => {
            let mut out = format!(
                "{:<12} {:<10} {:<10} {:<40} {:<30} {}\n",
                "ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"
            );
            for s in &states {
                out += &format!(
                    "{:<12} {:<10} {:<10} {:<40} {:<30} {}\n",
                    s.id,
                    s.pid,
                    s.status,
                    s.bundle.display(),
                    s.created,
                    "root"
                );
            }
            Ok(out)
        }
        f => bail!("invalid format {f:?}: use table or json"),
    }
}

/// `runvm spec`: writes a default config.json into `bundle`.
pub fn spec(bundle: &Path) -> anyhow::Result<()> {
    let path = bundle.join("config.json");
    if path.exists() {
        bail!("File {} exists. Remove it first", path.display());
    }
    let mut spec = oci_spec::runtime::Spec::default();
    // runvm has no terminal mode yet; runc's default (an interactive sh on
    // a terminal) would be refused by create.
    if let Some(p) = spec.process_mut() {
        p.set_terminal(Some(false));
    }
    let text = serde_json::to_string_pretty(&spec)?;
    std::fs::write(&path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// `runvm features`: what this runtime supports, in `runc features` form.
pub fn features() -> anyhow::Result<String> {
    let caps: Vec<String> = all_capabilities();
    let f = serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": [],
        "mountOptions": crate::mounts::known_options(),
        "linux": {
            // Every container gets a cgroup namespace rooted at its cgroup
            // in the guest, whose limits are cgroup v2's.
            "namespaces": ["cgroup", "mount", "network"],
            "capabilities": caps,
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false, "rdma": false},
            "seccomp": {
                "enabled": true,
                "actions": [
                    "SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
                    "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG", "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"
                ],
                "operators": [
                    "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE", "SCMP_CMP_LT",
                    "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"
                ],
                "archs": ["SCMP_ARCH_X86_64"],
                "knownFlags": [
                    "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
                    "SECCOMP_FILTER_FLAG_TSYNC"
                ],
                "supportedFlags": [
                    "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
                    "SECCOMP_FILTER_FLAG_TSYNC"
                ]
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false},
            "intelRdt": {"enabled": false},
        },
        "annotations": {
            "io.runvm.isolation": "kvm micro-VM per container",
            ANN_VCPUS: "vCPUs of the container's VM",
            ANN_MEMORY: "guest memory in MiB",
            ANN_KERNEL: "guest kernel (vmlinux) to boot",
            ANN_BOOT_TIMEOUT: "seconds create waits for the guest agent",
            ANN_ROOTFS_OVERLAY: "true: the rootfs is shared read-only with a writable overlay in guest memory",
            ANN_HUGE_PAGES: "false: guest RAM stays on 4 KiB pages (default true: advised for transparent huge pages)",
            crate::template::ANN_TEMPLATE: "true: the VM is restored from a template of its shape instead of booted (default: RUNVM_TEMPLATE, else false)",
        },
        "potentiallyUnsafeConfigAnnotations": [ANN_KERNEL],
    });
    Ok(serde_json::to_string_pretty(&f)? + "\n")
}

fn all_capabilities() -> Vec<String> {
    let mut names: Vec<String> = caps::all().into_iter().map(|c| c.to_string()).collect();
    names.sort();
    names
}
