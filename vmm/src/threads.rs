//! Threads of the VMM and of the processes that host it.
//!
//! Rust's default thread stack is a 2 MiB mapping; with transparent huge
//! pages set to `always` (Debian's default) the kernel backs such a stack
//! with one huge page as soon as it is touched, so every vCPU and device
//! thread would cost 2 MiB of resident memory while using a few KiB. A
//! stack mapping smaller than 2 MiB can never hold a huge page, so only
//! the pages a thread touches count.

use std::thread;

/// Stack size of every long-lived thread: roomy for what they run (KVM_RUN,
/// device queues, FUSE requests, socket relays), and under 2 MiB.
pub const STACK_BYTES: usize = 1024 * 1024;

/// A builder for a thread called `name` with a [`STACK_BYTES`] stack.
pub fn named(name: impl Into<String>) -> thread::Builder {
    thread::Builder::new()
        .name(name.into())
        .stack_size(STACK_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Size of the mapping in /proc/self/maps that holds `addr`.
    fn mapping_len(addr: usize) -> usize {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines()
            .filter_map(|l| {
                let (s, e) = l.split_whitespace().next()?.split_once('-')?;
                Some((
                    usize::from_str_radix(s, 16).ok()?,
                    usize::from_str_radix(e, 16).ok()?,
                ))
            })
            .find(|&(s, e)| (s..e).contains(&addr))
            .map(|(s, e)| e - s)
            .expect("the stack is mapped")
    }

    #[test]
    fn a_named_thread_has_its_name_and_a_stack_mapping_too_small_for_a_huge_page() {
        let (name, stack_len) = named("probe")
            .spawn(|| {
                let local = std::hint::black_box(0u8);
                let len = mapping_len(&local as *const u8 as usize);
                (thread::current().name().map(str::to_owned), len)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(name.as_deref(), Some("probe"));
        assert!(
            stack_len >= STACK_BYTES / 2,
            "stack mapping of {stack_len} bytes"
        );
        assert!(
            stack_len < 2 * 1024 * 1024,
            "stack mapping of {stack_len} bytes"
        );
    }
}
