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

/// How often a test that keeps failing with a nested-environment fault
/// runs in all before its failure stands.
pub const NESTED_FAULT_ATTEMPTS: u32 = 3;

/// What `testhost.sh` prints when the test host's own kernel stopped (its
/// heartbeat or a panic); it has then already run the command once more.
pub const TESTHOST_LOCKUP_MARKER: &str = "the test host's kernel locked up";

/// What `testhost.sh` prints when the test host ran past its time limit:
/// every KVM test ends itself well before that (its VMM's boot timeout and
/// its own waits), so a test that did not had processes stuck in the test
/// host's kernel (seen in virtio_fs: the test host idle, its heartbeat
/// alive, the VMM outliving its boot timeout and SIGKILL).
pub const TESTHOST_TIMEOUT_MARKER: &str = "testhost: timed out after";

/// What the VMM prints on stderr when a guest triple-faults, whichever way
/// the failure reaches a test (the VMM's own exit report, or an engine that
/// quotes the monitor's stderr).
pub fn triple_fault_marker() -> String {
    vmm::exit::ExitReason::TripleFault.to_string()
}

/// How the runtime reports a guest whose vsock never answered.
const SILENT_GUEST_MARKER: &str = "no agent answered on vsock port";
/// ...because each CONNECT waited out its read timeout (a guest that is up
/// but has no listener refuses at once instead).
const SILENT_GUEST_CAUSE: &str = "Resource temporarily unavailable";

/// Which fault of the nested TCG environment (README, Known problems) a
/// failed test host run shows, if any: a nested guest that triple-faulted,
/// a test host whose own kernel locked up (twice, as `testhost.sh` retries
/// once itself), a nested guest that stopped making progress before its
/// VMM's boot timeout (seen once with the guest's vCPU stuck mid-line on
/// the serial port, right after a test host lockup), or a test host that
/// ran out of time (see [`TESTHOST_TIMEOUT_MARKER`]), or a guest that
/// never answered on vsock, or one that stopped answering mid-run while
/// the VMM's watchdog found an interrupt it never took.
pub fn nested_fault(output: &str) -> Option<&'static str> {
    if output.contains(&triple_fault_marker()) {
        Some("a nested guest triple-faulted")
    } else if output.contains(TESTHOST_LOCKUP_MARKER) {
        Some("the test host's kernel locked up")
    } else if output.contains(&vmm::exit::ExitReason::Timeout.to_string()) {
        Some("a nested guest hit its boot timeout")
    } else if output.contains(TESTHOST_TIMEOUT_MARKER) {
        Some("the test host timed out with processes stuck in its kernel")
    } else if output.contains(vmm::vm::UNACKED_INTERRUPT_MARKER)
        && output.contains(SILENT_GUEST_CAUSE)
    {
        // Up and answering, then silent until the test's read timed out,
        // with an interrupt the guest never took: the guest stopped.
        Some("a nested guest stopped taking interrupts mid-run")
    } else if output.contains(SILENT_GUEST_MARKER) && output.contains(SILENT_GUEST_CAUSE) {
        // The guest kernel never answered a CONNECT (no reply, not a
        // refusal): the guest had stopped, as in a boot timeout.
        Some("a nested guest stopped answering before its agent listened")
    } else {
        None
    }
}

/// Returns true when the test body should run in this process. Otherwise runs
/// the test (by `path`, from `module_path!()`) inside the test host, panics
/// unless it ran there and passed, and returns false.
///
/// The TCG test host sometimes breaks down under a nested guest (README,
/// Known problems: not reproducible on demand, not seen outside nested
/// emulation). A test that failed showing one of the [`nested_fault`]s runs
/// again in a fresh test host, up to [`NESTED_FAULT_ATTEMPTS`] times in all,
/// and says so each time; the last result stands, so a fault that always
/// recurs (a real regression that hangs a boot, say) still fails.
pub fn run_here_or_in_testhost(path: &str) -> bool {
    if place() == KvmPlace::Native {
        return true;
    }
    let name = libtest_name(path);
    let mut result = run_in_testhost(name);
    for attempt in 2..=NESTED_FAULT_ATTEMPTS {
        match result.as_ref().err().and_then(|out| nested_fault(out)) {
            Some(fault) => {
                eprintln!(
                    "==== {name}: {fault} in the test host (known nested TCG problem); \
                     attempt {attempt} of {NESTED_FAULT_ATTEMPTS} ===="
                );
                result = run_in_testhost(name);
            }
            None => break,
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

    #[test]
    fn nested_faults_are_told_from_other_failures() {
        let vmm_exit = "runvm-vmm: guest triple-faulted (KVM_EXIT_SHUTDOWN), rip=0x0";
        assert_eq!(
            nested_fault(vmm_exit),
            Some("a nested guest triple-faulted")
        );
        let lockup = "testhost: the test host's kernel locked up (no heartbeat for 3 minutes)";
        assert_eq!(
            nested_fault(lockup),
            Some("the test host's kernel locked up")
        );
        let idle = "testhost: timed out after 1200 s; last console lines:";
        assert_eq!(
            nested_fault(idle),
            Some("the test host timed out with processes stuck in its kernel")
        );
        let stall = "no ready line:\nrunvm-vmm: boot timeout elapsed\nRU";
        assert_eq!(
            nested_fault(stall),
            Some("a nested guest hit its boot timeout")
        );
        let silent = "OCI runtime create failed: the guest agent did not answer within 120s \
                      (no agent answered on vsock port 1024 within 10.2s: Resource temporarily \
                      unavailable (os error 11)): unknown";
        assert_eq!(
            nested_fault(silent),
            Some("a nested guest stopped answering before its agent listened")
        );
        let stopped = "called `Result::unwrap()` on an `Err` value: Frame(Io(Os { code: 11, \
                       kind: WouldBlock, message: \"Resource temporarily unavailable\" }))\n\
                       guest output:\nrunvm-vmm: irq 5: the guest left an interrupt \
                       unacknowledged for 500 ms; raised it again";
        assert_eq!(
            nested_fault(stopped),
            Some("a nested guest stopped taking interrupts mid-run")
        );
        for other in [
            "runvm-vmm: irq 5: the guest left an interrupt unacknowledged for 500 ms; raised it again\n\
             assertion `left == right` failed",
            "no agent answered on vsock port 1024 within 10s: nothing listens on that guest port yet",
            "assertion `left == right` failed\n  left: 3\n right: 4",
            "no answer from the container's monitor: Resource temporarily unavailable",
            "runvm-vmm: guest kernel panicked",
        ] {
            assert_eq!(nested_fault(other), None, "{other}");
        }
    }

    #[test]
    fn the_lockup_marker_is_what_the_test_host_runner_prints() {
        let script = std::fs::read_to_string(testhost_script()).unwrap();
        assert!(script.contains(TESTHOST_LOCKUP_MARKER));
        // log() prefixes "testhost: ".
        assert!(script.contains(r#"log() { echo "testhost: $*" >&2; }"#));
        let timeout_line = TESTHOST_TIMEOUT_MARKER.replace("testhost: ", "log \"");
        assert!(script.contains(&timeout_line), "{timeout_line}");
    }
}
