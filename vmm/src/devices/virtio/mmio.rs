//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2). Every
//! guest access is bounds- and state-checked: a driver that misbehaves gets
//! ignored writes or a DEVICE_NEEDS_RESET status, never a host panic.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{status, ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the queue notification register (the ioeventfd address).
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4d56_5552; // "RUVM"
const CONFIG_SPACE: u64 = 0x100;

/// One queue's registers and positions, as a snapshot holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    /// Where the device goes on: the used ring's index, which for a
    /// stopped device is also how many chains it took from the avail ring
    /// (every device here completes each chain it takes before it stops).
    next: u16,
    event_idx: bool,
}

/// A transport's registers and queues, as a snapshot holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// The virtio device type behind it.
    pub device_type: u32,
    status: u32,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<QueueSnapshot>,
}

/// A device and its transport state.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish()
    }
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` is raised through the device's irqfd.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| std::io::Error::other(e.to_string()))?);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
            config_generation: 0,
        })
    }

    /// Notification eventfds, one per queue, for KVM ioeventfds.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's current status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated || self.status & status::FEATURES_OK == 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A guest read at `offset` within the window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.device.read_config(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let q = self.queues.get(self.queue_sel as usize);
        let value = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => {
                let features = self.device.features() | VIRTIO_F_VERSION_1;
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => q.map_or(0, |q| u32::from(q.max_size())),
            0x44 => q.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// A guest write at `offset` within the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            if !self.activated || self.status & status::DRIVER_OK != 0 {
                self.device.write_config(offset - CONFIG_SPACE, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if self.status & status::FEATURES_OK == 0 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                if let Some(q) = self.selected_queue() {
                    // Queue::set_size ignores sizes that are not a power of
                    // two or exceed the maximum; is_valid() rejects them later.
                    q.set_size(v as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY => {
                // Without an ioeventfd (or for a queue the fd does not match),
                // the notification arrives here.
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            0x64 => self.interrupt.ack(v),
            0x70 => self.write_status(v),
            0x80 => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits only accumulate (except through reset).
        if v & self.status != self.status {
            return;
        }
        let new = v & !self.status;
        if new & status::FEATURES_OK != 0 {
            let offered = self.device.features() | VIRTIO_F_VERSION_1;
            let ok = self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                // FEATURES_OK stays clear: the driver sees the refusal.
                self.status = v & !status::FEATURES_OK;
                return;
            }
        }
        self.status = v;
        if new & status::DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let ready = self.status & status::FEATURES_OK != 0
            && self
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&self.mem));
        let evts: Result<Vec<EventFd>, _> = self.queue_evts.iter().map(|e| e.try_clone()).collect();
        // The device gets its own copies; the transport keeps the registers'
        // view for reads until the next reset.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let started = match (ready, evts, queues) {
            (true, Ok(queue_evts), Ok(queues)) => self
                .device
                .activate(ActivateContext {
                    mem: self.mem.clone(),
                    queues,
                    queue_evts,
                    interrupt: self.interrupt.clone(),
                    acked_features: self.driver_features,
                })
                .is_ok(),
            _ => false,
        };
        if started {
            self.activated = true;
        } else {
            self.status |= status::DEVICE_NEEDS_RESET;
            let _ = self.interrupt.trigger(super::INT_CONFIG);
        }
    }

    /// One line on the device's state for a stuck guest's post-mortem: how
    /// far the driver (avail) and the device (used) got on each queue, and
    /// whether an interrupt is still waiting for the guest's acknowledgement.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = format!(
            "type {} status {:#x} interrupt status {:#x} (raised again {} times)",
            self.device.device_type(),
            self.status,
            self.interrupt.status(),
            self.interrupt.reraised()
        );
        for (i, q) in self.queues.iter().enumerate().filter(|(_, q)| q.ready()) {
            let avail = q.avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire);
            let used = q.used_idx(&self.mem, std::sync::atomic::Ordering::Acquire);
            let _ = match (avail, used) {
                (Ok(a), Ok(u)) => write!(out, ", queue {i}: avail {} used {}", a.0, u.0),
                _ => write!(out, ", queue {i}: rings outside guest memory"),
            };
        }
        out
    }

    /// What the device says it did (see [`VirtioDevice::report`]).
    pub fn report(&self) -> Option<String> {
        self.device.report()
    }

    /// The virtio device type behind this transport.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Why the device cannot be snapshotted now, if it cannot.
    pub fn snapshot_blocker(&self) -> Option<String> {
        self.device.snapshot_blocker()
    }

    /// Stops the device's workers for a snapshot, leaving every register as
    /// the guest set it (unlike [`MmioTransport::shutdown`]).
    pub fn quiesce(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
    }

    /// The transport's state; called after [`MmioTransport::quiesce`], so
    /// the used rings no longer move.
    pub fn snapshot(&self) -> Result<TransportState, String> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            let running = q.ready() && self.status & status::DRIVER_OK != 0;
            let next = if running {
                q.used_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                    .map_err(|e| format!("queue {i}: reading its used ring: {e}"))?
                    .0
            } else {
                0
            };
            let state = q.state();
            queues.push(QueueSnapshot {
                size: state.size,
                ready: state.ready,
                desc_table: state.desc_table,
                avail_ring: state.avail_ring,
                used_ring: state.used_ring,
                next,
                event_idx: state.event_idx_enabled,
            });
        }
        Ok(TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues,
        })
    }

    /// A transport for `device` in the saved `state`; a device the driver
    /// had started is started again on the saved queues, and an interrupt
    /// the guest had not yet acknowledged is pending again (raised by
    /// [`Interrupt::raise_if_pending`] once the vCPUs are restored).
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        state: &TransportState,
    ) -> Result<Self, String> {
        if device.device_type() != state.device_type {
            return Err(format!(
                "device type {} where the snapshot has {}",
                device.device_type(),
                state.device_type
            ));
        }
        let mut t = MmioTransport::new(device, mem, interrupt).map_err(|e| e.to_string())?;
        if state.queues.len() != t.queues.len() {
            return Err(format!(
                "{} queues where the snapshot has {}",
                t.queues.len(),
                state.queues.len()
            ));
        }
        for (q, saved) in t.queues.iter_mut().zip(&state.queues) {
            let restored = Queue::try_from(QueueState {
                max_size: q.max_size(),
                next_avail: saved.next,
                next_used: saved.next,
                event_idx_enabled: saved.event_idx,
                size: saved.size,
                ready: saved.ready,
                desc_table: saved.desc_table,
                avail_ring: saved.avail_ring,
                used_ring: saved.used_ring,
            })
            .map_err(|e| format!("a saved queue: {e}"))?;
            *q = restored;
        }
        t.status = state.status;
        t.driver_features = state.driver_features;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        t.config_generation = state.config_generation;
        if t.status & status::DRIVER_OK != 0 && t.status & status::DEVICE_NEEDS_RESET == 0 {
            t.activate();
            if !t.activated {
                return Err("the device did not start on its saved queues".into());
            }
        }
        t.interrupt.restore_status(state.interrupt_status);
        Ok(t)
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// Stops the device's host-side work and returns it to its initial
    /// state, as a guest's reset would.
    pub fn shutdown(&mut self) {
        self.reset();
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.ack(u32::MAX);
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::super::rng::Rng;
    use super::super::{EntropySource, INT_VRING};
    use super::*;
    use std::time::{Duration, Instant};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn transport(m: &GuestMemoryMmap) -> (MmioTransport, Arc<Interrupt>) {
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let rng =
            Rng::with_source(|| Ok(Box::new(std::io::repeat(0x42)) as Box<dyn EntropySource>));
        let t = MmioTransport::new(Box::new(rng), m.clone(), irq.clone()).unwrap();
        (t, irq)
    }

    fn r(t: &MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Negotiates features and sets up queue 0 at the mock queue's rings.
    fn bring_up(t: &mut MmioTransport, mq: &MockSplitQueue<'_, GuestMemoryMmap>) {
        w(t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(t, 0x24, 1);
        w(t, 0x20, 1); // VIRTIO_F_VERSION_1 (bit 32)
        w(
            t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(r(t, 0x70) & status::FEATURES_OK, 0);
        w(t, 0x30, 0);
        w(t, 0x38, 16);
        for (lo, addr) in [
            (0x80, mq.desc_table_addr()),
            (0x90, mq.avail_addr()),
            (0xa0, mq.used_addr()),
        ] {
            w(t, lo, addr.0 as u32);
            w(t, lo + 4, (addr.0 >> 32) as u32);
        }
        w(t, 0x44, 1);
    }

    #[test]
    fn identifies_as_a_virtio_1_rng() {
        let m = mem();
        let (t, _) = transport(&m);
        assert_eq!(r(&t, 0x00), MAGIC);
        assert_eq!(r(&t, 0x04), 2);
        assert_eq!(r(&t, 0x08), super::super::TYPE_RNG);
        assert_eq!(r(&t, 0x34), 256, "queue 0 max size");
    }

    #[test]
    fn a_driver_that_negotiates_gets_its_buffers_filled() {
        let m = mem();
        let (mut t, irq) = transport(&m);
        let mq = MockSplitQueue::new(&m, 16);
        bring_up(&mut t, &mq);
        w(&mut t, 0x70, 0xf & !status::FAILED);
        assert_eq!(r(&t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        let d = RawDescriptor::from(SplitDescriptor::new(0x10_0000, 8, 2, 0));
        mq.add_desc_chains(&[d], 0).unwrap();
        // What KVM's ioeventfd does on a write to QueueNotify.
        w(&mut t, QUEUE_NOTIFY, 0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while irq.status() & INT_VRING == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(r(&t, 0x60) & INT_VRING, INT_VRING);
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(0x10_0000)).unwrap(),
            0x4242_4242_4242_4242
        );
        w(&mut t, 0x64, INT_VRING);
        assert_eq!(r(&t, 0x60), 0);
        w(&mut t, 0x70, 0);
        assert_eq!(r(&t, 0x70), 0, "reset");
    }

    /// Waits for the rng to fill the buffer at `addr` and interrupt.
    fn wait_filled(m: &GuestMemoryMmap, irq: &Interrupt, addr: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while (irq.status() & INT_VRING == 0 || m.read_obj::<u64>(GuestAddress(addr)).unwrap() == 0)
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(addr)).unwrap(),
            0x4242_4242_4242_4242
        );
    }

    #[test]
    fn a_snapshotted_transport_goes_on_from_its_used_ring_in_a_new_device() {
        let m = mem();
        let (mut t, irq) = transport(&m);
        let mq = MockSplitQueue::new(&m, 16);
        bring_up(&mut t, &mq);
        w(&mut t, 0x70, 0xf & !status::FAILED);
        let d = RawDescriptor::from(SplitDescriptor::new(0x10_0000, 8, 2, 0));
        mq.add_desc_chains(&[d], 0).unwrap();
        w(&mut t, QUEUE_NOTIFY, 0);
        wait_filled(&m, &irq, 0x10_0000);
        // The guest has not acknowledged the interrupt yet.
        t.quiesce();
        let state = t.snapshot().unwrap();
        assert_eq!(state.queues[0].next, 1, "one chain used");
        assert_eq!(state.interrupt_status, INT_VRING);
        assert_ne!(state.status & status::DRIVER_OK, 0);
        let json = serde_json::to_string(&state).unwrap();
        let state: TransportState = serde_json::from_str(&json).unwrap();

        // A new device behind a new interrupt takes over.
        let irq2 = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let rng =
            Rng::with_source(|| Ok(Box::new(std::io::repeat(0x42)) as Box<dyn EntropySource>));
        let mut t2 =
            MmioTransport::restore(Box::new(rng), m.clone(), irq2.clone(), &state).unwrap();
        assert_eq!(r(&t2, 0x70), state.status);
        assert_eq!(r(&t2, 0x60), INT_VRING, "the pending interrupt survives");
        assert!(
            irq2.eventfd().read().is_err(),
            "not raised before the vCPUs exist"
        );
        irq2.raise_if_pending().unwrap();
        assert_eq!(irq2.eventfd().read().unwrap(), 1, "then raised again");
        w(&mut t2, 0x64, INT_VRING);
        // The second chain goes into the next used slot, not over the first.
        let d = RawDescriptor::from(SplitDescriptor::new(0x10_1000, 8, 2, 0));
        mq.add_desc_chains(&[d], 1).unwrap();
        w(&mut t2, QUEUE_NOTIFY, 0);
        wait_filled(&m, &irq2, 0x10_1000);
        let used = t2.queues[0]
            .used_idx(&m, std::sync::atomic::Ordering::Acquire)
            .unwrap();
        assert_eq!(used.0, 2);

        // Another kind of device does not take the state.
        let wrong = super::super::vsock::Vsock::new(
            3,
            super::super::vsock::UnixHost::bind(
                &tempfile::tempdir().unwrap().path().join("v.sock"),
            )
            .unwrap(),
        );
        let err = MmioTransport::restore(Box::new(wrong), m.clone(), irq2, &state).unwrap_err();
        assert!(
            err.contains("device type 19 where the snapshot has 4"),
            "{err}"
        );
        w(&mut t2, 0x70, 0);
    }

    #[test]
    fn unoffered_features_are_refused() {
        let m = mem();
        let (mut t, _) = transport(&m);
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 1 << 5); // not offered
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&t, 0x70) & status::FEATURES_OK, 0);
    }

    #[test]
    fn driver_ok_with_a_broken_queue_asks_for_a_reset() {
        let m = mem();
        let (mut t, _) = transport(&m);
        let mq = MockSplitQueue::new(&m, 16);
        bring_up(&mut t, &mq);
        // Move the descriptor table outside guest memory.
        w(&mut t, 0x80, 0xfff0_0000);
        w(&mut t, 0x70, 0xf & !status::FAILED);
        assert_ne!(r(&t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn random_register_traffic_never_panics() {
        let m = mem();
        let mut rng = super::super::rng::tests::XorShift(0x2545_f491_4f6c_dd1d);
        for _ in 0..200 {
            let (mut t, _) = transport(&m);
            for _ in 0..100 {
                let offset = if rng.next() % 4 == 0 {
                    rng.next() % 0x2000
                } else {
                    (rng.next() % 0x40) * 4
                };
                let len = [1usize, 2, 4, 8][(rng.next() % 4) as usize];
                let value = match rng.next() % 3 {
                    0 => rng.next() % 16,
                    1 => rng.next() % 0x1_0000,
                    _ => rng.next(),
                };
                let mut bytes = value.to_le_bytes()[..len].to_vec();
                if rng.next() % 2 == 0 {
                    t.write(offset, &bytes);
                } else {
                    t.read(offset, &mut bytes);
                }
            }
            // Dropping the transport stops any worker the traffic started.
        }
    }

    #[test]
    fn odd_accesses_and_status_regressions_are_ignored() {
        let m = mem();
        let (mut t, _) = transport(&m);
        let mut two = [0xffu8; 2];
        t.read(0x00, &mut two);
        assert_eq!(two, [0, 0]);
        t.write(0x70, &[1, 0]);
        assert_eq!(r(&t, 0x70), 0);
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x70, status::ACKNOWLEDGE);
        assert_eq!(r(&t, 0x70), status::ACKNOWLEDGE | status::DRIVER);
        // Queue setup before FEATURES_OK, a bad queue index, a notify for a
        // queue that does not exist: all ignored.
        w(&mut t, 0x38, 8);
        w(&mut t, 0x30, 7);
        assert_eq!(r(&t, 0x34), 0);
        w(&mut t, QUEUE_NOTIFY, 99);
        w(&mut t, 0x7f0, 1);
    }
}
