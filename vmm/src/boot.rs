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

use crate::file_map::MappedFile;
use crate::layout::{self, E820Entry};
use crate::memory;
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
    /// The resources were validated for a restore, not a boot.
    #[error("no kernel format was detected for {0} (the VM restores a snapshot)")]
    NoKernelFormat(PathBuf),
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

/// What [`load`] placed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// Where the boot vCPU starts.
    pub entry: EntryPoint,
    /// Bytes of the kernel mapped rather than copied (`map_boot_files`; 0
    /// without it).
    pub mapped_bytes: u64,
}

/// Where the initramfs parts went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Placed {
    addr: u64,
    size: u64,
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
    // noreplace-smp: a kernel that finds one CPU rewrites every lock prefix
    // in its text (4,096 sites in ours), each through text_poke's temporary
    // mm and a TLB flush, a boot cost a one-vCPU micro-VM pays on every start
    // to save a few cycles per atomic operation afterwards.
    let mut base = String::from("reboot=k panic=-1 pci=off nomodule 8250.nr_uarts=1 noreplace-smp");
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
) -> Result<Loaded, BootError> {
    let kernel = File::open(&res.kernel).map_err(|e| BootError::Open(res.kernel.clone(), e))?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let mut reader = MappedFile::new(&kernel, res.map_boot_files)
        .map_err(|e| BootError::Open(res.kernel.clone(), e))?;
    let format = res
        .kernel_format
        .ok_or_else(|| BootError::NoKernelFormat(res.kernel.clone()))?;
    let loaded = load_kernel(mem, format, &mut reader, himem)
        .map_err(|e| BootError::Kernel(res.kernel.clone(), e))?;
    let mapped_bytes = reader.mapped;

    let initramfs = if res.initramfs.is_empty() {
        None
    } else {
        let limit = layout::low_ram_end(res.mem_bytes);
        let placed = load_initramfs(
            mem,
            limit,
            &res.initramfs,
            loaded.kernel_end,
            res.huge_pages,
        )?;
        Some((placed.addr, placed.size))
    };
    load_cmdline(mem, GuestAddress(layout::CMDLINE_ADDR), cmdline)
        .map_err(BootError::CmdlineWrite)?;
    let cmdline_size = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes_with_nul()
        .len() as u32;
    let e820 = layout::e820(res.mem_bytes);

    let entry = match format {
        KernelFormat::Elf => {
            let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
                return Err(BootError::NoPvhEntry(res.kernel.clone()));
            };
            write_pvh_params(mem, &e820, initramfs)?;
            EntryPoint::Pvh(entry)
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
            EntryPoint::Linux64(GuestAddress(loaded.kernel_load.0 + 0x200))
        }
    };
    Ok(Loaded {
        entry,
        mapped_bytes,
    })
}

/// Where each initramfs part starts, relative to the first, and the size
/// of them all: every part but the first starts 4-byte aligned, as the
/// kernel looks for the next cpio header only there (it skips the zeros
/// in between).
pub fn initramfs_layout(sizes: &[u64]) -> Option<(Vec<u64>, u64)> {
    let mut offsets = Vec::with_capacity(sizes.len());
    let mut end = 0u64;
    for &size in sizes {
        let start = end.checked_add(3)? & !3;
        offsets.push(start);
        end = start.checked_add(size)?;
    }
    Some((offsets, end))
}

fn load_kernel(
    mem: &GuestMemoryMmap,
    format: KernelFormat,
    reader: &mut MappedFile,
    himem: Option<GuestAddress>,
) -> linux_loader::loader::Result<linux_loader::loader::KernelLoaderResult> {
    match format {
        KernelFormat::Elf => Elf::load(mem, None, reader, himem),
        KernelFormat::BzImage => BzImage::load(mem, None, reader, himem),
    }
}

/// The initramfs goes at the top of low RAM, page aligned, above the
/// kernel: its parts one after another, as one archive to the kernel.
///
/// It is always copied, even where the kernel is mapped: the
/// guest unpacks it once and then frees its pages for reuse, and a reused
/// page of a mapped file is a copy-on-write fault each (a nested one per
/// 4 KiB page in the test host), while nothing is shared after the unpack.
/// With `huge_pages` its blocks are advised before the copy, so the guest
/// reads it, and later reuses it, through 2 MiB pages (the README's boot
/// benchmark section has the figures).
fn load_initramfs(
    mem: &GuestMemoryMmap,
    limit: u64,
    parts: &[PathBuf],
    kernel_end: u64,
    huge_pages: bool,
) -> Result<Placed, BootError> {
    let mut files = Vec::with_capacity(parts.len());
    for path in parts {
        let file = File::open(path).map_err(|e| BootError::Open(path.clone(), e))?;
        let size = file
            .metadata()
            .map_err(|e| BootError::Open(path.clone(), e))?
            .len();
        files.push((file, size));
    }
    let sizes: Vec<u64> = files.iter().map(|(_, size)| *size).collect();
    let too_large = BootError::InitramfsTooLarge {
        size: sizes.iter().fold(0u64, |a, s| a.saturating_add(*s)),
        limit,
    };
    let Some((offsets, size)) = initramfs_layout(&sizes) else {
        return Err(too_large);
    };
    let Some(addr) = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(layout::HIMEM_START))
    else {
        return Err(too_large);
    };
    if huge_pages {
        memory::advise_huge_pages_at(mem, GuestAddress(addr), size);
    }
    let mut end = 0;
    for ((mut file, len), offset) in files.into_iter().zip(offsets) {
        // The gap before a part holds zeros, whatever memory held before.
        let gap = vec![0u8; (offset - end) as usize];
        mem.write_slice(&gap, GuestAddress(addr + end))
            .map_err(BootError::Initramfs)?;
        mem.read_exact_volatile_from(GuestAddress(addr + offset), &mut file, len as usize)
            .map_err(BootError::Initramfs)?;
        end = offset + len;
    }
    Ok(Placed { addr, size })
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
        assert!(s.contains(" noreplace-smp "), "{s}");
        assert!(s.contains("console=ttyS0"), "{s}");
        assert!(s.ends_with("init=/init quiet"), "{s}");
        assert!(s.contains(" virtio_mmio.device=4K@0xd0000000:5 "), "{s}");
        let quiet = build_cmdline("", false, &[]).unwrap();
        let q = quiet.as_cstring().unwrap().into_string().unwrap();
        assert!(q.contains("console=none") && !q.contains("ttyS0"), "{q}");
    }

    #[test]
    fn initramfs_parts_start_4_byte_aligned_one_after_another() {
        assert_eq!(initramfs_layout(&[]), Some((vec![], 0)));
        assert_eq!(initramfs_layout(&[10]), Some((vec![0], 10)));
        assert_eq!(
            initramfs_layout(&[10, 8, 1, 3]),
            Some((vec![0, 12, 20, 24], 27))
        );
        assert_eq!(initramfs_layout(&[u64::MAX, 1]), None);
    }

    #[test]
    fn initramfs_parts_load_below_the_limit_with_zeros_between() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        mem.write_slice(&[0xff; 4096], GuestAddress((8 << 20) - 4096))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"AAAAA").unwrap();
        std::fs::write(&b, b"BB").unwrap();
        let limit = 8 << 20;
        let Placed { addr, size, .. } =
            load_initramfs(&mem, limit, &[a.clone(), b], 0, false).unwrap();
        assert_eq!((addr, size), (limit - 4096, 10));
        let mut got = [0u8; 10];
        mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
        assert_eq!(&got, b"AAAAA\0\0\0BB");

        // Parts that do not fit above the kernel are refused.
        assert!(matches!(
            load_initramfs(&mem, limit, std::slice::from_ref(&a), limit - 1, false),
            Err(BootError::InitramfsTooLarge { size: 5, .. })
        ));
        assert!(matches!(
            load_initramfs(&mem, limit, &[dir.path().join("missing")], 0, false),
            Err(BootError::Open(..))
        ));
    }

    #[test]
    fn initramfs_parts_read_the_same_with_huge_page_advice_or_without() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let big: Vec<u8> = (0..3 * 4096 + 5).map(|i| (i % 251) as u8).collect();
        std::fs::write(&a, &big).unwrap();
        std::fs::write(&b, b"BB").unwrap();
        let limit = 8 << 20;
        let mut images = Vec::new();
        for huge_pages in [false, true] {
            let mem =
                GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), limit as usize)]).unwrap();
            let Placed { addr, size } =
                load_initramfs(&mem, limit, &[a.clone(), b.clone()], 0, huge_pages).unwrap();
            let mut got = vec![0u8; size as usize];
            mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
            images.push(got);
        }
        assert_eq!(images[0], images[1]);
        assert_eq!(&images[1][..big.len()], &big[..]);
        assert_eq!(&images[1][big.len()..], b"\0\0\0BB");
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
