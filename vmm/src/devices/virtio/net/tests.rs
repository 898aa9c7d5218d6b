//! virtio-net driven through rings in guest memory and a datagram socket
//! pair standing in for the TAP: no guest, no host interface.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::rxtx::{deliver, process_tx, Delivery, NetStats, MAX_FRAME};
use super::*;
use crate::devices::virtio::test_ring::{Ring, WRITE};
use crate::devices::virtio::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// A back end whose wire is a datagram socket the test holds the other end of.
struct Fake {
    sock: UnixDatagram,
    offloads: u64,
    enabled: Arc<std::sync::Mutex<Vec<u64>>>,
}

impl NetBackend for Fake {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sock.send(frame).map(|_| ())
    }
    fn guest_offloads(&self) -> u64 {
        self.offloads
    }
    fn enable_offloads(&mut self, acked: u64) -> io::Result<()> {
        self.enabled.lock().unwrap().push(acked & self.offloads);
        Ok(())
    }
}

fn fake(offloads: u64) -> (Fake, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    let f = Fake {
        sock: a,
        offloads,
        enabled: Arc::default(),
    };
    (f, b)
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

const BUFS: u64 = 0x10_0000;

/// A frame: a header (num_buffers zero) and `len` payload bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    f
}

#[test]
fn tx_sends_each_chain_as_one_frame() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    let mut q = ring.queue();
    let (mut backend, wire) = fake(0);
    let f = frame(100, 7);
    mem.write_slice(&f[..20], GuestAddress(BUFS)).unwrap();
    mem.write_slice(&f[20..], GuestAddress(BUFS + 0x1000))
        .unwrap();
    ring.post_chain(&[(BUFS, 20, 0), (BUFS + 0x1000, 92, 0)]);
    let mut buf = vec![0u8; MAX_FRAME];
    let mut stats = NetStats::default();
    assert_eq!(
        process_tx(&mut q, &mem, &mut backend, &mut buf, &mut stats, 256),
        1
    );
    let mut got = vec![0u8; 4096];
    let n = wire.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..]);
    assert_eq!((ring.used_idx(), ring.used_elem(0)), (1, (0, 0)));
    assert_eq!((stats.tx_frames, stats.tx_dropped), (1, 0));
}

#[test]
fn tx_drops_chains_that_are_not_frames() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    let mut q = ring.queue();
    let (mut backend, wire) = fake(0);
    // Shorter than the header; outside guest memory; write-only; larger
    // than any frame; each is one two-descriptor chain.
    ring.post_chain(&[(BUFS, 3, 0), (BUFS + 0x100, 2, 0)]);
    ring.post_chain(&[(BUFS, 64, 0), (0xffff_0000_0000, 64, 0)]);
    ring.post_chain(&[(BUFS, 64, WRITE), (BUFS + 0x100, 64, WRITE)]);
    ring.post_chain(&[(BUFS, 0x8000_0000, 0), (BUFS, 0x8000_0000, 0)]);
    let mut buf = vec![0u8; MAX_FRAME];
    let mut stats = NetStats::default();
    assert_eq!(
        process_tx(&mut q, &mem, &mut backend, &mut buf, &mut stats, 256),
        4
    );
    assert_eq!(ring.used_idx(), 4);
    assert_eq!((stats.tx_frames, stats.tx_dropped), (0, 4));
    let err = wire.recv(&mut buf).unwrap_err();
    assert_eq!(
        err.kind(),
        io::ErrorKind::WouldBlock,
        "nothing reached the wire"
    );
}

#[test]
fn tx_stops_at_its_budget() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    let mut q = ring.queue();
    let (mut backend, _wire) = fake(0);
    for _ in 0..10 {
        ring.post_chain(&[(BUFS, 64, 0)]);
    }
    let mut buf = vec![0u8; MAX_FRAME];
    let mut stats = NetStats::default();
    assert_eq!(
        process_tx(&mut q, &mem, &mut backend, &mut buf, &mut stats, 4),
        4
    );
    assert_eq!(ring.used_idx(), 4);
}

fn read_used_buffers(mem: &GuestMemoryMmap, ring: &Ring<'_>, from: u16, to: u16) -> Vec<u8> {
    let mut out = Vec::new();
    for i in from..to {
        let (id, len) = ring.used_elem(i);
        let d = ring.load_desc(id as u16);
        let mut b = vec![0u8; len as usize];
        mem.read_slice(&mut b, GuestAddress(d.addr().0)).unwrap();
        out.extend(b);
    }
    out
}

#[test]
fn rx_spans_mergeable_buffers_and_counts_them() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    let mut q = ring.queue();
    for i in 0..3 {
        ring.post_chain(&[(BUFS + i * 0x1000, 1500, WRITE)]);
    }
    let mut f = frame(2988, 3);
    let mut stats = NetStats::default();
    assert_eq!(
        deliver(&mut q, &mem, &mut f, true, &mut stats),
        Delivery::Used
    );
    assert_eq!(ring.used_idx(), 2);
    assert_eq!((ring.used_elem(0).1, ring.used_elem(1).1), (1500, 1500));
    let got = read_used_buffers(&mem, &ring, 0, 2);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(&got[HDR_LEN..], &frame(2988, 3)[HDR_LEN..]);
    assert_eq!(q.next_avail(), 2, "the third buffer is still the guest's");
    assert_eq!(stats.rx_frames, 1);
}

#[test]
fn rx_without_room_keeps_the_frame_until_buffers_come() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    let mut q = ring.queue();
    ring.post_chain(&[(BUFS, 1500, WRITE)]);
    let mut f = frame(2000, 9);
    let mut stats = NetStats::default();
    assert_eq!(
        deliver(&mut q, &mem, &mut f, true, &mut stats),
        Delivery::NoRoom
    );
    assert_eq!((ring.used_idx(), q.next_avail()), (0, 0), "nothing taken");
    ring.post_chain(&[(BUFS + 0x1000, 1500, WRITE)]);
    assert_eq!(
        deliver(&mut q, &mem, &mut f, true, &mut stats),
        Delivery::Used
    );
    assert_eq!(ring.used_idx(), 2);
    assert_eq!(
        &read_used_buffers(&mem, &ring, 0, 2)[HDR_LEN..],
        &frame(2000, 9)[HDR_LEN..]
    );
}

#[test]
fn rx_drops_frames_the_guest_buffers_cannot_hold() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    let mut q = ring.queue();
    let mut stats = NetStats::default();
    // Without mergeable buffers one chain must hold the frame.
    ring.post_chain(&[(BUFS, 100, WRITE)]);
    // A read-only buffer, a buffer outside guest memory, and one too
    // small for the header.
    ring.post_chain(&[(BUFS, 1500, 0)]);
    ring.post_chain(&[(0xffff_0000_0000, 1500, WRITE)]);
    ring.post_chain(&[(BUFS, 4, WRITE)]);
    assert_eq!(
        deliver(&mut q, &mem, &mut frame(200, 1), false, &mut stats),
        Delivery::Used
    );
    for _ in 0..3 {
        assert_eq!(
            deliver(&mut q, &mem, &mut frame(20, 1), true, &mut stats),
            Delivery::Used
        );
    }
    assert_eq!(ring.used_idx(), 4);
    for i in 0..4 {
        assert_eq!(ring.used_elem(i).1, 0, "entry {i} holds no data");
    }
    assert_eq!((stats.rx_frames, stats.rx_dropped), (0, 4));
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_device_moves_frames_both_ways_and_returns_its_back_end() {
    let mem = memory();
    let mut rx_ring = Ring::new(&mem, 0);
    let mut tx_ring = Ring::new(&mem, 0x4000);
    let (backend, wire) = fake(F_GUEST_CSUM | F_GUEST_TSO4);
    let enabled = backend.enabled.clone();
    let mac: MacAddr = "02:00:00:00:00:2a".parse().unwrap();
    let mut net = Net::new(mac, backend);
    let features = net.features();
    assert_eq!(
        features & (F_MAC | F_MRG_RXBUF | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6),
        F_MAC | F_MRG_RXBUF | F_GUEST_CSUM | F_GUEST_TSO4,
        "guest offloads only where the back end takes them"
    );
    let mut cfg = [0u8; 6];
    net.read_config(0, &mut cfg);
    assert_eq!(cfg, mac.0);

    for i in 0..8 {
        rx_ring.post_chain(&[(BUFS + i * 0x1000, 2048, WRITE)]);
    }
    let evts = vec![
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    ];
    let kicks: Vec<EventFd> = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let acked = VIRTIO_F_VERSION_1 | F_MAC | F_MRG_RXBUF | F_GUEST_CSUM;
    net.activate(ActivateContext {
        mem: mem.clone(),
        queues: vec![rx_ring.queue(), tx_ring.queue()],
        queue_evts: evts,
        interrupt: interrupt.clone(),
        acked_features: acked,
    })
    .unwrap();
    assert_eq!(enabled.lock().unwrap().as_slice(), &[F_GUEST_CSUM]);

    // Host -> guest: five frames, one needing two buffers.
    for (i, len) in [60usize, 1400, 3000, 100, 2036].into_iter().enumerate() {
        wire.send(&frame(len, i as u8)).unwrap();
    }
    wait_until("five RX frames", || rx_ring.used_idx() == 6);
    assert_ne!(interrupt.status() & INT_VRING, 0);
    let got = read_used_buffers(&mem, &rx_ring, 2, 4);
    assert_eq!(&got[HDR_LEN..], &frame(3000, 2)[HDR_LEN..]);

    // Guest -> host.
    let f = frame(500, 77);
    mem.write_slice(&f, GuestAddress(BUFS + 0x10_0000)).unwrap();
    tx_ring.post_chain(&[(BUFS + 0x10_0000, f.len() as u32, 0)]);
    kicks[1].write(1).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    wait_until("a TX frame on the wire", || match wire.recv(&mut buf) {
        Ok(len) => {
            n = len;
            true
        }
        Err(_) => false,
    });
    assert_eq!(&buf[..n], &f[..]);
    wait_until("the stats", || {
        let s = *net.stats().lock().unwrap();
        s.tx_frames == 1 && s.rx_frames == 5
    });

    // A reset hands the back end back with its offloads off; the device
    // can start again.
    net.reset();
    assert_eq!(enabled.lock().unwrap().last(), Some(&0));
    assert!(net.backend.is_some());
}

#[test]
fn a_queue_the_guest_never_set_up_is_refused() {
    let (backend, _wire) = fake(0);
    let mut net = Net::new(MacAddr([2, 0, 0, 0, 0, 1]), backend);
    let mem = memory();
    let err = net
        .activate(ActivateContext {
            mem,
            queues: vec![Queue::new(256).unwrap()],
            queue_evts: vec![EventFd::new(0).unwrap()],
            interrupt: Arc::new(Interrupt::new(EventFd::new(0).unwrap())),
            acked_features: 0,
        })
        .unwrap_err();
    assert!(matches!(
        err,
        ActivateError::QueueCount {
            expected: 2,
            got: 1
        }
    ));
    assert!(net.backend.is_some(), "the back end survives");
}
