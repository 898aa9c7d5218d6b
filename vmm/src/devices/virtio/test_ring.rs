//! A split virtqueue's rings in guest memory, written the way a driver
//! does, for device tests without a guest. (virtio-queue's MockSplitQueue
//! lays out rings that overlap beyond a few entries, so it cannot model a
//! busy 256-entry queue.)

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Entries per test queue.
pub const QSIZE: u16 = 256;
/// VIRTQ_DESC_F_NEXT
pub const NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE
pub const WRITE: u16 = 2;

/// One queue's descriptor table (at `base`), avail ring and used ring.
pub struct Ring<'m> {
    mem: &'m GuestMemoryMmap,
    base: u64,
    posted: u16,
}

impl<'m> Ring<'m> {
    const AVAIL: u64 = 0x1000;
    const USED: u64 = 0x2000;

    /// Rings at `base`; they take 0x3000 bytes.
    pub fn new(mem: &'m GuestMemoryMmap, base: u64) -> Self {
        Ring {
            mem,
            base,
            posted: 0,
        }
    }

    /// A device-side queue over these rings.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.base);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.base + Self::AVAIL);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.base + Self::USED);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        assert!(q.is_valid(self.mem));
        q
    }

    /// Writes descriptor `index`.
    pub fn store_desc(&self, index: u16, d: RawDescriptor) {
        let addr = GuestAddress(self.base + 16 * u64::from(index % QSIZE));
        self.mem.write_obj(d, addr).unwrap();
    }

    /// Reads descriptor `index`.
    pub fn load_desc(&self, index: u16) -> SplitDescriptor {
        let addr = GuestAddress(self.base + 16 * u64::from(index % QSIZE));
        SplitDescriptor::from(self.mem.read_obj::<RawDescriptor>(addr).unwrap())
    }

    /// Makes chain `head` available as entry `avail_idx`.
    pub fn publish(&self, avail_idx: u16, head: u16) {
        let slot = self.base + Self::AVAIL + 4 + 2 * u64::from(avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        let idx = avail_idx.wrapping_add(1);
        self.mem
            .write_obj(idx, GuestAddress(self.base + Self::AVAIL + 2))
            .unwrap();
    }

    /// Publishes a chain of (addr, len, flags) descriptors, linked in order,
    /// in descriptor slots following the ring's own count (so at most
    /// QSIZE / chain length chains may be outstanding).
    pub fn post_chain(&mut self, descs: &[(u64, u32, u16)]) {
        let n = descs.len() as u16;
        let head = (self.posted.wrapping_mul(n)) % QSIZE;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let flags = if last { flags } else { flags | NEXT };
            let next = if last { 0 } else { (idx + 1) % QSIZE };
            self.store_desc(
                idx,
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next)),
            );
        }
        self.publish(self.posted, head);
        self.posted = self.posted.wrapping_add(1);
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.base + Self::USED + 2))
            .unwrap()
    }

    /// (descriptor id, length written) of used entry `i`.
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.base + Self::USED + 4 + 8 * u64::from(i % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }
}
