//! A device's worker thread and the eventfd that tells it to stop: every
//! device starts one on activation and stops it on reset and drop.

use std::io;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

/// A running device worker.
#[derive(Debug)]
pub struct DeviceWorker<T> {
    stop: EventFd,
    handle: JoinHandle<T>,
}

impl<T: Send + 'static> DeviceWorker<T> {
    /// Runs `body` on a thread called `name`. `body` must return once
    /// `stop` (which it polls, directly or through a clone) becomes readable.
    pub fn spawn(
        name: &str,
        stop: EventFd,
        body: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<Self> {
        let handle = crate::threads::named(name).spawn(body)?;
        Ok(DeviceWorker { stop, handle })
    }

    /// Signals the worker and waits for it; its result, unless it panicked.
    pub fn stop(self) -> Option<T> {
        let _ = self.stop.write(1);
        self.handle.join().ok()
    }
}
