//! The agent core on the host: `runvm-agent --serve-unix` in a child process,
//! driven over its socket exactly as the runtime will drive it over vsock.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use runvm_protocol::{
    encode_frame, encode_json, read_frame, Event, FrameKind, Op, Outcome, ProcessSpec, Request,
    Response, StreamChunk, StreamId,
};

struct Agent {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_runvm-agent"))
        .arg("--serve-unix")
        .arg(&sock)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "agent socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    Agent {
        child,
        sock,
        _dir: dir,
    }
}

#[derive(Default)]
struct Client {
    conn: Option<UnixStream>,
    seq: u64,
    out: HashMap<(u32, u8), Vec<u8>>,
    exits: HashMap<u32, i32>,
    /// Stdin chunks the agent reported taken, by handle.
    taken: HashMap<u32, usize>,
}

impl Client {
    fn connect(agent: &Agent) -> Self {
        // The socket file appears at bind(), a moment before listen().
        let deadline = Instant::now() + Duration::from_secs(10);
        let conn = loop {
            match UnixStream::connect(&agent.sock) {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("cannot connect to the agent: {e}"),
            }
        };
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        Client {
            conn: Some(conn),
            ..Default::default()
        }
    }

    fn conn(&mut self) -> &mut UnixStream {
        self.conn.as_mut().unwrap()
    }

    /// Reads one frame, stashing output and exits; returns responses.
    fn next(&mut self) -> Option<Response> {
        let (h, payload) = read_frame(self.conn()).unwrap().expect("agent hung up");
        match h.kind {
            FrameKind::Response => return Some(serde_json::from_slice(&payload).unwrap()),
            FrameKind::Stream => {
                let c = StreamChunk::decode(&payload).unwrap();
                self.out
                    .entry((c.handle, c.stream as u8))
                    .or_default()
                    .extend_from_slice(&c.data);
            }
            FrameKind::Event => match serde_json::from_slice(&payload).unwrap() {
                Event::Exited { handle, status } => {
                    self.exits.insert(handle, status);
                }
                Event::StdinTaken { handle } => *self.taken.entry(handle).or_default() += 1,
            },
            k => panic!("unexpected frame {k:?}"),
        }
        None
    }

    /// Reads frames until the next response.
    fn response(&mut self) -> Response {
        loop {
            if let Some(r) = self.next() {
                return r;
            }
        }
    }

    fn call(&mut self, op: Op) -> Outcome {
        self.seq += 1;
        let seq = self.seq;
        let frame = encode_json(FrameKind::Request, &Request { seq, op }).unwrap();
        self.conn().write_all(&frame).unwrap();
        let r = self.response();
        assert_eq!(r.seq, seq);
        r.result
    }

    /// Creates and starts a process.
    fn spawn(&mut self, handle: u32, process: ProcessSpec) {
        assert_eq!(
            self.call(Op::Create {
                handle,
                process: process.into()
            }),
            Outcome::Ok { pid: None }
        );
        let Outcome::Ok { pid: Some(_) } = self.call(Op::Start { handle }) else {
            panic!("start failed")
        };
    }

    fn run(&mut self, handle: u32, process: ProcessSpec) -> i32 {
        self.spawn(handle, process);
        self.wait(handle)
    }

    fn wait(&mut self, handle: u32) -> i32 {
        while !self.exits.contains_key(&handle) {
            self.next();
        }
        self.exits[&handle]
    }

    fn output(&self, handle: u32, stream: StreamId) -> String {
        String::from_utf8_lossy(self.out.get(&(handle, stream as u8)).map_or(&[][..], |v| v))
            .into_owned()
    }

    fn stdin(&mut self, handle: u32, data: &[u8]) {
        let c = StreamChunk {
            handle,
            stream: StreamId::Stdin,
            data: data.to_vec(),
        };
        let frame = c.encode().unwrap();
        self.conn().write_all(&frame).unwrap();
    }
}

fn sh(script: &str) -> ProcessSpec {
    ProcessSpec {
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/usr/bin:/bin".into()],
        cwd: "/".into(),
        uid: current_uid(),
        gid: current_gid(),
        terminal: false,
        ..Default::default()
    }
}

fn current_uid() -> u32 {
    status_field("Uid:")
}

fn current_gid() -> u32 {
    status_field("Gid:")
}

fn status_field(name: &str) -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn output_and_exit_codes_arrive() {
    let a = agent();
    let mut c = Client::connect(&a);
    assert_eq!(c.run(1, sh("echo out; echo err >&2; exit 3")), 3);
    assert_eq!(c.output(1, StreamId::Stdout), "out\n");
    assert_eq!(c.output(1, StreamId::Stderr), "err\n");
    assert_eq!(c.run(2, sh("true")), 0);
    assert_eq!(c.run(3, sh("exit 1")), 1);
    assert_eq!(c.run(4, sh("kill -9 $$")), 137);
}

#[test]
fn env_and_cwd_apply() {
    let a = agent();
    let mut c = Client::connect(&a);
    let mut p = sh("echo \"$GREETING\"; pwd");
    p.env.push("GREETING=hello there".into());
    p.cwd = "/usr".into();
    assert_eq!(c.run(1, p), 0);
    assert_eq!(c.output(1, StreamId::Stdout), "hello there\n/usr\n");
}

#[test]
fn stdin_is_relayed_and_eof_reaches_the_process() {
    let a = agent();
    let mut c = Client::connect(&a);
    c.spawn(1, sh("cat; echo done"));
    c.stdin(1, b"line one\n");
    c.stdin(1, b"line two\n");
    c.stdin(1, b"");
    assert_eq!(c.wait(1), 0);
    assert_eq!(c.output(1, StreamId::Stdout), "line one\nline two\ndone\n");

    c.spawn(2, sh("wc -c"));
    c.stdin(2, b"12345");
    assert_eq!(
        c.call(Op::CloseStdin { handle: 2 }),
        Outcome::Ok { pid: None }
    );
    assert_eq!(c.wait(2), 0);
    assert_eq!(c.output(2, StreamId::Stdout).trim(), "5");
    // Every chunk with data was reported taken (before the exit, which
    // waits for the output the input made).
    assert_eq!(c.taken.get(&1), Some(&2));
    assert_eq!(c.taken.get(&2), Some(&1));
}

#[test]
fn a_process_that_does_not_read_its_stdin_holds_up_nothing_else() {
    let a = agent();
    let mut c = Client::connect(&a);
    c.spawn(1, sh("exec sleep 100"));
    // Far more than a pipe holds, sent without waiting for the agent to
    // report the chunks taken (as a careless host would).
    let chunk = vec![b'x'; 64 * 1024];
    for _ in 0..32 {
        c.stdin(1, &chunk);
    }
    // The agent still answers, and runs and relays other processes.
    assert_eq!(c.call(Op::Ping), Outcome::Ok { pid: None });
    assert_eq!(c.run(2, sh("echo still here")), 0);
    assert_eq!(c.output(2, StreamId::Stdout), "still here\n");
    // Input for a process that is gone, or never was, is reported taken
    // at once: a host that waits for that never waits forever.
    c.stdin(2, b"too late");
    c.stdin(9, b"nobody");
    while !c.taken.contains_key(&2) || !c.taken.contains_key(&9) {
        c.next();
    }
    assert_eq!(
        c.call(Op::Signal {
            handle: 1,
            signal: libc::SIGKILL
        }),
        Outcome::Ok { pid: None }
    );
    assert_eq!(c.wait(1), 137);
}

#[test]
fn signals_reach_the_process() {
    let a = agent();
    let mut c = Client::connect(&a);
    c.spawn(1, sh("exec sleep 100"));
    assert_eq!(
        c.call(Op::Signal {
            handle: 1,
            signal: 15
        }),
        Outcome::Ok { pid: None }
    );
    assert_eq!(c.wait(1), 143);
    // One that ignores SIGTERM still dies of SIGKILL.
    c.spawn(
        2,
        sh("trap '' TERM; echo armed; while true; do sleep 1; done"),
    );
    while !c.output(2, StreamId::Stdout).contains("armed") {
        c.next();
    }
    c.call(Op::Signal {
        handle: 2,
        signal: 15,
    });
    c.call(Op::Signal {
        handle: 2,
        signal: 9,
    });
    assert_eq!(c.wait(2), 137);
}

#[test]
fn large_output_arrives_intact_and_in_order() {
    let a = agent();
    let mut c = Client::connect(&a);
    let t = Instant::now();
    assert_eq!(c.run(1, sh("seq 1 2000000")), 0);
    eprintln!("relayed in {:?}", t.elapsed());
    let out = c.output(1, StreamId::Stdout);
    let expected: String = (1..=2_000_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(out.len(), expected.len());
    assert!(out == expected, "output differs");
}

#[test]
fn bad_requests_get_errors_and_the_agent_keeps_serving() {
    let a = agent();
    let mut c = Client::connect(&a);
    let is_err = |o: &Outcome| matches!(o, Outcome::Error { .. });
    assert!(is_err(&c.call(Op::Start { handle: 9 })));
    assert!(is_err(&c.call(Op::Signal {
        handle: 9,
        signal: 15
    })));
    let mut empty = sh("true");
    empty.args.clear();
    assert!(is_err(&c.call(Op::Create {
        handle: 1,
        process: empty.into()
    })));
    c.call(Op::Create {
        handle: 2,
        process: sh("true").into(),
    });
    assert!(is_err(&c.call(Op::Create {
        handle: 2,
        process: sh("true").into()
    })));
    // A program that is not there fails `create` (as under runc), and
    // there is then nothing to start.
    let mut missing = sh("true");
    missing.args = vec!["/nonexistent/binary".into()];
    let Outcome::Error { message } = c.call(Op::Create {
        handle: 3,
        process: missing.into(),
    }) else {
        panic!("a missing program was created");
    };
    assert!(
        message.contains("stat /nonexistent/binary: no such file or directory"),
        "{message}"
    );
    assert!(is_err(&c.call(Op::Start { handle: 3 })));
    // A setup step that fails is named, as runc names it.
    let mut lost = sh("true");
    lost.cwd = "/no/such/dir".into();
    let Outcome::Error { message } = c.call(Op::Create {
        handle: 4,
        process: lost.into(),
    }) else {
        panic!("a missing working directory was created");
    };
    assert!(
        message.contains("chdir to cwd (\"/no/such/dir\") set in config.json failed"),
        "{message}"
    );

    // Malformed JSON and unknown operations in well-formed frames.
    // An unknown operation (or field: a host newer than this agent) is
    // answered under its own seq, so the host's call fails, not waits.
    for (payload, seq) in [
        (&b"{not json"[..], 0),
        (br#"{"seq":5,"op":"format_disk"}"#, 5),
        (
            br#"{"seq":6,"op":"create","handle":9,"process":{"args":["true"],"from_the_future":1}}"#,
            6,
        ),
    ] {
        let frame = encode_frame(FrameKind::Request, payload).unwrap();
        c.conn().write_all(&frame).unwrap();
        let r = c.response();
        assert!(is_err(&r.result), "{r:?}");
        assert_eq!(r.seq, seq, "{r:?}");
    }
    assert_eq!(c.call(Op::Ping), Outcome::Ok { pid: None });

    // A frame announcing 4 GiB ends this connection, not the agent.
    let mut huge = encode_frame(FrameKind::Request, b"").unwrap();
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    c.conn().write_all(&huge).unwrap();
    let r = c.response();
    assert!(is_err(&r.result));
    assert!(read_frame(c.conn()).unwrap().is_none(), "connection closed");
    let mut again = Client::connect(&a);
    assert_eq!(again.call(Op::Ping), Outcome::Ok { pid: None });
}

#[test]
fn output_produced_while_the_host_is_away_reaches_the_next_connection() {
    let a = agent();
    let mut c = Client::connect(&a);
    c.spawn(1, sh("sleep 1; echo late; echo err >&2; exit 4"));
    drop(c);
    let mut c = Client::connect(&a);
    assert_eq!(c.wait(1), 4);
    assert_eq!(c.output(1, StreamId::Stdout), "late\n");
    assert_eq!(c.output(1, StreamId::Stderr), "err\n");
    // The ended process takes no more signals: its PID may be reused.
    let Outcome::Error { message } = c.call(Op::Signal {
        handle: 1,
        signal: 15,
    }) else {
        panic!("signal to an exited process succeeded")
    };
    assert!(message.contains("no running process"), "{message}");
}

#[test]
fn orphans_are_reaped_and_do_not_disturb_exit_statuses() {
    let a = agent();
    let mut c = Client::connect(&a);
    // The shell leaves a background child behind and exits first.
    assert_eq!(c.run(1, sh("sleep 0.2 & exit 5")), 5);
    assert_eq!(c.run(2, sh("exit 6")), 6);
}

#[test]
fn shutdown_is_answered_then_ends_the_agent() {
    let mut a = agent();
    let mut c = Client::connect(&a);
    assert_eq!(c.call(Op::Shutdown), Outcome::Ok { pid: None });
    let status = a.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// `Name:\tvalue` lines of a process's /proc status, as the process saw them.
fn status_lines(out: &str) -> HashMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn user_groups_umask_rlimits_capabilities_and_no_new_privs_apply() {
    if current_uid() != 0 {
        panic!("this test needs root (it switches users and drops capabilities)");
    }
    let a = agent();
    let mut c = Client::connect(&a);
    let mut p = sh("grep -E '^(Uid|Gid|Groups|Umask|NoNewPrivs|Cap(Inh|Prm|Eff|Bnd|Amb)):' /proc/self/status; \
         grep 'Max open files' /proc/self/limits | tr -s ' ' | sed 's/Max open files/Nofile:/'; \
         echo Oom: $(cat /proc/self/oom_score_adj)");
    // Raised (lowering takes CAP_SYS_RESOURCE, which this machine's
    // root may lack; in the guest the agent has it).
    p.oom_score_adj = Some(17);
    p.uid = 1000;
    p.gid = 1001;
    p.additional_gids = vec![10, 20];
    p.umask = Some(0o027);
    p.rlimits = vec![runvm_protocol::Rlimit {
        kind: "RLIMIT_NOFILE".into(),
        soft: 123,
        hard: 456,
    }];
    p.no_new_privileges = true;
    let bind = vec!["CAP_NET_BIND_SERVICE".to_owned()];
    p.capabilities = Some(runvm_protocol::Capabilities {
        bounding: vec![
            "CAP_CHOWN".into(),
            "CAP_KILL".into(),
            "CAP_NET_BIND_SERVICE".into(),
        ],
        effective: bind.clone(),
        permitted: bind.clone(),
        inheritable: bind.clone(),
        ambient: bind,
    });
    assert_eq!(c.run(1, p), 0, "{}", c.output(1, StreamId::Stderr));
    let st = status_lines(&c.output(1, StreamId::Stdout));
    let first = |k: &str| st[k].split_whitespace().next().unwrap().to_owned();
    assert_eq!(first("Uid"), "1000", "{st:?}");
    assert_eq!(first("Gid"), "1001", "{st:?}");
    assert_eq!(st["Groups"], "10 20", "{st:?}");
    assert_eq!(st["Umask"], "0027", "{st:?}");
    assert_eq!(st["NoNewPrivs"], "1", "{st:?}");
    // CAP_CHOWN is bit 0, CAP_KILL bit 5, CAP_NET_BIND_SERVICE bit 10;
    // grep, an unprivileged exec, keeps exactly the ambient set.
    assert_eq!(st["CapBnd"], "0000000000000421", "{st:?}");
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(st[set], "0000000000000400", "{set}: {st:?}");
    }
    assert_eq!(st["Nofile"], "123 456 files", "{st:?}");
    assert_eq!(st["Oom"], "17", "{st:?}");

    // Without a capabilities object root keeps its full set.
    assert_eq!(c.run(2, sh("grep CapEff /proc/self/status")), 0);
    assert_ne!(
        c.output(2, StreamId::Stdout).trim(),
        "CapEff:\t0000000000000000"
    );

    // `runc spec`'s default: ambient capabilities but no inheritable set.
    // The kernel cannot raise those; as runc, the process starts without.
    let mut p = sh("grep -E '^Cap(Eff|Amb)' /proc/self/status");
    let three = vec![
        "CAP_AUDIT_WRITE".to_owned(),
        "CAP_KILL".into(),
        "CAP_NET_BIND_SERVICE".into(),
    ];
    p.capabilities = Some(runvm_protocol::Capabilities {
        bounding: three.clone(),
        effective: three.clone(),
        permitted: three.clone(),
        inheritable: Vec::new(),
        ambient: three,
    });
    assert_eq!(c.run(3, p), 0, "{}", c.output(3, StreamId::Stderr));
    let st = status_lines(&c.output(3, StreamId::Stdout));
    // CAP_KILL bit 5, CAP_NET_BIND_SERVICE bit 10, CAP_AUDIT_WRITE bit 29.
    assert_eq!(st["CapEff"], "0000000020000420", "{st:?}");
    assert_eq!(st["CapAmb"], "0000000000000000", "{st:?}");
}

#[test]
fn unknown_capabilities_and_rlimits_are_refused_at_create() {
    let a = agent();
    let mut c = Client::connect(&a);
    let mut p = sh("true");
    p.capabilities = Some(runvm_protocol::Capabilities {
        bounding: vec!["CAP_TELEPORT".into()],
        ..Default::default()
    });
    let Outcome::Error { message } = c.call(Op::Create {
        handle: 1,
        process: p.into(),
    }) else {
        panic!("an unknown capability was created")
    };
    assert!(message.contains("CAP_TELEPORT"), "{message}");
    let mut p = sh("true");
    p.rlimits = vec![runvm_protocol::Rlimit {
        kind: "RLIMIT_NOFILE".into(),
        soft: 10,
        hard: 5,
    }];
    let Outcome::Error { message } = c.call(Op::Create {
        handle: 2,
        process: p.into(),
    }) else {
        panic!("a soft limit above the hard one was created")
    };
    assert!(message.contains("above hard"), "{message}");
    // The agent still serves.
    assert_eq!(c.run(3, sh("exit 4")), 4);
}

#[test]
fn network_configuration_is_refused_outside_the_guest() {
    let a = agent();
    let mut c = Client::connect(&a);
    let Outcome::Error { message } = c.call(Op::ConfigureNetwork {
        network: Box::default(),
    }) else {
        panic!("a host-side agent touched the network")
    };
    assert!(message.contains("guest's init"), "{message}");
}

#[test]
fn resource_limits_are_refused_without_a_container_cgroup() {
    let a = agent();
    let mut c = Client::connect(&a);
    let Outcome::Error { message } = c.call(Op::UpdateResources {
        resources: runvm_protocol::Resources {
            pids_max: Some(10),
            ..Default::default()
        },
    }) else {
        panic!("a host-side agent claimed to set limits")
    };
    assert!(message.contains("guest's init"), "{message}");
    // Processes still start (in the agent's own cgroup).
    assert_eq!(c.run(1, sh("exit 3")), 3);
}

#[test]
fn a_terminal_session_runs_interactively_and_follows_resizes() {
    let a = agent();
    let mut c = Client::connect(&a);
    let mut p = sh(
        "tty; stty size; echo ready; read line; echo got:$line; stty size; \
                    test -t 0 && test -t 1 && test -t 2 && echo all-ttys; exit 5",
    );
    p.terminal = true;
    p.console_size = Some(runvm_protocol::ConsoleSize {
        height: 30,
        width: 100,
    });
    c.spawn(1, p);
    while !c.output(1, StreamId::Stdout).contains("ready") {
        c.next();
    }
    assert_eq!(
        c.call(Op::ResizeTerminal {
            handle: 1,
            size: runvm_protocol::ConsoleSize {
                height: 50,
                width: 132
            }
        }),
        Outcome::Ok { pid: None }
    );
    c.stdin(1, b"hello\n");
    assert_eq!(c.wait(1), 5);
    let out = c.output(1, StreamId::Stdout).replace("\r\n", "\n");
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("30 100\n"), "{out}");
    assert!(out.contains("got:hello\n"), "{out}");
    assert!(out.contains("50 132\n"), "{out}");
    assert!(out.contains("all-ttys"), "{out}");
    assert_eq!(
        c.output(1, StreamId::Stderr),
        "",
        "one stream on a terminal"
    );

    // EOF on a terminal: cat ends on ^D.
    let mut p = sh("cat; echo after-eof");
    p.terminal = true;
    c.spawn(2, p);
    c.stdin(2, b"line\n");
    c.stdin(2, b"");
    assert_eq!(c.wait(2), 0);
    assert!(c.output(2, StreamId::Stdout).contains("after-eof"));

    // Resizing a process without a terminal is an error.
    c.spawn(3, sh("sleep 5"));
    assert!(matches!(
        c.call(Op::ResizeTerminal {
            handle: 3,
            size: runvm_protocol::ConsoleSize::default()
        }),
        Outcome::Error { .. }
    ));
    assert_eq!(
        c.call(Op::Signal {
            handle: 3,
            signal: 9
        }),
        Outcome::Ok { pid: None }
    );
    assert_eq!(c.wait(3), 137);
}

#[test]
fn processes_and_stats_describe_what_the_host_started() {
    let a = agent();
    let mut c = Client::connect(&a);
    c.spawn(1, sh("sleep 100 & echo started; wait"));
    while !c.output(1, StreamId::Stdout).contains("started") {
        c.next();
    }
    let Outcome::Processes { processes } = c.call(Op::ListProcesses) else {
        panic!("no process list");
    };
    // The shell and its child, nothing of the agent's own.
    let cmds: Vec<&str> = processes.iter().map(|p| p.cmd.as_str()).collect();
    assert!(
        cmds.iter().any(|c| c.contains("sh -c sleep 100")),
        "{cmds:?}"
    );
    assert!(cmds.contains(&"sleep 100"), "{cmds:?}");
    assert!(!cmds.iter().any(|c| c.contains("runvm-agent")), "{cmds:?}");
    let shell = processes.iter().find(|p| p.cmd.contains("sh -c")).unwrap();
    let sleep = processes.iter().find(|p| p.cmd == "sleep 100").unwrap();
    assert_eq!(sleep.ppid, shell.pid);
    assert_eq!(sleep.uid, current_uid());

    let Outcome::Stats { stats } = c.call(Op::Stats) else {
        panic!("no stats");
    };
    assert_eq!(stats.pids, processes.len() as u64);
    assert!(stats.memory_total >= stats.memory_used && stats.memory_used > 0);
    assert!(!stats.cpu_percpu_ns.is_empty());

    // The orphan-to-be first, so nothing outlives the test.
    // SAFETY: kill takes plain integers.
    unsafe { libc::kill(sleep.pid, libc::SIGKILL) };
    assert_eq!(c.wait(1), 0);
}

#[test]
fn a_created_process_is_set_up_and_waits_for_start() {
    let a = agent();
    let mut c = Client::connect(&a);
    let dir = tempfile::tempdir().unwrap();
    let mark = dir.path().join("ran");
    let script = format!("touch {}; read l; echo got $l", mark.display());
    assert_eq!(
        c.call(Op::Create {
            handle: 1,
            process: sh(&script).into(),
        }),
        Outcome::Ok { pid: None }
    );
    // Input given before the start is read after it.
    c.stdin(1, b"early\n");
    // The process is there (runc's created init), its program is not.
    let Outcome::Processes { processes } = c.call(Op::ListProcesses) else {
        panic!("no process list");
    };
    assert_eq!(processes.len(), 1, "{processes:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!mark.exists(), "the program ran before start");
    assert!(c.output(1, StreamId::Stdout).is_empty());
    let Outcome::Ok { pid: Some(pid) } = c.call(Op::Start { handle: 1 }) else {
        panic!("start failed");
    };
    assert_eq!(pid, processes[0].pid);
    assert_eq!(c.wait(1), 0);
    assert_eq!(c.output(1, StreamId::Stdout), "got early\n");
    assert!(mark.exists());
    assert!(c.call(Op::Start { handle: 1 }) != Outcome::Ok { pid: Some(pid) });

    // Killed while created: it ends and cannot be started.
    c.call(Op::Create {
        handle: 2,
        process: sh("echo never").into(),
    });
    assert_eq!(
        c.call(Op::Signal {
            handle: 2,
            signal: libc::SIGKILL
        }),
        Outcome::Ok { pid: None }
    );
    assert_eq!(c.wait(2), 137);
    let Outcome::Error { message } = c.call(Op::Start { handle: 2 }) else {
        panic!("a killed process started");
    };
    assert!(message.contains("ended before it started"), "{message}");
    assert!(c.output(2, StreamId::Stdout).is_empty());
}

#[test]
fn programs_that_cannot_start_never_bring_the_agent_down() {
    // Each failed exec is waited by the spawner while the reaper runs
    // beside it; other children end meanwhile to keep the reaper busy.
    let a = agent();
    let mut c = Client::connect(&a);
    c.spawn(1, sh("for i in $(seq 200); do true & done; wait"));
    for handle in 2..60 {
        let mut p = sh("true");
        p.args = vec!["/no/such/program".into()];
        let Outcome::Error { message } = c.call(Op::Create {
            handle,
            process: p.into(),
        }) else {
            panic!("a missing program was created");
        };
        assert!(message.contains("/no/such/program"), "{message}");
    }
    // A program found at create whose exec fails at start (not a format
    // the kernel runs): the start fails and the process ends with 127.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk");
    std::fs::write(&junk, "\x00\x01not a program").unwrap();
    std::fs::set_permissions(&junk, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut p = sh("true");
    p.args = vec![junk.to_string_lossy().into_owned()];
    assert_eq!(
        c.call(Op::Create {
            handle: 60,
            process: p.into(),
        }),
        Outcome::Ok { pid: None }
    );
    let Outcome::Error { message } = c.call(Op::Start { handle: 60 }) else {
        panic!("junk started");
    };
    assert!(message.contains("Exec format error"), "{message}");
    assert_eq!(c.wait(60), 127);
    assert_eq!(c.wait(1), 0);
    assert_eq!(c.run(100, sh("exit 6")), 6);
}

#[test]
fn the_seccomp_profile_binds_the_process_with_and_without_no_new_privs() {
    use runvm_protocol::{Seccomp, SeccompArg, SeccompRule};
    if current_uid() != 0 {
        panic!("this test needs root (a filter without no_new_privs takes CAP_SYS_ADMIN)");
    }
    let a = agent();
    let mut c = Client::connect(&a);
    let dir = tempfile::tempdir().unwrap();
    let profile = Seccomp {
        default_action: "SCMP_ACT_ALLOW".into(),
        syscalls: vec![
            SeccompRule {
                names: vec!["mkdir".into(), "mkdirat".into()],
                action: "SCMP_ACT_ERRNO".into(),
                errno: Some(libc::EACCES as u32),
                args: vec![],
            },
            // kill(_, SIGUSR1) only.
            SeccompRule {
                names: vec!["kill".into()],
                action: "SCMP_ACT_ERRNO".into(),
                errno: None,
                args: vec![SeccompArg {
                    index: 1,
                    value: libc::SIGUSR1 as u64,
                    value_two: 0,
                    op: "SCMP_CMP_EQ".into(),
                }],
            },
        ],
        ..Seccomp::default()
    };
    let script = format!(
        "grep Seccomp: /proc/self/status; mkdir {0}/x || echo mkdir-refused; \
         kill -USR1 $$ || echo usr1-refused; kill -0 $$ && echo kill0-ok; \
         test -d {0}/x || echo no-dir",
        dir.path().display()
    );
    for (handle, no_new_privs) in [(1, false), (2, true)] {
        let mut p = sh(&script);
        p.seccomp = Some(profile.clone());
        p.no_new_privileges = no_new_privs;
        assert_eq!(
            c.run(handle, p),
            0,
            "{}",
            c.output(handle, StreamId::Stderr)
        );
        let out = c.output(handle, StreamId::Stdout);
        assert_eq!(
            out, "Seccomp:\t2\nmkdir-refused\nusr1-refused\nkill0-ok\nno-dir\n",
            "no_new_privs {no_new_privs}"
        );
        let err = c.output(handle, StreamId::Stderr);
        assert!(err.contains("Permission denied"), "{err}");
        assert!(err.contains("Operation not permitted"), "{err}");
    }

    // A profile runvm cannot honour is refused when the process is created.
    let mut p = sh("true");
    p.seccomp = Some(Seccomp {
        default_action: "SCMP_ACT_NOTIFY".into(),
        ..Seccomp::default()
    });
    let Outcome::Error { message } = c.call(Op::Create {
        handle: 3,
        process: p.into(),
    }) else {
        panic!("a notify profile was created")
    };
    assert!(message.contains("SCMP_ACT_NOTIFY"), "{message}");
    assert_eq!(c.run(4, sh("exit 4")), 4);
}
