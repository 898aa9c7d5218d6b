//! The container's own PID, IPC and UTS namespaces, as runc makes them:
//! its init is PID 1 of a new PID namespace, and every exec joins the
//! init's namespaces.
//!
//! The agent is multi-threaded and its children are forked by the thread
//! that asks for them. A thread may change these three namespaces for
//! itself alone (its PID namespace only for the children it forks), so
//! the spawning thread enters them just around the fork, through
//! [`ForkInto`], and leaves again: no double fork, and the new namespaces
//! are known (and held open for execs) before the child even runs.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use runvm_protocol::Namespace;

fn clone_flag(kind: Namespace) -> libc::c_int {
    match kind {
        Namespace::Pid => libc::CLONE_NEWPID,
        Namespace::Ipc => libc::CLONE_NEWIPC,
        Namespace::Uts => libc::CLONE_NEWUTS,
    }
}

/// This thread's namespace of `kind`; for PID, the one it runs in when
/// `active`, else the one its next children are born in.
fn open_own(kind: Namespace, active: bool) -> io::Result<OwnedFd> {
    let name = match (kind, active) {
        (Namespace::Pid, true) => "pid",
        (Namespace::Pid, false) => "pid_for_children",
        (Namespace::Ipc, _) => "ipc",
        (Namespace::Uts, _) => "uts",
    };
    Ok(File::open(format!("/proc/thread-self/ns/{name}"))?.into())
}

fn setns(fd: &OwnedFd, kind: Namespace) -> io::Result<()> {
    // SAFETY: setns on a namespace descriptor we hold, with the kind's flag.
    if unsafe { libc::setns(fd.as_raw_fd(), clone_flag(kind)) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The namespaces a container's init made, held open for its execs.
#[derive(Debug)]
pub struct ContainerNs {
    fds: Vec<(Namespace, OwnedFd)>,
}

impl ContainerNs {
    /// The kinds held.
    pub fn kinds(&self) -> Vec<Namespace> {
        self.fds.iter().map(|(k, _)| *k).collect()
    }
}

/// While it lives, the processes this thread forks are born in other
/// namespaces; dropping it puts the thread back into its own.
#[derive(Debug)]
pub struct ForkInto {
    own: Vec<(Namespace, OwnedFd)>,
}

impl ForkInto {
    fn saving(kinds: &[Namespace]) -> io::Result<Self> {
        let own = kinds
            .iter()
            .map(|&k| Ok((k, open_own(k, true)?)))
            .collect::<io::Result<_>>()?;
        Ok(ForkInto { own })
    }

    /// New namespaces of `kinds` for the next fork; [`ForkInto::made`]
    /// holds them once it happened.
    pub fn new_namespaces(kinds: &[Namespace]) -> io::Result<Self> {
        let guard = Self::saving(kinds)?;
        let flags = kinds.iter().fold(0, |f, &k| f | clone_flag(k));
        // SAFETY: unshare takes flags only; for PID, IPC and UTS it changes
        // this thread's namespaces alone (the guard restores them).
        if unsafe { libc::unshare(flags) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(guard)
    }

    /// The namespaces the next fork went into, for the execs that join
    /// them later. Only after that fork: a PID namespace cannot be opened
    /// before its first process (its init) exists.
    pub fn made(&self) -> io::Result<ContainerNs> {
        let fds = self
            .own
            .iter()
            .map(|&(k, _)| Ok((k, open_own(k, false)?)))
            .collect::<io::Result<_>>()?;
        Ok(ContainerNs { fds })
    }

    /// The container's namespaces for the next fork (an exec).
    pub fn join(ns: &ContainerNs) -> io::Result<Self> {
        let guard = Self::saving(&ns.kinds())?;
        for (kind, fd) in &ns.fds {
            setns(fd, *kind)?;
        }
        Ok(guard)
    }
}

impl Drop for ForkInto {
    fn drop(&mut self) {
        for (kind, fd) in &self.own {
            if let Err(e) = setns(fd, *kind) {
                // Cannot happen for a namespace the thread was in; if it
                // did, this thread's later children would land in the
                // container's namespace, so say so where it shows.
                eprintln!("runvm-agent: cannot return to its own {kind:?} namespace: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn link(path: &str) -> String {
        std::fs::read_link(path)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    /// Runs in a thread of its own: the test harness's threads never see
    /// a changed namespace even if an assertion fails midway.
    #[test]
    fn a_new_pid_namespace_makes_the_child_pid_1_and_execs_join_it() {
        std::thread::spawn(|| {
            let own_pid = link("/proc/thread-self/ns/pid");
            let own_uts = link("/proc/thread-self/ns/uts");
            let all = [Namespace::Pid, Namespace::Ipc, Namespace::Uts];
            let guard = ForkInto::new_namespaces(&all).unwrap();
            let mut init = Command::new("sh")
                .args(["-c", "hostname ns-test; echo $$; read x || true"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let ns = guard.made().unwrap();
            assert_eq!(ns.kinds(), all);
            drop(guard);
            // The thread is back: its children are born beside it again.
            assert_eq!(link("/proc/thread-self/ns/pid_for_children"), own_pid);
            assert_eq!(link("/proc/thread-self/ns/uts"), own_uts);
            let mut first = String::new();
            use std::io::BufRead;
            let mut out = std::io::BufReader::new(init.stdout.take().unwrap());
            out.read_line(&mut first).unwrap();
            assert_eq!(first.trim(), "1", "the init is PID 1 of its namespace");

            let init_pid = link(&format!("/proc/{}/ns/pid", init.id()));
            assert_ne!(init_pid, own_pid);
            let guard = ForkInto::join(&ns).unwrap();
            let exec = Command::new("sh")
                .args(["-c", "echo $$ $(readlink /proc/self/ns/pid); hostname"])
                .output()
                .unwrap();
            drop(guard);
            let text = String::from_utf8(exec.stdout).unwrap();
            let words: Vec<&str> = text.split_whitespace().collect();
            assert_ne!(words[0], "1", "{text}");
            assert_eq!(words[1], init_pid, "{text}");
            // The init renamed its UTS namespace, which the exec shares and
            // the agent does not.
            assert_eq!(words[2], "ns-test", "{text}");
            assert_ne!(
                nix::unistd::gethostname().unwrap().to_string_lossy(),
                "ns-test"
            );
            assert_eq!(link("/proc/thread-self/ns/pid_for_children"), own_pid);
            drop(init.stdin.take());
            assert!(init.wait().unwrap().success());
        })
        .join()
        .unwrap();
    }
}
