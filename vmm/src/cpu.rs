//! vCPU state at boot: CPUID, MSRs, FPU, registers, segments and the LAPIC's
//! LINT pins. CPUID shaping is a pure function so it is tested without KVM.

use kvm_bindings::{kvm_cpuid_entry2, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::EntryPoint;
use crate::layout;

/// Why a vCPU could not be configured.
#[derive(Debug, Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM took fewer MSRs than were given.
    #[error("KVM accepted {set} of {wanted} boot MSRs")]
    Msrs {
        /// How many KVM set.
        set: usize,
        /// How many were given.
        wanted: usize,
    },
    /// Building an MSR list failed.
    #[error("building the MSR list")]
    MsrList,
    /// Writing the GDT or page tables failed.
    #[error("writing boot tables to guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

const CPUID_HYPERVISOR: u32 = 1 << 31;
const CPUID_TSC_DEADLINE: u32 = 1 << 24;
const CPUID_HTT: u32 = 1 << 28;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Makes `entries` (KVM's supported CPUID) describe vCPU `index` of
/// `count` single-threaded cores in one socket, with APIC ID == index.
/// `tsc_deadline` is KVM_CAP_TSC_DEADLINE_TIMER: KVM emulates that LAPIC
/// timer mode but leaves its bit out of the supported CPUID, so a VMM must
/// set it. Without it the guest programs its timer through the APIC's
/// count registers, the mode that needs calibrating against another clock.
pub fn shape_cpuid(entries: &mut [kvm_cpuid_entry2], index: u32, count: u32, tsc_deadline: bool) {
    // Bits needed to number `count` cores, for the x2APIC topology leaf.
    let core_bits = u32::BITS - (count.max(1) - 1).leading_zeros();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((count & 0xff) << 16);
                e.ecx |= CPUID_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= CPUID_TSC_DEADLINE;
                } else {
                    e.ecx &= !CPUID_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= CPUID_HTT;
                } else {
                    e.edx &= !CPUID_HTT;
                }
            }
            4 => {
                // Intel deterministic cache parameters: cores per package - 1.
                e.eax = (e.eax & 0x03ff_ffff) | ((count - 1).min(63) << 26);
            }
            0xb => {
                e.edx = index;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: number of cores - 1, and the APIC ID width.
                e.ecx = (e.ecx & !0xf0ff) | ((count - 1) & 0xff) | (core_bits << 12);
            }
            _ => {}
        }
    }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back: without it the guest runs uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// A GDT descriptor from flags, base and limit (the Intel SDM layout).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let bits = |shift: u32, width: u32| ((entry >> shift) & ((1 << width) - 1)) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = bits(55, 1);
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector: index * 8,
        type_: bits(40, 4),
        present: bits(47, 1),
        dpl: bits(45, 2),
        db: bits(54, 1),
        s: bits(44, 1),
        l: bits(53, 1),
        g,
        avl: bits(52, 1),
        unusable: u8::from(bits(47, 1) == 0),
        padding: 0,
    }
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Configures the boot vCPU's registers and segments for `entry`.
fn setup_boot_registers(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
) -> Result<(), CpuError> {
    let long_mode = matches!(entry, EntryPoint::Linux64(_));
    // Null, code, data, TSS: 32-bit flat for PVH, 64-bit code for bzImage.
    let code_flags = if long_mode { 0xa09b } else { 0xc09b };
    let gdt = [
        0,
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_ADDR + i as u64 * 8))
            .map_err(CpuError::Memory)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))
        .map_err(CpuError::Memory)?;

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| CpuError::Kvm("KVM_GET_SREGS", e))?;
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = 7;
    let data = segment(gdt[2], 2);
    sregs.cs = segment(gdt[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if long_mode {
        // Identity-map the first GiB with 2 MiB pages.
        mem.write_obj(layout::PDPTE_ADDR | 0x03, GuestAddress(layout::PML4_ADDR))
            .map_err(CpuError::Memory)?;
        mem.write_obj(layout::PDE_ADDR | 0x03, GuestAddress(layout::PDPTE_ADDR))
            .map_err(CpuError::Memory)?;
        for i in 0..512u64 {
            mem.write_obj((i << 21) | 0x83, GuestAddress(layout::PDE_ADDR + i * 8))
                .map_err(CpuError::Memory)?;
        }
        sregs.cr3 = layout::PML4_ADDR;
        sregs.cr4 |= CR4_PAE;
        sregs.cr0 |= CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    }
    vcpu.set_sregs(&sregs)
        .map_err(|e| CpuError::Kvm("KVM_SET_SREGS", e))?;

    let mut regs = kvm_regs {
        rflags: 0x2,
        rsp: layout::BOOT_STACK_ADDR,
        rbp: layout::BOOT_STACK_ADDR,
        ..Default::default()
    };
    match entry {
        EntryPoint::Pvh(addr) => {
            regs.rip = addr.0;
            regs.rbx = layout::PVH_INFO_ADDR;
        }
        EntryPoint::Linux64(addr) => {
            regs.rip = addr.0;
            regs.rsi = layout::ZERO_PAGE_ADDR;
        }
    }
    vcpu.set_regs(&regs)
        .map_err(|e| CpuError::Kvm("KVM_SET_REGS", e))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// LINT0 = ExtINT (the PIC's virtual wire), LINT1 = NMI, as firmware would.
fn setup_lint(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| CpuError::Kvm("KVM_GET_LAPIC", e))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| CpuError::Kvm("KVM_SET_LAPIC", e))
}

/// What the host's KVM offers beyond its supported CPUID.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostCpu {
    /// KVM_CAP_TSC_DEADLINE_TIMER.
    pub tsc_deadline: bool,
}

/// Configures vCPU `index` of `count`. Only the boot vCPU gets registers; the
/// others wait for the guest's INIT/SIPI in the in-kernel LAPIC.
pub fn configure(
    vcpu: &VcpuFd,
    (supported, host): (&CpuId, HostCpu),
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
    index: u32,
    count: u32,
) -> Result<(), CpuError> {
    let mut cpuid = supported.clone();
    shape_cpuid(cpuid.as_mut_slice(), index, count, host.tsc_deadline);
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| CpuError::Kvm("KVM_SET_CPUID2", e))?;
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::MsrList)?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| CpuError::Kvm("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        return Err(CpuError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| CpuError::Kvm("KVM_SET_FPU", e))?;
    setup_lint(vcpu)?;
    if index == 0 {
        setup_boot_registers(vcpu, mem, entry)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0000_0800,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_counts_describe_each_vcpu() {
        let mut e = vec![leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1), leaf(0x8000_0008, 0)];
        shape_cpuid(&mut e, 3, 4, true);
        assert_eq!(e[0].ebx >> 24, 3, "initial APIC ID");
        assert_eq!((e[0].ebx >> 16) & 0xff, 4, "logical processor count");
        assert_eq!(e[0].ebx & 0xffff, 0x0800, "low bits kept");
        assert_ne!(e[0].ecx & CPUID_HYPERVISOR, 0);
        assert_ne!(
            e[0].ecx & CPUID_TSC_DEADLINE,
            0,
            "KVM's TSC deadline timer offered"
        );
        assert_ne!(e[0].edx & CPUID_HTT, 0);
        assert_eq!((e[1].edx, e[1].ebx, e[1].ecx >> 8), (3, 1, LEVEL_TYPE_SMT));
        assert_eq!(
            (e[2].edx, e[2].ebx, e[2].eax),
            (3, 4, 2),
            "4 cores need 2 bits"
        );
        assert_eq!(e[3].ecx & 0xff, 3, "AMD NC = cores - 1");
    }

    #[test]
    fn single_vcpu_clears_htt() {
        let mut e = vec![leaf(1, 0)];
        e[0].edx = CPUID_HTT;
        shape_cpuid(&mut e, 0, 1, true);
        assert_eq!(e[0].edx & CPUID_HTT, 0);
        assert_eq!(e[0].ebx >> 24, 0);
    }

    #[test]
    fn tsc_deadline_follows_the_kvm_capability_not_the_host_bit() {
        let mut e = vec![leaf(1, 0)];
        e[0].ecx = CPUID_TSC_DEADLINE;
        shape_cpuid(&mut e, 0, 1, false);
        assert_eq!(e[0].ecx & CPUID_TSC_DEADLINE, 0);
        shape_cpuid(&mut e, 0, 1, true);
        assert_ne!(e[0].ecx & CPUID_TSC_DEADLINE, 0);
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code32 = segment(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.base, code32.limit), (0, 0xffff_ffff));
        assert_eq!(
            (code32.type_, code32.db, code32.l, code32.g),
            (0xb, 1, 0, 1)
        );
        assert_eq!((code32.selector, code32.present, code32.s), (8, 1, 1));
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code64.l, code64.db), (1, 0));
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.type_, data.selector), (3, 16));
    }
}
