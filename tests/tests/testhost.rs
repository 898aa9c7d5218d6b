//! The test host runner itself: output, exit status and a working /dev/kvm
//! wherever KVM tests run (directly or inside the QEMU TCG test host).

use std::process::Command;

use runvm_tests::kvm::testhost_script;

fn testhost(args: &[&str]) -> std::process::Output {
    Command::new(testhost_script())
        .args(args)
        .output()
        .expect("run testhost.sh")
}

#[test]
fn runs_a_command_where_kvm_works_and_returns_its_status_and_output() {
    let out = testhost(&[
        "run",
        "--timeout",
        "600",
        "--",
        "sh",
        "-c",
        "test -w /dev/kvm && echo kvm-usable; pwd; touch \"$RUNVM_SCRATCH/x\" && echo scratch-ok; \
         echo to-stderr >&2; exit 3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("kvm-usable"), "{stdout}");
    assert!(stdout.contains("scratch-ok"), "{stdout}");
    let cwd = std::env::current_dir().unwrap();
    assert!(
        stdout.contains(cwd.to_str().unwrap()),
        "cwd not kept: {stdout}"
    );
    assert!(stderr.contains("to-stderr"), "{stderr}");
}

#[test]
fn bad_input_gets_a_message_and_a_non_zero_exit() {
    for (args, expect) in [
        (&["run", "--bogus", "true"][..], "unknown option"),
        (&["run"][..], "needs a command"),
        (
            &["run", "--timeout", "x", "true"][..],
            "not a positive number",
        ),
        (&["frobnicate"][..], "unknown command"),
        (&["setup", "extra"][..], "takes no arguments"),
    ] {
        let out = testhost(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let out = Command::new(testhost_script())
        .args(["run", "true"])
        .env("RUNVM_TESTHOST", "always")
        .env("RUNVM_QEMU", "/nonexistent/qemu-system-x86_64")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no QEMU for the test host"), "{err}");
    let out = Command::new(testhost_script())
        .arg("mode")
        .env("RUNVM_TESTHOST", "sometimes")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be auto, always or never"));
}

/// A stand-in for QEMU that plays a test host whose kernel hangs on the
/// first `lockups` runs (`hang`: a soft lockup on the console, a heartbeat
/// that stopped long ago, or a kernel panic that ends QEMU) and then runs
/// the command (prints and exits 0).
fn fake_qemu(dir: &std::path::Path, lockups: u32, hang: &str) -> std::path::PathBuf {
    let script = dir.join("fake-qemu");
    let count = dir.join("runs");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
console=; scratch=; monitor=
for a in "$@"; do
    case "$a" in
        file:*) console=${{a#file:}} ;;
        pipe:*) monitor=${{a#pipe:}} ;;
        *runvm_scratch=*) scratch=${{a##*runvm_scratch=}} ;;
    esac
done
n=$(( $(cat {count} 2>/dev/null || echo 0) + 1 )); echo $n > {count}
if [ $n -le {lockups} ]; then
    if [ {hang} = lockup ]; then
        echo "[ 150.1] watchdog: BUG: soft lockup - CPU#1 stuck for 130s! [runvm-vmm:142]" > "$console"
        # One answer of the monitor, waiting in its pipe, and the module
        # list the test host's init writes.
        exec 3<>"$monitor.in" 4<>"$monitor.out"
        printf 'CPU#0\nRIP=ffffffffc0a10123 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\nCR0=80050033 CR2=0 CR3=0000000002a10000 CR4=0\n' >&4
        echo "kvm_amd 155648 0 - Live 0xffffffffc0a10000" > "$scratch/modules"
    elif [ {hang} = panic ]; then
        # As seen in CI: the kernel dies under a vCPU thread; QEMU exits.
        echo "[ 30.7] BUG: TASK stack guard page was hit at 000000002bab995d" > "$console"
        echo "[ 30.9] Kernel panic - not syncing: corrupted stack end detected inside scheduler" >> "$console"
        exit 0
    else
        touch -d '10 minutes ago' "$scratch/heartbeat"
    fi
    exec sleep 300
fi
echo "ran in attempt $n" > "$scratch/stdout"; echo 0 > "$scratch/rc"
"#,
            count = count.display(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn a_test_host_that_hangs_is_stopped_and_the_command_run_once_more() {
    for (lockups, hang, code, says) in [
        (1, "lockup", Some(0), "ran in attempt 2"),
        (2, "lockup", Some(125), ""),
        (1, "silent", Some(0), "ran in attempt 2"),
        (1, "panic", Some(0), "ran in attempt 2"),
        (2, "panic", Some(125), ""),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(testhost_script())
            .args(["run", "--timeout", "200", "--", "true"])
            .env("RUNVM_TESTHOST", "always")
            .env("RUNVM_QEMU", fake_qemu(dir.path(), lockups, hang))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), code, "{stdout}\n{stderr}");
        assert!(stdout.contains(says), "{stdout}");
        assert!(stderr.contains("locked up"), "{stderr}");
        let why = match hang {
            "lockup" => "soft lockup",
            "panic" => "kernel panicked",
            _ => "no heartbeat",
        };
        assert!(stderr.contains(why), "{stderr}");
        if hang == "lockup" {
            assert!(
                stderr.contains(
                    "CPU#0 RIP=ffffffffc0a10123 HLT=0 CR3=0000000002a10000 (kvm_amd+0x123)"
                ),
                "{stderr}"
            );
        }
        assert!(stderr.contains("once more"), "{stderr}");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("runs"))
                .unwrap()
                .trim(),
            "2",
            "one retry, never more"
        );
    }
}
