//! How many requests of each kind a share answered: the figure that
//! explains a virtio-fs workload's cost, since every request is a guest
//! exit and a host wake-up.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::server::MetricsHook;

/// Opcodes past the table count under one "other" slot.
const SLOTS: usize = 64;
const OTHER: usize = SLOTS - 1;

/// FUSE opcode names by number (`include/uapi/linux/fuse.h`); gaps are
/// numbers the protocol never used.
const NAMES: [&str; 53] = [
    "",
    "LOOKUP",
    "FORGET",
    "GETATTR",
    "SETATTR",
    "READLINK",
    "SYMLINK",
    "",
    "MKNOD",
    "MKDIR",
    "UNLINK",
    "RMDIR",
    "RENAME",
    "LINK",
    "OPEN",
    "READ",
    "WRITE",
    "STATFS",
    "RELEASE",
    "",
    "FSYNC",
    "SETXATTR",
    "GETXATTR",
    "LISTXATTR",
    "REMOVEXATTR",
    "FLUSH",
    "INIT",
    "OPENDIR",
    "READDIR",
    "RELEASEDIR",
    "FSYNCDIR",
    "GETLK",
    "SETLK",
    "SETLKW",
    "ACCESS",
    "CREATE",
    "INTERRUPT",
    "BMAP",
    "DESTROY",
    "IOCTL",
    "POLL",
    "NOTIFY_REPLY",
    "BATCH_FORGET",
    "FALLOCATE",
    "READDIRPLUS",
    "RENAME2",
    "LSEEK",
    "COPY_FILE_RANGE",
    "SETUPMAPPING",
    "REMOVEMAPPING",
    "SYNCFS",
    "TMPFILE",
    "STATX",
];

/// Requests counted by opcode, as the server sees them (a hostile
/// guest's unknown opcodes included, under "other").
#[derive(Debug)]
pub struct RequestCounts([AtomicU64; SLOTS]);

impl Default for RequestCounts {
    fn default() -> Self {
        RequestCounts(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl RequestCounts {
    fn slot(opcode: u32) -> usize {
        match NAMES.get(opcode as usize) {
            Some(name) if !name.is_empty() => opcode as usize,
            _ => OTHER,
        }
    }

    /// How many requests had `opcode`.
    pub fn get(&self, opcode: u32) -> u64 {
        self.0[Self::slot(opcode)].load(Ordering::Relaxed)
    }

    /// `N requests: NAME n, ...`, the most frequent first.
    pub fn summary(&self) -> String {
        let mut counts: Vec<(u64, &str)> = self
            .0
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    c.load(Ordering::Relaxed),
                    NAMES.get(i).copied().unwrap_or("other"),
                )
            })
            .filter(|(n, _)| *n > 0)
            .collect();
        counts.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        let total: u64 = counts.iter().map(|(n, _)| n).sum();
        let mut out = format!("{total} requests");
        for (i, (n, name)) in counts.iter().enumerate() {
            let _ = write!(out, "{} {name} {n}", if i == 0 { ":" } else { "," });
        }
        out
    }
}

impl MetricsHook for RequestCounts {
    fn collect(&self, ih: &InHeader) {
        self.0[Self::slot(ih.opcode)].fetch_add(1, Ordering::Relaxed);
    }

    fn release(&self, _oh: Option<&OutHeader>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(opcode: u32) -> InHeader {
        InHeader {
            opcode,
            ..Default::default()
        }
    }

    #[test]
    fn requests_are_counted_by_name_and_unknown_opcodes_as_other() {
        let counts = RequestCounts::default();
        for op in [1, 1, 3, 1, 35, 7, 19, 9999, u32::MAX] {
            counts.collect(&header(op));
        }
        assert_eq!(counts.get(1), 3);
        assert_eq!(counts.get(3), 1);
        assert_eq!(counts.get(7), 4, "gaps and unknown opcodes share a slot");
        assert_eq!(
            counts.summary(),
            "9 requests: other 4, LOOKUP 3, CREATE 1, GETATTR 1"
        );
    }

    #[test]
    fn an_idle_share_says_so() {
        assert_eq!(RequestCounts::default().summary(), "0 requests");
    }
}
