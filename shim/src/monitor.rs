//! The container's monitor: one process per container that runs the VMM in
//! its own threads, holds the agent connection, relays the container's stdio
//! through its own stdio, and exits with the container process's status.
//! To the caller (containerd's shim, conmon) it *is* the container's init:
//! its PID goes into `--pid-file` and they wait for it as a subreaper.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runvm_protocol::client::{connect_vsock, Notice};
use runvm_protocol::mux::MuxClient;
use runvm_protocol::{Event, Op, Outcome, ProcessSpec, Resources, Seccomp, AGENT_VSOCK_PORT};
use vmm::config::{FsConfig, NetConfig, TapSource, VmConfig, VsockConfig};
use vmm::pause::VmControl;
use vmm::resources::VmResources;
use vmm::vm::{self, RunOptions};

use crate::bundle::{self, NetworkPlan, Plan};
use crate::console_log::BoundedLog;
use crate::control::{self, Reply, Request};
use crate::relay::{self, Routes, Sink};
use crate::state::{self, ContainerDir, Record, Status};
use crate::{assets, console, host_cgroup, logger, network, ready, signals, template};

/// The agent's handle for the container's init process.
const INIT: u32 = 1;
/// The virtio-fs tag of the rootfs share.
const ROOTFS_TAG: &str = "rootfs";
/// The guest's vsock context ID (each VM has its own vsock device).
pub(crate) const GUEST_CID: u32 = 3;
/// The status a container reports when its VM ended under it.
const VM_LOST_STATUS: i32 = 128 + libc::SIGKILL;
/// Debug log lines that mark where `create` spends its time start with
/// this (the runtime benchmark reads them with their timestamps).
pub const TIMING: &str = "timing:";
/// What the agent prints on the console once it runs as the guest's init.
const AGENT_READY: &[u8] = b"RUNVM_AGENT_READY";

/// How long the vCPUs may take to stop for a pause.
const PAUSE_LIMIT: Duration = Duration::from_secs(10);
/// How long an ending guest gets to sync and reset.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What the monitor's main loop reacts to.
enum Input {
    Control(Request, Sender<Reply>),
    Exec(Box<ExecRequest>),
    Signal(i32),
    Exited(i32),
    AgentGone(String),
    VmEnded(String),
}

/// Runs the monitor of container `dir`; returns the exit status. In
/// terminal mode the pty's master goes to `console`; `ready` (from
/// `create`) hears once the container is created.
pub fn run(
    dir: &ContainerDir,
    console: Option<console::Target>,
    ready: Option<std::fs::File>,
) -> i32 {
    let signals = match signals::forwarded_signalfd() {
        Ok(s) => s,
        Err(e) => return fail(dir, &e),
    };
    match Monitor::boot(dir, console) {
        Ok((m, inputs)) => {
            if let Some(end) = ready {
                ready::signal(end);
            }
            m.serve(signals, inputs)
        }
        // `ready` closes unsaid after the error is written for `create`.
        Err(e) => fail(dir, &e),
    }
}

/// Moves this process, and with it the VM to be, into the spec's cgroup
/// on the host (see `host_cgroup`). The path is saved in the state before
/// the cgroup is made, so whoever removes the state removes it too.
fn enter_host_cgroup(dir: &ContainerDir, record: &mut Record, plan: &Plan) -> anyhow::Result<()> {
    let Some(spec_path) = plan.cgroups_path.as_deref() else {
        return Ok(());
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Some(root) = host_cgroup::unified_root(&mountinfo) else {
        logger::debug(
            "linux.cgroupsPath: this host has no unified cgroup v2 hierarchy; \
             the VM stays in runvm's cgroup",
        );
        return Ok(());
    };
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|s| host_cgroup::own_cgroup(&s))
        .unwrap_or_else(|| "/".to_owned());
    let rel = host_cgroup::resolve(spec_path, &own)?;
    let path = root.join(&rel);
    record.host_cgroup = Some(path.clone());
    dir.save(record)?;
    let limits = host_cgroup::HostLimits::for_vm(plan.mem_mib, &plan.limits);
    for unset in host_cgroup::join(&root, &rel, &limits)? {
        logger::warn(&format!("host cgroup {}: not set: {unset}", path.display()));
    }
    logger::debug(&format!(
        "the VM's host cgroup: {} ({limits:?})",
        path.display()
    ));
    Ok(())
}

/// Before `create` returns, failures go to `monitor.err` for it to report.
fn fail(dir: &ContainerDir, e: &anyhow::Error) -> i32 {
    let msg = format!("{e:#}");
    logger::error(&msg);
    let _ = std::fs::write(dir.file(state::MONITOR_ERROR), &msg);
    1
}

/// `runvm exec`'s request, with its connection and stdio.
struct ExecRequest {
    process: ProcessSpec,
    console_socket: Option<PathBuf>,
    fds: Vec<OwnedFd>,
    conn: UnixStream,
}

struct Monitor {
    dir: ContainerDir,
    record: Record,
    agent: Arc<MuxClient<UnixStream>>,
    tx: Sender<Input>,
    /// The host pty's slave side in terminal mode.
    tty: Option<File>,
    routes: Routes,
    /// The agent handle the next exec gets.
    next_handle: u32,
    /// Pauses the vCPUs.
    vm: VmControl,
    /// While paused: the status to return to, and signals to deliver then.
    paused: Option<(Status, Vec<i32>)>,
    /// The spec's network namespace, spliced to the VM's NICs.
    network: Option<network::Attached>,
    /// The container's seccomp profile, which binds every exec too.
    seccomp: Option<Seccomp>,
    /// Host processes standing for execs (their callers or detached
    /// waiters), by exec handle, as they report themselves.
    stand_ins: StandIns,
    /// Longest wait for the agent's answer to a call the event loop makes
    /// (the VM's boot timeout: what this container grants a slow guest):
    /// a guest that stops answering fails that request instead of freezing
    /// the monitor, so kill, state and delete keep working.
    answer_limit: Duration,
    /// vCPUs and MiB the VM was booted with: the most an update may grant.
    vm_shape: (u32, u64),
}

impl Monitor {
    fn boot(
        dir: &ContainerDir,
        console: Option<console::Target>,
    ) -> anyhow::Result<(Monitor, Receiver<Input>)> {
        logger::debug(&format!("{TIMING} monitor started"));
        let mut record = dir.load()?;
        let me = std::process::id() as i32;
        record.pid = Some(me);
        record.pid_start = state::process_start_time(me);
        dir.save(&record)?;
        vmm::fd_limit::raise();

        let plan = bundle::load(&record.bundle)?;
        enter_host_cgroup(dir, &mut record, &plan)?;
        for m in &plan.mounts.unsupported {
            logger::warn(&format!("mount {m} is not set up in the guest"));
        }
        let (network, nics) = match &plan.network {
            NetworkPlan::Join(path) => {
                let (attached, nics) = network::attach(path)?;
                record.network = Some(attached.record());
                dir.save(&record)?;
                logger::debug(&format!("{TIMING} network attached"));
                (Some(attached), nics)
            }
            NetworkPlan::Host => {
                logger::debug("the spec has no network namespace: the VM gets no NIC");
                (None, Vec::new())
            }
            NetworkPlan::Empty => (None, Vec::new()),
        };
        if !plan.publish.is_empty() {
            let guest = network
                .as_ref()
                .and_then(|n| {
                    n.config
                        .interfaces
                        .iter()
                        .find_map(|i| i.address.as_deref())
                })
                .and_then(|a| a.split('/').next()?.parse().ok())
                .context("publishing ports needs an IPv4 address in the network namespace")?;
            let bound = crate::publish::start(&plan.publish, guest)?;
            for p in &bound {
                logger::debug(&format!("published {p} (to {guest})"));
            }
            record.published = bound;
            dir.save(&record)?;
        }
        let (tx, inputs) = mpsc::channel();
        let (vm, setup, conn) = boot_vm(dir, &record.id, &plan, nics, &tx, &inputs)?;
        logger::debug(&format!("{TIMING} agent connected"));
        let reader = conn
            .try_clone()
            .context("duplicating the agent connection")?;
        let (agent, notices) =
            MuxClient::start(reader, conn).context("starting the agent reader")?;
        let agent = Arc::new(agent);
        if let Some(setup) = setup {
            call_ok(
                &agent,
                Op::Setup {
                    setup: Box::new(setup),
                },
                plan.boot_timeout,
                |message| {
                    anyhow::anyhow!(
                        "the guest restored from its template was not set up: {message}{}",
                        console_tail(dir)
                    )
                },
            )?;
            logger::debug(&format!("{TIMING} guest set up"));
        }
        if let Some(net) = network.as_ref().filter(|n| !n.config.interfaces.is_empty()) {
            call_ok(
                &agent,
                Op::ConfigureNetwork {
                    network: Box::new(net.config.clone()),
                },
                plan.boot_timeout,
                |message| {
                    anyhow::anyhow!("the guest agent could not set up the network: {message}")
                },
            )?;
            logger::debug(&format!("{TIMING} guest network configured"));
        }
        for what in &plan.ignored_limits {
            logger::debug(&format!("linux.resources: ignoring {what}"));
        }
        if !plan.limits.is_empty() {
            set_limits(&agent, plan.limits, plan.boot_timeout)?;
            logger::debug(&format!("{TIMING} cgroup limits set"));
        }
        call_ok(
            &agent,
            Op::Create {
                handle: INIT,
                process: Box::new(ProcessSpec {
                    container: plan.container.clone(),
                    ..plan.process.clone()
                }),
            },
            plan.boot_timeout,
            |message| anyhow::anyhow!("the guest agent refused the process: {message}"),
        )?;
        logger::debug(&format!("{TIMING} process created"));
        let tty = match (plan.process.terminal, console) {
            (true, Some(target)) => Some(console::hand_over_to(&target)?),
            (true, None) => bail!("process.terminal is true: --console-socket is required"),
            (false, _) => None,
        };
        let (out, err): (Box<dyn Write + Send>, Box<dyn Write + Send>) = match &tty {
            Some(t) => (Box::new(t.try_clone()?), Box::new(t.try_clone()?)),
            None => (Box::new(std::io::stdout()), Box::new(std::io::stderr())),
        };
        let routes = Routes::default();
        routes.add(INIT, Sink::new(out, err));
        relay_output(notices, tx.clone(), routes.clone())?;
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
                routes,
                next_handle: INIT + 1,
                vm,
                paused: None,
                network,
                seccomp: plan.process.seccomp.clone(),
                stand_ins: StandIns::default(),
                answer_limit: plan.boot_timeout,
                vm_shape: (plan.vcpus, plan.mem_mib),
            },
            inputs,
        ))
    }

    fn serve(mut self, signals: nix::sys::signalfd::SignalFd, inputs: Receiver<Input>) -> i32 {
        let tx = self.tx.clone();
        let _ = vmm::threads::named("signals").spawn(move || loop {
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
                    let mut answer = Reply::default();
                    let r = self.control(&req, &mut answer);
                    if let Err(e) = &r {
                        answer = Reply::error(format!("{e:#}"));
                    }
                    let _ = reply.send(answer);
                    if let Ok(Some(status)) = r {
                        return self.finish(status, Some(&inputs));
                    }
                }
                Input::Exec(req) => self.exec(*req),
                Input::Signal(sig) => {
                    if let Ok(Some(status)) = self.kill(sig) {
                        return self.finish(status, Some(&inputs));
                    }
                }
                Input::Exited(status) => return self.finish(status, Some(&inputs)),
                Input::AgentGone(why) => {
                    logger::monitor_error(&format!(
                        "lost the guest agent: {why}{}",
                        console_tail(&self.dir)
                    ));
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

    /// Handles a command, filling in `reply`; `Ok(Some(status))` when the
    /// container is over.
    fn control(&mut self, req: &Request, reply: &mut Reply) -> anyhow::Result<Option<i32>> {
        match req {
            Request::Start => {
                match self.record.status {
                    Status::Created => {}
                    Status::Running => bail!("container {} is already running", self.record.id),
                    s => bail!("cannot start container {} in state {s}", self.record.id),
                }
                let pid = match self
                    .agent
                    .call_within(Op::Start { handle: INIT }, self.answer_limit)?
                {
                    Outcome::Ok { pid } => pid,
                    Outcome::Error { message } => {
                        bail!("the guest agent could not start the process: {message}")
                    }
                    other => bail!("unexpected answer from the guest agent: {other:?}"),
                };
                logger::debug(&format!("{TIMING} process started"));
                self.record.status = Status::Running;
                self.dir.save(&self.record)?;
                logger::debug(&format!(
                    "container {} started (guest pid {pid:?})",
                    self.record.id
                ));
                // A process that ended as soon as it started (`true`) has
                // had its output route closed already: it started, and its
                // exit is on its way to the main loop; there is no input
                // left to relay.
                let Some(sink) = self.routes.get(INIT) else {
                    logger::debug("the process ended before its input could be relayed");
                    return Ok(None);
                };
                let input = match &self.tty {
                    Some(t) => {
                        let size = t.try_clone()?;
                        relay::watch_size(size, Arc::clone(&self.agent), INIT, Arc::clone(&sink))?;
                        t.try_clone()?
                    }
                    None => File::from(std::io::stdin().as_fd().try_clone_to_owned()?),
                };
                relay::stdin(Arc::clone(&self.agent), INIT, input, sink)?;
                Ok(None)
            }
            Request::Kill { signal } => self.kill(*signal),
            Request::Pause => {
                match self.record.status {
                    Status::Created | Status::Running => {}
                    Status::Paused => bail!("container {} is already paused", self.record.id),
                    s => bail!("cannot pause container {} in state {s}", self.record.id),
                }
                self.vm.pause(PAUSE_LIMIT)?;
                self.paused = Some((self.record.status, Vec::new()));
                self.set_status(Status::Paused)?;
                Ok(None)
            }
            Request::Resume => {
                let Some((before, signals)) = self.paused.take() else {
                    bail!("container {} is not paused", self.record.id);
                };
                self.vm.resume();
                self.set_status(before)?;
                for signal in signals {
                    if let Some(status) = self.kill(signal)? {
                        return Ok(Some(status));
                    }
                }
                Ok(None)
            }
            Request::Update { resources } => {
                if self.paused.is_some() {
                    bail!("container {} is paused", self.record.id);
                }
                let (vcpus, mem_mib) = self.vm_shape;
                crate::limits::check_fits(resources, vcpus, mem_mib)?;
                set_limits(&self.agent, *resources, self.answer_limit)?;
                // New shares weigh the whole VM on the host too.
                if let (Some(w), Some(cg)) = (resources.cpu_weight, &self.record.host_cgroup) {
                    if let Err(e) = host_cgroup::set_cpu_weight(cg, w) {
                        logger::warn(&format!("host cgroup: {e:#}"));
                    }
                }
                Ok(None)
            }
            Request::Exec { .. } => bail!("exec requests come with their stdio"),
            Request::HostPids => {
                let mut pids = vec![std::process::id() as i32];
                pids.extend(
                    self.stand_ins
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .values(),
                );
                reply.host_pids = Some(pids);
                Ok(None)
            }
            Request::StandIn { .. } => bail!("stand-ins report on their exec's connection"),
            Request::Ps | Request::Stats => {
                if self.paused.is_some() {
                    bail!("container {} is paused", self.record.id);
                }
                let op = match req {
                    Request::Ps => Op::ListProcesses,
                    _ => Op::Stats,
                };
                match self.agent.call_within(op, self.answer_limit)? {
                    Outcome::Processes { processes } => reply.processes = Some(processes),
                    Outcome::Stats { stats } => reply.stats = Some(stats),
                    Outcome::Error { message } => bail!("the guest agent: {message}"),
                    Outcome::Ok { .. } => bail!("the guest agent answered with nothing"),
                }
                Ok(None)
            }
        }
    }

    fn set_status(&mut self, status: Status) -> anyhow::Result<()> {
        self.record.status = status;
        self.dir.save(&self.record)
    }

    /// Runs `req`'s process next to the container's; its exit status goes
    /// back on `req.conn` once its output is out.
    fn exec(&mut self, req: ExecRequest) {
        let ExecRequest {
            process,
            console_socket,
            fds,
            conn,
        } = req;
        // A handle is never reused, not even one whose start failed.
        let handle = self.next_handle;
        self.next_handle += 1;
        match self.start_exec(handle, process, console_socket.as_deref(), fds, &conn) {
            Ok((pid, sink, input)) => {
                let reply = Reply {
                    guest_pid: pid,
                    ..Reply::default()
                };
                if let Err(e) = control::write_line(&conn, &reply) {
                    logger::warn(&format!("exec caller went away: {e:#}"));
                }
                let started =
                    relay::stdin(Arc::clone(&self.agent), handle, input, Arc::clone(&sink))
                        .and_then(|()| {
                            forward_exec_signals(
                                &conn,
                                Arc::clone(&self.agent),
                                handle,
                                Arc::clone(&sink),
                                Arc::clone(&self.stand_ins),
                            )
                        });
                if let Err(e) = started {
                    logger::warn(&format!("exec {handle}: {e:#}"));
                }
                sink.attach(conn);
                logger::debug(&format!("exec {handle} started (guest pid {pid:?})"));
            }
            Err(e) => {
                self.routes.remove(handle);
                let _ = control::write_line(&conn, &Reply::error(format!("{e:#}")));
            }
        }
    }

    /// Prepares the host side of exec `handle` and starts it in the guest;
    /// returns its guest PID, sink and stdin.
    fn start_exec(
        &mut self,
        handle: u32,
        mut process: ProcessSpec,
        console_socket: Option<&Path>,
        fds: Vec<OwnedFd>,
        conn: &UnixStream,
    ) -> anyhow::Result<(Option<i32>, Arc<Sink>, File)> {
        match self.record.status {
            Status::Created | Status::Running => {}
            s => bail!("cannot exec in container {} in state {s}", self.record.id),
        }
        process.seccomp = self.seccomp.clone();
        process.join_container = true;
        let terminal = process.terminal;
        let (sink, input, tty) = if terminal {
            // Without a console socket the caller takes the terminal on
            // its own connection (a foreground `runvm exec -t`).
            let tty = match console_socket {
                Some(sock) => console::hand_over(sock)?,
                None => console::hand_over_on(conn)?,
            };
            let sink = Sink::new(Box::new(tty.try_clone()?), Box::new(tty.try_clone()?));
            (sink, tty.try_clone()?, Some(tty))
        } else {
            let [stdin, stdout, stderr]: [OwnedFd; 3] =
                fds.try_into().map_err(|f: Vec<OwnedFd>| {
                    anyhow::anyhow!("exec needs 3 stdio fds, got {}", f.len())
                })?;
            let sink = Sink::new(Box::new(File::from(stdout)), Box::new(File::from(stderr)));
            (sink, File::from(stdin), None)
        };
        self.routes.add(handle, Arc::clone(&sink));
        logger::debug(&format!("exec {handle}: asking the agent to create it"));
        match self.agent.call_within(
            Op::Create {
                handle,
                process: Box::new(process),
            },
            self.answer_limit,
        )? {
            Outcome::Ok { .. } => {}
            Outcome::Error { message } => bail!("the guest agent refused the process: {message}"),
            other => bail!("unexpected answer from the guest agent: {other:?}"),
        }
        logger::debug(&format!("exec {handle}: created, starting it"));
        let pid = match self
            .agent
            .call_within(Op::Start { handle }, self.answer_limit)?
        {
            Outcome::Ok { pid } => pid,
            Outcome::Error { message } => {
                bail!("the guest agent could not start the process: {message}")
            }
            other => bail!("unexpected answer from the guest agent: {other:?}"),
        };
        if let Some(t) = tty {
            relay::watch_size(t, Arc::clone(&self.agent), handle, Arc::clone(&sink))?;
        }
        Ok((pid, sink, input))
    }

    fn kill(&mut self, signal: i32) -> anyhow::Result<Option<i32>> {
        if let Some((_, pending)) = &mut self.paused {
            // A frozen guest cannot take a signal: SIGKILL ends the VM as
            // it stands, others wait for the resume (as under a freezer).
            if signal == libc::SIGKILL {
                return Ok(Some(128 + signal));
            }
            pending.push(signal);
            return Ok(None);
        }
        match self.record.status {
            Status::Running => match self.agent.call_within(
                Op::Signal {
                    handle: INIT,
                    signal,
                },
                self.answer_limit,
            )? {
                Outcome::Ok { .. } => Ok(None),
                Outcome::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer from the guest agent: {other:?}"),
            },
            // Nothing runs yet: a signal that would end a process ends the
            // container; others are ignored, as an idle process would.
            Status::Created | Status::Creating => {
                let harmless = [libc::SIGCHLD, libc::SIGWINCH, libc::SIGURG, libc::SIGCONT];
                Ok((!harmless.contains(&signal)).then_some(128 + signal))
            }
            Status::Stopped | Status::Paused => {
                bail!("container {} is not running", self.record.id)
            }
        }
    }

    /// Lets the guest sync and reset (waiting on `inputs` for the VM to end,
    /// unless it has already), records the status and returns it.
    fn finish(mut self, status: i32, inputs: Option<&Receiver<Input>>) -> i32 {
        // A paused guest cannot sync; it ends as it stands.
        let inputs = inputs.filter(|_| self.paused.is_none());
        if let Some(inputs) = inputs {
            let agent = Arc::clone(&self.agent);
            // The agent may be gone or wedged; the VM ending is what counts.
            let _ = vmm::threads::named("shutdown").spawn(move || agent.call(Op::Shutdown));
            match wait_vm_end(inputs, SHUTDOWN_GRACE) {
                None => logger::warn("the guest did not reset after shutdown; ending it"),
                // How it ended says why an agent went away (a guest crash).
                Some(why) if status == VM_LOST_STATUS => {
                    logger::warn(&format!("the VM ended: {why}"))
                }
                Some(why) => logger::debug(&format!("the VM ended: {why}")),
            }
        }
        // Before `stopped` is visible: the engine removes the namespace next.
        if let Some(net) = self.network.as_mut() {
            net.detach();
            self.record.network = None;
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
fn wait_vm_end(inputs: &Receiver<Input>, limit: Duration) -> Option<String> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match inputs.recv_timeout(left) {
            Ok(Input::VmEnded(why)) => return Some(why),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// What runvm tells the agent on the kernel command line (the VMM adds the
/// console, devices and how the guest ends), then the annotation's words.
fn guest_cmdline(plan: &Plan) -> String {
    let mut cmdline = format!("quiet runvm.rootfs={ROOTFS_TAG}");
    if plan.rootfs_ro {
        cmdline.push_str(" runvm.rootfs_ro");
    } else if plan.overlay() {
        cmdline.push_str(" runvm.rootfs_overlay");
    }
    if let Some(h) = &plan.hostname {
        cmdline.push_str(&format!(" runvm.hostname={h}"));
    }
    for word in &plan.kernel_params {
        cmdline.push(' ');
        cmdline.push_str(word);
    }
    cmdline
}

/// Where the guest's boot is sampled when the operator asks for it
/// (`runvm-vmm --guest-profile`, one file per container in the directory
/// named by this variable). From the environment, not an annotation: the
/// file is written with the runtime's privileges, at a path of the host.
pub const GUEST_PROFILE_ENV: &str = "RUNVM_GUEST_PROFILE";

/// The profile file of a VM about to start; removed again unless the VM
/// takes it, so a `create` that fails later leaves no empty profile behind.
struct PendingProfile {
    file: Option<File>,
    path: PathBuf,
}

impl PendingProfile {
    /// `None` unless [`GUEST_PROFILE_ENV`] names a directory.
    fn create(id: &str) -> anyhow::Result<Option<Self>> {
        let Some(dir) = std::env::var_os(GUEST_PROFILE_ENV).filter(|d| !d.is_empty()) else {
            return Ok(None);
        };
        let path = Path::new(&dir).join(format!("{id}.profile"));
        let file = File::create(&path).with_context(|| {
            format!(
                "cannot create the guest profile {} ({GUEST_PROFILE_ENV})",
                path.display()
            )
        })?;
        Ok(Some(PendingProfile {
            file: Some(file),
            path,
        }))
    }

    fn take(mut self) -> File {
        self.file.take().expect("taken once")
    }
}

impl Drop for PendingProfile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Starts the container's VM and connects to its agent; returns the VM's
/// control, the setup a guest restored from a template still needs, and
/// the connection. A VM restored from a template that ends before its
/// agent answers, or whose agent does not answer within
/// [`RESTORED_ANSWER`] (a template this host's KVM no longer takes, a
/// damaged one), costs the template, not the container: that VM is ended,
/// the template removed, to be built again by a later `create`, and the
/// container's VM boots instead.
fn boot_vm(
    dir: &ContainerDir,
    id: &str,
    plan: &Plan,
    nics: Vec<network::GuestNic>,
    tx: &Sender<Input>,
    inputs: &Receiver<Input>,
) -> anyhow::Result<(VmControl, Option<runvm_protocol::GuestSetup>, UnixStream)> {
    // The TAPs again for a second VM, as the first one's VMM closes its own.
    let spare = if plan.template {
        nics.iter()
            .map(|n| {
                Ok(network::GuestNic {
                    tap: n.tap.try_clone()?,
                    mac: n.mac.clone(),
                })
            })
            .collect::<std::io::Result<Vec<_>>>()
            .context("duplicating the TAPs")?
    } else {
        Vec::new()
    };
    let vm = VmControl::new();
    let started = start_vm(dir, id, plan, nics, tx.clone(), vm.clone(), true)?;
    let limit = match started.template {
        Some(_) => RESTORED_ANSWER.min(plan.boot_timeout),
        None => plan.boot_timeout,
    };
    let (why, template) = match (connect_agent(dir, limit, inputs), started.template) {
        (Ok(conn), _) => return Ok((vm, started.setup, conn)),
        (Err(e), Some(template)) if matches!(e.downcast_ref(), Some(NoAgent::VmEnded(_))) => {
            (e, template)
        }
        (Err(e), Some(template)) if matches!(e.downcast_ref(), Some(NoAgent::Silent(_))) => {
            vm.end(END_WAIT);
            match inputs.recv_timeout(END_WAIT) {
                Ok(Input::VmEnded(_)) => (e, template),
                _ => bail!(
                    "{e:#}; the VM restored from template {} did not end when asked",
                    template.display()
                ),
            }
        }
        (Err(e), _) => return Err(e),
    };
    logger::warn(&format!(
        "the VM restored from template {} failed ({why:#}); removing the template and booting",
        template.display()
    ));
    let _ = std::fs::remove_dir_all(&template);
    let vm = VmControl::new();
    start_vm(dir, id, plan, spare, tx.clone(), vm.clone(), false)?;
    let conn = connect_agent(dir, plan.boot_timeout, inputs)?;
    Ok((vm, None, conn))
}

/// Why [`connect_agent`] reached no agent, with the console's last lines.
#[derive(Debug)]
enum NoAgent {
    /// The VM ended first.
    VmEnded(String),
    /// The time ran out; the VM still runs.
    Silent(String),
}

impl std::fmt::Display for NoAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoAgent::VmEnded(why) | NoAgent::Silent(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for NoAgent {}

/// How long a VM restored from a template gets for its agent to answer:
/// it is already listening when the template is taken, so this is the
/// restore and one vsock connection (well under a second on hardware, a
/// few seconds under nested TCG), not a boot.
const RESTORED_ANSWER: Duration = Duration::from_secs(30);
/// How long a VM that was asked to end may take to.
const END_WAIT: Duration = Duration::from_secs(10);

/// What [`start_vm`] started.
struct Started {
    /// What a guest restored from a template still needs.
    setup: Option<runvm_protocol::GuestSetup>,
    /// The template it was restored from.
    template: Option<std::path::PathBuf>,
}

/// Starts the VM's thread: restored from its template where the plan asks
/// for one and `use_template` allows it, else booted.
fn start_vm(
    dir: &ContainerDir,
    id: &str,
    plan: &Plan,
    nics: Vec<network::GuestNic>,
    tx: Sender<Input>,
    control: VmControl,
    use_template: bool,
) -> anyhow::Result<Started> {
    let profile = PendingProfile::create(id)?;
    let kernel = assets::kernel(plan.kernel.as_deref())?;
    // Mapped rather than copied into guest memory when a cache copy (never
    // changed in place) exists; the archives (the cache's and this VM's)
    // are copied, as the guest frees them once unpacked.
    let (kernel, map_boot_files) = match assets::shared_kernel(&kernel) {
        Some(shared) => (shared, true),
        None => (kernel, false),
    };
    let agent = assets::agent_archive(&assets::agent()?, &dir.file(state::AGENT_INITRAMFS))?;
    let fs: Vec<FsConfig> = std::iter::once(FsConfig {
        tag: ROOTFS_TAG.into(),
        path: plan.rootfs.clone(),
        read_only: plan.rootfs_ro || plan.overlay(),
        cache: Default::default(),
    })
    .chain(plan.mounts.shares.iter().map(|s| FsConfig {
        tag: s.tag.clone(),
        path: s.path.clone(),
        read_only: s.read_only,
        cache: Default::default(),
    }))
    .collect();
    let macs: Vec<String> = nics.iter().map(|n| n.mac.clone()).collect();
    // A profile samples a boot, which a restored VM does not have.
    let template = (use_template && plan.template && profile.is_none())
        .then(|| {
            template::get(&template::Shape {
                kernel: &kernel,
                map_boot_files,
                agent: &agent,
                vcpus: plan.vcpus,
                mem_mib: plan.mem_mib,
                kernel_params: &plan.kernel_params,
                fs_tags: fs.iter().map(|f| f.tag.clone()).collect(),
                nics: nics.len(),
                huge_pages: plan.huge_pages,
                boot_timeout: plan.boot_timeout,
            })
        })
        .flatten();
    let (initramfs, cmdline, setup) = match &template {
        Some(dir) => {
            logger::debug(&format!("{TIMING} restoring template ({})", dir.display()));
            (
                Vec::new(),
                String::new(),
                Some(template::setup(plan, ROOTFS_TAG, &macs)?),
            )
        }
        None => {
            let own = dir.file(state::INITRAMFS);
            assets::write_vm_archive(&plan.mounts, &own)?;
            logger::debug(&format!("{TIMING} initramfs written"));
            (vec![agent, own], guest_cmdline(plan), None)
        }
    };
    let config = VmConfig {
        vcpus: plan.vcpus,
        mem_mib: plan.mem_mib,
        kernel,
        initramfs,
        map_boot_files,
        huge_pages: plan.huge_pages,
        cmdline,
        rng: true,
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: dir.file(state::VSOCK_SOCKET),
        }),
        fs,
        net: nics
            .into_iter()
            .map(|n| {
                Ok(NetConfig {
                    mac: Some(n.mac.parse().map_err(|e: String| anyhow::anyhow!(e))?),
                    // The VMM takes the TAP over.
                    tap: TapSource::Fd(n.tap.into_raw_fd()),
                })
            })
            .collect::<anyhow::Result<_>>()?,
        restore: template.clone(),
    };
    let kvm = vm::open_kvm()?;
    let resources = VmResources::validate(&config, vm::host_limits(&kvm))?;
    let console_path = dir.file(state::CONSOLE_LOG);
    let console = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&console_path)
        .map(|f| BoundedLog::new(f, crate::console_log::bound()))
        .with_context(|| format!("cannot create {}", console_path.display()))?;
    let guest_profile = profile.map(PendingProfile::take);
    vmm::threads::named("vmm")
        .spawn(move || {
            let opts = RunOptions {
                console: Some(Box::new(ReadyMark {
                    inner: console,
                    tail: Vec::with_capacity(AGENT_READY.len()),
                    seen: false,
                })),
                console_input: None,
                timeout: None,
                on_started: Some(Box::new(|times: &vm::BuildTimes| {
                    let phases: Vec<String> = times
                        .phases
                        .iter()
                        .map(|(name, d)| format!("{name} {:.1} ms", d.as_secs_f64() * 1000.0))
                        .collect();
                    logger::debug(&format!("{TIMING} vcpus running ({})", phases.join(", ")));
                })),
                on_timeout: None,
                on_exit: Some(Box::new(|devices: &[String]| {
                    for d in devices {
                        logger::debug(d);
                    }
                })),
                control: Some(control),
                guest_profile,
                snapshot: None,
            };
            let why = match vm::run(&kvm, &resources, opts) {
                Ok(reason) => reason.to_string(),
                Err(e) => format!("{e:#}"),
            };
            let _ = tx.send(Input::VmEnded(why));
        })
        .context("starting the VMM thread")?;
    Ok(Started { setup, template })
}

/// The guest console, marking in the log when the agent's ready line
/// passes (the end of the kernel's boot, seen from the host).
struct ReadyMark {
    inner: BoundedLog,
    /// The last bytes written (the serial port writes one at a time).
    tail: Vec<u8>,
    seen: bool,
}

impl Write for ReadyMark {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.seen {
            for &b in buf {
                if self.tail.len() == AGENT_READY.len() {
                    self.tail.remove(0);
                }
                self.tail.push(b);
                if self.tail == AGENT_READY {
                    self.seen = true;
                    logger::debug(&format!("{TIMING} agent up"));
                    break;
                }
            }
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Waits for the agent to listen, giving up when the VM ends or the boot
/// timeout passes (with the console's last lines in the error).
/// Until it returns, the VM thread is the only sender on `inputs`.
fn connect_agent(
    dir: &ContainerDir,
    limit: Duration,
    inputs: &Receiver<Input>,
) -> anyhow::Result<UnixStream> {
    let path = dir.file(state::VSOCK_SOCKET);
    let sock = vmm::unix_path::SocketPath::new(&path)
        .with_context(|| format!("cannot reach {}", path.display()))?;
    let start = Instant::now();
    loop {
        if let Ok(Input::VmEnded(why)) = inputs.try_recv() {
            return Err(NoAgent::VmEnded(format!(
                "the VM ended while booting ({why}){}",
                console_tail(dir)
            ))
            .into());
        }
        match connect_vsock(sock.as_path(), AGENT_VSOCK_PORT, Duration::from_millis(500)) {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() >= limit => {
                return Err(NoAgent::Silent(format!(
                    "the guest agent did not answer within {limit:?} ({e}){}",
                    console_tail(dir)
                ))
                .into())
            }
            Err(_) => {}
        }
    }
}

fn console_tail(dir: &ContainerDir) -> String {
    let tail = crate::console_log::tail(&dir.file(state::CONSOLE_LOG), 10);
    if tail.is_empty() {
        String::new()
    } else {
        format!("; guest console:\n{tail}")
    }
}

/// Writes each process's output where its sink says and reports exits.
/// It never blocks on anything but those writes, so calls made meanwhile
/// get their answers. (One thread for all: a caller that stops reading an
/// exec's output holds up the others too.)
fn relay_output(
    notices: Receiver<Notice>,
    tx: Sender<Input>,
    routes: Routes,
) -> anyhow::Result<()> {
    vmm::threads::named("output")
        .spawn(move || {
            for n in notices.iter() {
                match n {
                    Notice::Output(chunk) => {
                        if let Some(sink) = routes.get(chunk.handle) {
                            sink.write(chunk.stream, &chunk.data);
                        }
                    }
                    Notice::Event(Event::StdinTaken { handle }) => {
                        if let Some(sink) = routes.get(handle) {
                            sink.stdin_taken();
                        }
                    }
                    Notice::Event(Event::Exited { handle, status }) => {
                        logger::debug(&format!("process {handle} exited with {status}"));
                        if let Some(sink) = routes.remove(handle) {
                            sink.exited(status);
                        }
                        if handle == INIT {
                            let _ = tx.send(Input::Exited(status));
                        }
                    }
                }
            }
            let _ = tx.send(Input::AgentGone("the agent connection closed".into()));
        })
        .context("starting the output relay")?;
    Ok(())
}

/// Host PIDs of the processes standing for execs, by exec handle.
type StandIns = Arc<Mutex<BTreeMap<u32, i32>>>;

/// Passes the signals an exec's caller sends on its connection to the
/// process, and notes the host process that stands for it. A caller that
/// hangs up while the process runs was killed (its stand-in is the process
/// to the engine, which may SIGKILL it): the process is killed too, as it
/// would be under runc.
fn forward_exec_signals(
    conn: &UnixStream,
    agent: Arc<MuxClient<UnixStream>>,
    handle: u32,
    sink: Arc<Sink>,
    stand_ins: StandIns,
) -> anyhow::Result<()> {
    let conn = conn.try_clone()?;
    // The request was read with a timeout; signals may come at any time.
    conn.set_read_timeout(None)?;
    vmm::threads::named(format!("exec-{handle}"))
        .spawn(move || {
            let noted = |pid: Option<i32>| {
                let mut map = stand_ins.lock().unwrap_or_else(|e| e.into_inner());
                match pid {
                    Some(pid) => map.insert(handle, pid),
                    None => map.remove(&handle),
                }
            };
            while let Ok(Some(line)) = control::read_line(&conn) {
                match serde_json::from_slice(&line) {
                    Ok(Request::Kill { signal }) => {
                        let _ = agent.call(Op::Signal { handle, signal });
                    }
                    Ok(Request::StandIn { pid }) if pid > 0 => {
                        noted(Some(pid));
                    }
                    _ => {}
                }
            }
            noted(None);
            if !sink.is_done() {
                let signal = libc::SIGKILL;
                let _ = agent.call(Op::Signal { handle, signal });
            }
        })
        .context("starting an exec's signal relay")?;
    Ok(())
}

/// Sets the container cgroup's limits in the guest.
fn set_limits(
    agent: &MuxClient<UnixStream>,
    limits: Resources,
    within: Duration,
) -> anyhow::Result<()> {
    call_ok(
        agent,
        Op::UpdateResources { resources: limits },
        within,
        |message| anyhow::anyhow!("the guest agent could not set the limits: {message}"),
    )
}

/// Sends `op`, which the agent answers with a plain `Ok`; its refusal
/// becomes the error `refused` makes of the agent's message.
fn call_ok(
    agent: &MuxClient<UnixStream>,
    op: Op,
    within: Duration,
    refused: impl FnOnce(String) -> anyhow::Error,
) -> anyhow::Result<()> {
    match agent.call_within(op, within)? {
        Outcome::Ok { .. } => Ok(()),
        Outcome::Error { message } => Err(refused(message)),
        other => bail!("unexpected answer from the guest agent: {other:?}"),
    }
}

/// A request's name for the debug log (an exec's spec may hold secrets).
fn request_name(req: &Request) -> &'static str {
    match req {
        Request::Start => "start",
        Request::Kill { .. } => "kill",
        Request::Ps => "ps",
        Request::Stats => "stats",
        Request::Update { .. } => "update",
        Request::Pause => "pause",
        Request::Resume => "resume",
        Request::Exec { .. } => "exec",
        Request::HostPids => "host-pids",
        Request::StandIn { .. } => "stand-in",
    }
}

/// Accepts `runvm start` / `kill` / `exec` on the control socket.
fn listen_control(dir: &ContainerDir, tx: Sender<Input>) -> anyhow::Result<()> {
    let path = dir.file(state::CONTROL_SOCKET);
    let listener = vmm::unix_path::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    vmm::threads::named("control")
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (req, fds) = match control::read_request(&conn) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = control::write_line(&conn, &Reply::error(format!("{e:#}")));
                        continue;
                    }
                };
                logger::debug(&format!("control: {}", request_name(&req)));
                let req = match req {
                    Request::Exec {
                        process,
                        console_socket,
                    } => {
                        let exec = ExecRequest {
                            process: *process,
                            console_socket,
                            fds,
                            conn,
                        };
                        if tx.send(Input::Exec(Box::new(exec))).is_err() {
                            return;
                        }
                        continue;
                    }
                    other => other,
                };
                let (reply_tx, reply_rx) = mpsc::channel();
                if tx.send(Input::Control(req, reply_tx)).is_err() {
                    return;
                }
                // The loop answers every request it takes; one that ended
                // the container meanwhile drops the sender.
                let reply = reply_rx
                    .recv()
                    .unwrap_or_else(|_| Reply::error("the container has stopped"));
                let _ = control::write_line(&conn, &reply);
            }
        })
        .context("starting the control listener")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(extra: &str) -> Plan {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        let config = format!(
            r#"{{"ociVersion": "1.2.0", "root": {{"path": "rootfs"}}, "hostname": "box",
                "process": {{"args": ["true"], "cwd": "/", "user": {{"uid": 0, "gid": 0}}}}{extra}}}"#
        );
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        crate::bundle::load(dir.path()).unwrap()
    }

    #[test]
    fn the_annotations_kernel_params_follow_runvms_own_words() {
        let p = plan(r#", "annotations": {"io.runvm.kernel_params": "mitigations=off  nosmt"}"#);
        assert_eq!(
            guest_cmdline(&p),
            "quiet runvm.rootfs=rootfs runvm.hostname=box mitigations=off nosmt"
        );
        assert_eq!(
            guest_cmdline(&plan("")),
            "quiet runvm.rootfs=rootfs runvm.hostname=box"
        );
    }

    #[test]
    fn an_overlay_on_a_read_only_root_is_not_asked_for() {
        let p = plan(r#", "annotations": {"io.runvm.rootfs_overlay": "true"}"#);
        assert!(guest_cmdline(&p).ends_with(" runvm.rootfs_overlay runvm.hostname=box"));
        let mut ro = p.clone();
        ro.rootfs_ro = true;
        let line = guest_cmdline(&ro);
        assert!(
            line.contains(" runvm.rootfs_ro ") && !line.contains("overlay"),
            "{line}"
        );
    }
}
