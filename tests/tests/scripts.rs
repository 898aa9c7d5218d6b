//! Bad input to the project's build scripts fails fast and clearly.

use std::process::Command;

use runvm_tests::artifacts::repo_root;

fn kernel_build(args: &[&str]) -> (bool, String) {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(repo_root().join("kernel-config/build.sh"))
        .args(args)
        .args(["--cache-dir", cache.path().to_str().unwrap()])
        .output()
        .unwrap();
    let leftovers = std::fs::read_dir(cache.path())
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(leftovers, 0, "{args:?} left files in the cache dir");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn kernel_build_rejects_bad_input() {
    let not_kernel = tempfile::tempdir().unwrap();
    let text = not_kernel.path().join("notes.txt");
    std::fs::write(&text, "not a kernel").unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--source", "/nonexistent/linux.tar.xz"], "does not exist"),
        (&["--bogus"], "unknown option"),
        (&["--jobs", "0"], "positive number"),
        (
            &["--source", text.to_str().unwrap()],
            "neither a directory nor",
        ),
        (
            &["--source", not_kernel.path().to_str().unwrap()],
            "not a kernel source tree",
        ),
    ];
    for (args, expect) in cases {
        let (ok, err) = kernel_build(args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
}

#[test]
fn fragments_ask_for_what_the_guest_needs() {
    let dir = repo_root().join("kernel-config/fragments");
    let mut all = String::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        all.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap());
    }
    for opt in [
        "CONFIG_PVH=y",
        "CONFIG_KVM_GUEST=y",
        "CONFIG_SERIAL_8250_CONSOLE=y",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
        "CONFIG_VIRTIO_FS=y",
        "CONFIG_VIRTIO_NET=y",
        "CONFIG_VIRTIO_VSOCKETS=y",
        "CONFIG_VIRTIO_CONSOLE=y",
        "CONFIG_HW_RANDOM_VIRTIO=y",
        "CONFIG_VIRTIO_BLK=y",
        "CONFIG_EXT4_FS=y",
        "CONFIG_OVERLAY_FS=y",
        "CONFIG_DEVTMPFS=y",
        "CONFIG_MEMCG=y",
        "CONFIG_CGROUP_PIDS=y",
        "CONFIG_PID_NS=y",
        "CONFIG_SECCOMP_FILTER=y",
        "CONFIG_IPV6=y",
        "CONFIG_NF_TABLES=y",
        "# CONFIG_MODULES is not set",
    ] {
        assert!(all.lines().any(|l| l == opt), "no fragment asks for {opt}");
    }
}
