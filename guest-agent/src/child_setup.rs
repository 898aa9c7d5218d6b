//! What a new process does between fork and exec: join the container's
//! cgroup and its cgroup and mount namespaces, (the container's init) mount
//! its own /proc, the spec's device nodes and masked and read-only paths, set limits,
//! umask, groups, user, capabilities and no_new_privs. Everything is worked out in the parent ([`ChildSetup::new`],
//! where bad input becomes an error reply); the child only makes system
//! calls, since it is a fork of a multi-threaded process and must not
//! allocate.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::str::FromStr;

use runvm_protocol::{Capabilities, ProcessSpec};

use crate::cgroup::ContainerCgroup;
use crate::device_nodes::DeviceNodes;
use crate::masks::PathRules;
use crate::mount_ns::MountNs;
use crate::os_err::os_err;

/// Capability masks as the kernel takes them (bit n = capability n).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CapMasks {
    /// Bounding set.
    pub bounding: u64,
    /// Effective set.
    pub effective: u64,
    /// Permitted set.
    pub permitted: u64,
    /// Inheritable set.
    pub inheritable: u64,
    /// Ambient set.
    pub ambient: u64,
}

impl CapMasks {
    /// Parses OCI capability names; capabilities this kernel does not know
    /// (beyond `last_cap`) are left out, as runc does.
    pub fn from_spec(caps: &Capabilities, last_cap: u8) -> io::Result<Self> {
        let mask = |names: &[String]| -> io::Result<u64> {
            let mut m = 0u64;
            for name in names {
                let cap = caps::Capability::from_str(name).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("unknown capability {name:?}"),
                    )
                })?;
                if cap.index() <= last_cap {
                    m |= 1 << cap.index();
                }
            }
            Ok(m)
        };
        Ok(CapMasks {
            bounding: mask(&caps.bounding)?,
            effective: mask(&caps.effective)?,
            permitted: mask(&caps.permitted)?,
            inheritable: mask(&caps.inheritable)?,
            ambient: mask(&caps.ambient)?,
        })
    }
}

/// The highest capability number this kernel knows (read once).
pub fn last_cap() -> u8 {
    static LAST: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| caps::all().iter().map(|c| c.index()).max().unwrap_or(40))
    })
}

/// The OCI rlimit name's resource number.
fn rlimit_resource(name: &str) -> io::Result<libc::__rlimit_resource_t> {
    Ok(match name {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown rlimit {name:?}"),
            ))
        }
    })
}

/// A step of the child's setup, named in the error when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    /// Taking its stdin, stdout and stderr.
    Stdio = 1,
    /// Joining the container's cgroup.
    Cgroup,
    /// Writing `oom_score_adj`.
    OomScoreAdj,
    /// Joining the container's cgroup namespace.
    CgroupNs,
    /// Taking the terminal as its controlling terminal.
    Terminal,
    /// Joining the container's mount namespace.
    MountNs,
    /// Mounting its PID namespace's `/proc`.
    Proc,
    /// Making the spec's device nodes.
    Devices,
    /// The spec's masked and read-only paths.
    Masks,
    /// Changing to its working directory.
    Cwd,
    /// Setting its rlimits.
    Rlimits,
    /// Loading its seccomp filter.
    Seccomp,
    /// Setting its capabilities.
    Capabilities,
    /// Switching to its user and groups.
    User,
    /// Setting no_new_privs.
    NoNewPrivs,
    /// Finding its program.
    Lookup,
    /// The exec itself.
    Exec,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 17] = [
        Step::Stdio,
        Step::Cgroup,
        Step::OomScoreAdj,
        Step::CgroupNs,
        Step::Terminal,
        Step::MountNs,
        Step::Proc,
        Step::Devices,
        Step::Masks,
        Step::Cwd,
        Step::Rlimits,
        Step::Seccomp,
        Step::Capabilities,
        Step::User,
        Step::NoNewPrivs,
        Step::Lookup,
        Step::Exec,
    ];

    /// The step numbered `n` (its `as u8`).
    pub fn from_u8(n: u8) -> Option<Step> {
        Step::ALL.into_iter().find(|s| *s as u8 == n)
    }
}

/// A step that failed in the child, and the system's reason.
#[derive(Debug)]
pub struct SetupError {
    /// What the child was doing.
    pub step: Step,
    /// Why it failed.
    pub error: io::Error,
}

/// Tags an error with the step it happened in.
pub fn at(step: Step) -> impl Fn(io::Error) -> SetupError {
    move |error| SetupError { step, error }
}

/// Everything the child applies, prepared in the parent.
#[derive(Debug)]
pub struct ChildSetup {
    /// The container cgroup's `cgroup.procs`.
    cgroup_procs: Option<RawFd>,
    cgroup_ns: Option<RawFd>,
    mount_ns: Option<RawFd>,
    /// `oom_score_adj`, as the bytes written to /proc/self/oom_score_adj.
    oom_score_adj: Option<Vec<u8>>,
    /// The container's init in a PID namespace of its own: its /proc.
    remount_proc: bool,
    /// The container's init: the spec's masked and read-only paths.
    paths: Option<PathRules>,
    /// The container's init: the spec's device nodes.
    devices: Option<DeviceNodes>,
    cwd: CString,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    umask: Option<libc::mode_t>,
    /// (uid, gid, supplementary groups) when they differ from the agent's.
    ids: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    caps: Option<CapMasks>,
    last_cap: u8,
    no_new_privs: bool,
    /// Make stdin (a terminal's slave side) the controlling terminal.
    controlling_tty: bool,
    /// The seccomp filters to load.
    seccomp: Option<crate::seccomp::Compiled>,
}

/// Writes `data` to the file at `path` (system calls only).
fn write_file(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: open reads the NUL-terminated path only.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: writes `data.len()` bytes from `data` to the descriptor just
    // opened.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let result = if n == data.len() as isize {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    // SAFETY: closes the descriptor opened above, used by nothing else.
    unsafe { libc::close(fd) };
    result
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

impl ChildSetup {
    /// Checks and converts `spec`; `root` is the container's mount
    /// namespace, `cgroup` the container's cgroup.
    pub fn new(
        root: Option<&MountNs>,
        cgroup: Option<&ContainerCgroup>,
        spec: &ProcessSpec,
    ) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        let mut rlimits = Vec::with_capacity(spec.rlimits.len());
        for r in &spec.rlimits {
            if r.soft > r.hard {
                return Err(invalid(format!(
                    "{}: soft limit {} above hard limit {}",
                    r.kind, r.soft, r.hard
                )));
            }
            let lim = libc::rlimit {
                rlim_cur: r.soft,
                rlim_max: r.hard,
            };
            rlimits.push((rlimit_resource(&r.kind)?, lim));
        }
        let umask = match spec.umask {
            Some(m) if m > 0o777 => return Err(invalid(format!("umask {m:o} is not a mode"))),
            m => m,
        };
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let same_ids = spec.uid == uid && spec.gid == gid && spec.additional_gids.is_empty();
        let last_cap = last_cap();
        let caps = spec
            .capabilities
            .as_ref()
            .map(|c| CapMasks::from_spec(c, last_cap))
            .transpose()?;
        // Only inside a container mount namespace: without one the
        // process would remount the agent's own /proc.
        let container = spec.container.as_ref().filter(|_| root.is_some());
        let paths = container
            .map(PathRules::new)
            .transpose()?
            .filter(|p| !p.is_empty());
        let devices = container
            .map(|c| DeviceNodes::new(&c.devices))
            .transpose()?
            .filter(|d| !d.is_empty());
        let oom_score_adj = match spec.oom_score_adj {
            Some(v) if !(-1000..=1000).contains(&v) => {
                return Err(invalid(format!("oom_score_adj {v} is outside -1000..1000")))
            }
            v => v.map(|v| v.to_string().into_bytes()),
        };
        Ok(ChildSetup {
            oom_score_adj,
            remount_proc: container
                .is_some_and(|c| c.namespaces.contains(&runvm_protocol::Namespace::Pid)),
            paths,
            devices,
            cgroup_procs: cgroup.map(ContainerCgroup::procs_fd),
            cgroup_ns: root.and_then(|ns| ns.cgroup_ns().map(|fd| fd.as_raw_fd())),
            mount_ns: root.map(|ns| ns.fd().as_raw_fd()),
            cwd: CString::new(spec.cwd.as_str())
                .map_err(|_| invalid("NUL byte in the working directory".into()))?,
            rlimits,
            umask,
            ids: (!same_ids).then(|| (spec.uid, spec.gid, spec.additional_gids.clone())),
            caps,
            last_cap,
            no_new_privs: spec.no_new_privileges,
            controlling_tty: spec.terminal,
            seccomp: spec
                .seccomp
                .as_ref()
                .map(crate::seccomp::compile)
                .transpose()?,
        })
    }

    /// Runs in the child between fork and exec: system calls only.
    pub fn apply(&self) -> Result<(), SetupError> {
        // Joined first, while the process is still root and before its
        // cgroup namespace hides the root cgroup it moves out of.
        if let Some(fd) = self.cgroup_procs {
            // SAFETY: writes one byte from a static buffer to a descriptor
            // the agent keeps open; "0" moves the writing process.
            let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            if n != 1 {
                return Err(at(Step::Cgroup)(io::Error::last_os_error()));
            }
        }
        if let Some(value) = &self.oom_score_adj {
            // While still privileged: lowering it takes CAP_SYS_RESOURCE.
            write_file(c"/proc/self/oom_score_adj", value).map_err(at(Step::OomScoreAdj))?;
        }
        if let Some(fd) = self.cgroup_ns {
            // SAFETY: the descriptor stays open in the agent (see mount_ns).
            os_err(unsafe { libc::setns(fd, libc::CLONE_NEWCGROUP) })
                .map_err(at(Step::CgroupNs))?;
        }
        // SAFETY: setsid has no memory effects; failure (already a leader)
        // is harmless.
        unsafe { libc::setsid() };
        if self.controlling_tty {
            // SAFETY: TIOCSCTTY takes an integer; stdin is the terminal.
            os_err(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) }).map_err(at(Step::Terminal))?;
        }
        if let Some(fd) = self.mount_ns {
            // SAFETY: the descriptor stays open in the agent for as long as
            // it runs; the child got a copy at fork.
            os_err(unsafe { libc::setns(fd, libc::CLONE_NEWNS) }).map_err(at(Step::MountNs))?;
        }
        if self.remount_proc {
            crate::masks::remount_proc().map_err(at(Step::Proc))?;
        }
        // Before the masks, which may hide one of them.
        if let Some(devices) = &self.devices {
            devices.apply().map_err(at(Step::Devices))?;
        }
        if let Some(paths) = &self.paths {
            paths.apply().map_err(at(Step::Masks))?;
        }
        // SAFETY: `cwd` is a valid NUL-terminated string.
        os_err(unsafe { libc::chdir(self.cwd.as_ptr()) }).map_err(at(Step::Cwd))?;
        for (resource, lim) in &self.rlimits {
            // SAFETY: `lim` is a valid rlimit.
            os_err(unsafe { libc::setrlimit(*resource, lim) }).map_err(at(Step::Rlimits))?;
        }
        if let Some(mask) = self.umask {
            // SAFETY: umask cannot fail.
            unsafe { libc::umask(mask) };
        }
        // Without no_new_privs, loading a filter takes CAP_SYS_ADMIN: load
        // it while the child still has it (the profile then also governs
        // the calls below, as under runc).
        if let (Some(filters), false) = (&self.seccomp, self.no_new_privs) {
            crate::seccomp::load(filters).map_err(at(Step::Seccomp))?;
        }
        if let Some(caps) = &self.caps {
            for cap in 0..=self.last_cap {
                if caps.bounding & (1 << cap) == 0 {
                    // SAFETY: prctl with integer arguments.
                    os_err(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap)) })
                        .map_err(at(Step::Capabilities))?;
                }
            }
            // Keep the permitted set across the switch to a non-root user.
            // SAFETY: prctl with integer arguments.
            os_err(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1 as libc::c_ulong) })
                .map_err(at(Step::Capabilities))?;
        }
        if let Some((uid, gid, groups)) = &self.ids {
            // SAFETY: `groups` holds groups.len() gids.
            os_err(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })
                .map_err(at(Step::User))?;
            // SAFETY: plain system calls.
            os_err(unsafe { libc::setgid(*gid) }).map_err(at(Step::User))?;
            // SAFETY: plain system call.
            os_err(unsafe { libc::setuid(*uid) }).map_err(at(Step::User))?;
        }
        if let Some(caps) = &self.caps {
            self.set_caps(caps).map_err(at(Step::Capabilities))?;
        }
        Ok(())
    }

    /// Runs in the child right before exec, after [`ChildSetup::apply`]
    /// (and, for a held process, after `start`): no_new_privs and the
    /// filter that needs it, as late as runc loads them.
    pub fn finish(&self) -> Result<(), SetupError> {
        if self.no_new_privs {
            // SAFETY: prctl with integer arguments.
            os_err(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) })
                .map_err(at(Step::NoNewPrivs))?;
            if let Some(filters) = &self.seccomp {
                crate::seccomp::load(filters).map_err(at(Step::Seccomp))?;
            }
        }
        Ok(())
    }

    /// The working directory it changes to.
    pub fn cwd(&self) -> &std::ffi::CStr {
        &self.cwd
    }

    fn set_caps(&self, caps: &CapMasks) -> io::Result<()> {
        // SAFETY: prctl with integer arguments.
        os_err(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0 as libc::c_ulong) })?;
        let mut header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let half = |m: u64, i: u32| (m >> (32 * i)) as u32;
        let data = [0, 1].map(|i| CapData {
            effective: half(caps.effective, i),
            permitted: half(caps.permitted, i),
            inheritable: half(caps.inheritable, i),
        });
        // SAFETY: capset reads a version 3 header and two data structs.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_capset,
                std::ptr::from_mut(&mut header),
                data.as_ptr(),
            )
        };
        os_err(rc as libc::c_int)?;
        // The kernel takes into the ambient set only capabilities that are
        // both permitted and inheritable; runc's own default spec lists
        // ambient ones with no inheritable set, and runc skips them too.
        let raisable = caps.ambient & caps.permitted & caps.inheritable;
        for cap in 0..=self.last_cap {
            if raisable & (1 << cap) != 0 {
                // SAFETY: prctl with integer arguments.
                os_err(unsafe {
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                        libc::c_ulong::from(cap),
                        0 as libc::c_ulong,
                        0 as libc::c_ulong,
                    )
                })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names_become_masks() {
        let caps = Capabilities {
            bounding: vec!["CAP_CHOWN".into(), "CAP_NET_BIND_SERVICE".into()],
            effective: vec!["CAP_CHOWN".into()],
            ..Default::default()
        };
        let m = CapMasks::from_spec(&caps, 40).unwrap();
        assert_eq!(m.bounding, 1 | 1 << 10);
        assert_eq!(m.effective, 1);
        assert_eq!(m.ambient, 0);
        // Beyond what the kernel knows: left out.
        let m = CapMasks::from_spec(&caps, 5).unwrap();
        assert_eq!(m.bounding, 1);
        let bad = Capabilities {
            permitted: vec!["CAP_FLY".into()],
            ..Default::default()
        };
        let err = CapMasks::from_spec(&bad, 40).unwrap_err();
        assert!(err.to_string().contains("CAP_FLY"), "{err}");
    }

    #[test]
    fn bad_limits_and_umasks_are_refused_in_the_parent() {
        let spec = |f: &dyn Fn(&mut ProcessSpec)| {
            let mut s = ProcessSpec {
                args: vec!["/bin/true".into()],
                cwd: "/".into(),
                ..Default::default()
            };
            f(&mut s);
            ChildSetup::new(None, None, &s)
        };
        let rl = |kind: &str, soft, hard| runvm_protocol::Rlimit {
            kind: kind.into(),
            soft,
            hard,
        };
        assert!(spec(&|s| s.rlimits = vec![rl("RLIMIT_NOFILE", 10, 20)]).is_ok());
        let err = spec(&|s| s.rlimits = vec![rl("RLIMIT_WINGS", 1, 1)]).unwrap_err();
        assert!(err.to_string().contains("RLIMIT_WINGS"), "{err}");
        let err = spec(&|s| s.rlimits = vec![rl("RLIMIT_NOFILE", 30, 20)]).unwrap_err();
        assert!(err.to_string().contains("above hard"), "{err}");
        let err = spec(&|s| s.umask = Some(0o1777)).unwrap_err();
        assert!(err.to_string().contains("umask"), "{err}");
        let err = spec(&|s| s.cwd = "/a\0b".into()).unwrap_err();
        assert!(err.to_string().contains("NUL"), "{err}");
        assert!(spec(&|s| s.oom_score_adj = Some(-1000)).is_ok());
        let err = spec(&|s| s.oom_score_adj = Some(1001)).unwrap_err();
        assert!(err.to_string().contains("oom_score_adj 1001"), "{err}");
    }
}
