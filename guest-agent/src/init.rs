//! PID 1 duties that do not depend on the host channel.

use std::fs;
use std::io::Write;
use std::process::ExitCode;

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

use runvm_agent::mount_sys::{Linux, MountSys};

use crate::{LISTENING_MARKER, READY_MARKER, TEMPLATE_MARKER};

struct PseudoFs {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const BASICS: &[PseudoFs] = &[
    PseudoFs {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: None,
    },
    PseudoFs {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        data: None,
    },
    PseudoFs {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: None,
    },
];

/// Seconds since the guest kernel started, as the guest sees them.
fn uptime() -> String {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Online CPUs and total memory as the guest kernel reports them.
fn shape() -> String {
    let cpus = fs::read_to_string("/sys/devices/system/cpu/online")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .map(|v| v.trim().trim_end_matches(" kB").to_owned())
        })
        .unwrap_or_else(|| "?".into());
    format!("cpus_online={cpus} mem_total_kib={mem}")
}

/// Extra mounts every guest gets once the basics are up.
const EXTRAS: &[PseudoFs] = &[
    PseudoFs {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: None,
    },
    PseudoFs {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: None,
    },
    PseudoFs {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: None,
    },
    PseudoFs {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: None,
    },
    PseudoFs {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
        // Every container process moves into the container's cgroup. By
        // default each move waits for an RCU grace period (the writer side
        // of the kernel's cgroup_threadgroup_rwsem); with favordynmods it
        // does not, for slightly dearer forks and exits. In the test host
        // this took the first process's spawn from 61 to 41 ms (medians).
        data: Some("favordynmods"),
    },
];

fn mount_all(sys: &mut dyn MountSys, list: &[PseudoFs], under: &str) -> Result<(), String> {
    for fs in list {
        let target = format!("{under}{}", fs.target);
        sys.mkdir_all(&target)
            .map_err(|e| format!("mkdir {target}: {e}"))?;
        sys.mount(
            Some(fs.source),
            target.as_str(),
            Some(fs.fstype),
            fs.flags,
            fs.data,
        )
        .map_err(|e| format!("mount {} on {target}: {e}", fs.fstype))?;
    }
    Ok(())
}

/// `runvm.*` settings the host put on the kernel command line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BootParams {
    /// virtio-fs tag of the container's root filesystem.
    pub rootfs_tag: Option<String>,
    /// Mount the root filesystem read-only.
    pub rootfs_ro: bool,
    /// The share is read-only: give the container a writable overlay on
    /// it whose changes live (and die) in guest memory.
    pub rootfs_overlay: bool,
    /// The guest's hostname.
    pub hostname: Option<String>,
    /// The container's mounts (from the initramfs, not the command line).
    pub mounts: Vec<runvm_protocol::GuestMount>,
    /// The guest is a template: it waits, without a container, for the
    /// host to snapshot it, and takes its container from the first
    /// request of a restored copy ([`runvm_protocol::Op::Setup`]).
    pub template: bool,
}

impl BootParams {
    /// Reads them from a kernel command line.
    pub fn parse(cmdline: &str) -> Self {
        let mut p = BootParams::default();
        for word in cmdline.split_whitespace() {
            match word.split_once('=') {
                Some(("runvm.rootfs", tag)) => p.rootfs_tag = Some(tag.to_owned()),
                Some(("runvm.hostname", h)) => p.hostname = Some(h.to_owned()),
                None if word == "runvm.rootfs_ro" => p.rootfs_ro = true,
                None if word == "runvm.rootfs_overlay" => p.rootfs_overlay = true,
                None if word == "runvm.template" => p.template = true,
                _ => {}
            }
        }
        p
    }
}

/// Where the container's root filesystem is mounted in the guest.
pub const ROOTFS: &str = "/run/rootfs";

/// Mounts the container rootfs and the pseudo filesystems it needs inside.
fn mount_rootfs(
    sys: &mut dyn MountSys,
    tag: &str,
    read_only: bool,
    overlay: bool,
) -> Result<(), String> {
    sys.mkdir_all(ROOTFS)
        .map_err(|e| format!("mkdir {ROOTFS}: {e}"))?;
    if overlay && !read_only {
        mount_overlay_rootfs(sys, tag)?;
    } else {
        let flags = if read_only {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
        sys.mount(Some(tag), ROOTFS, Some("virtiofs"), flags, None)
            .map_err(|e| format!("mount virtiofs {tag} on {ROOTFS}: {e}"))?;
    }
    mount_all(sys, &BASICS[..2], ROOTFS)?;
    let dev = format!("{ROOTFS}/dev");
    sys.mkdir_all(&dev)
        .map_err(|e| format!("mkdir {dev}: {e}"))?;
    sys.mount(
        Some("/dev"),
        dev.as_str(),
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .map_err(|e| format!("bind /dev into the rootfs: {e}"))?;
    Ok(())
}

/// The share read-only below, a tmpfs for the container's changes above.
fn mount_overlay_rootfs(sys: &mut dyn MountSys, tag: &str) -> Result<(), String> {
    const LOWER: &str = "/run/rootfs-lower";
    const RW: &str = "/run/rootfs-rw";
    for d in [LOWER, RW] {
        sys.mkdir_all(d).map_err(|e| format!("mkdir {d}: {e}"))?;
    }
    sys.mount(Some(tag), LOWER, Some("virtiofs"), MsFlags::MS_RDONLY, None)
        .map_err(|e| format!("mount virtiofs {tag} on {LOWER}: {e}"))?;
    sys.mount(
        Some("tmpfs"),
        RW,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|e| format!("mount the overlay's tmpfs: {e}"))?;
    for d in ["upper", "work"] {
        let dir = format!("{RW}/{d}");
        sys.mkdir_all(&dir)
            .map_err(|e| format!("mkdir {dir}: {e}"))?;
    }
    let data = format!("lowerdir={LOWER},upperdir={RW}/upper,workdir={RW}/work");
    sys.mount(
        Some("overlay"),
        ROOTFS,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| format!("mount the rootfs overlay: {e}"))
}

/// Leaves the initramfs for a tmpfs root (what switch_root does): the
/// kernel's initial rootfs can never be pivot_root'ed away, so the
/// container's mount namespace could not detach the agent's files.
fn leave_initramfs() -> Result<(), String> {
    const NEW: &str = "/.runvm-root";
    fs::create_dir_all(NEW).map_err(|e| format!("mkdir {NEW}: {e}"))?;
    mount(
        Some("tmpfs"),
        NEW,
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
    .map_err(|e| format!("mount the root tmpfs: {e}"))?;
    fs::copy("/proc/self/exe", format!("{NEW}/init"))
        .or_else(|_| fs::copy("/init", format!("{NEW}/init")))
        .map_err(|e| format!("copy the agent: {e}"))?;
    nix::unistd::chdir(NEW).map_err(|e| format!("chdir {NEW}: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move the root tmpfs to /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

fn prepare() -> Result<BootParams, String> {
    // Read while the initramfs is still `/`.
    let mounts = match fs::read(format!("/{}", runvm_protocol::MOUNTS_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("mount list: {e}"))?,
        Err(_) => Vec::new(),
    };
    let copied: Vec<Vec<u8>> = (0..)
        .map_while(|i| fs::read(format!("/{}/{i}", runvm_protocol::COPIED_FILES_DIR)).ok())
        .collect();
    let seed_path = format!("/{}", runvm_protocol::SEED_FILE);
    let seed = fs::read(&seed_path).ok();
    // The initramfs stays in memory under the new root: leave no copy.
    let _ = fs::remove_file(&seed_path);
    leave_initramfs()?;
    mount_all(&mut Linux::new(), BASICS, "")?;
    // Made once sysfs is mounted: its virtio-fs mounts get their read-ahead.
    mount_all(&mut Linux::new(), EXTRAS, "")?;
    let mut params = BootParams::parse(&fs::read_to_string("/proc/cmdline").unwrap_or_default());
    params.mounts = mounts;
    if !params.template {
        personalize(&params, seed.as_deref(), &copied, false)?;
    }
    Ok(params)
}

/// Makes the guest this container's: its random pool seeded from the
/// host's bytes (and, for a template's copy, reseeded from them at once:
/// it starts with the template's pool), the files its mounts copy in, its
/// hostname and its root filesystem.
pub(crate) fn personalize(
    params: &BootParams,
    seed: Option<&[u8]>,
    copied: &[Vec<u8>],
    reseed: bool,
) -> Result<(), String> {
    if let Some(seed) = seed {
        let seeded = runvm_agent::entropy::seed("/dev/urandom", seed).and_then(|()| {
            if reseed {
                runvm_agent::entropy::reseed("/dev/urandom")
            } else {
                Ok(())
            }
        });
        match seeded {
            Ok(()) => eprintln!(
                "runvm-agent: random pool seeded with {} bits from the host",
                seed.len() * 8
            ),
            // A template's copy must not go on with its template's pool.
            Err(e) if reseed => return Err(format!("reseeding the random pool: {e}")),
            Err(e) => eprintln!("runvm-agent: seeding the random pool: {e}"),
        }
    }
    if !copied.is_empty() {
        let dir = runvm_agent::mount_ns::COPIED_FILES;
        fs::create_dir_all(dir).map_err(|e| format!("mkdir {dir}: {e}"))?;
        for (i, data) in copied.iter().enumerate() {
            fs::write(format!("{dir}/{i}"), data).map_err(|e| format!("write {dir}/{i}: {e}"))?;
        }
    }
    if let Some(h) = &params.hostname {
        nix::unistd::sethostname(h).map_err(|e| format!("sethostname {h}: {e}"))?;
    }
    if let Some(tag) = &params.rootfs_tag {
        mount_rootfs(
            &mut Linux::new(),
            tag,
            params.rootfs_ro,
            params.rootfs_overlay,
        )?;
    }
    Ok(())
}

fn power_off() -> ! {
    let _ = std::io::stdout().flush();
    // Whatever still runs gets no chance to write after the sync.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-1),
        nix::sys::signal::Signal::SIGKILL,
    );
    nix::unistd::sync();
    // PID 1 must never return; with `reboot=k` the reset ends the VMM cleanly.
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::park();
    }
}

/// Serves the host over vsock until it asks for a shutdown; `first` is a
/// connection already accepted (a template's copy's, which set it up).
fn serve(
    params: &BootParams,
    started_ms: f64,
    listener: std::os::fd::OwnedFd,
    mut first: Option<fs::File>,
) -> Result<(), String> {
    let reaper = crate::Reaper::start().map_err(|e| format!("reaper: {e}"))?;
    // Made before the mount namespace, whose holder roots the container's
    // cgroup namespace in it. A guest kernel without cgroup v2 (a custom
    // one) runs containers without limits; a spec that asks for some is
    // then refused when the host sets them.
    let cgroup = match runvm_agent::cgroup::ContainerCgroup::create(std::path::Path::new(
        runvm_agent::cgroup::HIERARCHY,
    )) {
        Ok(cg) => Some(cg),
        Err(e) => {
            eprintln!("runvm-agent: no container cgroup: {e}");
            None
        }
    };
    let rootfs = params
        .rootfs_tag
        .as_ref()
        .map(|_| {
            runvm_agent::mount_ns::MountNs::create(std::path::Path::new(ROOTFS), &params.mounts)
        })
        .transpose()
        .map_err(|e| format!("container mount namespace: {e}"))?;
    let resolv_conf = match params.rootfs_tag {
        Some(_) => std::path::Path::new(ROOTFS).join("etc/resolv.conf"),
        None => "/etc/resolv.conf".into(),
    };
    let net = runvm_agent::network::LinuxNet::new(resolv_conf)
        .map_err(|e| format!("network control socket: {e}"))?;
    let figures =
        runvm_agent::figures::BootFigures::new(started_ms, runvm_agent::figures::boottime_ms());
    let mut agent = crate::Agent::new(reaper, rootfs, Box::new(|| power_off()))
        .with_network(Box::new(net))
        .with_boot_figures(figures);
    if let Some(cg) = cgroup {
        agent = agent.with_cgroup(cg);
    }
    println!(
        "{LISTENING_MARKER} port={}",
        runvm_protocol::AGENT_VSOCK_PORT
    );
    let _ = std::io::stdout().flush();
    loop {
        let conn = match first.take() {
            Some(conn) => conn,
            None => crate::vsock::accept(&listener).map_err(|e| format!("vsock accept: {e}"))?,
        };
        let out = conn.try_clone().map_err(|e| format!("dup: {e}"))?;
        if let Err(e) = agent.serve(conn, out) {
            eprintln!("runvm-agent: host connection ended: {e}");
        }
    }
}

pub fn run() -> ExitCode {
    let started_ms = runvm_agent::figures::boottime_ms();
    match prepare() {
        Ok(params) => {
            println!("{READY_MARKER} uptime={} {}", uptime(), shape());
            // Without a host channel there is nothing more to do: this is
            // the boot smoke test.
            if crate::vsock::device_present() {
                let served = crate::vsock::listen_port(runvm_protocol::AGENT_VSOCK_PORT)
                    .map_err(|e| format!("vsock listen: {e}"))
                    .and_then(|listener| match params.template {
                        true => crate::template::wait_for_setup(&listener, TEMPLATE_MARKER)
                            .and_then(|(params, conn)| {
                                serve(&params, started_ms, listener, Some(conn))
                            }),
                        false => serve(&params, started_ms, listener, None),
                    });
                if let Err(e) = served {
                    eprintln!("runvm-agent: {e}");
                }
            }
        }
        Err(e) => eprintln!("runvm-agent: {e}"),
    }
    power_off()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_params_come_from_the_command_line() {
        let p = BootParams::parse(
            "console=ttyS0 runvm.rootfs=root runvm.rootfs_ro quiet runvm.hostname=box",
        );
        assert_eq!(
            p,
            BootParams {
                rootfs_tag: Some("root".into()),
                rootfs_ro: true,
                rootfs_overlay: false,
                hostname: Some("box".into()),
                mounts: Vec::new(),
                template: false,
            }
        );
        assert!(BootParams::parse("runvm.rootfs=root runvm.rootfs_overlay").rootfs_overlay);
        assert!(BootParams::parse("quiet runvm.template").template);
        assert_eq!(BootParams::parse("quiet"), BootParams::default());
    }

    use runvm_agent::mount_sys::Recorder;

    fn f(flags: MsFlags) -> String {
        format!("{flags:?}")
    }

    #[test]
    fn an_overlay_rootfs_is_a_read_only_share_under_a_tmpfs_upper_layer() {
        let mut sys = Recorder::default();
        mount_rootfs(&mut sys, "root", false, true).unwrap();
        let nsn = f(MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
        assert_eq!(
            sys.calls,
            [
                "mkdir /run/rootfs".to_string(),
                "mkdir /run/rootfs-lower".into(),
                "mkdir /run/rootfs-rw".into(),
                format!(
                    "mount root /run/rootfs-lower virtiofs {}",
                    f(MsFlags::MS_RDONLY)
                ),
                format!(
                    "mount tmpfs /run/rootfs-rw tmpfs {} mode=0755",
                    f(MsFlags::empty())
                ),
                "mkdir /run/rootfs-rw/upper".into(),
                "mkdir /run/rootfs-rw/work".into(),
                format!(
                    "mount overlay /run/rootfs overlay {} lowerdir=/run/rootfs-lower,\
                     upperdir=/run/rootfs-rw/upper,workdir=/run/rootfs-rw/work",
                    f(MsFlags::empty())
                ),
                "mkdir /run/rootfs/proc".into(),
                format!("mount proc /run/rootfs/proc proc {nsn}"),
                "mkdir /run/rootfs/sys".into(),
                format!("mount sysfs /run/rootfs/sys sysfs {nsn}"),
                "mkdir /run/rootfs/dev".into(),
                format!(
                    "mount /dev /run/rootfs/dev - {}",
                    f(MsFlags::MS_BIND | MsFlags::MS_REC)
                ),
            ]
        );
    }

    #[test]
    fn a_read_only_rootfs_is_mounted_read_only_and_overlay_is_moot() {
        let mut sys = Recorder::default();
        mount_rootfs(&mut sys, "root", true, true).unwrap();
        assert_eq!(
            sys.calls[1],
            format!("mount root /run/rootfs virtiofs {}", f(MsFlags::MS_RDONLY))
        );
        assert!(!sys.calls.iter().any(|c| c.contains("overlay")));
        let mut sys = Recorder::default();
        mount_rootfs(&mut sys, "root", false, false).unwrap();
        assert_eq!(
            sys.calls[1],
            format!("mount root /run/rootfs virtiofs {}", f(MsFlags::empty()))
        );
    }

    #[test]
    fn a_failed_step_stops_the_setup_and_says_which() {
        let mut sys = Recorder {
            fail_at: Some("mount tmpfs /run/rootfs-rw".into()),
            ..Default::default()
        };
        let e = mount_rootfs(&mut sys, "root", false, true).unwrap_err();
        assert!(e.contains("overlay's tmpfs") && e.contains("EPERM"), "{e}");
        assert!(sys
            .calls
            .last()
            .unwrap()
            .starts_with("mount tmpfs /run/rootfs-rw"));
        let mut sys = Recorder {
            fail_at: Some("mkdir /dev/shm".into()),
            ..Default::default()
        };
        let e = mount_all(&mut sys, EXTRAS, "").unwrap_err();
        assert!(e.starts_with("mkdir /dev/shm"), "{e}");
        assert_eq!(sys.calls.len(), 3, "{:?}", sys.calls);
    }
}
