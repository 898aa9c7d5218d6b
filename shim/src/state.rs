//! Container state on disk: one directory per container under `--root`,
//! holding `state.json` and the monitor's sockets and files. The monitor
//! records each transition; readers also check that the monitor still lives,
//! so a VMM that died reads as stopped.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// OCI container status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// `create` is booting the VM.
    Creating,
    /// The process is prepared in the guest, not started.
    Created,
    /// The process runs.
    Running,
    /// The VM's vCPUs are stopped (`runvm pause`).
    Paused,
    /// The process (or its VM) ended.
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Container ID.
    pub id: String,
    /// Absolute bundle path.
    pub bundle: PathBuf,
    /// Absolute rootfs path.
    pub rootfs: PathBuf,
    /// The monitor's PID once it runs.
    #[serde(default)]
    pub pid: Option<i32>,
    /// The monitor's start time (clock ticks after boot, /proc/PID/stat
    /// field 22), so a recycled PID is never mistaken for it.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// Status as the monitor last recorded it.
    pub status: Status,
    /// The container process's exit status, once stopped.
    #[serde(default)]
    pub exit_status: Option<i32>,
    /// RFC 3339 creation time.
    pub created: String,
    /// config.json annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The network namespace interfaces spliced to the VM, until the
    /// monitor undid it (`delete` undoes it for a monitor that was killed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkRecord>,
    /// The ports the monitor published, as bound (host ports the kernel
    /// chose filled in).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<crate::publish::Publish>,
    /// The VM's cgroup on the host, removed with the state (recorded
    /// before the monitor makes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cgroup: Option<PathBuf>,
}

/// Where the monitor changed a network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    /// The namespace's path.
    pub netns: PathBuf,
    /// The interfaces that got an ingress qdisc: index and name.
    pub spliced: Vec<(u32, String)>,
}

/// File names inside a container's directory. Short: socket paths must fit
/// in 108 bytes under deep roots such as containerd's.
pub const STATE_FILE: &str = "state.json";
/// The monitor's control socket.
pub const CONTROL_SOCKET: &str = "c.sock";
/// The VMM's hybrid vsock socket.
pub const VSOCK_SOCKET: &str = "v.sock";
/// The guest's serial console output.
pub const CONSOLE_LOG: &str = "console.log";
/// Why the monitor failed, for `create` to report.
pub const MONITOR_ERROR: &str = "monitor.err";
/// The VM's own initramfs part (its seed and mounts), after the agent's.
pub const INITRAMFS: &str = "initramfs.cpio";
/// The agent's initramfs part, when it could not be cached.
pub const AGENT_INITRAMFS: &str = "agent.cpio";

/// Checks a container ID the way runc does: letters, digits and `_+-.`,
/// not `.` or `..`.
pub fn validate_id(id: &str) -> anyhow::Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "_+-.".contains(c);
    if id.is_empty() || id == "." || id == ".." || !id.chars().all(ok_char) {
        bail!("invalid container ID {id:?}: use letters, digits and _+-. only");
    }
    if id.len() > 1024 {
        bail!("invalid container ID: longer than 1024 bytes");
    }
    Ok(())
}

/// The state root (`--root`).
#[derive(Debug, Clone)]
pub struct Root {
    path: PathBuf,
}

impl Root {
    /// The root at `path`; created on first use.
    pub fn new(path: &Path) -> Self {
        Root {
            path: path.to_owned(),
        }
    }

    /// The directory of container `id` (which need not exist).
    pub fn dir(&self, id: &str) -> PathBuf {
        self.path.join(id)
    }

    /// Creates the directory for a new container; fails if `id` exists.
    pub fn create(&self, id: &str) -> anyhow::Result<ContainerDir> {
        validate_id(id)?;
        let dir = self.dir(id);
        fs::create_dir_all(&self.path)
            .with_context(|| format!("cannot create state root {}", self.path.display()))?;
        match fs::create_dir(&dir) {
            Ok(()) => Ok(ContainerDir { dir }),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                bail!("container with id {id:?} already exists")
            }
            Err(e) => Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }

    /// An existing container's directory.
    pub fn open(&self, id: &str) -> anyhow::Result<ContainerDir> {
        validate_id(id)?;
        let dir = self.dir(id);
        if !dir.join(STATE_FILE).exists() {
            bail!("container {id:?} does not exist");
        }
        Ok(ContainerDir { dir })
    }

    /// IDs of every container, sorted.
    pub fn ids(&self) -> anyhow::Result<Vec<String>> {
        let entries = match fs::read_dir(&self.path) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", self.path.display()))
            }
        };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().join(STATE_FILE).exists())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        ids.sort();
        Ok(ids)
    }
}

/// One container's directory.
#[derive(Debug, Clone)]
pub struct ContainerDir {
    dir: PathBuf,
}

impl ContainerDir {
    /// A file inside it.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The record as last written.
    pub fn load(&self) -> anyhow::Result<Record> {
        let path = self.file(STATE_FILE);
        let text = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("corrupt {}", path.display()))
    }

    /// The record with its status corrected for a monitor that is gone.
    pub fn load_live(&self) -> anyhow::Result<Record> {
        let mut r = self.load()?;
        if r.status != Status::Stopped && !monitor_alive(&r) {
            r.status = Status::Stopped;
        }
        Ok(r)
    }

    /// Replaces the record atomically (readers see the old or the new one).
    pub fn save(&self, r: &Record) -> anyhow::Result<()> {
        let tmp = self.file(".state.json.tmp");
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(&serde_json::to_vec_pretty(r)?)?;
        f.sync_all()?;
        fs::rename(&tmp, self.file(STATE_FILE))
            .with_context(|| format!("cannot replace {}", self.file(STATE_FILE).display()))
    }

    /// Removes the directory and everything in it.
    pub fn remove(self) -> anyhow::Result<()> {
        if let Some(cgroup) = self.load().ok().and_then(|r| r.host_cgroup) {
            if let Err(e) = crate::host_cgroup::remove(&cgroup) {
                crate::logger::warn(&format!("{e:#}"));
            }
        }
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", self.dir.display())),
        }
    }
}

/// Whether the record's monitor process still runs (and is the same process).
pub fn monitor_alive(r: &Record) -> bool {
    match (r.pid, r.pid_start) {
        (Some(pid), Some(start)) => process_start_time(pid) == Some(start),
        _ => false,
    }
}

/// Field 22 of /proc/PID/stat (start time in clock ticks), or `None` if the
/// process does not exist. A zombie counts as gone: it runs nothing.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields resume after
    // the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state).
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Now as RFC 3339 UTC with nanoseconds, like runc's `created`.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn ids_follow_runc_rules() {
        for ok in ["a", "abc-1.2_x+y", "0123456789abcdef"] {
            validate_id(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "../x", "a b", "é"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000Z"
        );
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_709_210_096, 5);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.000000005Z");
    }

    fn record(id: &str) -> Record {
        Record {
            id: id.into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            pid: None,
            pid_start: None,
            status: Status::Creating,
            exit_status: None,
            created: now_rfc3339(),
            annotations: BTreeMap::new(),
            network: None,
            published: Vec::new(),
            host_cgroup: None,
        }
    }

    #[test]
    fn a_container_dir_is_created_once_saved_listed_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::new(&tmp.path().join("root"));
        assert!(root.ids().unwrap().is_empty());
        let dir = root.create("c1").unwrap();
        let err = root.create("c1").unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        let mut r = record("c1");
        dir.save(&r).unwrap();
        assert_eq!(root.ids().unwrap(), ["c1"]);
        r.status = Status::Running;
        dir.save(&r).unwrap();
        assert_eq!(root.open("c1").unwrap().load().unwrap(), r);
        dir.remove().unwrap();
        assert!(root
            .open("c1")
            .unwrap_err()
            .to_string()
            .contains("does not exist"));
    }

    #[test]
    fn a_record_whose_monitor_is_gone_reads_as_stopped() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Root::new(tmp.path());
        let dir = root.create("c").unwrap();
        let mut r = record("c");
        r.status = Status::Running;
        // This test process stands in for a live monitor.
        r.pid = Some(std::process::id() as i32);
        r.pid_start = process_start_time(std::process::id() as i32);
        assert!(r.pid_start.is_some());
        dir.save(&r).unwrap();
        assert_eq!(dir.load_live().unwrap().status, Status::Running);
        // Same PID, other start time: a recycled PID.
        r.pid_start = r.pid_start.map(|s| s + 1);
        dir.save(&r).unwrap();
        assert_eq!(dir.load_live().unwrap().status, Status::Stopped);
    }

    #[test]
    fn roots_deeper_than_a_socket_path_hold_containers_with_their_sockets() {
        // docker's runc shim: /var/run/docker/runtime-runc/moby/<64-hex ID>.
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("x".repeat(100));
        let dir = Root::new(&deep).create(&"a".repeat(64)).unwrap();
        let sock = dir.file(CONTROL_SOCKET);
        assert!(sock.as_os_str().len() > 108);
        let listener = vmm::unix_path::bind(&sock).unwrap();
        let _client = vmm::unix_path::connect(&sock).unwrap();
        assert!(listener.accept().is_ok());
    }
}
