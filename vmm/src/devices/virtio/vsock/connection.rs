//! One vsock stream between a guest port and a host Unix socket, with the
//! credit accounting of virtio 1.2, 5.10.6.3 in both directions.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use super::packet::{op, Header, MAX_PAYLOAD, SHUTDOWN_SEND};

/// Receive buffer the host side advertises per connection: bytes from the
/// guest the host program has not read yet are held up to this much.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Forwarded bytes after which the guest is told about the freed space
/// without waiting for it to ask.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    /// Data flows.
    Established,
}

/// Why a connection must be reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The guest sent more than the credit it was given.
    CreditExceeded,
    /// The host side failed (closed for reading, reset, ...).
    HostGone,
}

/// What [`Connection::fill_rx`] produced for the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum RxPacket {
    /// A header and `len` payload bytes were produced (len may be 0).
    Packet(Header, usize),
    /// Nothing to send now.
    Nothing,
}

/// A connection's state.
#[derive(Debug)]
pub struct Connection {
    /// The host end.
    pub stream: UnixStream,
    /// Host-side port (the guest's peer port).
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    /// Epoll token of `stream`.
    pub token: u64,
    /// Life cycle.
    pub state: State,
    /// Queued on the muxer's RX list.
    pub scheduled: bool,
    /// The host end may have data (edge-triggered readiness seen, no
    /// WouldBlock since).
    pub readable: bool,
    writable: bool,
    /// Guest data the host program has not read yet.
    pending: Vec<u8>,
    /// Bytes forwarded from the guest to the host program.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// The guest asked for (or is owed) a credit update.
    pub credit_update_due: bool,
    /// Bytes sent to the guest, and the guest's buffer state.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The host program will send nothing more (EOF read).
    pub host_eof: bool,
    /// The guest will send nothing more.
    pub guest_no_send: bool,
    /// The guest will receive nothing more.
    pub guest_no_recv: bool,
    host_write_shut: bool,
}

impl Connection {
    /// A connection over `stream` (non-blocking) between the two ports.
    pub fn new(
        stream: UnixStream,
        local_port: u32,
        peer_port: u32,
        token: u64,
        state: State,
    ) -> Self {
        Connection {
            stream,
            local_port,
            peer_port,
            token,
            state,
            scheduled: false,
            // Data may already sit in the socket: a read attempt decides.
            readable: true,
            writable: true,
            pending: Vec::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            credit_update_due: false,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_eof: false,
            guest_no_send: false,
            guest_no_recv: false,
            host_write_shut: false,
        }
    }

    /// A header from this connection to the guest, carrying our credit.
    pub fn header(&mut self, guest_cid: u64, op: u16) -> Header {
        let mut h = Header::stream(op);
        h.set_src_cid(super::packet::HOST_CID)
            .set_dst_cid(guest_cid)
            .set_src_port(self.local_port)
            .set_dst_port(self.peer_port)
            .set_buf_alloc(BUF_ALLOC)
            .set_fwd_cnt(self.fwd_cnt);
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_due = false;
        h
    }

    /// Records the guest's buffer state carried by every guest packet.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc();
        self.peer_fwd_cnt = hdr.fwd_cnt();
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Bytes from the guest the host program has not read yet.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Whether an RX packet could be produced for the guest.
    pub fn wants_rx(&self) -> bool {
        self.state == State::Established
            && (self.credit_update_due
                || (self.readable
                    && !self.host_eof
                    && !self.guest_no_recv
                    && self.peer_credit() > 0))
    }

    /// Data the guest sent: to the host program now if it takes it, else
    /// held within the advertised buffer.
    pub fn recv_from_guest(&mut self, data: &[u8]) -> Result<(), Fault> {
        if self.pending.len() + data.len() > BUF_ALLOC as usize {
            return Err(Fault::CreditExceeded);
        }
        self.pending.extend_from_slice(data);
        self.flush()
    }

    /// The host end became writable.
    pub fn on_writable(&mut self) -> Result<(), Fault> {
        self.writable = true;
        self.flush()
    }

    fn flush(&mut self) -> Result<(), Fault> {
        let mut done = 0;
        while self.writable && done < self.pending.len() {
            match self.stream.write(&self.pending[done..]) {
                Ok(0) => return Err(Fault::HostGone),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(Fault::HostGone),
            }
        }
        self.pending.drain(..done);
        self.fwd_cnt = self.fwd_cnt.wrapping_add(done as u32);
        let unannounced = self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        // A guest that ran out of credit has pending + unannounced ==
        // BUF_ALLOC, so as the host drains `pending` this always fires.
        if unannounced >= CREDIT_UPDATE_THRESHOLD {
            self.credit_update_due = true;
        }
        if self.pending.is_empty() && self.guest_no_send && !self.host_write_shut {
            self.host_write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// Whether both sides are done and the connection can be torn down.
    pub fn finished(&self) -> bool {
        self.guest_no_send && self.guest_no_recv && self.pending.is_empty()
    }

    /// Produces the next packet for the guest into `payload` (whose length
    /// caps the payload): data read from the host end, a SHUTDOWN once the
    /// host end reached EOF, or a pending credit update.
    pub fn fill_rx(&mut self, guest_cid: u64, payload: &mut [u8]) -> Result<RxPacket, Fault> {
        if self.state != State::Established {
            return Ok(RxPacket::Nothing);
        }
        let room = payload
            .len()
            .min(self.peer_credit() as usize)
            .min(MAX_PAYLOAD as usize);
        if self.readable && !self.host_eof && !self.guest_no_recv && room > 0 {
            loop {
                match self.stream.read(&mut payload[..room]) {
                    Ok(0) => {
                        self.host_eof = true;
                        let mut h = self.header(guest_cid, op::SHUTDOWN);
                        h.set_flags(SHUTDOWN_SEND);
                        return Ok(RxPacket::Packet(h, 0));
                    }
                    Ok(n) => {
                        self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                        let mut h = self.header(guest_cid, op::RW);
                        h.set_len(n as u32);
                        return Ok(RxPacket::Packet(h, n));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.readable = false;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Err(Fault::HostGone),
                }
            }
        }
        if self.credit_update_due {
            return Ok(RxPacket::Packet(
                self.header(guest_cid, op::CREDIT_UPDATE),
                0,
            ));
        }
        Ok(RxPacket::Nothing)
    }
}
