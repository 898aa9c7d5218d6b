//! `runvm exec`: one more process in a running container. The monitor runs
//! it in the guest and relays its stdio through the fds this command passes
//! it; this command (or, with `--detach`, a small waiter process it leaves
//! behind, whose PID goes to `--pid-file`) stands for the process on the
//! host: it forwards signals and exits with the process's status.

use std::fs::File;

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signalfd::SignalFd;
use runvm_protocol::ProcessSpec;

use crate::control::{self, ExecExit, Request};
use crate::lifecycle::{self, Globals};
use crate::state::{self, Root, Status};
use crate::{bundle, console, logger, signals};

/// How long the monitor may take to start the process: longer than its two
/// agent calls may wait together at the default boot timeout (120 s each),
/// so a guest that stops answering is usually reported by the monitor,
/// which knows which step hung.
const EXEC_TIMEOUT: Duration = Duration::from_secs(300);
/// The status an exec reports when its container ended under it.
pub const CONTAINER_GONE_STATUS: i32 = 128 + libc::SIGKILL;
/// The fd the detached waiter finds its connection on.
const WAITER_FD: i32 = 3;
/// How long terminal output may trail the exit status.
const TTY_DRAIN: Duration = Duration::from_secs(2);

/// What `runvm exec` was asked to run (its flags).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ExecOpts {
    /// The command and its arguments (unless --process).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// An OCI process JSON file describing the process.
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Allocate a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Return once the process started (its stand-in's PID goes to --pid-file).
    #[arg(short, long)]
    pub detach: bool,
    /// Write the PID of the process's host stand-in here.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Unix socket to send the terminal's master fd to.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Set an environment variable (KEY=VALUE) over the container's, repeatable.
    #[arg(short, long)]
    pub env: Vec<String>,
    /// Working directory in the container.
    #[arg(long)]
    pub cwd: Option<String>,
    /// UID or UID:GID to run as (numbers).
    #[arg(short, long)]
    pub user: Option<String>,
    /// Supplementary group IDs (comma-separated or repeated).
    #[arg(short = 'g', long, value_delimiter = ',')]
    pub additional_gids: Vec<u32>,
    /// Set no_new_privs for the process.
    #[arg(long)]
    pub no_new_privs: bool,
    /// Pass N more fds: not supported by runvm (must be 0).
    #[arg(long, default_value_t = 0)]
    pub preserve_fds: u32,
    /// Accepted for runc compatibility; the guest has no SELinux labels.
    #[arg(long, hide = true)]
    pub process_label: Option<String>,
    /// Accepted for runc compatibility; the guest has no AppArmor.
    #[arg(long, hide = true)]
    pub apparmor: Option<String>,
}

/// `runvm exec`: returns the process's exit status (0 once it started,
/// with `--detach`).
pub fn exec(g: &Globals, id: &str, opts: &ExecOpts) -> anyhow::Result<i32> {
    if opts.preserve_fds > 0 {
        bail!("--preserve-fds is not supported: a micro-VM cannot inherit host fds");
    }
    if opts.process_label.is_some() || opts.apparmor.is_some() {
        logger::debug("ignoring --process-label/--apparmor: they do not apply to a micro-VM");
    }
    let dir = Root::new(&g.root).open(id)?;
    let record = dir.load_live()?;
    match record.status {
        Status::Created | Status::Running => {}
        s => bail!("cannot exec in container {id}: it is {s}"),
    }
    let process = process_for(&record.bundle, opts)?;
    if process.terminal && opts.detach && opts.console_socket.is_none() {
        bail!("--detach with a terminal needs --console-socket");
    }
    let console_socket = match (&opts.console_socket, process.terminal) {
        (Some(s), true) => Some(std::path::absolute(s)?),
        _ => None,
    };
    let local_tty = process.terminal && console_socket.is_none();
    // Blocked before the process starts, so none is lost in between.
    let sigs = signals::forwarded_signalfd()?;
    let stdio = [0, 1, 2];
    let fds: &[i32] = if process.terminal { &[] } else { &stdio };
    let request = Request::Exec {
        process: Box::new(process),
        console_socket,
    };
    let sock = dir.file(state::CONTROL_SOCKET);
    let conn = if local_tty {
        let conn = vmm::unix_path::connect(&sock).with_context(|| {
            format!("cannot reach the container's monitor at {}", sock.display())
        })?;
        let conn = send_exec(conn, &request)?;
        let master = console::receive(&conn)?;
        let (conn, _) = finish_call(conn)?;
        return foreground_tty(conn, sigs, master, opts.pid_file.as_deref());
    } else {
        control::call_with_fds(&sock, &request, fds, EXEC_TIMEOUT)?.0
    };
    if opts.detach {
        let pid = spawn_waiter(g, &conn)?;
        if let Some(p) = &opts.pid_file {
            lifecycle::write_pid_file(p, pid)?;
        }
        return Ok(0);
    }
    if let Some(p) = &opts.pid_file {
        lifecycle::write_pid_file(p, std::process::id())?;
    }
    Ok(wait(conn, sigs, None))
}

/// Sends `request` on a fresh connection (the terminal comes back on it).
fn send_exec(conn: UnixStream, request: &Request) -> anyhow::Result<UnixStream> {
    conn.set_read_timeout(Some(EXEC_TIMEOUT))?;
    control::write_line(&conn, request)?;
    Ok(conn)
}

/// Reads the monitor's reply to an exec.
fn finish_call(conn: UnixStream) -> anyhow::Result<(UnixStream, control::Reply)> {
    let line = control::read_line(&conn)?.context("the container's monitor hung up")?;
    let reply: control::Reply = serde_json::from_slice(&line).context("garbled monitor reply")?;
    if let Some(e) = reply.error {
        bail!("{e}");
    }
    conn.set_read_timeout(None)?;
    Ok((conn, reply))
}

/// The process to run: `--process`, or the container's own process with
/// the command and flags applied (as runc builds it).
fn process_for(bundle_dir: &Path, opts: &ExecOpts) -> anyhow::Result<ProcessSpec> {
    let mut p = match &opts.process {
        Some(file) => {
            if !opts.args.is_empty() {
                bail!("give either --process or a command, not both");
            }
            let text = std::fs::read(file)
                .with_context(|| format!("cannot read process file {}", file.display()))?;
            let oci: oci_spec::runtime::Process = serde_json::from_slice(&text)
                .with_context(|| format!("invalid process file {}", file.display()))?;
            bundle::process_spec(&oci)?
        }
        None => {
            if opts.args.is_empty() {
                bail!("exec needs a command (or --process)");
            }
            let mut p = bundle::load(bundle_dir)?.process;
            p.args = opts.args.clone();
            // As runc: only the flag asks for a terminal here.
            p.terminal = false;
            p.console_size = None;
            p
        }
    };
    for kv in &opts.env {
        let Some((key, _)) = kv.split_once('=') else {
            bail!("--env {kv:?} is not KEY=VALUE");
        };
        p.env
            .retain(|e| e.split_once('=').map(|(k, _)| k) != Some(key));
        p.env.push(kv.clone());
    }
    if let Some(cwd) = &opts.cwd {
        if !cwd.starts_with('/') {
            bail!("--cwd {cwd:?} is not an absolute path");
        }
        p.cwd = cwd.clone();
    }
    if let Some(user) = &opts.user {
        let (uid, gid) = parse_user(user)?;
        p.uid = uid;
        p.gid = gid.unwrap_or(p.gid);
    }
    if !opts.additional_gids.is_empty() {
        p.additional_gids = opts.additional_gids.clone();
    }
    if opts.tty {
        p.terminal = true;
    }
    p.no_new_privileges |= opts.no_new_privs;
    Ok(p)
}

/// `UID[:GID]`, numbers only (names would need the container's passwd).
fn parse_user(s: &str) -> anyhow::Result<(u32, Option<u32>)> {
    let bad = || format!("--user {s:?} is not UID[:GID] (numbers)");
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid = u.parse().with_context(bad)?;
    let gid = g.map(|g| g.parse()).transpose().with_context(bad)?;
    Ok((uid, gid))
}

/// Leaves a waiter process holding the exec's connection; returns its PID.
fn spawn_waiter(g: &Globals, conn: &UnixStream) -> anyhow::Result<u32> {
    let mut cmd = g.self_command()?;
    cmd.arg("exec-wait")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    crate::fdpass::inherit_as(&mut cmd, conn.as_raw_fd(), WAITER_FD)
        .context("cannot hand the exec waiter its connection")?;
    let child = cmd.spawn().context("cannot start the exec waiter")?;
    Ok(child.id())
}

/// `runvm exec-wait` (internal): the detached exec's stand-in.
pub fn waiter() -> anyhow::Result<i32> {
    let sigs = signals::forwarded_signalfd()?;
    // SAFETY: `spawn_waiter` put the exec's connection on this fd for
    // this process alone.
    let conn = UnixStream::from(unsafe { OwnedFd::from_raw_fd(WAITER_FD) });
    Ok(wait(conn, sigs, None))
}

/// Forwards signals to the process until its status arrives; returns it.
/// `winch_tty` gets the caller's terminal size on SIGWINCH instead. The
/// monitor first learns that this process stands for the exec (`ps`).
fn wait(conn: UnixStream, sigs: SignalFd, winch_tty: Option<File>) -> i32 {
    let me = Request::StandIn {
        pid: std::process::id() as i32,
    };
    let _ = control::write_line(&conn, &me);
    if let Ok(out) = conn.try_clone() {
        let _ = vmm::threads::named("signals").spawn(move || {
            while let Ok(Some(info)) = sigs.read_signal() {
                let signal = info.ssi_signo as i32;
                if signal == libc::SIGWINCH {
                    if let Some(t) = &winch_tty {
                        console::copy_size(std::io::stdin().as_fd(), t.as_fd());
                    }
                    if winch_tty.is_some() {
                        continue;
                    }
                }
                if control::write_line(&out, &Request::Kill { signal }).is_err() {
                    return;
                }
            }
        });
    }
    match control::read_line(&conn) {
        Ok(Some(line)) => match serde_json::from_slice::<ExecExit>(&line) {
            Ok(e) => e.status,
            Err(_) => CONTAINER_GONE_STATUS,
        },
        _ => CONTAINER_GONE_STATUS,
    }
}

/// A terminal session in this process: this terminal (raw) to the
/// process's and back, until its status arrives.
fn foreground_tty(
    conn: UnixStream,
    sigs: SignalFd,
    master: File,
    pid_file: Option<&Path>,
) -> anyhow::Result<i32> {
    if let Some(p) = pid_file {
        lifecycle::write_pid_file(p, std::process::id())?;
    }
    let attached = console::Attached::start(master)?;
    let status = wait(conn, sigs, Some(attached.master().try_clone()?));
    attached.finish(TTY_DRAIN);
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_numbers() {
        assert_eq!(parse_user("1000").unwrap(), (1000, None));
        assert_eq!(parse_user("1000:100").unwrap(), (1000, Some(100)));
        for bad in ["", "root", "1:", ":1", "1:2:3", "-1"] {
            assert!(parse_user(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_apply_over_the_containers_process() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
                "process":{"args":["sleep","9"],"cwd":"/","user":{"uid":5,"gid":6},
                "env":["PATH=/bin","A=1"],"terminal":true,"consoleSize":{"height":1,"width":2}}}"#,
        )
        .unwrap();
        let opts = ExecOpts {
            args: vec!["ls".into(), "-l".into()],
            env: vec!["A=2".into(), "B=3".into()],
            cwd: Some("/tmp".into()),
            user: Some("7".into()),
            ..Default::default()
        };
        let p = process_for(dir.path(), &opts).unwrap();
        assert_eq!(p.args, ["ls", "-l"]);
        assert_eq!(p.env, ["PATH=/bin", "A=2", "B=3"]);
        assert_eq!(p.cwd, "/tmp");
        assert_eq!((p.uid, p.gid), (7, 6));
        assert_eq!(p.console_size, None);
        assert!(!p.terminal, "only --tty asks for a terminal");
        let tty = ExecOpts {
            tty: true,
            ..opts.clone()
        };
        assert!(process_for(dir.path(), &tty).unwrap().terminal);

        for bad in [
            ExecOpts::default(),
            ExecOpts {
                args: vec!["x".into()],
                env: vec!["NOEQUALS".into()],
                ..Default::default()
            },
            ExecOpts {
                args: vec!["x".into()],
                cwd: Some("relative".into()),
                ..Default::default()
            },
            ExecOpts {
                args: vec!["x".into()],
                process: Some(dir.path().join("config.json")),
                ..Default::default()
            },
        ] {
            assert!(process_for(dir.path(), &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_process_file_is_read_as_oci_process_json() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("process.json");
        std::fs::write(
            &file,
            r#"{"args":["id"],"cwd":"/","user":{"uid":1,"gid":2},"env":["X=y"]}"#,
        )
        .unwrap();
        let opts = ExecOpts {
            process: Some(file.clone()),
            ..Default::default()
        };
        let p = process_for(dir.path(), &opts).unwrap();
        assert_eq!(p.args, ["id"]);
        assert_eq!((p.uid, p.gid), (1, 2));
        std::fs::write(&file, "{not json").unwrap();
        assert!(process_for(dir.path(), &opts).is_err());
    }
}
