//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and its constants.
//! Kept as raw little-endian bytes so a header read from guest memory is
//! never interpreted before it has been checked.

/// Size of the header on the wire.
pub const HDR_LEN: usize = 44;
/// The host's context ID.
pub const HOST_CID: u64 = 2;
/// The only socket type virtio-vsock streams use.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload accepted from or sent to the guest in one packet
/// (the Linux driver's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// Packet operations.
pub mod op {
    /// Open a connection.
    pub const REQUEST: u16 = 1;
    /// Accept a connection.
    pub const RESPONSE: u16 = 2;
    /// Abort a connection (or refuse one).
    pub const RST: u16 = 3;
    /// The sender stops receiving and/or sending.
    pub const SHUTDOWN: u16 = 4;
    /// Stream data.
    pub const RW: u16 = 5;
    /// The sender's receive buffer state, unsolicited.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Asks the peer for a CREDIT_UPDATE.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// One packet header.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Header([u8; HDR_LEN]);

macro_rules! field {
    ($get:ident, $set:ident, $ty:ty, $off:expr) => {
        #[doc = concat!("The `", stringify!($get), "` field.")]
        pub fn $get(&self) -> $ty {
            const N: usize = std::mem::size_of::<$ty>();
            let mut b = [0u8; N];
            b.copy_from_slice(&self.0[$off..$off + N]);
            <$ty>::from_le_bytes(b)
        }

        #[doc = concat!("Sets the `", stringify!($get), "` field.")]
        pub fn $set(&mut self, v: $ty) -> &mut Self {
            const N: usize = std::mem::size_of::<$ty>();
            self.0[$off..$off + N].copy_from_slice(&v.to_le_bytes());
            self
        }
    };
}

#[allow(clippy::len_without_is_empty)] // `len` is the wire field, not a size
impl Header {
    /// A header from its wire bytes.
    pub fn from_bytes(bytes: [u8; HDR_LEN]) -> Self {
        Header(bytes)
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8; HDR_LEN] {
        &self.0
    }

    /// A stream header with every other field zero.
    pub fn stream(op: u16) -> Self {
        let mut h = Header([0; HDR_LEN]);
        h.set_kind(TYPE_STREAM).set_op(op);
        h
    }

    field!(src_cid, set_src_cid, u64, 0);
    field!(dst_cid, set_dst_cid, u64, 8);
    field!(src_port, set_src_port, u32, 16);
    field!(dst_port, set_dst_port, u32, 20);
    field!(len, set_len, u32, 24);
    field!(kind, set_kind, u16, 28);
    field!(op, set_op, u16, 30);
    field!(flags, set_flags, u32, 32);
    field!(buf_alloc, set_buf_alloc, u32, 36);
    field!(fwd_cnt, set_fwd_cnt, u32, 40);
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Header")
            .field("src", &(self.src_cid(), self.src_port()))
            .field("dst", &(self.dst_cid(), self.dst_port()))
            .field("len", &self.len())
            .field("type", &self.kind())
            .field("op", &self.op())
            .field("flags", &self.flags())
            .field("buf_alloc", &self.buf_alloc())
            .field("fwd_cnt", &self.fwd_cnt())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_sit_at_the_offsets_of_the_spec() {
        let mut h = Header::stream(op::RW);
        h.set_src_cid(3)
            .set_dst_cid(HOST_CID)
            .set_src_port(0x1122_3344)
            .set_dst_port(80)
            .set_len(5)
            .set_flags(SHUTDOWN_SEND)
            .set_buf_alloc(0x40000)
            .set_fwd_cnt(7);
        let b = h.as_bytes();
        assert_eq!(b[0..8], 3u64.to_le_bytes());
        assert_eq!(b[8..16], 2u64.to_le_bytes());
        assert_eq!(b[16..20], [0x44, 0x33, 0x22, 0x11]);
        assert_eq!(b[20..24], 80u32.to_le_bytes());
        assert_eq!(b[24..28], 5u32.to_le_bytes());
        assert_eq!(b[28..30], 1u16.to_le_bytes());
        assert_eq!(b[30..32], 5u16.to_le_bytes());
        assert_eq!(b[32..36], 2u32.to_le_bytes());
        assert_eq!(b[36..40], 0x40000u32.to_le_bytes());
        assert_eq!(b[40..44], 7u32.to_le_bytes());
        assert_eq!(Header::from_bytes(*b), h);
    }
}
