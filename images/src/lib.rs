//! runvm's image store. Blobs are content addressed; this module starts with
//! the digest type every part of the store keys on.

mod digest;

pub use digest::{Digest, DigestError};
