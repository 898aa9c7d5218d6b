//! A blocking rtnetlink socket: dumps and acknowledged requests, one at a
//! time. The monitor has no async runtime, and it talks to one network
//! namespace for a handful of messages at create and at the end.

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// An rtnetlink socket of the calling thread's network namespace.
#[derive(Debug)]
pub struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Every object `request` (a `Get*` message) asks for.
    pub fn dump(&mut self, request: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut out = Vec::new();
        self.exchange(request, NLM_F_REQUEST | NLM_F_DUMP, &mut out)?;
        Ok(out)
    }

    /// Sends `request` with `flags` (NLM_F_CREATE, NLM_F_EXCL...) and
    /// waits for the kernel's acknowledgement.
    pub fn apply(&mut self, request: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let mut ignored = Vec::new();
        self.exchange(request, NLM_F_REQUEST | NLM_F_ACK | flags, &mut ignored)
    }

    fn exchange(
        &mut self,
        request: RouteNetlinkMessage,
        flags: u16,
        out: &mut Vec<RouteNetlinkMessage>,
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let dump = flags & NLM_F_DUMP != 0;
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut at = 0;
            while at < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[at..])
                    .map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("netlink reply: {e}"))
                    })?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                at += len;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => match e.code {
                        // An error message without a code is the ACK.
                        None => return Ok(()),
                        Some(_) => return Err(e.to_io()),
                    },
                    NetlinkPayload::InnerMessage(m) if dump => out.push(m),
                    _ => {}
                }
            }
        }
    }
}
