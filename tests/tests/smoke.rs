//! The chain every later test stands on: the project's guest kernel boots
//! under KVM to the project's agent as init.

use std::process::Command;
use std::time::Duration;

use runvm_tests::{artifacts, guest, kvm_test};

const READY: &str = "RUNVM_AGENT_READY";
const CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd \
                       8250.nr_uarts=1 quiet";

kvm_test!(
    /// QEMU's microvm is the VMM here until runvm's own vmm boots Linux.
    fn guest_kernel_boots_to_the_agent_under_qemu_microvm() {
        let dir = tempfile::tempdir().unwrap();
        let initrd = dir.path().join("initramfs.cpio");
        artifacts::write_agent_initramfs(&initrd);
        let kernel = artifacts::guest_kernel_dir().join("vmlinux");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "microvm,x-option-roms=off,rtc=off", "-accel", "kvm"])
            .args(["-cpu", "host", "-m", "256", "-smp", "1", "-nodefaults"])
            .args(["-no-user-config", "-no-reboot", "-display", "none"])
            .args(["-serial", "stdio", "-kernel"])
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", CMDLINE]);
        let run =
            guest::run_until_marker(cmd, READY, Duration::from_secs(180), Duration::from_secs(3));
        let after = run
            .marker_after
            .unwrap_or_else(|| panic!("the agent never reported ready:\n{}", run.output));
        let line = run.output.lines().find(|l| l.contains(READY)).unwrap();
        println!(
            "qemu-microvm spawn to agent ready: {after:?} ({line}); qemu exit: {:?}",
            run.status
        );
        assert!(
            !run.output.contains("Kernel panic"),
            "guest panicked:\n{}",
            run.output
        );
    }
);
