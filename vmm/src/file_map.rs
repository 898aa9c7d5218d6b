//! The kernel placed in guest memory by mapping its pages instead of
//! copying them.
//!
//! A kernel that many VMs boot is then one set of page-cache pages: each
//! guest reads them in place and gets a private copy only of the pages it
//! writes (`MAP_PRIVATE`, copy on write). Loading costs no copy and no fresh
//! memory, and guest memory those pages cover costs nothing until written.
//! (The initramfs is always copied: the guest frees it after unpacking it,
//! see `boot::load_initramfs`.)
//!
//! The catch is that a private mapping still shows later changes to the file
//! in pages the guest has not written, and a truncated file makes them fault
//! (KVM_RUN then fails with EFAULT). So the caller must promise the file is
//! never changed in place while a VM runs: replaced by rename, as runvm's
//! own cache does, is fine. [`MappedFile`] maps only when the VM's
//! configuration says so (`map_boot_files`) and copies otherwise.
//!
//! linux-loader still parses the kernel and decides where every byte goes:
//! [`MappedFile`] is the reader it reads through, and turns each read into
//! guest memory into a mapping where the file offset and the destination
//! agree modulo the page size; the unaligned head and tail of a read, and
//! reads that do not agree, are copied as usual.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};

const PAGE: usize = 4096;

/// A boot file read into guest memory, by mapping where `map` allows (see
/// the module docs), else by copying.
#[derive(Debug)]
pub struct MappedFile<'a> {
    file: &'a File,
    map: bool,
    len: u64,
    pos: u64,
    /// Bytes placed by mapping rather than copying, for tests and timing.
    pub mapped: u64,
}

impl<'a> MappedFile<'a> {
    /// A reader at offset 0 of `file`; without `map` it only copies.
    pub fn new(file: &'a File, map: bool) -> io::Result<Self> {
        Ok(MappedFile {
            len: file.metadata()?.len(),
            file,
            map,
            pos: 0,
            mapped: 0,
        })
    }

    fn copy_into(&mut self, dst: *mut u8, len: usize) -> io::Result<usize> {
        // SAFETY: the caller passes a range of one live VolatileSlice (guest
        // memory), which nothing else reads or writes while the VM is built.
        let buf = unsafe { std::slice::from_raw_parts_mut(dst, len) };
        let mut done = 0;
        while done < len {
            match self.file.read_at(&mut buf[done..], self.pos) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Maps `len` bytes (whole pages) of the file at the current position
    /// over `dst`, a page-aligned address inside guest memory.
    fn map_into(&mut self, dst: *mut u8, len: usize) -> io::Result<()> {
        // SAFETY: `dst..dst+len` lies inside one guest memory mapping that
        // this process owns and that outlives the VM (the caller's slice);
        // MAP_FIXED replaces those pages, which nothing has referenced yet
        // (the vCPUs have not run). The new mapping is private, so neither
        // the guest nor this process can write to the file.
        let addr = unsafe {
            libc::mmap(
                dst.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED,
                self.file.as_raw_fd(),
                self.pos as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.pos += len as u64;
        self.mapped += len as u64;
        Ok(())
    }
}

impl Read for MappedFile<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for MappedFile<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "seek before the file's start")
        })?;
        Ok(self.pos)
    }
}

impl ReadVolatile for MappedFile<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let want = (buf.len() as u64).min(self.len.saturating_sub(self.pos)) as usize;
        if want == 0 {
            return Ok(0);
        }
        let guard = buf.ptr_guard_mut();
        let dst = guard.as_ptr();
        let (head, pages) = if self.map {
            split(dst as usize, self.pos, want)
        } else {
            (want, 0)
        };
        let mut done = self
            .copy_into(dst, head)
            .map_err(VolatileMemoryError::IOError)?;
        if done == head && pages > 0 {
            // SAFETY: head + pages <= want <= buf.len().
            let at = unsafe { dst.add(head) };
            match self.map_into(at, pages) {
                Ok(()) => done += pages,
                // A file system that cannot map (or a mapping limit): copy.
                Err(_) => {
                    done += self
                        .copy_into(at, pages)
                        .map_err(VolatileMemoryError::IOError)?
                }
            }
        }
        if done == head + pages && done < want {
            // SAFETY: done < want <= buf.len().
            let at = unsafe { dst.add(done) };
            done += self
                .copy_into(at, want - done)
                .map_err(VolatileMemoryError::IOError)?;
        }
        buf.bitmap().mark_dirty(0, done);
        Ok(done)
    }
}

/// For a read of `len` bytes from file offset `pos` to host address `dst`:
/// how many bytes to copy before the destination is page-aligned, and how
/// many whole pages after that to map (0 when offset and destination do not
/// agree modulo the page size).
fn split(dst: usize, pos: u64, len: usize) -> (usize, usize) {
    let head = (PAGE - dst % PAGE) % PAGE;
    if dst % PAGE != (pos % PAGE as u64) as usize || len < head + PAGE {
        return (len, 0);
    }
    (head, (len - head) / PAGE * PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    #[test]
    fn split_maps_only_whole_pages_that_agree_with_the_file() {
        assert_eq!(split(0x1000, 0x2000, 3 * PAGE), (0, 3 * PAGE));
        assert_eq!(
            split(0x1000, 0x2000, 3 * PAGE + 5),
            (0, 3 * PAGE),
            "tail copied"
        );
        assert_eq!(
            split(0x1f00, 0x2f00, 2 * PAGE),
            (0x100, PAGE),
            "head copied"
        );
        assert_eq!(
            split(0x1000, 0x2004, 3 * PAGE),
            (3 * PAGE, 0),
            "offsets disagree"
        );
        assert_eq!(
            split(0x1000, 0x2000, PAGE - 1),
            (PAGE - 1, 0),
            "less than a page"
        );
    }

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn guest_memory_reads_the_file_and_writes_stay_private() {
        let data = pattern(5 * PAGE + 100);
        let file = file_with(&data);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 * PAGE)]).unwrap();
        let mut reader = MappedFile::new(&file, true).unwrap();
        reader.seek(SeekFrom::Start(PAGE as u64)).unwrap();
        mem.read_exact_volatile_from(GuestAddress(2 * PAGE as u64), &mut reader, 4 * PAGE + 100)
            .unwrap();
        assert_eq!(reader.mapped, 4 * PAGE as u64);
        let mut back = vec![0u8; 4 * PAGE + 100];
        mem.read_slice(&mut back, GuestAddress(2 * PAGE as u64))
            .unwrap();
        assert_eq!(back, data[PAGE..]);
        // The guest's writes change its copy, never the file.
        mem.write_slice(&[0xAA; 64], GuestAddress(3 * PAGE as u64))
            .unwrap();
        let mut on_disk = vec![0u8; 64];
        file.read_exact_at(&mut on_disk, 2 * PAGE as u64).unwrap();
        assert_eq!(on_disk, data[2 * PAGE..2 * PAGE + 64]);
        // Memory around the read is untouched (zero).
        let mut around = [1u8; 16];
        mem.read_slice(&mut around, GuestAddress(2 * PAGE as u64 - 16))
            .unwrap();
        assert_eq!(around, [0; 16]);
        mem.read_slice(&mut around, GuestAddress(6 * PAGE as u64 + 100))
            .unwrap();
        assert_eq!(around, [0; 16]);
    }

    #[test]
    fn reads_that_disagree_with_pages_are_copied() {
        let data = pattern(3 * PAGE);
        let file = file_with(&data);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 * PAGE)]).unwrap();
        let mut reader = MappedFile::new(&file, true).unwrap();
        mem.read_exact_volatile_from(GuestAddress(PAGE as u64 + 4), &mut reader, 3 * PAGE)
            .unwrap();
        assert_eq!(reader.mapped, 0);
        let mut back = vec![0u8; 3 * PAGE];
        mem.read_slice(&mut back, GuestAddress(PAGE as u64 + 4))
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn a_read_past_the_end_is_short_not_garbage() {
        let data = pattern(PAGE + 10);
        let file = file_with(&data);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 * PAGE)]).unwrap();
        let mut reader = MappedFile::new(&file, true).unwrap();
        let err = mem.read_exact_volatile_from(GuestAddress(0), &mut reader, 3 * PAGE);
        assert!(err.is_err(), "a short file fails the exact read");
        let mut tail = [1u8; 16];
        mem.read_slice(&mut tail, GuestAddress(PAGE as u64 + 10))
            .unwrap();
        assert_eq!(
            tail, [0; 16],
            "nothing beyond the file's end lands in memory"
        );
    }
}
