//! The chain every later test stands on: the project's guest kernel boots
//! under KVM, in runvm's own VMM, to the project's agent as init; and the
//! main job: a container run by `runvm` in a micro-VM, from a bundle and
//! from an image built offline.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use runvm_tests::artifacts::{
    agent_binary, busybox_rootfs, guest_kernel_dir, runvm_binary, vmm_command, Initrd,
};
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

kvm_test!(
    fn a_container_runs_in_a_micro_vm_through_runvm() {
        // The user's path: `runvm spec` writes the bundle's config, a busybox
        // rootfs goes next to it, `runvm run` runs it in a micro-VM.
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        busybox_rootfs(&bundle.join("rootfs"));
        let runvm = |args: &[&str]| {
            let mut c = Command::new(runvm_binary());
            c.arg("--root")
                .arg(dir.path().join("state"))
                .args(args)
                .env("RUNVM_KERNEL", guest_kernel_dir().join("vmlinux"))
                .env("RUNVM_AGENT", agent_binary())
                .stdin(Stdio::null());
            c
        };
        let spec = runvm(&["spec", "--bundle", bundle.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            spec.status.success(),
            "{}",
            String::from_utf8_lossy(&spec.stderr)
        );
        let path = bundle.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        config["process"]["args"] = serde_json::json!(["echo", "hello from a runvm container"]);
        // Nested emulation boots slowly; the default is for real KVM.
        config["annotations"] = serde_json::json!({"io.runvm.boot_timeout": "600"});
        std::fs::write(&path, config.to_string()).unwrap();

        let start = Instant::now();
        let out = runvm(&["run", "smoke", "--bundle", bundle.to_str().unwrap()])
            .output()
            .unwrap();
        let elapsed = start.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "runvm run: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout, "hello from a runvm container\n");
        println!(
            "runvm run (boot, run, shutdown) in {elapsed:?}: container said: {}",
            stdout.trim()
        );
    }
);

kvm_test!(
    fn a_busybox_image_built_offline_runs_with_runvm_run() {
        // What setup.sh installs: an image made from Debian's busybox-static
        // with `runvm image create`, no registry and no network.
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        busybox_rootfs(&rootfs);
        std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        let runvm = |args: &[&str]| {
            let out = Command::new(runvm_binary())
                .arg("--root")
                .arg(dir.path().join("state"))
                .arg("--store")
                .arg(dir.path().join("store"))
                .args(args)
                .env("RUNVM_KERNEL", guest_kernel_dir().join("vmlinux"))
                .env("RUNVM_AGENT", agent_binary())
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "runvm {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let src = rootfs.to_str().unwrap();
        runvm(&[
            "image",
            "create",
            "busybox",
            src,
            "--cmd",
            "sh",
            "-e",
            "PATH=/bin",
        ]);
        let start = Instant::now();
        let out = runvm(&[
            "run",
            "--rm",
            "--annotation",
            "io.runvm.boot_timeout=600",
            "busybox",
            "echo",
            "hello from the busybox image",
        ]);
        let elapsed = start.elapsed();
        assert_eq!(out, "hello from the busybox image\n");
        println!(
            "runvm run --rm busybox (unpack, boot, run, shutdown) in {elapsed:?}: container said: {}",
            out.trim()
        );
    }
);
