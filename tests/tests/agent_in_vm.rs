//! The agent as PID 1 of a real micro-VM: the container rootfs arrives over
//! virtio-fs, the host drives processes over vsock.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use runvm_protocol::client::{connect_vsock, Client, Notice};
use runvm_protocol::{
    DnsConfig, Event, InterfaceConfig, NetworkConfig, Op, Outcome, ProcessSpec, RouteConfig,
    StreamId, AGENT_VSOCK_PORT,
};
use runvm_tests::artifacts::{busybox_rootfs, vmm_command, Initrd};
use runvm_tests::guest::GuestProcess;
use runvm_tests::host::HostTap;
use runvm_tests::kvm_test;

/// The container's NIC.
const AGENT_MAC: &str = "02:00:00:00:0a:02";

fn sh(script: &str) -> ProcessSpec {
    ProcessSpec {
        args: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into()],
        cwd: "/".into(),
        uid: 0,
        gid: 0,
        terminal: false,
        ..Default::default()
    }
}

/// Output and exit status per process handle.
#[derive(Default)]
struct Host {
    out: HashMap<(u32, u8), Vec<u8>>,
    exits: HashMap<u32, i32>,
}

impl Host {
    fn start(&mut self, c: &mut Client<UnixStream>, handle: u32, p: ProcessSpec) {
        assert_eq!(
            c.call(Op::Create {
                handle,
                process: p.into()
            })
            .unwrap(),
            Outcome::Ok { pid: None }
        );
        let started = c.call(Op::Start { handle }).unwrap();
        assert!(
            matches!(started, Outcome::Ok { pid: Some(_) }),
            "{started:?}"
        );
    }

    fn pump(&mut self, c: &mut Client<UnixStream>) {
        match c.next_notice().unwrap() {
            Notice::Output(chunk) => self
                .out
                .entry((chunk.handle, chunk.stream as u8))
                .or_default()
                .extend_from_slice(&chunk.data),
            Notice::Event(Event::Exited { handle, status }) => {
                self.exits.insert(handle, status);
            }
            Notice::Event(Event::StdinTaken { .. }) => {}
        }
    }

    fn wait(&mut self, c: &mut Client<UnixStream>, handle: u32) -> i32 {
        while !self.exits.contains_key(&handle) {
            self.pump(c);
        }
        self.exits[&handle]
    }

    fn run(&mut self, c: &mut Client<UnixStream>, handle: u32, p: ProcessSpec) -> i32 {
        self.start(c, handle, p);
        self.wait(c, handle)
    }

    fn stderr(&self, handle: u32) -> String {
        let bytes = self.out.get(&(handle, StreamId::Stderr as u8));
        String::from_utf8_lossy(bytes.map_or(&[][..], |v| v)).into_owned()
    }

    fn stdout(&self, handle: u32) -> String {
        let bytes = self.out.get(&(handle, StreamId::Stdout as u8));
        String::from_utf8_lossy(bytes.map_or(&[][..], |v| v)).into_owned()
    }
}

/// Everything the container test checks, given a connected client.
fn exercise(c: &mut Client<UnixStream>, rootfs: &Path) {
    let mut h = Host::default();

    eprintln!("stage: process 1");
    assert_eq!(h.run(c, 1, sh("echo hello from the container")), 0);
    assert_eq!(h.stdout(1), "hello from the container\n");
    eprintln!("stage: process 2");
    assert_eq!(h.run(c, 2, sh("exit 1")), 1);
    eprintln!("stage: process 3");
    assert_eq!(h.run(c, 3, sh("kill -9 $$")), 137);

    // env, cwd, user, hostname; writes land in the shared rootfs.
    let mut p = sh("id -u; id -g; pwd; echo $FOO; hostname; echo made > /tmp/by-container");
    p.env.push("FOO=bar".into());
    p.cwd = "/tmp".into();
    (p.uid, p.gid) = (1000, 1001);
    eprintln!("stage: process 4");
    assert_eq!(h.run(c, 4, p), 0, "{}", h.stderr(4));
    assert_eq!(
        h.stdout(4),
        "1000\n1001\n/tmp\nbar\nbox\n",
        "{}",
        h.stderr(4)
    );
    assert_eq!(
        std::fs::read_to_string(rootfs.join("tmp/by-container")).unwrap(),
        "made\n"
    );

    // The rootfs is the process's `/` in its own mount namespace: the
    // agent's initramfs is not reachable, not even through `..`. Its
    // read-ahead window is the host's largest request.
    let probe = "test -e /init && echo agent-visible || echo agent-hidden; \
                     cd /; cd ../../..; pwd; ls /; grep -c rootfs /proc/self/mountinfo; \
                     awk '$5 == \"/\" {print $8}' /proc/self/mountinfo; \
                     cat /sys/class/bdi/$(awk '$5 == \"/\" {print $3}' /proc/self/mountinfo)/read_ahead_kb";
    eprintln!("stage: process 8");
    assert_eq!(h.run(c, 8, sh(probe)), 0, "{}", h.stderr(8));
    assert_eq!(
        h.stdout(8),
        "agent-hidden\n/\nbin\ndev\netc\nproc\nsys\ntmp\n1\nvirtiofs\n1024\n",
        "{}",
        h.stderr(8)
    );

    // stdin, then EOF.
    eprintln!("stage: process 5");
    h.start(c, 5, sh("cat; echo done"));
    c.send_stdin(5, b"piped in\n").unwrap();
    c.send_stdin(5, b"").unwrap();
    assert_eq!(h.wait(c, 5), 0);
    assert_eq!(h.stdout(5), "piped in\ndone\n");

    // SIGTERM reaches a process that handles it.
    eprintln!("stage: process 6");
    h.start(
        c,
        6,
        sh("trap 'echo term; exit 7' TERM; echo ready; while :; do sleep 0.1; done"),
    );
    while !h.stdout(6).contains("ready") {
        h.pump(c);
    }
    assert_eq!(
        c.call(Op::Signal {
            handle: 6,
            signal: 15
        })
        .unwrap(),
        Outcome::Ok { pid: None }
    );
    assert_eq!(h.wait(c, 6), 7);
    assert!(h.stdout(6).ends_with("term\n"));

    // 100 MiB of output arrives intact.
    eprintln!("stage: process 7");
    assert_eq!(
        h.run(c, 7, sh("yes 0123456789abcdef | head -c 104857600")),
        0
    );
    let out = &h.out[&(7, StreamId::Stdout as u8)];
    assert_eq!(out.len(), 100 << 20);
    assert!(out
        .chunks(17)
        .all(|l| l == b"0123456789abcdef\n" || l.len() < 17));

    // A process that ignores SIGTERM goes on until SIGKILL ends it.
    eprintln!("stage: process 9");
    h.start(
        c,
        9,
        sh("trap '' TERM; echo ready; while :; do sleep 0.2; echo tick; done"),
    );
    while !h.stdout(9).contains("ready") {
        h.pump(c);
    }
    let signal = |c: &mut Client<UnixStream>, signal| {
        assert_eq!(
            c.call(Op::Signal { handle: 9, signal }).unwrap(),
            Outcome::Ok { pid: None }
        );
    };
    signal(c, 15);
    let ticks = h.stdout(9).matches("tick").count();
    while h.stdout(9).matches("tick").count() < ticks + 3 {
        h.pump(c);
        assert!(
            !h.exits.contains_key(&9),
            "SIGTERM ended a process that ignores it"
        );
    }
    signal(c, 9);
    assert_eq!(h.wait(c, 9), 137);
}

/// The host configures the guest's NIC, route and DNS; the container sees
/// them and reaches the host.
fn exercise_network(c: &mut Client<UnixStream>, rootfs: &Path) {
    let mut h = Host::default();
    let network = NetworkConfig {
        interfaces: vec![InterfaceConfig {
            mac: AGENT_MAC.into(),
            address: Some("172.31.10.2/24".into()),
            ipv6: vec!["fd00:31:10::2/64".into()],
            mtu: Some(1400),
        }],
        routes: vec![
            RouteConfig {
                destination: "default".into(),
                gateway: Some("172.31.10.1".into()),
                mac: None,
            },
            RouteConfig {
                destination: "::/0".into(),
                gateway: Some("fd00:31:10::1".into()),
                mac: None,
            },
        ],
        dns: Some(DnsConfig {
            servers: vec!["172.31.10.1".into()],
            search: vec!["example.test".into()],
            options: vec![],
        }),
    };
    assert_eq!(
        c.call(Op::ConfigureNetwork {
            network: network.into()
        })
        .unwrap(),
        Outcome::Ok { pid: None }
    );
    let probe = "ip -4 addr show; ip route; cat /sys/class/net/eth0/mtu; \
                 ip -6 addr show dev eth0; ip -6 route; \
                 ping -c 1 -W 30 172.31.10.1 >/dev/null && echo ping-ok; \
                 ping -6 -c 1 -W 30 fd00:31:10::1 >/dev/null && echo ping6-ok";
    assert_eq!(h.run(c, 9, sh(probe)), 0, "{}", h.stderr(9));
    let out = h.stdout(9);
    assert!(out.contains("inet 172.31.10.2/24"), "{out}");
    assert!(out.contains("default via 172.31.10.1"), "{out}");
    assert!(out.contains("\n1400\n"), "{out}");
    assert!(out.contains("ping-ok"), "{out}");
    assert!(out.contains("inet6 fd00:31:10::2/64"), "{out}");
    assert!(!out.contains("tentative"), "{out}");
    assert!(out.contains("default via fd00:31:10::1"), "{out}");
    assert!(out.contains("ping6-ok"), "{out}");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/resolv.conf")).unwrap(),
        "nameserver 172.31.10.1\nsearch example.test\n"
    );
    // A bad request is an error reply and changes nothing.
    let bad = NetworkConfig {
        interfaces: vec![InterfaceConfig {
            mac: "02:00:00:00:99:99".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let Outcome::Error { message } = c
        .call(Op::ConfigureNetwork {
            network: bad.into(),
        })
        .unwrap()
    else {
        panic!("an unknown MAC was configured")
    };
    assert!(message.contains("02:00:00:00:99:99"), "{message}");
}

/// Boots the agent with a busybox rootfs over virtio-fs (and `extra` VMM
/// arguments), runs `checks` against it, then shuts it down; on a failure
/// the guest's output is shown.
fn with_agent(extra: &[String], checks: fn(&mut Client<UnixStream>, &Path)) {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs);
    let uds = dir.path().join("v.sock");
    let initrd = Initrd::agent();
    let mut cmd = vmm_command("vmlinux", &initrd);
    cmd.args(["--mem-mib", "256", "--boot-timeout", "900"])
        .args(["--cmdline", "quiet runvm.rootfs=rootfs runvm.hostname=box"])
        .args(["--vsock-cid", "3", "--vsock-uds"])
        .arg(&uds)
        .arg("--fs")
        .arg(format!("tag=rootfs,path={}", rootfs.display()))
        .args(extra);
    let guest = GuestProcess::spawn(cmd);
    let conn = match connect_vsock(&uds, AGENT_VSOCK_PORT, Duration::from_secs(300)) {
        Ok(c) => c,
        Err(e) => panic!("{e}\n{}", guest.finish(Duration::from_secs(5)).output),
    };
    // A stuck guest fails the test (with its console output) instead of
    // hanging it.
    conn.set_read_timeout(Some(Duration::from_secs(300)))
        .unwrap();
    let mut c = Client::new(conn);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| checks(&mut c, &rootfs)));
    if let Err(e) = result {
        eprintln!(
            "guest output:\n{}",
            guest.finish(Duration::from_secs(5)).output
        );
        std::panic::resume_unwind(e);
    }
    assert_eq!(c.call(Op::Shutdown).unwrap(), Outcome::Ok { pid: None });
    let run = guest.finish(Duration::from_secs(120));
    assert_eq!(run.status.and_then(|s| s.code()), Some(0), "{}", run.output);
    assert!(
        run.output.contains("RUNVM_AGENT_LISTENING"),
        "{}",
        run.output
    );
}

kvm_test!(
    fn the_agent_runs_container_processes_in_a_virtio_fs_rootfs() {
        with_agent(&[], exercise);
    }
);

kvm_test!(
    fn the_agent_configures_the_guest_network() {
        // Its own VM: the container workload above stays off the NIC.
        let _tap = HostTap::create("rvmagent0", "172.31.10.1/24");
        runvm_tests::netns::ip(&[
            "addr",
            "add",
            "fd00:31:10::1/64",
            "dev",
            "rvmagent0",
            "nodad",
        ]);
        with_agent(
            &["--net".into(), format!("tap=rvmagent0,mac={AGENT_MAC}")],
            exercise_network,
        );
    }
);
