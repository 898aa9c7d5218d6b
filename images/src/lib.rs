//! runvm's OCI image store: a content-addressed blob store, layer
//! application with the OCI whiteout rules and hostile-input checks,
//! import of OCI image layouts and `docker save` archives, and the image
//! index behind `runvm image ls|inspect|rm|prune`.

mod blobs;
mod create;
mod digest;
mod error;
mod import;
pub mod layer;
mod pull;
pub mod reference;
pub mod scoped;
mod store;

pub use blobs::Blobs;
pub use digest::{Digest, DigestError, Hasher, HashingReader, HashingWriter};
pub use error::ImageError;

#[cfg(test)]
mod layer_tests;
pub use create::RunSettings;
pub use pull::{is_loopback, PullEvent, PullOptions};
pub use reference::Reference;
pub use store::{GcStats, ImageRecord, Lock, Store, UnpackEvent};
#[cfg(test)]
mod store_tests;
