//! Serves host connections: creates and starts processes, relays their
//! stdio as stream frames, forwards signals and reports exits.
//!
//! The connection is a byte stream carrying frames. A frame that is well
//! formed but holds a bad message gets an error response and the connection
//! goes on; a broken frame (bad magic, version or size) desynchronizes the
//! stream, so the agent answers once and ends that connection only.
//!
//! Processes outlive connections: when the host reconnects, output and exit
//! events produced meanwhile (held, not dropped) go to the new connection.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use runvm_protocol::{
    encode_json, read_frame, Event, FrameError, FrameKind, GuestProcess, Op, Outcome, ProcessSpec,
    Request, Response, StreamChunk, StreamId,
};

use crate::cgroup::ContainerCgroup;
use crate::child_setup::ChildSetup;
use crate::held::{ChildStdio, Held, Program};
use crate::mount_ns::MountNs;
use crate::namespaces::{ContainerNs, ForkInto};
use crate::network::NetSys;
use crate::reaper::Reaper;
use crate::stdin_feed::StdinFeed;
use crate::sysctl::Sysctls;

/// Where frames go: the current connection, if there is one. Senders wait
/// for a connection rather than drop what they have.
#[derive(Default)]
struct Outbox {
    conn: Mutex<Option<Box<dyn Write + Send>>>,
    attached: Condvar,
}

impl Outbox {
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match conn.as_mut() {
                Some(w) => {
                    let r = w.write_all(frame).and_then(|()| w.flush());
                    if r.is_err() {
                        *conn = None;
                    }
                    return r;
                }
                None => {
                    conn = self.attached.wait(conn).unwrap_or_else(|p| p.into_inner());
                }
            }
        }
    }

    /// Sends `frame`, on the next connection if the current one fails.
    fn deliver(&self, frame: &[u8]) {
        while self.send(frame).is_err() {}
    }

    fn attach(&self, w: Box<dyn Write + Send>) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(w);
        self.attached.notify_all();
    }

    fn detach(&self) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// A process the host created.
struct Proc {
    pid: i32,
    /// Until start: the process, set up and waiting to exec.
    held: Option<Held>,
    stdin: Option<StdinFeed>,
    /// The terminal's master side, for resizes; `None` with pipes.
    tty: Option<OwnedFd>,
    /// It ended (or never will run): its PID may be another's by now.
    exited: bool,
}

impl Proc {
    /// Its PID while it is there to take a signal (created or running).
    fn live_pid(&self) -> Option<i32> {
        (!self.exited).then_some(self.pid)
    }
}

fn error(message: impl Into<String>) -> Outcome {
    Outcome::Error {
        message: message.into(),
    }
}

/// What the agent does on [`Op::Shutdown`], after answering it.
pub type ShutdownHook = Box<dyn Fn() + Send + Sync>;

/// The agent's state, shared by every connection.
pub struct Agent {
    procs: Arc<Mutex<HashMap<u32, Proc>>>,
    out: Arc<Outbox>,
    reaper: Arc<Reaper>,
    rootfs: Option<MountNs>,
    on_shutdown: ShutdownHook,
    network: Option<Box<dyn NetSys + Send + Sync>>,
    figures: Option<crate::figures::BootFigures>,
    cgroup: Option<ContainerCgroup>,
    /// The namespaces the container's init made (at its create), which
    /// execs join.
    container_ns: Mutex<Option<ContainerNs>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("rootfs", &self.rootfs)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent whose processes join the container mount namespace `rootfs`
    /// (or run in the agent's own root).
    pub fn new(reaper: Arc<Reaper>, rootfs: Option<MountNs>, on_shutdown: ShutdownHook) -> Self {
        Agent {
            procs: Arc::default(),
            out: Arc::new(Outbox::default()),
            reaper,
            rootfs,
            on_shutdown,
            network: None,
            figures: None,
            cgroup: None,
            container_ns: Mutex::new(None),
        }
    }

    /// Reports, on stderr when the first process starts, how long that took
    /// from the agent's own start and what the agent occupies.
    pub fn with_boot_figures(mut self, f: crate::figures::BootFigures) -> Self {
        self.figures = Some(f);
        self
    }

    /// Puts every process in `cgroup` and lets the host set its limits
    /// (only the agent as the guest's init has one).
    pub fn with_cgroup(mut self, cgroup: ContainerCgroup) -> Self {
        self.cgroup = Some(cgroup);
        self
    }

    /// Lets the host configure the guest's network through `net` (only the
    /// agent as the guest's init does; elsewhere the request is refused).
    pub fn with_network(mut self, net: Box<dyn NetSys + Send + Sync>) -> Self {
        self.network = Some(net);
        self
    }

    fn respond(&self, seq: u64, result: Outcome) -> io::Result<()> {
        let frame = encode_json(FrameKind::Response, &Response { seq, result })
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.out.send(&frame)
    }

    /// Serves one connection until the host hangs up.
    pub fn serve(&self, mut conn: impl Read, out: impl Write + Send + 'static) -> io::Result<()> {
        self.out.attach(Box::new(out));
        let result = self.serve_frames(&mut conn);
        self.out.detach();
        result
    }

    fn serve_frames(&self, conn: &mut impl Read) -> io::Result<()> {
        loop {
            let (header, payload) = match read_frame(conn) {
                Ok(Some(frame)) => frame,
                Ok(None) => return Ok(()),
                Err(FrameError::Io(e)) => return Err(e),
                Err(e) => {
                    let _ = self.respond(0, error(format!("{e}; closing the connection")));
                    return Ok(());
                }
            };
            match header.kind {
                FrameKind::Request => match serde_json::from_slice::<Request>(&payload) {
                    Ok(Request {
                        seq,
                        op: Op::Shutdown,
                    }) => {
                        self.respond(seq, Outcome::Ok { pid: None })?;
                        (self.on_shutdown)();
                    }
                    Ok(req) => {
                        let outcome = self.handle(req.op);
                        self.respond(req.seq, outcome)?;
                    }
                    // Answer under the request's own seq where it has one,
                    // so the host's call fails rather than waits.
                    Err(e) => self.respond(
                        request_seq(&payload),
                        error(format!("malformed request: {e}")),
                    )?,
                },
                FrameKind::Stream => match StreamChunk::decode(&payload) {
                    Ok(chunk) if chunk.stream == StreamId::Stdin => self.stdin(chunk)?,
                    _ => self.respond(0, error("malformed or non-stdin stream chunk"))?,
                },
                other => self.respond(0, error(format!("unexpected {other:?} frame")))?,
            }
        }
    }

    fn procs(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Proc>> {
        // A poisoned lock only means a panicking thread held it; the map
        // itself is always consistent.
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands a stdin chunk to the process's feed, never waiting for the
    /// process to read it. A chunk no feed takes (the input was closed, the
    /// process is gone) is reported taken at once, so the host never waits
    /// for it.
    fn stdin(&self, chunk: StreamChunk) -> io::Result<()> {
        let handle = chunk.handle;
        if let Some(Proc {
            stdin: Some(feed),
            exited: false,
            ..
        }) = self.procs().get_mut(&handle)
        {
            if chunk.data.is_empty() {
                feed.close();
                return Ok(());
            }
            if feed.write(chunk.data) {
                return Ok(());
            }
        }
        match encode_json(FrameKind::Event, &Event::StdinTaken { handle }) {
            Ok(frame) => self.out.send(&frame),
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }

    fn handle(&self, op: Op) -> Outcome {
        let requested = crate::figures::boottime_ms();
        let mut procs = self.procs();
        match op {
            Op::Ping | Op::Shutdown => Outcome::Ok { pid: None },
            // The guest's init takes it on a template's first connection,
            // before this agent exists.
            Op::Setup { .. } => error(
                "the guest is already set up (only a guest restored from a template takes setup)",
            ),
            Op::ListProcesses => Outcome::Processes {
                processes: self.container_processes(&procs),
            },
            Op::Stats => {
                let pids = self.container_processes(&procs).len() as u64;
                match crate::procfs::stats(Path::new("/proc"), pids) {
                    Ok(mut stats) => {
                        stats.cgroup = self.cgroup.as_ref().and_then(|cg| cg.stats().ok());
                        Outcome::Stats { stats }
                    }
                    Err(e) => error(format!("reading /proc: {e}")),
                }
            }
            Op::UpdateResources { resources } => match &self.cgroup {
                None => error(
                    "no container cgroup: limits need the agent running as the guest's init, \
                     on a guest kernel with cgroup v2",
                ),
                Some(cg) => match cg.apply(&resources) {
                    Ok(()) => Outcome::Ok { pid: None },
                    Err(e) => error(format!("cgroup: {e}")),
                },
            },
            Op::ConfigureNetwork { network } => match &self.network {
                None => error("network configuration needs the agent running as the guest's init"),
                Some(net) => match crate::network::configure(&network, net.as_ref()) {
                    Ok(()) => Outcome::Ok { pid: None },
                    Err(e) => error(format!("network: {e}")),
                },
            },
            Op::Create { handle, process } => {
                if procs.contains_key(&handle) {
                    return error(format!("handle {handle} is already in use"));
                }
                if process.args.is_empty() {
                    return error("process.args is empty");
                }
                match self.create(handle, &process) {
                    Ok(p) => {
                        procs.insert(handle, p);
                        Outcome::Ok { pid: None }
                    }
                    Err(e) => error(format!("cannot start {:?}: {e}", process.args[0])),
                }
            }
            Op::Start { handle } => {
                let Some(p) = procs.get_mut(&handle) else {
                    return error(format!("no process with handle {handle}"));
                };
                let Some(held) = p.held.take() else {
                    return match p.exited {
                        true => error(format!("process {handle} ended before it started")),
                        false => error(format!("process {handle} was already started")),
                    };
                };
                let pid = p.pid;
                match held.release() {
                    Ok(()) => {
                        if let Some(f) = &self.figures {
                            // release returns once the exec succeeded.
                            let line = f.report(
                                requested,
                                crate::figures::boottime_ms(),
                                &std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
                            );
                            if let Some(line) = line {
                                eprintln!("{line}");
                            }
                        }
                        Outcome::Ok { pid: Some(pid) }
                    }
                    // It exits 127, which is reported as its end.
                    Err(e) => {
                        p.exited = true;
                        error(format!("cannot start process {handle}: {e}"))
                    }
                }
            }
            Op::Signal { handle, signal } => match procs.get(&handle).and_then(Proc::live_pid) {
                Some(pid) => match Signal::try_from(signal)
                    .map_err(|e| e.to_string())
                    .and_then(|sig| kill(Pid::from_raw(pid), sig).map_err(|e| e.to_string()))
                {
                    Ok(()) => Outcome::Ok { pid: None },
                    Err(e) => error(format!("signal {signal} to process {handle}: {e}")),
                },
                None => error(format!("no running process with handle {handle}")),
            },
            Op::CloseStdin { handle } => match procs.get_mut(&handle) {
                Some(p) if !p.exited => {
                    if let Some(feed) = &mut p.stdin {
                        feed.close();
                    }
                    Outcome::Ok { pid: None }
                }
                _ => error(format!("no running process with handle {handle}")),
            },
            Op::ResizeTerminal { handle, size } => match procs.get(&handle) {
                Some(Proc {
                    tty: Some(tty),
                    exited: false,
                    ..
                }) => match crate::tty::resize(tty, size) {
                    Ok(()) => Outcome::Ok { pid: None },
                    Err(e) => error(format!("resizing the terminal of process {handle}: {e}")),
                },
                Some(Proc { exited: false, .. }) => {
                    error(format!("process {handle} has no terminal"))
                }
                _ => error(format!("no running process with handle {handle}")),
            },
        }
    }

    /// The processes the host started, their descendants, and whatever
    /// else lives in the container's mount namespace.
    fn container_processes(&self, procs: &HashMap<u32, Proc>) -> Vec<GuestProcess> {
        let roots: Vec<i32> = procs.values().filter_map(Proc::live_pid).collect();
        let all = crate::procfs::scan(Path::new("/proc"));
        crate::procfs::container_processes(&all, &roots, |pid| {
            self.rootfs.as_ref().is_some_and(|ns| ns.contains(pid))
        })
    }

    /// Forks the process, sets it up and holds it before its exec (see
    /// held.rs); its output and exit are watched from now on.
    fn create(&self, handle: u32, spec: &ProcessSpec) -> io::Result<Proc> {
        // Checked before anything is made, so that a key the guest kernel
        // lacks fails `create` cleanly.
        let sysctls = match &spec.container {
            Some(c) if !c.sysctls.is_empty() => Some(Sysctls::new(&c.sysctls)?),
            _ => None,
        };
        let program = Program::new(&spec.args, &spec.env)?;
        let (stdio, master) = if spec.terminal {
            let pty = crate::tty::open(spec.console_size.unwrap_or(crate::tty::DEFAULT_SIZE))?;
            (ChildStdio::Terminal(pty.slave), Some(pty.master))
        } else {
            (ChildStdio::Pipes, None)
        };
        let setup = ChildSetup::new(self.rootfs.as_ref(), self.cgroup.as_ref(), spec)?;
        // A terminal is one stream both ways: output on stdout, input to
        // the same master side.
        let tty_io = match &master {
            Some(m) => Some((File::from(m.try_clone()?), File::from(m.try_clone()?))),
            None => None,
        };
        let mut held = self.fork_in_namespaces(&program, stdio, &setup, sysctls.as_ref(), spec)?;
        // The agent's copies of the terminal's slave side went with
        // `stdio`: the master reads EOF once the last process on the
        // terminal is gone.
        let pid = held.pid;
        let exited = self.reaper.watch(pid);
        type Source = Option<Box<dyn Read + Send>>;
        let (stdin, stdout, stderr): (Option<File>, Source, Source) = match tty_io {
            Some((input, output)) => (Some(input), Some(Box::new(output)), None),
            None => (
                held.stdin.take().map(File::from),
                held.stdout
                    .take()
                    .map(|o| Box::new(File::from(o)) as Box<dyn Read + Send>),
                held.stderr
                    .take()
                    .map(|e| Box::new(File::from(e)) as Box<dyn Read + Send>),
            ),
        };
        let stdin = match stdin {
            Some(input) => {
                let out = self.out.clone();
                let taken = move || {
                    if let Ok(frame) = encode_json(FrameKind::Event, &Event::StdinTaken { handle })
                    {
                        out.deliver(&frame);
                    }
                };
                match StdinFeed::start(input, master.is_some(), taken) {
                    Ok(feed) => Some(feed),
                    Err(e) => {
                        // No thread to feed its input: the process is
                        // killed rather than left unrelayed (the reaper
                        // collects it).
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        let pumps = [
            pump(handle, StreamId::Stdout, stdout, self.out.clone()),
            pump(handle, StreamId::Stderr, stderr, self.out.clone()),
        ];
        let (out, procs) = (self.out.clone(), self.procs.clone());
        thread::spawn(move || {
            // Exit is reported only after both streams reached EOF, so the
            // host has every byte before it sees the status.
            let status = exited.recv().unwrap_or(255);
            for p in pumps {
                let _ = p.join();
            }
            // Its PID may be reused from now on: no more signals to it.
            if let Some(p) = procs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(&handle)
            {
                p.exited = true;
                p.held = None;
            }
            if let Ok(frame) = encode_json(FrameKind::Event, &Event::Exited { handle, status }) {
                out.deliver(&frame);
            }
        });
        Ok(Proc {
            pid,
            held: Some(held),
            stdin,
            tty: master,
            exited: false,
        })
    }
}

impl Agent {
    /// The namespaces `spec` makes (the container's init) or joins (an
    /// exec), only where there is a container mount namespace: the /proc
    /// of a new PID namespace is mounted there.
    fn new_namespaces<'a>(&self, spec: &'a ProcessSpec) -> Option<&'a [runvm_protocol::Namespace]> {
        spec.container
            .as_ref()
            .filter(|c| self.rootfs.is_some() && !c.namespaces.is_empty())
            .map(|c| c.namespaces.as_slice())
    }

    /// Forks `program` in the namespaces `spec` makes or joins, writing
    /// its `sysctls` first.
    fn fork_in_namespaces(
        &self,
        program: &Program,
        stdio: ChildStdio,
        setup: &ChildSetup,
        sysctls: Option<&Sysctls>,
        spec: &ProcessSpec,
    ) -> io::Result<Held> {
        let lock = || self.container_ns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sysctls {
            s.write_guest_wide()?;
        }
        let fork = |stdio| {
            let held = Held::fork(program, stdio, setup);
            self.reaper.wake();
            held
        };
        if let Some(kinds) = self.new_namespaces(spec) {
            let guard = ForkInto::new_namespaces(kinds)?;
            // In the new IPC and UTS namespaces, which the thread is in.
            if let Some(s) = sysctls {
                s.write_per_namespace()?;
            }
            let child = fork(stdio);
            if child.is_ok() {
                match guard.made() {
                    Ok(made) => *lock() = Some(made),
                    Err(e) => eprintln!("runvm-agent: the container's namespaces: {e}"),
                }
            }
            drop(guard);
            return child;
        }
        if let Some(s) = sysctls {
            s.write_per_namespace()?;
        }
        if spec.join_container {
            let ns = lock();
            if let Some(ns) = ns.as_ref() {
                let guard = ForkInto::join(ns)?;
                let child = fork(stdio);
                drop(guard);
                return child;
            }
        }
        fork(stdio)
    }
}

fn pump(
    handle: u32,
    stream: StreamId,
    source: Option<impl Read + Send + 'static>,
    out: Arc<Outbox>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let Some(mut source) = source else { return };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match source.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            let chunk = StreamChunk {
                handle,
                stream,
                data: buf[..n].to_vec(),
            };
            if let Ok(frame) = chunk.encode() {
                out.deliver(&frame);
            }
            if n == 0 {
                return;
            }
        }
    })
}

/// The `seq` of a request the agent cannot otherwise read; 0 when none.
fn request_seq(payload: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64))
        .unwrap_or(0)
}
