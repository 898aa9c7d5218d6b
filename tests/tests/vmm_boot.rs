//! runvm-vmm booting real guests: vCPU and memory sizes, both kernel formats,
//! and guests that panic, hang or read the serial console.

use std::process::Command;
use std::time::Duration;

use runvm_tests::artifacts::{guest_kernel_dir, vmm_binary, vmm_command, Initrd};
use runvm_tests::guest::{GuestProcess, GuestRun};
use runvm_tests::kernel_symbols::KernelSymbols;
use runvm_tests::kvm_test;
use runvm_tests::smaps::{advised, field_kib, guest_ram_flags};
use vmm::guest_profile::Mode;

const READY: &str = "RUNVM_AGENT_READY";
const BOOT: Duration = Duration::from_secs(180);

fn vmm(kernel: &str, initrd: &Initrd, vcpus: u32, mem_mib: u64, cmdline: &str) -> Command {
    let mut cmd = vmm_command(kernel, initrd);
    cmd.args([
        "--vcpus",
        &vcpus.to_string(),
        "--mem-mib",
        &mem_mib.to_string(),
    ])
    .args(["--cmdline", cmdline]);
    cmd
}

fn code(run: &GuestRun) -> Option<i32> {
    run.status.and_then(|s| s.code())
}

/// Boots the agent and returns its ready line.
fn boot_agent(kernel: &str, vcpus: u32, mem_mib: u64) -> String {
    let initrd = Initrd::agent();
    let mut cmd = vmm(kernel, &initrd, vcpus, mem_mib, "quiet");
    cmd.args(["--boot-timeout", "150"]);
    let mut guest = GuestProcess::spawn(cmd);
    let ready = guest.wait_for(READY, BOOT);
    let run = guest.finish(Duration::from_secs(30));
    assert!(ready.is_some(), "no ready line:\n{}", run.output);
    assert_eq!(code(&run), Some(0), "{}", run.output);
    assert!(run.output.contains("guest reset (i8042)"), "{}", run.output);
    let line = run
        .output
        .lines()
        .find(|l| l.contains(READY))
        .unwrap()
        .to_owned();
    println!("{kernel} {vcpus} vCPU {mem_mib} MiB: {line}");
    line
}

fn mem_total_kib(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("mem_total_kib="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no mem_total_kib in {line}"))
}

kvm_test!(
    fn vmlinux_with_one_vcpu_and_128_mib() {
        let line = boot_agent("vmlinux", 1, 128);
        assert!(line.contains("cpus_online=0 "), "{line}");
        let kib = mem_total_kib(&line);
        assert!((100_000..=131_072).contains(&kib), "{line}");
    }
);

kvm_test!(
    fn vmlinux_with_two_vcpus_and_1_gib() {
        let line = boot_agent("vmlinux", 2, 1024);
        assert!(
            line.contains("cpus_online=0-1 "),
            "both vCPUs online: {line}"
        );
        let kib = mem_total_kib(&line);
        assert!((1_000_000..=1_048_576).contains(&kib), "{line}");
    }
);

kvm_test!(
    fn bzimage_boots_through_the_64_bit_boot_protocol() {
        let line = boot_agent("bzImage", 1, 256);
        assert!(line.contains("cpus_online=0 "), "{line}");
    }
);

kvm_test!(
    fn a_guest_profile_samples_every_vcpu_mostly_in_kernel_text() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("profile");
        let initrd = Initrd::agent();
        let mut cmd = vmm("vmlinux", &initrd, 2, 128, "quiet");
        cmd.args(["--boot-timeout", "150", "--guest-profile"])
            .arg(&out);
        let run = GuestProcess::spawn(cmd).finish(BOOT);
        assert!(run.output.contains(READY), "{}", run.output);
        assert_eq!(code(&run), Some(0), "{}", run.output);
        let text = std::fs::read_to_string(&out).unwrap();
        let samples = vmm::guest_profile::parse(&text).unwrap();
        let kernel = KernelSymbols::load(&guest_kernel_dir().join("vmlinux")).unwrap();
        let summary = kernel.summarize(&samples);
        println!(
            "{} samples; most: {:?}",
            samples.len(),
            &summary[..summary.len().min(8)]
        );
        // A boot to the agent takes hundreds of milliseconds even on
        // hardware; at one sample per vCPU every 2 ms that is well over 20.
        assert!(samples.len() >= 20, "{} samples", samples.len());
        for vcpu in 0..2 {
            let times: Vec<_> = samples
                .iter()
                .filter(|s| s.vcpu == vcpu)
                .map(|s| s.elapsed)
                .collect();
            assert!(!times.is_empty(), "no sample of vCPU {vcpu}");
            assert!(
                times.windows(2).all(|w| w[0] <= w[1]),
                "vCPU {vcpu}'s samples out of order"
            );
        }
        // The boot vCPU runs the kernel; the agent's own work is short.
        let boot_vcpu: Vec<_> = samples.iter().filter(|s| s.vcpu == 0).collect();
        let in_text = boot_vcpu.iter().filter(|s| kernel.in_text(s.rip)).count();
        assert!(
            in_text * 2 > boot_vcpu.len(),
            "{in_text} of vCPU 0's {} samples in the kernel's text: {summary:?}",
            boot_vcpu.len()
        );
        assert!(
            samples.iter().any(|s| s.mode == Mode::Real && s.vcpu == 1),
            "vCPU 1 was never seen before the kernel started it: {summary:?}"
        );
    }
);

kvm_test!(
    fn a_guest_that_panics_is_reported_as_a_panic() {
        // init exiting makes the kernel panic; panic=-1 resets at once.
        let initrd = Initrd::busybox("echo init-exits-now\nexit 1");
        let mut cmd = vmm("vmlinux", &initrd, 1, 128, "quiet");
        cmd.args(["--boot-timeout", "150"]);
        let run = GuestProcess::spawn(cmd).finish(BOOT);
        assert!(run.output.contains("init-exits-now"), "{}", run.output);
        assert!(run.output.contains("Kernel panic"), "{}", run.output);
        assert_eq!(code(&run), Some(4), "{}", run.output);
        assert!(
            run.output.contains("runvm-vmm: guest kernel panicked"),
            "{}",
            run.output
        );
    }
);

kvm_test!(
    fn a_triple_fault_ends_the_vm_and_is_reported() {
        let initrd = Initrd::agent();
        // The caller's reboot=t overrides the VMM's reboot=k: the agent's
        // reboot then triple-faults instead of using the i8042.
        let mut cmd = vmm("vmlinux", &initrd, 1, 128, "quiet reboot=t");
        cmd.args(["--boot-timeout", "150"]);
        let run = GuestProcess::spawn(cmd).finish(BOOT);
        assert!(run.output.contains(READY), "{}", run.output);
        assert_eq!(code(&run), Some(3), "{}", run.output);
        assert!(
            run.output.contains("runvm-vmm: guest triple-faulted"),
            "{}",
            run.output
        );
    }
);

kvm_test!(
    fn a_guest_that_never_finishes_hits_the_boot_timeout() {
        let initrd =
            Initrd::busybox("echo hanging-forever\nwhile true; do /bin/busybox sleep 1; done");
        let mut cmd = vmm("vmlinux", &initrd, 2, 128, "quiet");
        // Long enough for a slow boot in a loaded nested test host: the
        // guest must reach its loop before the timeout ends it.
        cmd.args(["--boot-timeout", "90"]);
        let mut guest = GuestProcess::spawn(cmd);
        let hung = guest.wait_for("hanging-forever", BOOT);
        // The VMM ends it 90 s after its start, however fast it booted.
        let run = guest.finish(Duration::from_secs(150));
        assert!(hung.is_some(), "{}", run.output);
        assert_eq!(code(&run), Some(124), "{}", run.output);
        assert!(
            run.output.contains("runvm-vmm: boot timeout elapsed"),
            "{}",
            run.output
        );
    }
);

kvm_test!(
    fn serial_input_reaches_the_guest() {
        let initrd = Initrd::busybox(
            "echo WAITING-FOR-INPUT\nread line\necho \"GOT[$line]\"\n/bin/busybox reboot -f",
        );
        let mut cmd = vmm("vmlinux", &initrd, 1, 128, "quiet");
        cmd.args(["--boot-timeout", "150", "--console-input"]);
        let mut guest = GuestProcess::spawn(cmd);
        assert!(guest.wait_for("WAITING-FOR-INPUT", BOOT).is_some());
        guest.send(b"hello-from-host\n");
        let got = guest.wait_for("GOT[hello-from-host]", Duration::from_secs(60));
        let run = guest.finish(Duration::from_secs(60));
        assert!(got.is_some(), "{}", run.output);
        assert_eq!(code(&run), Some(0), "{}", run.output);
    }
);

kvm_test!(
    fn initramfs_archives_are_unpacked_one_after_another() {
        use std::io::Write;
        let initrd = Initrd::busybox(
            "echo \"EXTRA[$(/bin/busybox cat /extra/note)]\"\n/bin/busybox reboot -f",
        );
        // A first part whose size is no multiple of 4: the second must
        // still start where the kernel looks for it.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&initrd.path)
            .unwrap()
            .write_all(&[0])
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let extra = dir.path().join("extra.cpio");
        let mut ar = vmm::initramfs::Initramfs::new();
        ar.dir("extra", 0o755)
            .and_then(|a| a.file("extra/note", 0o644, b"second archive".to_vec()))
            .unwrap();
        std::fs::write(&extra, ar.to_bytes().unwrap()).unwrap();
        let mut cmd = vmm("vmlinux", &initrd, 1, 128, "quiet");
        cmd.arg("--initramfs")
            .arg(&extra)
            .args(["--boot-timeout", "150"]);
        let mut guest = GuestProcess::spawn(cmd);
        let got = guest.wait_for("EXTRA[second archive]", BOOT);
        let run = guest.finish(Duration::from_secs(60));
        assert!(got.is_some(), "{}", run.output);
        assert_eq!(code(&run), Some(0), "{}", run.output);
    }
);

kvm_test!(
    fn mapped_boot_files_boot_two_guests_and_stay_unchanged() {
        // Copies on this test host's own file system (its /tmp), where
        // mapping certainly works, so a silent fallback to copying fails.
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::copy(guest_kernel_dir().join("vmlinux"), &kernel).unwrap();
        let initrd = Initrd::agent();
        let before = (
            std::fs::read(&kernel).unwrap(),
            std::fs::read(&initrd.path).unwrap(),
        );
        let spawn = || {
            let mut cmd = Command::new(vmm_binary());
            cmd.arg("--kernel")
                .arg(&kernel)
                .arg("--initramfs")
                .arg(&initrd.path)
                .args(["--map-boot-files", "--report-timing", "--cmdline", "quiet"])
                .args(["--boot-timeout", "150"]);
            GuestProcess::spawn(cmd)
        };
        // Two guests at once share the kernel's pages; each writes its own
        // copies. (The initramfs is copied; it must stay unchanged too.)
        let mut guests = [spawn(), spawn()];
        let ready: Vec<bool> = guests
            .iter_mut()
            .map(|g| g.wait_for(READY, BOOT).is_some())
            .collect();
        for (guest, ready) in guests.into_iter().zip(ready) {
            let run = guest.finish(Duration::from_secs(30));
            assert!(ready, "no ready line:\n{}", run.output);
            assert_eq!(code(&run), Some(0), "{}", run.output);
            let mapped_kib: u64 = run
                .output
                .split("boot files mapped ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no mapped figure:\n{}", run.output));
            assert!(
                mapped_kib > 4096,
                "{mapped_kib} KiB mapped:\n{}",
                run.output
            );
        }
        assert!(
            std::fs::read(&kernel).unwrap() == before.0
                && std::fs::read(&initrd.path).unwrap() == before.1,
            "a guest's writes reached a boot file"
        );
    }
);

kvm_test!(
    fn bad_configuration_is_a_clear_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not a kernel").unwrap();
        let vmlinux = guest_kernel_dir().join("vmlinux");
        let vmlinux = vmlinux.to_str().unwrap();
        let huge_initrd = dir.path().join("huge.cpio");
        std::fs::File::create(&huge_initrd)
            .unwrap()
            .set_len(200 << 20)
            .unwrap();
        let long_cmdline = "x".repeat(4096);
        let cases: Vec<(Vec<&str>, &str)> = vec![
            (
                vec!["--kernel", "/nonexistent/vmlinux"],
                "cannot read kernel /nonexistent/vmlinux",
            ),
            (
                vec!["--kernel", text.to_str().unwrap()],
                "neither an ELF vmlinux nor a bzImage",
            ),
            (vec!["--kernel", vmlinux, "--mem-mib", "0"], "too small"),
            (
                vec!["--kernel", vmlinux, "--mem-mib", "100000000"],
                "exceeds the host limit",
            ),
            (
                vec!["--kernel", vmlinux, "--vcpus", "0"],
                "at least one vCPU",
            ),
            (vec!["--kernel", vmlinux, "--vcpus", "100000"], "at most"),
            (
                vec!["--kernel", vmlinux, "--cmdline", &long_cmdline],
                "command line",
            ),
            (
                vec![
                    "--kernel",
                    vmlinux,
                    "--initramfs",
                    huge_initrd.to_str().unwrap(),
                ],
                "does not fit",
            ),
            (
                vec!["--kernel", vmlinux, "--console", "tcp:1"],
                "--console must be",
            ),
            (
                vec!["--kernel", vmlinux, "--net", "fd=987"],
                "not an open file descriptor",
            ),
            (
                vec!["--kernel", vmlinux, "--net", "tap=../etc"],
                "interface name",
            ),
        ];
        for (args, expect) in cases {
            let out = Command::new(vmm_binary()).args(&args).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            assert!(err.contains(expect), "{args:?}: {err}");
            assert!(!err.contains("panicked"), "{args:?}: {err}");
        }
    }
);

/// Boots a guest that fills 48 MiB of tmpfs and then waits; returns the
/// VmFlags of each of the VMM's guest RAM mappings and its ShmemPmdMapped
/// (KiB) while the guest waits.
fn guest_ram_pages(extra: &[&str]) -> (Vec<String>, u64) {
    let initrd = Initrd::busybox(
        "mount -t tmpfs tmpfs /tmp\n\
         dd if=/dev/zero of=/tmp/fill bs=1M count=48 2>/dev/null\n\
         echo FILLED\n\
         read -r line\n\
         reboot -f",
    );
    let mut cmd = vmm("vmlinux", &initrd, 1, 256, "quiet");
    cmd.args(["--boot-timeout", "150", "--console-input"])
        .args(extra);
    let mut guest = GuestProcess::spawn(cmd);
    let filled = guest.wait_for("FILLED", BOOT);
    let flags = filled.map(|_| guest_ram_flags(guest.pid()));
    let rollup = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", guest.pid()));
    guest.send(b"done\n");
    let run = guest.finish(Duration::from_secs(30));
    assert!(
        filled.is_some(),
        "the guest did not fill its tmpfs:\n{}",
        run.output
    );
    let flags = flags.unwrap_or_default();
    let pmd_kib = rollup
        .expect("the VMM's smaps_rollup")
        .lines()
        .find_map(|l| field_kib(l, "ShmemPmdMapped"))
        .expect("ShmemPmdMapped in smaps_rollup");
    (flags, pmd_kib)
}

/// The host's shmem THP mode, e.g. "advise" (the bracketed word).
fn shmem_thp_mode() -> String {
    let s = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
        .unwrap_or_default();
    s.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
        .unwrap_or("none")
        .to_owned()
}

kvm_test!(
    fn guest_ram_is_advised_for_huge_pages_unless_told_not_to() {
        let mode = shmem_thp_mode();
        let (flags, pmd_kib) = guest_ram_pages(&[]);
        assert!(
            flags.iter().all(|f| advised(f)),
            "every guest RAM mapping advised: {flags:?}"
        );
        // The test host sets `advise`; a host with `never` ignores the advice.
        if mode == "advise" {
            assert!(
                pmd_kib >= 4 << 10,
                "huge pages back guest RAM: {pmd_kib} KiB"
            );
        }
        let (flags, pmd_kib) = guest_ram_pages(&["--no-huge-pages"]);
        assert!(
            flags.iter().all(|f| !advised(f)),
            "no guest RAM mapping advised: {flags:?}"
        );
        if mode == "advise" {
            assert_eq!(pmd_kib, 0, "no huge page backs guest RAM");
        }
        println!("shmem THP {mode}: huge pages with advice, none without");
    }
);
