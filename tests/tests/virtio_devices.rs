//! Virtio devices seen from inside a real guest.

use std::time::Duration;

use runvm_tests::artifacts::{vmm_command, Initrd};
use runvm_tests::guest::GuestProcess;
use runvm_tests::kvm_test;

kvm_test!(
    fn the_guest_reads_entropy_from_virtio_rng() {
        let initrd = Initrd::busybox(
            "bb=/bin/busybox\n\
             $bb mount -t sysfs sys /sys\n\
             $bb mount -t devtmpfs dev /dev\n\
             echo \"RNG[$($bb cat /sys/class/misc/hw_random/rng_current)]\"\n\
             echo \"HEX[$($bb head -c 32 /dev/hwrng | $bb od -An -tx1 | $bb tr -d ' \\n')]\"\n\
             $bb reboot -f",
        );
        let mut cmd = vmm_command("vmlinux", &initrd);
        cmd.args(["--rng", "--boot-timeout", "150", "--cmdline", "quiet"]);
        let run = GuestProcess::spawn(cmd).finish(Duration::from_secs(180));
        assert_eq!(run.status.and_then(|s| s.code()), Some(0), "{}", run.output);
        assert!(run.output.contains("RNG[virtio_rng.0]"), "{}", run.output);
        let hex = run
            .output
            .lines()
            .find_map(|l| l.split("HEX[").nth(1))
            .and_then(|rest| rest.split(']').next())
            .unwrap_or_else(|| panic!("no HEX line:\n{}", run.output));
        assert_eq!(hex.len(), 64, "32 bytes as hex: {hex}");
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()), "{hex}");
        assert_ne!(hex, "0".repeat(64), "entropy is not all zeros");
    }
);
