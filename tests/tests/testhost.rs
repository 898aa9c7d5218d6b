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
