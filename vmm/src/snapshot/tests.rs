use std::os::unix::fs::MetadataExt;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::memory;

fn snapshot(vcpus: usize, mem_bytes: u64) -> VmSnapshot {
    VmSnapshot {
        version: FORMAT_VERSION,
        mem_bytes,
        vm: serde_json::from_str(r#"{"irqchips":[],"pit":[],"clock":[]}"#).unwrap(),
        vcpus: Vec::new(),
        serial: serde_json::from_str(r#"{"registers":[0,0,0,1,3,96,8,176,0],"in_buffer":[]}"#)
            .unwrap(),
        devices: Vec::new(),
    }
    .with_vcpus(vcpus)
}

impl VmSnapshot {
    fn with_vcpus(mut self, n: usize) -> Self {
        let blank: VcpuState = serde_json::from_str(
            r#"{"cpuid":[],"tsc_khz":null,"mp_state":[],"regs":[],"sregs":[],"xsave":[],
                "xcrs":[],"debugregs":[],"lapic":[],"msrs":[],"vcpu_events":[]}"#,
        )
        .unwrap();
        self.vcpus = vec![blank; n];
        self
    }
}

#[test]
fn guest_ram_round_trips_through_a_sparse_file_mapped_private() {
    let mib = 1u64 << 20;
    let ram = memory::create(16 * mib).unwrap();
    ram.mem
        .write_obj(0x1122_3344u32, GuestAddress(0x1000))
        .unwrap();
    ram.mem
        .write_obj(0x55u8, GuestAddress(15 * mib + 7))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snap_dir = dir.path().join("snap");
    snapshot(1, 16 * mib).write(&snap_dir, &ram.mem).unwrap();
    let file = std::fs::File::open(snap_dir.join(MEMORY_FILE)).unwrap();
    let meta = file.metadata().unwrap();
    assert_eq!(meta.len(), 16 * mib);
    // Two pages hold data; the rest are holes.
    assert!(meta.blocks() * 512 <= 64 * 1024, "{} blocks", meta.blocks());

    let back = memory::from_snapshot(16 * mib, &file).unwrap();
    assert_eq!(
        back.mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
        0x1122_3344
    );
    assert_eq!(
        back.mem.read_obj::<u8>(GuestAddress(15 * mib + 7)).unwrap(),
        0x55
    );
    assert_eq!(back.mem.read_obj::<u64>(GuestAddress(8 * mib)).unwrap(), 0);
    // The restored guest's writes stay in its own process.
    back.mem.write_obj(0u32, GuestAddress(0x1000)).unwrap();
    let again = memory::from_snapshot(16 * mib, &file).unwrap();
    assert_eq!(
        again.mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
        0x1122_3344
    );
    // A memory file shorter than the VM is refused.
    assert!(memory::from_snapshot(32 * mib, &file).is_err());

    let loaded = VmSnapshot::load(&snap_dir).unwrap();
    assert_eq!(loaded.mem_bytes, 16 * mib);
    assert_eq!(loaded.vcpus.len(), 1);
}

#[test]
fn a_snapshot_into_an_existing_directory_is_refused_and_leaves_it_alone() {
    let ram = memory::create(2 << 20).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep"), b"x").unwrap();
    let err = snapshot(1, 2 << 20)
        .write(dir.path(), &ram.mem)
        .unwrap_err();
    assert!(err.to_string().starts_with("cannot create "), "{err}");
    assert!(dir.path().join("keep").exists());
}

#[test]
fn shape_devices_and_version_are_checked() {
    let s = snapshot(2, 128 << 20);
    s.check_shape(2, 128 << 20).unwrap();
    assert_eq!(
        s.check_shape(1, 128 << 20).unwrap_err().to_string(),
        "the VM does not match the snapshot: it has 2 vCPUs, the VM 1"
    );
    assert_eq!(
        s.check_shape(2, 256 << 20).unwrap_err().to_string(),
        "the VM does not match the snapshot: it has 128 MiB of memory, the VM 256 MiB"
    );
    s.check_devices(&[]).unwrap();
    assert_eq!(
        s.check_devices(&[4]).unwrap_err().to_string(),
        "the VM does not match the snapshot: its virtio devices are of types [], the VM's [4]"
    );

    let dir = tempfile::tempdir().unwrap();
    let mut old = serde_json::to_value(&s).unwrap();
    old["version"] = 0.into();
    std::fs::write(dir.path().join(STATE_FILE), old.to_string()).unwrap();
    assert_eq!(
        VmSnapshot::load(dir.path()).unwrap_err().to_string(),
        format!("the snapshot has format 0, this VMM reads format {FORMAT_VERSION}")
    );
    std::fs::write(dir.path().join(STATE_FILE), b"{").unwrap();
    assert!(matches!(
        VmSnapshot::load(dir.path()),
        Err(SnapshotError::Parse(_))
    ));
    let missing = VmSnapshot::load(&dir.path().join("none")).unwrap_err();
    assert!(missing.to_string().starts_with("cannot read "), "{missing}");
}

#[test]
fn saved_kvm_structures_of_the_wrong_size_are_refused() {
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1234,
        ..Default::default()
    };
    let bytes = blob(&regs);
    assert_eq!(
        unblob::<kvm_bindings::kvm_regs>("r", &bytes).unwrap().rip,
        0x1234
    );
    assert!(matches!(
        unblob::<kvm_bindings::kvm_regs>("the registers", &bytes[1..]),
        Err(SnapshotError::Corrupt("the registers"))
    ));
}
