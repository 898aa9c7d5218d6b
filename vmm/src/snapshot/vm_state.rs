//! The VM-wide state KVM keeps in the kernel: the two PICs and the IOAPIC,
//! the PIT, and the kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{blob, unblob, SnapshotError};

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Interrupt controllers, PIT and clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    irqchips: Vec<Vec<u8>>,
    pit: Vec<u8>,
    clock: Vec<u8>,
}

impl VmState {
    /// Saves them from a VM whose vCPUs have stopped.
    pub fn save(vm: &VmFd) -> Result<Self, SnapshotError> {
        let mut irqchips = Vec::with_capacity(CHIPS.len());
        for chip_id in CHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(|e| SnapshotError::Kvm("KVM_GET_IRQCHIP", e))?;
            irqchips.push(blob(&chip));
        }
        let pit = vm
            .get_pit2()
            .map_err(|e| SnapshotError::Kvm("KVM_GET_PIT2", e))?;
        let clock = vm
            .get_clock()
            .map_err(|e| SnapshotError::Kvm("KVM_GET_CLOCK", e))?;
        Ok(VmState {
            irqchips,
            pit: blob(&pit),
            clock: blob(&clock),
        })
    }

    /// Sets them on a VM that has its irqchip and PIT but no vCPU yet.
    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        let pit = unblob::<kvm_pit_state2>("the PIT", &self.pit)?;
        vm.set_pit2(&pit)
            .map_err(|e| SnapshotError::Kvm("KVM_SET_PIT2", e))?;
        let mut clock = unblob::<kvm_clock_data>("the clock", &self.clock)?;
        // The guest's clock goes on from where the snapshot stopped it, not
        // from the snapshot's time plus the time since: flags that would
        // ask KVM to add the host's elapsed time (KVM_CLOCK_REALTIME), or
        // that only describe the saving host, are dropped.
        clock.flags = 0;
        clock.realtime = 0;
        clock.host_tsc = 0;
        vm.set_clock(&clock)
            .map_err(|e| SnapshotError::Kvm("KVM_SET_CLOCK", e))?;
        if self.irqchips.len() != CHIPS.len() {
            return Err(SnapshotError::Corrupt("the interrupt controllers"));
        }
        for (bytes, chip_id) in self.irqchips.iter().zip(CHIPS) {
            let chip = unblob::<kvm_irqchip>("an interrupt controller", bytes)?;
            if chip.chip_id != chip_id {
                return Err(SnapshotError::Corrupt("the interrupt controllers"));
            }
            vm.set_irqchip(&chip)
                .map_err(|e| SnapshotError::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        Ok(())
    }
}
