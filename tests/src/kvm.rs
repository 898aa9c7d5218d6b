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

/// `testhost.sh mode` decides (one definition of "KVM that boots Linux",
/// honouring `RUNVM_TESTHOST`). Inside the test host the answer is always
/// native, whatever `RUNVM_TESTHOST` says, or tests would recurse.
pub fn place() -> KvmPlace {
    if std::env::var_os("RUNVM_IN_TESTHOST").is_some() {
        return KvmPlace::Native;
    }
    let out = Command::new(testhost_script())
        .arg("mode")
        .output()
        .expect("run tests/testhost/testhost.sh mode");
    match String::from_utf8_lossy(&out.stdout).trim() {
        "native" if out.status.success() => KvmPlace::Native,
        "testhost" if out.status.success() => KvmPlace::TestHost,
        _ => panic!(
            "testhost.sh mode failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `testhost.sh run` for `program`, with the artifacts built out here handed
/// to it: the test host sees them read-only at the same paths.
pub fn testhost_run(program: &std::path::Path, timeout_s: &str) -> Command {
    let mut cmd = Command::new(testhost_script());
    cmd.args(["run", "--timeout", timeout_s, "--"])
        .arg(program)
        .envs(artifacts::env_for_children());
    cmd
}

/// The test host runner script.
pub fn testhost_script() -> PathBuf {
    artifacts::repo_root().join("tests/testhost/testhost.sh")
}

/// The start of a benchmark's `main` (`harness = false`): refuses any
/// argument but `--bench` (printing `usage`), and where KVM needs the test
/// host, runs this benchmark there and exits with its status. Returns when
/// the benchmark should run in this process.
pub fn bench_here_or_in_testhost(usage: &str, timeout_s: &str) {
    if std::env::args().skip(1).any(|a| a != "--bench") {
        eprintln!("usage: {usage}");
        std::process::exit(2);
    }
    if place() == KvmPlace::TestHost {
        let exe = std::env::current_exe().expect("bench executable");
        let status = testhost_run(&exe, timeout_s)
            .status()
            .expect("run the test host");
        std::process::exit(status.code().unwrap_or(1));
    }
}

/// libtest names a test by its module path below the crate root.
fn libtest_name(path: &str) -> &str {
    path.split_once("::").map_or(path, |(_, rest)| rest)
}

/// How often a test that keeps failing with a nested triple fault runs in
/// all before its failure stands.
pub const TRIPLE_FAULT_ATTEMPTS: u32 = 3;

/// What the VMM prints on stderr when a guest triple-faults, whichever way
/// the failure reaches a test (the VMM's own exit report, or an engine that
/// quotes the monitor's stderr).
pub fn triple_fault_marker() -> String {
    vmm::exit::ExitReason::TripleFault.to_string()
}

/// Returns true when the test body should run in this process. Otherwise runs
/// the test (by `path`, from `module_path!()`) inside the test host, panics
/// unless it ran there and passed, and returns false.
///
/// A nested guest in the TCG test host sometimes triple-faults under load
/// (README, Known problems: not reproducible on demand, not seen outside
/// nested emulation). A test that failed with that in its output runs again
/// in a fresh test host, up to [`TRIPLE_FAULT_ATTEMPTS`] times in all, and
/// says so each time; the last result stands.
pub fn run_here_or_in_testhost(path: &str) -> bool {
    if place() == KvmPlace::Native {
        return true;
    }
    let name = libtest_name(path);
    let marker = triple_fault_marker();
    let mut result = run_in_testhost(name);
    for attempt in 2..=TRIPLE_FAULT_ATTEMPTS {
        match &result {
            Err(output) if output.contains(&marker) => {
                eprintln!(
                    "==== {name}: a nested guest triple-faulted in the test host (known TCG \
                     problem); attempt {attempt} of {TRIPLE_FAULT_ATTEMPTS} ===="
                );
                result = run_in_testhost(name);
            }
            _ => break,
        }
    }
    if let Err(output) = result {
        panic!("{name} failed in the test host:\n{output}");
    }
    false
}

/// Runs test `name` in a test host; `Err` carries what it printed when it
/// did not run and pass.
fn run_in_testhost(name: &str) -> Result<(), String> {
    let exe = std::env::current_exe().expect("current test executable");
    let timeout = std::env::var("RUNVM_TESTHOST_TIMEOUT").unwrap_or_else(|_| "1200".into());
    let out = testhost_run(&exe, &timeout)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .output()
        .expect("spawn tests/testhost/testhost.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("---- {name} in the test host: stdout ----\n{stdout}");
    eprintln!("---- {name} in the test host: stderr ----\n{stderr}");
    // A filter that matched nothing also exits 0: insist that exactly this
    // test ran (--exact) and passed.
    let passed = out.status.success()
        && stdout.contains(&format!("test {name} ... "))
        && stdout.contains("test result: ok. 1 passed;");
    if passed {
        Ok(())
    } else {
        Err(format!("({})\n{stdout}\n{stderr}", out.status))
    }
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

    #[test]
    fn the_triple_fault_marker_is_what_the_vmm_prints() {
        assert_eq!(
            triple_fault_marker(),
            "guest triple-faulted (KVM_EXIT_SHUTDOWN)"
        );
    }
}
