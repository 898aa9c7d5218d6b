//! The container's monitor: one process per container that runs the VMM in
//! its own threads, holds the agent connection, relays the container's stdio
//! through its own stdio, and exits with the container process's status.
//! To the caller (containerd's shim, conmon) it *is* the container's init:
//! its PID goes into `--pid-file` and they wait for it as a subreaper.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runvm_protocol::client::{connect_vsock, Notice};
use runvm_protocol::mux::MuxClient;
use runvm_protocol::{Event, Op, Outcome, StreamId, AGENT_VSOCK_PORT};
use vmm::config::{FsConfig, VmConfig, VsockConfig};
use vmm::resources::VmResources;
use vmm::vm::{self, RunOptions};

use crate::bundle::{self, Plan};
use crate::control::{self, Reply, Request};
use crate::state::{self, ContainerDir, Record, Status};
use crate::{assets, console, logger, signals};

/// The agent's handle for the container's init process.
const INIT: u32 = 1;
/// The virtio-fs tag of the rootfs share.
const ROOTFS_TAG: &str = "rootfs";
/// The guest's vsock context ID (each VM has its own vsock device).
const GUEST_CID: u32 = 3;
/// The status a container reports when its VM ended under it.
const VM_LOST_STATUS: i32 = 128 + libc::SIGKILL;
/// How long an ending guest gets to sync and reset.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What the monitor's main loop reacts to.
enum Input {
    Control(Request, Sender<Reply>),
    Signal(i32),
    Exited(i32),
    AgentGone(String),
    VmEnded(String),
}

/// Runs the monitor of container `dir`; returns the exit status. In
/// terminal mode the pty's master goes to `console_socket`.
pub fn run(dir: &ContainerDir, console_socket: Option<&Path>) -> i32 {
    let signals = match signals::forwarded_signalfd() {
        Ok(s) => s,
        Err(e) => return fail(dir, &e),
    };
    match Monitor::boot(dir, console_socket) {
        Ok((m, inputs)) => m.serve(signals, inputs),
        Err(e) => fail(dir, &e),
    }
}

/// Before `create` returns, failures go to `monitor.err` for it to report.
fn fail(dir: &ContainerDir, e: &anyhow::Error) -> i32 {
    let msg = format!("{e:#}");
    logger::error(&msg);
    let _ = std::fs::write(dir.file(state::MONITOR_ERROR), &msg);
    1
}

struct Monitor {
    dir: ContainerDir,
    record: Record,
    agent: Arc<MuxClient<UnixStream>>,
    tx: Sender<Input>,
    /// The host pty's slave side in terminal mode.
    tty: Option<File>,
}

impl Monitor {
    fn boot(
        dir: &ContainerDir,
        console_socket: Option<&Path>,
    ) -> anyhow::Result<(Monitor, Receiver<Input>)> {
        let mut record = dir.load()?;
        let me = std::process::id() as i32;
        record.pid = Some(me);
        record.pid_start = state::process_start_time(me);
        dir.save(&record)?;
        vmm::fd_limit::raise_to_hard_limit();

        let plan = bundle::load(&record.bundle)?;
        for m in &plan.unsupported_mounts {
            logger::warn(&format!("mount {m} is not set up in the guest yet"));
        }
        let (tx, inputs) = mpsc::channel();
        start_vm(dir, &plan, tx.clone())?;
        let conn = connect_agent(dir, &plan, &inputs)?;
        let reader = conn
            .try_clone()
            .context("duplicating the agent connection")?;
        let (agent, notices) =
            MuxClient::start(reader, conn).context("starting the agent reader")?;
        let agent = Arc::new(agent);
        match agent.call(Op::Create {
            handle: INIT,
            process: Box::new(plan.process.clone()),
        })? {
            Outcome::Ok { .. } => {}
            Outcome::Error { message } => bail!("the guest agent refused the process: {message}"),
        }
        let tty = match (plan.process.terminal, console_socket) {
            (true, Some(sock)) => Some(console::hand_over(sock)?),
            (true, None) => bail!("process.terminal is true: --console-socket is required"),
            (false, _) => None,
        };
        let (out, err): (Box<dyn Write + Send>, Box<dyn Write + Send>) = match &tty {
            Some(t) => (Box::new(t.try_clone()?), Box::new(t.try_clone()?)),
            None => (Box::new(std::io::stdout()), Box::new(std::io::stderr())),
        };
        relay_output(notices, tx.clone(), out, err)?;
        listen_control(dir, tx.clone())?;
        record.status = Status::Created;
        dir.save(&record)?;
        logger::debug(&format!("container {} created", record.id));
        Ok((
            Monitor {
                dir: dir.clone(),
                record,
                agent,
                tx,
                tty,
            },
            inputs,
        ))
    }

    fn serve(mut self, signals: nix::sys::signalfd::SignalFd, inputs: Receiver<Input>) -> i32 {
        let tx = self.tx.clone();
        let _ = thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                match signals.read_signal() {
                    Ok(Some(info)) => {
                        if tx.send(Input::Signal(info.ssi_signo as i32)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(_) => return,
                }
            });
        // Every sender lives in a thread that outlives this loop, so `recv`
        // only fails if they all died; the VM is then gone as well.
        while let Ok(input) = inputs.recv() {
            match input {
                Input::Control(req, reply) => {
                    let r = self.control(&req);
                    let _ = reply.send(Reply {
                        error: r.as_ref().err().map(|e| format!("{e:#}")),
                    });
                    if let Ok(Some(status)) = r {
                        return self.finish(status, Some(&inputs));
                    }
                }
                Input::Signal(sig) => {
                    if let Ok(Some(status)) = self.kill(sig) {
                        return self.finish(status, Some(&inputs));
                    }
                }
                Input::Exited(status) => return self.finish(status, Some(&inputs)),
                Input::AgentGone(why) => {
                    logger::monitor_error(&format!("lost the guest agent: {why}"));
                    return self.finish(VM_LOST_STATUS, Some(&inputs));
                }
                Input::VmEnded(why) => {
                    logger::monitor_error(&format!("the VM ended under the container: {why}"));
                    return self.finish(VM_LOST_STATUS, None);
                }
            }
        }
        self.finish(VM_LOST_STATUS, None)
    }

    /// Handles a command; `Ok(Some(status))` when the container is over.
    fn control(&mut self, req: &Request) -> anyhow::Result<Option<i32>> {
        match req {
            Request::Start => {
                match self.record.status {
                    Status::Created => {}
                    Status::Running => bail!("container {} is already running", self.record.id),
                    s => bail!("cannot start container {} in state {s}", self.record.id),
                }
                let pid = match self.agent.call(Op::Start { handle: INIT })? {
                    Outcome::Ok { pid } => pid,
                    Outcome::Error { message } => {
                        bail!("the guest agent could not start the process: {message}")
                    }
                };
                self.record.status = Status::Running;
                self.dir.save(&self.record)?;
                logger::debug(&format!(
                    "container {} started (guest pid {pid:?})",
                    self.record.id
                ));
                let input: Box<dyn Read + Send> = match &self.tty {
                    Some(t) => {
                        watch_size(t.try_clone()?, Arc::clone(&self.agent))?;
                        Box::new(t.try_clone()?)
                    }
                    None => Box::new(std::io::stdin()),
                };
                relay_stdin(Arc::clone(&self.agent), input)?;
                Ok(None)
            }
            Request::Kill { signal } => self.kill(*signal),
        }
    }

    fn kill(&mut self, signal: i32) -> anyhow::Result<Option<i32>> {
        match self.record.status {
            Status::Running => match self.agent.call(Op::Signal {
                handle: INIT,
                signal,
            })? {
                Outcome::Ok { .. } => Ok(None),
                Outcome::Error { message } => bail!("{message}"),
            },
            // Nothing runs yet: a signal that would end a process ends the
            // container; others are ignored, as an idle process would.
            Status::Created | Status::Creating => {
                let harmless = [libc::SIGCHLD, libc::SIGWINCH, libc::SIGURG, libc::SIGCONT];
                Ok((!harmless.contains(&signal)).then_some(128 + signal))
            }
            Status::Stopped => bail!("container {} is not running", self.record.id),
        }
    }

    /// Lets the guest sync and reset (waiting on `inputs` for the VM to end,
    /// unless it has already), records the status and returns it.
    fn finish(mut self, status: i32, inputs: Option<&Receiver<Input>>) -> i32 {
        if let Some(inputs) = inputs {
            let agent = Arc::clone(&self.agent);
            // The agent may be gone or wedged; the VM ending is what counts.
            let _ = thread::Builder::new()
                .name("shutdown".into())
                .spawn(move || agent.call(Op::Shutdown));
            if !wait_vm_end(inputs, SHUTDOWN_GRACE) {
                logger::warn("the guest did not reset after shutdown; ending it");
            }
        }
        self.record.status = Status::Stopped;
        self.record.exit_status = Some(status);
        if let Err(e) = self.dir.save(&self.record) {
            logger::monitor_error(&format!("{e:#}"));
        }
        let _ = std::fs::remove_file(self.dir.file(state::CONTROL_SOCKET));
        let _ = std::io::stdout().flush();
        status
    }
}

/// Drops other inputs (the container is over) until the VM has ended;
/// false if it did not within `limit`.
fn wait_vm_end(inputs: &Receiver<Input>, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match inputs.recv_timeout(left) {
            Ok(Input::VmEnded(_)) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

fn start_vm(dir: &ContainerDir, plan: &Plan, tx: Sender<Input>) -> anyhow::Result<()> {
    let kernel = assets::kernel(plan.kernel.as_deref())?;
    let initramfs = dir.file(state::INITRAMFS);
    assets::write_initramfs(&assets::agent()?, &initramfs)?;
    let mut cmdline = format!("quiet runvm.rootfs={ROOTFS_TAG}");
    if plan.rootfs_ro {
        cmdline.push_str(" runvm.rootfs_ro");
    }
    if let Some(h) = &plan.hostname {
        cmdline.push_str(&format!(" runvm.hostname={h}"));
    }
    let config = VmConfig {
        vcpus: plan.vcpus,
        mem_mib: plan.mem_mib,
        kernel,
        initramfs: Some(initramfs),
        cmdline,
        rng: true,
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: dir.file(state::VSOCK_SOCKET),
        }),
        fs: vec![FsConfig {
            tag: ROOTFS_TAG.into(),
            path: plan.rootfs.clone(),
            read_only: plan.rootfs_ro,
            cache: Default::default(),
        }],
        net: Vec::new(),
    };
    let kvm = vm::open_kvm()?;
    let resources = VmResources::validate(&config, vm::host_limits(&kvm))?;
    let console_path = dir.file(state::CONSOLE_LOG);
    let console = File::create(&console_path)
        .with_context(|| format!("cannot create {}", console_path.display()))?;
    thread::Builder::new()
        .name("vmm".into())
        .spawn(move || {
            let opts = RunOptions {
                console: Some(Box::new(console)),
                console_input: None,
                timeout: None,
                on_started: None,
                on_timeout: None,
            };
            let why = match vm::run(&kvm, &resources, opts) {
                Ok(reason) => reason.to_string(),
                Err(e) => format!("{e:#}"),
            };
            let _ = tx.send(Input::VmEnded(why));
        })
        .context("starting the VMM thread")?;
    Ok(())
}

/// Waits for the agent to listen, giving up when the VM ends or the boot
/// timeout passes (with the console's last lines in the error).
/// Until it returns, the VM thread is the only sender on `inputs`.
fn connect_agent(
    dir: &ContainerDir,
    plan: &Plan,
    inputs: &Receiver<Input>,
) -> anyhow::Result<UnixStream> {
    let uds = dir.file(state::VSOCK_SOCKET);
    let start = Instant::now();
    loop {
        if let Ok(Input::VmEnded(_)) = inputs.try_recv() {
            bail!("the VM ended while booting{}", console_tail(dir));
        }
        match connect_vsock(&uds, AGENT_VSOCK_PORT, Duration::from_millis(500)) {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() >= plan.boot_timeout => {
                bail!(
                    "the guest agent did not answer within {:?} ({e}){}",
                    plan.boot_timeout,
                    console_tail(dir)
                )
            }
            Err(_) => {}
        }
    }
}

fn console_tail(dir: &ContainerDir) -> String {
    let text = std::fs::read_to_string(dir.file(state::CONSOLE_LOG)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(10)..].join("\n");
    if tail.is_empty() {
        String::new()
    } else {
        format!("; guest console:\n{tail}")
    }
}

/// Writes the container's output to this process's stdout and stderr and
/// reports its exit. It never blocks on anything but those writes, so calls
/// made meanwhile get their answers.
fn relay_output(
    notices: Receiver<Notice>,
    tx: Sender<Input>,
    mut out: Box<dyn Write + Send>,
    mut err: Box<dyn Write + Send>,
) -> anyhow::Result<()> {
    thread::Builder::new()
        .name("output".into())
        .spawn(move || {
            // A reader that went away (EPIPE) loses the rest of the output;
            // it is still drained so the agent connection keeps moving.
            let mut out_ok = true;
            let mut err_ok = true;
            for n in notices.iter() {
                match n {
                    Notice::Output(chunk) if chunk.handle == INIT => {
                        let (ok, w) = match chunk.stream {
                            StreamId::Stderr => (&mut err_ok, &mut err),
                            _ => (&mut out_ok, &mut out),
                        };
                        if !*ok {
                            continue;
                        }
                        let res = w.write_all(&chunk.data).and_then(|()| w.flush());
                        if *ok && res.is_err() {
                            *ok = false;
                        }
                    }
                    Notice::Output(_) => {}
                    Notice::Event(Event::Exited { handle, status }) if handle == INIT => {
                        let _ = tx.send(Input::Exited(status));
                    }
                    Notice::Event(_) => {}
                }
            }
            let _ = tx.send(Input::AgentGone("the agent connection closed".into()));
        })
        .context("starting the output relay")?;
    Ok(())
}

/// Copies this process's stdin to the container's; its end is the
/// container's EOF.
fn relay_stdin(
    agent: Arc<MuxClient<UnixStream>>,
    mut stdin: Box<dyn Read + Send>,
) -> anyhow::Result<()> {
    thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => 0,
                };
                if agent.send_stdin(INIT, &buf[..n]).is_err() || n == 0 {
                    return;
                }
            }
        })
        .context("starting the stdin relay")?;
    Ok(())
}

/// How often the terminal's size is compared with what the guest has.
const RESIZE_POLL: Duration = Duration::from_millis(200);

/// Passes size changes of the host terminal on to the guest's. The caller
/// resizes the master it holds; the slave side sees the new size but no
/// SIGWINCH (the monitor is not its session leader), hence the polling.
fn watch_size(tty: File, agent: Arc<MuxClient<UnixStream>>) -> anyhow::Result<()> {
    thread::Builder::new()
        .name("tty-size".into())
        .spawn(move || {
            let mut last = None;
            while agent.ended().is_none() {
                let now = console::size(&tty);
                if let Some(size) = now.filter(|_| now != last) {
                    if agent
                        .call(Op::ResizeTerminal { handle: INIT, size })
                        .is_err()
                    {
                        return;
                    }
                    last = now;
                }
                thread::sleep(RESIZE_POLL);
            }
        })
        .context("starting the terminal size watcher")?;
    Ok(())
}

/// Accepts `runvm start` / `kill` on the control socket.
fn listen_control(dir: &ContainerDir, tx: Sender<Input>) -> anyhow::Result<()> {
    let path = dir.file(state::CONTROL_SOCKET);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let req = match control::read_request(&conn) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = control::write_reply(
                            &conn,
                            &Reply {
                                error: Some(format!("{e:#}")),
                            },
                        );
                        continue;
                    }
                };
                let (reply_tx, reply_rx) = mpsc::channel();
                if tx.send(Input::Control(req, reply_tx)).is_err() {
                    return;
                }
                // The loop answers every request it takes; one that ended
                // the container meanwhile drops the sender.
                let reply = reply_rx.recv().unwrap_or_else(|_| Reply {
                    error: Some("the container has stopped".into()),
                });
                let _ = control::write_reply(&conn, &reply);
            }
        })
        .context("starting the control listener")?;
    Ok(())
}
