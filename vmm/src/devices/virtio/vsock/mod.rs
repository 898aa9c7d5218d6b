//! virtio-vsock (device type 19), entirely in userspace: no vhost module is
//! needed on the host. The host side is a [`VsockHost`]; [`UnixHost`] is
//! Firecracker's hybrid scheme over Unix sockets.

pub mod connection;
pub mod host;
pub mod muxer;
pub mod packet;

pub use host::{UnixHost, VsockHost};

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::worker::DeviceWorker;
use super::{ActivateContext, ActivateError, Interrupt, VirtioDevice, INT_VRING};
use muxer::Muxer;

/// Device type of virtio-vsock.
pub const TYPE_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;
/// Rounds of TX/RX work between looks at the eventfds, so a busy guest
/// cannot keep the worker from seeing a stop request.
const MAX_ROUNDS: usize = 64;

/// The virtio-vsock device.
pub struct Vsock<H: VsockHost + 'static> {
    guest_cid: u64,
    host: Option<H>,
    worker: Option<DeviceWorker<H>>,
    /// Open connections, as the worker last counted them.
    connections: Arc<AtomicUsize>,
}

impl<H: VsockHost + 'static> std::fmt::Debug for Vsock<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.guest_cid)
            .field("active", &self.worker.is_some())
            .finish()
    }
}

impl<H: VsockHost + 'static> Vsock<H> {
    /// A device giving the guest context ID `guest_cid`, its host side `host`.
    pub fn new(guest_cid: u64, host: H) -> Self {
        Vsock {
            guest_cid,
            host: Some(host),
            worker: None,
            connections: Arc::default(),
        }
    }

    fn stop(&mut self) {
        if let Some(host) = self.worker.take().and_then(DeviceWorker::stop) {
            self.host = Some(host);
        }
    }
}

impl<H: VsockHost + 'static> Drop for Vsock<H> {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Queues {
    rx: Queue,
    tx: Queue,
    _event: Queue,
}

const RX: u64 = 0;
const TX: u64 = 1;
const EVENT: u64 = 2;
const KILL: u64 = 3;
const HOST: u64 = 4;

/// The worker's epoll: the queue eventfds, the stop eventfd and the muxer's
/// own epoll for host sockets.
fn worker_epoll<H: VsockHost>(
    evts: &[EventFd],
    kill: &EventFd,
    muxer: &Muxer<H>,
) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    let fds = [
        (evts[0].as_raw_fd(), RX),
        (evts[1].as_raw_fd(), TX),
        (evts[2].as_raw_fd(), EVENT),
        (kill.as_raw_fd(), KILL),
        (muxer.epoll_fd(), HOST),
    ];
    for (fd, token) in fds {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        )?;
    }
    Ok(epoll)
}

/// Runs until told to stop, then hands the host side back.
fn worker<H: VsockHost>(
    epoll: Epoll,
    mem: GuestMemoryMmap,
    mut q: Queues,
    evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    mut muxer: Muxer<H>,
    connections: Arc<AtomicUsize>,
) -> H {
    let mut events = [EpollEvent::default(); 8];
    let mut busy = false;
    loop {
        let timeout = if busy { 0 } else { -1 };
        let n = match epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(_) => continue,
        };
        for ev in &events[..n] {
            match ev.data() {
                KILL => return muxer.into_host(),
                HOST => muxer.process_host_events(),
                t => {
                    let _ = evts[t as usize].read();
                }
            }
        }
        let mut notify = false;
        busy = true;
        for _ in 0..MAX_ROUNDS {
            let tx = muxer.process_tx(&mut q.tx, &mem);
            let rx = muxer.process_rx(&mut q.rx, &mem);
            notify |= tx || rx;
            if !tx && !rx {
                busy = false;
                break;
            }
        }
        if notify {
            let _ = interrupt.trigger(INT_VRING);
        }
        connections.store(muxer.connection_count(), Ordering::Release);
    }
}

impl<H: VsockHost + 'static> VirtioDevice for Vsock<H> {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        super::VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            queues,
            queue_evts,
            interrupt,
            ..
        } = ctx;
        super::expect_queues(&queues, &queue_evts, 3)?;
        self.stop();
        let host = self.host.take().ok_or_else(|| {
            ActivateError::Io(std::io::Error::other("the vsock host side was lost"))
        })?;
        let muxer = Muxer::new(host, self.guest_cid).map_err(|(e, host)| {
            self.host = Some(host);
            ActivateError::Io(e)
        })?;
        let mut it = queues.into_iter();
        let (Some(rx), Some(tx), Some(event)) = (it.next(), it.next(), it.next()) else {
            self.host = Some(muxer.into_host());
            return Err(ActivateError::QueueCount {
                expected: 3,
                got: 0,
            });
        };
        let q = Queues {
            rx,
            tx,
            _event: event,
        };
        let setup = EventFd::new(libc::EFD_NONBLOCK)
            .and_then(|kill| Ok((worker_epoll(&queue_evts, &kill, &muxer)?, kill)));
        let (epoll, kill) = match setup {
            Ok(v) => v,
            Err(e) => {
                self.host = Some(muxer.into_host());
                return Err(ActivateError::Io(e));
            }
        };
        let connections = self.connections.clone();
        let worker = DeviceWorker::spawn("virtio-vsock", kill, move || {
            worker(epoll, mem, q, queue_evts, interrupt, muxer, connections)
        })
        .map_err(ActivateError::Io)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn snapshot_blocker(&self) -> Option<String> {
        match self.connections.load(Ordering::Acquire) {
            0 => None,
            n => Some(format!(
                "{n} vsock connection(s) open (their host ends live in this VMM)"
            )),
        }
    }
}

#[cfg(test)]
mod tests;
