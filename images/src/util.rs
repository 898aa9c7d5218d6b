//! Small helpers shared by the store's modules.

/// Nanoseconds since the epoch, for unique temporary names.
pub fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
