//! How a VM ends, and the one-shot signal that carries it to the main thread.

use std::io;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset through the i8042 (`reboot`, `reboot=k`).
    Reset,
    /// The guest panicked (seen on the console) and then reset.
    GuestPanic,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// The boot timeout elapsed first.
    Timeout,
    /// A vCPU failed in a way the guest cannot recover from.
    VcpuFailed(String),
    /// The VM stopped to be snapshotted (see [`crate::snapshot`]); once the
    /// snapshot is written, the VM has ended with [`ExitReason::Snapshotted`].
    SnapshotRequested,
    /// The VM was written to a snapshot and ended.
    Snapshotted,
    /// Its owner ended the VM ([`crate::pause::VmControl::end`]).
    Stopped,
}

impl ExitReason {
    /// Process exit status for the VMM binary.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExitReason::Reset | ExitReason::Snapshotted | ExitReason::Stopped => 0,
            ExitReason::SnapshotRequested => 1,
            ExitReason::VcpuFailed(_) => 1,
            ExitReason::TripleFault => 3,
            ExitReason::GuestPanic => 4,
            ExitReason::Timeout => 124,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Reset => write!(f, "guest reset (i8042)"),
            ExitReason::GuestPanic => write!(f, "guest kernel panicked"),
            ExitReason::TripleFault => write!(f, "guest triple-faulted (KVM_EXIT_SHUTDOWN)"),
            ExitReason::Timeout => write!(f, "boot timeout elapsed"),
            ExitReason::VcpuFailed(why) => write!(f, "vCPU failed: {why}"),
            ExitReason::SnapshotRequested => write!(f, "stopped for a snapshot"),
            ExitReason::Snapshotted => write!(f, "stopped and written to a snapshot"),
            ExitReason::Stopped => write!(f, "ended by its owner"),
        }
    }
}

/// The first reason wins; later ones (other vCPUs noticing the stop) are
/// ignored.
#[derive(Debug)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is recorded, and wakes the waiter.
    pub fn signal(&self, reason: ExitReason) -> io::Result<()> {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        self.evt.write(1)
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd written on every signal, for poll().
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        s.signal(ExitReason::TripleFault).unwrap();
        s.signal(ExitReason::Reset).unwrap();
        assert_eq!(s.reason(), Some(ExitReason::TripleFault));
        assert_eq!(s.eventfd().read().unwrap(), 2);
    }
}
