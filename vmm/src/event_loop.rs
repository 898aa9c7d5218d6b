//! The VMM's main-thread event loop (event-manager): it waits for the VM to
//! end and feeds host input to the serial console, without extra threads.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use crate::devices::legacy::{lock, SerialDevice};
use crate::exit::ExitSignal;

/// Sets `ended` once any exit reason has been signalled.
#[derive(Debug)]
pub struct ExitWatcher {
    pub(crate) exit: Arc<ExitSignal>,
    pub(crate) ended: Arc<AtomicBool>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.eventfd().read();
        self.ended.store(true, Ordering::Release);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Registration only fails for a bad fd, which an EventFd is not.
        let _ = ops.add(Events::new(self.exit.eventfd(), EventSet::IN));
    }
}

/// Host input for the guest's serial port. The 16550 FIFO is small, so what
/// does not fit waits in `pending` until the guest has drained the FIFO; the
/// loop retries on a short timeout while anything is pending.
#[derive(Debug)]
pub struct ConsoleInput {
    pub(crate) input: File,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) pending: Arc<Mutex<Vec<u8>>>,
}

impl ConsoleInput {
    /// Moves as much pending input into the FIFO as fits.
    pub fn flush(serial: &Mutex<SerialDevice>, pending: &Mutex<Vec<u8>>) {
        let mut pending = lock(pending);
        if pending.is_empty() {
            return;
        }
        let taken = lock(serial).enqueue_raw_bytes(&pending).unwrap_or(0);
        pending.drain(..taken);
    }
}

/// Input is read only while little is pending, so a fast producer cannot make
/// the VMM buffer without bound.
const MAX_PENDING: usize = 4096;

impl MutEventSubscriber for ConsoleInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if lock(&self.pending).len() < MAX_PENDING {
            let mut buf = [0u8; 512];
            match self.input.read(&mut buf) {
                Ok(0) | Err(_) => {
                    // EOF or a broken input: stop watching it.
                    let _ = ops.remove(events);
                }
                Ok(n) => lock(&self.pending).extend_from_slice(&buf[..n]),
            }
        }
        Self::flush(&self.serial, &self.pending);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.input, EventSet::IN));
    }
}
