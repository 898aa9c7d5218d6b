//! The command line without a VM: flags, reports and every refusal that
//! must come before anything is created.

use std::path::Path;
use std::process::Command;

fn runvm_in(root: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_runvm"))
        .arg("--root")
        .arg(root)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("spawn runvm")
}

fn runvm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_runvm"))
        .args(args)
        .output()
        .expect("spawn runvm")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn version_names_the_runtime_and_spec() {
    let out = runvm(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(&format!("runvm {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(text.contains("spec: 1.2.0"), "{text}");
}

#[test]
fn unknown_options_fail_with_a_message() {
    let out = runvm(&["--no-such-flag"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--no-such-flag"), "{}", stderr(&out));
}

#[test]
fn no_command_prints_usage_not_a_panic() {
    let out = runvm(&[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("Usage"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn spec_writes_a_default_config_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().to_str().unwrap();
    let out = runvm(&["spec", "--bundle", b]);
    assert!(out.status.success(), "{}", stderr(&out));
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["root"]["path"], "rootfs");
    assert_eq!(config["process"]["terminal"], false);
    let again = runvm(&["spec", "--bundle", b]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("exists"), "{}", stderr(&again));
}

#[test]
fn features_are_json() {
    let out = runvm(&["features"]);
    assert!(out.status.success());
    let f: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(f["ociVersionMax"], "1.2.0");
    let caps = f["linux"]["capabilities"].as_array().unwrap();
    assert!(caps.iter().any(|c| c == "CAP_SYS_ADMIN"), "{caps:?}");
    assert_eq!(f["linux"]["seccomp"]["enabled"], true);
    let actions = f["linux"]["seccomp"]["actions"].as_array().unwrap();
    assert!(actions.iter().any(|a| a == "SCMP_ACT_ERRNO"), "{actions:?}");
    assert!(
        !actions.iter().any(|a| a == "SCMP_ACT_NOTIFY"),
        "{actions:?}"
    );
    assert_eq!(
        f["linux"]["namespaces"],
        serde_json::json!(["cgroup", "mount", "network"])
    );
    assert_eq!(f["linux"]["cgroup"]["v2"], true);
    assert_eq!(f["linux"]["cgroup"]["v1"], false);
    let opts = f["mountOptions"].as_array().unwrap();
    for o in ["ro", "nosuid", "rbind"] {
        assert!(opts.iter().any(|v| v == o), "{o}: {opts:?}");
    }
}

const CONFIG: &str = r#"{"ociVersion": "1.2.0", "root": {"path": "rootfs"},
    "process": {"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}}"#;

/// A bundle, a state root, and stand-in kernel and agent files (never booted:
/// every case here fails before a VM would start).
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bundle/rootfs")).unwrap();
        std::fs::write(dir.path().join("bundle/config.json"), config).unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"not booted").unwrap();
        std::fs::write(dir.path().join("agent"), b"not booted").unwrap();
        Setup { dir }
    }

    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }

    fn runvm(&self, args: &[&str]) -> std::process::Output {
        self.runvm_env(args, &[])
    }

    fn runvm_env(&self, args: &[&str], extra: &[(&str, &str)]) -> std::process::Output {
        let (k, a, c) = (self.p("vmlinux"), self.p("agent"), self.p("cache"));
        // A case that gets as far as booting builds the agent's archive:
        // into this directory, not the machine's /run/runvm-cache.
        let mut env = vec![
            ("RUNVM_KERNEL", k.as_str()),
            ("RUNVM_AGENT", a.as_str()),
            ("RUNVM_INITRAMFS_CACHE", c.as_str()),
        ];
        env.extend_from_slice(extra);
        runvm_in(&self.dir.path().join("root"), args, &env)
    }

    /// The state root holds no container.
    fn assert_nothing_left(&self) {
        let root = self.dir.path().join("root");
        let left: Vec<_> = std::fs::read_dir(&root)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "left behind in {}: {left:?}",
            root.display()
        );
    }

    fn fail(&self, args: &[&str], env: &[(&str, &str)], want: &str) {
        let out = self.runvm_env(args, env);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.starts_with("runvm: error: "), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
        assert!(!err.contains("panicked"), "{err}");
        self.assert_nothing_left();
    }
}

#[test]
fn bad_create_requests_fail_cleanly_and_leave_nothing() {
    let s = Setup::new(CONFIG);
    let b = s.p("bundle");
    s.fail(
        &["create", "a/b", "--bundle", &b],
        &[],
        "invalid container ID",
    );
    s.fail(
        &["create", "..", "--bundle", &b],
        &[],
        "invalid container ID",
    );
    s.fail(
        &["create", "c", "--bundle", &s.p("nope")],
        &[],
        "does not exist",
    );
    s.fail(
        &["create", "c", "--bundle", &s.p("root")],
        &[],
        "does not exist",
    );
    s.fail(
        &["create", "c", "--bundle", &b],
        &[("RUNVM_KERNEL", "/nonexistent/vmlinux")],
        "/nonexistent/vmlinux (from RUNVM_KERNEL) not found",
    );
    s.fail(
        &["create", "c", "--bundle", &b],
        &[("RUNVM_AGENT", "/nonexistent/agent")],
        "not found",
    );
    s.fail(
        &["create", "c", "--bundle", &b, "--preserve-fds", "2"],
        &[],
        "--preserve-fds",
    );
    let with_params = CONFIG.replace(
        r#""root""#,
        r#""annotations": {"io.runvm.kernel_params": "quiet init=/bin/sh"}, "root""#,
    );
    std::fs::write(s.dir.path().join("bundle/config.json"), with_params).unwrap();
    s.fail(
        &["create", "c", "--bundle", &b],
        &[],
        "annotation io.runvm.kernel_params: init is set by runvm and cannot be changed",
    );
    let root_cgroup = CONFIG.replace(r#""root""#, r#""linux": {"cgroupsPath": "/a/.."}, "root""#);
    std::fs::write(s.dir.path().join("bundle/config.json"), root_cgroup).unwrap();
    s.fail(
        &["create", "c", "--bundle", &b],
        &[],
        "linux.cgroupsPath \"/a/..\" names no cgroup of its own",
    );
    std::fs::write(s.dir.path().join("bundle/config.json"), CONFIG).unwrap();
    std::fs::remove_dir(s.dir.path().join("bundle/rootfs")).unwrap();
    s.fail(&["create", "c", "--bundle", &b], &[], "rootfs");
    std::fs::write(s.dir.path().join("bundle/config.json"), "{").unwrap();
    s.fail(&["create", "c", "--bundle", &b], &[], "invalid");
}

#[test]
fn terminal_mode_needs_a_console_socket() {
    let s = Setup::new(&CONFIG.replace(r#""args""#, r#""terminal": true, "args""#));
    let b = s.p("bundle");
    s.fail(
        &["create", "c", "--bundle", &b],
        &[],
        "--console-socket is required",
    );
    // A foreground `run` relays the terminal itself; a detached one cannot.
    s.fail(
        &["run", "--detach", "c", "--bundle", &b],
        &[],
        "--console-socket is required",
    );
}

#[test]
fn a_kernel_the_monitor_cannot_boot_fails_create_and_leaves_nothing() {
    // Past every check `create` makes itself: the monitor starts and fails,
    // and `create` reports its error and removes the state.
    // With a guest profile asked for, whose file goes again with the VM
    // that never ran.
    let s = Setup::new(CONFIG);
    let profiles = s.p("profiles");
    std::fs::create_dir(&profiles).unwrap();
    let out = s.runvm_env(
        &["create", "c", "--bundle", &s.p("bundle")],
        &[("RUNVM_GUEST_PROFILE", &profiles)],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("runvm: error: "),
        "{}",
        stderr(&out)
    );
    s.assert_nothing_left();
    let left: Vec<_> = std::fs::read_dir(&profiles).unwrap().flatten().collect();
    assert!(left.is_empty(), "profiles left: {left:?}");
}

#[test]
fn a_guest_profile_directory_that_cannot_be_written_fails_create_and_leaves_nothing() {
    let s = Setup::new(CONFIG);
    s.fail(
        &["create", "c", "--bundle", &s.p("bundle")],
        &[("RUNVM_GUEST_PROFILE", "/nonexistent/profiles")],
        "cannot create the guest profile /nonexistent/profiles/c.profile (RUNVM_GUEST_PROFILE)",
    );
}

#[test]
fn commands_on_unknown_containers_fail() {
    let s = Setup::new(CONFIG);
    for cmd in [
        &["start", "ghost"][..],
        &["state", "ghost"],
        &["kill", "ghost"],
        &["kill", "ghost", "KILL"],
        &["delete", "ghost"],
        &["exec", "ghost", "true"],
        &["ps", "ghost"],
        &["events", "--stats", "ghost"],
        &["pause", "ghost"],
        &["resume", "ghost"],
        &["update", "--pids-limit", "5", "ghost"],
        &["update", "ghost"],
    ] {
        s.fail(cmd, &[], "container \"ghost\" does not exist");
    }
    // A bad option value is a usage error, as clap reports them (status 2).
    let out = s.runvm(&["update", "--memory", "lots", "ghost"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("\"lots\" is not a size in bytes"));
    s.fail(
        &["update", "--resources", "/nonexistent/r.json", "ghost"],
        &[],
        "cannot read resources file /nonexistent/r.json",
    );
    s.fail(
        &["exec", "--preserve-fds", "1", "ghost", "true"],
        &[],
        "--preserve-fds",
    );
    s.fail(&["events", "--interval", "0", "ghost"], &[], "--interval");
    s.fail(&["ps", "ghost", "aux"], &[], "ps options");
    s.fail(&["kill", "ghost", "SIGNOPE"], &[], "invalid signal");
    // As runc: forcing the delete of a container that is gone succeeds.
    let out = s.runvm(&["delete", "--force", "ghost"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn errors_reach_a_json_log_as_containerd_reads_it() {
    let s = Setup::new(CONFIG);
    let log = s.p("log.json");
    s.fail(
        &["--log", &log, "--log-format", "json", "start", "ghost"],
        &[],
        "does not exist",
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "error");
    assert!(last["msg"].as_str().unwrap().contains("ghost"), "{last}");
    assert!(last["time"].as_str().unwrap().ends_with('Z'), "{last}");
}

#[test]
fn a_container_whose_monitor_died_is_stopped_and_can_be_deleted() {
    let s = Setup::new(CONFIG);
    let dir = s.dir.path().join("root/c1");
    std::fs::create_dir_all(&dir).unwrap();
    // PID 1 of this machine is alive but its start time is not 12345: the
    // record's monitor is gone.
    let record = serde_json::json!({
        "id": "c1", "bundle": s.p("bundle"), "rootfs": s.p("bundle/rootfs"),
        "pid": 1, "pid_start": 12345, "status": "running",
        "created": "2026-11-23T00:00:00.000000000Z", "annotations": {}
    });
    std::fs::write(dir.join("state.json"), record.to_string()).unwrap();
    let out = s.runvm(&["state", "c1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(state["status"], "stopped");
    assert_eq!(state["pid"], 0);
    assert_eq!(state["ociVersion"], "1.2.0");

    let list = s.runvm(&["list", "--format", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list[0]["id"], "c1");
    let table = String::from_utf8(s.runvm(&["list"]).stdout).unwrap();
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("stopped"), "{table}");

    let out = s.runvm(&["start", "c1"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("stopped"), "{}", stderr(&out));
    for cmd in [
        &["kill", "c1", "TERM"][..],
        &["pause", "c1"],
        &["ps", "c1"],
        &["events", "--stats", "c1"],
        &["update", "--pids-limit", "5", "c1"],
    ] {
        let out = s.runvm(cmd);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("not running"),
            "{cmd:?}: {}",
            stderr(&out)
        );
    }
    for (cmd, want) in [
        (&["resume", "c1"][..], "not paused"),
        (&["exec", "c1", "true"], "stopped"),
    ] {
        let out = s.runvm(cmd);
        assert!(!out.status.success());
        assert!(stderr(&out).contains(want), "{cmd:?}: {}", stderr(&out));
    }

    let out = s.runvm(&["delete", "c1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    s.assert_nothing_left();
}

#[test]
fn an_id_in_use_is_refused_without_touching_the_existing_container() {
    let s = Setup::new(CONFIG);
    let dir = s.dir.path().join("root/c1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("state.json"), "{}").unwrap();
    let out = s.runvm(&["create", "c1", "--bundle", &s.p("bundle")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(dir.join("state.json")).unwrap(),
        "{}"
    );
}
