//! Guest RAM: one memfd mapped at the guest's RAM ranges, so the same memory
//! can later be shared with other processes (vhost-user) or snapshotted.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout;

/// Why guest memory could not be set up.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// memfd_create or sizing it failed.
    #[error("creating the guest memory file")]
    Memfd(#[source] io::Error),
    /// Mapping the memory failed.
    #[error("mapping guest memory")]
    Mmap(#[source] vm_memory::mmap::FromRangesError),
    /// KVM refused a memory slot.
    #[error("registering guest memory with KVM")]
    Register(#[source] kvm_ioctls::Error),
}

/// Creates guest RAM of `mem_bytes`. Pages are only allocated when touched.
pub fn create(mem_bytes: u64) -> Result<GuestMemoryMmap, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"runvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_bytes).map_err(MemoryError::Memfd)?;
    let mut offset = 0;
    let mut ranges = Vec::new();
    for (start, len) in layout::ram_ranges(mem_bytes) {
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
        ranges.push((GuestAddress(start), len as usize, Some(fo)));
        offset += len;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(MemoryError::Mmap)?;
    for region in mem.iter() {
        // Every 4 KiB page the guest touches first costs a nested page fault;
        // huge pages cut that by 512x. Where the host's shmem THP setting
        // forbids it (`shmem_enabled` of never/deny) this is a no-op.
        // SAFETY: the range is exactly this region's live mapping, and
        // MADV_HUGEPAGE only changes how the kernel backs it.
        unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
    }
    Ok(mem)
}

/// Hands every region of `mem` to KVM, one slot each.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the mapping stays alive as long as `mem`, which the VM owns
        // for its whole life, and the slots do not overlap.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(MemoryError::Register)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_spans_the_layout_and_is_writable_on_both_sides_of_the_gap() {
        let mem = create(3584 << 20).unwrap();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        let high = GuestAddress(layout::MMIO_GAP_END + 0x1000);
        mem.write_obj(7u64, high).unwrap();
        assert_eq!(mem.read_obj::<u64>(high).unwrap(), 7);
        assert!(mem
            .write_obj(1u8, GuestAddress(layout::MMIO_GAP_START))
            .is_err());
    }
}
