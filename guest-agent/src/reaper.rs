//! Collects every child's exit status with waitpid(-1): as PID 1 the agent
//! must reap orphans too, so no other code may wait on a single child.
//! Processes the agent started get their status through [`Reaper::watch`].
//! The agent forks them itself (held.rs), never with `Command::spawn`,
//! which would wait on its own child.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Statuses of children nobody watches yet, kept briefly: a process can
/// exit before its starter registers it. Old ones (orphans) fall off.
const MAX_UNCLAIMED: usize = 1024;
/// How long the reaper naps when there is no child (orphans of processes
/// the agent did not fork can appear any time; its own forks wake it).
const NO_CHILDREN_NAP: Duration = Duration::from_millis(20);

#[derive(Default)]
struct State {
    watching: HashMap<i32, Sender<i32>>,
    unclaimed: VecDeque<(i32, i32)>,
}

/// The process-wide reaper.
#[derive(Default)]
pub struct Reaper {
    state: Mutex<State>,
    /// The reaping thread, unparked after each fork: with no children it
    /// naps, and a child that ends within the nap is then seen at once.
    thread: std::sync::OnceLock<thread::Thread>,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper").finish_non_exhaustive()
    }
}

impl Reaper {
    /// Starts reaping on a background thread.
    pub fn start() -> std::io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper::default());
        let r = reaper.clone();
        let handle = thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.run())?;
        let _ = reaper.thread.set(handle.thread().clone());
        Ok(reaper)
    }

    fn run(&self) {
        loop {
            // Wait until some child can be reaped, without reaping it.
            match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(_) | Err(Errno::EINTR) => {}
                // No children right now: until the next fork, at most.
                Err(_) => {
                    thread::park_timeout(NO_CHILDREN_NAP);
                    continue;
                }
            }
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(pid, code)) => self.deliver(pid.as_raw(), code),
                    Ok(WaitStatus::Signaled(pid, sig, _)) => {
                        self.deliver(pid.as_raw(), 128 + sig as i32)
                    }
                    Err(Errno::EINTR) => {}
                    // Nothing more to reap.
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
    }

    /// Tells the reaper a child was just forked, so that a nap without
    /// children ends now.
    pub fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    fn deliver(&self, pid: i32, status: i32) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = st.watching.remove(&pid) {
            let _ = tx.send(status);
        } else {
            if st.unclaimed.len() >= MAX_UNCLAIMED {
                st.unclaimed.pop_front();
            }
            st.unclaimed.push_back((pid, status));
        }
    }

    /// The exit status (code, or 128 + signal) of child `pid`, once it ends.
    pub fn watch(&self, pid: i32) -> Receiver<i32> {
        let (tx, rx) = mpsc::channel();
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = st.unclaimed.iter().position(|(p, _)| *p == pid) {
            if let Some((_, status)) = st.unclaimed.remove(i) {
                let _ = tx.send(status);
            }
        } else {
            st.watching.insert(pid, tx);
        }
        rx
    }
}
