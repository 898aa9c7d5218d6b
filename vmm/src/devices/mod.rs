//! Devices the guest reaches through port I/O (and, later, MMIO).

pub mod legacy;
pub mod mmio_bus;
pub mod virtio;
