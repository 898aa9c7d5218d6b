//! The `runvm` OCI runtime driving real micro-VMs the way containerd's shim
//! and conmon do: `create` with a pid file, `start`, `kill`, `delete`; the
//! caller is a child subreaper that waits for the PID from the pid file and
//! takes the container's exit status from it.

use std::fs::File;
use std::os::unix::net::UnixListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use runvm_tests::artifacts::{agent_binary, busybox_rootfs, guest_kernel_dir, runvm_binary};
use runvm_tests::kvm_test;
use runvm_tests::netns::Netns;
use runvm_tests::smaps::{advised, guest_ram_flags};

/// A bundle with a busybox rootfs, a state root, and the runvm command.
struct Runtime {
    dir: tempfile::TempDir,
}

impl Runtime {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        busybox_rootfs(&dir.path().join("bundle/rootfs"));
        Runtime { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn bundle(&self) -> PathBuf {
        self.path("bundle")
    }

    /// config.json running `sh -c script`, with the env the tests check.
    fn configure(&self, script: &str) {
        let config = serde_json::json!({
            "ociVersion": "1.2.0",
            "root": {"path": "rootfs"},
            "hostname": "rtbox",
            "process": {
                "args": ["sh", "-c", script],
                "env": ["PATH=/bin", "GREETING=hello"],
                "cwd": "/tmp",
                "user": {"uid": 0, "gid": 0}
            },
            // Nested emulation boots slowly; the default is for real KVM.
            "annotations": {"io.runvm.boot_timeout": "600"}
        });
        std::fs::write(self.path("bundle/config.json"), config.to_string()).unwrap();
    }

    /// Changes the bundle's config.json (as written by [`Self::configure`]).
    fn edit_config(&self, change: impl FnOnce(&mut serde_json::Value)) {
        let path = self.path("bundle/config.json");
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        change(&mut config);
        std::fs::write(&path, config.to_string()).unwrap();
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(runvm_binary());
        c.arg("--root")
            .arg(self.path("root"))
            .args(["--log", self.path("log.json").to_str().unwrap()])
            .args(["--log-format", "json", "--debug"])
            .args(args)
            .env("RUNVM_KERNEL", guest_kernel_dir().join("vmlinux"))
            .env("RUNVM_AGENT", agent_binary());
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).stdin(Stdio::null()).output().unwrap();
        assert!(
            out.status.success(),
            "runvm {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn fails(&self, args: &[&str], want: &str) {
        let out = self.cmd(args).stdin(Stdio::null()).output().unwrap();
        assert!(!out.status.success(), "runvm {args:?} succeeded");
        assert!(
            text(&out.stderr).contains(want),
            "runvm {args:?}: {}",
            text(&out.stderr)
        );
    }

    /// Runs `runvm args` with `input` on its stdin (then EOF), collecting
    /// its output.
    fn with_input(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(input).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Runs a command whose children keep its stdio (create, run
    /// --detach): output goes to files, so nothing waits for the monitor to
    /// close a pipe.
    fn detached(&self, args: &[&str], stdin: Stdio, stdout: &Path) {
        let status = self
            .cmd(args)
            .stdin(stdin)
            .stdout(File::create(stdout).unwrap())
            .stderr(File::create(self.path("stderr")).unwrap())
            .status()
            .unwrap();
        let err = std::fs::read_to_string(self.path("stderr")).unwrap_or_default();
        assert!(status.success(), "runvm {args:?}: {err}");
    }

    /// `runvm exec --detach` of `sh -c script` with output to `stdout`;
    /// returns the PID of the exec's stand-in.
    fn exec_detached(&self, id: &str, script: &str, stdout: &Path) -> i32 {
        let pid_file = self.path("exec.pid");
        let _ = std::fs::remove_file(&pid_file);
        let pid_arg = pid_file.to_str().unwrap();
        let args = [
            "exec",
            "--detach",
            "--pid-file",
            pid_arg,
            id,
            "sh",
            "-c",
            script,
        ];
        self.detached(&args, Stdio::null(), stdout);
        std::fs::read_to_string(&pid_file).unwrap().parse().unwrap()
    }

    /// `runvm run --detach` of the bundle, output to the file `stdout`;
    /// returns the monitor's PID from the pid file.
    fn run_detached(&self, id: &str) -> i32 {
        let pid_file = self.path("init.pid");
        let bundle = self.bundle();
        let args = [
            "run",
            "--detach",
            id,
            "--bundle",
            bundle.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
        ];
        self.detached(&args, Stdio::null(), &self.path("stdout"));
        std::fs::read_to_string(&pid_file).unwrap().parse().unwrap()
    }

    fn state(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["state", id])).unwrap()
    }

    /// Nothing of any container is left: no state directory, no socket.
    fn assert_clean(&self) {
        let left: Vec<_> = std::fs::read_dir(self.path("root"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // A failed check shows what the monitors logged and the guests
        // printed (a nested triple fault appears there, and the test host
        // runner retries on it).
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.path("log.json")).unwrap_or_default();
            eprintln!("runvm log:\n{log}");
            // The guests of containers still there (a stalled guest says
            // why on its console: a hung task, an RCU stall).
            for dir in std::fs::read_dir(self.path("root")).into_iter().flatten() {
                let console = dir.unwrap().path().join("console.log");
                if let Ok(text) = std::fs::read_to_string(&console) {
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(60)..].join("\n");
                    eprintln!("{}:\n{tail}", console.display());
                }
            }
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Makes this process a child subreaper, as containerd's shim and conmon
/// are, so monitors reparent to it and it can wait for them.
fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(r, 0, "PR_SET_CHILD_SUBREAPER");
}

/// Waits for `pid` (reparented to us) and returns its exit status as a
/// shell reports it, failing after `limit`.
fn wait_pid(pid: i32, limit: Duration) -> i32 {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        assert!(r >= 0, "waitpid {pid}: {}", std::io::Error::last_os_error());
        if r == pid {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            return 128 + libc::WTERMSIG(status);
        }
        assert!(
            start.elapsed() < limit,
            "monitor {pid} still runs after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for(path: &Path, want: &str, limit: Duration) -> String {
    let start = Instant::now();
    loop {
        let got = std::fs::read_to_string(path).unwrap_or_default();
        if got.contains(want) {
            return got;
        }
        assert!(
            start.elapsed() < limit,
            "{want:?} never appeared in {}: {got:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn process_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

kvm_test!(
    fn runvm_run_relays_output_and_the_exit_status() {
        let rt = Runtime::new();
        rt.configure("echo out:$GREETING:$(pwd):$(hostname); echo err >&2; exit 3");
        let out: Output = rt
            .cmd(&["run", "rt1", "--bundle", rt.bundle().to_str().unwrap()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let log = std::fs::read_to_string(rt.path("log.json")).unwrap_or_default();
        assert_eq!(
            out.status.code(),
            Some(3),
            "stderr: {}\nlog: {log}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), "out:hello:/tmp:rtbox\n");
        assert_eq!(text(&out.stderr), "err\n");
        rt.assert_clean();
        // With --debug the monitor logs what the rootfs share answered once
        // the VM has ended (it may still be writing as `run` returns).
        let deadline = Instant::now() + Duration::from_secs(20);
        let counted = loop {
            let log = std::fs::read_to_string(rt.path("log.json")).unwrap_or_default();
            if let Some(line) = log.lines().find(|l| l.contains("virtio-fs rootfs: ")) {
                break line.to_owned();
            }
            assert!(Instant::now() < deadline, "no request count: {log}");
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            counted.contains(" requests: ") && counted.contains("LOOKUP "),
            "{counted}"
        );
    }
);

kvm_test!(
    fn create_start_kill_delete_behave_as_containerd_expects() {
        become_subreaper();
        let rt = Runtime::new();
        let bundle = rt.bundle();
        let b = bundle.to_str().unwrap();

        // stdin piped in, output to files: the container's stdio are the
        // monitor's, which outlives `runvm create`.
        rt.configure(
            "read line; echo in:$line; trap 'echo got-term; exit 7' TERM; \
             echo ready; while :; do sleep 1; done",
        );
        std::fs::write(rt.path("stdin"), "piped\n").unwrap();
        let out_path = rt.path("stdout");
        let pid_file = rt.path("init.pid");
        let pid_arg = pid_file.to_str().unwrap();
        rt.detached(
            &["create", "c1", "--bundle", b, "--pid-file", pid_arg],
            File::open(rt.path("stdin")).unwrap().into(),
            &out_path,
        );
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
        let state = rt.state("c1");
        assert_eq!(state["status"], "created");
        assert_eq!(state["pid"], pid);
        assert_eq!(
            state["bundle"],
            bundle.canonicalize().unwrap().to_str().unwrap()
        );
        rt.fails(&["create", "c1", "--bundle", b], "already exists");
        assert_eq!(
            std::fs::read_to_string(&out_path).unwrap(),
            "",
            "output before start"
        );

        rt.ok(&["start", "c1"]);
        rt.fails(&["start", "c1"], "already running");
        wait_for(&out_path, "ready", Duration::from_secs(300));
        assert_eq!(rt.state("c1")["status"], "running");
        rt.fails(&["delete", "c1"], "not stopped");
        rt.fails(&["kill", "c1", "NOPE"], "invalid signal");

        rt.ok(&["kill", "c1", "TERM"]);
        assert_eq!(wait_pid(pid, Duration::from_secs(300)), 7);
        let out = std::fs::read_to_string(&out_path).unwrap();
        assert_eq!(out, "in:piped\nready\ngot-term\n");
        assert_eq!(rt.state("c1")["status"], "stopped");
        rt.fails(&["start", "c1"], "stopped");
        rt.ok(&["delete", "c1"]);
        rt.fails(&["state", "c1"], "does not exist");
        rt.assert_clean();

        // A running container goes only with --force, and its VMM with it.
        rt.configure("sleep 1000");
        rt.detached(
            &[
                "run",
                "--detach",
                "c2",
                "--bundle",
                b,
                "--pid-file",
                pid_arg,
            ],
            Stdio::null(),
            &rt.path("stdout2"),
        );
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
        assert_eq!(rt.state("c2")["status"], "running");
        rt.fails(&["delete", "c2"], "not stopped");
        rt.ok(&["delete", "--force", "c2"]);
        assert_eq!(wait_pid(pid, Duration::from_secs(60)), 137);
        assert!(!process_exists(pid));
        rt.assert_clean();

        // A created container that is killed never runs its process.
        rt.configure("echo must-not-run");
        let out_path3 = rt.path("stdout3");
        rt.detached(
            &["create", "c3", "--bundle", b, "--pid-file", pid_arg],
            Stdio::null(),
            &out_path3,
        );
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
        rt.ok(&["kill", "c3", "KILL"]);
        assert_eq!(wait_pid(pid, Duration::from_secs(60)), 137);
        assert_eq!(std::fs::read_to_string(&out_path3).unwrap(), "");
        rt.ok(&["delete", "c3"]);
        rt.assert_clean();
    }
);

/// Accepts one connection on `listener` and returns the pty master runvm
/// sends over it, as containerd's shim and conmon receive it.
fn receive_master(listener: &UnixListener) -> (File, String) {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    use std::io::IoSliceMut;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    let (conn, _) = listener.accept().unwrap();
    let mut name = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut name)];
    let msg = recvmsg::<UnixAddr>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .unwrap();
    let fd = match msg.cmsgs().unwrap().next() {
        Some(ControlMessageOwned::ScmRights(fds)) => fds[0],
        other => panic!("no pty master on the console socket: {other:?}"),
    };
    let n = msg.bytes;
    // SAFETY: SCM_RIGHTS gave this process a new descriptor it owns.
    let master = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    (master, String::from_utf8_lossy(&name[..n]).into_owned())
}

kvm_test!(
    fn a_terminal_session_runs_through_the_console_socket() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;

        become_subreaper();
        let rt = Runtime::new();
        let b = rt.bundle();
        rt.configure("unused");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(rt.path("bundle/config.json")).unwrap()).unwrap();
        config["process"]["terminal"] = true.into();
        config["process"]["args"] = serde_json::json!(["sh"]);
        std::fs::write(rt.path("bundle/config.json"), config.to_string()).unwrap();

        let sock = rt.path("console.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let receiver = std::thread::spawn(move || receive_master(&listener));
        let pid_file = rt.path("init.pid");
        rt.detached(
            &[
                "create",
                "tty1",
                "--bundle",
                b.to_str().unwrap(),
                "--pid-file",
                pid_file.to_str().unwrap(),
                "--console-socket",
                sock.to_str().unwrap(),
            ],
            Stdio::null(),
            &rt.path("stdout"),
        );
        let (mut master, name) = receiver.join().unwrap();
        assert!(name.starts_with("/dev/pts/"), "{name}");
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
        // The caller sizes its end; the guest's terminal follows.
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 100,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads the winsize we pass.
        let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0);
        rt.ok(&["start", "tty1"]);

        let mut reader = master.try_clone().unwrap();
        let output = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = [0u8; 4096];
            // EIO once the monitor (the slave's last holder) is gone.
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
            }
            String::from_utf8_lossy(&all).into_owned()
        });
        // An interactive shell: it reads line by line from its terminal.
        master
            .write_all(b"sleep 2; stty size; tty; echo sum:$((6*7)); exit 5\n")
            .unwrap();
        assert_eq!(wait_pid(pid, Duration::from_secs(300)), 5);
        let out = output.join().unwrap();
        assert!(out.contains("40 100"), "{out:?}");
        assert!(out.contains("/dev/pts/"), "{out:?}");
        assert!(out.contains("sum:42"), "{out:?}");
        // The terminal echoes input (the guest's line discipline does).
        assert!(out.contains("echo sum:$((6*7))"), "{out:?}");
        assert_eq!(std::fs::read_to_string(rt.path("stdout")).unwrap(), "");
        rt.ok(&["delete", "tty1"]);
        rt.assert_clean();

        // `runvm run` in the foreground without a console socket relays the
        // terminal to its own stdio, as `runc run` does.
        config["process"]["args"] = serde_json::json!(["sh", "-c", "tty; stty size; exit 8"]);
        config["process"]["consoleSize"] = serde_json::json!({"height": 30, "width": 90});
        std::fs::write(rt.path("bundle/config.json"), config.to_string()).unwrap();
        let out = rt
            .cmd(&["run", "tty2", "--bundle", b.to_str().unwrap()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(8), "{}", text(&out.stderr));
        let shown = text(&out.stdout);
        assert!(shown.contains("/dev/pts/"), "{shown:?}");
        assert!(shown.contains("30 90"), "{shown:?}");
        rt.assert_clean();
    }
);

kvm_test!(
    fn exec_pause_and_resume_work_on_a_running_container() {
        become_subreaper();
        let rt = Runtime::new();
        rt.configure("echo init > /tmp/init-was-here; while :; do sleep 1; done");
        let init = rt.run_detached("x1");

        // Foreground: output, separate stderr, the exit status, the
        // container's env, cwd and hostname, and its files.
        let out = rt
            .cmd(&[
                "exec",
                "x1",
                "sh",
                "-c",
                "while [ ! -e /tmp/init-was-here ]; do sleep 1; done; \
                 echo out:$GREETING:$(pwd):$(hostname):$(cat /tmp/init-was-here); \
                 echo err >&2; exit 4",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "out:hello:/tmp:rtbox:init\n");
        assert_eq!(text(&out.stderr), "err\n");

        // Flags over the container's process.
        let out = rt.ok(&[
            "exec",
            "--env",
            "GREETING=bye",
            "--cwd",
            "/",
            "--user",
            "1000:1001",
            "x1",
            "sh",
            "-c",
            "echo $GREETING $(pwd) $(id -u):$(id -g)",
        ]);
        assert_eq!(out, "bye / 1000:1001\n");

        // stdin reaches the process, and its end is EOF.
        let out = rt.with_input(&["exec", "x1", "cat"], b"piped through\n");
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "piped through\n");

        // A process that never reads its stdin, given far more than a pipe
        // holds, holds up nothing else in the container; SIGKILL to its
        // stand-in ends it.
        let big = rt.path("big-input");
        std::fs::write(&big, vec![b'x'; 4 << 20]).unwrap();
        let mut stuck = rt
            .cmd(&["exec", "x1", "sleep", "1000"])
            .stdin(File::open(&big).unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            rt.ok(&["exec", "x1", "echo", "not held up"]),
            "not held up\n"
        );
        stuck.kill().unwrap();
        assert_eq!(stuck.wait().unwrap().signal(), Some(libc::SIGKILL));

        // A terminal without a console socket: this command relays it.
        let out = rt
            .cmd(&["exec", "-t", "x1", "sh", "-c", "tty; exit 6"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("/dev/pts/"),
            "{}",
            text(&out.stdout)
        );

        // Detached: the waiter's PID stands for the process; a signal to it
        // reaches the process, and it exits with the process's status.
        let waiter = rt.exec_detached(
            "x1",
            "trap 'echo got-term; exit 9' TERM; echo waiting; while :; do sleep 1; done",
            &rt.path("exec-stdout"),
        );
        wait_for(&rt.path("exec-stdout"), "waiting", Duration::from_secs(120));
        // SAFETY: kill takes plain integers.
        assert_eq!(unsafe { libc::kill(waiter, libc::SIGTERM) }, 0);
        assert_eq!(wait_pid(waiter, Duration::from_secs(120)), 9);
        assert_eq!(
            std::fs::read_to_string(rt.path("exec-stdout")).unwrap(),
            "waiting\ngot-term\n"
        );

        // Bad input: a command that does not exist, no command at all.
        rt.fails(
            &["exec", "x1", "/no/such/program"],
            "stat /no/such/program: no such file or directory",
        );
        rt.fails(&["exec", "x1"], "needs a command");
        rt.fails(&["exec", "nope", "true"], "does not exist");
        assert_eq!(rt.state("x1")["status"], "running");

        let ticks = rt.path("ticks");
        let ticker = rt.exec_detached("x1", "while :; do echo tick; sleep 0.2; done", &ticks);
        wait_for(&ticks, "tick", Duration::from_secs(120));
        // ps lists the container's processes (guest PIDs), the ticker's
        // among them; as JSON (for engines, which look the PIDs up on the
        // host) it gives the host PIDs standing for them: the monitor's and
        // the ticker's stand-in (its --pid-file PID); events --stats gives
        // one runc-style stats record.
        let pids: Vec<i32> =
            serde_json::from_str(&rt.ok(&["ps", "--format", "json", "x1"])).unwrap();
        let monitor = rt.state("x1")["pid"].as_i64().unwrap() as i32;
        assert_eq!(pids.first(), Some(&monitor), "{pids:?}");
        assert!(pids.contains(&ticker), "{pids:?} lacks {ticker}");
        let table = rt.ok(&["ps", "x1"]);
        assert!(table.starts_with("UID"), "{table}");
        assert!(table.contains("echo tick"), "{table}");
        assert!(
            !table.contains("runvm-agent"),
            "the agent is no container process: {table}"
        );
        let stats: serde_json::Value =
            serde_json::from_str(rt.ok(&["events", "--stats", "x1"]).trim()).unwrap();
        assert_eq!(stats["type"], "stats");
        assert_eq!(stats["id"], "x1");
        assert!(stats["data"]["memory"]["usage"]["usage"].as_u64().unwrap() > 0);
        assert!(stats["data"]["memory"]["usage"]["limit"].as_u64().unwrap() > 0);
        assert!(stats["data"]["pids"]["current"].as_u64().unwrap() >= 2);
        assert!(stats["data"]["cpu"]["usage"]["total"].as_u64().unwrap() > 0);

        // Pause stops the guest: a ticking process writes nothing until the
        // resume. A paused container takes no exec, and SIGKILL ends it.
        rt.ok(&["pause", "x1"]);
        assert_eq!(rt.state("x1")["status"], "paused");
        rt.fails(&["pause", "x1"], "already paused");
        rt.fails(&["exec", "x1", "true"], "paused");
        let frozen = std::fs::read_to_string(&ticks).unwrap();
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(std::fs::read_to_string(&ticks).unwrap(), frozen);
        rt.ok(&["resume", "x1"]);
        rt.fails(&["resume", "x1"], "not paused");
        assert_eq!(rt.state("x1")["status"], "running");
        wait_for(&ticks, &format!("{frozen}tick"), Duration::from_secs(120));

        // An engine that SIGKILLs an exec's stand-in kills the process.
        // SAFETY: kill takes plain integers.
        assert_eq!(unsafe { libc::kill(ticker, libc::SIGKILL) }, 0);
        assert_eq!(wait_pid(ticker, Duration::from_secs(60)), 137);
        let stopped_ticking = || {
            let before = std::fs::read_to_string(&ticks).unwrap();
            std::thread::sleep(Duration::from_secs(2));
            std::fs::read_to_string(&ticks).unwrap() == before
        };
        let start = Instant::now();
        while !stopped_ticking() {
            assert!(start.elapsed() < Duration::from_secs(60), "still ticking");
        }

        let sleeper = rt.exec_detached("x1", "sleep 1000", &rt.path("sleeper"));
        rt.ok(&["pause", "x1"]);
        rt.ok(&["kill", "x1", "KILL"]);
        assert_eq!(wait_pid(init, Duration::from_secs(120)), 137);
        // The exec's stand-in goes with its container.
        assert_eq!(wait_pid(sleeper, Duration::from_secs(60)), 137);
        rt.fails(&["exec", "x1", "true"], "stopped");
        rt.ok(&["delete", "x1"]);
        rt.assert_clean();
    }
);

kvm_test!(
    fn oci_mounts_are_set_up_in_the_guest() {
        let rt = Runtime::new();
        let vol = rt.path("vol");
        let ro = rt.path("ro");
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::create_dir_all(&ro).unwrap();
        std::fs::write(ro.join("in"), "from the host\n").unwrap();
        std::fs::write(rt.path("hosts-file"), "127.0.0.1 fromhost\n").unwrap();
        let script = "cat /sys/class/bdi/$(grep ' /data ' /proc/self/mountinfo | cut -d' ' -f3)/read_ahead_kb; \
                      mkdir -p /data/sub && echo written > /data/sub/out; \
                      cat /ro/in; \
                      touch /ro/x 2>/dev/null && echo ro-writable || echo ro-refused; \
                      grep ' /scratch ' /proc/mounts | cut -d' ' -f3,4; \
                      grep ' /deep/er ' /proc/mounts | cut -d' ' -f3; \
                      cat /etc/hosts; cat /etc/ro-file; \
                      echo more >> /etc/ro-file 2>/dev/null && echo file-writable || echo file-refused";
        let config = serde_json::json!({
            "ociVersion": "1.2.0",
            "root": {"path": "rootfs"},
            "process": {
                "args": ["sh", "-c", script],
                "env": ["PATH=/bin"],
                "cwd": "/",
                "user": {"uid": 0, "gid": 0}
            },
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": "/data", "type": "bind", "source": vol, "options": ["rbind", "rw"]},
                {"destination": "/ro", "type": "bind", "source": ro, "options": ["rbind", "ro"]},
                {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "size=1m"]},
                {"destination": "/deep/er", "type": "tmpfs", "source": "tmpfs"},
                {"destination": "/etc/hosts", "type": "bind", "source": rt.path("hosts-file"),
                 "options": ["rbind"]},
                {"destination": "/etc/ro-file", "type": "bind", "source": ro.join("in"),
                 "options": ["rbind", "ro"]},
                {"destination": "/disk", "type": "ext4", "source": "/dev/vdz"}
            ],
            "annotations": {"io.runvm.boot_timeout": "600"}
        });
        std::fs::write(rt.path("bundle/config.json"), config.to_string()).unwrap();
        let out = rt
            .cmd(&["run", "m1", "--bundle", rt.bundle().to_str().unwrap()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let shown = text(&out.stdout);
        // A share's read-ahead window is the host's largest request.
        assert!(shown.starts_with("1024\n"), "{shown}");
        assert!(shown.contains("from the host\n"), "{shown}");
        assert!(shown.contains("ro-refused\n"), "{shown}");
        assert!(shown.contains("tmpfs rw,nosuid"), "{shown}");
        assert!(shown.contains("size=1024k"), "{shown}");
        assert!(
            shown.ends_with("tmpfs\n127.0.0.1 fromhost\nfrom the host\nfile-refused\n"),
            "{shown}"
        );
        assert_eq!(
            std::fs::read_to_string(vol.join("sub/out")).unwrap(),
            "written\n",
            "the guest's write reached the host directory"
        );
        assert!(!ro.join("x").exists());
        assert_eq!(
            std::fs::read_to_string(ro.join("in")).unwrap(),
            "from the host\n",
            "a copied file is a snapshot: the host's stays as it was"
        );
        // A block device cannot be mapped: said in the log.
        let log = std::fs::read_to_string(rt.path("log.json")).unwrap();
        assert!(log.contains("/disk (ext4)"), "{log}");
        rt.assert_clean();
    }
);

/// Adds `linux.namespaces` to the bundle's config.json.
fn set_namespaces(rt: &Runtime, namespaces: serde_json::Value) {
    rt.edit_config(|c| c["linux"] = serde_json::json!({ "namespaces": namespaces }));
}

kvm_test!(
    fn the_spec_network_namespace_becomes_the_guest_network() {
        let ns = Netns::new("n", "10.213.9").with_ipv6("fd00:213:9:0");
        let before = ns.fingerprint();
        let (port, server) = ns.serve_once();
        let (port6, server6) = ns.serve_once6();

        let rt = Runtime::new();
        rt.configure(&format!(
            "ip -o link show eth0; ip -o -4 addr show eth0; ip route; \
             ip -o -6 addr show eth0; ip -6 route; \
             echo from-guest | nc 10.213.9.1 {port}; \
             echo from-guest6 | nc fd00:213:9::1 {port6}"
        ));
        set_namespaces(
            &rt,
            serde_json::json!([{"type": "mount"}, {"type": "network", "path": ns.path()}]),
        );
        let out = rt
            .cmd(&["run", "rtnet", "--bundle", rt.bundle().to_str().unwrap()])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = text(&out.stdout);
        assert!(
            out.status.success(),
            "stdout: {stdout}\nstderr: {}",
            text(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("link/ether {}", ns.mac())),
            "the guest's NIC has the veth's MAC: {stdout}"
        );
        assert!(stdout.contains("inet 10.213.9.2/24"), "{stdout}");
        assert!(
            stdout.contains("default via 10.213.9.1 dev eth0"),
            "{stdout}"
        );
        assert!(stdout.contains("from-host"), "{stdout}");
        assert_eq!(server.join().unwrap(), "from-guest\n");
        // IPv6: the address, usable at once (not tentative), the default
        // route, and a TCP exchange with the far end.
        assert!(stdout.contains("inet6 fd00:213:9::2/64"), "{stdout}");
        assert!(!stdout.contains("tentative"), "{stdout}");
        assert!(
            stdout.contains("default via fd00:213:9::1 dev eth0"),
            "{stdout}"
        );
        assert_eq!(stdout.matches("from-host").count(), 2, "{stdout}");
        assert_eq!(server6.join().unwrap(), "from-guest6\n");

        // Nothing of the VM is left in the namespace: no TAP, no qdisc.
        assert_eq!(ns.fingerprint(), before);
        rt.assert_clean();

        // A new namespace without a path (what `ctr run` asks for) and no
        // namespace at all: no NIC in the guest (loopback, and the
        // kernel's own sit0 tunnel, which leads nowhere).
        for namespaces in [
            serde_json::json!([{"type": "network"}]),
            serde_json::json!([]),
        ] {
            rt.configure("ip -o link");
            set_namespaces(&rt, namespaces.clone());
            let out = rt.ok(&["run", "rtnonet", "--bundle", rt.bundle().to_str().unwrap()]);
            assert!(out.contains("lo: <LOOPBACK"), "{namespaces}: {out}");
            assert!(!out.contains("link/ether"), "{namespaces}: {out}");
        }
        rt.assert_clean();
    }
);

kvm_test!(
    fn the_seccomp_profile_binds_the_container_and_its_execs() {
        become_subreaper();
        let rt = Runtime::new();
        let b = rt.bundle();
        rt.configure(
            "grep Seccomp: /proc/self/status; mkdir /tmp/x || echo mkdir-refused; \
             echo ready; while :; do sleep 1; done",
        );
        // Allow by default; mkdir refused with EACCES, kill(_, SIGUSR1) with
        // the default EPERM.
        rt.edit_config(|c| {
            c["linux"] = serde_json::json!({"seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [
                    {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
                    {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
                     "args": [{"index": 1, "value": 10, "op": "SCMP_CMP_EQ"}]}
                ]
            }})
        });
        rt.detached(
            &["run", "--detach", "sc1", "--bundle", b.to_str().unwrap()],
            Stdio::null(),
            &rt.path("stdout"),
        );
        let out = wait_for(&rt.path("stdout"), "ready", Duration::from_secs(300));
        assert_eq!(out, "Seccomp:\t2\nmkdir-refused\nready\n");

        let out = rt
            .cmd(&[
                "exec",
                "sc1",
                "sh",
                "-c",
                "grep Seccomp: /proc/self/status; mkdir /tmp/y || echo mkdir-refused; \
                 kill -USR1 $$ || echo usr1-refused; kill -0 $$ && echo kill0-ok",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            text(&out.stdout),
            "Seccomp:\t2\nmkdir-refused\nusr1-refused\nkill0-ok\n",
            "stderr: {}",
            text(&out.stderr)
        );
        assert!(text(&out.stderr).contains("Permission denied"));
        rt.ok(&["delete", "--force", "sc1"]);
        rt.assert_clean();
    }
);

kvm_test!(
    fn the_container_gets_its_own_namespaces_and_the_specs_masks_and_sysctls() {
        become_subreaper();
        let rt = Runtime::new();
        let b = rt.bundle();
        std::fs::write(b.join("rootfs/secret"), "s3cret").unwrap();
        std::fs::create_dir_all(b.join("rootfs/data")).unwrap();
        // The init: its PID, how many processes its /proc shows, the masked
        // and read-only paths; then it renames its UTS namespace and waits,
        // with no handler for SIGTERM.
        rt.configure(
            "echo pid:$$; echo procs:$(ls /proc | grep -c '^[0-9]'); \
             echo sysctl:$(cat /proc/sys/kernel/shmmax):$(cat /proc/sys/vm/max_map_count):$(cat /proc/sys/kernel/domainname); \
             echo oom:$(cat /proc/self/oom_score_adj); echo dev:$(ls /dev); \
             echo devices:$(stat -c '%F %t:%T %a' /dev/fuse /dev/sub/fifo | tr '\n' ,); \
             echo secret:$(cat /secret); echo cmdline:$(wc -c < /proc/cmdline); \
             echo sys-kernel:$(ls /sys/kernel | wc -l); \
             touch /data/x 2>/dev/null && echo data:writable || echo data:read-only; \
             (echo x > /proc/sys/kernel/domainname) 2>/dev/null && echo proc-sys:writable \
               || echo proc-sys:read-only; \
             hostname inner; echo ready; exec sleep 1000",
        );
        rt.edit_config(|c| {
            c["linux"] = serde_json::json!({
                "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                               {"type": "mount"}],
                "maskedPaths": ["/secret", "/proc/cmdline", "/sys/kernel", "/no/such/file"],
                "readonlyPaths": ["/data", "/proc/sys", "/no/such/dir"],
                // Of the container's IPC and UTS namespaces, and guest-wide.
                "sysctl": {"kernel.shmmax": "123456789", "kernel.domainname": "dom.example",
                           "vm.max_map_count": "262144"}
            });
            c["process"]["oomScoreAdj"] = 500.into();
            // The guest's FUSE device, as podman's --device /dev/fuse asks.
            c["linux"]["devices"] = serde_json::json!([
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438},
                {"path": "/dev/sub/fifo", "type": "p", "fileMode": 384}
            ]);
        });
        // Created, as under runc: the init exists, set up in its
        // namespaces, and an exec joins them before the program runs.
        let pid_file = rt.path("init.pid");
        rt.detached(
            &[
                "create",
                "ns1",
                "--bundle",
                b.to_str().unwrap(),
                "--pid-file",
                pid_file.to_str().unwrap(),
            ],
            Stdio::null(),
            &rt.path("stdout"),
        );
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
        let early = rt.ok(&[
            "exec",
            "ns1",
            "sh",
            "-c",
            "echo $$; readlink /proc/1/ns/pid; readlink /proc/$$/ns/pid; \
             ls /proc | grep -c '^[0-9]'",
        ]);
        let early: Vec<&str> = early.lines().collect();
        assert_ne!(early[0], "1", "{early:?}");
        assert_eq!(early[1], early[2], "{early:?}");
        assert_ne!(early[1], "pid:[4026531836]", "{early:?}");
        // The held init, the exec's shell, ls and grep.
        assert!(early[3].parse::<u32>().unwrap() <= 4, "{early:?}");
        assert_eq!(std::fs::read_to_string(rt.path("stdout")).unwrap(), "");
        assert_eq!(rt.state("ns1")["status"], "created");
        rt.ok(&["start", "ns1"]);
        let out = wait_for(&rt.path("stdout"), "ready", Duration::from_secs(300));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "pid:1", "{out}");
        // sh, the command substitution's subshell, ls and grep: not the
        // agent, its helpers or the guest kernel's threads.
        let procs: usize = lines[1].strip_prefix("procs:").unwrap().parse().unwrap();
        assert!(procs <= 5, "{out}");
        assert_eq!(
            lines[2..],
            [
                "sysctl:123456789:262144:dom.example",
                "oom:500",
                "dev:fd full fuse null ptmx pts random shm stderr stdin stdout sub tty urandom zero",
                "devices:character special file a:e5 666,fifo 0:0 600,",
                "secret:",
                "cmdline:0",
                "sys-kernel:0",
                "data:read-only",
                "proc-sys:read-only",
                "ready"
            ],
            "{out}"
        );
        assert_eq!(
            std::fs::read_to_string(b.join("rootfs/secret")).unwrap(),
            "s3cret"
        );

        // An exec joins the init's namespaces, which are not the guest's
        // (the kernel numbers its initial ones 4026531836, -39 and -38).
        let out = rt
            .cmd(&[
                "exec",
                "ns1",
                "sh",
                "-c",
                "echo $$; cat /proc/1/comm; hostname; cat /proc/sys/kernel/shmmax; \
                 for n in pid ipc uts; do readlink /proc/1/ns/$n; readlink /proc/$$/ns/$n; done; \
                 cat /proc/[0-9]*/comm",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        let text = text(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_ne!(lines[0], "1", "{text}");
        assert_eq!(lines[1..4], ["sleep", "inner", "123456789"], "{text}");
        for (i, initial) in [
            (4, "pid:[4026531836]"),
            (6, "ipc:[4026531839]"),
            (8, "uts:[4026531838]"),
        ] {
            assert_eq!(lines[i], lines[i + 1], "{text}");
            assert_ne!(lines[i], initial, "{text}");
        }
        let comms = &lines[10..];
        assert!(comms.contains(&"sleep"), "{text}");
        assert!(!comms.iter().any(|c| c.starts_with("runvm")), "{text}");

        // As under runc, PID 1 gets only the signals it handles, and
        // SIGKILL.
        rt.ok(&["kill", "ns1", "TERM"]);
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(rt.state("ns1")["status"], "running");
        rt.ok(&["kill", "ns1", "KILL"]);
        assert_eq!(wait_pid(pid, Duration::from_secs(60)), 137);
        rt.ok(&["delete", "ns1"]);
        rt.assert_clean();

        // A sysctl the guest kernel lacks fails `create`, with nothing left.
        rt.edit_config(|c| c["linux"] = serde_json::json!({"sysctl": {"vm.no_such_knob": "1"}}));
        rt.fails(
            &["create", "ns2", "--bundle", b.to_str().unwrap()],
            "sysctl vm.no_such_knob: the guest kernel has no such parameter",
        );
        rt.assert_clean();
    }
);

kvm_test!(
    fn a_guest_that_prints_forever_cannot_grow_its_console_log_past_the_bound() {
        become_subreaper();
        let rt = Runtime::new();
        let b = rt.bundle();
        // 400 lines of 60 bytes straight to the serial port (the container's
        // /dev lacks it, but root may make the node), against a
        // bound of 8 KiB (the default, 1 MiB, takes minutes to reach under
        // emulation, where each byte is a few VM exits).
        rt.configure(
            "busybox mknod /dev/ttyS0 c 4 64; i=0; while [ $i -lt 400 ]; do \
               echo serial-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx > /dev/ttyS0; \
               i=$((i+1)); done; echo done",
        );
        let pid_file = rt.path("con.pid");
        let status = rt
            .cmd(&[
                "run",
                "--detach",
                "con",
                "--bundle",
                b.to_str().unwrap(),
                "--pid-file",
                pid_file.to_str().unwrap(),
            ])
            .env("RUNVM_CONSOLE_LOG_MAX", "8192")
            .stdin(Stdio::null())
            .stdout(File::create(rt.path("stdout")).unwrap())
            .stderr(File::create(rt.path("stderr")).unwrap())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{}",
            std::fs::read_to_string(rt.path("stderr")).unwrap()
        );
        let pid: i32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
        assert_eq!(wait_pid(pid, Duration::from_secs(600)), 0);
        assert_eq!(
            std::fs::read_to_string(rt.path("stdout")).unwrap(),
            "done\n"
        );
        let log = std::fs::read(rt.path("root/con/console.log")).unwrap();
        let text = String::from_utf8_lossy(&log);
        assert!(log.len() <= 8192, "{} bytes:\n{text}", log.len());
        // The boot's start, the dropped-bytes line, the latest output.
        assert!(text.contains("runvm-agent: random pool seeded"), "{text}");
        assert!(
            text.contains("bytes of console output dropped here]"),
            "{text}"
        );
        assert!(text.contains("serial-399-x"), "{text}");
        assert!(!text.contains("serial-100-x"), "{text}");
        rt.ok(&["delete", "con"]);
        rt.assert_clean();
    }
);

kvm_test!(
    fn an_overlay_rootfs_takes_the_containers_writes_and_leaves_the_host_directory_alone() {
        let rt = Runtime::new();
        let rootfs = rt.path("bundle/rootfs");
        std::fs::write(rootfs.join("etc/keep"), "kept\n").unwrap();
        std::fs::write(rootfs.join("marker"), "original\n").unwrap();
        rt.configure(
            "echo new > /created && echo changed > /marker && rm /etc/keep && \
             grep ' / overlay ' /proc/mounts | cut -d' ' -f3; cat /created /marker; \
             ls /etc/keep 2>/dev/null || echo keep-gone",
        );
        rt.edit_config(|c| c["annotations"]["io.runvm.rootfs_overlay"] = "true".into());
        let out = rt.ok(&[
            "run",
            "--keep",
            "ov1",
            "--bundle",
            rt.bundle().to_str().unwrap(),
        ]);
        assert_eq!(out, "overlay\nnew\nchanged\nkeep-gone\n");
        // Every VM gets its own seed from the host, credited to the pool.
        let console = std::fs::read_to_string(rt.path("root/ov1/console.log")).unwrap();
        assert!(
            console.contains("runvm-agent: random pool seeded with 512 bits from the host"),
            "{console}"
        );
        rt.ok(&["delete", "ov1"]);
        assert!(!rootfs.join("created").exists(), "a write reached the host");
        assert_eq!(
            std::fs::read_to_string(rootfs.join("marker")).unwrap(),
            "original\n"
        );
        assert_eq!(
            std::fs::read_to_string(rootfs.join("etc/keep")).unwrap(),
            "kept\n"
        );
        rt.assert_clean();
    }
);

kvm_test!(
    fn the_huge_pages_annotation_decides_how_guest_ram_is_advised() {
        let rt = Runtime::new();
        let b = rt.bundle();
        let b = b.to_str().unwrap();
        for (id, annotation, want) in [("hp1", None, true), ("hp2", Some("false"), false)] {
            rt.configure("sleep 600");
            if let Some(v) = annotation {
                rt.edit_config(|c| c["annotations"]["io.runvm.huge_pages"] = v.into());
            }
            let pid_file = rt.path(&format!("{id}.pid"));
            rt.detached(
                &[
                    "create",
                    id,
                    "--bundle",
                    b,
                    "--pid-file",
                    pid_file.to_str().unwrap(),
                ],
                Stdio::null(),
                &rt.path("stdout"),
            );
            // The monitor runs the VMM: its guest RAM is the VM's.
            let monitor: u32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
            let flags = guest_ram_flags(monitor);
            assert!(
                flags.iter().all(|f| advised(f) == want),
                "{id}: advised {want} expected: {flags:?}"
            );
            rt.ok(&["delete", "--force", id]);
        }
        rt.assert_clean();
    }
);

kvm_test!(
    fn the_guest_kernel_mitigates_cpu_flaws_unless_the_kernel_params_turn_it_off() {
        let rt = Runtime::new();
        let b = rt.bundle();
        let b = b.to_str().unwrap();
        // Spectre v1 concerns every out-of-order x86 CPU, so the kernel
        // always has something to say about it.
        let script = "cat /sys/devices/system/cpu/vulnerabilities/spectre_v1; \
                      grep -o 'mitigations=off' /proc/cmdline || echo default";
        let mut seen = Vec::new();
        for (id, params) in [("mit1", None), ("mit2", Some("mitigations=off"))] {
            rt.configure(script);
            if let Some(v) = params {
                rt.edit_config(|c| c["annotations"]["io.runvm.kernel_params"] = v.into());
            }
            let out = rt.ok(&["run", id, "--bundle", b]);
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 2, "{id}: {out}");
            seen.push((lines[0].to_owned(), lines[1].to_owned()));
        }
        let (on, off) = (&seen[0], &seen[1]);
        assert!(on.0.starts_with("Mitigation: "), "default: {on:?}");
        assert_eq!(on.1, "default");
        assert!(off.0.starts_with("Vulnerable"), "mitigations=off: {off:?}");
        assert_eq!(off.1, "mitigations=off");
        rt.assert_clean();
    }
);

kvm_test!(
    fn the_spec_resources_limit_the_container_and_update_changes_them() {
        become_subreaper();
        let rt = Runtime::new();
        // No forks in the init: a shell whose fork fails at the pids limit
        // exits, and the container with it.
        rt.configure("exec sleep 100000");
        rt.edit_config(|c| {
            c["linux"] = serde_json::json!({"resources": {
                "memory": {"limit": 64 << 20},
                "cpu": {"quota": 50000, "period": 100000, "shares": 512},
                "pids": {"limit": 12}
            }, "cgroupsPath": "/runvm-tests/lim"});
            // As `runc spec` and Docker write it.
            c["mounts"] = serde_json::json!([{
                "destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]
            }]);
        });
        let init = rt.run_detached("lim");
        let cg = |file: &str| rt.ok(&["exec", "lim", "cat", &format!("/sys/fs/cgroup/{file}")]);

        // The container's own cgroup is the root of what it sees, with the
        // spec's limits; its processes are in it.
        let out = rt.ok(&[
            "exec",
            "lim",
            "sh",
            "-c",
            "cat /proc/self/cgroup /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max \
             /sys/fs/cgroup/pids.max; grep -qx $$ /sys/fs/cgroup/cgroup.procs && echo joined; \
             grep -o 'cgroup2 /sys/fs/cgroup cgroup2 ro' /proc/mounts; \
             grep -c 'cgroup2 .*favordynmods' /proc/mounts",
        ]);
        // (favordynmods: moving a process in does not wait for RCU.)
        assert_eq!(
            out,
            "0::/\n67108864\n50000 100000\n12\njoined\ncgroup2 /sys/fs/cgroup cgroup2 ro\n1\n"
        );

        // On the host, the VM is in the spec's cgroup: the monitor (the
        // pid file's process), the guest's RAM charged there, a memory
        // limit for the whole VM (its 64 + 64 MiB of RAM and the VMM's
        // 64 MiB) and the shares as a weight.
        let host = Path::new("/sys/fs/cgroup/runvm-tests/lim");
        let read = |f: &str| std::fs::read_to_string(host.join(f)).unwrap();
        assert!(
            read("cgroup.procs").lines().any(|p| p == init.to_string()),
            "{init} not in {}",
            read("cgroup.procs")
        );
        assert_eq!(read("memory.max"), format!("{}\n", 192u64 << 20));
        assert_eq!(read("cpu.weight"), "20\n");
        let charged: u64 = read("memory.current").trim().parse().unwrap();
        assert!(charged > 16 << 20, "memory.current {charged}");

        // Forks stop at the pids limit: the inner shell starts sleeps until
        // a fork fails (which ends it); the outer one reads the count with
        // builtins only, then ends the sleeps.
        let out = rt.ok(&[
            "exec",
            "lim",
            "sh",
            "-c",
            "sh -c 'i=0; while [ $i -lt 20 ]; do i=$((i+1)); sleep 60 & echo $i > /tmp/n; done' \
             2>/dev/null; read n < /tmp/n; read e < /sys/fs/cgroup/pids.events; \
             echo $n $e; trap '' TERM; kill 0; wait",
        ]);
        let words: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(words.len(), 3, "{out}");
        assert_eq!(words[1], "max", "{out}");
        // init, the two shells and the sleeps fill the 12.
        assert_eq!(words[0], "9", "{out}");
        assert!(words[2].parse::<u32>().unwrap() > 0, "{out}");

        // A process that grows past the memory limit is killed by the
        // guest's OOM killer; the container lives on.
        let out = rt
            .cmd(&[
                "exec",
                "lim",
                "sh",
                "-c",
                "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived ${#x}",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(137), "{}", text(&out.stdout));
        assert!(cg("memory.events").contains("oom_kill 1"));
        assert_eq!(rt.state("lim")["status"], "running");
        // runc's stats record holds the cgroup's figures and limits.
        let stats: serde_json::Value =
            serde_json::from_str(&rt.ok(&["events", "--stats", "lim"])).unwrap();
        let data = &stats["data"];
        assert_eq!(data["memory"]["usage"]["limit"], 64 << 20, "{stats}");
        assert!(
            data["memory"]["usage"]["failcnt"].as_u64().unwrap() > 0,
            "{stats}"
        );
        assert_eq!(data["memory"]["raw"]["oom_kill"], 1, "{stats}");
        assert_eq!(data["pids"]["limit"], 12, "{stats}");
        assert!(
            data["cpu"]["usage"]["total"].as_u64().unwrap() > 0,
            "{stats}"
        );

        // runvm update: options, and resources JSON on stdin as containerd
        // sends them; what the VM cannot back is refused.
        rt.ok(&["update", "--pids-limit", "30", "--memory", "48m", "lim"]);
        assert_eq!(cg("pids.max"), "30\n");
        assert_eq!(cg("memory.max"), "50331648\n");
        let out = rt.with_input(
            &["update", "--resources", "-", "lim"],
            br#"{"cpu": {"quota": 80000, "period": 200000}, "pids": {"limit": -1}}"#,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(cg("cpu.max"), "80000 200000\n");
        assert_eq!(cg("pids.max"), "max\n");
        // New shares weigh the container in the guest and the VM on the host.
        rt.ok(&["update", "--cpu-share", "1024", "lim"]);
        assert_eq!(cg("cpu.weight"), "39\n");
        assert_eq!(read("cpu.weight"), "39\n");
        rt.fails(&["update", "--memory", "1g", "lim"], "more than the 64 MiB");
        rt.fails(&["update", "--cpu-quota", "300000", "lim"], "1 vCPUs");
        rt.fails(&["update", "--cpu-quota", "10", "lim"], "below 1000");
        assert_eq!(cg("memory.max"), "50331648\n");

        rt.ok(&["pause", "lim"]);
        rt.fails(&["update", "--pids-limit", "5", "lim"], "paused");
        rt.ok(&["resume", "lim"]);
        rt.ok(&["kill", "lim", "KILL"]);
        assert_eq!(wait_pid(init, Duration::from_secs(120)), 137);
        rt.fails(&["update", "--pids-limit", "5", "lim"], "not running");
        rt.ok(&["delete", "lim"]);
        rt.assert_clean();
        // The container's cgroup went with it; its parent stays, as with runc.
        assert!(!host.exists());
        std::fs::remove_dir(host.parent().unwrap()).unwrap();
    }
);

/// Rewrites the snapshot in `dir` so that its vCPU spins for ever: `jmp $`
/// written at its instruction pointer (found through its page tables in
/// the memory file), interrupts off and the vCPU runnable.
fn spin_where_the_vcpu_stands(dir: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let state = dir.join("vm.json");
    let mut snap: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let vcpu = &mut snap["vcpus"][0];
    let bytes = |v: &serde_json::Value, at: usize| -> u64 {
        let mut b = [0u8; 8];
        for (i, x) in b.iter_mut().enumerate() {
            *x = v[at + i].as_u64().unwrap() as u8;
        }
        u64::from_le_bytes(b)
    };
    // kvm_regs: rip at byte 128, rflags at 136; kvm_sregs: cr3 at 240 and
    // cr4 at 256 (after 8 segments of 24 bytes and 2 tables of 16, cr0, cr2).
    let rip = bytes(&vcpu["regs"], 128);
    let cr3 = bytes(&vcpu["sregs"], 240);
    let cr4 = bytes(&vcpu["sregs"], 256);
    assert_eq!(cr4 & (1 << 12), 0, "5-level paging");
    let memory = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("memory"))
        .unwrap();
    // Guest RAM starts at offset 0 of the file (one range below the gap).
    let frame = 0x000f_ffff_ffff_f000u64;
    let mut table = cr3 & frame;
    let mut phys = None;
    for shift in [39u32, 30, 21, 12] {
        let mut entry = [0u8; 8];
        memory
            .read_exact_at(&mut entry, table + ((rip >> shift) & 0x1ff) * 8)
            .unwrap();
        let entry = u64::from_le_bytes(entry);
        assert_eq!(entry & 1, 1, "rip {rip:#x} not mapped at level {shift}");
        let mask = (1u64 << shift) - 1;
        if shift == 12 || entry & 0x80 != 0 {
            phys = Some((entry & frame & !mask) | (rip & mask));
            break;
        }
        table = entry & frame;
    }
    memory.write_all_at(&[0xeb, 0xfe], phys.unwrap()).unwrap();
    // Runnable (KVM_MP_STATE_RUNNABLE), RFLAGS.IF (bit 9) clear.
    vcpu["mp_state"] = serde_json::json!([0, 0, 0, 0]);
    let flags = vcpu["regs"][137].as_u64().unwrap();
    vcpu["regs"][137] = (flags & !2).into();
    std::fs::write(&state, serde_json::to_vec(&snap).unwrap()).unwrap();
}

kvm_test!(
    fn templates_give_each_container_its_own_rootfs_network_randomness_and_clock() {
        let ns = Netns::new("t", "10.213.10");
        let before = ns.fingerprint();
        let rt = Runtime::new();
        let cache = rt.path("cache");
        let b = rt.bundle();
        let b = b.to_str().unwrap();
        std::fs::write(rt.path("hosts-file"), "127.0.0.1 fromhost\n").unwrap();
        let mut seen_random = Vec::new();
        let templates = || -> Vec<std::path::PathBuf> {
            std::fs::read_dir(cache.join("templates"))
                .unwrap()
                .flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.path())
                .collect()
        };
        // The third finds its template's vCPU spinning on `jmp $` with
        // interrupts off (its agent never answers), the fifth finds the
        // rebuilt template's memory zeroed (the restored guest
        // triple-faults at once); both boot instead.
        for (id, who, damage) in [
            ("tpl1", "one", None),
            ("tpl2", "two", None),
            ("tpl3", "three", Some("spin")),
            ("tpl4", "four", None),
            ("tpl5", "five", Some("zero")),
        ] {
            if damage == Some("spin") {
                let found = templates();
                assert_eq!(found.len(), 1, "{found:?}");
                spin_where_the_vcpu_stands(&found[0]);
            }
            if damage == Some("zero") {
                let found = templates();
                assert_eq!(found.len(), 1, "{found:?}");
                let memory = found[0].join("memory");
                let (blocks, len) = {
                    use std::os::unix::fs::MetadataExt;
                    let m = std::fs::metadata(&memory).unwrap();
                    (m.blocks(), m.len())
                };
                eprintln!(
                    "template memory file: {} KiB written of {} MiB",
                    blocks / 2,
                    len >> 20
                );
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&memory)
                    .unwrap();
                f.set_len(0).unwrap();
                f.set_len(len).unwrap();
            }
            std::fs::write(rt.path("bundle/rootfs/who"), who).unwrap();
            let (port, server) = ns.serve_once();
            rt.configure(&format!(
                "cat /who; echo; hostname; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; \
                 echo; date +%s; cat /etc/hosts; ip -o link show eth0; ip -o -4 addr show eth0; \
                 echo from-{who} | nc 10.213.10.1 {port}; exit 3"
            ));
            rt.edit_config(|c| {
                c["hostname"] = format!("host-{who}").into();
                c["annotations"]["io.runvm.template"] = "true".into();
                c["mounts"] = serde_json::json!([
                    {"destination": "/etc/hosts", "type": "bind",
                     "source": rt.path("hosts-file"), "options": ["rbind"]}
                ]);
            });
            set_namespaces(
                &rt,
                serde_json::json!([{"type": "mount"}, {"type": "network", "path": ns.path()}]),
            );
            let out = rt
                .cmd(&["run", id, "--bundle", b])
                .env("RUNVM_INITRAMFS_CACHE", &cache)
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let stdout = text(&out.stdout);
            assert_eq!(
                out.status.code(),
                Some(3),
                "{id}: stdout: {stdout}\nstderr: {}",
                text(&out.stderr)
            );
            let host_now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let lines: Vec<&str> = stdout.lines().collect();
            assert_eq!(lines[0], who, "{stdout}");
            assert_eq!(lines[1], format!("host-{who}"), "{stdout}");
            assert_eq!(lines[2].len(), 32, "{stdout}");
            seen_random.push(lines[2].to_owned());
            let guest_now: u64 = lines[3].parse().unwrap();
            assert!(
                guest_now.abs_diff(host_now) < 120,
                "the guest's clock is the host's: {guest_now} vs {host_now}"
            );
            assert_eq!(lines[4], "127.0.0.1 fromhost", "{stdout}");
            assert!(
                stdout.contains(&format!("link/ether {}", ns.mac())),
                "the template's NIC took the veth's MAC: {stdout}"
            );
            assert!(stdout.contains("inet 10.213.10.2/24"), "{stdout}");
            assert_eq!(server.join().unwrap(), format!("from-{who}\n"));
            assert_eq!(ns.fingerprint(), before);
        }
        // Restored and booted VMs: each drew other random bytes.
        seen_random.sort();
        seen_random.dedup();
        assert_eq!(seen_random.len(), 5, "{seen_random:?}");
        // The first and the fourth built the template; all five were
        // restored from one, and each damaged one cost its template.
        let log = std::fs::read_to_string(rt.path("log.json")).unwrap();
        assert_eq!(log.matches(" built in ").count(), 2, "{log}");
        assert_eq!(log.matches("restoring template").count(), 5, "{log}");
        assert_eq!(
            log.matches("removing the template and booting").count(),
            2,
            "{log}"
        );
        assert_eq!(log.matches("did not answer within").count(), 1, "{log}");
        assert_eq!(templates(), Vec::<std::path::PathBuf>::new());
        // No TAP of the template's build is left on the host.
        let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
        assert!(
            !text(&links.stdout).contains("rvtpl"),
            "{}",
            text(&links.stdout)
        );
        rt.assert_clean();
    }
);
