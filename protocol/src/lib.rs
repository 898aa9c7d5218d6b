//! The host<->agent protocol, shared by the runtime and the guest agent.
//!
//! Everything on the channel is a frame: a fixed 12-byte header followed by a
//! payload of at most [`MAX_PAYLOAD`] bytes. The header carries a magic, the
//! protocol version and the frame kind, so either side can reject a peer that
//! speaks something else before it reads a single payload byte.

pub mod client;
mod frame;
mod message;
pub mod mux;

pub use frame::{decode_header, encode_frame, read_frame, FrameError, FrameHeader, FrameKind};
pub use message::{
    encode_json, is_container_path, sysctl_file, Capabilities, CgroupStats, ConsoleSize,
    ContainerSetup, CpuMax, DnsConfig, Event, GuestDevice, GuestMount, GuestProcess, GuestSetup,
    GuestStats, InterfaceConfig, MessageError, Namespace, NetworkConfig, Op, Outcome, ProcessSpec,
    Request, Resources, Response, Rlimit, RouteConfig, Seccomp, SeccompArg, SeccompRule,
    StreamChunk, StreamId, COPIED_FILES_DIR, MOUNTS_FILE, SEED_FILE,
};

/// The vsock port the agent listens on inside the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The read-ahead window, in KiB, the agent gives each virtio-fs mount: the
/// largest request the host's shares take (they negotiate 1 MiB), so a
/// sequential read reaches the host in whole requests.
pub const VIRTIOFS_READ_AHEAD_KIB: u32 = 1024;

/// Version of the wire format; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 2;

/// Largest payload either side accepts; a larger length is a protocol error,
/// never an allocation.
pub const MAX_PAYLOAD: u32 = 1 << 20;

/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 12;

/// First four bytes of every frame: `RVM1` in ASCII.
pub const MAGIC: [u8; 4] = *b"RVM1";
