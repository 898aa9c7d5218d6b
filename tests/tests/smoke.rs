//! The chain every later test stands on: the project's guest kernel boots
//! under KVM, in runvm's own VMM, to the project's agent as init.

use std::time::Duration;

use runvm_tests::artifacts::{vmm_command, Initrd};
use runvm_tests::guest::GuestProcess;
use runvm_tests::kvm_test;

kvm_test!(
    fn guest_kernel_boots_to_the_agent_in_runvm_vmm() {
        let initrd = Initrd::agent();
        let mut cmd = vmm_command("vmlinux", &initrd);
        cmd.args(["--boot-timeout", "150", "--cmdline", "quiet"]);
        let mut guest = GuestProcess::spawn(cmd);
        let ready = guest.wait_for("RUNVM_AGENT_READY", Duration::from_secs(180));
        let run = guest.finish(Duration::from_secs(30));
        let after =
            ready.unwrap_or_else(|| panic!("the agent never reported ready:\n{}", run.output));
        let line = run
            .output
            .lines()
            .find(|l| l.contains("RUNVM_AGENT_READY"))
            .unwrap();
        println!(
            "runvm-vmm spawn to agent ready: {after:?} ({line}); exit after {:?}",
            run.elapsed
        );
        assert_eq!(run.status.and_then(|s| s.code()), Some(0), "{}", run.output);
        assert!(
            run.output.contains("runvm-vmm: guest reset (i8042)"),
            "{}",
            run.output
        );
    }
);
