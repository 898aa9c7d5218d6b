//! `create`, `start`, `kill`, `delete` and `run`: the commands that move a
//! container through its states.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::control::{self, Request};
use crate::monitor_process::{self, MonitorProcess};
use crate::state::{self, ContainerDir, Record, Root, Status};
use crate::{assets, bundle, console, logger, ready, signals};

/// How long a control request may take (start and kill are one agent call).
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `delete` waits for a monitor to end after asking.
const STOP_WAIT: Duration = Duration::from_secs(15);
/// The longest `create` waits on the monitor's ready pipe before it looks
/// at the monitor and the state again.
const READY_WAIT: Duration = Duration::from_millis(500);
/// Extra time `create` gives the monitor beyond the boot timeout.
const CREATE_MARGIN: Duration = Duration::from_secs(30);

/// Global flags the monitor process needs again.
#[derive(Debug, Clone)]
pub struct Globals {
    /// `--root`.
    pub root: PathBuf,
    /// `--log`.
    pub log: Option<PathBuf>,
    /// `--log-format`.
    pub log_format: String,
    /// `--debug`.
    pub debug: bool,
}

impl Globals {
    /// This executable with the global flags, for an internal subcommand.
    pub fn self_command(&self) -> anyhow::Result<Command> {
        let exe = std::env::current_exe().context("cannot find the runvm executable")?;
        let mut cmd = Command::new(exe);
        cmd.arg("--root").arg(&self.root);
        if let Some(log) = &self.log {
            cmd.arg("--log").arg(log);
        }
        cmd.arg("--log-format").arg(&self.log_format);
        if self.debug {
            cmd.arg("--debug");
        }
        Ok(cmd)
    }

    fn monitor_command(
        &self,
        id: &str,
        console: Option<&ConsoleTo<'_>>,
        ready: &OwnedFd,
    ) -> anyhow::Result<Command> {
        let mut cmd = self.self_command()?;
        cmd.arg("monitor").arg(id);
        match console {
            Some(ConsoleTo::Socket(s)) => {
                cmd.arg("--console-socket").arg(s);
            }
            Some(ConsoleTo::Caller(conn)) => {
                crate::fdpass::inherit_as(&mut cmd, conn.as_raw_fd(), CONSOLE_FD)?;
                cmd.arg("--console-fd").arg(CONSOLE_FD.to_string());
            }
            None => {}
        }
        crate::fdpass::inherit_as(&mut cmd, ready.as_raw_fd(), ready::MONITOR_FD)?;
        cmd.arg("--ready-fd").arg(ready::MONITOR_FD.to_string());
        Ok(cmd)
    }

    /// Starts the monitor of `dir`: forked from this process where that is
    /// safe (see `monitor_process`), else spawned as `runvm monitor ID`.
    /// In terminal mode the container's stdio is the pty, and the monitor
    /// must not hold `create`'s own: containerd's shim reads those to EOF
    /// before it goes on (runc's init does not keep them).
    fn start_monitor(
        &self,
        id: &str,
        dir: &ContainerDir,
        console: Option<&ConsoleTo<'_>>,
        ready: &OwnedFd,
        terminal: bool,
    ) -> anyhow::Result<MonitorProcess> {
        let mut keep = vec![ready.as_raw_fd()];
        keep.extend(logger::file_fd());
        let target = match console {
            Some(ConsoleTo::Socket(s)) => Some(console::Target::Socket(s.to_path_buf())),
            Some(ConsoleTo::Caller(conn)) => {
                keep.push(conn.as_raw_fd());
                Some(console::Target::Fd(conn.as_raw_fd()))
            }
            None => None,
        };
        let ready_fd = ready.as_raw_fd();
        let forked = monitor_process::fork_running(&keep, terminal, || {
            // The child adopts the write end: the parent's owner of it is
            // never dropped here, as the child leaves through `exit`.
            match ready::monitor_end(ready_fd) {
                Ok(end) => crate::monitor::run(dir, target, Some(end)),
                Err(e) => {
                    logger::error(&format!("{e:#}"));
                    1
                }
            }
        })
        .context("cannot fork the container monitor")?;
        if let Some(pid) = forked {
            return Ok(MonitorProcess::Forked(pid, None));
        }
        logger::debug("runvm has more than one thread here: the monitor is spawned, not forked");
        let mut c = self.monitor_command(id, console, ready)?;
        if terminal {
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
        }
        Ok(MonitorProcess::Spawned(c.spawn()?))
    }
}

/// Where the terminal's master goes in terminal mode.
enum ConsoleTo<'a> {
    /// `--console-socket`.
    Socket(&'a Path),
    /// This process, on its end of a socket pair (foreground `run`).
    Caller(&'a UnixStream),
}

/// The fd the monitor finds the caller's console connection on.
const CONSOLE_FD: i32 = 3;
/// How long terminal output may trail the container's end.
const TTY_DRAIN: Duration = Duration::from_secs(2);

/// `runvm create`: boots the VM and prepares the process; the monitor's PID
/// goes to `pid_file`.
pub fn create(
    g: &Globals,
    id: &str,
    bundle_dir: &Path,
    pid_file: Option<&Path>,
    console_socket: Option<&Path>,
) -> anyhow::Result<()> {
    let console = console_socket.map(ConsoleTo::Socket);
    spawn_monitor(g, id, bundle_dir, pid_file, console)?;
    Ok(())
}

/// Validates everything it can, creates the state directory and starts the
/// monitor; returns once the process is created in the guest and the
/// monitor's PID is in `pid_file`. On failure nothing is left behind.
fn spawn_monitor(
    g: &Globals,
    id: &str,
    bundle_dir: &Path,
    pid_file: Option<&Path>,
    console: Option<ConsoleTo<'_>>,
) -> anyhow::Result<(ContainerDir, MonitorProcess)> {
    state::validate_id(id)?;
    let plan = bundle::load(bundle_dir)?;
    match (plan.process.terminal, &console) {
        (true, None) => bail!("process.terminal is true: --console-socket is required"),
        (false, Some(_)) => {
            logger::debug("ignoring --console-socket: process.terminal is false");
        }
        _ => {}
    }
    // The socket path must resolve the same from the monitor.
    let absolute = match &console {
        Some(ConsoleTo::Socket(s)) => Some(std::path::absolute(s)?),
        _ => None,
    };
    let console = match console {
        Some(ConsoleTo::Socket(_)) => absolute.as_deref().map(ConsoleTo::Socket),
        other => other,
    };
    // Fail before anything exists when the guest cannot be built.
    assets::kernel(plan.kernel.as_deref())?;
    assets::agent()?;
    let bundle_abs = bundle_dir.canonicalize()?;
    let root = Root::new(&g.root);
    let dir = root.create(id)?;
    let record = Record {
        id: id.to_owned(),
        bundle: bundle_abs,
        rootfs: plan.rootfs.clone(),
        pid: None,
        pid_start: None,
        status: Status::Creating,
        exit_status: None,
        created: state::now_rfc3339(),
        annotations: plan.annotations.clone(),
        network: None,
        published: Vec::new(),
        host_cgroup: None,
    };
    if let Err(e) = dir.save(&record) {
        let _ = dir.remove();
        return Err(e);
    }
    let terminal = plan.process.terminal;
    let console = console.filter(|_| terminal);
    let (mut ready, ready_end) = match ready::pair() {
        Ok(p) => p,
        Err(e) => {
            let _ = dir.remove();
            return Err(e);
        }
    };
    let spawned = g.start_monitor(id, &dir, console.as_ref(), &ready_end, terminal);
    // Only the monitor may hold the write end, or its closing is never seen.
    drop(ready_end);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let _ = dir.remove();
            return Err(e.context("cannot start the container monitor"));
        }
    };
    let deadline = Instant::now() + plan.boot_timeout + CREATE_MARGIN;
    loop {
        if let Some(status) = child.try_wait()? {
            let why = std::fs::read_to_string(dir.file(state::MONITOR_ERROR))
                .unwrap_or_else(|_| format!("the container monitor exited ({status})"));
            let _ = dir.remove();
            bail!("{why}");
        }
        if let Ok(r) = dir.load() {
            if r.status == Status::Created {
                if let Some(p) = pid_file {
                    if let Err(e) = write_pid_file(p, child.id()) {
                        destroy(dir, Some(child));
                        return Err(e);
                    }
                }
                return Ok((dir, child));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            destroy(dir, Some(child));
            bail!("the container's VM did not come up in time");
        }
        // Woken at once by the monitor's word or its end closing; the
        // limit only bounds how late a stuck monitor is noticed.
        ready.wait(left.min(READY_WAIT));
    }
}

/// Ends a monitor we started and removes the state.
fn destroy(dir: ContainerDir, child: Option<MonitorProcess>) {
    if let Some(mut c) = child {
        c.kill();
        let _ = c.wait();
    }
    let _ = dir.remove();
}

/// Writes `pid` to `path` atomically (callers poll for it).
pub fn write_pid_file(path: &Path, pid: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("runvm-tmp");
    std::fs::write(&tmp, pid.to_string())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write pid file {}", path.display()))
}

/// `runvm start`.
pub fn start(g: &Globals, id: &str) -> anyhow::Result<()> {
    let dir = Root::new(&g.root).open(id)?;
    let r = dir.load_live()?;
    match r.status {
        Status::Created => {}
        Status::Stopped => bail!("cannot start a container that has stopped"),
        Status::Running => bail!("cannot start an already running container"),
        Status::Paused => bail!("cannot start a paused container"),
        Status::Creating => bail!("cannot start a container that is still being created"),
    }
    control::call(
        &dir.file(state::CONTROL_SOCKET),
        &Request::Start,
        CONTROL_TIMEOUT,
    )?;
    Ok(())
}

/// `runvm pause`: stops the VM's vCPUs.
pub fn pause(g: &Globals, id: &str) -> anyhow::Result<()> {
    let dir = Root::new(&g.root).open(id)?;
    match dir.load_live()?.status {
        Status::Created | Status::Running => {}
        Status::Paused => bail!("container {id} is already paused"),
        s => bail!("container {id} is not running (state {s})"),
    }
    control::call(
        &dir.file(state::CONTROL_SOCKET),
        &Request::Pause,
        CONTROL_TIMEOUT,
    )?;
    Ok(())
}

/// `runvm resume`.
pub fn resume(g: &Globals, id: &str) -> anyhow::Result<()> {
    let dir = Root::new(&g.root).open(id)?;
    match dir.load_live()?.status {
        Status::Paused => {}
        s => bail!("container {id} is not paused (state {s})"),
    }
    control::call(
        &dir.file(state::CONTROL_SOCKET),
        &Request::Resume,
        CONTROL_TIMEOUT,
    )?;
    Ok(())
}

/// `runvm update`: new limits for the container's cgroup in the guest.
pub fn update(g: &Globals, id: &str, opts: &crate::limits::UpdateOpts) -> anyhow::Result<()> {
    let (resources, ignored) = opts.resources(std::io::stdin())?;
    for what in ignored {
        logger::debug(&format!("update: ignoring {what}"));
    }
    let dir = Root::new(&g.root).open(id)?;
    match dir.load_live()?.status {
        Status::Created | Status::Running => {}
        Status::Paused => bail!("container {id} is paused: resume it to update its limits"),
        s => bail!("container {id} is not running (state {s})"),
    }
    if resources.is_empty() {
        return Ok(());
    }
    control::call(
        &dir.file(state::CONTROL_SOCKET),
        &Request::Update { resources },
        CONTROL_TIMEOUT,
    )?;
    Ok(())
}

/// Asks a live container's monitor for `req` (`ps`, `stats`).
pub fn query(g: &Globals, id: &str, req: &Request) -> anyhow::Result<control::Reply> {
    let dir = Root::new(&g.root).open(id)?;
    match dir.load_live()?.status {
        Status::Created | Status::Running => {}
        s => bail!("container {id} is not running (state {s})"),
    }
    control::call(&dir.file(state::CONTROL_SOCKET), req, CONTROL_TIMEOUT)
}

/// `runvm kill`.
pub fn kill_container(g: &Globals, id: &str, signal: &str, all: bool) -> anyhow::Result<()> {
    let signal = signals::parse(signal)?;
    let dir = Root::new(&g.root).open(id)?;
    let r = dir.load_live()?;
    match r.status {
        Status::Created | Status::Running | Status::Paused => {}
        // runc accepts `kill --all` of a stopped container as a no-op.
        Status::Stopped if all => return Ok(()),
        s => bail!("container {id} is not running (state {s})"),
    }
    control::call(
        &dir.file(state::CONTROL_SOCKET),
        &Request::Kill { signal },
        CONTROL_TIMEOUT,
    )?;
    Ok(())
}

/// `runvm delete`.
pub fn delete(g: &Globals, id: &str, force: bool) -> anyhow::Result<()> {
    let root = Root::new(&g.root);
    let dir = match root.open(id) {
        Ok(d) => d,
        // runc: `delete --force` of a missing container succeeds.
        Err(_) if force && state::validate_id(id).is_ok() => return Ok(()),
        Err(e) => return Err(e),
    };
    let r = dir.load_live()?;
    match r.status {
        Status::Stopped => {}
        Status::Running | Status::Creating | Status::Paused if !force => {
            bail!(
                "cannot delete container {id} that is not stopped: {}",
                r.status
            )
        }
        _ => stop_monitor(&dir, &r),
    }
    // A monitor that was killed could not undo its network splice.
    if let Some(net) = dir.load().ok().and_then(|r| r.network) {
        crate::network::Attached::from_record(net).detach();
    }
    dir.remove()
}

/// Ends a container's monitor: politely through its control socket, then
/// with SIGKILL. The VM runs inside it and goes with it.
fn stop_monitor(dir: &ContainerDir, r: &Record) {
    let sock = dir.file(state::CONTROL_SOCKET);
    if let Err(e) = control::call(&sock, &Request::Kill { signal: 9 }, CONTROL_TIMEOUT) {
        logger::debug(&format!("asking the monitor to stop: {e:#}"));
    }
    if wait_monitor_gone(r, STOP_WAIT) {
        return;
    }
    if let Some(pid) = r.pid {
        logger::warn(&format!("monitor {pid} did not stop; killing it"));
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        wait_monitor_gone(r, STOP_WAIT);
    }
}

fn wait_monitor_gone(r: &Record, limit: Duration) -> bool {
    let start = Instant::now();
    while state::monitor_alive(r) {
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// `runvm run`: create and start; without `detach`, waits for the container
/// and returns its exit status, then deletes it. A terminal goes to
/// `console_socket`, or in the foreground without one, to this process,
/// which relays it to its own terminal (as `runc run -t`).
#[allow(clippy::too_many_arguments)]
pub fn run(
    g: &Globals,
    id: &str,
    bundle_dir: &Path,
    pid_file: Option<&Path>,
    console_socket: Option<&Path>,
    detach: bool,
    keep: bool,
) -> anyhow::Result<i32> {
    // Blocked before the monitor starts so a ^C between the two reaches the
    // container through the monitor rather than killing only this process.
    let sigs = signals::forwarded_signalfd()?;
    let pair = match console_socket {
        None if !detach => Some(UnixStream::pair().context("socketpair")?),
        _ => None,
    };
    let console = match (console_socket, &pair) {
        (Some(s), _) => Some(ConsoleTo::Socket(s)),
        (None, Some((_, theirs))) => Some(ConsoleTo::Caller(theirs)),
        (None, None) => None,
    };
    let (dir, mut child) = spawn_monitor(g, id, bundle_dir, pid_file, console)?;
    // The monitor sent the master only if the process has a terminal.
    let attached = match pair {
        Some((ours, theirs)) if bundle::load(bundle_dir).is_ok_and(|p| p.process.terminal) => {
            drop(theirs);
            match console::receive(&ours).and_then(console::Attached::start) {
                Ok(a) => Some(a),
                Err(e) => {
                    destroy(dir, Some(child));
                    return Err(e);
                }
            }
        }
        _ => None,
    };
    if let Err(e) = control::call(
        &dir.file(state::CONTROL_SOCKET),
        &Request::Start,
        CONTROL_TIMEOUT,
    ) {
        destroy(dir, Some(child));
        return Err(e);
    }
    if detach {
        return Ok(0);
    }
    // Signals sent to `runvm run` itself go on to the container. Those the
    // terminal raises (^C) reach the monitor directly, as it shares this
    // process group; forwarding them too would deliver them twice.
    let monitor = Pid::from_raw(child.id() as i32);
    let winch_to = match &attached {
        Some(a) => Some(a.master().try_clone()?),
        None => None,
    };
    vmm::threads::named("forward").spawn(move || {
        while let Ok(Some(info)) = sigs.read_signal() {
            let signal = info.ssi_signo as i32;
            // Our terminal's new size goes to the container's; the
            // monitor passes it on.
            if let (libc::SIGWINCH, Some(master)) = (signal, &winch_to) {
                console::copy_size(std::io::stdin().as_fd(), master.as_fd());
                continue;
            }
            if info.ssi_code == libc::SI_KERNEL {
                continue;
            }
            if let Ok(sig) = Signal::try_from(signal) {
                let _ = kill(monitor, sig);
            }
        }
    })?;
    let status = child.wait()?;
    if let Some(a) = attached {
        a.finish(TTY_DRAIN);
    }
    let code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 255,
    };
    if !keep {
        dir.remove()?;
    }
    Ok(code)
}
