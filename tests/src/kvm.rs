//! Where KVM tests run: here, or inside the test host.

use std::path::PathBuf;
use std::process::Command;

use crate::artifacts;

/// How KVM-dependent tests run on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmPlace {
    /// /dev/kvm here boots standard Linux guests (or we are in the test host).
    Native,
    /// Tests re-run themselves inside the QEMU TCG test host.
    TestHost,
}

/// Real hardware virtualization, not PVM: only then does /dev/kvm boot Linux.
fn native_kvm() -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let hw = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false);
    usable && !pvm && hw
}

/// Decides as `testhost.sh mode` does, honouring `RUNVM_TESTHOST`.
pub fn place() -> KvmPlace {
    if std::env::var_os("RUNVM_IN_TESTHOST").is_some() {
        return KvmPlace::Native;
    }
    match std::env::var("RUNVM_TESTHOST").as_deref() {
        Ok("always") => KvmPlace::TestHost,
        Ok("never") => KvmPlace::Native,
        _ if native_kvm() => KvmPlace::Native,
        _ => KvmPlace::TestHost,
    }
}

/// The test host runner script.
pub fn testhost_script() -> PathBuf {
    artifacts::repo_root().join("tests/testhost/testhost.sh")
}

/// libtest names a test by its module path below the crate root.
fn libtest_name(path: &str) -> &str {
    path.split_once("::").map_or(path, |(_, rest)| rest)
}

/// Returns true when the test body should run in this process. Otherwise runs
/// the test (by `path`, from `module_path!()`) inside the test host, panics
/// unless it ran there and passed, and returns false.
pub fn run_here_or_in_testhost(path: &str) -> bool {
    if place() == KvmPlace::Native {
        return true;
    }
    let name = libtest_name(path);
    // Build what the guest needs out here, where cargo and the caches are
    // writable; the test host sees the results read-only at the same paths.
    let env = artifacts::env_for_children();
    let exe = std::env::current_exe().expect("current test executable");
    let timeout = std::env::var("RUNVM_TESTHOST_TIMEOUT").unwrap_or_else(|_| "1200".into());
    let out = Command::new(testhost_script())
        .args(["run", "--timeout", &timeout, "--"])
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .envs(env)
        .output()
        .expect("spawn tests/testhost/testhost.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("---- {name} in the test host: stdout ----\n{stdout}");
    eprintln!("---- {name} in the test host: stderr ----\n{stderr}");
    assert!(
        out.status.success(),
        "{name} failed in the test host ({})",
        out.status
    );
    // A filter that matched nothing also exits 0: insist that exactly this
    // test ran (--exact) and passed.
    assert!(
        stdout.contains(&format!("test {name} ... "))
            && stdout.contains("test result: ok. 1 passed;"),
        "{name} did not run in the test host"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_names_drop_the_crate() {
        assert_eq!(libtest_name("smoke::boots"), "boots");
        assert_eq!(libtest_name("smoke::vmm::boots"), "vmm::boots");
        assert_eq!(libtest_name("boots"), "boots");
    }
}
