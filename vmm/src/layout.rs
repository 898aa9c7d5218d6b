//! Guest physical address map (x86_64) and the e820 table derived from it.

/// GDT used for the boot CPU's initial segments.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT; the kernel installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Linux boot protocol zero page (bzImage boot).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Identity-mapping page tables for 64-bit bzImage entry.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_ADDR: u64 = 0xa000;
/// Page directory (2 MiB pages, first GiB).
pub const PDE_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// MP table, in the last KiB of base memory where Linux scans for it.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// Start of "high" memory where kernels load.
pub const HIMEM_START: u64 = 0x10_0000;
/// Below 4 GiB, the last GiB is left for MMIO devices and the APICs.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First virtio-mmio window; devices follow at 4 KiB steps.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
/// First interrupt line for virtio-mmio devices (4 is COM1).
pub const MMIO_IRQ_START: u32 = 5;
/// Last usable IOAPIC line.
pub const MMIO_IRQ_END: u32 = 23;
/// IOAPIC base address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC base address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// Kind of an e820 range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram = 1,
    /// Reserved (BIOS area, MP table).
    Reserved = 2,
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Its kind.
    pub kind: E820Kind,
}

/// Guest RAM as (guest address, length) ranges: below the MMIO gap, and the
/// rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![(0, low)];
    if mem_bytes > low {
        ranges.push((MMIO_GAP_END, mem_bytes - low));
    }
    ranges
}

/// End of RAM below the MMIO gap, where the initramfs is placed.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// The memory map the guest sees. Base memory stops below the MP table; the
/// legacy BIOS/VGA hole up to 1 MiB is reserved.
pub fn e820(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: MPTABLE_ADDR,
            kind: E820Kind::Ram,
        },
        E820Entry {
            addr: MPTABLE_ADDR,
            size: HIMEM_START - MPTABLE_ADDR,
            kind: E820Kind::Reserved,
        },
    ];
    let low_end = low_ram_end(mem_bytes);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820Kind::Ram,
        });
    }
    if mem_bytes > low_end {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_bytes - low_end,
            kind: E820Kind::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_guest_has_base_and_high_ram_only() {
        let map = e820(128 * MIB);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820Kind::Ram
            }
        );
        assert_eq!(map[1].kind, E820Kind::Reserved);
        assert_eq!(map[1].addr + map[1].size, HIMEM_START);
        assert_eq!(map[2].addr + map[2].size, 128 * MIB);
        assert_eq!(ram_ranges(128 * MIB), vec![(0, 128 * MIB)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let mem = 4096 * MIB;
        let map = e820(mem);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, mem - (HIMEM_START - MPTABLE_ADDR));
        let top = map.last().unwrap();
        assert_eq!(top.addr, MMIO_GAP_END);
        assert_eq!(top.size, mem - MMIO_GAP_START);
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
        assert_eq!(
            ram_ranges(mem),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem - MMIO_GAP_START)]
        );
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        for mem in [32 * MIB, 1024 * MIB, 3072 * MIB, 8192 * MIB] {
            let map = e820(mem);
            for w in map.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{mem}: {w:?}");
            }
        }
    }
}
