//! virtio-net (device type 1): one RX and one TX queue on a host back end,
//! normally a [`Tap`]. Checksum and TSO offloads are offered where the back
//! end takes them, and mergeable RX buffers let the guest post small pages
//! instead of 64 KiB per packet.

pub mod mac;
pub mod rxtx;
pub mod tap;

pub use mac::MacAddr;
pub use rxtx::NetStats;
pub use tap::Tap;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::worker::DeviceWorker;
use super::{ActivateContext, ActivateError, Interrupt, VirtioDevice, INT_VRING};
use rxtx::{Delivery, MAX_FRAME};

/// Device type of virtio-net.
pub const TYPE_NET: u32 = 1;
/// The virtio-net header every frame starts with (virtio 1.x always has
/// num_buffers).
pub const HDR_LEN: usize = 12;
const QUEUE_SIZE: u16 = 256;
/// Frames moved per direction between looks at the eventfds, so a busy
/// guest or host cannot keep the worker from seeing a stop request.
const BUDGET: usize = 256;

/// The device takes frames with partial checksums.
pub const F_CSUM: u64 = 1 << 0;
/// The guest takes frames with partial checksums.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// The device has a MAC address in its configuration space.
pub const F_MAC: u64 = 1 << 5;
/// The guest takes TCPv4 segments larger than the MTU.
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// The guest takes TCPv6 segments larger than the MTU.
pub const F_GUEST_TSO6: u64 = 1 << 8;
/// The device takes TCPv4 segments larger than the MTU.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// The device takes TCPv6 segments larger than the MTU.
pub const F_HOST_TSO6: u64 = 1 << 12;
/// The guest posts RX buffers that one frame may span.
pub const F_MRG_RXBUF: u64 = 1 << 15;

/// Where the device's frames come from and go to.
pub trait NetBackend: Send {
    /// Polls readable (edge-triggered is enough) when [`NetBackend::recv`]
    /// has frames.
    fn fd(&self) -> RawFd;
    /// One frame, header first; `WouldBlock` when there is none.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame, header first.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// The guest offload features (`F_GUEST_*`) the back end can feed.
    fn guest_offloads(&self) -> u64;
    /// Turns on the offloads among `acked` the back end can feed.
    fn enable_offloads(&mut self, acked: u64) -> io::Result<()>;
}

/// The virtio-net device.
pub struct Net<B: NetBackend + 'static> {
    config: [u8; 6],
    /// Offered features, fixed when the back end is known (the back end
    /// itself moves into the worker while the device runs).
    features: u64,
    backend: Option<B>,
    stats: Arc<Mutex<NetStats>>,
    worker: Option<DeviceWorker<B>>,
}

impl<B: NetBackend + 'static> std::fmt::Debug for Net<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("mac", &MacAddr(self.config))
            .field("active", &self.worker.is_some())
            .finish()
    }
}

impl<B: NetBackend + 'static> Net<B> {
    /// A NIC with address `mac` on `backend`.
    pub fn new(mac: MacAddr, backend: B) -> Self {
        Net {
            config: mac.0,
            features: super::VIRTIO_F_VERSION_1
                | F_MAC
                | F_MRG_RXBUF
                | F_CSUM
                | F_HOST_TSO4
                | F_HOST_TSO6
                | backend.guest_offloads(),
            backend: Some(backend),
            stats: Arc::default(),
            worker: None,
        }
    }

    /// Traffic counters, updated as the worker runs.
    pub fn stats(&self) -> Arc<Mutex<NetStats>> {
        self.stats.clone()
    }

    fn stop(&mut self) {
        if let Some(mut backend) = self.worker.take().and_then(DeviceWorker::stop) {
            let _ = backend.enable_offloads(0);
            self.backend = Some(backend);
        }
    }
}

impl<B: NetBackend + 'static> Drop for Net<B> {
    fn drop(&mut self) {
        self.stop();
    }
}

const RX: u64 = 0;
const TX: u64 = 1;
const KILL: u64 = 2;
const BACKEND: u64 = 3;

struct Worker<B> {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    backend: B,
    mergeable: bool,
    stats: Arc<Mutex<NetStats>>,
}

impl<B: NetBackend> Worker<B> {
    fn run(mut self, epoll: Epoll) -> B {
        let mut events = [EpollEvent::default(); 4];
        let mut tx_buf = vec![0u8; MAX_FRAME];
        let mut rx_buf = vec![0u8; MAX_FRAME];
        // A frame read from the back end that the guest has no room for yet.
        let mut pending = 0usize;
        // Edge-triggered: the back end may hold frames until recv says not.
        let mut readable = true;
        let mut busy = false;
        let mut stats = NetStats::default();
        loop {
            let n = match epoll.wait(if busy { 0 } else { -1 }, &mut events) {
                Ok(n) => n,
                Err(_) => continue,
            };
            for ev in &events[..n] {
                match ev.data() {
                    KILL => return self.backend,
                    BACKEND => readable = true,
                    q => {
                        let _ = self.evts[q as usize].read();
                    }
                }
            }
            let sent = rxtx::process_tx(
                &mut self.tx,
                &self.mem,
                &mut self.backend,
                &mut tx_buf,
                &mut stats,
                BUDGET,
            );
            let mut notify = sent > 0;
            busy = sent == BUDGET;
            for i in 0..=BUDGET {
                if i == BUDGET {
                    busy = true;
                    break;
                }
                if pending == 0 {
                    if !readable {
                        break;
                    }
                    match self.backend.recv(&mut rx_buf) {
                        Ok(n) if n >= HDR_LEN => pending = n,
                        Ok(0) => {
                            readable = false;
                            break;
                        }
                        // Runt frames from the back end are not frames.
                        Ok(_) => continue,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            readable = false;
                            break;
                        }
                    }
                }
                let frame = &mut rx_buf[..pending];
                match rxtx::deliver(&mut self.rx, &self.mem, frame, self.mergeable, &mut stats) {
                    Delivery::Used => {
                        notify = true;
                        pending = 0;
                    }
                    Delivery::NoRoom | Delivery::Broken => break,
                }
            }
            // Counters only move when a chain was used.
            if notify {
                let _ = self.interrupt.trigger(INT_VRING);
                if let Ok(mut shared) = self.stats.lock() {
                    *shared = stats;
                }
            }
        }
    }
}

impl<B: NetBackend + 'static> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            queues,
            queue_evts,
            interrupt,
            acked_features,
        } = ctx;
        super::expect_queues(&queues, &queue_evts, 2)?;
        self.stop();
        let mut backend = self
            .backend
            .take()
            .ok_or_else(|| ActivateError::Io(io::Error::other("the network back end was lost")))?;
        let setup = backend
            .enable_offloads(acked_features)
            .and_then(|()| EventFd::new(libc::EFD_NONBLOCK))
            .and_then(|kill| {
                let epoll = Epoll::new()?;
                let fds = [
                    (queue_evts[0].as_raw_fd(), RX, EventSet::IN),
                    (queue_evts[1].as_raw_fd(), TX, EventSet::IN),
                    (kill.as_raw_fd(), KILL, EventSet::IN),
                    (
                        backend.fd(),
                        BACKEND,
                        EventSet::IN | EventSet::EDGE_TRIGGERED,
                    ),
                ];
                for (fd, token, set) in fds {
                    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))?;
                }
                Ok((epoll, kill))
            });
        let (epoll, kill) = match setup {
            Ok(v) => v,
            Err(e) => {
                self.backend = Some(backend);
                return Err(ActivateError::Io(e));
            }
        };
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx)) = (it.next(), it.next()) else {
            self.backend = Some(backend);
            return Err(ActivateError::QueueCount {
                expected: 2,
                got: 0,
            });
        };
        let worker = Worker {
            mem,
            rx,
            tx,
            evts: queue_evts,
            interrupt,
            backend,
            mergeable: acked_features & F_MRG_RXBUF != 0,
            stats: self.stats.clone(),
        };
        let worker = DeviceWorker::spawn("virtio-net", kill, move || worker.run(epoll))
            .map_err(ActivateError::Io)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests;
