//! The vsock muxer driven through mock queues and a fake host: no guest,
//! no filesystem. The "guest" here is a hand-rolled driver that can be as
//! hostile as a test needs.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::connection::BUF_ALLOC;
use super::host::VsockHost;
use super::muxer::{Muxer, MAX_PENDING_CONTROL};
use super::packet::{op, Header, HDR_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::devices::virtio::test_ring::{Ring, QSIZE};

const GUEST_CID: u64 = 3;
use crate::devices::virtio::test_ring::WRITE;

/// Host side whose connections are socket pairs the test holds.
#[derive(Clone)]
struct FakeHost {
    ready: Arc<EventFd>,
    incoming: Arc<Mutex<VecDeque<UnixStream>>>,
    outgoing: Arc<Mutex<Vec<(u32, UnixStream)>>>,
    listening: Arc<Mutex<Vec<u32>>>,
}

impl FakeHost {
    fn new(listening: &[u32]) -> Self {
        FakeHost {
            ready: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            incoming: Arc::default(),
            outgoing: Arc::default(),
            listening: Arc::new(Mutex::new(listening.to_vec())),
        }
    }

    /// A host program connecting; returns its end.
    fn dial(&self) -> UnixStream {
        let (ours, theirs) = UnixStream::pair().unwrap();
        self.incoming.lock().unwrap().push_back(theirs);
        self.ready.write(1).unwrap();
        ours
    }

    /// The host program's end of the oldest guest-initiated connection.
    fn accepted(&self) -> (u32, UnixStream) {
        self.outgoing.lock().unwrap().remove(0)
    }
}

impl VsockHost for FakeHost {
    fn listen_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    fn accept(&mut self) -> std::io::Result<Option<UnixStream>> {
        let next = self.incoming.lock().unwrap().pop_front();
        if next.is_none() {
            let _ = self.ready.read();
        }
        Ok(next)
    }

    fn connect(&mut self, port: u32) -> std::io::Result<UnixStream> {
        if !self.listening.lock().unwrap().contains(&port) {
            return Err(std::io::ErrorKind::ConnectionRefused.into());
        }
        let (ours, theirs) = UnixStream::pair()?;
        self.outgoing.lock().unwrap().push((port, theirs));
        Ok(ours)
    }
}

/// A virtio driver for the two data queues, with its own buffers.
struct Driver<'m> {
    mem: &'m GuestMemoryMmap,
    tx_ring: Ring<'m>,
    rx_ring: Ring<'m>,
    tx: Queue,
    rx: Queue,
    tx_posted: u16,
    rx_posted: u16,
    rx_seen: u16,
    /// Guest-side view of the stream: our buffer and what we consumed.
    buf_alloc: u32,
    fwd_cnt: u32,
}

const TX_BUFS: u64 = 0x10_0000;
const RX_BUFS: u64 = 0x200_0000;
const SLOT: u64 = 0x1_1000; // room for a header and a full payload

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x400_0000)]).unwrap()
}

impl<'m> Driver<'m> {
    fn new(mem: &'m GuestMemoryMmap) -> Self {
        let tx_ring = Ring::new(mem, 0);
        let rx_ring = Ring::new(mem, 0x4_0000);
        let (tx, rx) = (tx_ring.queue(), rx_ring.queue());
        Driver {
            mem,
            tx_ring,
            rx_ring,
            tx,
            rx,
            tx_posted: 0,
            rx_posted: 0,
            rx_seen: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }

    /// Publishes a one-descriptor chain; descriptor slots follow the ring.
    fn post(ring: &Ring<'m>, posted: &mut u16, desc: RawDescriptor) {
        let head = *posted % QSIZE;
        ring.store_desc(head, desc);
        ring.publish(*posted, head);
        *posted = posted.wrapping_add(1);
    }

    /// Queues one raw descriptor as a TX chain.
    fn send_raw(&mut self, desc: RawDescriptor) {
        Self::post(&self.tx_ring, &mut self.tx_posted, desc);
    }

    /// Queues a packet on TX.
    fn send(&mut self, hdr: &Header, payload: &[u8]) {
        let addr = TX_BUFS + u64::from(self.tx_posted % QSIZE) * SLOT;
        self.mem
            .write_slice(hdr.as_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        let d = SplitDescriptor::new(addr, (HDR_LEN + payload.len()) as u32, 0, 0);
        self.send_raw(RawDescriptor::from(d));
    }

    /// A stream packet from guest port `port` to host port `host_port`.
    fn packet(&self, op: u16, port: u32, host_port: u32) -> Header {
        let mut h = Header::stream(op);
        h.set_src_cid(GUEST_CID)
            .set_dst_cid(HOST_CID)
            .set_src_port(port)
            .set_dst_port(host_port)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt);
        h
    }

    /// Posts `n` RX buffers of `len` bytes (fewer if the ring is full).
    fn give_rx(&mut self, n: usize, len: u32) {
        let outstanding = self.rx_posted.wrapping_sub(self.rx_ring.used_idx());
        for _ in 0..n.min(usize::from(QSIZE - outstanding)) {
            let addr = RX_BUFS + u64::from(self.rx_posted % QSIZE) * SLOT;
            let d = SplitDescriptor::new(addr, len, WRITE, 0);
            Self::post(&self.rx_ring, &mut self.rx_posted, RawDescriptor::from(d));
        }
    }

    /// Runs the muxer until it makes no more progress.
    fn pump<H: VsockHost>(&mut self, m: &mut Muxer<H>) {
        for _ in 0..1000 {
            m.process_host_events();
            let tx = m.process_tx(&mut self.tx, self.mem);
            let rx = m.process_rx(&mut self.rx, self.mem);
            if !tx && !rx {
                return;
            }
        }
        panic!("the muxer never settles");
    }

    /// Packets the device has put in RX buffers since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.rx_ring.used_idx() {
            let (id, len) = self.rx_ring.used_elem(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let desc = self.rx_ring.load_desc(id as u16);
            let len = len as usize;
            if len < HDR_LEN {
                out.push((Header::stream(0), Vec::new()));
                continue;
            }
            let mut bytes = vec![0u8; len];
            self.mem
                .read_slice(&mut bytes, GuestAddress(desc.addr().0))
                .unwrap();
            let mut hdr = [0u8; HDR_LEN];
            hdr.copy_from_slice(&bytes[..HDR_LEN]);
            let hdr = Header::from_bytes(hdr);
            assert_eq!(hdr.len() as usize, len - HDR_LEN, "{hdr:?}");
            self.fwd_cnt = self.fwd_cnt.wrapping_add(hdr.len());
            out.push((hdr, bytes[HDR_LEN..].to_vec()));
        }
        out
    }

    fn tx_used(&self) -> u16 {
        self.tx_ring.used_idx()
    }
}

fn muxer(host: &FakeHost) -> Muxer<FakeHost> {
    Muxer::new(host.clone(), GUEST_CID)
        .map_err(|(e, _)| e)
        .unwrap()
}

fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(h, _)| h.op()).collect()
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut v = vec![0; n];
    s.read_exact(&mut v).unwrap();
    v
}

/// Guest port 1000 connects to host port 5000; returns the host's end.
fn guest_connects(d: &mut Driver<'_>, m: &mut Muxer<FakeHost>, host: &FakeHost) -> UnixStream {
    d.give_rx(8, SLOT as u32);
    d.send(&d.packet(op::REQUEST, 1000, 5000), &[]);
    d.pump(m);
    let got = d.received();
    assert_eq!(ops(&got), [op::RESPONSE]);
    let (h, _) = &got[0];
    assert_eq!((h.src_cid(), h.src_port()), (HOST_CID, 5000));
    assert_eq!((h.dst_cid(), h.dst_port()), (GUEST_CID, 1000));
    assert_eq!(h.buf_alloc(), BUF_ALLOC);
    let (port, stream) = host.accepted();
    assert_eq!(port, 5000);
    stream
}

#[test]
fn a_guest_connection_reaches_the_host_port_and_carries_data_both_ways() {
    let mem = guest_memory();
    let host = FakeHost::new(&[5000]);
    let mut m = muxer(&host);
    let mut d = Driver::new(&mem);
    let mut s = guest_connects(&mut d, &mut m, &host);

    d.send(&d.packet(op::RW, 1000, 5000).set_len(5).clone(), b"hello");
    d.pump(&mut m);
    assert_eq!(read_exactly(&mut s, 5), b"hello");

    s.write_all(b"world").unwrap();
    d.pump(&mut m);
    let got = d.received();
    assert_eq!(ops(&got), [op::RW]);
    assert_eq!(got[0].1, b"world");
    assert_eq!(got[0].0.len(), 5);
    assert_eq!(m.connection_count(), 1);
}

#[test]
fn a_guest_connecting_to_a_port_nobody_listens_on_is_reset() {
    let mem = guest_memory();
    let host = FakeHost::new(&[]);
    let mut m = muxer(&host);
    let mut d = Driver::new(&mem);
    d.give_rx(4, SLOT as u32);
    d.send(&d.packet(op::REQUEST, 1000, 5000), &[]);
    d.pump(&mut m);
    let got = d.received();
    assert_eq!(ops(&got), [op::RST]);
    assert_eq!((got[0].0.src_port(), got[0].0.dst_port()), (5000, 1000));
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn a_host_program_connects_with_the_connect_line_and_gets_ok() {
    let mem = guest_memory();
    let host = FakeHost::new(&[]);
    let mut m = muxer(&host);
    let mut d = Driver::new(&mem);
    d.give_rx(8, SLOT as u32);
    let mut s = host.dial();
    // Data right after the line must not be swallowed by the handshake.
    s.write_all(b"CONNECT 52\nearly").unwrap();
    d.pump(&mut m);
    let got = d.received();
    assert_eq!(ops(&got), [op::REQUEST]);
    let req = got[0].0;
    assert_eq!(req.dst_port(), 52);
    assert!(req.src_port() >= 1 << 30, "{req:?}");

    d.send(&d.packet(op::RESPONSE, 52, req.src_port()), &[]);
    d.pump(&mut m);
    let ok = format!("OK {}\n", req.src_port());
    assert_eq!(read_exactly(&mut s, ok.len()), ok.as_bytes());
    let got = d.received();
    assert_eq!(ops(&got), [op::RW]);
    assert_eq!(got[0].1, b"early");
}

#[test]
fn a_bad_connect_line_or_a_guest_refusal_closes_the_host_socket() {
    let mem = guest_memory();
    let host = FakeHost::new(&[]);
    let mut m = muxer(&host);
    let mut d = Driver::new(&mem);
    d.give_rx(8, SLOT as u32);
    let eof = |mut s: UnixStream| {
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            // Closed with our unread bytes in it.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Vec::new(),
            r => {
                r.unwrap();
                rest
            }
        }
    };
    for line in [
        &b"HELLO 1\n"[..],
        b"CONNECT x\n",
        b"CONNECT 99999999999\n",
        &[b'C'; 100],
    ] {
        let mut s = host.dial();
        s.write_all(line).unwrap();
        d.pump(&mut m);
        assert_eq!(eof(s), b"", "{:?}", String::from_utf8_lossy(line));
    }
    assert!(d.received().is_empty());

    let mut s = host.dial();
    s.write_all(b"CONNECT 7\n").unwrap();
    d.pump(&mut m);
    let req = d.received()[0].0;
    d.send(&d.packet(op::RST, 7, req.src_port()), &[]);
    d.pump(&mut m);
    assert_eq!(eof(s), b"", "no OK after a refusal");
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn data_to_the_guest_never_exceeds_its_credit() {
    let mem = guest_memory();
    let host = FakeHost::new(&[5000]);
    let mut m = muxer(&host);
    let mut d = Driver::new(&mem);
    d.buf_alloc = 10;
    let mut s = guest_connects(&mut d, &mut m, &host);
    s.write_all(&[7u8; 100]).unwrap();
    d.give_rx(8, SLOT as u32);
    d.pump(&mut m);
    let got = d.received();
    let bytes: usize = got.iter().map(|(_, p)| p.len()).sum();
    assert_eq!(bytes, 10, "{:?}", ops(&got));

    // The guest consumed the 10 bytes and says so.
    d.send(&d.packet(op::CREDIT_UPDATE, 1000, 5000), &[]);
    d.pump(&mut m);
    let bytes: usize = d.received().iter().map(|(_, p)| p.len()).sum();
    assert_eq!(bytes, 10);
}

#[test]
fn the_host_announces_credit_as_it_forwards_guest_data() {
    let mem = guest_memory();
    let host = FakeHost::new(&[5000]);
    let mut m = muxer(&host);
    let mut d = Driver::new(&mem);
    let mut s = guest_connects(&mut d, &mut m, &host);
    let chunk = vec![1u8; MAX_PAYLOAD as usize];
    for _ in 0..2 {
        let mut h = d.packet(op::RW, 1000, 5000);
        h.set_len(MAX_PAYLOAD);
        d.send(&h, &chunk);
    }
    d.pump(&mut m);
    read_exactly(&mut s, 2 * MAX_PAYLOAD as usize);
    let got = d.received();
    let update = got
        .iter()
        .find(|(h, _)| h.op() == op::CREDIT_UPDATE)
        .unwrap_or_else(|| panic!("no credit update: {:?}", ops(&got)));
    assert_eq!(update.0.fwd_cnt(), 2 * MAX_PAYLOAD);
}

#[test]
fn a_guest_that_ignores_credit_is_reset() {
    let mem = guest_memory();
    let host = FakeHost::new(&[5000]);
    let mut m = muxer(&host);
    let mut d = Driver::new(&mem);
    let _s = guest_connects(&mut d, &mut m, &host);
    let chunk = vec![1u8; MAX_PAYLOAD as usize];
    // The host program reads nothing; the socket buffer plus BUF_ALLOC is
    // far below 8 MiB.
    for _ in 0..128 {
        let mut h = d.packet(op::RW, 1000, 5000);
        h.set_len(MAX_PAYLOAD);
        d.send(&h, &chunk);
        d.pump(&mut m);
        if m.connection_count() == 0 {
            break;
        }
    }
    assert_eq!(m.connection_count(), 0);
    assert!(ops(&d.received()).contains(&op::RST));
}

#[test]
fn orderly_shutdown_in_both_directions() {
    let mem = guest_memory();
    let host = FakeHost::new(&[5000]);
    let mut m = muxer(&host);
    let mut d = Driver::new(&mem);
    let mut s = guest_connects(&mut d, &mut m, &host);

    // Guest: "I send no more" -> the host program reads EOF but can still write.
    d.send(&d.packet(op::RW, 1000, 5000).set_len(3).clone(), b"bye");
    d.send(
        &d.packet(op::SHUTDOWN, 1000, 5000)
            .set_flags(SHUTDOWN_SEND)
            .clone(),
        &[],
    );
    d.pump(&mut m);
    let mut all = Vec::new();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"bye");
    s.write_all(b"reply").unwrap();
    drop(s);
    d.pump(&mut m);
    let got = d.received();
    assert_eq!(ops(&got), [op::RW, op::SHUTDOWN]);
    assert_eq!(got[0].1, b"reply");
    assert_eq!(got[1].0.flags(), SHUTDOWN_SEND);

    // Guest closes: SHUTDOWN with both flags, answered by RST.
    d.send(
        &d.packet(op::SHUTDOWN, 1000, 5000)
            .set_flags(SHUTDOWN_SEND | SHUTDOWN_RCV)
            .clone(),
        &[],
    );
    d.pump(&mut m);
    assert_eq!(ops(&d.received()), [op::RST]);
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn a_dead_host_program_resets_the_guest_connection() {
    let mem = guest_memory();
    let host = FakeHost::new(&[5000]);
    let mut m = muxer(&host);
    let mut d = Driver::new(&mem);
    let s = guest_connects(&mut d, &mut m, &host);
    drop(s);
    d.pump(&mut m);
    assert_eq!(ops(&d.received()), [op::SHUTDOWN]);
    // The guest still writes: the host end is gone for good.
    d.send(&d.packet(op::RW, 1000, 5000).set_len(4).clone(), b"ping");
    d.pump(&mut m);
    assert_eq!(ops(&d.received()), [op::RST]);
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn packets_for_unknown_connections_or_other_hosts() {
    let mem = guest_memory();
    let host = FakeHost::new(&[5000]);
    let mut m = muxer(&host);
    let mut d = Driver::new(&mem);
    d.give_rx(8, SLOT as u32);
    d.send(&d.packet(op::RW, 1, 2).set_len(1).clone(), b"x");
    d.pump(&mut m);
    assert_eq!(ops(&d.received()), [op::RST], "data on no connection");
    d.send(&d.packet(op::RST, 1, 2), &[]);
    d.pump(&mut m);
    assert!(d.received().is_empty(), "an RST is never answered");
    let mut spoofed = d.packet(op::REQUEST, 1000, 5000);
    spoofed.set_src_cid(77);
    d.send(&spoofed, &[]);
    let mut elsewhere = d.packet(op::REQUEST, 1000, 5000);
    elsewhere.set_dst_cid(9);
    d.send(&elsewhere, &[]);
    let mut dgram = d.packet(op::REQUEST, 1000, 5000);
    dgram.set_kind(3);
    d.send(&dgram, &[]);
    d.pump(&mut m);
    assert_eq!(
        ops(&d.received()),
        [op::RST],
        "only the wrong type is answered"
    );
    assert_eq!(m.connection_count(), 0);
    assert!(
        host.outgoing.lock().unwrap().is_empty(),
        "nothing was connected"
    );
}

#[test]
fn hostile_chains_are_consumed_without_harm() {
    let mem = guest_memory();
    let host = FakeHost::new(&[5000]);
    let mut m = muxer(&host);
    let mut d = Driver::new(&mem);
    let raw = |addr, len, flags| RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0));
    let mut lying = d.packet(op::REQUEST, 1000, 5000);
    lying.set_len(1000); // claims a payload the chain does not have
    mem.write_slice(lying.as_bytes(), GuestAddress(TX_BUFS))
        .unwrap();
    let mut huge = d.packet(op::RW, 1000, 5000);
    huge.set_len(MAX_PAYLOAD + 1);
    mem.write_slice(huge.as_bytes(), GuestAddress(TX_BUFS + SLOT))
        .unwrap();
    let chains = [
        raw(TX_BUFS, 10, 0),                      // shorter than a header
        raw(TX_BUFS, HDR_LEN as u32, 0),          // len beyond the chain
        raw(TX_BUFS + SLOT, 0x2_0000, 0),         // payload over the maximum
        raw(0xffff_f000_0000, HDR_LEN as u32, 0), // outside guest memory
        raw(TX_BUFS, HDR_LEN as u32, WRITE),      // wrong direction
        raw(TX_BUFS, 0, 0),                       // empty
        raw(TX_BUFS, u32::MAX, 0),                // beyond memory's end
    ];
    for c in chains {
        d.send_raw(c);
    }
    // RX buffers that cannot take a header, or are read-only.
    for (len, flags) in [(0, WRITE), (HDR_LEN as u32 - 1, WRITE), (SLOT as u32, 0)] {
        let addr = RX_BUFS + u64::from(d.rx_posted % QSIZE) * SLOT;
        Driver::post(&d.rx_ring, &mut d.rx_posted, raw(addr, len, flags));
    }
    d.send(&d.packet(op::RW, 1, 2).set_len(0).clone(), &[]); // draws an RST
    d.pump(&mut m);
    assert_eq!(d.tx_used(), 8, "every TX chain is returned");
    let got = d.received();
    assert_eq!(got.len(), 3, "unusable RX buffers are returned empty");
    assert!(got.iter().all(|(h, _)| h.op() == 0));
    d.give_rx(1, SLOT as u32);
    d.pump(&mut m);
    assert_eq!(ops(&d.received()), [op::RST]);
    assert_eq!(m.connection_count(), 0);
}

#[test]
fn a_guest_that_never_reads_cannot_grow_the_control_backlog() {
    let mem = guest_memory();
    let host = FakeHost::new(&[]);
    let mut m = muxer(&host);
    let mut d = Driver::new(&mem);
    for round in 0..(MAX_PENDING_CONTROL / QSIZE as usize + 4) {
        for i in 0..QSIZE {
            if d.tx_posted.wrapping_sub(d.tx_used()) < QSIZE {
                let port = (round * 1000 + i as usize) as u32;
                d.send(&d.packet(op::REQUEST, port, 5000), &[]);
            }
        }
        d.pump(&mut m);
    }
    assert!(
        d.tx_used() as usize <= MAX_PENDING_CONTROL,
        "TX stops at the backlog limit: {} consumed",
        d.tx_used()
    );
    // Once the guest reads, the refusals arrive and TX moves again.
    let before = d.tx_used();
    for _ in 0..16 {
        d.give_rx(QSIZE as usize / 2, SLOT as u32);
        d.pump(&mut m);
        d.received();
    }
    assert!(d.tx_used() > before);
}

#[test]
fn random_packets_never_panic() {
    let mem = guest_memory();
    let host = FakeHost::new(&[5000, 5001]);
    let mut m = muxer(&host);
    let mut d = Driver::new(&mem);
    let mut rng = crate::devices::virtio::rng::tests::XorShift(0x2545_f491_4f6c_dd1d);
    let mut dialed = Vec::new();
    let mut seen = [0usize; 9];
    for _ in 0..2000 {
        let r = rng.next();
        // Half the packets are data, so connections live long enough to
        // carry some; the rest are any operation, valid or not.
        let mut h = d.packet(
            if r & 1 == 0 { op::RW } else { (r % 9) as u16 },
            (r >> 8) as u32 % 4,
            5000 + (r >> 16) as u32 % 3,
        );
        if r >> 24 & 7 == 0 {
            h.set_len((rng.next() % 200) as u32);
        }
        h.set_flags((r >> 32) as u32 % 4)
            .set_buf_alloc((rng.next() % 4096) as u32);
        if r >> 40 & 7 == 0 {
            h.set_fwd_cnt((rng.next() % 4096) as u32);
        }
        let payload: Vec<u8> = (0..h.len().min(150)).map(|_| rng.next() as u8).collect();
        d.send(&h, &payload);
        match rng.next() % 8 {
            0 | 5 | 6 => d.give_rx(8, (rng.next() % 400) as u32),
            1 => dialed.push(host.dial()),
            2 => {
                if let Some(s) = dialed.last_mut() {
                    let _ = s.write_all(b"CONNECT 3\nxyz");
                }
            }
            3 => drop(dialed.pop()),
            4 => {
                for (_, s) in host.outgoing.lock().unwrap().iter_mut() {
                    let _ = s.write_all(b"data for the guest");
                }
            }
            _ => {}
        }
        d.pump(&mut m);
        for (h, _) in d.received() {
            seen[usize::from(h.op()).min(8)] += 1;
        }
    }
    assert!(m.connection_count() <= super::muxer::MAX_CONNECTIONS);
    // The noise must reach the interesting paths, not just be dropped.
    for o in [op::REQUEST, op::RESPONSE, op::RST, op::RW] {
        assert!(
            seen[usize::from(o)] > 0,
            "op {o} never sent to the guest: {seen:?}"
        );
    }
}
