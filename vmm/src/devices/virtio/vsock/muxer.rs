//! Multiplexes every vsock connection of one device over its RX and TX
//! queues. Single-threaded: the device's worker calls in when a queue is
//! notified or a host socket is ready (edge-triggered, through the muxer's
//! own epoll, which the worker nests in its own).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{Connection, Fault, RxPacket, State};
use super::host::VsockHost;
use super::packet::{
    op, Header, HDR_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// Most connections (open or being opened) per device; more are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets waiting for RX buffers beyond which the TX queue is not
/// read: a guest that sends without receiving cannot grow host memory.
pub const MAX_PENDING_CONTROL: usize = 2048;
/// Longest `CONNECT <port>\n` line accepted from a host program.
const MAX_CONNECT_LINE: usize = 32;
/// First port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

const LISTENER_TOKEN: u64 = 0;

/// (host port, guest port)
type Key = (u32, u32);

#[derive(Debug)]
enum Slot {
    /// A host program that has not finished its CONNECT line.
    Handshake(UnixStream, Vec<u8>),
    /// An open connection.
    Conn(Key),
}

/// All connections of one device.
pub struct Muxer<H: VsockHost> {
    host: H,
    guest_cid: u64,
    epoll: Epoll,
    conns: HashMap<Key, Connection>,
    slots: HashMap<u64, Slot>,
    next_token: u64,
    next_local_port: u32,
    control: VecDeque<Header>,
    rx_queue: VecDeque<Key>,
    scratch: Vec<u8>,
}

impl<H: VsockHost> std::fmt::Debug for Muxer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Muxer")
            .field("guest_cid", &self.guest_cid)
            .field("connections", &self.conns.len())
            .field("control", &self.control.len())
            .finish()
    }
}

impl<H: VsockHost> Muxer<H> {
    /// A muxer for a guest with context ID `guest_cid`.
    /// On failure the host side comes back with the error.
    pub fn new(host: H, guest_cid: u64) -> Result<Self, (std::io::Error, H)> {
        let epoll = Epoll::new().and_then(|epoll| {
            epoll.ctl(
                ControlOperation::Add,
                host.listen_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )?;
            Ok(epoll)
        });
        let epoll = match epoll {
            Ok(e) => e,
            Err(e) => return Err((e, host)),
        };
        Ok(Muxer {
            host,
            guest_cid,
            epoll,
            conns: HashMap::new(),
            slots: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
            control: VecDeque::new(),
            rx_queue: VecDeque::new(),
            scratch: vec![0; MAX_PAYLOAD as usize],
        })
    }

    /// Gives the host side back (the device keeps it across resets).
    pub fn into_host(self) -> H {
        self.host
    }

    /// Polls readable when host sockets have events for [`Self::process_host_events`].
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Handles whatever host sockets are ready now, without blocking.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let Ok(n) = self.epoll.wait(0, &mut events) else {
            return;
        };
        for ev in &events[..n] {
            if ev.data() == LISTENER_TOKEN {
                self.accept_all();
            } else {
                self.socket_event(ev.data(), ev.event_set());
            }
        }
    }

    fn register(&mut self, stream: &UnixStream) -> Option<u64> {
        let token = self.next_token;
        self.next_token += 1;
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(events, token),
            )
            .ok()?;
        Some(token)
    }

    fn accept_all(&mut self) {
        while let Ok(Some(stream)) = self.host.accept() {
            if self.slots.len() >= MAX_CONNECTIONS || stream.set_nonblocking(true).is_err() {
                continue;
            }
            if let Some(token) = self.register(&stream) {
                self.slots
                    .insert(token, Slot::Handshake(stream, Vec::new()));
                // The line may already be there; the edge was before registration.
                self.socket_event(token, EventSet::IN);
            }
        }
    }

    fn socket_event(&mut self, token: u64, events: EventSet) {
        match self.slots.get_mut(&token) {
            Some(Slot::Handshake(..)) => self.read_connect_line(token),
            Some(Slot::Conn(key)) => {
                let key = *key;
                let Some(conn) = self.conns.get_mut(&key) else {
                    return;
                };
                if events.intersects(
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                ) {
                    conn.readable = true;
                }
                if events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
                    let result = conn.on_writable();
                    self.after_change(key, result);
                    return;
                }
                self.schedule(key);
            }
            None => {}
        }
    }

    /// Reads the `CONNECT <port>\n` line a byte at a time, so stream data
    /// the program sends right after it stays in the socket.
    fn read_connect_line(&mut self, token: u64) {
        let Some(Slot::Handshake(stream, line)) = self.slots.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(line),
                Ok(1) if line.len() < MAX_CONNECT_LINE => line.push(byte[0]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // EOF, an error or an overlong line.
                _ => break None,
            }
        };
        let Some(Slot::Handshake(stream, _)) = self.slots.remove(&token) else {
            return;
        };
        let Some(peer_port) = port else {
            return; // dropping the stream closes it
        };
        let local_port = self.allocate_local_port(peer_port);
        let key = (local_port, peer_port);
        let mut conn = Connection::new(stream, local_port, peer_port, token, State::Connecting);
        let req = conn.header(self.guest_cid, op::REQUEST);
        self.control.push_back(req);
        self.conns.insert(key, conn);
        self.slots.insert(token, Slot::Conn(key));
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    fn schedule(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.scheduled && conn.wants_rx() {
                conn.scheduled = true;
                self.rx_queue.push_back(key);
            }
        }
    }

    /// Resets the connection on a fault, tears it down once finished,
    /// otherwise schedules it for RX if it has something for the guest.
    fn after_change(&mut self, key: Key, result: Result<(), Fault>) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        if result.is_err() || conn.finished() {
            self.reset(key);
        } else {
            self.schedule(key);
        }
    }

    /// Sends RST to the guest and forgets the connection.
    fn reset(&mut self, key: Key) {
        if let Some(mut conn) = self.conns.remove(&key) {
            let rst = conn.header(self.guest_cid, op::RST);
            self.control.push_back(rst);
            self.slots.remove(&conn.token);
        }
    }

    fn reply_rst(&mut self, to: &Header) {
        let mut rst = Header::stream(op::RST);
        rst.set_src_cid(HOST_CID)
            .set_dst_cid(self.guest_cid)
            .set_src_port(to.dst_port())
            .set_dst_port(to.src_port());
        self.control.push_back(rst);
    }

    /// Reads every packet the guest queued on TX (while control packets
    /// have room). Returns whether a buffer was used.
    pub fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while self.control.len() < MAX_PENDING_CONTROL {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            if let Ok(mut reader) = chain.reader(mem) {
                let mut hdr = [0u8; HDR_LEN];
                if reader.read_exact(&mut hdr).is_ok() {
                    let hdr = Header::from_bytes(hdr);
                    let len = hdr.len() as usize;
                    // Oversized or lying about its length: dropped.
                    if len <= MAX_PAYLOAD as usize && len <= reader.available_bytes() {
                        let mut payload = std::mem::take(&mut self.scratch);
                        if reader.read_exact(&mut payload[..len]).is_ok() {
                            self.guest_packet(&hdr, &payload[..len]);
                        }
                        self.scratch = payload;
                    }
                }
            }
            match queue.add_used(mem, head, 0) {
                Ok(()) => used = true,
                Err(virtio_queue::Error::InvalidDescriptorIndex) => {}
                Err(_) => break,
            }
        }
        used
    }

    fn guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        if hdr.src_cid() != self.guest_cid || hdr.dst_cid() != HOST_CID {
            return; // not a packet for this host; a reply would go nowhere
        }
        if hdr.kind() != TYPE_STREAM {
            if hdr.op() != op::RST {
                self.reply_rst(hdr);
            }
            return;
        }
        let key = (hdr.dst_port(), hdr.src_port());
        let Some(conn) = self.conns.get_mut(&key) else {
            match hdr.op() {
                op::REQUEST => self.guest_connect(hdr),
                op::RST => {}
                _ => self.reply_rst(hdr),
            }
            return;
        };
        conn.update_peer_credit(hdr);
        let result = match (hdr.op(), conn.state) {
            (op::RESPONSE, State::Connecting) => {
                conn.state = State::Established;
                let ok = format!("OK {}\n", conn.local_port);
                // A fresh socket's buffer always takes a few bytes.
                match (&conn.stream).write(ok.as_bytes()) {
                    Ok(n) if n == ok.len() => Ok(()),
                    _ => Err(Fault::HostGone),
                }
            }
            (op::RW, State::Established) if !conn.guest_no_send => conn.recv_from_guest(data),
            (op::SHUTDOWN, State::Established) => {
                conn.guest_no_recv |= hdr.flags() & SHUTDOWN_RCV != 0;
                conn.guest_no_send |= hdr.flags() & SHUTDOWN_SEND != 0;
                conn.recv_from_guest(&[])
            }
            (op::CREDIT_UPDATE, _) => Ok(()),
            (op::CREDIT_REQUEST, _) => {
                conn.credit_update_due = true;
                Ok(())
            }
            (op::RST, _) => {
                if let Some(conn) = self.conns.remove(&key) {
                    self.slots.remove(&conn.token);
                }
                return;
            }
            // REQUEST on an open connection, data before it is open or
            // after SHUTDOWN, unknown operations: the guest broke the protocol.
            _ => Err(Fault::HostGone),
        };
        self.after_change(key, result);
    }

    fn guest_connect(&mut self, hdr: &Header) {
        if self.slots.len() >= MAX_CONNECTIONS {
            self.reply_rst(hdr);
            return;
        }
        let stream = match self.host.connect(hdr.dst_port()) {
            Ok(s) if s.set_nonblocking(true).is_ok() => s,
            _ => {
                self.reply_rst(hdr);
                return;
            }
        };
        let Some(token) = self.register(&stream) else {
            self.reply_rst(hdr);
            return;
        };
        let key = (hdr.dst_port(), hdr.src_port());
        let mut conn = Connection::new(stream, key.0, key.1, token, State::Established);
        conn.update_peer_credit(hdr);
        let response = conn.header(self.guest_cid, op::RESPONSE);
        self.control.push_back(response);
        self.conns.insert(key, conn);
        self.slots.insert(token, Slot::Conn(key));
        self.schedule(key);
    }

    /// Whether there is anything for the guest's RX buffers.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.rx_queue.is_empty()
    }

    /// Fills the guest's RX buffers: control packets first, then data from
    /// the connections in turn. Returns whether a buffer was used.
    pub fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while self.has_rx() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN => {
                    let room = w.available_bytes() - HDR_LEN;
                    match self.next_rx_packet(room) {
                        Some((hdr, len)) => {
                            let ok = w.write_all(hdr.as_bytes()).is_ok()
                                && w.write_all(&self.scratch[..len]).is_ok();
                            if ok {
                                (HDR_LEN + len) as u32
                            } else {
                                0
                            }
                        }
                        None => {
                            queue.go_to_previous_position();
                            continue;
                        }
                    }
                }
                // Too small for a header, read-only or outside guest memory.
                _ => 0,
            };
            match queue.add_used(mem, head, written) {
                Ok(()) => used = true,
                Err(virtio_queue::Error::InvalidDescriptorIndex) => {}
                Err(_) => break,
            }
        }
        used
    }

    /// The next packet for the guest, its payload in `self.scratch`.
    fn next_rx_packet(&mut self, room: usize) -> Option<(Header, usize)> {
        if let Some(hdr) = self.control.pop_front() {
            return Some((hdr, 0));
        }
        while let Some(key) = self.rx_queue.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.scheduled = false;
            let room = room.min(self.scratch.len());
            match conn.fill_rx(self.guest_cid, &mut self.scratch[..room]) {
                Ok(RxPacket::Packet(hdr, len)) => {
                    self.schedule(key);
                    return Some((hdr, len));
                }
                Ok(RxPacket::Nothing) => {}
                Err(_) => {
                    self.reset(key);
                    return self.control.pop_front().map(|h| (h, 0));
                }
            }
        }
        None
    }
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.trim_end_matches('\r').strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}
