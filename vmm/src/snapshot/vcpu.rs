//! A vCPU's architectural state as KVM holds it, saved from a stopped vCPU
//! and set on a fresh one.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::{blob, unblob, SnapshotError};

/// One vCPU, in the order KVM wants it back (see [`VcpuState::restore`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    cpuid: Vec<Vec<u8>>,
    tsc_khz: Option<u32>,
    mp_state: Vec<u8>,
    regs: Vec<u8>,
    sregs: Vec<u8>,
    xsave: Vec<u8>,
    xcrs: Vec<u8>,
    debugregs: Vec<u8>,
    lapic: Vec<u8>,
    /// (index, value), in KVM's MSR index order: the TSC before the TSC
    /// deadline, which KVM reads relative to it.
    msrs: Vec<(u32, u64)>,
    vcpu_events: Vec<u8>,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |e| SnapshotError::Kvm(what, e)
}

impl VcpuState {
    /// Saves `vcpu`, whose thread has left KVM_RUN for good. `msr_list` is
    /// KVM_GET_MSR_INDEX_LIST; MSRs this vCPU cannot read are left out.
    pub fn save(vcpu: &mut VcpuFd, msr_list: &[u32]) -> Result<Self, SnapshotError> {
        // An I/O exit is completed on the next KVM_RUN (an `in` gets its
        // value then): enter once with immediate_exit so KVM finishes it
        // and returns before running guest code.
        vcpu.set_kvm_immediate_exit(1);
        let entered = vcpu.run().map(|_| ());
        vcpu.set_kvm_immediate_exit(0);
        match entered {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => return Err(SnapshotError::Kvm("KVM_RUN (immediate exit)", e)),
            Ok(()) => {
                return Err(SnapshotError::Unsupported(
                    "a vCPU exited with work pending instead of stopping".into(),
                ))
            }
        }
        // KVM_GET_MP_STATE may deliver pending INIT/SIPI events into the
        // LAPIC, so it comes first.
        let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
        let xsave = vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
        let xcrs = vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
        let debugregs = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
        let msrs = save_msrs(vcpu, msr_list)?;
        let vcpu_events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_CPUID2"))?;
        Ok(VcpuState {
            cpuid: cpuid.as_slice().iter().map(blob).collect(),
            tsc_khz: vcpu.get_tsc_khz().ok(),
            mp_state: blob(&mp_state),
            regs: blob(&regs),
            sregs: blob(&sregs),
            xsave: blob(&xsave),
            xcrs: blob(&xcrs),
            debugregs: blob(&debugregs),
            lapic: blob(&lapic),
            msrs,
            vcpu_events: blob(&vcpu_events),
        })
    }

    /// Sets this state on a vCPU just created (nothing configured yet).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        let entries = self
            .cpuid
            .iter()
            .map(|b| unblob::<kvm_cpuid_entry2>("a CPUID entry", b))
            .collect::<Result<Vec<_>, _>>()?;
        let cpuid = CpuId::from_entries(&entries)
            .map_err(|_| SnapshotError::Corrupt("too many CPUID entries"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
        if let Some(khz) = self.tsc_khz {
            // The guest calibrated against this frequency; a host that
            // cannot scale to it still runs the guest, with a drifting clock.
            if vcpu.get_tsc_khz().ok() != Some(khz) {
                let _ = vcpu.set_tsc_khz(khz);
            }
        }
        vcpu.set_mp_state(unblob::<kvm_mp_state>("the MP state", &self.mp_state)?)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&unblob::<kvm_regs>("the registers", &self.regs)?)
            .map_err(kvm("KVM_SET_REGS"))?;
        vcpu.set_sregs(&unblob::<kvm_sregs>("the special registers", &self.sregs)?)
            .map_err(kvm("KVM_SET_SREGS"))?;
        let xsave = unblob::<kvm_xsave>("the XSAVE area", &self.xsave)?;
        // SAFETY: `xsave` is a whole kvm_xsave as KVM_GET_XSAVE filled it
        // (4 KiB, no trailing extension: the vCPU was saved with
        // KVM_GET_XSAVE, not KVM_GET_XSAVE2), which KVM_SET_XSAVE reads.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&unblob::<kvm_xcrs>("the XCRs", &self.xcrs)?)
            .map_err(kvm("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&unblob::<kvm_debugregs>(
            "the debug registers",
            &self.debugregs,
        )?)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&unblob::<kvm_lapic_state>("the LAPIC", &self.lapic)?)
            .map_err(kvm("KVM_SET_LAPIC"))?;
        restore_msrs(vcpu, &self.msrs)?;
        vcpu.set_vcpu_events(&unblob::<kvm_vcpu_events>(
            "the vCPU events",
            &self.vcpu_events,
        )?)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// How many MSRs this state holds.
    pub fn msr_count(&self) -> usize {
        self.msrs.len()
    }
}

/// Reads every MSR of `list` that the vCPU lets the host read. KVM_GET_MSRS
/// stops at the first one it refuses and says how many it read before it,
/// so a refused index is dropped and the read goes on after it.
fn save_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, SnapshotError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|_| SnapshotError::Corrupt("too many MSRs for one request"))?;
        let read = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        let read = read.min(chunk.len());
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        // Skip the refused one, if the read stopped early.
        let consumed = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    Ok(out)
}

fn restore_msrs(vcpu: &VcpuFd, saved: &[(u32, u64)]) -> Result<(), SnapshotError> {
    for chunk in saved.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries)
            .map_err(|_| SnapshotError::Corrupt("too many MSRs for one request"))?;
        let written = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if written < chunk.len() {
            return Err(SnapshotError::Unsupported(format!(
                "KVM refused MSR {:#x} that it had let the snapshot read",
                chunk[written].0
            )));
        }
    }
    Ok(())
}
