//! An OCI bundle's config.json turned into what the micro-VM needs: the
//! rootfs share, the process for the agent, the hostname and the VM's size.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use oci_spec::runtime::{LinuxCapabilities, LinuxNamespaceType, Spec};
use runvm_protocol::{
    Capabilities, ConsoleSize, ProcessSpec, Rlimit, Seccomp, SeccompArg, SeccompRule,
};

use crate::mounts::MountPlan;

/// Annotation: number of vCPUs.
pub const ANN_VCPUS: &str = "io.runvm.vcpus";
/// Annotation: guest memory in MiB.
pub const ANN_MEMORY: &str = "io.runvm.memory_mib";
/// Annotation: the guest kernel to boot.
pub const ANN_KERNEL: &str = "io.runvm.kernel";
/// Annotation: seconds `create` waits for the guest's agent.
pub const ANN_BOOT_TIMEOUT: &str = "io.runvm.boot_timeout";
/// Annotation: `true` shares the rootfs read-only and gives the container
/// a writable overlay in guest memory, so the host directory never changes.
pub const ANN_ROOTFS_OVERLAY: &str = "io.runvm.rootfs_overlay";
/// Annotation: `false` keeps guest RAM on 4 KiB pages (no transparent huge
/// page advice): less memory held per VM, slower first touches.
pub const ANN_HUGE_PAGES: &str = "io.runvm.huge_pages";
/// Annotation: extra guest kernel parameters, space-separated (checked by
/// [`crate::kernel_params::parse`]).
pub const ANN_KERNEL_PARAMS: &str = "io.runvm.kernel_params";

/// Annotation: host ports published to the container's, comma-separated
/// `[IP:]HOST:CONTAINER[/udp]`, HOST empty for one the kernel chooses
/// (checked by [`crate::publish::parse`]).
pub const ANN_PUBLISH: &str = "io.runvm.publish";

/// Guest memory without a limit in the spec or an annotation.
pub const DEFAULT_MEM_MIB: u64 = 256;
/// What the guest kernel and the agent need on top of the container's
/// memory limit.
pub const GUEST_OVERHEAD_MIB: u64 = 64;
/// The smallest VM runvm boots.
pub const MIN_MEM_MIB: u64 = 128;
/// How long `create` waits for the agent without an annotation.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// What the monitor builds from a bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The rootfs directory, absolute.
    pub rootfs: PathBuf,
    /// `root.readonly`.
    pub rootfs_ro: bool,
    /// A writable overlay in the guest over a read-only share (the
    /// annotation; moot with `root.readonly`).
    pub rootfs_overlay: bool,
    /// Guest RAM advised for transparent huge pages (the annotation; on
    /// by default).
    pub huge_pages: bool,
    /// Restore the VM from a template instead of booting it (see
    /// [`crate::template`]).
    pub template: bool,
    /// The container process.
    pub process: ProcessSpec,
    /// What the container's init sets up for the whole container (its
    /// namespaces, masks, devices, sysctls); execs join it instead.
    pub container: Option<runvm_protocol::ContainerSetup>,
    /// The guest's hostname.
    pub hostname: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub mem_mib: u64,
    /// The kernel the annotations ask for.
    pub kernel: Option<PathBuf>,
    /// Extra guest kernel parameters (the annotation), after runvm's own.
    pub kernel_params: Vec<String>,
    /// How long to wait for the agent.
    pub boot_timeout: Duration,
    /// The spec's mounts, mapped onto the VM.
    pub mounts: MountPlan,
    /// config.json annotations.
    pub annotations: BTreeMap<String, String>,
    /// Where the guest's network comes from.
    pub network: NetworkPlan,
    /// Host ports carried to the container's (the annotation).
    pub publish: Vec<crate::publish::Publish>,
    /// `linux.resources` as limits on the container's cgroup in the guest.
    pub limits: runvm_protocol::Resources,
    /// `linux.resources` settings with no meaning in a VM (for a log line).
    pub ignored_limits: Vec<&'static str>,
    /// `linux.cgroupsPath`: the VM's cgroup on the host (see
    /// [`crate::host_cgroup`]).
    pub cgroups_path: Option<String>,
}

impl Plan {
    /// Whether the guest mounts a writable overlay over a read-only share:
    /// asked for, and the root is not read-only anyway.
    pub fn overlay(&self) -> bool {
        self.rootfs_overlay && !self.rootfs_ro
    }
}

/// The spec's network namespace, as the VM sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkPlan {
    /// No network namespace: runc would share the host's, which a VM
    /// cannot; it gets no NIC.
    Host,
    /// A new namespace (only loopback, as runc would make): no NIC.
    Empty,
    /// The namespace at this path (set up by CNI, netavark...): its
    /// interfaces become the guest's.
    Join(PathBuf),
}

/// Reads and checks `bundle/config.json`.
pub fn load(bundle: &Path) -> anyhow::Result<Plan> {
    let bundle = bundle
        .canonicalize()
        .with_context(|| format!("bundle {} does not exist", bundle.display()))?;
    let config = bundle.join("config.json");
    if !config.is_file() {
        bail!("no config.json in bundle {}", bundle.display());
    }
    let spec = Spec::load(&config).with_context(|| format!("invalid {}", config.display()))?;
    plan(&bundle, &spec)
}

fn plan(bundle: &Path, spec: &Spec) -> anyhow::Result<Plan> {
    let root = spec.root().as_ref().context("config.json has no root")?;
    let rootfs = bundle.join(root.path());
    if !rootfs.is_dir() {
        bail!(
            "rootfs {} does not exist or is not a directory",
            rootfs.display()
        );
    }
    let process = spec
        .process()
        .as_ref()
        .context("config.json has no process")?;
    let annotations: BTreeMap<String, String> = spec
        .annotations()
        .as_ref()
        .map(|a| a.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
    if let Some(h) = &hostname {
        check_hostname(h)?;
    }
    let (vcpus, mem_mib) = vm_size(spec, &annotations)?;
    let cgroups_path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| !p.is_empty());
    if let Some(p) = &cgroups_path {
        // Where it lies is decided in the monitor; what it names, here.
        crate::host_cgroup::resolve(p, "/")?;
    }
    let boot_timeout = match annotations.get(ANN_BOOT_TIMEOUT) {
        Some(v) => Duration::from_secs(number(ANN_BOOT_TIMEOUT, v)?),
        None => DEFAULT_BOOT_TIMEOUT,
    };
    let mounts = crate::mounts::plan(bundle, spec.mounts().as_deref().unwrap_or_default())?;
    let network = network_plan(spec)?;
    let publish = match annotations.get(ANN_PUBLISH) {
        Some(v) => crate::publish::parse(ANN_PUBLISH, v)?,
        None => Vec::new(),
    };
    if !publish.is_empty() && !matches!(network, NetworkPlan::Join(_)) {
        bail!("{ANN_PUBLISH}: publishing ports needs a network namespace with a path");
    }
    let rootfs_overlay = flag(&annotations, ANN_ROOTFS_OVERLAY, false)?;
    let huge_pages = flag(&annotations, ANN_HUGE_PAGES, true)?;
    let template = crate::template::wanted(&annotations)?;
    let kernel_params = match annotations.get(ANN_KERNEL_PARAMS) {
        Some(v) => crate::kernel_params::parse(ANN_KERNEL_PARAMS, v)?,
        None => Vec::new(),
    };
    let mut process = process_spec(process)?;
    process.seccomp = spec
        .linux()
        .as_ref()
        .and_then(|l| l.seccomp().as_ref())
        .map(seccomp)
        .transpose()?;
    let container = crate::isolation::from_spec(spec)?;
    let (limits, ignored_limits) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .map(crate::limits::from_oci)
        .unwrap_or_default();
    Ok(Plan {
        rootfs,
        rootfs_ro: root.readonly().unwrap_or(false),
        rootfs_overlay,
        huge_pages,
        template,
        process,
        container,
        hostname,
        vcpus,
        mem_mib,
        kernel: annotations.get(ANN_KERNEL).map(PathBuf::from),
        kernel_params,
        boot_timeout,
        mounts,
        annotations,
        network,
        publish,
        limits,
        ignored_limits,
        cgroups_path,
    })
}

fn network_plan(spec: &Spec) -> anyhow::Result<NetworkPlan> {
    let namespaces = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref());
    let Some(ns) = namespaces
        .into_iter()
        .flatten()
        .find(|n| n.typ() == LinuxNamespaceType::Network)
    else {
        return Ok(NetworkPlan::Host);
    };
    let Some(path) = ns.path() else {
        return Ok(NetworkPlan::Empty);
    };
    if !path.is_absolute() {
        bail!("network namespace path {} must be absolute", path.display());
    }
    if !path.exists() {
        bail!("network namespace {} does not exist", path.display());
    }
    Ok(NetworkPlan::Join(path.clone()))
}

/// The hostname goes on the kernel command line, so it must be one word.
fn check_hostname(h: &str) -> anyhow::Result<()> {
    let ok = h.len() <= 64
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !ok {
        bail!("invalid hostname {h:?}: use at most 64 letters, digits, '-' and '.'");
    }
    Ok(())
}

/// A `true`/`false` annotation, `default` when absent.
fn flag(ann: &BTreeMap<String, String>, key: &str, default: bool) -> anyhow::Result<bool> {
    match ann.get(key).map(String::as_str) {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(v) => bail!("annotation {key}={v:?} must be true or false"),
    }
}

fn number(key: &str, v: &str) -> anyhow::Result<u64> {
    v.parse()
        .with_context(|| format!("annotation {key}={v:?} is not a whole number"))
}

/// vCPUs and memory: annotations win, then `linux.resources`, then defaults.
fn vm_size(spec: &Spec, ann: &BTreeMap<String, String>) -> anyhow::Result<(u32, u64)> {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let mut vcpus = 1u32;
    if let Some(cpu) = cpu {
        if let (Some(quota), Some(period)) = (cpu.quota(), cpu.period()) {
            if quota > 0 && period > 0 {
                vcpus = u32::try_from((quota as u64).div_ceil(period)).unwrap_or(u32::MAX);
            }
        } else if let Some(set) = cpu.cpus() {
            vcpus = cpuset_len(set)?;
        }
    }
    let limit = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|&l| l > 0);
    let mut mem_mib = match limit {
        Some(bytes) => ((bytes as u64).div_ceil(1 << 20) + GUEST_OVERHEAD_MIB).max(MIN_MEM_MIB),
        None => DEFAULT_MEM_MIB,
    };
    if let Some(v) = ann.get(ANN_VCPUS) {
        vcpus = u32::try_from(number(ANN_VCPUS, v)?)
            .with_context(|| format!("annotation {ANN_VCPUS}={v:?} is too large"))?;
    }
    if let Some(v) = ann.get(ANN_MEMORY) {
        mem_mib = number(ANN_MEMORY, v)?;
    }
    Ok((vcpus, mem_mib))
}

/// How many CPUs a cpuset string (`0-3,6`) names.
fn cpuset_len(set: &str) -> anyhow::Result<u32> {
    let mut n = 0u32;
    for part in set.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("invalid linux.resources.cpu.cpus {set:?}");
        n += match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) =
                    (a.parse().with_context(bad)?, b.parse().with_context(bad)?);
                if b < a {
                    bail!(bad());
                }
                b - a + 1
            }
            None => {
                part.parse::<u32>().with_context(bad)?;
                1
            }
        };
    }
    Ok(n.max(1))
}

/// The OCI process as the agent takes it.
pub fn process_spec(p: &oci_spec::runtime::Process) -> anyhow::Result<ProcessSpec> {
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() {
        bail!("process.args is empty: nothing to run");
    }
    let cwd = p
        .cwd()
        .to_str()
        .context("process.cwd is not UTF-8")?
        .to_owned();
    if !cwd.starts_with('/') {
        bail!("process.cwd {cwd:?} is not an absolute path");
    }
    let user = p.user();
    let rlimits = p
        .rlimits()
        .iter()
        .flatten()
        .map(|r| {
            Ok(Rlimit {
                kind: oci_name(&r.typ())?,
                hard: r.hard(),
                soft: r.soft(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(ProcessSpec {
        args,
        env: p.env().clone().unwrap_or_default(),
        cwd,
        uid: user.uid(),
        gid: user.gid(),
        terminal: p.terminal().unwrap_or(false),
        console_size: p.console_size().as_ref().map(|b| ConsoleSize {
            height: u16::try_from(b.height()).unwrap_or(u16::MAX),
            width: u16::try_from(b.width()).unwrap_or(u16::MAX),
        }),
        additional_gids: user.additional_gids().clone().unwrap_or_default(),
        umask: user.umask(),
        rlimits,
        no_new_privileges: p.no_new_privileges().unwrap_or(false),
        capabilities: p.capabilities().as_ref().map(capabilities).transpose()?,
        // The container's, from linux.seccomp (execs get it too).
        seccomp: None,
        oom_score_adj: match p.oom_score_adj() {
            Some(v) if !(-1000..=1000).contains(&v) => {
                bail!("process.oomScoreAdj {v} is outside -1000..1000")
            }
            v => v,
        },
        // The container init's: the monitor adds `Plan::container`.
        container: None,
        join_container: false,
    })
}

/// `linux.seccomp` for the agent, which compiles it (a listener, which
/// would live on the host, cannot reach the guest's kernel).
fn seccomp(s: &oci_spec::runtime::LinuxSeccomp) -> anyhow::Result<Seccomp> {
    if s.listener_path().is_some() {
        bail!("linux.seccomp.listenerPath is not supported: the filter runs in the guest's kernel");
    }
    let syscalls = s
        .syscalls()
        .iter()
        .flatten()
        .map(|r| {
            Ok(SeccompRule {
                names: r.names().clone(),
                action: oci_name(&r.action())?,
                errno: r.errno_ret(),
                args: r
                    .args()
                    .iter()
                    .flatten()
                    .map(|a| {
                        Ok(SeccompArg {
                            index: u32::try_from(a.index()).unwrap_or(u32::MAX),
                            value: a.value(),
                            value_two: a.value_two().unwrap_or(0),
                            op: oci_name(&a.op())?,
                        })
                    })
                    .collect::<anyhow::Result<_>>()?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Seccomp {
        default_action: oci_name(&s.default_action())?,
        default_errno: s.default_errno_ret(),
        flags: s
            .flags()
            .iter()
            .flatten()
            .map(oci_name)
            .collect::<anyhow::Result<_>>()?,
        syscalls,
    })
}

/// The name a value serializes to in config.json (`CAP_CHOWN`, `RLIMIT_NOFILE`).
fn oci_name<T: serde::Serialize>(v: &T) -> anyhow::Result<String> {
    match serde_json::to_value(v)? {
        serde_json::Value::String(s) => Ok(s),
        other => bail!("unexpected OCI name {other}"),
    }
}

fn capabilities(c: &LinuxCapabilities) -> anyhow::Result<Capabilities> {
    let set = |s: &Option<oci_spec::runtime::Capabilities>| -> anyhow::Result<Vec<String>> {
        let mut names = s
            .iter()
            .flatten()
            .map(oci_name)
            .collect::<anyhow::Result<Vec<_>>>()?;
        names.sort();
        Ok(names)
    };
    Ok(Capabilities {
        bounding: set(c.bounding())?,
        effective: set(c.effective())?,
        inheritable: set(c.inheritable())?,
        permitted: set(c.permitted())?,
        ambient: set(c.ambient())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        dir
    }

    const FULL: &str = r#"{
        "ociVersion": "1.2.0",
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "box",
        "process": {
            "args": ["sh", "-c", "echo hi"],
            "env": ["PATH=/bin", "A=b"],
            "cwd": "/tmp",
            "terminal": false,
            "user": {"uid": 1000, "gid": 1001, "additionalGids": [5, 6], "umask": 63},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 512}],
            "noNewPrivileges": true,
            "capabilities": {"bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"]}
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "/srv/data"}
        ],
        "linux": {"resources": {"memory": {"limit": 536870912}, "cpu": {"quota": 150000, "period": 100000}}},
        "annotations": {"x": "y"}
    }"#;

    #[test]
    fn a_full_config_maps_to_the_vm_and_the_agent_process() {
        let b = bundle(FULL);
        let plan = load(b.path()).unwrap();
        assert_eq!(plan.rootfs, b.path().canonicalize().unwrap().join("rootfs"));
        assert!(plan.rootfs_ro);
        assert_eq!(plan.hostname.as_deref(), Some("box"));
        assert_eq!((plan.vcpus, plan.mem_mib), (2, 512 + GUEST_OVERHEAD_MIB));
        assert_eq!(plan.boot_timeout, DEFAULT_BOOT_TIMEOUT);
        assert_eq!(
            plan.mounts.unsupported,
            ["/data (its source does not exist)"]
        );
        let p = plan.process;
        assert_eq!(p.args, ["sh", "-c", "echo hi"]);
        assert_eq!(p.env, ["PATH=/bin", "A=b"]);
        assert_eq!((p.cwd.as_str(), p.uid, p.gid), ("/tmp", 1000, 1001));
        assert_eq!(p.additional_gids, [5, 6]);
        assert_eq!(p.umask, Some(63));
        assert_eq!(
            p.rlimits,
            [Rlimit {
                kind: "RLIMIT_NOFILE".into(),
                hard: 1024,
                soft: 512
            }]
        );
        assert!(p.no_new_privileges);
        let caps = p.capabilities.unwrap();
        assert_eq!(caps.bounding, ["CAP_CHOWN", "CAP_KILL"]);
        assert_eq!(caps.effective, ["CAP_KILL"]);
        assert!(caps.ambient.is_empty());
    }

    #[test]
    fn annotations_size_the_vm() {
        let config = FULL.replace(
            r#""annotations": {"x": "y"}"#,
            r#""annotations": {"io.runvm.vcpus": "3", "io.runvm.memory_mib": "1024", "io.runvm.kernel": "/k", "io.runvm.boot_timeout": "600"}"#,
        );
        let plan = load(bundle(&config).path()).unwrap();
        assert_eq!((plan.vcpus, plan.mem_mib), (3, 1024));
        assert_eq!(plan.kernel.as_deref(), Some(Path::new("/k")));
        assert_eq!(plan.boot_timeout, Duration::from_secs(600));
    }

    #[test]
    fn a_minimal_config_gets_the_defaults() {
        let b = bundle(
            r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs"}, "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}}"#,
        );
        let plan = load(b.path()).unwrap();
        assert_eq!((plan.vcpus, plan.mem_mib), (1, DEFAULT_MEM_MIB));
        assert!(!plan.rootfs_ro);
        assert_eq!(plan.hostname, None);
        assert!(plan.process.capabilities.is_none());
    }

    #[test]
    fn the_network_namespace_decides_where_the_nic_comes_from() {
        let with = |namespaces: &str| {
            let config = FULL.replace(
                r#""linux": {"#,
                &format!(r#""linux": {{"namespaces": [{namespaces}], "#),
            );
            load(bundle(&config).path())
        };
        assert_eq!(
            load(bundle(FULL).path()).unwrap().network,
            NetworkPlan::Host
        );
        assert_eq!(
            with(r#"{"type": "mount"}"#).unwrap().network,
            NetworkPlan::Host
        );
        assert_eq!(
            with(r#"{"type": "mount"}, {"type": "network"}"#)
                .unwrap()
                .network,
            NetworkPlan::Empty
        );
        let ns = tempfile::NamedTempFile::new().unwrap();
        let joined = with(&format!(
            r#"{{"type": "network", "path": "{}"}}"#,
            ns.path().display()
        ))
        .unwrap();
        assert_eq!(joined.network, NetworkPlan::Join(ns.path().to_owned()));
        let e = with(r#"{"type": "network", "path": "/run/netns/no-such-ns"}"#).unwrap_err();
        assert!(
            format!("{e:#}").contains("network namespace /run/netns/no-such-ns does not exist"),
            "{e:#}"
        );
        let e = with(r#"{"type": "network", "path": "netns/x"}"#).unwrap_err();
        assert!(format!("{e:#}").contains("must be absolute"), "{e:#}");
    }

    #[test]
    fn the_seccomp_profile_goes_to_the_agent_with_oci_names() {
        let config = FULL.replace(
            r#""linux": {"#,
            r#""linux": {"seccomp": {
                "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
                "architectures": ["SCMP_ARCH_X86_64"],
                "flags": ["SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
                "syscalls": [
                    {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                    {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
                     "args": [{"index": 0, "value": 8, "op": "SCMP_CMP_EQ"}]},
                    {"names": ["clone"], "action": "SCMP_ACT_KILL_PROCESS",
                     "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}
                ]}, "#,
        );
        let s = load(bundle(&config).path())
            .unwrap()
            .process
            .seccomp
            .unwrap();
        assert_eq!(s.default_action, "SCMP_ACT_ERRNO");
        assert_eq!(s.default_errno, Some(38));
        assert_eq!(s.flags, ["SECCOMP_FILTER_FLAG_SPEC_ALLOW"]);
        assert_eq!(s.syscalls.len(), 3);
        assert_eq!(s.syscalls[0].names, ["read", "write"]);
        assert_eq!(s.syscalls[1].args[0].op, "SCMP_CMP_EQ");
        assert_eq!(s.syscalls[2].action, "SCMP_ACT_KILL_PROCESS");
        assert_eq!(
            (
                s.syscalls[2].args[0].op.as_str(),
                s.syscalls[2].args[0].value
            ),
            ("SCMP_CMP_MASKED_EQ", 2114060288)
        );
        assert!(load(bundle(FULL).path()).unwrap().process.seccomp.is_none());

        let listener = FULL.replace(
            r#""linux": {"#,
            r#""linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/run/l.sock"}, "#,
        );
        let e = load(bundle(&listener).path()).unwrap_err();
        assert!(format!("{e:#}").contains("listenerPath"), "{e:#}");
    }

    /// The plan of [`FULL`] with one annotation, `key=v`.
    fn with_annotation(key: &str, v: &str) -> anyhow::Result<Plan> {
        let config = FULL.replace(
            r#""annotations": {"x": "y"}"#,
            &format!(r#""annotations": {{"{key}": "{v}"}}"#),
        );
        load(bundle(&config).path())
    }

    #[test]
    fn the_overlay_annotation_is_a_boolean() {
        let with = |v: &str| with_annotation(ANN_ROOTFS_OVERLAY, v);
        assert!(with("true").unwrap().rootfs_overlay);
        assert!(!with("false").unwrap().rootfs_overlay);
        assert!(!load(bundle(FULL).path()).unwrap().rootfs_overlay);
        let e = with("yes").unwrap_err();
        assert!(format!("{e:#}").contains("must be true or false"), "{e:#}");
    }

    #[test]
    fn huge_pages_are_on_unless_the_annotation_says_false() {
        let with = |v: &str| with_annotation(ANN_HUGE_PAGES, v);
        assert!(load(bundle(FULL).path()).unwrap().huge_pages);
        assert!(with("true").unwrap().huge_pages);
        assert!(!with("false").unwrap().huge_pages);
        let e = with("off").unwrap_err();
        assert!(
            format!("{e:#}").contains("io.runvm.huge_pages=\"off\" must be true or false"),
            "{e:#}"
        );
    }

    #[test]
    fn published_ports_need_a_network_namespace_to_reach() {
        let e = with_annotation(ANN_PUBLISH, "8080:80").unwrap_err();
        assert!(
            format!("{e:#}").contains("needs a network namespace with a path"),
            "{e:#}"
        );
        let e = with_annotation(ANN_PUBLISH, "8080:x").unwrap_err();
        assert!(format!("{e:#}").contains("is not a port"), "{e:#}");
    }

    #[test]
    fn kernel_params_come_from_the_annotation_checked() {
        let with = |v: &str| with_annotation(ANN_KERNEL_PARAMS, v);
        assert!(load(bundle(FULL).path()).unwrap().kernel_params.is_empty());
        assert_eq!(
            with("mitigations=off nosmt").unwrap().kernel_params,
            ["mitigations=off", "nosmt"]
        );
        let e = with("init=/bin/sh").unwrap_err();
        assert!(
            format!("{e:#}").contains("io.runvm.kernel_params: init is set by runvm"),
            "{e:#}"
        );
    }

    #[test]
    fn cpusets_are_counted() {
        assert_eq!(cpuset_len("0-3,6").unwrap(), 5);
        assert_eq!(cpuset_len("2").unwrap(), 1);
        assert!(cpuset_len("3-1").is_err());
        assert!(cpuset_len("x").is_err());
    }

    #[test]
    fn bad_bundles_get_clear_errors() {
        let cases: &[(&str, &str)] = &[
            ("not json", "invalid"),
            (
                r#"{"ociVersion": "1.2.0", "root": {"path": "nope"}, "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}}"#,
                "rootfs",
            ),
            (
                r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs"}}"#,
                "no process",
            ),
            (
                r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs"}, "process": {"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}}"#,
                "nothing to run",
            ),
            (
                r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs"}, "process": {"args": ["true"], "cwd": "rel", "user": {"uid": 0, "gid": 0}}}"#,
                "absolute",
            ),
            (
                r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs"}, "hostname": "a b runvm.rootfs=x", "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}}"#,
                "invalid hostname",
            ),
            (
                r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs"}, "annotations": {"io.runvm.vcpus": "many"}, "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}}"#,
                "whole number",
            ),
        ];
        for (config, want) in cases {
            let err = format!("{:#}", load(bundle(config).path()).unwrap_err());
            assert!(err.contains(want), "{config}: {err}");
        }
        let empty = tempfile::tempdir().unwrap();
        let err = format!("{:#}", load(empty.path()).unwrap_err());
        assert!(err.contains("no config.json"), "{err}");
        let err = format!("{:#}", load(Path::new("/nonexistent/bundle")).unwrap_err());
        assert!(err.contains("does not exist"), "{err}");
    }
}
