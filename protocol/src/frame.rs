use std::io::{self, Read};

use thiserror::Error;

use crate::{HEADER_LEN, MAGIC, MAX_PAYLOAD, PROTOCOL_VERSION};

/// What a frame carries. Unknown kinds decode fine (as [`FrameKind::Unknown`])
/// so a newer peer's frame gets an error reply instead of a dropped channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A request from the host, JSON payload.
    Request,
    /// The agent's reply to a request, JSON payload.
    Response,
    /// Something the agent reports unasked (a process exited), JSON payload.
    Event,
    /// Raw bytes of a process stream (stdin, stdout or stderr).
    Stream,
    /// A kind this version does not know.
    Unknown(u16),
}

impl FrameKind {
    fn to_wire(self) -> u16 {
        match self {
            FrameKind::Request => 1,
            FrameKind::Response => 2,
            FrameKind::Event => 3,
            FrameKind::Stream => 4,
            FrameKind::Unknown(v) => v,
        }
    }

    fn from_wire(v: u16) -> Self {
        match v {
            1 => FrameKind::Request,
            2 => FrameKind::Response,
            3 => FrameKind::Event,
            4 => FrameKind::Stream,
            other => FrameKind::Unknown(other),
        }
    }
}

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the payload holds.
    pub kind: FrameKind,
    /// Payload length in bytes, at most [`MAX_PAYLOAD`].
    pub len: u32,
}

/// Why bytes on the channel are not a valid frame.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The first four bytes are not [`MAGIC`].
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The peer speaks another version of the protocol.
    #[error("unsupported protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    /// The announced payload is larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {0} bytes exceeds the limit of {MAX_PAYLOAD}")]
    TooLarge(u64),
    /// The channel ended inside a frame.
    #[error("channel closed in the middle of a frame")]
    Truncated,
    /// Reading the channel failed.
    #[error("reading a frame")]
    Io(#[source] io::Error),
}

/// Layout: magic (4) | version u16 LE | kind u16 LE | payload length u32 LE.
pub fn encode_frame(kind: FrameKind, payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or(FrameError::TooLarge(payload.len() as u64))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_wire().to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// Validates a header without trusting any of its fields.
pub fn decode_header(bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, FrameError> {
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    let kind = FrameKind::from_wire(u16::from_le_bytes([bytes[6], bytes[7]]));
    let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(u64::from(len)));
    }
    Ok(FrameHeader { kind, len })
}

/// Reads one frame. `Ok(None)` means the channel closed cleanly between frames.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<(FrameHeader, Vec<u8>)>, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let header = decode_header(&header)?;
    let mut payload = vec![0u8; header.len as usize];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(Some((header, payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_bytes_pin_the_wire_format() {
        let frame = encode_frame(FrameKind::Request, b"{}").unwrap();
        assert_eq!(
            frame,
            [b'R', b'V', b'M', b'1', 2, 0, 1, 0, 2, 0, 0, 0, b'{', b'}']
        );
    }

    #[test]
    fn frames_round_trip_back_to_back() {
        let mut wire = encode_frame(FrameKind::Stream, b"hello").unwrap();
        wire.extend(encode_frame(FrameKind::Unknown(77), b"").unwrap());
        let mut r = &wire[..];
        let (h, p) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!((h.kind, p.as_slice()), (FrameKind::Stream, &b"hello"[..]));
        let (h, p) = read_frame(&mut r).unwrap().unwrap();
        assert_eq!((h.kind, p.len()), (FrameKind::Unknown(77), 0));
        assert!(read_frame(&mut r).unwrap().is_none());
    }

    #[test]
    fn oversized_length_is_rejected_before_allocating() {
        let mut wire = encode_frame(FrameKind::Event, b"").unwrap();
        wire[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = read_frame(&mut &wire[..]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(n) if n == u64::from(u32::MAX)));
    }

    #[test]
    fn encoding_refuses_payloads_over_the_limit() {
        let big = vec![0u8; MAX_PAYLOAD as usize + 1];
        assert!(matches!(
            encode_frame(FrameKind::Stream, &big),
            Err(FrameError::TooLarge(_))
        ));
        assert!(encode_frame(FrameKind::Stream, &big[1..]).is_ok());
    }

    #[test]
    fn foreign_magic_and_versions_are_rejected() {
        let mut wire = encode_frame(FrameKind::Request, b"x").unwrap();
        wire[4] = 9;
        assert!(matches!(
            read_frame(&mut &wire[..]),
            Err(FrameError::UnsupportedVersion(9))
        ));
        wire[0] = b'X';
        assert!(matches!(
            read_frame(&mut &wire[..]),
            Err(FrameError::BadMagic(_))
        ));
    }

    #[test]
    fn truncation_anywhere_is_an_error_not_a_clean_close() {
        let wire = encode_frame(FrameKind::Response, b"payload").unwrap();
        for cut in 1..wire.len() {
            assert!(
                matches!(read_frame(&mut &wire[..cut]), Err(FrameError::Truncated)),
                "cut at {cut}"
            );
        }
    }
}
