//! PID 1 duties that do not depend on the host channel.

use std::fs;
use std::io::Write;
use std::process::ExitCode;

use nix::mount::{mount, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

use crate::READY_MARKER;

struct PseudoFs {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
}

const BASICS: &[PseudoFs] = &[
    PseudoFs {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
    },
    PseudoFs {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
    },
    PseudoFs {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
    },
];

fn mount_basics() -> Result<(), String> {
    for fs in BASICS {
        fs::create_dir_all(fs.target).map_err(|e| format!("mkdir {}: {e}", fs.target))?;
        mount(
            Some(fs.source),
            fs.target,
            Some(fs.fstype),
            fs.flags,
            None::<&str>,
        )
        .map_err(|e| format!("mount {} on {}: {e}", fs.fstype, fs.target))?;
    }
    Ok(())
}

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

pub fn run() -> ExitCode {
    let status = match mount_basics() {
        Ok(()) => {
            println!("{READY_MARKER} uptime={} {}", uptime(), shape());
            0
        }
        Err(e) => {
            eprintln!("runvm-agent: {e}");
            1
        }
    };
    let _ = std::io::stdout().flush();
    nix::unistd::sync();
    // PID 1 must never return; with `reboot=k` the reset ends the VMM cleanly.
    let Err(e) = reboot(RebootMode::RB_AUTOBOOT);
    eprintln!("runvm-agent: reboot failed: {e}");
    ExitCode::from(status.max(1))
}
