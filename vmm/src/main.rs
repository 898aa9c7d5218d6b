//! `runvm-vmm`: one micro-VM per process. The runtime spawns it; it can also
//! be run by hand to boot a kernel.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use vmm::config::{FsConfig, NetConfig, VmConfig, VsockConfig};
use vmm::resources::VmResources;
use vmm::snapshot::SnapshotRequest;
use vmm::vm::{self, RunOptions};

/// Boot a Linux guest in a KVM micro-VM and exit when it resets.
#[derive(Debug, Parser)]
#[command(name = "runvm-vmm", version)]
struct Args {
    /// Guest kernel: ELF vmlinux (PVH) or bzImage.
    #[arg(long, required_unless_present = "restore")]
    kernel: Option<PathBuf>,
    /// Initramfs (newc cpio, optionally compressed); repeat it to load
    /// several archives one after another.
    #[arg(long)]
    initramfs: Vec<PathBuf>,
    /// Map the kernel into guest memory (private, copy on write) instead of
    /// copying it: VMs booting the same kernel share its pages. Only for a
    /// file nobody changes in place while the VM runs (replacing it by
    /// rename is fine). The initramfs is always copied
    /// (the guest frees its pages after unpacking it).
    #[arg(long)]
    map_boot_files: bool,
    /// Keep guest RAM on 4 KiB pages: no transparent huge page advice (by
    /// default guest RAM is advised for them once the guest is loaded; the
    /// host's shmem THP setting decides whether the advice is taken)
    #[arg(long)]
    no_huge_pages: bool,
    /// Extra kernel command line.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// End the VM after this many seconds (exit status 124).
    #[arg(long)]
    boot_timeout: Option<u64>,
    /// Serial console: "stdout", "none" or "file:PATH".
    #[arg(long, default_value = "stdout")]
    console: String,
    /// Forward this process's stdin to the guest's serial input.
    #[arg(long)]
    console_input: bool,
    /// Give the guest a virtio-rng device (entropy from the host).
    #[arg(long)]
    rng: bool,
    /// Give the guest a virtio-vsock device with this context ID (needs --vsock-uds).
    #[arg(long, requires = "vsock_uds")]
    vsock_cid: Option<u32>,
    /// Unix socket for the vsock device's host side (created; removed on exit).
    #[arg(long, requires = "vsock_cid")]
    vsock_uds: Option<PathBuf>,
    /// Share a host directory over virtio-fs (repeatable):
    /// `tag=T,path=DIR[,ro][,cache=never|auto|always]`
    #[arg(long = "fs", value_name = "SHARE")]
    fs: Vec<FsConfig>,
    /// Give the guest a virtio-net NIC (repeatable): `tap=NAME[,mac=MAC]`
    /// attaches to (or creates) a TAP interface, `fd=N[,mac=MAC]` takes over
    /// an open TAP fd (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR).
    #[arg(long = "net", value_name = "NIC")]
    net: Vec<NetConfig>,
    /// Print how long each VM build phase took (stderr) once the vCPUs run.
    #[arg(long)]
    report_timing: bool,
    /// Print, when the VM ends, how many requests each virtio-fs share
    /// answered, by FUSE opcode (stderr).
    #[arg(long)]
    report_requests: bool,
    /// Sample every vCPU's instruction pointer every 2 ms while the VM runs
    /// and write the samples to this file when it ends (`VCPU MICROSECONDS
    /// MODE RIP` per line; map kernel addresses with `nm -n vmlinux`).
    #[arg(long, value_name = "FILE")]
    guest_profile: Option<PathBuf>,
    /// Stop the VM once a console line contains this text and write it to
    /// the snapshot directory DIR (needs --snapshot-to); the VMM then exits
    /// 0. A vsock connection or a mounted virtio-fs share refuses it.
    #[arg(long, value_name = "TEXT", requires = "snapshot_to")]
    snapshot_after: Option<String>,
    /// The new directory --snapshot-after writes.
    #[arg(long, value_name = "DIR", requires = "snapshot_after")]
    snapshot_to: Option<PathBuf>,
    /// Start from the snapshot in DIR instead of booting: --vcpus,
    /// --mem-mib and the devices (kinds and order) must be the snapshot's;
    /// their host sides (share directories, sockets, TAPs) may differ.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initramfs", "cmdline", "map_boot_files"])]
    restore: Option<PathBuf>,
}

fn console(spec: &str) -> anyhow::Result<Option<Box<dyn Write + Send>>> {
    Ok(match spec {
        "stdout" => Some(Box::new(std::io::stdout())),
        "none" => None,
        s => match s.strip_prefix("file:") {
            Some(path) => {
                Some(Box::new(File::create(path).with_context(|| {
                    format!("cannot create console file {path}")
                })?))
            }
            None => anyhow::bail!("--console must be stdout, none or file:PATH, not {s:?}"),
        },
    })
}

/// Prints each device's line on stderr, after `prefix`.
fn print_device_lines(prefix: &'static str) -> vm::DeviceLinesHook {
    Box::new(move |devices: &[String]| {
        for d in devices {
            eprintln!("runvm-vmm: {prefix}{d}");
        }
    })
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = VmConfig {
        vcpus: args.vcpus,
        mem_mib: args.mem_mib,
        kernel: args.kernel.unwrap_or_default(),
        initramfs: args.initramfs,
        map_boot_files: args.map_boot_files,
        huge_pages: !args.no_huge_pages,
        cmdline: args.cmdline,
        rng: args.rng,
        vsock: args
            .vsock_cid
            .zip(args.vsock_uds)
            .map(|(guest_cid, uds_path)| VsockConfig {
                guest_cid,
                uds_path,
            }),
        fs: args.fs,
        net: args.net,
        restore: args.restore,
    };
    let kvm = vm::open_kvm()?;
    let resources = VmResources::validate(&config, vm::host_limits(&kvm))?;
    let opts = RunOptions {
        console: console(&args.console)?,
        console_input: if args.console_input {
            let fd = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating stdin for the console")?;
            Some(File::from(fd))
        } else {
            None
        },
        timeout: args.boot_timeout.map(Duration::from_secs),
        on_started: args.report_timing.then(|| {
            Box::new(|t: &vm::BuildTimes| {
                let phases: Vec<String> = t
                    .phases
                    .iter()
                    .map(|(name, d)| format!("{name} {}us", d.as_micros()))
                    .collect();
                eprintln!(
                    "runvm-vmm: vcpus running, built in {}us ({}), boot files mapped {} KiB",
                    t.total().as_micros(),
                    phases.join(", "),
                    t.boot_files_mapped / 1024
                );
            }) as vm::StartedHook
        }),
        on_timeout: Some(print_device_lines("at timeout, ")),
        on_exit: args.report_requests.then(|| print_device_lines("")),
        control: None,
        guest_profile: args
            .guest_profile
            .as_deref()
            .map(|p| {
                File::create(p)
                    .with_context(|| format!("cannot create the guest profile {}", p.display()))
            })
            .transpose()?,
        snapshot: args
            .snapshot_after
            .zip(args.snapshot_to)
            .map(|(after_console_line, dir)| SnapshotRequest {
                dir,
                after_console_line,
            }),
    };
    let reason = vm::run(&kvm, &resources, opts)?;
    eprintln!("runvm-vmm: {reason}");
    Ok(ExitCode::from(reason.exit_code()))
}

fn main() -> ExitCode {
    vmm::fd_limit::raise();
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("runvm-vmm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
