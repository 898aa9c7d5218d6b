//! The container's monitor as a process: forked from `create` (or `run`)
//! when that is safe, otherwise spawned as `runvm monitor ID`.
//!
//! A fork saves the monitor an exec of runvm: the dynamic loader relocating
//! a 15 MB position-independent binary, and parsing the command line again.
//! That is about a millisecond on hardware but about 100 ms of every
//! `create` under nested virtualization. A child forked from a process with
//! one thread may run any code; with another thread alive (which could have
//! held the allocator's lock at the fork) only exec is safe, so then the
//! monitor is spawned instead.
//!
//! The forked child is made to look like the exec'd one: descriptors marked
//! close-on-exec are closed, the signal mask is cleared, and in terminal
//! mode its stdio is `/dev/null`.

use std::os::fd::RawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};

use nix::sys::signal::{kill, SigSet, Signal};
use nix::unistd::{ForkResult, Pid};

/// The monitor, however it was started.
#[derive(Debug)]
pub enum MonitorProcess {
    /// A child forked from this process; its status once reaped.
    Forked(Pid, Option<ExitStatus>),
    /// `runvm monitor ID`.
    Spawned(Child),
}

impl MonitorProcess {
    /// The monitor's PID.
    pub fn id(&self) -> u32 {
        match self {
            MonitorProcess::Forked(pid, _) => pid.as_raw() as u32,
            MonitorProcess::Spawned(c) => c.id(),
        }
    }

    /// Its exit status if it has ended, without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self {
            MonitorProcess::Forked(pid, status) => {
                if status.is_none() {
                    *status = reap(*pid, libc::WNOHANG)?;
                }
                Ok(*status)
            }
            MonitorProcess::Spawned(c) => c.try_wait(),
        }
    }

    /// Waits for it to end.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            MonitorProcess::Forked(pid, status) => loop {
                if let Some(s) = *status {
                    return Ok(s);
                }
                *status = reap(*pid, 0)?;
            },
            MonitorProcess::Spawned(c) => c.wait(),
        }
    }

    /// Kills it unless it was already reaped (its PID may be another
    /// process's by then).
    pub fn kill(&mut self) {
        match self {
            MonitorProcess::Forked(pid, None) => {
                let _ = kill(*pid, Signal::SIGKILL);
            }
            MonitorProcess::Forked(_, Some(_)) => {}
            MonitorProcess::Spawned(c) => {
                let _ = c.kill();
            }
        }
    }
}

/// `waitpid` for `pid`: its status, or `None` with `WNOHANG` while it runs.
fn reap(pid: Pid, flags: libc::c_int) -> std::io::Result<Option<ExitStatus>> {
    let mut raw = 0;
    loop {
        // SAFETY: waitpid writes only the status integer it is given.
        let r = unsafe { libc::waitpid(pid.as_raw(), &mut raw, flags) };
        match r {
            0 => return Ok(None),
            r if r > 0 => return Ok(Some(ExitStatus::from_raw(raw))),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
}

/// Whether this process runs one thread, from `/proc/self/status`.
fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse::<u32>().ok())
        })
        == Some(1)
}

/// Forks a child that runs `body` and exits with what it returns; `None`
/// (nothing forked) when this process has more than one thread. In the
/// child, descriptors 3 and up that are close-on-exec are closed except
/// those in `keep`, the signal mask is cleared and, with `null_stdio`,
/// stdin, stdout and stderr are `/dev/null`.
pub fn fork_running(
    keep: &[RawFd],
    null_stdio: bool,
    body: impl FnOnce() -> i32,
) -> std::io::Result<Option<Pid>> {
    if !single_threaded() {
        return Ok(None);
    }
    use std::io::Write;
    // Anything buffered would otherwise be written twice.
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: this process has a single thread (checked just above, and
    // only this thread could have started another since), so the child
    // inherits no lock held by a thread that does not exist there.
    match unsafe { nix::unistd::fork() }.map_err(std::io::Error::from)? {
        ForkResult::Parent { child } => Ok(Some(child)),
        ForkResult::Child => {
            let code = match become_like_exec(keep, null_stdio) {
                // A panic must not unwind into the parent's code, which
                // this child would then go on running.
                Ok(()) => {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101)
                }
                Err(e) => {
                    crate::logger::error(&format!("cannot set up the forked monitor: {e}"));
                    1
                }
            };
            std::process::exit(code)
        }
    }
}

/// What an exec would have done to the forked child's descriptors and
/// signal mask.
fn become_like_exec(keep: &[RawFd], null_stdio: bool) -> std::io::Result<()> {
    SigSet::empty()
        .thread_set_mask()
        .map_err(std::io::Error::from)?;
    if null_stdio {
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        for target in 0..3 {
            // SAFETY: dup2 onto a standard descriptor from one this child
            // owns; whatever stdio was there is replaced, as meant.
            if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), target) } < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    for fd in open {
        if fd < 3 || keep.contains(&fd) {
            continue;
        }
        // SAFETY: F_GETFD only reads a descriptor's flags; the directory
        // listing's own descriptor is closed by now and fails with EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags >= 0 && flags & libc::FD_CLOEXEC != 0 {
            // SAFETY: the descriptor was the parent's, marked to close at
            // exec; nothing in this child goes on to use it, and whatever
            // owned it in the parent is never dropped here (the child
            // leaves through `exit`).
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaping_a_forked_child_reports_its_status_once() {
        // A child exec'd here stands in for a forked one: reaping is the
        // same, and a test harness runs threads, which rules out forking.
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        std::mem::forget(child);
        let mut m = MonitorProcess::Forked(pid, None);
        assert_eq!(m.wait().unwrap().code(), Some(7));
        // Reaped already: the status is kept, and kill sends nothing.
        assert_eq!(m.try_wait().unwrap().map(|s| s.code()), Some(Some(7)));
        m.kill();
        assert_eq!(m.id(), pid.as_raw() as u32);
    }

    #[test]
    fn the_child_keeps_only_what_an_exec_would_keep() {
        use std::os::fd::{AsRawFd, IntoRawFd};
        let (closing, _w1) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (kept, _w2) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (inherited, _w3) = nix::unistd::pipe().unwrap();
        let fds = [closing.as_raw_fd(), kept.as_raw_fd(), inherited.as_raw_fd()];
        // SAFETY: the harness has other threads, but the child only reads
        // a directory, calls fcntl and leaves with _exit; glibc's fork
        // makes malloc usable in the child.
        match unsafe { nix::unistd::fork() }.unwrap() {
            ForkResult::Child => {
                let ok = become_like_exec(&[fds[1]], false).is_ok();
                // SAFETY: F_GETFD only reads a descriptor's flags.
                let open = |fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
                let code = if !ok {
                    2
                } else if open(fds[0]) {
                    3
                } else if !open(fds[1]) {
                    4
                } else if !open(fds[2]) {
                    5
                } else {
                    0
                };
                // SAFETY: leaves the child without running the harness's
                // exit handlers.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => {
                let status = reap(child, 0).unwrap().unwrap();
                assert_eq!(status.code(), Some(0), "child status {status:?}");
            }
        }
        // Still open here: the sweep happened in the child only.
        for fd in [closing, kept, inherited] {
            let raw = fd.into_raw_fd();
            // SAFETY: F_GETFD only reads; the descriptor is then closed
            // by the OwnedFd it came from being rebuilt and dropped.
            assert!(unsafe { libc::fcntl(raw, libc::F_GETFD) } >= 0);
            // SAFETY: `raw` was just released by its OwnedFd.
            drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) });
        }
    }

    #[test]
    fn a_process_with_threads_is_not_forked() {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || stopped.recv());
        assert!(!single_threaded());
        let forked = fork_running(&[], false, || 0).unwrap();
        assert!(forked.is_none());
        drop(stop);
        let _ = other.join();
    }
}
