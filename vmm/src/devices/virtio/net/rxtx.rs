//! Moving frames between the guest's queues and the back end. Every frame
//! starts with the 12-byte virtio-net header; a frame the guest's buffers
//! cannot hold, or a chain the guest got wrong, is dropped and counted,
//! never trusted.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{NetBackend, HDR_LEN};

/// Largest frame with its header: a 64 KiB GSO packet, its Ethernet and
/// VLAN headers, and the virtio-net header.
pub const MAX_FRAME: usize = HDR_LEN + 65_550;
/// Where num_buffers sits in the header.
const NUM_BUFFERS: usize = 10;

/// Counters of what crossed the device; dropped frames say why the guest
/// or the host lost traffic.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    /// Frames the guest sent that reached the back end.
    pub tx_frames: u64,
    /// Frames the guest sent that were malformed or refused by the back end.
    pub tx_dropped: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames for the guest that its buffers could not take.
    pub rx_dropped: u64,
}

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> Result<(), ()> {
    match queue.add_used(mem, head, len) {
        Ok(()) => Ok(()),
        // A head beyond the ring: nothing to return, nothing broken.
        Err(virtio_queue::Error::InvalidDescriptorIndex) => Ok(()),
        Err(_) => Err(()),
    }
}

/// Sends up to `budget` frames the guest queued; returns how many chains
/// were completed (the guest needs an interrupt when any were).
pub fn process_tx(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    backend: &mut dyn NetBackend,
    buf: &mut [u8],
    stats: &mut NetStats,
    budget: usize,
) -> usize {
    let mut done = 0;
    while done < budget {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        match read_frame(chain, mem, buf) {
            Some(len) if backend.send(&buf[..len]).is_ok() => stats.tx_frames += 1,
            _ => stats.tx_dropped += 1,
        }
        if add_used(queue, mem, head, 0).is_err() {
            break;
        }
        done += 1;
    }
    done
}

/// The chain's readable bytes, if they are a whole frame that fits `buf`.
fn read_frame(chain: Chain<'_>, mem: &GuestMemoryMmap, buf: &mut [u8]) -> Option<usize> {
    let mut reader = chain.reader(mem).ok()?;
    let len = reader.available_bytes();
    if !(HDR_LEN..=buf.len()).contains(&len) {
        return None;
    }
    reader.read_exact(&mut buf[..len]).ok()?;
    Some(len)
}

/// What became of a frame offered to the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    /// In the guest's buffers (or dropped, its chains returned): either
    /// way the guest needs an interrupt.
    Used,
    /// Not enough buffers posted yet; keep the frame until the guest
    /// adds more.
    NoRoom,
    /// The used ring cannot be written; the queue is unusable.
    Broken,
}

/// Places `frame` (header included) in the guest's RX buffers: one chain,
/// or with mergeable buffers as many as it takes, their count in the
/// header's num_buffers.
pub fn deliver(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    mergeable: bool,
    stats: &mut NetStats,
) -> Delivery {
    let start = queue.next_avail();
    let mut chains: Vec<(Chain<'_>, usize)> = Vec::new();
    let mut room = 0usize;
    let mut usable = true;
    while room < frame.len() {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            // Leave the chains for later: nothing was published.
            queue.set_next_avail(start);
            return Delivery::NoRoom;
        };
        let cap = chain
            .clone()
            .writer(mem)
            .map(|w| w.available_bytes())
            .unwrap_or(0);
        chains.push((chain, cap));
        if cap == 0 || (chains.len() == 1 && cap < HDR_LEN) {
            usable = false;
            break;
        }
        room += cap;
        if !mergeable {
            break;
        }
    }
    if !usable || room < frame.len() || chains.len() > usize::from(u16::MAX) {
        stats.rx_dropped += 1;
        for (chain, _) in chains {
            if add_used(queue, mem, chain.head_index(), 0).is_err() {
                return Delivery::Broken;
            }
        }
        return Delivery::Used;
    }
    frame[NUM_BUFFERS..HDR_LEN].copy_from_slice(&(chains.len() as u16).to_le_bytes());
    let mut off = 0;
    for (chain, cap) in chains {
        let head = chain.head_index();
        let n = cap.min(frame.len() - off);
        let written = chain
            .writer(mem)
            .ok()
            .and_then(|mut w| w.write_all(&frame[off..off + n]).ok())
            .map_or(0, |()| n);
        off += n;
        if add_used(queue, mem, head, written as u32).is_err() {
            return Delivery::Broken;
        }
    }
    stats.rx_frames += 1;
    Delivery::Used
}
