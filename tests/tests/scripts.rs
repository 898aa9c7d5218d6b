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
        "CONFIG_CPU_MITIGATIONS=y",
        "CONFIG_STACKPROTECTOR_STRONG=y",
        "CONFIG_BPF_JIT=y",
    ] {
        assert!(all.lines().any(|l| l == opt), "no fragment asks for {opt}");
    }
}

/// The cache key of `kernel-config/` copied to a scratch directory, built
/// from a stand-in kernel source tree (only its version is read).
fn kernel_key(tree: &std::path::Path, source: &std::path::Path) -> String {
    let out = Command::new(tree.join("kernel-config/build.sh"))
        .args(["--source", source.to_str().unwrap(), "--print-key"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(key.len(), 16, "{key:?}");
    key
}

#[test]
fn the_kernel_cache_key_follows_options_not_comments() {
    let tree = tempfile::tempdir().unwrap();
    let root = repo_root();
    for dir in [
        "kernel-config/fragments",
        "kernel-config/patches",
        "scripts",
    ] {
        std::fs::create_dir_all(tree.path().join(dir)).unwrap();
    }
    for file in ["kernel-config/build.sh", "scripts/apt-install.sh"] {
        std::fs::copy(root.join(file), tree.path().join(file)).unwrap();
    }
    for dir in ["kernel-config/fragments", "kernel-config/patches"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), tree.path().join(dir).join(e.file_name())).unwrap();
        }
    }
    let source = tempfile::tempdir().unwrap();
    std::fs::write(
        source.path().join("Makefile"),
        "kernelversion:\n\t@echo 6.12.0\n",
    )
    .unwrap();
    let fragment = tree
        .path()
        .join("kernel-config/fragments/15-hardening.conf");
    let original = std::fs::read_to_string(&fragment).unwrap();
    let key = kernel_key(tree.path(), source.path());

    std::fs::write(&fragment, format!("# a new comment\n\n{original}")).unwrap();
    assert_eq!(kernel_key(tree.path(), source.path()), key);

    for changed in [
        original.replace("CONFIG_BPF_JIT=y", "# CONFIG_BPF_JIT is not set"),
        original.replace("# CONFIG_MITIGATION_CALL_DEPTH_TRACKING is not set\n", ""),
        format!("{original}CONFIG_KFENCE=y\n"),
    ] {
        std::fs::write(&fragment, changed).unwrap();
        assert_ne!(kernel_key(tree.path(), source.path()), key);
    }
    std::fs::write(&fragment, &original).unwrap();
    assert_eq!(kernel_key(tree.path(), source.path()), key);

    // Every byte of a patch counts, its description included: it is applied
    // as it stands.
    let patch = std::fs::read_dir(tree.path().join("kernel-config/patches"))
        .unwrap()
        .next()
        .expect("kernel-config/patches holds a patch")
        .unwrap()
        .path();
    let text = std::fs::read_to_string(&patch).unwrap();
    std::fs::write(&patch, format!("{text}\n")).unwrap();
    assert_ne!(kernel_key(tree.path(), source.path()), key);
}

#[test]
fn a_patch_that_does_not_apply_stops_the_kernel_build() {
    // A stand-in source tree with the kernel's version and none of its
    // files: the fuse patch finds no fs/fuse/dir.c. The build fails before
    // configuring, leaves nothing in the cache, and never touches the tree.
    let source = tempfile::tempdir().unwrap();
    let makefile = "kernelversion:\n\t@echo 6.12.0\n";
    std::fs::write(source.path().join("Makefile"), makefile).unwrap();
    let (ok, err) = kernel_build(&["--source", source.path().to_str().unwrap()]);
    assert!(!ok, "{err}");
    assert!(err.contains("does not apply"), "{err}");
    assert!(!err.contains("configuring"), "{err}");
    let left: Vec<_> = std::fs::read_dir(source.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["Makefile"]);
    assert_eq!(
        std::fs::read_to_string(source.path().join("Makefile")).unwrap(),
        makefile
    );
}
