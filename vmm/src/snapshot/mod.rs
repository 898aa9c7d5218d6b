//! VM snapshots: a VM stopped at a chosen point (its guest RAM, every vCPU,
//! the in-kernel interrupt controllers, PIT and clock, the serial port and
//! every virtio transport) written to a directory, and booted from again
//! by a new VMM process without running the guest kernel's boot.
//!
//! A snapshot is taken when the VM ends for it ([`SnapshotRequest`]): the
//! vCPU threads stop and hand back their vCPUs, the devices stop their
//! workers, and only then is anything read, so nothing changes under it.
//! It needs the devices idle in a way a new host side can take over: no
//! vsock connection open and no virtio-fs share mounted yet (each device
//! says what blocks it). Restoring then builds each device anew from the
//! restoring VMM's own configuration (another share directory, socket or
//! TAP is fine; the same kinds of device in the same order are required)
//! and hands it the saved queues. Guest RAM is the snapshot's memory file
//! mapped private, so VMs restored from one snapshot share its unchanged
//! pages through the page cache.
//!
//! The format is this VMM version's own (checked by [`FORMAT_VERSION`]) and
//! for the same host: CPUID and MSRs are restored as saved.

mod vcpu;
mod vm_state;

pub use vcpu::VcpuState;
pub use vm_state::VmState;

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::devices::legacy::SerialSnapshot;
use crate::devices::virtio::mmio::TransportState;

/// Bumped whenever what a snapshot holds changes meaning.
pub const FORMAT_VERSION: u32 = 1;
/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "vm.json";
/// The guest RAM file in a snapshot directory (sparse: zero pages are holes).
pub const MEMORY_FILE: &str = "memory";

/// Why a snapshot could not be taken or restored.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// A KVM ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Reading or writing the snapshot's files.
    #[error("{what} {}", path.display())]
    File {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The state file does not parse, or a saved structure has the wrong size.
    #[error("the snapshot is damaged: {0}")]
    Corrupt(&'static str),
    /// The state file does not parse.
    #[error("the snapshot's state file does not parse")]
    Parse(#[source] serde_json::Error),
    /// Another VMM version wrote it.
    #[error("the snapshot has format {found}, this VMM reads format {FORMAT_VERSION}")]
    Version {
        /// What the snapshot says.
        found: u32,
    },
    /// The restoring VM's configuration does not match the snapshot's.
    #[error("the VM does not match the snapshot: {0}")]
    Mismatch(String),
    /// The VM was in a state a snapshot cannot hold.
    #[error("cannot snapshot this VM: {0}")]
    Unsupported(String),
}

/// Where, and when, a running VM is to be snapshotted.
#[derive(Debug, Clone)]
pub struct SnapshotRequest {
    /// The directory the snapshot goes to (created; must not exist).
    pub dir: PathBuf,
    /// The VM is stopped and snapshotted once a console line contains this.
    pub after_console_line: String,
}

/// Everything but guest RAM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// [`FORMAT_VERSION`] of the VMM that wrote it.
    pub version: u32,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Interrupt controllers, PIT and clock.
    pub vm: VmState,
    /// One per vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The 16550.
    pub serial: SerialSnapshot,
    /// One per virtio device, in MMIO slot order.
    pub devices: Vec<TransportState>,
}

impl VmSnapshot {
    /// Reads the state file of the snapshot in `dir`.
    pub fn load(dir: &Path) -> Result<Self, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let text = std::fs::read(&path).map_err(|source| SnapshotError::File {
            what: "cannot read",
            path: path.clone(),
            source,
        })?;
        let snap: VmSnapshot = serde_json::from_slice(&text).map_err(SnapshotError::Parse)?;
        if snap.version != FORMAT_VERSION {
            return Err(SnapshotError::Version {
                found: snap.version,
            });
        }
        Ok(snap)
    }

    /// Checks that a VM of `vcpus` and `mem_bytes` can take this snapshot.
    pub fn check_shape(&self, vcpus: u32, mem_bytes: u64) -> Result<(), SnapshotError> {
        if self.vcpus.len() != vcpus as usize {
            return Err(SnapshotError::Mismatch(format!(
                "it has {} vCPUs, the VM {vcpus}",
                self.vcpus.len()
            )));
        }
        if self.mem_bytes != mem_bytes {
            return Err(SnapshotError::Mismatch(format!(
                "it has {} MiB of memory, the VM {} MiB",
                self.mem_bytes >> 20,
                mem_bytes >> 20
            )));
        }
        Ok(())
    }

    /// Checks that a VM with virtio devices of these types, in slot order,
    /// can take this snapshot.
    pub fn check_devices(&self, device_types: &[u32]) -> Result<(), SnapshotError> {
        let saved: Vec<u32> = self.devices.iter().map(|d| d.device_type).collect();
        if saved != device_types {
            return Err(SnapshotError::Mismatch(format!(
                "its virtio devices are of types {saved:?}, the VM's {device_types:?}"
            )));
        }
        Ok(())
    }

    /// Writes this state and `mem` into the new directory `dir`. The state
    /// file is written last, so a directory without one is no snapshot.
    pub fn write(&self, dir: &Path, mem: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        std::fs::create_dir(dir).map_err(file_err("cannot create", dir))?;
        let written = self.write_files(dir, mem);
        if written.is_err() {
            // Half a snapshot is none; leave nothing behind.
            let _ = std::fs::remove_dir_all(dir);
        }
        written
    }

    fn write_files(&self, dir: &Path, mem: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        let mem_path = dir.join(MEMORY_FILE);
        let file = File::create(&mem_path).map_err(file_err("cannot create", &mem_path))?;
        write_memory(mem, &file).map_err(file_err("cannot write", &mem_path))?;
        file.sync_all()
            .map_err(file_err("cannot write", &mem_path))?;
        let state_path = dir.join(STATE_FILE);
        let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let json = serde_json::to_vec(self).map_err(SnapshotError::Parse)?;
        let mut out = File::create(&tmp).map_err(file_err("cannot create", &tmp))?;
        out.write_all(&json)
            .and_then(|()| out.sync_all())
            .map_err(file_err("cannot write", &tmp))?;
        std::fs::rename(&tmp, &state_path).map_err(file_err("cannot write", &state_path))
    }
}

/// Page granularity of the memory file's holes.
const PAGE: usize = 4096;

/// What failed on which file.
fn file_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SnapshotError {
    let path = path.to_owned();
    move |source| SnapshotError::File { what, path, source }
}

/// Writes guest RAM region after region, each at the offset it has in
/// guest memory's backing file; pages of zeros are left as holes, and each
/// run of other pages goes out in one write.
fn write_memory(mem: &GuestMemoryMmap, file: &File) -> io::Result<()> {
    let mut offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: the region is a live mapping of `len` bytes that outlives
        // this function (the caller holds `mem`); the vCPUs and device
        // workers have stopped, so nothing writes it meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), len) };
        let mut run: Option<usize> = None;
        for page in (0..len).step_by(PAGE) {
            let zero = bytes[page..(page + PAGE).min(len)].iter().all(|&b| b == 0);
            match (zero, run) {
                (false, None) => run = Some(page),
                (true, Some(start)) => {
                    file.write_all_at(&bytes[start..page], offset + start as u64)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            file.write_all_at(&bytes[start..], offset + start as u64)?;
        }
        offset += len as u64;
    }
    file.set_len(offset)
}

/// The bytes of a KVM structure as the kernel lays it out.
pub(crate) fn blob<T: IntoBytes + Immutable>(value: &T) -> Vec<u8> {
    value.as_bytes().to_vec()
}

/// A KVM structure back from [`blob`]'s bytes; the wrong length is an error.
pub(crate) fn unblob<T: FromBytes>(what: &'static str, bytes: &[u8]) -> Result<T, SnapshotError> {
    T::read_from_bytes(bytes).map_err(|_| SnapshotError::Corrupt(what))
}

#[cfg(test)]
mod tests;
