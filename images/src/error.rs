use std::io;

use thiserror::Error;

use crate::digest::{Digest, DigestError};

/// What went wrong in the image store.
#[derive(Debug, Error)]
pub enum ImageError {
    /// A file operation failed; `context` says on what.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The system's error.
        source: io::Error,
    },
    /// Content did not hash to the digest it was named by.
    #[error("content of {expected} hashes to {actual}: refused")]
    DigestMismatch {
        /// The digest the content was named by.
        expected: Digest,
        /// What it hashes to.
        actual: Digest,
    },
    /// Content was longer or shorter than its descriptor said.
    #[error("{digest} has {actual} bytes where its descriptor says {expected}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// The descriptor's size.
        expected: u64,
        /// What arrived.
        actual: u64,
    },
    /// A malformed digest.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// A layer entry that would write outside the rootfs or is otherwise
    /// not acceptable; the layer is refused as a whole.
    #[error("layer entry {path:?}: {why}")]
    UnsafeEntry {
        /// The entry's path as the tarball names it.
        path: String,
        /// Why it is refused.
        why: String,
    },
    /// An archive, layout, manifest or config that is not what it should be.
    #[error("{0}")]
    Format(String),
    /// A JSON document that does not parse.
    #[error("{context}: {source}")]
    Json {
        /// Which document.
        context: String,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// The registry refused, failed or went away.
    #[error("registry: {0}")]
    Registry(String),
    /// No such image (or blob).
    #[error("no image {0:?} in the store")]
    NotFound(String),
    /// A name that matches more than one image.
    #[error("{0:?} matches more than one image: give more of its ID")]
    Ambiguous(String),
    /// An image that containers still use.
    #[error("image {image} is used by container(s) {containers}: remove them first, or force")]
    InUse {
        /// The image.
        image: String,
        /// Who uses it, comma separated.
        containers: String,
    },
    /// An image reference that does not parse.
    #[error("invalid image reference {reference:?}: {why}")]
    Reference {
        /// As given.
        reference: String,
        /// Why not.
        why: String,
    },
}

/// Wraps an `io::Error` with what was being done.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Io { context, source }
}

/// Wraps a JSON error with the document's name.
pub(crate) fn json_err(context: impl Into<String>) -> impl FnOnce(serde_json::Error) -> ImageError {
    let context = context.into();
    move |source| ImageError::Json { context, source }
}
