//! Real container engines drive runvm as their OCI runtime, unchanged:
//! containerd through `ctr --runc-binary` (its runc shim v2) and podman
//! through `--runtime` (conmon). Each test runs a private engine (own root,
//! state and socket) on a busybox image in `docker save` format, plays the
//! scenarios a user would, and checks that nothing is left afterwards: no
//! monitor or exec stand-in, no state directory, no mount, no new network
//! device.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use runvm_tests::artifacts::{agent_binary, busybox_rootfs, guest_kernel_dir, runvm_binary};
use runvm_tests::kvm_test;
use runvm_tests::netns::Netns;

const IMAGE: &str = "localhost/runvm-busybox:latest";
/// Every engine call runs under `timeout` so a hang fails the test.
const CALL_LIMIT: &str = "240";

/// The container's memory and pids limits, as it sees them.
const CGROUP_MEMORY: &str = "/sys/fs/cgroup/memory.max";
const CGROUP_PIDS: &str = "/sys/fs/cgroup/pids.max";
const CGROUP_CPU: &str = "/sys/fs/cgroup/cpu.max";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A busybox image as `docker save` writes it (manifest.json, config,
/// one layer tar), which `ctr images import` and `podman load` take.
fn image_archive(dir: &Path) -> PathBuf {
    let rootfs = dir.join("image-rootfs");
    busybox_rootfs(&rootfs);
    let img = dir.join("image");
    std::fs::create_dir_all(img.join("layer")).unwrap();
    let layer = img.join("layer/layer.tar");
    sh_ok(&format!(
        "tar -C {} -cf {} .",
        rootfs.display(),
        layer.display()
    ));
    let digest = sh_ok(&format!("sha256sum {} | cut -d' ' -f1", layer.display()));
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", digest.trim())]}
    });
    std::fs::write(img.join("config.json"), config.to_string()).unwrap();
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [IMAGE],
        "Layers": ["layer/layer.tar"]
    }]);
    std::fs::write(img.join("manifest.json"), manifest.to_string()).unwrap();
    let archive = dir.join("image.tar");
    sh_ok(&format!(
        "tar -C {} -cf {} .",
        img.display(),
        archive.display()
    ));
    archive
}

fn sh_ok(script: &str) -> String {
    let out = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(out.status.success(), "{script}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Single-quotes `s` for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `argv` under `timeout`, with runvm's guest given by environment (the
/// engines pass their environment on to the runtime).
fn command(argv: &[String]) -> Command {
    let mut c = Command::new("timeout");
    c.args(["-k", "5", CALL_LIMIT])
        .args(argv)
        .env("RUNVM_KERNEL", guest_kernel_dir().join("vmlinux"))
        .env("RUNVM_AGENT", agent_binary());
    c
}

fn run(argv: &[String]) -> Output {
    command(argv).stdin(Stdio::null()).output().unwrap()
}

fn ok(argv: &[String]) -> String {
    let out = run(argv);
    assert!(
        out.status.success(),
        "{argv:?}: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `argv` on a terminal (util-linux `script` gives it a pty), as a user
/// typing `-t` commands has.
fn on_terminal(argv: &[String]) -> Output {
    let line: Vec<String> = argv.iter().map(|a| quote(a)).collect();
    let mut c = command(&[
        "script".into(),
        "-qec".into(),
        line.join(" "),
        "/dev/null".into(),
    ]);
    c.stdin(Stdio::null()).output().unwrap()
}

/// The script the first container of each engine runs, and its output.
const ENV_CWD_SCRIPT: &str = "echo out:$GREETING:$(pwd); echo err >&2; exit 3";
const ENV_CWD_OUTPUT: &str = "out:hi:/tmp\n";

/// Asserts exit status `code`, exact stdout `want` and `err` within stderr;
/// on a failure `explain` adds the engine's side (its log, the runtime's).
fn assert_output(out: &Output, code: i32, want: &str, err: &str, explain: impl FnOnce() -> String) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    if out.status.code() == Some(code) && stdout == want && stderr.contains(err) {
        return;
    }
    panic!(
        "exit status {:?}, expected {code}\nstdout: {stdout:?}, expected {want:?}\n\
         stderr (expected to hold {err:?}):\n{stderr}\n{}",
        out.status.code(),
        explain()
    );
}

/// Asserts exit status `code` and a terminal (`tty` printed a pty). On a
/// failure it shows everything: under `script` the engine's own error
/// messages arrive on stdout (the pty), and `explain` adds the engine's side.
fn assert_terminal(out: &Output, code: i32, explain: impl FnOnce() -> String) {
    if out.status.code() == Some(code) && text(&out.stdout).contains("/dev/pts/") {
        return;
    }
    panic!(
        "on a terminal: exit status {:?}, expected {code} and a /dev/pts/ line\n\
         stdout (the pty):\n{}\nstderr:\n{}\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr),
        explain()
    );
}

/// Runs a `cat` container, writes a line to it once `ready` says so (within
/// `limit`), closes its stdin and checks the line comes back and the
/// container ends well. A container that never gets ready fails with what
/// the engine said and with `explain`.
fn pipe_through(
    argv: &[String],
    limit: Duration,
    mut ready: impl FnMut() -> bool,
    explain: impl Fn() -> String,
) {
    let mut cat = command(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !ready() {
        let exited = cat.try_wait().unwrap().is_some();
        if exited || start.elapsed() > limit {
            let _ = cat.kill();
            let out = cat.wait_with_output().unwrap();
            panic!(
                "{argv:?} never got ready (exited: {exited}): {}\n{}\n{}",
                text(&out.stdout),
                text(&out.stderr),
                explain()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut stdin = cat.stdin.take().unwrap();
    stdin.write_all(b"piped through\n").unwrap();
    drop(stdin);
    let out = cat.wait_with_output().unwrap();
    assert_output(&out, 0, "piped through\n", "", &explain);
}

/// Waits until `check` holds, failing after `limit`.
fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < limit,
            "{what} did not happen in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What must be gone once the engine deleted its containers.
struct Leftovers {
    net_before: Vec<String>,
}

impl Leftovers {
    fn note() -> Self {
        Leftovers {
            net_before: net_devices(),
        }
    }

    /// No runvm process, nothing in `state_root`, no mount whose path
    /// contains `mount_marker`, no new network device.
    fn assert_none(&self, state_root: &Path, mount_marker: &str) {
        let procs = runvm_processes();
        assert!(procs.is_empty(), "runvm processes left: {procs:?}");
        let left: Vec<_> = std::fs::read_dir(state_root)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "state left in {}: {left:?}",
            state_root.display()
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let stale: Vec<&str> = mounts
            .lines()
            .filter(|l| l.contains(mount_marker))
            .collect();
        assert!(stale.is_empty(), "mounts left: {stale:?}");
        assert_eq!(net_devices(), self.net_before, "network devices changed");
    }
}

fn net_devices() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Command lines of live runvm processes (monitors, exec stand-ins).
fn runvm_processes() -> Vec<String> {
    let exe = runvm_binary();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = text(&cmd).replace('\0', " ");
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let zombie = stat.rsplit(')').next()?.trim_start().starts_with('Z');
            (cmd.starts_with(exe.to_str()?) && !zombie).then_some(cmd)
        })
        .collect()
}

/// Checks that the VM of the live container whose `create` command line
/// holds `id` is in the host cgroup its spec asks for, as runc would put
/// the container's init; returns that cgroup. The monitor is forked from
/// `create`, so its command line names the bundle.
fn assert_vm_in_spec_cgroup(id: &str) -> String {
    let exe = runvm_binary();
    let found: Vec<(String, String)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = text(&cmd).split('\0').map(str::to_owned).collect();
            if args.first()? != exe.to_str()? || !args.iter().any(|a| a == "create") {
                return None;
            }
            if !args.iter().any(|a| a == id) {
                return None;
            }
            let bundle = &args[args.iter().position(|a| a == "--bundle")? + 1];
            let spec: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(Path::new(bundle).join("config.json")).ok()?,
            )
            .ok()?;
            let want = spec["linux"]["cgroupsPath"].as_str()?.to_owned();
            let have = std::fs::read_to_string(e.path().join("cgroup")).ok()?;
            let have = have.lines().find_map(|l| l.strip_prefix("0::"))?.to_owned();
            Some((want, have))
        })
        .collect();
    assert_eq!(found.len(), 1, "the monitor of {id}: {found:?}");
    let (want, have) = &found[0];
    assert!(want.starts_with('/'), "cgroupsPath {want}");
    assert_eq!(have, want, "the VM of {id}");
    have.clone()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A private containerd; stopped (by its PID) when dropped.
struct Containerd {
    child: Child,
    socket: PathBuf,
}

impl Containerd {
    fn start(dir: &Path) -> Self {
        let socket = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n[grpc]\n  address = \"{}\"\n",
                dir.join("croot").display(),
                dir.join("cstate").display(),
                socket.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .env("RUNVM_KERNEL", guest_kernel_dir().join("vmlinux"))
            .env("RUNVM_AGENT", agent_binary())
            .spawn()
            .expect("containerd (Debian package containerd; setup.sh installs it)");
        wait_until("containerd's socket", Duration::from_secs(60), || {
            socket.exists()
        });
        Containerd { child, socket }
    }

    /// `ctr --address SOCKET args...`
    fn ctr(&self, args: &[&str]) -> Vec<String> {
        let mut v = strings(&["ctr", "--address"]);
        v.push(self.socket.to_string_lossy().into_owned());
        v.extend(strings(args));
        v
    }

    /// `ctr run` with runvm as the runtime binary.
    fn ctr_run(&self, flags: &[&str], id: &str, cmd: &[&str]) -> Vec<String> {
        let mut v = self.ctr(&["run", "--runc-binary"]);
        v.push(runvm_binary().to_string_lossy().into_owned());
        v.extend(strings(flags));
        v.push(IMAGE.into());
        v.push(id.into());
        v.extend(strings(cmd));
        v
    }

    /// What the engine and runvm have to say, for a failure message.
    fn explain(&self, dir: &Path) -> String {
        let mut s = String::new();
        for args in [&["task", "ls"][..], &["containers", "ls"]] {
            let out = run(&self.ctr(args));
            s += &format!(
                "ctr {args:?}:\n{}{}\n",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        let log = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        s += &format!(
            "containerd.log (last lines, newest first):\n{}\n",
            tail.join("\n")
        );
        let tasks = dir.join("cstate/io.containerd.runtime.v2.task/default");
        let states = Path::new("/run/containerd/runc/default");
        for (root, files) in [
            (tasks.as_path(), &["log.json"][..]),
            (states, &["state.json", "console.log"][..]),
        ] {
            for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
                for f in files {
                    let text = std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
                    s += &format!("{}/{f}:\n{text}\n", e.path().display());
                }
            }
        }
        s
    }

    fn task_status(&self, id: &str) -> String {
        let out = run(&self.ctr(&["task", "ls"]));
        text(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_owned()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

kvm_test!(
    fn containerd_runs_containers_in_micro_vms_through_runvm() {
        let dir = tempfile::tempdir().unwrap();
        let image = image_archive(dir.path());
        let before = Leftovers::note();
        let c = Containerd::start(dir.path());
        ok(&c.ctr(&["images", "import", image.to_str().unwrap()]));

        // Output (stdout and stderr apart), env, working directory and the
        // exit status.
        let out = run(&c.ctr_run(
            &["--rm", "--env", "GREETING=hi", "--cwd", "/tmp"],
            "c1",
            &["sh", "-c", ENV_CWD_SCRIPT],
        ));
        assert_output(&out, 3, ENV_CWD_OUTPUT, "err\n", || c.explain(dir.path()));

        // Piped stdin and its EOF (written once the task runs: ctr drops
        // input that ends before it wired the task's stdin).
        pipe_through(
            &c.ctr_run(&["--rm"], "c2", &["cat"]),
            Duration::from_secs(240),
            || c.task_status("c2") == "RUNNING",
            || c.explain(dir.path()),
        );

        // A terminal session.
        let out = on_terminal(&c.ctr_run(
            &["--rm", "-t"],
            "c3",
            &["sh", "-c", "tty; stty size; exit 7"],
        ));
        assert_terminal(&out, 7, || c.explain(dir.path()));

        // A long-running task: exec (plain and on a terminal), ps, and
        // stopping it with SIGTERM.
        ok(&c.ctr_run(&["-d"], "c4", &["sleep", "1000"]));
        // containerd's cgroup for the task, as for runc's init.
        assert_eq!(assert_vm_in_spec_cgroup("c4"), "/default/c4");
        let out = run(&c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e1",
            "c4",
            "sh",
            "-c",
            "echo exec-out:$(cat /proc/1/comm); exit 4",
        ]));
        // The exec joined the task's PID namespace, where `sleep` is PID 1.
        assert_output(&out, 4, "exec-out:sleep\n", "", || c.explain(dir.path()));
        let out = on_terminal(&c.ctr(&[
            "task",
            "exec",
            "-t",
            "--exec-id",
            "e2",
            "c4",
            "sh",
            "-c",
            "tty; exit 6",
        ]));
        assert_terminal(&out, 6, || c.explain(dir.path()));
        let ps = ok(&c.ctr(&["task", "ps", "c4"]));
        assert!(ps.starts_with("PID"), "{ps}");
        assert!(ps.lines().count() >= 2, "no process listed: {ps}");
        // As under runc, PID 1 of a PID namespace gets only the signals it
        // handles (or SIGKILL): `sleep` ignores ctr's default SIGTERM.
        ok(&c.ctr(&["task", "kill", "c4"]));
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(c.task_status("c4"), "RUNNING");
        ok(&c.ctr(&["task", "kill", "--signal", "SIGKILL", "c4"]));
        wait_until("c4 stopped", Duration::from_secs(120), || {
            c.task_status("c4") == "STOPPED"
        });
        let out = run(&c.ctr(&["task", "delete", "c4"]));
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("137"), "{}", text(&out.stderr));
        ok(&c.ctr(&["container", "delete", "c4"]));

        // A network namespace as CNI would leave it, joined with --with-ns.
        {
            let ns = Netns::new("c", "10.213.10");
            let before_ns = ns.fingerprint();
            let (port, server) = ns.serve_once();
            let with = format!("network:{}", ns.path());
            let out = run(&c.ctr_run(
                &["--rm", "--with-ns", &with],
                "c5",
                &["sh", "-c", &net_script("10.213.10.1", port)],
            ));
            assert_network(&out, "10.213.10.2/24", &ns.mac());
            assert_eq!(server.join().unwrap(), "from-guest\n");
            assert_eq!(ns.fingerprint(), before_ns, "the namespace changed");
        }

        let tasks = ok(&c.ctr(&["task", "ls", "-q"]));
        assert_eq!(tasks.trim(), "", "tasks left");
        before.assert_none(
            Path::new("/run/containerd/runc/default"),
            "io.containerd.runtime.v2.task",
        );
    }
);

/// Shows the guest's eth0 and talks to the namespace's far end.
fn net_script(peer: &str, port: u16) -> String {
    format!("ip -o link show eth0; ip -o -4 addr show eth0; echo from-guest | nc {peer} {port}")
}

/// `net_script`'s output: the veth's MAC and address, the peer's answer.
fn assert_network(out: &Output, address: &str, mac: &str) {
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(stdout.contains(&format!("link/ether {mac}")), "{stdout}");
    assert!(stdout.contains(&format!("inet {address}")), "{stdout}");
    assert!(stdout.contains("from-host"), "{stdout}");
}

/// podman with private storage, runvm as its runtime.
fn podman(dir: &Path, args: &[&str]) -> Vec<String> {
    let mut v = strings(&["podman", "--root"]);
    v.push(dir.join("storage").to_string_lossy().into_owned());
    v.push("--runroot".into());
    v.push(dir.join("run").to_string_lossy().into_owned());
    v.extend(strings(&[
        "--storage-driver",
        "vfs",
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "file",
        "--runtime",
    ]));
    v.push(runtime_wrapper(dir).to_string_lossy().into_owned());
    v.extend(strings(args));
    v
}

/// conmon runs the runtime without podman's environment, so runvm would
/// boot whatever kernel and agent are installed (a stale setup.sh's):
/// podman gets a script that points it at this build's.
fn runtime_wrapper(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("runvm-runtime");
    if !path.exists() {
        let script = format!(
            "#!/bin/sh\nRUNVM_KERNEL={} RUNVM_AGENT={} exec {} \"$@\"\n",
            quote(&guest_kernel_dir().join("vmlinux").to_string_lossy()),
            quote(&agent_binary().to_string_lossy()),
            quote(&runvm_binary().to_string_lossy())
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    path
}

/// `podman run` flags every container here gets: no CNI, and rlimits this
/// sandbox's host could not raise (see ../shared/CLIENTS.md; the guest could).
const POD_FLAGS: [&str; 6] = [
    "--network",
    "none",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];

fn podman_run(dir: &Path, flags: &[&str], cmd: &[&str]) -> Vec<String> {
    let mut args = vec!["run"];
    args.extend(POD_FLAGS);
    args.extend(flags);
    args.push(IMAGE);
    args.extend(cmd);
    podman(dir, &args)
}

kvm_test!(
    fn podman_runs_containers_in_micro_vms_through_runvm() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let image = image_archive(dir);
        let before = Leftovers::note();
        ok(&podman(dir, &["load", "-q", "-i", image.to_str().unwrap()]));

        let out = run(&podman_run(
            dir,
            &["--rm", "-e", "GREETING=hi", "-w", "/tmp"],
            &["sh", "-c", ENV_CWD_SCRIPT],
        ));
        assert_output(&out, 3, ENV_CWD_OUTPUT, "err\n", String::new);
        pipe_through(
            &podman_run(dir, &["--rm", "-i"], &["cat"]),
            Duration::ZERO,
            || true,
            String::new,
        );

        let out = run(&podman_run(
            dir,
            &["--rm", "-t"],
            &["sh", "-c", "tty; stty size; exit 5"],
        ));
        assert_terminal(&out, 5, String::new);

        // VMs from a template (the annotation passes through podman): the
        // first run builds it, the second restores it; each gets podman's
        // copied /etc/hostname and its own hostname, env and exit status.
        for name in ["tpl-a", "tpl-b"] {
            let out = run(&podman_run(
                dir,
                &[
                    "--rm",
                    "--annotation",
                    "io.runvm.template=true",
                    "--hostname",
                    name,
                    "-e",
                    &format!("WHO={name}"),
                ],
                &[
                    "sh",
                    "-c",
                    "echo $(cat /etc/hostname); hostname; echo $WHO; exit 4",
                ],
            ));
            assert_output(
                &out,
                4,
                &format!("{name}\n{name}\n{name}\n"),
                "",
                String::new,
            );
        }

        // A command the image lacks: 127, which podman gives only when the
        // runtime's error reads as runc's (or crun's) does.
        let out = run(&podman_run(dir, &["--rm"], &["no-such-command"]));
        assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("executable file not found in $PATH"),
            "{}",
            text(&out.stderr)
        );

        ok(&podman_run(
            dir,
            &[
                "-d",
                "--name",
                "s1",
                "--memory",
                "96m",
                "--pids-limit",
                "50",
            ],
            &["sh", "-c", "echo started; sleep 1000"],
        ));
        wait_until("s1's output", Duration::from_secs(120), || {
            text(&run(&podman(dir, &["logs", "s1"])).stdout).contains("started")
        });
        // The limits are the container's cgroup's in the guest, and
        // `podman update` (runvm update --resources FILE) changes them.
        // (podman 4.3's update has no --pids-limit.)
        let limits = || {
            ok(&podman(
                dir,
                &["exec", "s1", "cat", CGROUP_MEMORY, CGROUP_PIDS, CGROUP_CPU],
            ))
        };
        assert_eq!(limits(), "100663296\n50\nmax 100000\n");
        let cgroup =
            assert_vm_in_spec_cgroup(ok(&podman(dir, &["inspect", "-f", "{{.Id}}", "s1"])).trim());
        // The guest's 96 MiB and 64 MiB more for it, and 64 MiB for the VMM.
        let host_max =
            std::fs::read_to_string(format!("/sys/fs/cgroup{cgroup}/memory.max")).unwrap();
        assert_eq!(host_max, format!("{}\n", (96 + 64 + 64) << 20));
        ok(&podman(
            dir,
            &["update", "--memory", "80m", "--cpus", "0.5", "s1"],
        ));
        assert_eq!(limits(), "83886080\n50\n50000 100000\n");
        let out = run(&podman(
            dir,
            &[
                "exec",
                "-e",
                "X=1",
                "-w",
                "/tmp",
                "s1",
                "sh",
                "-c",
                "echo $X $(pwd); exit 4",
            ],
        ));
        assert_output(&out, 4, "1 /tmp\n", "", String::new);
        let out = run(&podman(
            dir,
            &["exec", "-t", "s1", "sh", "-c", "tty; exit 6"],
        ));
        assert_terminal(&out, 6, String::new);
        // The shell is PID 1 of its PID namespace and has no handler for
        // SIGTERM: as under runc, podman kills it once the 5 s are over.
        ok(&podman(dir, &["stop", "-t", "5", "s1"]));
        let code = ok(&podman(
            dir,
            &["inspect", "--format", "{{.State.ExitCode}}", "s1"],
        ));
        assert_eq!(code.trim(), "137");
        assert!(ok(&podman(dir, &["logs", "s1"])).contains("started"));
        ok(&podman(dir, &["rm", "s1"]));

        // A network namespace as CNI would leave it, joined with
        // --network ns:PATH.
        {
            let ns = Netns::new("p", "10.213.11").with_ipv6("fd00:213:11:0");
            let before_ns = ns.fingerprint();
            let (port, server) = ns.serve_once();
            let (port6, server6) = ns.serve_once6();
            let network = format!("ns:{}", ns.path());
            // podman's default seccomp profile comes along in config.json.
            let script = format!(
                "grep Seccomp: /proc/self/status; {}; ip -o -6 addr show eth0; \
                 echo from-guest6 | nc fd00:213:11::1 {port6}",
                net_script("10.213.11.1", port)
            );
            let mut args = vec!["run", "--rm", "--network", &network];
            args.extend(&POD_FLAGS[2..]);
            args.extend([IMAGE, "sh", "-c", &script]);
            let out = run(&podman(dir, &args));
            assert_network(&out, "10.213.11.2/24", &ns.mac());
            assert!(
                text(&out.stdout).starts_with("Seccomp:\t2\n"),
                "{}",
                text(&out.stdout)
            );
            assert_eq!(server.join().unwrap(), "from-guest\n");
            // Dual stack: the IPv6 address and a TCP exchange over it.
            assert!(
                text(&out.stdout).contains("inet6 fd00:213:11::2/64"),
                "{}",
                text(&out.stdout)
            );
            assert_eq!(server6.join().unwrap(), "from-guest6\n");
            assert_eq!(ns.fingerprint(), before_ns, "the namespace changed");
        }

        let all = ok(&podman(dir, &["ps", "-a", "-q"]));
        assert_eq!(all.trim(), "", "containers left");
        before.assert_none(Path::new("/run/runvm"), &dir.to_string_lossy());
    }
);

/// A private dockerd (own data root, exec root and socket; no iptables, no
/// bridge) with runvm added as the runtime `runvm`; stopped (by its PID)
/// when dropped.
struct Dockerd {
    child: Child,
    socket: PathBuf,
}

impl Dockerd {
    /// `exec_root` holds the runtime's state root,
    /// `<exec root>/runtime-runc/moby`, where a container's directory adds
    /// docker's 64-character ID.
    fn start(dir: &Path, exec_root: &Path) -> Self {
        let socket = dir.join("docker.sock");
        let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
        // dockerd writes a key into /etc/docker unless told otherwise,
        // which is read-only in the test host.
        let config = dir.join("daemon.json");
        let key = dir.join("key.json");
        let settings = serde_json::json!({ "deprecated-key-path": key });
        std::fs::write(&config, settings.to_string()).unwrap();
        let child = Command::new("dockerd")
            .arg("--config-file")
            .arg(&config)
            .args(["--iptables=false", "--ip6tables=false", "--ip-masq=false"])
            .args(["--bridge=none", "--storage-driver", "vfs"])
            .arg("--data-root")
            .arg(dir.join("docker-root"))
            .arg("--exec-root")
            .arg(exec_root)
            .arg("--pidfile")
            .arg(dir.join("docker.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .arg("--add-runtime")
            .arg(format!("runvm={}", runtime_wrapper(dir).display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("dockerd (Debian package docker.io; setup.sh installs it)");
        let d = Dockerd { child, socket };
        let start = Instant::now();
        while !(d.socket.exists() && run(&d.docker(&["version"])).status.success()) {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "dockerd did not answer in 2 minutes\n{}",
                Dockerd::explain(dir)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        d
    }

    /// `docker -H unix://SOCKET args...`
    fn docker(&self, args: &[&str]) -> Vec<String> {
        let mut v = strings(&["docker", "-H"]);
        v.push(format!("unix://{}", self.socket.display()));
        v.extend(strings(args));
        v
    }

    /// `docker run --runtime runvm` without a network, flags, the image, `cmd`.
    fn run(&self, flags: &[&str], cmd: &[&str]) -> Vec<String> {
        let mut args = vec!["run", "--runtime", "runvm", "--network", "none"];
        args.extend(flags);
        args.push(IMAGE);
        args.extend(cmd);
        self.docker(&args)
    }

    /// The last lines of dockerd's log, for a failure message.
    fn explain(dir: &Path) -> String {
        let log = std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        format!(
            "dockerd.log (last lines, newest first):\n{}",
            tail.join("\n")
        )
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM first: dockerd then stops its own containerd.
        // SAFETY: kill(2) on the PID of a child this test spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

kvm_test!(
    fn docker_runs_containers_in_micro_vms_through_runvm() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let image = image_archive(dir);
        let before = Leftovers::note();
        // Deep on purpose: with docker's 64-character IDs, runvm's sockets
        // in the state directories under it are longer than `sun_path`.
        let exec_root = tempfile::Builder::new()
            .prefix(&"x".repeat(40))
            .tempdir()
            .unwrap();
        let d = Dockerd::start(dir, exec_root.path());
        let loaded = run(&d.docker(&["load", "-q", "-i", image.to_str().unwrap()]));
        assert!(
            loaded.status.success(),
            "{}\n{}",
            text(&loaded.stderr),
            Dockerd::explain(dir)
        );

        let out = run(&d.run(
            &["--rm", "-e", "GREETING=hi", "-w", "/tmp"],
            &["sh", "-c", ENV_CWD_SCRIPT],
        ));
        if out.status.code() != Some(3) {
            panic!(
                "{}\n{}\n{}",
                text(&out.stdout),
                text(&out.stderr),
                Dockerd::explain(dir)
            );
        }
        assert_output(&out, 3, ENV_CWD_OUTPUT, "err\n", || Dockerd::explain(dir));
        pipe_through(
            &d.run(&["--rm", "-i"], &["cat"]),
            Duration::ZERO,
            || true,
            String::new,
        );
        let out = on_terminal(&d.run(&["--rm", "-t"], &["sh", "-c", "tty; stty size; exit 5"]));
        assert_terminal(&out, 5, || Dockerd::explain(dir));
        // A command the image lacks: 127, as under runc.
        let out = run(&d.run(&["--rm"], &["no-such-command"]));
        assert_eq!(
            out.status.code(),
            Some(127),
            "{}\n{}",
            text(&out.stderr),
            Dockerd::explain(dir)
        );

        ok(&d.run(
            &[
                "-d",
                "--name",
                "d1",
                "--memory",
                "96m",
                "--pids-limit",
                "50",
            ],
            &["sh", "-c", "echo started; sleep 1000"],
        ));
        wait_until("d1's output", Duration::from_secs(120), || {
            text(&run(&d.docker(&["logs", "d1"])).stdout).contains("started")
        });
        // `docker update` reaches runvm through containerd's shim
        // (`update --resources -`).
        let limits = || ok(&d.docker(&["exec", "d1", "cat", CGROUP_MEMORY, CGROUP_PIDS]));
        assert_eq!(limits(), "100663296\n50\n");
        let id = ok(&d.docker(&["inspect", "-f", "{{.Id}}", "d1"]));
        assert_eq!(
            assert_vm_in_spec_cgroup(id.trim()),
            format!("/docker/{}", id.trim())
        );
        ok(&d.docker(&["update", "--memory", "80m", "--pids-limit", "40", "d1"]));
        assert_eq!(limits(), "83886080\n40\n");
        let out = run(&d.docker(&[
            "exec",
            "-e",
            "X=1",
            "-w",
            "/tmp",
            "d1",
            "sh",
            "-c",
            "echo $X $(pwd); exit 4",
        ]));
        assert_output(&out, 4, "1 /tmp\n", "", || Dockerd::explain(dir));
        let out = on_terminal(&d.docker(&["exec", "-t", "d1", "sh", "-c", "tty; exit 6"]));
        assert_terminal(&out, 6, || Dockerd::explain(dir));
        // `docker top` shows the host processes whose PIDs the runtime's
        // `ps --format json` gives: the container's monitor, nothing else.
        let top = ok(&d.docker(&["top", "d1"]));
        let rows: Vec<&str> = top.lines().skip(1).collect();
        assert_eq!(rows.len(), 1, "{top}");
        assert!(
            rows[0].contains(&*runvm_binary().to_string_lossy()),
            "{top}"
        );
        // SIGTERM to a PID 1 without a handler does nothing (see s1).
        ok(&d.docker(&["stop", "-t", "5", "d1"]));
        let code = ok(&d.docker(&["inspect", "--format", "{{.State.ExitCode}}", "d1"]));
        assert_eq!(code.trim(), "137");
        assert!(ok(&d.docker(&["logs", "d1"])).contains("started"));
        ok(&d.docker(&["rm", "d1"]));

        let all = ok(&d.docker(&["ps", "-a", "-q"]));
        assert_eq!(all.trim(), "", "containers left");
        // The runc shim keeps runtime state under the exec root.
        let state_roots: Vec<PathBuf> = std::fs::read_dir(exec_root.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("runtime-")
            })
            .collect();
        assert!(
            !state_roots.is_empty(),
            "no runtime state root in {}",
            exec_root.path().display()
        );
        drop(d);
        for root in state_roots {
            before.assert_none(&root.join("moby"), &dir.to_string_lossy());
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let marker = exec_root.path().to_string_lossy();
        assert!(!mounts.contains(&*marker), "mounts left under {marker}");
    }
);
