//! Typed messages carried in frames. Requests, responses and events are JSON
//! (small, debuggable, versioned by the frame header); process output and
//! input travel as binary [`StreamChunk`]s so bulk data is never re-encoded.

use serde::{Deserialize, Serialize};

use crate::frame::{encode_frame, FrameError, FrameKind};

/// The process to run, as the host hands it over (a subset of the OCI
/// `process` object that grows with the agent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// argv; the first element is resolved against PATH in `env`.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory.
    #[serde(default = "root_dir")]
    pub cwd: String,
    /// User ID.
    #[serde(default)]
    pub uid: u32,
    /// Group ID.
    #[serde(default)]
    pub gid: u32,
    /// Allocate a terminal (stdout and stderr are then one stream).
    #[serde(default)]
    pub terminal: bool,
    /// The terminal's initial size (24x80 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_size: Option<ConsoleSize>,
    /// Supplementary group IDs (none when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub additional_gids: Vec<u32>,
    /// File mode creation mask; the agent's own (0o022) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umask: Option<u32>,
    /// Resource limits, applied before the process starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<Rlimit>,
    /// Sets no_new_privs: exec can never grant privileges (setuid bits,
    /// file capabilities).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_new_privileges: bool,
    /// The capability sets; when absent the process keeps what its user
    /// gets by default (everything for root, nothing otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// The seccomp filter the process runs under (the OCI spec's
    /// `linux.seccomp`, which also binds every exec).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seccomp: Option<Seccomp>,
    /// The process's `oom_score_adj` (-1000..=1000): how readily the
    /// guest's OOM killer picks it (Kubernetes sets it per QoS class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_score_adj: Option<i32>,
    /// Only for the container's init: what it makes of its own as it
    /// starts (the spec's PID, IPC and UTS namespaces, masked and
    /// read-only paths).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerSetup>,
    /// For an exec: join the namespaces the container's init made, as
    /// `runc exec` does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join_container: bool,
}

/// A namespace kind a container gets of its own inside the guest. The
/// mount and cgroup namespaces are the agent's at boot; the network is the
/// VM's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Namespace {
    /// Process IDs: the container's process is PID 1 and sees only its
    /// own processes in /proc.
    Pid,
    /// System V IPC and POSIX message queues.
    Ipc,
    /// Host and domain name.
    Uts,
}

/// What the container's init sets up for the whole container (the OCI
/// spec's `linux.namespaces`, `linux.maskedPaths` and
/// `linux.readonlyPaths`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSetup {
    /// Namespaces to make.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Namespace>,
    /// Paths hidden from the container: an empty read-only directory or
    /// `/dev/null` is mounted over each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masked_paths: Vec<String>,
    /// Paths the container may only read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub readonly_paths: Vec<String>,
    /// Device nodes to make (the spec's `linux.devices`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<GuestDevice>,
    /// Kernel parameters by name (`vm.max_map_count` -> `262144`), the
    /// spec's `linux.sysctl`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sysctls: std::collections::BTreeMap<String, String>,
}

/// A device node in the container: the guest kernel's device of that
/// number (a host device is not passed through; `/dev/fuse`, 10:229, is
/// the guest's FUSE).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestDevice {
    /// Absolute path in the container.
    pub path: String,
    /// `c` (character), `b` (block) or `p` (FIFO).
    pub kind: char,
    /// Major number.
    #[serde(default)]
    pub major: u32,
    /// Minor number.
    #[serde(default)]
    pub minor: u32,
    /// Permission bits (0o666 when absent, as runc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
    /// Owner.
    #[serde(default)]
    pub uid: u32,
    /// Group.
    #[serde(default)]
    pub gid: u32,
}

/// Whether `path` is absolute, without `..` parts or NUL bytes: what the
/// host and the agent both require of a path in the container (masked,
/// read-only and device paths, mount destinations).
pub fn is_container_path(path: &str) -> bool {
    path.starts_with('/') && !path.contains('\0') && !path.split('/').any(|c| c == "..")
}

/// The file below `/proc/sys` that a sysctl key names: dots separate its
/// parts (`net.ipv4.ip_forward` is `net/ipv4/ip_forward`), or, as runc
/// also takes them, slashes where a part holds a dot
/// (`net/ipv4/conf/eth0.1/rp_filter`). `None` for anything else: only
/// letters, digits, `_`, `-` and the separators, no empty, `.` or `..` part.
pub fn sysctl_file(key: &str) -> Option<String> {
    if key.is_empty() || key.len() > 256 {
        return None;
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b))
    {
        return None;
    }
    let sep = if key.contains('/') { '/' } else { '.' };
    let parts: Vec<&str> = key.split(sep).collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return None;
    }
    Some(parts.join("/"))
}

impl ContainerSetup {
    /// Whether there is nothing to set up.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.devices.is_empty()
            && self.masked_paths.is_empty()
            && self.readonly_paths.is_empty()
            && self.sysctls.is_empty()
    }
}

/// A seccomp profile, with the OCI spec's names (`SCMP_ACT_ERRNO`,
/// `SCMP_CMP_MASKED_EQ`, `SECCOMP_FILTER_FLAG_LOG`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seccomp {
    /// What a system call no rule matches gets.
    pub default_action: String,
    /// The errno of a default `SCMP_ACT_ERRNO` (EPERM when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_errno: Option<u32>,
    /// `seccomp(2)` flags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    /// Rules.
    #[serde(default)]
    pub syscalls: Vec<SeccompRule>,
}

/// System calls that get `action` when all of `args` hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompRule {
    /// System call names (ones this architecture lacks are skipped).
    pub names: Vec<String>,
    /// The action.
    pub action: String,
    /// The errno of `SCMP_ACT_ERRNO` (EPERM when absent), or the data of
    /// `SCMP_ACT_TRACE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<u32>,
    /// Conditions on the arguments, all of which must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<SeccompArg>,
}

/// A condition on one system call argument.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompArg {
    /// Argument index, 0 to 5.
    pub index: u32,
    /// The value compared with (the mask for `SCMP_CMP_MASKED_EQ`).
    pub value: u64,
    /// The masked value `SCMP_CMP_MASKED_EQ` wants.
    #[serde(default)]
    pub value_two: u64,
    /// `SCMP_CMP_EQ`, `SCMP_CMP_NE`, `SCMP_CMP_LT`, ...
    pub op: String,
}

/// The guest's network as the host decided it (from CNI, a bridge, or the
/// user's flags).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Interfaces to bring up.
    #[serde(default)]
    pub interfaces: Vec<InterfaceConfig>,
    /// Routes, added after every interface is up.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Resolver configuration, written to the container's
    /// `/etc/resolv.conf`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
}

/// One NIC, identified by the MAC the VMM gave it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    /// `02:00:00:00:00:01`
    pub mac: String,
    /// IPv4 address with prefix length (`10.0.0.2/24`); none leaves the
    /// interface up without an address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// IPv6 addresses with prefix length (`fd00:1::2/64`), used at once
    /// (no duplicate address detection: the engine already ran it for the
    /// namespace's interface, whose address this is). The kernel makes
    /// the link-local address itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipv6: Vec<String>,
    /// MTU; the driver's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// An IPv4 or IPv6 route; the destination's family is the route's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `default` (IPv4), `::/0` (the IPv6 default) or a network with
    /// prefix length (`10.1.0.0/16`, `fd00:2::/64`).
    pub destination: String,
    /// Next hop, of the destination's family (an IPv6 link-local one
    /// needs `mac`); none for a directly connected network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// MAC of the interface to use; the kernel picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// resolv.conf contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Name server addresses.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Search domains.
    #[serde(default)]
    pub search: Vec<String>,
    /// Resolver options (`ndots:2`).
    #[serde(default)]
    pub options: Vec<String>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleSize {
    /// Rows.
    pub height: u16,
    /// Columns.
    pub width: u16,
}

/// One resource limit, as in the OCI spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimit {
    /// `RLIMIT_NOFILE`, `RLIMIT_NPROC`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Hard limit.
    pub hard: u64,
    /// Soft limit.
    pub soft: u64,
}

/// Capability sets by OCI name (`CAP_NET_BIND_SERVICE`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// The bounding set: what the process and its children can ever have.
    #[serde(default)]
    pub bounding: Vec<String>,
    /// Effective.
    #[serde(default)]
    pub effective: Vec<String>,
    /// Inheritable.
    #[serde(default)]
    pub inheritable: Vec<String>,
    /// Permitted.
    #[serde(default)]
    pub permitted: Vec<String>,
    /// Ambient (kept across exec of unprivileged programs).
    #[serde(default)]
    pub ambient: Vec<String>,
}

fn root_dir() -> String {
    "/".into()
}

/// What the host asks of the agent. `seq` pairs each request with its response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Chosen by the host; echoed in the response.
    pub seq: u64,
    /// The operation.
    #[serde(flatten)]
    pub op: Op,
}

/// Operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Prepare a process; it starts on [`Op::Start`].
    Create {
        /// Handle the host uses for it from now on (stream frames carry it).
        handle: u32,
        /// What to run.
        process: Box<ProcessSpec>,
    },
    /// Start a created process.
    Start {
        /// Its handle.
        handle: u32,
    },
    /// Send a signal to a running process.
    Signal {
        /// Its handle.
        handle: u32,
        /// Signal number.
        signal: i32,
    },
    /// Close the process's stdin (EOF reaches it; on a terminal, the
    /// end-of-file character).
    CloseStdin {
        /// Its handle.
        handle: u32,
    },
    /// Resize a process's terminal (it gets SIGWINCH).
    ResizeTerminal {
        /// Its handle.
        handle: u32,
        /// The new size.
        size: ConsoleSize,
    },
    /// Configure the guest's network: interfaces (found by MAC), routes,
    /// DNS. The VM is the sandbox, so this is the guest's own network.
    ConfigureNetwork {
        /// What to set up.
        network: Box<NetworkConfig>,
    },
    /// The processes of the container (not the agent's own).
    ListProcesses,
    /// The guest's CPU and memory use.
    Stats,
    /// Set limits on the container's cgroup in the guest (its processes
    /// and every exec share it); fields left out keep their value.
    UpdateResources {
        /// The new limits.
        resources: Resources,
    },
    /// The first request to a guest restored from a template snapshot,
    /// which booted without anything of its container's: everything a
    /// booting guest reads from its command line and its own archive. Any
    /// other guest refuses it.
    Setup {
        /// What the guest is to be.
        setup: Box<GuestSetup>,
    },
    /// Check the agent is alive.
    Ping,
    /// Sync the guest's filesystems and end the VM (processes are killed).
    Shutdown,
}

/// What [`Op::Setup`] hands a guest restored from a template.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSetup {
    /// Random bytes the guest's pool is seeded and reseeded from: every
    /// guest restored from one template starts with the template's pool.
    pub seed: Vec<u8>,
    /// The host's wall clock (seconds and nanoseconds since the epoch):
    /// the guest's stopped when the template was taken.
    pub realtime: (i64, u32),
    /// Each NIC's address in the template and the one it is to have now
    /// (the guest's driver read the template's when it found the NIC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub macs: Vec<(String, String)>,
    /// virtio-fs tag of the container's root filesystem.
    pub rootfs_tag: String,
    /// Mount it read-only.
    #[serde(default)]
    pub rootfs_ro: bool,
    /// Give the container a writable overlay on a read-only share.
    #[serde(default)]
    pub rootfs_overlay: bool,
    /// The guest's hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The container's mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<GuestMount>,
    /// The files that `file` mounts copy in, by number.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copied_files: Vec<Vec<u8>>,
}

/// The agent's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The request's `seq`.
    pub seq: u64,
    /// How it went.
    #[serde(flatten)]
    pub result: Outcome,
}

/// Outcome of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// Done; `pid` is set for `start`.
    Ok {
        /// The started process's PID in the guest.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
    },
    /// Answer to [`Op::ListProcesses`].
    Processes {
        /// By PID.
        processes: Vec<GuestProcess>,
    },
    /// Answer to [`Op::Stats`].
    Stats {
        /// The figures.
        stats: GuestStats,
    },
    /// Refused or failed.
    Error {
        /// Why, for a person.
        message: String,
    },
}

/// A mount the agent sets up in the container's mount namespace once the
/// rootfs is its root (the OCI spec's `mounts`, as the host mapped them:
/// bind mounts of host directories arrive as virtio-fs shares).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestMount {
    /// Absolute path in the container.
    pub destination: String,
    /// `virtiofs`, `tmpfs`, `proc`, `sysfs`, `mqueue`, ..., or `file`: a
    /// copy of a host file bound onto the destination.
    pub fstype: String,
    /// The share's tag for virtiofs, the copied file's number for `file`,
    /// the type's name otherwise.
    pub source: String,
    /// Mount flags by name: `ro`, `nosuid`, `nodev`, `noexec`, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    /// Filesystem options (`size=64m,mode=1777`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub data: String,
}

/// Where the host puts the container's [`GuestMount`]s (JSON) in the
/// initramfs it boots the guest with.
pub const MOUNTS_FILE: &str = "runvm-mounts.json";

/// Random bytes the host draws for each VM and puts in its initramfs; the
/// agent credits them to the guest's random pool at boot.
pub const SEED_FILE: &str = "runvm-seed";

/// The initramfs directory holding the files that `file` mounts copy in
/// (mount source `N` is the file `N` there).
pub const COPIED_FILES_DIR: &str = "runvm-files";

/// One process in the container, as `ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestProcess {
    /// PID in the guest.
    pub pid: i32,
    /// Parent PID in the guest.
    pub ppid: i32,
    /// Real user ID.
    pub uid: u32,
    /// State letter (R, S, D, Z, ...).
    pub state: String,
    /// Command line (the command name in brackets when it has none).
    pub cmd: String,
}

/// Limits on the container's processes, as the guest's cgroup v2 takes
/// them. `None` leaves a limit as it is; a negative limit removes it
/// (`max`), as -1 does in the OCI spec.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// `memory.max`, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<i64>,
    /// `memory.low` (the OCI spec's reservation), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_low: Option<i64>,
    /// `cpu.max`: the quota per period, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<CpuMax>,
    /// `cpu.weight`, 1 to 10000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
    /// `pids.max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_max: Option<i64>,
}

impl Resources {
    /// Whether it sets nothing.
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }
}

/// A CPU bandwidth limit: `quota` microseconds in every `period` (a quota
/// of 0 or less: no limit), as runc writes `cpu.max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuMax {
    /// Microseconds of CPU time per period, over all CPUs.
    pub quota: i64,
    /// The period, in microseconds; `None` keeps the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<u64>,
}

/// The guest's resource use (the guest is the container's sandbox, so its
/// figures are the container's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    /// CPU time spent in user mode by all vCPUs, in nanoseconds.
    pub cpu_user_ns: u64,
    /// CPU time spent in the kernel, in nanoseconds.
    pub cpu_kernel_ns: u64,
    /// Busy time per vCPU, in nanoseconds.
    pub cpu_percpu_ns: Vec<u64>,
    /// Guest memory in use (total minus available), in bytes.
    pub memory_used: u64,
    /// Guest memory in all, in bytes.
    pub memory_total: u64,
    /// Processes in the container.
    pub pids: u64,
    /// The container cgroup's own figures, where it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<CgroupStats>,
}

/// What the container's cgroup in the guest reports (cgroup v2 files).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupStats {
    /// `memory.current`, in bytes.
    pub memory_current: u64,
    /// `memory.max` (`None`: no limit).
    pub memory_max: Option<u64>,
    /// `memory.events`: times usage hit the limit.
    pub memory_limit_hits: u64,
    /// `memory.events`: processes the OOM killer ended.
    pub oom_kills: u64,
    /// `pids.current`.
    pub pids_current: u64,
    /// `pids.max` (`None`: no limit).
    pub pids_max: Option<u64>,
    /// `cpu.stat`: CPU time, in microseconds.
    pub cpu_usage_usec: u64,
    /// `cpu.stat`: in user mode.
    pub cpu_user_usec: u64,
    /// `cpu.stat`: in the kernel.
    pub cpu_system_usec: u64,
    /// `cpu.stat`: quota periods that have passed.
    pub cpu_periods: u64,
    /// `cpu.stat`: periods in which the quota ran out.
    pub cpu_throttled_periods: u64,
    /// `cpu.stat`: time spent throttled, in microseconds.
    pub cpu_throttled_usec: u64,
}

/// Something the agent reports unasked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A process ended; its output streams have been flushed before this.
    Exited {
        /// Its handle.
        handle: u32,
        /// Exit code, or 128 + signal number, as a shell reports it.
        status: i32,
    },
    /// A stdin chunk for the process was written to it (or dropped, its
    /// input being closed or gone): the host sends the next one only after
    /// this, so a process that does not read its input holds up only its
    /// own stdin, and the guest never queues more than a chunk for it.
    StdinTaken {
        /// The process.
        handle: u32,
    },
}

/// Which standard stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamId {
    /// Host to process.
    Stdin = 0,
    /// Process to host.
    Stdout = 1,
    /// Process to host.
    Stderr = 2,
}

/// Bytes of one process stream. An empty chunk means end of stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamChunk {
    /// The process.
    pub handle: u32,
    /// The stream.
    pub stream: StreamId,
    /// The bytes; empty for EOF.
    pub data: Vec<u8>,
}

/// Why a payload does not decode.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Not valid JSON for the expected type.
    #[error("malformed message")]
    Json(#[from] serde_json::Error),
    /// A stream chunk shorter than its header or with an unknown stream.
    #[error("malformed stream chunk")]
    BadChunk,
    /// The frame could not be built.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

const CHUNK_HEADER: usize = 5;

impl StreamChunk {
    /// Largest data that fits one frame.
    pub const MAX_DATA: usize = crate::MAX_PAYLOAD as usize - CHUNK_HEADER;

    /// Payload layout: handle u32 LE | stream u8 | data.
    pub fn encode(&self) -> Result<Vec<u8>, MessageError> {
        let mut payload = Vec::with_capacity(CHUNK_HEADER + self.data.len());
        payload.extend_from_slice(&self.handle.to_le_bytes());
        payload.push(self.stream as u8);
        payload.extend_from_slice(&self.data);
        Ok(encode_frame(FrameKind::Stream, &payload)?)
    }

    /// Decodes a stream frame's payload.
    pub fn decode(payload: &[u8]) -> Result<Self, MessageError> {
        if payload.len() < CHUNK_HEADER {
            return Err(MessageError::BadChunk);
        }
        let handle = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
        let stream = match payload[4] {
            0 => StreamId::Stdin,
            1 => StreamId::Stdout,
            2 => StreamId::Stderr,
            _ => return Err(MessageError::BadChunk),
        };
        Ok(StreamChunk {
            handle,
            stream,
            data: payload[CHUNK_HEADER..].to_vec(),
        })
    }
}

/// Encodes a JSON message as a frame of `kind`.
pub fn encode_json<T: Serialize>(kind: FrameKind, msg: &T) -> Result<Vec<u8>, MessageError> {
    Ok(encode_frame(kind, &serde_json::to_vec(msg)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_updates_carry_only_what_they_change() {
        let req = Request {
            seq: 3,
            op: Op::UpdateResources {
                resources: Resources {
                    cpu_max: Some(CpuMax {
                        quota: 50_000,
                        period: None,
                    }),
                    pids_max: Some(-1),
                    ..Default::default()
                },
            },
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            r#"{"seq":3,"op":"update_resources","resources":{"cpu_max":{"quota":50000},"pids_max":-1}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
        assert!(Resources::default().is_empty());
        let unknown = r#"{"seq":3,"op":"update_resources","resources":{"swap":1}}"#;
        assert!(serde_json::from_str::<Request>(unknown).is_err());
    }

    #[test]
    fn a_templates_setup_has_a_pinned_format() {
        let req = Request {
            seq: 1,
            op: Op::Setup {
                setup: Box::new(GuestSetup {
                    seed: vec![1, 2],
                    realtime: (1_800_000_000, 7),
                    macs: vec![("02:72:76:74:70:00".into(), "0a:00:00:00:00:01".into())],
                    rootfs_tag: "rootfs".into(),
                    rootfs_ro: true,
                    ..Default::default()
                }),
            },
        };
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            r#"{"seq":1,"op":"setup","setup":{"seed":[1,2],"realtime":[1800000000,7],"macs":[["02:72:76:74:70:00","0a:00:00:00:00:01"]],"rootfs_tag":"rootfs","rootfs_ro":true,"rootfs_overlay":false}}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&json).unwrap(), req);
        let unknown =
            r#"{"seq":1,"op":"setup","setup":{"seed":[],"realtime":[0,0],"rootfs_tag":"r","x":1}}"#;
        assert!(serde_json::from_str::<Request>(unknown).is_err());
    }

    #[test]
    fn golden_json_pins_the_message_format() {
        let req = Request {
            seq: 7,
            op: Op::Create {
                handle: 1,
                process: Box::new(ProcessSpec {
                    args: vec!["sh".into()],
                    env: vec![],
                    cwd: "/".into(),
                    uid: 0,
                    gid: 0,
                    terminal: false,
                    ..Default::default()
                }),
            },
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"seq":7,"op":"create","handle":1,"process":{"args":["sh"],"env":[],"cwd":"/","uid":0,"gid":0,"terminal":false}}"#
        );
        let init = ProcessSpec {
            args: vec!["sh".into()],
            container: Some(ContainerSetup {
                namespaces: vec![Namespace::Pid, Namespace::Ipc, Namespace::Uts],
                devices: vec![],
                masked_paths: vec!["/proc/kcore".into()],
                readonly_paths: vec![],
                sysctls: [("vm.max_map_count".into(), "262144".into())].into(),
            }),
            ..Default::default()
        };
        let json = serde_json::to_string(&init).unwrap();
        assert_eq!(
            json,
            r#"{"args":["sh"],"env":[],"cwd":"","uid":0,"gid":0,"terminal":false,"container":{"namespaces":["pid","ipc","uts"],"masked_paths":["/proc/kcore"],"sysctls":{"vm.max_map_count":"262144"}}}"#
        );
        assert_eq!(serde_json::from_str::<ProcessSpec>(&json).unwrap(), init);
        let exec = ProcessSpec {
            args: vec!["sh".into()],
            join_container: true,
            ..Default::default()
        };
        let json = serde_json::to_string(&exec).unwrap();
        assert!(json.ends_with(r#""join_container":true}"#), "{json}");
        assert_eq!(serde_json::from_str::<ProcessSpec>(&json).unwrap(), exec);
        for (key, file) in [
            ("vm.max_map_count", Some("vm/max_map_count")),
            (
                "net/ipv4/conf/eth0.1/rp_filter",
                Some("net/ipv4/conf/eth0.1/rp_filter"),
            ),
            ("kernel.sem", Some("kernel/sem")),
            ("", None),
            ("vm..x", None),
            (".vm", None),
            ("net/../../etc", None),
            ("net/./x", None),
            ("kernel.shm max", None),
            ("vm/", None),
        ] {
            assert_eq!(sysctl_file(key).as_deref(), file, "{key:?}");
        }
        let unknown = r#"{"args":["sh"],"container":{"namespaces":["net"]}}"#;
        assert!(serde_json::from_str::<ProcessSpec>(unknown).is_err());
        let resp = Response {
            seq: 7,
            result: Outcome::Ok { pid: Some(42) },
        };
        assert_eq!(
            serde_json::to_string(&resp).unwrap(),
            r#"{"seq":7,"result":"ok","pid":42}"#
        );
        let net = Request {
            seq: 8,
            op: Op::ConfigureNetwork {
                network: Box::new(NetworkConfig {
                    interfaces: vec![InterfaceConfig {
                        mac: "02:00:00:00:00:01".into(),
                        address: Some("10.0.0.2/24".into()),
                        ipv6: vec!["fd00:1::2/64".into()],
                        mtu: None,
                    }],
                    routes: vec![
                        RouteConfig {
                            destination: "default".into(),
                            gateway: Some("10.0.0.1".into()),
                            mac: None,
                        },
                        RouteConfig {
                            destination: "::/0".into(),
                            gateway: Some("fe80::1".into()),
                            mac: Some("02:00:00:00:00:01".into()),
                        },
                    ],
                    dns: Some(DnsConfig {
                        servers: vec!["10.0.0.1".into()],
                        ..Default::default()
                    }),
                }),
            },
        };
        assert_eq!(
            serde_json::to_string(&net).unwrap(),
            r#"{"seq":8,"op":"configure_network","network":{"interfaces":[{"mac":"02:00:00:00:00:01","address":"10.0.0.2/24","ipv6":["fd00:1::2/64"]}],"routes":[{"destination":"default","gateway":"10.0.0.1"},{"destination":"::/0","gateway":"fe80::1","mac":"02:00:00:00:00:01"}],"dns":{"servers":["10.0.0.1"],"search":[],"options":[]}}}"#
        );
        let ev = Event::Exited {
            handle: 1,
            status: 137,
        };
        assert_eq!(
            serde_json::to_string(&ev).unwrap(),
            r#"{"event":"exited","handle":1,"status":137}"#
        );
        assert_eq!(
            serde_json::to_string(&Event::StdinTaken { handle: 2 }).unwrap(),
            r#"{"event":"stdin_taken","handle":2}"#
        );
    }

    #[test]
    fn defaults_fill_in_optional_process_fields() {
        let req: Request = serde_json::from_str(
            r#"{"seq":1,"op":"create","handle":3,"process":{"args":["true"]}}"#,
        )
        .unwrap();
        let Op::Create { process, .. } = req.op else {
            panic!("not a create")
        };
        assert_eq!(process.cwd, "/");
        assert!(!process.terminal);
    }

    #[test]
    fn unknown_ops_and_fields_are_errors_not_panics() {
        assert!(serde_json::from_str::<Request>(r#"{"seq":1,"op":"format_disk"}"#).is_err());
        assert!(serde_json::from_str::<Request>(
            r#"{"seq":1,"op":"create","handle":1,"process":{"args":[],"evil":1}}"#
        )
        .is_err());
        assert!(serde_json::from_slice::<Request>(b"\xff\xfe").is_err());
    }

    #[test]
    fn stream_chunks_round_trip_and_reject_garbage() {
        let c = StreamChunk {
            handle: 9,
            stream: StreamId::Stderr,
            data: b"oops".to_vec(),
        };
        let frame = c.encode().unwrap();
        assert_eq!(&frame[crate::HEADER_LEN..][..5], &[9, 0, 0, 0, 2]);
        assert_eq!(StreamChunk::decode(&frame[crate::HEADER_LEN..]).unwrap(), c);
        assert!(matches!(
            StreamChunk::decode(&[1, 0, 0]),
            Err(MessageError::BadChunk)
        ));
        assert!(matches!(
            StreamChunk::decode(&[1, 0, 0, 0, 9]),
            Err(MessageError::BadChunk)
        ));
    }
}
