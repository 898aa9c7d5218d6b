//! Virtio 1.x devices over MMIO. A device implements [`VirtioDevice`]; the
//! [`mmio::MmioTransport`] owns its registers, queues and notification
//! eventfds and activates it once the guest driver is ready.

pub mod fs;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;
pub mod worker;

#[cfg(test)]
pub(crate) mod test_ring;

#[cfg(test)]
mod interrupt_tests {
    use super::*;

    #[test]
    fn an_unacknowledged_interrupt_is_raised_again_after_a_whole_period() {
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        assert!(!irq.reraise_if_stale(), "nothing pending");
        irq.trigger(INT_VRING).unwrap();
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        assert!(!irq.reraise_if_stale(), "pending for less than a period");
        assert!(irq.reraise_if_stale(), "a whole period without an ack");
        assert_eq!(
            irq.eventfd().read().unwrap(),
            1,
            "the irqfd was written again"
        );
        // The guest acknowledges; a new interrupt follows before the next look.
        irq.ack(INT_VRING);
        irq.trigger(INT_VRING).unwrap();
        assert!(!irq.reraise_if_stale(), "the guest is acknowledging");
        assert!(irq.reraise_if_stale());
        irq.ack(INT_VRING);
        assert!(!irq.reraise_if_stale());
        assert!(!irq.reraise_if_stale());
        assert_eq!(irq.reraised(), 2);
    }
}

#[cfg(test)]
mod config_tests {
    #[test]
    fn config_reads_are_bounded_and_zero_filled() {
        let cfg = [1u8, 2, 3, 4];
        let mut out = [9u8; 4];
        super::read_config_bytes(&cfg, 2, &mut out);
        assert_eq!(out, [3, 4, 0, 0]);
        super::read_config_bytes(&cfg, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }
}

pub use rng::EntropySource;

use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// The device conforms to virtio 1.x (no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device type of virtio-rng.
pub const TYPE_RNG: u32 = 4;

/// Interrupt status bit: a queue has new used buffers.
pub const INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready; the device may run.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 128;
}

/// The device side of a virtio interrupt: the MMIO interrupt status register
/// and the irqfd KVM injects from.
///
/// virtio-mmio's interrupt is level-like (asserted while the status is not
/// zero) but reaches KVM as an edge. An edge that gets lost on the way
/// (seen under nested virtualization: the device had answered every
/// request, the status bit stayed set, and the guest waited forever) would
/// hang the guest, so [`Interrupt::reraise_if_stale`] raises again an
/// interrupt the guest has left unacknowledged for a whole watchdog period.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
    acks: AtomicU64,
    /// (acknowledgements seen, status was set) at the last watchdog look.
    watch: std::sync::Mutex<(u64, bool)>,
    reraised: AtomicU64,
}

impl Interrupt {
    /// An interrupt raised by writing `evt` (registered as an irqfd).
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            evt,
            acks: AtomicU64::new(0),
            watch: std::sync::Mutex::new((0, false)),
            reraised: AtomicU64::new(0),
        }
    }

    /// Called every watchdog period: raises the interrupt again when its
    /// status was already set at the previous call and the guest has not
    /// acknowledged anything since. Returns whether it did. A guest that
    /// was merely slow sees one extra interrupt, which it handles as usual.
    pub fn reraise_if_stale(&self) -> bool {
        let pending = self.status() != 0;
        let acks = self.acks.load(Ordering::Acquire);
        let mut watch = match self.watch.lock() {
            Ok(w) => w,
            Err(poisoned) => poisoned.into_inner(),
        };
        let stale = pending && watch.1 && watch.0 == acks;
        *watch = (acks, pending);
        if stale && self.evt.write(1).is_ok() {
            self.reraised.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// How often [`Interrupt::reraise_if_stale`] raised the interrupt again.
    pub fn reraised(&self) -> u64 {
        self.reraised.load(Ordering::Relaxed)
    }

    /// Sets `why` in the status register and raises the interrupt.
    pub fn trigger(&self, why: u32) -> io::Result<()> {
        self.status.fetch_or(why, Ordering::AcqRel);
        self.evt.write(1)
    }

    /// Sets status bits a snapshot saved, without raising the interrupt:
    /// it is raised ([`Interrupt::raise_if_pending`]) once the vCPUs that
    /// take it exist, or the interrupt controller would drop it.
    pub fn restore_status(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
    }

    /// Raises the interrupt if its status is set (a restored VM's).
    pub fn raise_if_pending(&self) -> io::Result<()> {
        if self.status() != 0 {
            self.evt.write(1)?;
        }
        Ok(())
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// The guest acknowledges `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
        self.acks.fetch_add(1, Ordering::AcqRel);
    }

    /// The eventfd behind the interrupt.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Why a device could not start.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// What the device needs.
        expected: usize,
        /// What it was given.
        got: usize,
    },
    /// Host resources (threads, eventfds, back end) could not be set up.
    #[error("starting the device")]
    Io(#[source] io::Error),
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues as the driver configured them.
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue (ioeventfd on the notify register).
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: std::sync::Arc<Interrupt>,
    /// The feature bits the driver accepted (a subset of those offered).
    pub acked_features: u64,
}

/// Checks that the driver set up the `n` queues a device has.
pub fn expect_queues(queues: &[Queue], evts: &[EventFd], n: usize) -> Result<(), ActivateError> {
    if queues.len() != n || evts.len() != n {
        return Err(ActivateError::QueueCount {
            expected: n,
            got: queues.len(),
        });
    }
    Ok(())
}

/// Copies the part of a device's configuration space `cfg` that a guest read
/// at `offset` covers into `data`; bytes beyond the space read as zero.
pub fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| cfg.get(o).copied())
            .unwrap_or(0);
    }
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device type.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Starts processing the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops processing and returns to the pre-activation state.
    fn reset(&mut self);
    /// Why the device's host side holds state a snapshot would lose (an
    /// open connection, a mounted file system), if it does.
    fn snapshot_blocker(&self) -> Option<String> {
        None
    }
    /// One line on the work the device did, for `--report-requests`;
    /// `None` for a device that counts nothing.
    fn report(&self) -> Option<String> {
        None
    }
}
