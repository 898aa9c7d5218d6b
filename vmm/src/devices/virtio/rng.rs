//! virtio-rng: fills the guest's buffers from the host's entropy source
//! (getrandom, through /dev/urandom by default). Requests are capped so a
//! guest cannot make the host produce unbounded amounts per notification.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::worker::DeviceWorker;
use super::{ActivateContext, ActivateError, Interrupt, VirtioDevice, INT_VRING, TYPE_RNG};

const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per descriptor chain.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;

/// Where entropy comes from; a trait so tests can inject a fake.
pub trait EntropySource: Read + Send + 'static {}
impl<T: Read + Send + 'static> EntropySource for T {}

type SourceFactory = Box<dyn Fn() -> std::io::Result<Box<dyn EntropySource>> + Send>;

/// The virtio-rng device.
pub struct Rng {
    source: SourceFactory,
    worker: Option<DeviceWorker<()>>,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("active", &self.worker.is_some())
            .finish()
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::with_source(|| {
            File::open("/dev/urandom").map(|f| Box::new(f) as Box<dyn EntropySource>)
        })
    }
}

impl Rng {
    /// A device whose entropy comes from `source()` (called at activation).
    pub fn with_source(
        source: impl Fn() -> std::io::Result<Box<dyn EntropySource>> + Send + 'static,
    ) -> Self {
        Rng {
            source: Box::new(source),
            worker: None,
        }
    }

    fn stop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves every available request; returns whether the guest must be
/// interrupted. Chains whose buffers are read-only, outside guest memory or
/// empty are completed with the bytes written so far (possibly none).
pub fn process_queue(queue: &mut Queue, mem: &GuestMemoryMmap, source: &mut dyn Read) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut written: u32 = 0;
        for desc in chain {
            if !desc.is_write_only() {
                continue;
            }
            let len = desc.len().min(MAX_BYTES_PER_REQUEST - written);
            if len == 0 {
                continue;
            }
            let mut buf = vec![0u8; len as usize];
            if source.read_exact(&mut buf).is_err() || mem.write_slice(&buf, desc.addr()).is_err() {
                break;
            }
            written += len;
        }
        match queue.add_used(mem, head, written) {
            Ok(()) => used = true,
            // A head index beyond the queue: drop that chain, serve the rest.
            Err(virtio_queue::Error::InvalidDescriptorIndex) => {}
            // The used ring cannot be written: nothing more can be done.
            Err(_) => break,
        }
    }
    used && queue.needs_notification(mem).unwrap_or(true)
}

fn worker(
    mem: GuestMemoryMmap,
    mut queue: Queue,
    queue_evt: EventFd,
    kill: EventFd,
    interrupt: Arc<Interrupt>,
    mut source: Box<dyn EntropySource>,
) {
    let Ok(epoll) = Epoll::new() else { return };
    for (fd, data) in [(&queue_evt, 0u64), (&kill, 1)] {
        use std::os::fd::AsRawFd;
        let ev = EpollEvent::new(EventSet::IN, data);
        if epoll
            .ctl(ControlOperation::Add, fd.as_raw_fd(), ev)
            .is_err()
        {
            return;
        }
    }
    let mut events = [EpollEvent::default(); 2];
    loop {
        let Ok(n) = epoll.wait(-1, &mut events) else {
            continue;
        };
        for ev in &events[..n] {
            if ev.data() == 1 {
                return;
            }
            let _ = queue_evt.read();
            if process_queue(&mut queue, &mem, &mut source) {
                let _ = interrupt.trigger(INT_VRING);
            }
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        super::VIRTIO_F_VERSION_1
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            mut queues,
            mut queue_evts,
            interrupt,
            ..
        } = ctx;
        super::expect_queues(&queues, &queue_evts, 1)?;
        self.stop();
        let source = (self.source)().map_err(ActivateError::Io)?;
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Io)?;
        let kill_worker = kill.try_clone().map_err(ActivateError::Io)?;
        let (queue, queue_evt) = (queues.remove(0), queue_evts.remove(0));
        let worker = DeviceWorker::spawn("virtio-rng", kill, move || {
            worker(mem, queue, queue_evt, kill_worker, interrupt, source)
        })
        .map_err(ActivateError::Io)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const WRITE: u16 = 2; // VRING_DESC_F_WRITE

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn used_len(q: &MockSplitQueue<'_, GuestMemoryMmap>, i: u16) -> u32 {
        q.used().ring().ref_at(i as usize).unwrap().load().len()
    }

    #[test]
    fn writable_buffers_are_filled_from_the_source() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        mq.add_desc_chains(&[desc(0x10_0000, 32, WRITE)], 0)
            .unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        let mut src = std::io::repeat(0xab);
        assert!(process_queue(&mut q, &m, &mut src));
        assert_eq!(used_len(&mq, 0), 32);
        let mut got = [0u8; 32];
        m.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got, [0xab; 32]);
    }

    #[test]
    fn hostile_chains_are_completed_without_harm() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        mq.add_desc_chains(
            &[
                // Read-only buffer: the device must not write it.
                desc(0x10_0000, 16, 0),
                // Outside guest memory.
                desc(0xffff_0000, 16, WRITE),
                // Zero length.
                desc(0x10_1000, 0, WRITE),
                // Oversized: capped.
                desc(0x10_2000, 0x10_0000, WRITE),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        let mut src = std::io::repeat(0x5a);
        assert!(process_queue(&mut q, &m, &mut src));
        assert_eq!(used_len(&mq, 0), 0, "read-only buffer untouched");
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0);
        assert_eq!(used_len(&mq, 1), 0, "out-of-memory buffer skipped");
        assert_eq!(used_len(&mq, 2), 0);
        assert_eq!(used_len(&mq, 3), MAX_BYTES_PER_REQUEST);
    }

    #[test]
    fn a_failing_source_completes_the_request_empty() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("no entropy"))
            }
        }
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        mq.add_desc_chains(&[desc(0x10_0000, 8, WRITE)], 0).unwrap();
        let mut q: Queue = mq.create_queue().unwrap();
        assert!(process_queue(&mut q, &m, &mut Broken));
        assert_eq!(used_len(&mq, 0), 0);
    }

    /// Deterministic xorshift: random guests without a new dependency, and
    /// any failure reproduces from its seed.
    pub(crate) struct XorShift(pub u64);
    impl XorShift {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_rings_and_descriptors_never_panic_or_spin() {
        let m = mem();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let (mut valid, mut served) = (0, 0);
        for round in 0..300 {
            // A guest that scribbles over the first 64 KiB, where its rings live.
            let mut garbage = vec![0u8; 0x1_0000];
            for b in garbage.iter_mut() {
                *b = rng.next() as u8;
            }
            m.write_slice(&garbage, GuestAddress(0)).unwrap();
            let size = 1u16 << (rng.next() % 9); // 1..256
            let mut q = Queue::new(256).unwrap();
            q.set_size(size);
            q.set_ready(true);
            let addr = |r: &mut XorShift, align: u64| {
                // Mostly aligned and inside memory, sometimes anywhere.
                let a = if r.next() % 8 == 0 {
                    r.next()
                } else {
                    (r.next() % 0x1_0000) & !(align - 1)
                };
                (Some(a as u32), Some((a >> 32) as u32))
            };
            let (lo, hi) = addr(&mut rng, 16);
            q.set_desc_table_address(lo, hi);
            let (lo, hi) = addr(&mut rng, 2);
            q.set_avail_ring_address(lo, hi);
            let (lo, hi) = addr(&mut rng, 4);
            q.set_used_ring_address(lo, hi);
            if !q.is_valid(&m) {
                continue;
            }
            valid += 1;
            if rng.next() % 2 == 0 {
                // A plausible avail index, so chains (of garbage) get walked.
                let idx = (rng.next() % (u64::from(size) + 1)) as u16;
                let _ = m.write_obj(idx, GuestAddress(q.avail_ring() + 2));
                for i in 0..u64::from(idx) {
                    let head = (rng.next() % u64::from(size)) as u16;
                    let _ = m.write_obj(head, GuestAddress(q.avail_ring() + 4 + 2 * i));
                }
            }
            let start = std::time::Instant::now();
            process_queue(&mut q, &m, &mut std::io::repeat(7));
            if q.next_used() != 0 {
                served += 1;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "round {round} took {:?}",
                start.elapsed()
            );
        }
        // The rounds must really exercise the device, not just be skipped.
        assert!(valid > 150, "only {valid} valid queues");
        assert!(served > 50, "only {served} rounds consumed chains");
    }

    #[test]
    fn an_avail_index_beyond_the_queue_is_ignored() {
        let m = mem();
        let mq = MockSplitQueue::new(&m, 16);
        // The driver claims 1000 new buffers in a 16-entry queue.
        mq.avail().idx().store(1000);
        let mut q: Queue = mq.create_queue().unwrap();
        assert!(!process_queue(&mut q, &m, &mut std::io::repeat(1)));
    }
}
