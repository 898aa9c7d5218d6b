//! Guest RAM: one memfd mapped at the guest's RAM ranges, so the same memory
//! can later be shared with other processes (vhost-user) or snapshotted.
//!
//! Each range is mapped at a 2 MiB-aligned host address and, once the VMM has
//! loaded the guest, advised for transparent huge pages (MADV_HUGEPAGE, as
//! QEMU and Cloud Hypervisor advise guest RAM; the initramfs's blocks are
//! advised before it is copied in, see [`advise_huge_pages_at`]): KVM
//! maps guest memory with 2 MiB pages only where host and guest addresses
//! agree modulo 2 MiB and the host backs the page with a huge page, and every
//! 4 KiB page is otherwise a separate first-touch fault (a nested page fault in
//! the test host: 8192 of them for the 32 MiB struct-page array of a 2 GiB
//! guest). The host decides: shmem THP follows
//! `/sys/kernel/mm/transparent_hugepage/shmem_enabled`, where `advise` honours
//! this advice and Debian's default `never` ignores it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::null_mut;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use crate::layout;

const HUGE_PAGE: usize = 2 << 20;

/// Why guest memory could not be set up.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// memfd_create or sizing it failed.
    #[error("creating the guest memory file")]
    Memfd(#[source] io::Error),
    /// Mapping the memory failed.
    #[error("mapping guest memory")]
    Mmap(#[source] io::Error),
    /// vm-memory rejected a region.
    #[error("describing guest memory")]
    Region(#[source] vm_memory::mmap::MmapRegionError),
    /// vm-memory rejected the region set.
    #[error("describing guest memory")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// KVM refused a memory slot.
    #[error("registering guest memory with KVM")]
    Register(#[source] kvm_ioctls::Error),
}

/// One host mapping of guest RAM, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; the pointer is only used to
// unmap it, once, on drop.
unsafe impl Send for Mapping {}
// SAFETY: as above; nothing dereferences the pointer through `&Mapping`.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: addr/len are exactly one mapping this struct created.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Guest RAM and the host mappings behind it. The mappings are unmapped when
/// this is dropped, so it must outlive every clone of `mem` and the VM that
/// uses it; [`crate::vm::run`] drops it last.
#[derive(Debug)]
pub struct GuestRam {
    /// The guest's view of its memory.
    pub mem: GuestMemoryMmap,
    /// Unmapped by their Drop.
    maps: Vec<Mapping>,
}

impl GuestRam {
    /// Advises every RAM mapping for transparent huge pages. Called once the
    /// VMM has written what it loads (kernel pieces, boot parameters, tables):
    /// advised earlier, each of those small writes faulted in, and zeroed, a
    /// whole 2 MiB page (about 10 ms apiece under nested TCG, the load phase
    /// up to 0.35 s); advised now, the few 2 MiB blocks the VMM wrote stay on
    /// small pages and the guest's own first touches get huge ones.
    pub fn advise_huge_pages(&self) {
        for map in &self.maps {
            // SAFETY: MADV_HUGEPAGE only changes how the kernel backs this
            // live mapping (boot files mapped over parts of it included).
            // Its failure (a kernel without THP) leaves small pages, which
            // work the same, so the result is not checked.
            unsafe { libc::madvise(map.addr, map.len, libc::MADV_HUGEPAGE) };
        }
    }
}

/// Advises the host pages behind guest memory `[start, start + len)`,
/// widened to whole 2 MiB blocks within the region that holds `start`, for
/// transparent huge pages: for what the VMM is about to write in bulk (the
/// initramfs), where whole huge pages cost no more than the small pages the
/// write would fault in anyway. Nothing happens outside guest memory.
pub fn advise_huge_pages_at(mem: &GuestMemoryMmap, start: GuestAddress, len: u64) {
    let Some(region) = mem.find_region(start) else {
        return;
    };
    let base = region.start_addr().raw_value();
    let region_end = base + region.len();
    let huge = HUGE_PAGE as u64;
    let lo = (start.raw_value() & !(huge - 1)).max(base);
    let hi = start
        .raw_value()
        .saturating_add(len)
        .checked_next_multiple_of(huge)
        .unwrap_or(u64::MAX)
        .min(region_end);
    if hi <= lo {
        return;
    }
    let Ok(host) = region.get_host_address(MemoryRegionAddress(lo - base)) else {
        return;
    };
    // SAFETY: [host, host + hi - lo) lies inside this region's live mapping
    // (clamped to the region above) and starts page aligned (a 2 MiB
    // boundary or the region's own start); MADV_HUGEPAGE only changes how
    // the kernel backs it. Failure leaves small pages, which work the same.
    unsafe { libc::madvise(host.cast(), (hi - lo) as usize, libc::MADV_HUGEPAGE) };
}

/// Maps `len` bytes of `file` at `offset`, at a 2 MiB-aligned address,
/// shared or private (`share`: MAP_SHARED or MAP_PRIVATE).
fn map_aligned(file: &File, offset: u64, len: usize, share: i32) -> Result<Mapping, MemoryError> {
    let reserve_len = len + HUGE_PAGE;
    // SAFETY: a fresh PROT_NONE reservation at an address of the kernel's choosing.
    let reserve = unsafe {
        libc::mmap(
            null_mut(),
            reserve_len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if reserve == libc::MAP_FAILED {
        return Err(MemoryError::Mmap(io::Error::last_os_error()));
    }
    let start = reserve as usize;
    let aligned = (start + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    // SAFETY: [aligned, aligned + len) lies inside the reservation made above,
    // so MAP_FIXED replaces only memory this function owns.
    let addr = unsafe {
        libc::mmap(
            aligned as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            share | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    let err = (addr == libc::MAP_FAILED).then(io::Error::last_os_error);
    if aligned > start {
        // SAFETY: the slack before the fixed mapping is still part of the
        // reservation; unmapping it releases only address space.
        unsafe { libc::munmap(reserve, aligned - start) };
    }
    let end = aligned + len;
    if start + reserve_len > end {
        // SAFETY: likewise for the slack after it.
        unsafe { libc::munmap(end as *mut libc::c_void, start + reserve_len - end) };
    }
    if let Some(e) = err {
        // SAFETY: the middle of the reservation is still mapped PROT_NONE.
        unsafe { libc::munmap(aligned as *mut libc::c_void, len) };
        return Err(MemoryError::Mmap(e));
    }
    Ok(Mapping { addr, len })
}

/// Creates guest RAM of `mem_bytes`. Pages are only allocated when touched.
pub fn create(mem_bytes: u64) -> Result<GuestRam, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"runvm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_bytes).map_err(MemoryError::Memfd)?;
    map_ranges(&file, mem_bytes, libc::MAP_SHARED)
}

/// Guest RAM of `mem_bytes` from a snapshot's memory file, mapped private
/// (one mapping per range, as Firecracker maps a snapshot's memory): the
/// guest's writes stay in this process, and VMs restored from the same
/// file share the pages neither changed through the page cache.
///
/// The file's holes are mapped with it. Mapping them as anonymous memory
/// instead, with only the file's pieces of data over them (about 230
/// mappings for a template), was tried and dropped: all five runtime
/// bench attempts with it locked the nested test host up (a thread stuck
/// in KVM), against one of three with the single mapping. The price of
/// the single mapping: on tmpfs, a guest's first touch of a hole allocates
/// that page of the file (shared by every copy, and at most the VM's
/// memory).
pub fn from_snapshot(mem_bytes: u64, file: &File) -> Result<GuestRam, MemoryError> {
    let len = file.metadata().map_err(MemoryError::Memfd)?.len();
    if len < mem_bytes {
        return Err(MemoryError::Mmap(io::Error::other(format!(
            "the memory file holds {len} bytes, the VM has {mem_bytes}"
        ))));
    }
    map_ranges(file, mem_bytes, libc::MAP_PRIVATE)
}

/// Maps guest RAM's ranges from `file`, back to back from offset 0,
/// shared or private (`share`: MAP_SHARED or MAP_PRIVATE).
fn map_ranges(file: &File, mem_bytes: u64, share: i32) -> Result<GuestRam, MemoryError> {
    let mut offset = 0;
    let mut regions = Vec::new();
    let mut maps = Vec::new();
    for (start, len) in layout::ram_ranges(mem_bytes) {
        let map = map_aligned(file, offset, len as usize, share)?;
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Memfd)?, offset);
        // SAFETY: `map` is a live mapping of exactly `len` bytes that stays
        // mapped for as long as the returned GuestRam (and so `mem`) exists.
        let region = unsafe {
            MmapRegionBuilder::new(len as usize)
                .with_file_offset(fo)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(share | libc::MAP_NORESERVE)
                .with_raw_mmap_pointer(map.addr.cast())
        }
        .build()
        .map_err(MemoryError::Region)?;
        maps.push(map);
        let region = GuestRegionMmap::new(region, GuestAddress(start)).ok_or_else(|| {
            MemoryError::Mmap(io::Error::other("guest region wraps the address space"))
        })?;
        regions.push(region);
        offset += len;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)?;
    Ok(GuestRam { mem, maps })
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
        // SAFETY: the mapping stays alive as long as the GuestRam, which
        // vm::run drops only after the VM, and the slots do not overlap.
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
        let ram = create(3584 << 20).unwrap();
        let mem = &ram.mem;
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        let high = GuestAddress(layout::MMIO_GAP_END + 0x1000);
        mem.write_obj(7u64, high).unwrap();
        assert_eq!(mem.read_obj::<u64>(high).unwrap(), 7);
        assert!(mem
            .write_obj(1u8, GuestAddress(layout::MMIO_GAP_START))
            .is_err());
    }

    #[test]
    fn a_snapshot_is_mapped_private_with_its_holes_reading_as_zeros() {
        use std::os::unix::fs::FileExt;
        let mib = 1u64 << 20;
        let dir = tempfile::tempdir().unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("memory"))
            .unwrap();
        file.set_len(8 * mib).unwrap();
        file.write_all_at(&[1; 4096], 0x1000).unwrap();
        file.write_all_at(&[3; 10], 5 * mib + 5).unwrap();
        let ram = from_snapshot(8 * mib, &file).unwrap();
        let mem = &ram.mem;
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(5 * mib + 5)).unwrap(), 3);
        for gpa in [0u64, 0x2000, 3 * mib, 7 * mib] {
            assert_eq!(mem.read_obj::<u64>(GuestAddress(gpa)).unwrap(), 0);
            mem.write_obj(9u64, GuestAddress(gpa)).unwrap();
        }
        mem.write_obj(9u8, GuestAddress(0x1000)).unwrap();
        let mut page = [0u8; 8];
        file.read_exact_at(&mut page[..1], 0x1000).unwrap();
        assert_eq!(page[0], 1, "the guest's write stays in its process");
        file.read_exact_at(&mut page, 3 * mib).unwrap();
        assert_eq!(page, [0; 8]);
        assert!(
            from_snapshot(16 * mib, &file).is_err(),
            "shorter than the VM"
        );
    }

    #[test]
    fn host_mappings_are_huge_page_aligned() {
        let ram = create(256 << 20).unwrap();
        for region in ram.mem.iter() {
            assert_eq!(region.as_ptr() as usize % HUGE_PAGE, 0);
        }
        assert_eq!(ram.maps.len(), 1);
    }

    /// The VmFlags line of the smaps entry that starts at `addr`.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        assert!(lines.next().is_some(), "no mapping at {start}");
        lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .expect("a VmFlags line")
            .to_owned()
    }

    #[test]
    fn huge_pages_are_advised_only_when_asked_and_then_on_every_range() {
        let ram = create(3584 << 20).unwrap();
        let starts: Vec<usize> = ram.maps.iter().map(|m| m.addr as usize).collect();
        assert_eq!(starts.len(), 2);
        for &a in &starts {
            assert!(!vm_flags(a).split_whitespace().any(|f| f == "hg"));
        }
        ram.advise_huge_pages();
        for &a in &starts {
            let flags = vm_flags(a);
            assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
        }
    }

    #[test]
    fn a_range_is_advised_in_whole_huge_pages_and_nothing_beyond_guest_memory() {
        let mib = 1u64 << 20;
        let ram = create(16 * mib).unwrap();
        let host = |gpa: u64| ram.mem.get_host_address(GuestAddress(gpa)).unwrap() as usize;
        // 5 MiB + 100 for 3000 bytes: the block [4 MiB, 6 MiB), on its own.
        advise_huge_pages_at(&ram.mem, GuestAddress(5 * mib + 100), 3000);
        let flags = vm_flags(host(4 * mib));
        assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let vma = format!("{:x}-{:x} ", host(4 * mib), host(6 * mib));
        assert!(smaps.contains(&vma), "no VMA {vma}");
        assert!(!vm_flags(ram.maps[0].addr as usize)
            .split_whitespace()
            .any(|f| f == "hg"));
        // A range running past the end stops at it; one outside is ignored.
        advise_huge_pages_at(&ram.mem, GuestAddress(15 * mib), 8 * mib);
        let flags = vm_flags(host(14 * mib));
        assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
        advise_huge_pages_at(&ram.mem, GuestAddress(64 * mib), mib);
        advise_huge_pages_at(&ram.mem, GuestAddress(u64::MAX - 10), 100);
    }
}
