//! Pausing a running VM (`runvm pause`): every vCPU thread parks between two
//! KVM_RUN calls until it is resumed. Devices keep their state; the guest
//! simply stops executing, and its clock jumps on resume (kvmclock). The
//! same gate lets the VM's owner end it ([`VmControl::end`]).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

/// Why a VM could not be paused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PauseError {
    /// The VM is not running (not yet started, or over).
    #[error("the VM is not running")]
    NotRunning,
    /// Some vCPU did not leave KVM_RUN in time; the VM runs on.
    #[error("the vCPUs did not stop within {0:?}")]
    Timeout(Duration),
}

#[derive(Debug, Default)]
struct Gate {
    paused: bool,
    parked: usize,
    /// pthread IDs of the vCPU threads, to kick them out of KVM_RUN.
    threads: Vec<libc::pthread_t>,
    running: bool,
    /// [`VmControl::end`] was called.
    ending: bool,
}

impl Gate {
    /// Kicks every vCPU thread out of KVM_RUN. Called with the gate locked:
    /// `stopped` takes the lock and clears the IDs before the threads are
    /// joined, so none of them is stale.
    fn kick(&self) {
        for t in &self.threads {
            // SAFETY: `t` is a live vCPU thread (see above); the kick
            // signal has a handler that does nothing.
            unsafe { libc::pthread_kill(*t, crate::vm::kick_signal()) };
        }
    }
}

/// Pauses, resumes and ends a VM's vCPUs; clones share the VM. One control
/// serves one VM: once ended, it ends any VM it is given.
#[derive(Debug, Clone, Default)]
pub struct VmControl(Arc<(Mutex<Gate>, Condvar)>);

impl VmControl {
    /// A control for a VM to be given it in [`crate::vm::RunOptions`].
    pub fn new() -> Self {
        Self::default()
    }

    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops every vCPU; returns once none runs guest code.
    pub fn pause(&self, limit: Duration) -> Result<(), PauseError> {
        let deadline = Instant::now() + limit;
        {
            let mut g = self.gate();
            if !g.running {
                return Err(PauseError::NotRunning);
            }
            g.paused = true;
        }
        loop {
            {
                let g = self.gate();
                if !g.running {
                    return Err(PauseError::NotRunning);
                }
                if g.parked == g.threads.len() {
                    return Ok(());
                }
                g.kick();
            }
            if Instant::now() >= deadline {
                self.resume();
                return Err(PauseError::Timeout(limit));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.gate().paused = false;
        self.0 .1.notify_all();
    }

    /// Ends the VM: its vCPUs leave KVM_RUN and it ends with
    /// [`crate::exit::ExitReason::Stopped`] (at once if it has not started
    /// yet). For a guest that stopped answering, which no request of its
    /// own would end. Kicks until the VM has stopped (a kick that lands
    /// just before a vCPU enters KVM_RUN is lost), at most `limit`; false
    /// if it still runs then.
    pub fn end(&self, limit: Duration) -> bool {
        self.gate().ending = true;
        self.0 .1.notify_all();
        let deadline = Instant::now() + limit;
        loop {
            {
                let g = self.gate();
                if !g.running {
                    return true;
                }
                g.kick();
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Whether a pause was asked for and not undone.
    pub fn is_paused(&self) -> bool {
        self.gate().paused
    }

    /// Kicks every vCPU out of KVM_RUN once; false once the VM has stopped.
    pub(crate) fn kick_all(&self) -> bool {
        let g = self.gate();
        g.kick();
        g.running
    }

    /// The VM runs these vCPU threads.
    pub(crate) fn started(&self, threads: Vec<libc::pthread_t>) {
        let mut g = self.gate();
        g.threads = threads;
        g.running = true;
    }

    /// The VM is ending: parked vCPUs wake, pauses fail from now on.
    pub(crate) fn stopped(&self) {
        let mut g = self.gate();
        g.running = false;
        g.threads.clear();
        drop(g);
        self.0 .1.notify_all();
    }

    /// Called by a vCPU thread between KVM_RUN calls: waits while paused;
    /// true when the VM is to end instead of running on.
    pub(crate) fn park_if_paused(&self) -> bool {
        let mut g = self.gate();
        if g.ending {
            return true;
        }
        if !g.paused || !g.running {
            return false;
        }
        g.parked += 1;
        while g.paused && g.running && !g.ending {
            g = self.0 .1.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.parked -= 1;
        g.ending
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::thread::JoinHandleExt;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use super::*;

    /// Threads that count "guest work" and park like vCPU threads.
    fn fake_vcpus(
        n: usize,
        ctl: &VmControl,
        stop: &Arc<AtomicBool>,
    ) -> (Vec<std::thread::JoinHandle<()>>, Arc<AtomicU64>) {
        crate::vm::install_kick_handler().unwrap();
        let work = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let (ctl, stop, work) = (ctl.clone(), stop.clone(), work.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        if ctl.park_if_paused() {
                            break;
                        }
                        work.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(100));
                    }
                })
            })
            .collect();
        ctl.started(threads.iter().map(|t| t.as_pthread_t()).collect());
        (threads, work)
    }

    #[test]
    fn kicks_reach_the_vcpus_only_while_the_vm_runs() {
        let ctl = VmControl::new();
        assert!(!ctl.kick_all(), "kicked before the VM started");
        let stop = Arc::new(AtomicBool::new(false));
        let (threads, _work) = fake_vcpus(2, &ctl, &stop);
        ctl.started(threads.iter().map(|t| t.as_pthread_t()).collect());
        assert!(ctl.kick_all());
        ctl.stopped();
        assert!(!ctl.kick_all(), "kicked after the VM stopped");
        stop.store(true, Ordering::Release);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn paused_vcpus_do_no_work_until_resumed() {
        let ctl = VmControl::new();
        assert_eq!(
            ctl.pause(Duration::from_secs(1)),
            Err(PauseError::NotRunning)
        );
        let stop = Arc::new(AtomicBool::new(false));
        let (threads, work) = fake_vcpus(3, &ctl, &stop);
        ctl.pause(Duration::from_secs(10)).unwrap();
        assert!(ctl.is_paused());
        let before = work.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(work.load(Ordering::Relaxed), before, "work while paused");
        ctl.resume();
        let deadline = Instant::now() + Duration::from_secs(10);
        while work.load(Ordering::Relaxed) == before {
            assert!(Instant::now() < deadline, "no work after resume");
            std::thread::sleep(Duration::from_millis(1));
        }
        // A VM that ends while paused lets its threads go.
        ctl.pause(Duration::from_secs(10)).unwrap();
        stop.store(true, Ordering::Release);
        ctl.stopped();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            ctl.pause(Duration::from_secs(1)),
            Err(PauseError::NotRunning)
        );
    }

    #[test]
    fn ending_a_vm_ends_its_vcpus_paused_or_not_and_one_not_yet_started() {
        for pause_first in [false, true] {
            let ctl = VmControl::new();
            let stop = Arc::new(AtomicBool::new(false));
            let (threads, _work) = fake_vcpus(2, &ctl, &stop);
            if pause_first {
                ctl.pause(Duration::from_secs(10)).unwrap();
            }
            // The fake VM never stops itself: `end` gives up after its limit.
            assert!(!ctl.end(Duration::from_millis(100)));
            // The threads left on their own, without `stop`.
            for t in threads {
                t.join().unwrap();
            }
            ctl.stopped();
            assert!(ctl.end(Duration::ZERO), "stopped: nothing to wait for");
        }
        let ctl = VmControl::new();
        assert!(ctl.end(Duration::ZERO));
        assert!(ctl.park_if_paused(), "ended before it started");
    }

    #[test]
    fn a_vcpu_that_never_parks_times_the_pause_out_and_the_vm_runs_on() {
        let ctl = VmControl::new();
        crate::vm::install_kick_handler().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        // Never calls park_if_paused.
        let stuck = std::thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        ctl.started(vec![stuck.as_pthread_t()]);
        assert_eq!(
            ctl.pause(Duration::from_millis(50)),
            Err(PauseError::Timeout(Duration::from_millis(50)))
        );
        assert!(!ctl.is_paused());
        ctl.stopped();
        stop.store(true, Ordering::Release);
        stuck.join().unwrap();
    }
}
