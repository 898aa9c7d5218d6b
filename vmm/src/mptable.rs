//! Intel MultiProcessor table: how a guest without ACPI learns its CPUs, the
//! IOAPIC and the ISA interrupt wiring.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR};

/// IOAPIC pins described to the guest.
pub const IOAPIC_PINS: u8 = 24;
/// APIC IDs are 8 bits and the IOAPIC takes the ID after the last CPU.
pub const MAX_CPUS: u32 = 254;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

/// Why the MP table could not be written.
#[derive(Debug, Error)]
pub enum MptableError {
    /// More CPUs than 8-bit APIC IDs allow.
    #[error("{0} vCPUs do not fit an MP table (at most {MAX_CPUS})")]
    TooManyCpus(u32),
    /// Guest memory write failed.
    #[error("writing the MP table")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// The MP floating pointer followed by the configuration table, as bytes.
pub fn build(num_cpus: u32) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus as u8;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[0, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU + APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 is the legacy PIC's virtual wire, LINT1 the NMI line, on all CPUs.
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_ADDR as u32 + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"RUNVM   ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(16 + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    out.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length 16 bytes, rev 1.4
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` into guest memory.
pub fn write(mem: &GuestMemoryMmap, num_cpus: u32) -> Result<(), MptableError> {
    let bytes = build(num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_ADDR))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts_are_valid() {
        for cpus in [1, 2, 64, MAX_CPUS] {
            let t = build(cpus).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let phys = u32::from_le_bytes(t[4..8].try_into().unwrap());
            assert_eq!(phys, MPTABLE_ADDR as u32 + 16);
            let cfg = &t[16..];
            assert_eq!(&cfg[..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0, "config table checksum");
            let count = u16::from_le_bytes([cfg[34], cfg[35]]) as u32;
            assert_eq!(count, cpus + 1 + 1 + u32::from(IOAPIC_PINS) + 2);
            // Exactly one boot processor, and it is CPU 0.
            assert_eq!(cfg[44 + 3], CPU_ENABLED | CPU_BSP);
            let bsps = (0..cpus as usize)
                .filter(|i| cfg[44 + i * 20 + 3] & CPU_BSP != 0)
                .count();
            assert_eq!(bsps, 1);
        }
    }

    #[test]
    fn cpu_counts_outside_apic_id_space_are_rejected() {
        assert!(matches!(build(0), Err(MptableError::TooManyCpus(0))));
        assert!(matches!(build(255), Err(MptableError::TooManyCpus(255))));
    }
}
