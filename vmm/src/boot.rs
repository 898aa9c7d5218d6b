//! Loads the kernel, command line and initramfs, and writes the boot
//! protocol's parameters: PVH `hvm_start_info` for a vmlinux, the zero page
//! for a bzImage.

use std::fs::File;
use std::path::PathBuf;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, E820Entry};
use crate::resources::{KernelFormat, VmResources, MAX_CMDLINE_LEN};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const E820_MAX: usize = 128;

/// Why the guest could not be loaded.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel or initramfs file could not be read.
    #[error("cannot read {0}")]
    Open(PathBuf, #[source] std::io::Error),
    /// linux-loader rejected the kernel image.
    #[error("loading kernel {0}")]
    Kernel(PathBuf, #[source] linux_loader::loader::Error),
    /// A vmlinux without the PVH ELF note cannot be entered.
    #[error("{0} has no PVH entry point (build it with CONFIG_PVH=y)")]
    NoPvhEntry(PathBuf),
    /// The initramfs overlaps the kernel or exceeds low memory.
    #[error(
        "initramfs of {size} bytes does not fit in guest memory below {limit:#x} above the kernel"
    )]
    InitramfsTooLarge {
        /// Its size.
        size: u64,
        /// End of low RAM.
        limit: u64,
    },
    /// Copying the initramfs into guest memory failed.
    #[error("loading initramfs")]
    Initramfs(#[source] vm_memory::GuestMemoryError),
    /// The command line could not be built or written.
    #[error("kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line into guest memory failed.
    #[error("writing the kernel command line")]
    CmdlineWrite(#[source] linux_loader::loader::Error),
    /// Writing the boot parameters failed.
    #[error("writing boot parameters")]
    Params(#[source] linux_loader::configurator::Error),
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode at the PVH entry, `rbx` = start info.
    Pvh(GuestAddress),
    /// 64-bit long mode at `startup_64`, `rsi` = zero page.
    Linux64(GuestAddress),
}

/// The kernel command line: the VMM's own arguments, then the caller's.
pub fn build_cmdline(
    extra: &str,
    serial_console: bool,
    devices: &[String],
) -> Result<Cmdline, BootError> {
    // reboot=k: the guest resets through the i8042, which ends the VMM;
    // panic=-1 turns a panic into an immediate reset instead of a hang.
    let mut base = String::from("reboot=k panic=-1 pci=off nomodule 8250.nr_uarts=1");
    base.push_str(if serial_console {
        " console=ttyS0"
    } else {
        " console=none"
    });
    let mut cmdline = Cmdline::new(MAX_CMDLINE_LEN).map_err(BootError::Cmdline)?;
    cmdline.insert_str(&base).map_err(BootError::Cmdline)?;
    for device in devices {
        cmdline.insert_str(device).map_err(BootError::Cmdline)?;
    }
    if !extra.trim().is_empty() {
        cmdline
            .insert_str(extra.trim())
            .map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Loads everything into `mem` and returns the entry point.
pub fn load(
    mem: &GuestMemoryMmap,
    res: &VmResources,
    cmdline: &Cmdline,
) -> Result<EntryPoint, BootError> {
    let mut kernel = File::open(&res.kernel).map_err(|e| BootError::Open(res.kernel.clone(), e))?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let loaded = match res.kernel_format {
        KernelFormat::Elf => Elf::load(mem, None, &mut kernel, himem),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut kernel, himem),
    }
    .map_err(|e| BootError::Kernel(res.kernel.clone(), e))?;

    let initramfs = match &res.initramfs {
        Some(path) => Some(load_initramfs(mem, res, path, loaded.kernel_end)?),
        None => None,
    };
    load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), cmdline)
        .map_err(BootError::CmdlineWrite)?;
    let cmdline_size = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes_with_nul()
        .len() as u32;
    let e820 = layout::e820(res.mem_bytes);

    match res.kernel_format {
        KernelFormat::Elf => {
            let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
                return Err(BootError::NoPvhEntry(res.kernel.clone()));
            };
            write_pvh_params(mem, &e820, initramfs)?;
            Ok(EntryPoint::Pvh(entry))
        }
        KernelFormat::BzImage => {
            let mut params = boot_params::default();
            if let Some(hdr) = loaded.setup_header {
                params.hdr = hdr;
            }
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
            params.hdr.cmdline_size = cmdline_size;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            if let Some((addr, size)) = initramfs {
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            for (slot, e) in params.e820_table.iter_mut().zip(e820.iter().take(E820_MAX)) {
                *slot = boot_e820_entry {
                    addr: e.addr,
                    size: e.size,
                    type_: e.kind as u32,
                };
            }
            params.e820_entries = e820.len().min(E820_MAX) as u8;
            LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
                &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_ADDR)),
                mem,
            )
            .map_err(BootError::Params)?;
            // startup_64 sits 0x200 past the protected-mode kernel's load address.
            Ok(EntryPoint::Linux64(GuestAddress(
                loaded.kernel_load.0 + 0x200,
            )))
        }
    }
}

/// The initramfs goes at the top of low RAM, page aligned, above the kernel.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    res: &VmResources,
    path: &PathBuf,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|e| BootError::Open(path.clone(), e))?;
    let size = file
        .metadata()
        .map_err(|e| BootError::Open(path.clone(), e))?
        .len();
    let limit = layout::low_ram_end(res.mem_bytes);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(layout::HIMEM_START))
        .ok_or(BootError::InitramfsTooLarge { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(BootError::Initramfs)?;
    Ok((addr, size))
}

fn write_pvh_params(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    initramfs: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initramfs
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_ADDR,
        memmap_paddr: layout::PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            layout::PVH_MODLIST_ADDR
        },
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(layout::PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(BootError::Params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_puts_vmm_arguments_first_and_appends_the_callers() {
        let dev = vec!["virtio_mmio.device=4K@0xd0000000:5".to_owned()];
        let c = build_cmdline("  init=/init quiet ", true, &dev).unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert!(s.starts_with("reboot=k panic=-1 "), "{s}");
        assert!(s.contains("console=ttyS0"), "{s}");
        assert!(s.ends_with("init=/init quiet"), "{s}");
        assert!(s.contains(" virtio_mmio.device=4K@0xd0000000:5 "), "{s}");
        let quiet = build_cmdline("", false, &[]).unwrap();
        let q = quiet.as_cstring().unwrap().into_string().unwrap();
        assert!(q.contains("console=none") && !q.contains("ttyS0"), "{q}");
    }

    #[test]
    fn cmdline_that_overflows_the_boot_protocol_is_an_error() {
        let long = "x".repeat(MAX_CMDLINE_LEN);
        assert!(matches!(
            build_cmdline(&long, true, &[]),
            Err(BootError::Cmdline(_))
        ));
    }
}
