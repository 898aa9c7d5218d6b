//! `runvm run IMAGE` end to end: an image made with `runvm image create`
//! from a busybox rootfs, run in micro-VMs with its config, options,
//! volumes, and the docker-like `ps`/`logs`/`stop`/`rm`.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use runvm_tests::artifacts::{agent_binary, busybox_rootfs, guest_kernel_dir, runvm_binary};
use runvm_tests::kvm_test;
use runvm_tests::netns::Netns;

/// Nested emulation boots slowly; the default timeout is for real KVM.
const SLOW_BOOT: &str = "io.runvm.boot_timeout=600";

/// A state root, an image store holding `testbox`, and the runvm command.
struct Images {
    dir: tempfile::TempDir,
}

impl Images {
    /// `testbox`: busybox with users, and a config that runs as `app` in
    /// /srv with GREETING set.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("src");
        busybox_rootfs(&rootfs);
        std::fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            rootfs.join("etc/group"),
            "root:x:0:\nwheel:x:10:app\napp:x:1000:\n",
        )
        .unwrap();
        for d in ["srv", "home/app", "root"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        let im = Images { dir };
        let src = im.path("src");
        let out = im.ok(&[
            "image",
            "create",
            "testbox",
            src.to_str().unwrap(),
            "--cmd",
            "sh",
            "--cmd",
            "-c",
            "--cmd",
            "echo default:$(id -u)",
            "-e",
            "PATH=/bin",
            "-e",
            "GREETING=image",
            "-w",
            "/srv",
            "-u",
            "app",
        ]);
        assert!(out.starts_with("sha256:"), "{out}");
        im
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(runvm_binary());
        c.arg("--root")
            .arg(self.path("root"))
            .arg("--store")
            .arg(self.path("store"))
            .args(args)
            .env("RUNVM_KERNEL", guest_kernel_dir().join("vmlinux"))
            .env("RUNVM_AGENT", agent_binary())
            .stdin(Stdio::null());
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "runvm {args:?}: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// `runvm run` of `testbox` with the slow-boot annotation.
    fn run(&self, opts: &[&str], command: &[&str]) -> String {
        let mut args = vec!["run", "--annotation", SLOW_BOOT];
        args.extend(opts);
        args.push("testbox");
        args.extend(command);
        self.ok(&args)
    }

    /// Fails with exit status `code`, saying `want`.
    fn fails_with(&self, args: &[&str], code: i32, want: &str) {
        let out = self.output(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "runvm {args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains(want),
            "runvm {args:?}: {}",
            text(&out.stderr)
        );
    }

    fn fails(&self, args: &[&str], want: &str) {
        let out = self.output(args);
        assert!(!out.status.success(), "runvm {args:?} succeeded");
        assert!(
            text(&out.stderr).contains(want),
            "runvm {args:?}: {}",
            text(&out.stderr)
        );
    }

    /// No container state, bundle or image hold is left.
    fn assert_clean(&self) {
        for d in ["root", "store/containers", "store/holds"] {
            let left: Vec<_> = std::fs::read_dir(self.path(d))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "left behind in {d}: {left:?}");
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

kvm_test!(
    fn runvm_run_image_runs_the_command_with_the_images_config() {
        let im = Images::new();
        assert_eq!(im.run(&["--rm"], &["echo", "hi"]), "hi\n");
        // The image's Cmd, as its User.
        assert_eq!(im.run(&["--rm"], &[]), "default:1000\n");
        let report = [
            "sh",
            "-c",
            "echo $GREETING:$(pwd):$(id -u):$(id -g):$(id -G):$HOME",
        ];
        assert_eq!(
            im.run(&["--rm"], &report),
            "image:/srv:1000:1000:1000 10:/home/app\n"
        );
        assert_eq!(
            im.run(
                &["--rm", "-e", "GREETING=cli", "-w", "/tmp", "-u", "0"],
                &report
            ),
            "cli:/tmp:0:0:0:/root\n"
        );
        // The exit status is the container's.
        let out = im.output(&[
            "run",
            "--rm",
            "--annotation",
            SLOW_BOOT,
            "testbox",
            "sh",
            "-c",
            "exit 7",
        ]);
        assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
        // A command the image lacks and one it cannot run: docker's 127
        // and 126, with nothing left behind.
        for (command, code, want) in [
            ("no-such-command", 127, "executable file not found in $PATH"),
            (
                "/etc/passwd",
                126,
                "exec: \"/etc/passwd\": permission denied",
            ),
        ] {
            im.fails_with(
                &["run", "--rm", "--annotation", SLOW_BOOT, "testbox", command],
                code,
                want,
            );
        }
        im.assert_clean();
    }
);

kvm_test!(
    fn containers_of_one_image_are_isolated_and_volumes_are_shared_as_asked() {
        let im = Images::new();
        let root = ["-u", "0"];
        let out = im.run(
            &[&root[..], &["--name", "w1"]].concat(),
            &["sh", "-c", "echo one > /written; cat /written"],
        );
        assert_eq!(out, "one\n");
        // Kept without --rm: listed as exited, its output in its log.
        let ps = im.ok(&["ps", "-a"]);
        assert!(
            ps.lines()
                .any(|l| l.starts_with("w1 ") && l.contains("exited (0)")),
            "{ps}"
        );
        assert_eq!(im.ok(&["ps", "-q"]), "", "w1 listed as running");
        assert_eq!(im.ok(&["logs", "w1"]), "one\n");
        let out = im.run(
            &[&root[..], &["--rm"]].concat(),
            &["sh", "-c", "cat /written 2>/dev/null || echo absent"],
        );
        assert_eq!(out, "absent\n");
        // Nor did the write reach the unpacked image.
        for e in std::fs::read_dir(im.path("store/rootfs")).unwrap() {
            assert!(!e.unwrap().path().join("written").exists());
        }

        let rw = im.path("rw");
        let ro = im.path("ro");
        std::fs::create_dir_all(&rw).unwrap();
        std::fs::create_dir_all(&ro).unwrap();
        std::fs::write(rw.join("in"), "from the host\n").unwrap();
        std::fs::write(ro.join("file"), "read only\n").unwrap();
        let rw_opt = format!("{}:/data", rw.display());
        let ro_opt = format!("{}:/ro:ro", ro.display());
        let out = im.run(
            &[&root[..], &["--rm", "-v", &rw_opt, "-v", &ro_opt]].concat(),
            &[
                "sh",
                "-c",
                "cat /data/in /ro/file; echo out > /data/out; \
                 echo x 2>/dev/null > /ro/new && echo ro-written || echo ro-refused",
            ],
        );
        assert_eq!(out, "from the host\nread only\nro-refused\n");
        assert_eq!(std::fs::read_to_string(rw.join("out")).unwrap(), "out\n");
        assert!(!ro.join("new").exists());

        // The image is in use while w1 exists.
        im.fails(&["image", "rm", "testbox"], "w1");
        im.ok(&["rm", "w1"]);
        im.fails(&["logs", "w1"], "no such container");
        im.assert_clean();
        im.ok(&["image", "rm", "testbox"]);
    }
);

kvm_test!(
    fn a_detached_container_logs_stops_and_is_removed() {
        let im = Images::new();
        let id = im.run(
            &["-d", "--name", "bg", "-u", "0"],
            &[
                "sh",
                "-c",
                "echo started; trap 'echo bye; exit 0' TERM; while :; do sleep 1; done",
            ],
        );
        assert_eq!(id, "bg\n");
        let start = Instant::now();
        while !im.ok(&["logs", "bg"]).contains("started") {
            assert!(start.elapsed() < Duration::from_secs(120), "no output");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(im.ok(&["ps", "-q"]), "bg\n");
        im.fails(&["rm", "bg"], "stop it first");
        im.fails(
            &["run", "--name", "bg", "testbox", "true"],
            "already in use",
        );
        assert_eq!(im.ok(&["stop", "-t", "60", "bg"]), "bg\n");
        let ps = im.ok(&["ps", "-a"]);
        assert!(ps.contains("exited (0)"), "{ps}");
        assert_eq!(im.ok(&["logs", "bg"]), "started\nbye\n");
        im.ok(&["rm", "bg"]);

        // -d --rm: gone once it exits.
        let id = im.run(&["-d", "--rm"], &["true"]);
        let id = id.trim();
        assert_eq!(id.len(), 12, "{id}");
        let start = Instant::now();
        while !im.ok(&["ps", "-a", "-q"]).is_empty() {
            // The reaper waits for a VM to boot, run and stop: minutes in
            // a slow nested test host.
            assert!(start.elapsed() < Duration::from_secs(300), "not removed");
            std::thread::sleep(Duration::from_millis(200));
        }
        im.assert_clean();
    }
);

kvm_test!(
    fn network_ns_gives_an_image_container_that_namespaces_network() {
        let ns = Netns::new("img", "10.213.11");
        let before = ns.fingerprint();
        let (port, server) = ns.serve_once();
        let im = Images::new();
        let network = format!("ns:{}", ns.path());
        let script =
            format!("ip -o -4 addr show eth0; ip route; echo from-image | nc 10.213.11.1 {port}");
        let out = im.run(&["--rm", "--network", &network], &["sh", "-c", &script]);
        assert!(out.contains("inet 10.213.11.2/24"), "{out}");
        assert!(out.contains("default via 10.213.11.1 dev eth0"), "{out}");
        assert!(out.contains("from-host"), "{out}");
        assert_eq!(server.join().unwrap(), "from-image\n");
        assert_eq!(ns.fingerprint(), before);
        // Without --network: loopback only.
        let out = im.run(&["--rm"], &["ip", "-o", "link"]);
        assert!(out.contains("lo: <LOOPBACK"), "{out}");
        assert!(!out.contains("link/ether"), "{out}");
        im.assert_clean();
    }
);

kvm_test!(
    fn the_bridge_network_gives_addresses_reaches_the_host_and_publishes_ports() {
        use runvm_tests::netns::{ip, serve_once_at};
        let im = Images::new();
        // A peer on the host, on every address: the bridge appears with
        // the first container.
        let (port, server) = serve_once_at("0.0.0.0:0");
        // A detached one serving a published port, then a foreground one
        // that reaches it and the host.
        let published = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let publish = format!("127.0.0.1:{published}:7000");
        // And a UDP port, answered by the guest tool's echo.
        let published_udp = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let publish_udp = format!("127.0.0.1:{published_udp}:7001/udp");
        let tool = runvm_tests::artifacts::guest_tool_binary();
        let tools = format!("{}:/tool:ro", tool.parent().unwrap().display());
        let udp_echo = format!(
            "/tool/{} udp-echo 7001 &",
            tool.file_name().unwrap().to_str().unwrap()
        );
        im.run(
            &[
                "-d",
                "--name",
                "b1",
                "--network",
                "bridge",
                "-u",
                "0",
                "-p",
                &publish,
                "-p",
                &publish_udp,
                // The same port once more, on a host port the kernel chooses.
                "-p",
                "127.0.0.1::7000",
                "-v",
                &tools,
            ],
            &[
                "sh",
                "-c",
                &format!(
                    "{udp_echo} ip -o -4 addr show eth0; echo started; \
                     while :; do echo from-container | nc -l -p 7000; done"
                ),
            ],
        );
        let start = Instant::now();
        let log = loop {
            let log = im.ok(&["logs", "b1"]);
            if log.contains("started") {
                break log;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "no output");
            std::thread::sleep(Duration::from_millis(200));
        };
        let b1 = log
            .split_whitespace()
            .find_map(|w| {
                w.strip_prefix("10.90.")
                    .map(|_| w.split('/').next().unwrap())
            })
            .unwrap_or_else(|| panic!("b1 has no bridge address: {log}"))
            .to_owned();
        let script = format!(
            "ip -o -4 addr show eth0; ip route; grep -c nameserver /etc/resolv.conf; \
             ping -c 1 -W 10 {b1} >/dev/null && echo reached-b1; \
             echo from-bridge | nc 10.90.0.1 {port}"
        );
        let out = im.run(
            &["--rm", "--network", "bridge", "-u", "0"],
            &["sh", "-c", &script],
        );
        assert!(out.contains("inet 10.90.0."), "{out}");
        assert!(
            !out.contains(&format!("inet {b1}/")),
            "the same address twice: {out}"
        );
        assert!(out.contains("/16 "), "{out}");
        assert!(out.contains("default via 10.90.0.1 dev eth0"), "{out}");
        assert!(!out.contains("\n0\n"), "no name server: {out}");
        assert!(out.contains("reached-b1"), "{out}");
        assert!(out.contains("from-host"), "{out}");
        assert_eq!(server.join().unwrap(), "from-bridge\n");
        // The published port, from the host's loopback (retried while the
        // container's listener comes up).
        let start = Instant::now();
        let line = loop {
            use std::io::BufRead;
            let mut line = String::new();
            if let Ok(c) = std::net::TcpStream::connect(("127.0.0.1", published)) {
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let _ = std::io::BufReader::new(c).read_line(&mut line);
            }
            if !line.is_empty() || start.elapsed() > Duration::from_secs(120) {
                break line;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        assert_eq!(line, "from-container\n");
        // The chosen port: as docker's `port` and `ps` show it, and served.
        let ports = im.ok(&["port", "b1"]);
        let mut lines = ports.lines();
        assert_eq!(
            lines.next(),
            Some(format!("7000/tcp -> 127.0.0.1:{published}").as_str()),
            "{ports}"
        );
        assert_eq!(
            lines.next(),
            Some(format!("7001/udp -> 127.0.0.1:{published_udp}").as_str()),
            "{ports}"
        );
        let chosen: u16 = lines
            .next()
            .and_then(|l| l.strip_prefix("7000/tcp -> 127.0.0.1:"))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no chosen port: {ports}"));
        assert!(chosen != 0 && chosen != published, "{ports}");
        let ps = im.ok(&["ps"]);
        assert!(
            ps.contains(&format!(
                "127.0.0.1:{published}->7000/tcp, 127.0.0.1:{published_udp}->7001/udp, 127.0.0.1:{chosen}->7000/tcp"
            )),
            "{ps}"
        );
        let mut line = String::new();
        let c = std::net::TcpStream::connect(("127.0.0.1", chosen)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(c), &mut line).unwrap();
        assert_eq!(line, "from-container\n");
        // The UDP port: each datagram answered, to each client.
        let clients: Vec<std::net::UdpSocket> = (0..2)
            .map(|_| {
                let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                c
            })
            .collect();
        for (i, c) in clients.iter().enumerate() {
            let start = Instant::now();
            let what = format!("datagram {i}");
            let answer = loop {
                c.send_to(what.as_bytes(), ("127.0.0.1", published_udp))
                    .unwrap();
                let mut buf = [0u8; 64];
                if let Ok(n) = c.recv(&mut buf) {
                    break String::from_utf8_lossy(&buf[..n]).into_owned();
                }
                assert!(start.elapsed() < Duration::from_secs(120), "no UDP answer");
            };
            assert_eq!(answer, what);
        }
        im.ok(&["rm", "-f", "b1"]);
        // The ports are free again with the container gone.
        std::net::TcpListener::bind(("127.0.0.1", published)).unwrap();
        std::net::UdpSocket::bind(("127.0.0.1", published_udp)).unwrap();
        std::net::TcpListener::bind(("127.0.0.1", chosen)).unwrap();
        im.fails(&["port", "b1"], "does not exist");
        // Nothing of either container is left: namespaces, veths, leases.
        assert!(!ip(&["netns", "list"]).contains("runvm-"));
        assert!(!ip(&["-o", "link"]).contains("rvb"));
        let leases = std::fs::read_dir("/run/runvm/bridge/leases")
            .unwrap()
            .count();
        assert_eq!(leases, 0);
        im.assert_clean();
    }
);

#[test]
fn bad_runs_fail_clearly_and_leave_nothing() {
    let im = Images::new();
    // docker's status for a run that failed before its command: 125.
    im.fails_with(
        &["run", "--pull", "never", "nosuch", "true"],
        125,
        "image \"nosuch\" not found",
    );
    // A missing image is pulled, as docker does; nothing listens here.
    im.fails(
        &["run", "--insecure", "127.0.0.1:1/nosuch", "true"],
        "cannot pull",
    );
    im.fails(&["run", "-v", "vol:/data", "testbox"], "named volumes");
    im.fails(&["run", "-m", "1t", "testbox"], "invalid memory size");
    im.fails(
        &["run", "-u", "nobody", "testbox"],
        "unable to find user nobody",
    );
    im.fails(&["run", "-w", "rel", "testbox"], "must be an absolute path");
    im.fails(
        &["run", "--name", "../x", "testbox"],
        "invalid container ID",
    );
    im.fails(&["run", "-t", "testbox"], "not a TTY");
    im.fails(&["run", "--network", "overlay", "testbox"], "not supported");
    im.fails(&["run", "-p", "8080:80", "testbox"], "-p needs a network");
    im.fails(
        &["run", "-p", "53:53/sctp", "--network", "bridge", "testbox"],
        "tcp or udp",
    );
    im.fails(
        &["run", "--network", "ns:/no/such", "testbox"],
        "does not exist",
    );
    im.fails(
        &["run", "--entrypoint", "", "testbox"],
        "no command specified",
    );
    im.fails(&["stop", "nosuch"], "no such container");
    im.fails(&["rm", "nosuch"], "no such container");
    im.fails(&["logs", "nosuch"], "no such container");
    im.assert_clean();
    let ls = im.ok(&["image", "ls"]);
    assert!(ls.contains("docker.io/library/testbox:latest"), "{ls}");
}
