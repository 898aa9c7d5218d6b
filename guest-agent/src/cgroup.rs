//! The container's cgroup in the guest: every container process (the init
//! and each exec) joins it between fork and exec, so the OCI spec's
//! `linux.resources` and `runvm update` limit exactly what runc would
//! limit, and the container sees its own limits under `/sys/fs/cgroup`
//! (a cgroup namespace rooted here, as Docker gives on cgroup v2). The
//! agent and its helpers stay in the root cgroup, outside every limit.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use runvm_protocol::{CgroupStats, Resources};

/// Where the agent mounts the cgroup2 hierarchy.
pub const HIERARCHY: &str = "/sys/fs/cgroup";
/// The container's cgroup, below the hierarchy's root.
pub const CONTAINER: &str = "container";

/// The controllers the container's limits need.
const CONTROLLERS: &[&str] = &["cpu", "memory", "pids"];

/// The container's cgroup, made and open for joining.
#[derive(Debug)]
pub struct ContainerCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, written by each new process with its own PID (0).
    procs: OwnedFd,
}

impl ContainerCgroup {
    /// Enables the controllers below `root` (a cgroup2 hierarchy's root)
    /// and makes the container's cgroup there. A controller the guest
    /// kernel lacks is left out: a limit that needs it is refused then.
    pub fn create(root: &Path) -> io::Result<Self> {
        let available = fs::read_to_string(root.join("cgroup.controllers"))?;
        let wanted: Vec<String> = CONTROLLERS
            .iter()
            .filter(|c| available.split_whitespace().any(|a| a == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if !wanted.is_empty() {
            fs::write(root.join("cgroup.subtree_control"), wanted.join(" "))?;
        }
        let dir = root.join(CONTAINER);
        match fs::create_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        let procs = OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))?;
        Ok(ContainerCgroup {
            dir,
            procs: procs.into(),
        })
    }

    /// The descriptor a new process writes `0` to, to join (kept open in
    /// the agent; the child inherits it across fork, not exec).
    pub fn procs_fd(&self) -> RawFd {
        self.procs.as_raw_fd()
    }

    /// Writes `r`'s limits, each checked before the first is written.
    pub fn apply(&self, r: &Resources) -> Result<(), String> {
        let files = files(r)?;
        for (name, _) in &files {
            if !self.dir.join(name).exists() {
                let controller = name.split('.').next().unwrap_or(name);
                return Err(format!(
                    "the guest kernel has no {controller} controller for {name}"
                ));
            }
        }
        for (name, value) in files {
            let mut f = OpenOptions::new()
                .write(true)
                .open(self.dir.join(name))
                .map_err(|e| format!("{name}: {e}"))?;
            f.write_all(value.as_bytes())
                .map_err(|e| format!("setting {name} to {value}: {e}"))?;
        }
        Ok(())
    }

    /// Its figures.
    pub fn stats(&self) -> io::Result<CgroupStats> {
        stats(&self.dir)
    }

    /// The value of one of the cgroup's files, trimmed.
    #[cfg(test)]
    fn read(&self, name: &str) -> io::Result<String> {
        let mut s = String::new();
        File::open(self.dir.join(name))?.read_to_string(&mut s)?;
        Ok(s.trim().to_owned())
    }
}

/// The figures of the cgroup at `dir`; files a controller the kernel lacks
/// would hold read as zero.
pub fn stats(dir: &Path) -> io::Result<CgroupStats> {
    let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
    let number = |name: &str| read(name).trim().parse::<u64>().unwrap_or(0);
    let max = |name: &str| {
        let v = read(name);
        match v.trim() {
            "max" | "" => None,
            n => n.parse().ok(),
        }
    };
    // `memory.current` exists in every cgroup but the root: its absence
    // means this is not a cgroup.
    let current = fs::read_to_string(dir.join("memory.current"))?;
    let events = read("memory.events");
    let cpu = read("cpu.stat");
    Ok(CgroupStats {
        memory_current: current.trim().parse().unwrap_or(0),
        memory_max: max("memory.max"),
        memory_limit_hits: keyed(&events, "max"),
        oom_kills: keyed(&events, "oom_kill"),
        pids_current: number("pids.current"),
        pids_max: max("pids.max"),
        cpu_usage_usec: keyed(&cpu, "usage_usec"),
        cpu_user_usec: keyed(&cpu, "user_usec"),
        cpu_system_usec: keyed(&cpu, "system_usec"),
        cpu_periods: keyed(&cpu, "nr_periods"),
        cpu_throttled_periods: keyed(&cpu, "nr_throttled"),
        cpu_throttled_usec: keyed(&cpu, "throttled_usec"),
    })
}

/// The value of `key` in a flat keyed file (`key value` lines); 0 if absent.
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

fn limit(v: i64) -> String {
    if v < 0 {
        "max".into()
    } else {
        v.to_string()
    }
}

/// The cgroup files `r` writes and their values, in a fixed order.
pub fn files(r: &Resources) -> Result<Vec<(&'static str, String)>, String> {
    let mut out = Vec::new();
    if let Some(v) = r.memory_low {
        out.push(("memory.low", limit(v)));
    }
    if let Some(v) = r.memory_max {
        out.push(("memory.max", limit(v)));
    }
    if let Some(c) = r.cpu_max {
        // The kernel's own bounds, checked here for a clearer message.
        let mut value = match c.quota {
            q if q <= 0 => "max".to_string(),
            q if q < 1_000 => return Err(format!("CPU quota {q} is below 1000 microseconds")),
            q => q.to_string(),
        };
        if let Some(p) = c.period {
            if !(1_000..=1_000_000).contains(&p) {
                return Err(format!(
                    "CPU period {p} is outside 1000..=1000000 microseconds"
                ));
            }
            value = format!("{value} {p}");
        }
        out.push(("cpu.max", value));
    }
    if let Some(w) = r.cpu_weight {
        if !(1..=10_000).contains(&w) {
            return Err(format!("CPU weight {w} is outside 1..=10000"));
        }
        out.push(("cpu.weight", w.to_string()));
    }
    if let Some(v) = r.pids_max {
        if v == 0 {
            return Err("a pids limit of 0 would forbid every process".into());
        }
        out.push(("pids.max", limit(v)));
    }
    Ok(out)
}

/// Enters a cgroup namespace rooted at `cgroup` without moving this
/// process there (a cgroup namespace takes its root from the cgroup of
/// the process that makes it, so a short-lived child makes it there and
/// this process joins it): the mount namespace holder mounts the
/// container's `/sys/fs/cgroup` from inside it, and never counts against
/// the container's limits.
pub fn enter_namespace_at(cgroup: &Path) -> Result<(), String> {
    use nix::sched::{setns, unshare, CloneFlags};
    use nix::sys::wait::waitpid;
    use nix::unistd::{fork, pipe, ForkResult};

    let (ready_r, ready_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
    let (done_r, done_w) = pipe().map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: the holder calling this is single-threaded (a fresh exec of
    // the agent binary), so the child may do anything the parent could.
    match unsafe { fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            drop((ready_r, done_w));
            let made = fs::write(cgroup.join("cgroup.procs"), "0").is_ok()
                && unshare(CloneFlags::CLONE_NEWCGROUP).is_ok();
            let mut ready = File::from(ready_w);
            if made {
                let _ = ready.write_all(b"x");
            }
            // Closed either way before waiting, so a failure reaches the
            // parent as end of file instead of leaving both waiting.
            drop(ready);
            // Holds the namespace until the parent has joined it.
            let _ = File::from(done_r).read(&mut [0u8; 1]);
            // SAFETY: ends the forked child without running the parent's
            // exit handlers.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop((ready_w, done_r));
            let mut byte = [0u8; 1];
            let ready = File::from(ready_r).read(&mut byte).unwrap_or(0) == 1;
            let joined = if ready {
                File::open(format!("/proc/{child}/ns/cgroup"))
                    .map_err(|e| format!("open the cgroup namespace: {e}"))
                    .and_then(|ns| {
                        setns(ns, CloneFlags::CLONE_NEWCGROUP)
                            .map_err(|e| format!("join the cgroup namespace: {e}"))
                    })
            } else {
                Err(format!(
                    "could not make a cgroup namespace at {}",
                    cgroup.display()
                ))
            };
            drop(done_w);
            let _ = waitpid(child, None);
            joined
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runvm_protocol::CpuMax;

    /// A directory laid out like a cgroup2 root with the given controllers.
    fn fake_root(controllers: &str, files: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), controllers).unwrap();
        fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        let dir = root.path().join(CONTAINER);
        fs::create_dir(&dir).unwrap();
        for f in files.iter().chain(&["cgroup.procs"]) {
            fs::write(dir.join(f), "").unwrap();
        }
        root
    }

    #[test]
    fn only_the_controllers_the_kernel_has_are_enabled() {
        let root = fake_root("cpuset cpu io memory", &[]);
        ContainerCgroup::create(root.path()).unwrap();
        assert_eq!(
            fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory"
        );
    }

    #[test]
    fn limits_become_cgroup_files() {
        let all = Resources {
            memory_max: Some(256 << 20),
            memory_low: Some(-1),
            cpu_max: Some(CpuMax {
                quota: 50_000,
                period: Some(100_000),
            }),
            cpu_weight: Some(100),
            pids_max: Some(64),
        };
        assert_eq!(
            files(&all).unwrap(),
            [
                ("memory.low", "max".to_string()),
                ("memory.max", "268435456".into()),
                ("cpu.max", "50000 100000".into()),
                ("cpu.weight", "100".into()),
                ("pids.max", "64".into()),
            ]
        );
        let unlimited = Resources {
            cpu_max: Some(CpuMax {
                quota: -1,
                period: Some(100_000),
            }),
            pids_max: Some(-1),
            ..Default::default()
        };
        assert_eq!(
            files(&unlimited).unwrap(),
            [
                ("cpu.max", "max 100000".to_string()),
                ("pids.max", "max".into())
            ]
        );
        // A quota alone keeps the period the kernel has.
        let quota_only = Resources {
            cpu_max: Some(CpuMax {
                quota: 20_000,
                period: None,
            }),
            ..Default::default()
        };
        assert_eq!(
            files(&quota_only).unwrap(),
            [("cpu.max", "20000".to_string())]
        );
        assert!(files(&Resources::default()).unwrap().is_empty());
    }

    #[test]
    fn out_of_range_limits_are_refused_with_the_reason() {
        let cases = [
            (
                Resources {
                    cpu_max: Some(CpuMax {
                        quota: 500,
                        period: Some(100_000),
                    }),
                    ..Default::default()
                },
                "below 1000",
            ),
            (
                Resources {
                    cpu_max: Some(CpuMax {
                        quota: 5_000,
                        period: Some(10),
                    }),
                    ..Default::default()
                },
                "period 10",
            ),
            (
                Resources {
                    cpu_weight: Some(0),
                    ..Default::default()
                },
                "weight 0",
            ),
            (
                Resources {
                    pids_max: Some(0),
                    ..Default::default()
                },
                "pids limit of 0",
            ),
        ];
        for (r, why) in cases {
            let e = files(&r).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn apply_writes_every_limit_or_none() {
        let root = fake_root("cpu memory pids", &["memory.max", "pids.max"]);
        let cg = ContainerCgroup::create(root.path()).unwrap();
        cg.apply(&Resources {
            memory_max: Some(1 << 30),
            pids_max: Some(10),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(cg.read("memory.max").unwrap(), "1073741824");
        assert_eq!(cg.read("pids.max").unwrap(), "10");
        // No cpu.weight file: a kernel without the controller. Nothing
        // else changes either.
        let e = cg
            .apply(&Resources {
                pids_max: Some(20),
                cpu_weight: Some(50),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.contains("no cpu controller for cpu.weight"), "{e}");
        assert_eq!(cg.read("pids.max").unwrap(), "10");
    }

    #[test]
    fn figures_come_from_the_cgroup_files() {
        let root = fake_root("cpu memory pids", &[]);
        let dir = root.path().join(CONTAINER);
        for (name, text) in [
            ("memory.current", "1048576\n"),
            ("memory.max", "67108864\n"),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n",
            ),
            ("pids.current", "3\n"),
            ("pids.max", "max\n"),
            (
                "cpu.stat",
                "usage_usec 5000\nuser_usec 3000\nsystem_usec 2000\nnr_periods 10\n\
                 nr_throttled 4\nthrottled_usec 800\n",
            ),
        ] {
            fs::write(dir.join(name), text).unwrap();
        }
        let s = stats(&dir).unwrap();
        assert_eq!(
            s,
            CgroupStats {
                memory_current: 1 << 20,
                memory_max: Some(64 << 20),
                memory_limit_hits: 12,
                oom_kills: 1,
                pids_current: 3,
                pids_max: None,
                cpu_usage_usec: 5000,
                cpu_user_usec: 3000,
                cpu_system_usec: 2000,
                cpu_periods: 10,
                cpu_throttled_periods: 4,
                cpu_throttled_usec: 800,
            }
        );
        // `oom_group_kill` is not `oom_kill`; a missing key reads 0.
        assert_eq!(keyed("oom_group_kill 5\n", "oom_kill"), 0);
        assert!(stats(root.path()).is_err(), "the root is no cgroup");
    }

    #[test]
    fn a_hierarchy_that_is_not_there_is_an_error() {
        let root = tempfile::tempdir().unwrap();
        assert!(ContainerCgroup::create(&root.path().join("nope")).is_err());
    }
}
