//! Runtime benchmark: runvm against runc (Debian's package) on the same
//! busybox bundle, in the same KVM host, runs interleaved.
//!
//! Prints the median of `RUNVM_BENCH_RUNS` runs (default 10) of
//! - `run`: `runtime run` of `/bin/true`, spawn to exit;
//! - `create+start to first byte`: `runtime create`, `runtime start`, until
//!   the first byte of `echo`'s output reaches the caller's pipe;
//!
//! for runc, runvm booting each VM, and runvm restoring each VM from a
//! template (`runvm-t`, the `io.runvm.template` annotation; the first run,
//! which builds the template, is timed apart),
//! the ratios to runc, and where runvm's create+start time goes, from
//! the timestamps of the monitor's `timing:` debug log lines: spawning the
//! monitor, building the VM, the guest kernel's boot (until the agent's ready
//! line passes the console), the agent's setup (rootfs mount, vsock listen),
//! preparing the process, the `create` command's return and the `start` to
//! the first byte. Run it with `tests/bench.sh runtime`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use runvm_tests::artifacts::{agent_binary, busybox_rootfs, guest_kernel_dir, runvm_binary};
use runvm_tests::kvm;

#[derive(Clone, Copy, PartialEq)]
enum Runtime {
    Runvm,
    /// runvm restoring each VM from a template (`io.runvm.template`).
    RunvmTemplate,
    Runc,
}

impl Runtime {
    fn name(self) -> &'static str {
        match self {
            Runtime::Runvm => "runvm",
            Runtime::RunvmTemplate => "runvm-t",
            Runtime::Runc => "runc",
        }
    }

    fn is_runvm(self) -> bool {
        self != Runtime::Runc
    }

    fn command(self, dir: &Path) -> Command {
        let mut c = match self {
            Runtime::Runvm | Runtime::RunvmTemplate => {
                let mut c = Command::new(runvm_binary());
                c.arg("--root")
                    .arg(dir.join("runvm-root"))
                    .args(["--debug", "--log-format", "json", "--log"])
                    .arg(dir.join("runvm-log.json"))
                    .env("RUNVM_KERNEL", guest_kernel_dir().join("vmlinux"))
                    .env("RUNVM_AGENT", agent_binary());
                c
            }
            Runtime::Runc => {
                let mut c = Command::new("runc");
                c.arg("--root").arg(dir.join("runc-root"));
                c
            }
        };
        c.stdin(Stdio::null());
        c
    }
}

/// `runc spec`'s bundle, with a busybox rootfs and `args`; `template` adds
/// the annotation that restores runvm's VM from a template.
fn bundle(dir: &Path, name: &str, args: &[&str], template: bool) -> PathBuf {
    let b = dir.join(name);
    busybox_rootfs(&b.join("rootfs"));
    let out = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(&b)
        .output()
        .expect("runc (Debian package runc; setup.sh installs it)");
    assert!(out.status.success(), "runc spec: {:?}", out);
    let path = b.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!(args);
    // Nested emulation boots slowly; the default suits real KVM.
    config["annotations"] = serde_json::json!({"io.runvm.boot_timeout": "600"});
    if template {
        config["annotations"]["io.runvm.template"] = "true".into();
    }
    std::fs::write(&path, config.to_string()).unwrap();
    b
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `runtime run` of /bin/true: spawn to exit.
fn run_true(rt: Runtime, dir: &Path, bundle: &Path, n: usize) -> f64 {
    let id = format!("bench-run-{n}");
    let start = Instant::now();
    let out = rt
        .command(dir)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(&id)
        .output()
        .unwrap();
    let took = start.elapsed();
    assert!(out.status.success(), "{} run: {out:?}", rt.name());
    if rt.is_runvm() {
        // `runvm run` removes its container; runc's too, but be sure.
        let _ = rt.command(dir).args(["delete", "--force", &id]).output();
    }
    ms(took)
}

/// One create+start: total to the first output byte, and (runvm) the
/// phases' durations in ms.
struct StartSample {
    total_ms: f64,
    phases: Vec<(String, f64)>,
    /// The VMM's own build phases (`vcpus running (kvm 1.0 ms, ...)`).
    vmm: Vec<(String, f64)>,
    /// The agent's own figures from the guest console: handover to the
    /// program, agent setup, waiting for the host, start (ms), RSS and
    /// peak RSS (KiB).
    guest: Option<[f64; 6]>,
}

/// The numbers of the agent's `runvm-agent: figures:` console line.
fn guest_figures(console: &Path) -> Option<[f64; 6]> {
    // The agent prints it as the first process starts; give it a moment.
    for _ in 0..100 {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("runvm-agent: figures:")) {
            let v: Vec<f64> = line
                .split(|c: char| c.is_whitespace() || c == '(' || c == ';' || c == ',')
                .filter_map(|w| w.parse().ok())
                .collect();
            return v.try_into().ok();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

fn create_start(rt: Runtime, dir: &Path, bundle: &Path, n: usize) -> StartSample {
    let id = format!("bench-cs-{n}");
    let log = dir.join("runvm-log.json");
    let _ = std::fs::remove_file(&log);
    let (r, w) = nix::unistd::pipe().unwrap();
    let (mut reader, writer) = (std::fs::File::from(r), std::fs::File::from(w));
    let t0 = SystemTime::now();
    let start = Instant::now();
    let status = rt
        .command(dir)
        .args(["create", "--bundle"])
        .arg(bundle)
        .arg(&id)
        .stdout(writer.try_clone().unwrap())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    drop(writer);
    assert!(status.success(), "{} create", rt.name());
    let created = start.elapsed();
    let status = rt.command(dir).args(["start", &id]).status().unwrap();
    assert!(status.success(), "{} start", rt.name());
    let mut first = [0u8; 1];
    reader.read_exact(&mut first).unwrap();
    let total = start.elapsed();
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    let guest = match rt {
        Runtime::Runvm => guest_figures(&dir.join("runvm-root").join(&id).join("console.log")),
        // Its agent started in the template's boot: no figures of this VM.
        Runtime::RunvmTemplate | Runtime::Runc => None,
    };
    // The container's init is our child (subreaper); reap it.
    reap_children();
    let _ = rt.command(dir).args(["delete", "--force", &id]).output();
    let (phases, vmm) = match rt {
        Runtime::Runc => (Vec::new(), Vec::new()),
        _ => (phases(&log, t0, created, total), vmm_phases(&log)),
    };
    StartSample {
        total_ms: ms(total),
        phases,
        vmm,
        guest,
    }
}

fn reap_children() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our local.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if r <= 0 {
            return;
        }
    }
}

/// Seconds since the epoch of an RFC 3339 UTC time with fractions
/// (`2026-11-24T02:21:33.572374870Z`, as runvm's log writes it).
fn parse_time(s: &str) -> Option<f64> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = time.split(':');
    let (h, min, sec) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

/// The phases of one runvm create+start from its log's timing marks.
fn phases(log: &Path, t0: SystemTime, created: Duration, total: Duration) -> Vec<(String, f64)> {
    let t0 = t0.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut marks: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            let msg = v["msg"].as_str()?.strip_prefix("timing: ")?;
            // "vcpus running (kvm 1.0 ms, ...)": the VMM's own phases.
            let msg = msg.split(" (").next()?.to_owned();
            Some((msg, parse_time(v["time"].as_str()?)? - t0))
        })
        .collect();
    marks.push(("create returned".into(), created.as_secs_f64()));
    marks.push(("first output byte".into(), total.as_secs_f64()));
    marks.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut prev = 0.0;
    marks
        .into_iter()
        .map(|(name, at)| {
            let d = (at - prev) * 1000.0;
            prev = at;
            (name, d)
        })
        .collect()
}

/// `kvm 1.0 ms, memory 2.0 ms, ...` from the `vcpus running` mark.
fn vmm_phases(log: &Path) -> Vec<(String, f64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let Some(list) = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["msg"].as_str().map(str::to_owned))
        .find_map(|m| {
            m.strip_prefix("timing: vcpus running (")
                .map(|r| r.trim_end_matches(')').to_owned())
        })
    else {
        return Vec::new();
    };
    list.split(", ")
        .filter_map(|p| {
            let (name, rest) = p.split_once(' ')?;
            Some((name.to_owned(), rest.trim_end_matches(" ms").parse().ok()?))
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// What each phase ends with, and how it is reported.
const PHASE_NAMES: [(&str, &str); 9] = [
    (
        "monitor started",
        "spawn: runvm create parses, checks, starts the monitor",
    ),
    (
        "initramfs written",
        "initramfs: the agent's part (cached), the VM's own written",
    ),
    (
        "vcpus running",
        "VM build: KVM, memory, devices, kernel load, vCPUs",
    ),
    ("agent up", "guest kernel boot (to the agent's ready line)"),
    (
        "agent connected",
        "agent: mounts, rootfs over virtio-fs, vsock listen",
    ),
    ("process created", "process prepared in the guest"),
    ("create returned", "create notices and returns"),
    ("process started", "start: runvm start to the agent's start"),
    (
        "first output byte",
        "process runs, output relayed to the caller",
    ),
];

/// The same for a VM restored from a template.
const TEMPLATE_PHASE_NAMES: [(&str, &str); 9] = [
    (
        "monitor started",
        "spawn: runvm create parses, checks, starts the monitor",
    ),
    ("restoring template", "finding the template"),
    (
        "vcpus running",
        "VM build: KVM, memory mapped from the template, devices, vCPU state",
    ),
    ("agent connected", "the restored agent answers on vsock"),
    (
        "guest set up",
        "setup: seed, clock, rootfs over virtio-fs, hostname",
    ),
    ("process created", "process prepared in the guest"),
    ("create returned", "create notices and returns"),
    ("process started", "start: runvm start to the agent's start"),
    (
        "first output byte",
        "process runs, output relayed to the caller",
    ),
];

/// Prints the median of each phase of `samples` and of the VMM's phases.
fn print_phases(samples: &[StartSample], names: &[(&str, &str)]) {
    for (mark, what) in names {
        let mut v: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.phases.iter().find(|(n, _)| n == mark).map(|(_, d)| *d))
            .collect();
        println!("  {:>8.1} ms  {what}", median(&mut v));
    }
    if let Some(first) = samples.first() {
        let parts: Vec<String> = first
            .vmm
            .iter()
            .map(|(name, _)| {
                let mut v: Vec<f64> = samples
                    .iter()
                    .filter_map(|s| s.vmm.iter().find(|(n, _)| n == name).map(|(_, d)| *d))
                    .collect();
                format!("{name} {:.1} ms", median(&mut v))
            })
            .collect();
        println!(
            "  of the VM build, the VMM's phases (medians): {}",
            parts.join(", ")
        );
    }
}

fn main() {
    kvm::bench_here_or_in_testhost(
        "runtime [--bench]   (RUNVM_BENCH_RUNS=N sets the run count)",
        "1800",
    );
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER");
    let runs: usize = std::env::var("RUNVM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().unwrap();
    let true_bundle = bundle(dir.path(), "true", &["/bin/true"], false);
    let echo_bundle = bundle(dir.path(), "echo", &["echo", "hello"], false);
    let true_tpl = bundle(dir.path(), "true-t", &["/bin/true"], true);
    let echo_tpl = bundle(dir.path(), "echo-t", &["echo", "hello"], true);
    println!("runtime benchmark: {runs} runs each, interleaved, busybox bundle from `runc spec`");
    // The template is built once, by the first container of its shape;
    // that run is timed apart and left out of the medians.
    let first = Instant::now();
    run_true(Runtime::RunvmTemplate, dir.path(), &true_tpl, 0);
    println!(
        "runvm-t: the first run, which builds the template: {:.0} ms",
        ms(first.elapsed())
    );
    let rts = [Runtime::Runvm, Runtime::RunvmTemplate, Runtime::Runc];
    let mut run_ms: [Vec<f64>; 3] = Default::default();
    let mut cs: [Vec<StartSample>; 3] = Default::default();
    for n in 1..=runs {
        for (i, rt) in rts.iter().enumerate() {
            let (tb, eb) = match rt {
                Runtime::RunvmTemplate => (&true_tpl, &echo_tpl),
                _ => (&true_bundle, &echo_bundle),
            };
            let r = run_true(*rt, dir.path(), tb, n);
            let s = create_start(*rt, dir.path(), eb, n);
            eprintln!(
                "run {n}/{runs} {}: run /bin/true {r:.0} ms, create+start to first byte {:.0} ms",
                rt.name(),
                s.total_ms
            );
            run_ms[i].push(r);
            cs[i].push(s);
        }
    }
    let mut meds = [[0.0; 2]; 3];
    for (i, rt) in rts.iter().enumerate() {
        meds[i][0] = median(&mut run_ms[i].clone());
        meds[i][1] = median(&mut cs[i].iter().map(|s| s.total_ms).collect::<Vec<_>>());
        println!(
            "{:<7} run /bin/true median {:>7.1} ms   create+start to first byte median {:>7.1} ms",
            rt.name(),
            meds[i][0],
            meds[i][1]
        );
    }
    println!(
        "ratio runvm/runc: run {:.1}x, create+start to first byte {:.1}x",
        meds[0][0] / meds[2][0],
        meds[0][1] / meds[2][1]
    );
    println!(
        "ratio runvm-t/runc (template): run {:.1}x, create+start to first byte {:.1}x",
        meds[1][0] / meds[2][0],
        meds[1][1] / meds[2][1]
    );
    println!("where runvm's create+start goes (median of each phase):");
    print_phases(&cs[0], &PHASE_NAMES);
    println!("where runvm-t's create+start goes (median of each phase):");
    print_phases(&cs[1], &TEMPLATE_PHASE_NAMES);
    let guest: Vec<[f64; 6]> = cs[0].iter().filter_map(|s| s.guest).collect();
    if guest.is_empty() {
        println!("in the guest: the agent reported no figures");
    } else {
        let med = |i: usize| median(&mut guest.iter().map(|g| g[i]).collect::<Vec<_>>());
        println!(
            "in the guest (CLOCK_BOOTTIME, median of {}): the kernel's handover to the agent -> \
             the first process's program {:.1} ms = agent setup {:.1} ms + waiting for the \
             host (create, start) {:.1} ms + start {:.1} ms; agent RSS {:.0} KiB (peak {:.0} KiB)",
            guest.len(),
            med(0),
            med(1),
            med(2),
            med(3),
            med(4),
            med(5)
        );
    }
}
