//! Virtio-mmio devices by guest physical address, for vCPU MMIO exits.

use std::sync::Mutex;

use super::legacy::lock;
use super::virtio::mmio::{MmioTransport, TransportState, MMIO_WINDOW};
use super::virtio::Interrupt;

/// One device's window.
#[derive(Debug)]
pub struct MmioSlot {
    /// Guest physical base address.
    pub base: u64,
    /// Its interrupt line (GSI).
    pub irq: u32,
    /// The transport behind the window.
    pub transport: Mutex<MmioTransport>,
}

/// All MMIO devices of a VM.
#[derive(Debug, Default)]
pub struct MmioBus {
    slots: Vec<MmioSlot>,
}

impl MmioBus {
    /// Adds a device window.
    pub fn add(&mut self, slot: MmioSlot) {
        self.slots.push(slot);
    }

    fn find(&self, addr: u64) -> Option<(&MmioSlot, u64)> {
        self.slots
            .iter()
            .find(|s| (s.base..s.base + MMIO_WINDOW).contains(&addr))
            .map(|s| (s, addr - s.base))
    }

    /// A guest read; unclaimed addresses read as all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((slot, offset)) => lock(&slot.transport).read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write; unclaimed addresses are ignored.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((slot, offset)) = self.find(addr) {
            lock(&slot.transport).write(offset, data);
        }
    }

    /// `virtio_mmio.device=` arguments that declare the devices to the guest.
    pub fn cmdline_args(&self) -> Vec<String> {
        self.slots
            .iter()
            .map(|s| format!("virtio_mmio.device=4K@{:#x}:{}", s.base, s.irq))
            .collect()
    }

    /// One line per device on its queues and interrupt (see
    /// [`MmioTransport::describe`]).
    pub fn describe(&self) -> Vec<String> {
        self.slots
            .iter()
            .map(|s| {
                format!(
                    "virtio-mmio@{:#x} irq {}: {}",
                    s.base,
                    s.irq,
                    lock(&s.transport).describe()
                )
            })
            .collect()
    }

    /// What each device that counts its work did, one line each.
    pub fn reports(&self) -> Vec<String> {
        self.slots
            .iter()
            .filter_map(|s| lock(&s.transport).report())
            .collect()
    }

    /// The interrupts of every device, for the watchdog that raises again
    /// those the guest leaves unacknowledged.
    pub fn interrupts(&self) -> Vec<(u32, std::sync::Arc<Interrupt>)> {
        self.slots
            .iter()
            .map(|s| (s.irq, lock(&s.transport).interrupt().clone()))
            .collect()
    }

    /// Why some device cannot be snapshotted now, if one cannot.
    pub fn snapshot_blocker(&self) -> Option<String> {
        self.slots
            .iter()
            .find_map(|s| lock(&s.transport).snapshot_blocker())
    }

    /// Stops every device's workers and saves every transport (see
    /// [`MmioTransport::quiesce`]).
    pub fn quiesce_and_snapshot(&self) -> Result<Vec<TransportState>, String> {
        let mut states = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let mut t = lock(&s.transport);
            t.quiesce();
            states.push(
                t.snapshot()
                    .map_err(|e| format!("virtio-mmio@{:#x}: {e}", s.base))?,
            );
        }
        Ok(states)
    }

    /// Stops every device's host-side work (worker threads), so guest memory
    /// can be released afterwards.
    pub fn shutdown(&self) {
        for s in &self.slots {
            lock(&s.transport).shutdown();
        }
    }
}
