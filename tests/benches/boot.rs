//! Boot benchmark: runvm-vmm against QEMU `-M microvm -accel kvm`, booting the
//! same kernel and initramfs in the same KVM host, runs interleaved.
//!
//! Prints, per VMM, the median wall time from spawning the VMM to the agent's
//! ready line and the median peak VMM overhead RSS (the Rss of every mapping
//! in its smaps but guest memory: guest RAM is a memfd for both, and
//! runvm-vmm maps the boot files into guest memory, as the runtime does), then
//! the ratios. Boot times come from runs that nothing samples; the RSS from
//! separate runs whose smaps is read every 25 ms (a read competes with the VM
//! it measures under nested TCG, and costs each VMM differently).
//! `RUNVM_BENCH_RUNS` sets the number of timed runs (default 10),
//! `RUNVM_BENCH_RSS_RUNS` the number of sampled ones (default 3).
//! Last, one boot of runvm-vmm per size with `--guest-profile`, summarized
//! by guest kernel function: where the guest's own part of the boot goes.
//! Run it with `tests/bench.sh boot`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use runvm_tests::artifacts::{guest_kernel_dir, vmm_command, Initrd};
use runvm_tests::guest::GuestProcess;
use runvm_tests::kernel_symbols::KernelSymbols;
use runvm_tests::kvm;
use runvm_tests::smaps;

const READY: &str = "RUNVM_AGENT_READY";

struct Sample {
    boot_ms: f64,
    /// Sampled runs only.
    overhead_kib: Option<u64>,
    /// runvm-vmm only: its own VM build time (`--report-timing`).
    build_ms: Option<f64>,
}

/// Whether the process still has an address space (not gone, not a zombie).
fn has_memory(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("VmRSS:")))
}

/// The VMM's own resident KiB, from one read of its smaps: every mapping's
/// Rss except guest memory, i.e. the guest RAM memfd (`/memfd:...`) and the
/// boot files under `dirs`, which runvm-vmm maps into guest memory as the
/// runtime does (their private copies are the guest's writes). One file read
/// per sample, so a guest touching pages between two reads cannot be counted
/// as overhead. None once the process is exiting (no mappings listed).
fn overhead_kib(pid: u32, dirs: &[PathBuf]) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let maps = smaps::mappings(&smaps);
    let kib = maps
        .iter()
        .filter(|m| {
            !(m.path.starts_with("/memfd:")
                || dirs.iter().any(|d| Path::new(m.path).starts_with(d)))
        })
        .filter_map(|m| m.kib("Rss"))
        .sum();
    (!maps.is_empty()).then_some(kib)
}

/// Samples the VMM's overhead until the process is gone; returns the peak.
fn watch_rss(pid: u32, boot_dirs: Vec<PathBuf>, done: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let mut peak = 0;
        while !done.load(Ordering::Acquire) {
            match overhead_kib(pid, &boot_dirs) {
                Some(kib) => peak = peak.max(kib),
                // Exiting (its memory is going away, not growing) or gone.
                None if has_memory(pid) => {}
                None => break,
            }
            // A full smaps walk of a 2 GiB guest mapping is costly under nested
            // TCG; sampling it back to back competed with the VMs it measured.
            thread::sleep(Duration::from_millis(25));
        }
        peak
    })
}

/// One boot; its overhead RSS is sampled only when `rss_dirs` is given.
fn measure(cmd: Command, rss_dirs: Option<&[PathBuf]>) -> Sample {
    let mut guest = GuestProcess::spawn(cmd);
    let done = Arc::new(AtomicBool::new(false));
    let rss = rss_dirs.map(|dirs| watch_rss(guest.pid(), dirs.to_vec(), done.clone()));
    let ready = guest.wait_for(READY, Duration::from_secs(120));
    let run = guest.finish(Duration::from_secs(15));
    done.store(true, Ordering::Release);
    let overhead_kib = rss.map(|t| t.join().unwrap_or(0));
    let Some(ready) = ready else {
        panic!("no ready line:\n{}", run.output)
    };
    let build_ms = run.output.lines().find_map(|l| {
        l.split("built in ")
            .nth(1)
            .and_then(|rest| rest.split("us").next())
            .and_then(|us| us.parse::<f64>().ok())
            .map(|us| us / 1000.0)
    });
    Sample {
        boot_ms: ready.as_secs_f64() * 1000.0,
        overhead_kib,
        build_ms,
    }
}

fn runvm(initrd: &Initrd, mem_mib: u64) -> Command {
    let mut c = vmm_command("vmlinux", initrd);
    c.args(["--mem-mib", &mem_mib.to_string(), "--cmdline", "quiet"]);
    // As the runtime boots: the kernel and initramfs pages are mapped into
    // guest memory rather than copied.
    c.args([
        "--boot-timeout",
        "120",
        "--report-timing",
        "--map-boot-files",
    ]);
    c
}

fn qemu(kernel: &Path, initrd: &Path, mem_mib: u64) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm,x-option-roms=off,rtc=off,memory-backend=mem"]);
    c.args([
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem_mib}M"),
    ]);
    c.args([
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        &format!("{mem_mib}M"),
        "-smp",
        "1",
    ]);
    c.args([
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
    ]);
    c.args(["-serial", "stdio", "-kernel"])
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd);
    // runvm-vmm's own arguments (vmm::boot::build_cmdline), so that both
    // VMMs boot the same guest; reboot=t (a triple fault) ends QEMU through
    // -no-reboot.
    c.args([
        "-append",
        "console=ttyS0 reboot=t panic=-1 pci=off nomodule 8250.nr_uarts=1 noreplace-smp quiet",
    ]);
    c
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Figures {
    boot: f64,
    rss: f64,
    build: Option<f64>,
}

fn report(name: &str, samples: &[Sample], sampled: &[Sample]) -> Figures {
    let boot = median(samples.iter().map(|s| s.boot_ms).collect());
    let rss = median(
        sampled
            .iter()
            .filter_map(|s| s.overhead_kib.map(|k| k as f64))
            .collect(),
    ) / 1024.0;
    let builds: Vec<f64> = samples.iter().filter_map(|s| s.build_ms).collect();
    let build = (!builds.is_empty()).then(|| median(builds));
    let all: Vec<String> = samples
        .iter()
        .map(|s| format!("{:.0}", s.boot_ms))
        .collect();
    let build_text = build.map_or(String::new(), |b| {
        format!("   VMM build median {b:>6.1} ms")
    });
    println!(
        "{name:<22} boot-to-agent median {boot:>7.0} ms   overhead RSS median {rss:>6.2} MiB{build_text}   runs(ms): {}",
        all.join(" ")
    );
    Figures { boot, rss, build }
}

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    kvm::bench_here_or_in_testhost(
        "boot [--bench]   (RUNVM_BENCH_RUNS=N sets the run count)",
        "1200",
    );
    let count = |var: &str, default: usize| -> usize {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(default)
    };
    let runs = count("RUNVM_BENCH_RUNS", 10);
    let rss_runs = count("RUNVM_BENCH_RSS_RUNS", 3);
    let initrd = Initrd::agent();
    let kernel = guest_kernel_dir().join("vmlinux");
    // The directories that hold the boot files and nothing the VMM runs.
    let boot_dirs = [
        initrd.path.parent().expect("initramfs dir").to_owned(),
        guest_kernel_dir().to_owned(),
    ];
    println!(
        "boot benchmark: {runs} timed and {rss_runs} RSS-sampled runs each, interleaved, kernel {}",
        kernel.display()
    );
    let mut samples: [Vec<Sample>; 4] = Default::default();
    let mut sampled: [Vec<Sample>; 4] = Default::default();
    const CONFIGS: [(&str, bool, u64); 4] = [
        ("runvm-vmm 128 MiB", true, 128),
        ("qemu microvm 128 MiB", false, 128),
        ("runvm-vmm 2 GiB", true, 2048),
        ("qemu microvm 2 GiB", false, 2048),
    ];
    for (kind, total, rss) in [("timed", runs, false), ("RSS-sampled", rss_runs, true)] {
        for run in 1..=total {
            for (i, (name, is_runvm, mem)) in CONFIGS.iter().enumerate() {
                let cmd = if *is_runvm {
                    runvm(&initrd, *mem)
                } else {
                    qemu(&kernel, &initrd.path, *mem)
                };
                let s = measure(cmd, rss.then_some(&boot_dirs[..]));
                // Per run, so a test host that locks up part way still leaves figures.
                let rss_text = s.overhead_kib.map_or(String::new(), |k| {
                    format!(", overhead RSS {:.2} MiB", k as f64 / 1024.0)
                });
                eprintln!(
                    "{kind} run {run}/{total} {name}: {:.0} ms{rss_text}",
                    s.boot_ms
                );
                if rss {
                    sampled[i].push(s);
                } else {
                    samples[i].push(s);
                }
            }
        }
    }
    let small = report("runvm-vmm 128 MiB", &samples[0], &sampled[0]);
    let qemu_small = report("qemu microvm 128 MiB", &samples[1], &sampled[1]);
    let large = report("runvm-vmm 2 GiB", &samples[2], &sampled[2]);
    let qemu_large = report("qemu microvm 2 GiB", &samples[3], &sampled[3]);
    println!(
        "ratio boot runvm/qemu, 128 MiB:          {:.2}",
        small.boot / qemu_small.boot
    );
    println!(
        "ratio boot runvm/qemu, 2 GiB:            {:.2}",
        large.boot / qemu_large.boot
    );
    println!(
        "ratio overhead RSS runvm/qemu, 128 MiB:  {:.2}",
        small.rss / qemu_small.rss
    );
    if let (Some(b_small), Some(b_large)) = (small.build, large.build) {
        println!(
            "ratio VMM build time 2 GiB / 128 MiB:    {:.2}",
            b_large / b_small
        );
    }
    println!(
        "ratio boot 2 GiB / 128 MiB, runvm:       {:.2}",
        large.boot / small.boot
    );
    println!(
        "ratio boot 2 GiB / 128 MiB, qemu:        {:.2}",
        qemu_large.boot / qemu_small.boot
    );
    let symbols = KernelSymbols::load(&kernel).expect("the guest kernel's symbols");
    for mem_mib in [128, 2048] {
        profile(&initrd, &symbols, mem_mib);
    }
}

/// One profiled boot of runvm-vmm: the guest kernel functions the boot
/// vCPU was sampled in most, up to the agent's ready line.
fn profile(initrd: &Initrd, symbols: &KernelSymbols, mem_mib: u64) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("profile");
    let mut cmd = runvm(initrd, mem_mib);
    cmd.arg("--guest-profile").arg(&out);
    let run = measure(cmd, None);
    let text = std::fs::read_to_string(&out).expect("read the guest profile");
    let samples = vmm::guest_profile::parse(&text).expect("a guest profile");
    let boot: Vec<_> = samples
        .into_iter()
        .filter(|s| s.vcpu == 0 && s.elapsed.as_secs_f64() * 1000.0 <= run.boot_ms)
        .collect();
    let total = boot.len().max(1);
    println!(
        "profiled boot, runvm-vmm {mem_mib} MiB: {:.0} ms to the ready line, {} samples of the boot vCPU (one per {:.1} ms); most sampled:",
        run.boot_ms,
        boot.len(),
        run.boot_ms / total as f64
    );
    for (name, count) in symbols.summarize(&boot).into_iter().take(12) {
        let share = count as f64 / total as f64;
        println!(
            "  {:>5.1}%  ~{:>4.0} ms  {name}",
            share * 100.0,
            share * run.boot_ms
        );
    }
}
