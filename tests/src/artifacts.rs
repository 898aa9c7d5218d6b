//! What guests need: the guest kernel, the static agent, an initramfs.
//!
//! Each is built once per test process by the project's own scripts (which
//! cache across runs), or taken from the environment when CI built it already.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use vmm::initramfs::Initramfs;

/// The checkout this crate was built from.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn from_env_or_script(var: &str, script: &str, args: &[&str]) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return PathBuf::from(p);
    }
    let out = Command::new(repo_root().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim())
}

/// Directory with the guest `vmlinux` and `bzImage` (`RUNVM_GUEST_KERNEL_DIR`,
/// or `kernel-config/build.sh`).
pub fn guest_kernel_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| from_env_or_script("RUNVM_GUEST_KERNEL_DIR", "kernel-config/build.sh", &[]))
}

/// The static agent binary (`RUNVM_AGENT_BIN`, or `guest-agent/build-static.sh`).
pub fn agent_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| from_env_or_script("RUNVM_AGENT_BIN", "guest-agent/build-static.sh", &[]))
}

/// The static guest test helper (`RUNVM_GUEST_TOOL_BIN`, or
/// `guest-agent/build-static.sh runvm-guest-tool`).
pub fn guest_tool_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        from_env_or_script(
            "RUNVM_GUEST_TOOL_BIN",
            "guest-agent/build-static.sh",
            &["runvm-guest-tool"],
        )
    })
}

/// Variables that hand the artifacts built here to a child test process.
pub fn env_for_children() -> Vec<(String, PathBuf)> {
    vec![
        (
            "RUNVM_GUEST_KERNEL_DIR".into(),
            guest_kernel_dir().to_owned(),
        ),
        ("RUNVM_AGENT_BIN".into(), agent_binary().to_owned()),
        (
            "RUNVM_GUEST_TOOL_BIN".into(),
            guest_tool_binary().to_owned(),
        ),
    ]
}

/// A guest initramfs in a temporary directory that goes away with it.
#[derive(Debug)]
pub struct Initrd {
    _dir: tempfile::TempDir,
    /// The cpio archive.
    pub path: PathBuf,
}

impl Initrd {
    fn build(write: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir for the initramfs");
        let path = dir.path().join("initramfs.cpio");
        write(&path);
        Initrd { _dir: dir, path }
    }

    /// /init is the agent.
    pub fn agent() -> Self {
        Self::build(write_agent_initramfs)
    }

    /// /init is `script`, run by Debian's static busybox.
    pub fn busybox(script: &str) -> Self {
        Self::build(|p| write_busybox_initramfs(p, script, false))
    }

    /// Like [`Initrd::busybox`], with `/bin/runvm-guest-tool` added.
    pub fn busybox_with_tool(script: &str) -> Self {
        Self::build(|p| write_busybox_initramfs(p, script, true))
    }
}

/// Writes an initramfs whose /init is the agent to `dest`.
fn write_agent_initramfs(dest: &Path) {
    let agent = std::fs::read(agent_binary()).expect("read the agent binary");
    let ar = Initramfs::with_init(agent).expect("initramfs entries");
    std::fs::write(dest, ar.to_bytes().expect("initramfs bytes")).expect("write initramfs");
}

/// Writes an initramfs whose /init is `script`, run by Debian's static
/// busybox (package busybox-static), for guests that must misbehave on purpose.
fn write_busybox_initramfs(dest: &Path, script: &str, with_tool: bool) {
    let busybox = std::fs::read("/bin/busybox").expect("read /bin/busybox (busybox-static)");
    let init = format!("#!/bin/busybox sh\n{script}\n").into_bytes();
    let mut ar = Initramfs::with_init(init).expect("initramfs entries");
    ar.dir("bin", 0o755)
        .and_then(|a| a.file("bin/busybox", 0o755, busybox))
        .and_then(|a| a.symlink("bin/sh", "busybox"))
        .expect("initramfs entries");
    if with_tool {
        let tool = std::fs::read(guest_tool_binary()).expect("read runvm-guest-tool");
        ar.file("bin/runvm-guest-tool", 0o755, tool)
            .expect("initramfs entries");
    }
    std::fs::write(dest, ar.to_bytes().expect("initramfs bytes")).expect("write initramfs");
}

/// `runvm-vmm` booting `kernel` (a file of [`guest_kernel_dir`]) with `initrd`.
pub fn vmm_command(kernel: &str, initrd: &Initrd) -> Command {
    let mut cmd = Command::new(vmm_binary());
    cmd.arg("--kernel")
        .arg(guest_kernel_dir().join(kernel))
        .arg("--initramfs")
        .arg(&initrd.path);
    cmd
}

/// The `runvm-vmm` binary cargo built next to this test.
pub fn vmm_binary() -> PathBuf {
    workspace_binary("runvm-vmm")
}

/// The `runvm` runtime binary cargo built next to this test.
pub fn runvm_binary() -> PathBuf {
    workspace_binary("runvm")
}

fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin
}

/// Fills `dir` with a busybox root filesystem: /bin/busybox (Debian's
/// busybox-static) and a link per applet, /tmp, mount points, /etc.
pub fn busybox_rootfs(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("rootfs /bin");
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("copy /bin/busybox");
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
        }
    }
    for d in ["tmp", "proc", "sys", "dev", "etc"] {
        std::fs::create_dir_all(dir.join(d)).expect("rootfs directory");
    }
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod /tmp");
}
