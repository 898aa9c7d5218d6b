//! Builds a VM from validated resources and runs it until the guest resets,
//! shuts down, fails, or the boot timeout elapses.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::GuestMemoryMmap;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::{self, BootError};
use crate::config::TapSource;
use crate::cpu::{self, CpuError};
use crate::devices::legacy::{
    ConsoleSink, EventFdTrigger, PioBus, ResetTrigger, SerialDevice, SerialSnapshot, SERIAL_IRQ,
};
use crate::devices::mmio_bus::{MmioBus, MmioSlot};
use crate::devices::virtio::fs;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use crate::devices::virtio::net::{Net, Tap};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{UnixHost, Vsock};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::event_loop::{ConsoleInput, ExitWatcher};
use crate::exit::{ExitReason, ExitSignal};
use crate::guest_profile::GuestProfile;
use crate::memory::{self, MemoryError};
use crate::mptable::{self, MptableError};
use crate::pause::VmControl;
use crate::resources::{HostLimits, VmResources};
use crate::snapshot::{SnapshotError, SnapshotRequest, VcpuState, VmSnapshot, VmState};

/// Where KVM keeps its TSS and identity map on Intel: three pages just below
/// the BIOS area, inside the MMIO gap so they never overlap RAM.
const KVM_TSS_ADDR: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// vCPU threads are kicked out of KVM_RUN with this real-time signal.
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Why a VM could not be built or run.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A VM-level KVM ioctl failed.
    #[error("{0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the kernel, initramfs or command line.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU configuration.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// The MP table.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// Host-side plumbing (eventfds, threads).
    #[error("{0}")]
    Io(&'static str, #[source] io::Error),
    /// The event loop failed.
    #[error("{0}")]
    EventLoop(&'static str, #[source] event_manager::Error),
    /// Taking or restoring a snapshot.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// Host-side wiring of a run.
#[derive(Default)]
pub struct RunOptions {
    /// Where the serial console goes; `None` discards it (console=none).
    pub console: Option<Box<dyn Write + Send>>,
    /// Bytes fed to the guest's serial input (a pipe, tty or file).
    pub console_input: Option<File>,
    /// Ends the VM if it runs longer.
    pub timeout: Option<Duration>,
    /// Called once the vCPUs run, with how long each build phase took.
    pub on_started: Option<StartedHook>,
    /// Called when the timeout ends the VM, with one line per virtio device
    /// on how far its queues got (the post-mortem of a stuck guest).
    pub on_timeout: Option<DeviceLinesHook>,
    /// Called when the VM has ended, however it ended, with one line per
    /// device that counts its requests (virtio-fs: by FUSE opcode).
    pub on_exit: Option<DeviceLinesHook>,
    /// Pauses and resumes the vCPUs while the VM runs.
    pub control: Option<VmControl>,
    /// Samples where the vCPUs are while the VM runs and writes them here
    /// at its end (see [`crate::guest_profile`]).
    pub guest_profile: Option<File>,
    /// Stops the VM at a console line and writes it to a snapshot; the run
    /// then ends with [`ExitReason::Snapshotted`].
    pub snapshot: Option<SnapshotRequest>,
}

/// See [`RunOptions::on_timeout`] and [`RunOptions::on_exit`].
pub type DeviceLinesHook = Box<dyn FnOnce(&[String]) + Send>;

/// See [`RunOptions::on_started`].
pub type StartedHook = Box<dyn FnOnce(&BuildTimes) + Send>;

/// Time spent in each phase of building the VM, in boot order.
#[derive(Debug, Default, Clone)]
pub struct BuildTimes {
    /// Phase name and its duration.
    pub phases: Vec<(&'static str, Duration)>,
    /// Bytes of the kernel the `load` phase mapped rather than copied
    /// (`map_boot_files`).
    pub boot_files_mapped: u64,
}

impl BuildTimes {
    fn mark(&mut self, name: &'static str, since: &mut Instant) {
        let now = Instant::now();
        self.phases.push((name, now - *since));
        *since = now;
    }

    /// Sum of all phases.
    pub fn total(&self) -> Duration {
        self.phases.iter().map(|(_, d)| *d).sum()
    }
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("console", &self.console.is_some())
            .field("console_input", &self.console_input.is_some())
            .field("timeout", &self.timeout)
            .field("on_started", &self.on_started.is_some())
            .field("on_timeout", &self.on_timeout.is_some())
            .field("on_exit", &self.on_exit.is_some())
            .field("control", &self.control.is_some())
            .field("guest_profile", &self.guest_profile.is_some())
            .field("snapshot", &self.snapshot)
            .finish()
    }
}

/// Opens /dev/kvm once for both [`host_limits`] and [`run`].
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(VmError::OpenKvm)
}

/// Limits of this host for [`VmResources::validate`].
pub fn host_limits(kvm: &Kvm) -> HostLimits {
    let max_vcpus = (kvm.get_max_vcpus() as u32).min(mptable::MAX_CPUS);
    let max_mem_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(u64::MAX);
    HostLimits {
        max_vcpus,
        max_mem_mib,
    }
}

/// Boots `res` (or restores the snapshot it names) and blocks until the VM
/// ends.
pub fn run(kvm: &Kvm, res: &VmResources, opts: RunOptions) -> Result<ExitReason, VmError> {
    let mut times = BuildTimes::default();
    let mut since = Instant::now();
    let snapshot = res.restore.as_deref().map(VmSnapshot::load).transpose()?;
    if let Some(snap) = &snapshot {
        // The devices are checked once they exist.
        snap.check_shape(res.vcpus, res.mem_bytes)?;
    }
    if let Some(req) = &opts.snapshot {
        // Found now rather than once the VM has run (the snapshot it
        // restores, say).
        if req.dir.exists() {
            return Err(SnapshotError::File {
                what: "cannot create",
                path: req.dir.clone(),
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            }
            .into());
        }
    }
    let vm = kvm
        .create_vm()
        .map_err(|e| VmError::Kvm("KVM_CREATE_VM", e))?;
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(|e| VmError::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
        .map_err(|e| VmError::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| VmError::Kvm("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| VmError::Kvm("KVM_CREATE_PIT2", e))?;

    times.mark("kvm", &mut since);
    let ram = match &res.restore {
        Some(dir) => {
            let path = dir.join(crate::snapshot::MEMORY_FILE);
            let file = File::open(&path).map_err(|source| SnapshotError::File {
                what: "cannot open",
                path,
                source,
            })?;
            memory::from_snapshot(res.mem_bytes, &file)?
        }
        None => memory::create(res.mem_bytes)?,
    };
    let mem = &ram.mem;
    memory::register(&vm, mem)?;
    if let Some(snap) = &snapshot {
        snap.vm.restore(&vm)?;
    }
    times.mark("memory", &mut since);
    let mmio = Arc::new(build_mmio_devices(&vm, mem, res, snapshot.as_ref())?);
    times.mark("devices", &mut since);
    let start = match &snapshot {
        Some(snap) => Start::Restore(snap),
        None => {
            let cmdline =
                boot::build_cmdline(&res.cmdline, opts.console.is_some(), &mmio.cmdline_args())?;
            let loaded = boot::load(mem, res, &cmdline)?;
            times.boot_files_mapped = loaded.mapped_bytes;
            mptable::write(mem, res.vcpus)?;
            times.mark("load", &mut since);
            Start::Boot(loaded.entry)
        }
    };

    let exit = Arc::new(ExitSignal::new().map_err(|e| VmError::Io("eventfd", e))?);
    let panicked = Arc::new(AtomicBool::new(false));
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Io("eventfd", e))?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|e| VmError::Kvm("KVM_IRQFD", e))?;
    let mut sink = ConsoleSink::new(opts.console, panicked.clone());
    if let Some(req) = &opts.snapshot {
        sink = sink.snapshot_after(&req.after_console_line, exit.clone());
    }
    let serial = match &snapshot {
        Some(snap) => snap
            .serial
            .restore(EventFdTrigger(serial_irq), sink)
            .map_err(|e| VmError::Io("restoring the serial port", e))?,
        None => Serial::new(EventFdTrigger(serial_irq), sink),
    };
    let serial: Arc<Mutex<SerialDevice>> = Arc::new(Mutex::new(serial));
    let bus = Arc::new(PioBus::new(serial.clone(), ResetTrigger(exit.clone())));

    let mut vcpus = Vec::with_capacity(res.vcpus as usize);
    match start {
        Start::Restore(snap) => {
            for (index, state) in snap.vcpus.iter().enumerate() {
                let vcpu = vm
                    .create_vcpu(index as u64)
                    .map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
                state.restore(&vcpu)?;
                vcpus.push(vcpu);
            }
            for vcpu in &vcpus {
                // Tells a guest on kvmclock that it was stopped, so its
                // soft-lockup watchdog does not blame the jump on a CPU.
                // It fails for a guest that never set kvmclock up, which
                // then needs nothing.
                let _ = vcpu.kvmclock_ctrl();
            }
            // Interrupts the guest had not acknowledged, now that there
            // are LAPICs to take them (raised earlier, the IOAPIC would
            // have found no vCPU and dropped them).
            for (_, interrupt) in mmio.interrupts() {
                interrupt
                    .raise_if_pending()
                    .map_err(|e| VmError::Io("raising a restored interrupt", e))?;
            }
            SerialSnapshot::raise_if_pending(&crate::devices::legacy::lock(&serial))
                .map_err(|e| VmError::Io("raising a restored interrupt", e))?;
            times.mark("restore", &mut since);
        }
        Start::Boot(entry) => {
            let supported = kvm
                .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| VmError::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
            let host = cpu::HostCpu {
                tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            };
            for index in 0..res.vcpus {
                let vcpu = vm
                    .create_vcpu(u64::from(index))
                    .map_err(|e| VmError::Kvm("KVM_CREATE_VCPU", e))?;
                cpu::configure(&vcpu, (&supported, host), mem, entry, index, res.vcpus)?;
                vcpus.push(vcpu);
            }
            // Last, after every write of the VMM's own into guest RAM.
            if res.huge_pages {
                ram.advise_huge_pages();
            }
        }
    }

    install_kick_handler()?;
    let control = opts.control.unwrap_or_default();
    // The samples, shared with the vCPU threads, and the file they go to.
    let profile = opts
        .guest_profile
        .map(|out| (Arc::new(GuestProfile::new()), out));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::with_capacity(vcpus.len());
    for (index, vcpu) in vcpus.into_iter().enumerate() {
        let (t_bus, t_mmio, t_exit, t_stop, t_ctl, t_profile) = (
            bus.clone(),
            mmio.clone(),
            exit.clone(),
            stop.clone(),
            control.clone(),
            profile.as_ref().map(|(p, _)| p.clone()),
        );
        let spawned = crate::threads::named(format!("vcpu{index}")).spawn(move || {
            let worker = VcpuLoop {
                index,
                bus: &t_bus,
                mmio: &t_mmio,
                exit: &t_exit,
                stop: &t_stop,
                control: &t_ctl,
                profile: t_profile.as_deref(),
            };
            worker.run(vcpu)
        });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                // vCPUs already running may have started devices: stop both
                // before guest RAM goes away with this function.
                stop_vcpus(&stop, threads);
                mmio.shutdown();
                return Err(VmError::Io("spawning a vCPU thread", e));
            }
        }
    }
    control.started(threads.iter().map(|t| t.as_pthread_t()).collect());
    let kicker = match &profile {
        Some(_) => match GuestProfile::start_kicking(control.clone()) {
            Ok(k) => Some(k),
            Err(e) => {
                control.stopped();
                stop_vcpus(&stop, threads);
                mmio.shutdown();
                return Err(VmError::Io("spawning the guest profile thread", e));
            }
        },
        None => None,
    };
    times.mark("vcpus", &mut since);
    if let Some(report) = opts.on_started {
        report(&times);
    }
    let ended = event_loop(
        &exit,
        serial.clone(),
        opts.console_input,
        opts.timeout,
        &mmio.interrupts(),
    );
    // Before the threads are joined: a pause must not kick a stale thread.
    control.stopped();
    if let Some(k) = kicker {
        let _ = k.join();
    }
    let mut stopped = stop_vcpus(&stop, threads);
    // The VM, then guest RAM, go only after the vCPU threads have stopped.
    let mut result = ended.map(|signalled| match exit.reason() {
        _ if !signalled => ExitReason::Timeout,
        Some(ExitReason::Reset) if panicked.load(Ordering::Acquire) => ExitReason::GuestPanic,
        Some(r) => r,
        None => ExitReason::Timeout,
    });
    if let (Ok(ExitReason::SnapshotRequested), Some(req)) = (&result, &opts.snapshot) {
        let saved = SnapshotParts {
            kvm,
            vm: &vm,
            vcpus: &mut stopped,
            expected_vcpus: res.vcpus,
            serial: &serial,
            mmio: &mmio,
            mem,
            mem_bytes: res.mem_bytes,
        }
        .write(&req.dir);
        result = saved
            .map(|()| ExitReason::Snapshotted)
            .map_err(VmError::from);
    }
    if result.as_ref().ok() == Some(&ExitReason::Timeout) {
        if let Some(report) = opts.on_timeout {
            report(&mmio.describe());
        }
    }
    if let Some(report) = opts.on_exit {
        report(&mmio.reports());
    }
    mmio.shutdown();
    drop(stopped);
    drop(vm);
    drop(ram);
    if let Some((p, out)) = profile {
        p.write_to(out)
            .map_err(|e| VmError::Io("writing the guest profile", e))?;
    }
    result
}

/// Where the vCPUs start: a snapshot's state, or the loaded kernel's entry.
enum Start<'a> {
    Restore(&'a VmSnapshot),
    Boot(boot::EntryPoint),
}

/// What a snapshot is read from, once the vCPUs have stopped.
struct SnapshotParts<'a> {
    kvm: &'a Kvm,
    vm: &'a VmFd,
    vcpus: &'a mut [VcpuFd],
    expected_vcpus: u32,
    serial: &'a Mutex<SerialDevice>,
    mmio: &'a MmioBus,
    mem: &'a GuestMemoryMmap,
    mem_bytes: u64,
}

impl SnapshotParts<'_> {
    fn write(self, dir: &std::path::Path) -> Result<(), SnapshotError> {
        if self.vcpus.len() != self.expected_vcpus as usize {
            return Err(SnapshotError::Unsupported(
                "a vCPU thread did not stop".into(),
            ));
        }
        if let Some(why) = self.mmio.snapshot_blocker() {
            return Err(SnapshotError::Unsupported(why));
        }
        let msr_list = self
            .kvm
            .get_msr_index_list()
            .map_err(|e| SnapshotError::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
        let vcpus = self
            .vcpus
            .iter_mut()
            .map(|v| VcpuState::save(v, msr_list.as_slice()))
            .collect::<Result<Vec<_>, _>>()?;
        let vm = VmState::save(self.vm)?;
        let serial = SerialSnapshot::save(&crate::devices::legacy::lock(self.serial));
        let devices = self
            .mmio
            .quiesce_and_snapshot()
            .map_err(SnapshotError::Unsupported)?;
        // A host connection that arrived while the vCPUs stopped.
        if let Some(why) = self.mmio.snapshot_blocker() {
            return Err(SnapshotError::Unsupported(why));
        }
        VmSnapshot {
            version: crate::snapshot::FORMAT_VERSION,
            mem_bytes: self.mem_bytes,
            vm,
            vcpus,
            serial,
            devices,
        }
        .write(dir, self.mem)
    }
}

/// Creates the configured virtio devices with their irqfds and ioeventfds.
fn build_mmio_devices(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    res: &VmResources,
    snapshot: Option<&VmSnapshot>,
) -> Result<MmioBus, VmError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    if res.rng {
        devices.push(Box::new(Rng::default()));
    }
    if let Some(vsock) = &res.vsock {
        let host = UnixHost::bind(&vsock.uds_path)
            .map_err(|e| VmError::Io("binding the vsock socket", e))?;
        devices.push(Box::new(Vsock::new(u64::from(vsock.guest_cid), host)));
    }
    for share in &res.fs {
        let device = fs::passthrough(&share.tag, &share.path, share.read_only, share.cache)
            .map_err(|e| VmError::Io("opening a virtio-fs share", e))?;
        devices.push(device);
    }
    for nic in &res.net {
        let tap = match &nic.tap {
            TapSource::Name(name) => Tap::open(name),
            // SAFETY: validation checked the fd is open; the caller handed
            // it to this VM, which takes sole ownership of it here.
            TapSource::Fd(fd) => Tap::from_fd(unsafe { OwnedFd::from_raw_fd(*fd) }),
        }
        .map_err(|e| VmError::Io("opening a TAP device", e))?;
        devices.push(Box::new(Net::new(nic.mac, tap)));
    }
    if let Some(snap) = snapshot {
        let types: Vec<u32> = devices.iter().map(|d| d.device_type()).collect();
        snap.check_devices(&types)?;
    }
    let mut bus = MmioBus::default();
    for (i, device) in devices.into_iter().enumerate() {
        let base = crate::layout::MMIO_DEVICES_START + i as u64 * MMIO_WINDOW;
        let irq = crate::layout::MMIO_IRQ_START + i as u32;
        if irq > crate::layout::MMIO_IRQ_END {
            return Err(VmError::Io(
                "too many virtio devices for the IOAPIC",
                io::Error::other("out of interrupt lines"),
            ));
        }
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmError::Io("eventfd", e))?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(|e| VmError::Kvm("KVM_IRQFD", e))?;
        let interrupt = Arc::new(Interrupt::new(irq_evt));
        let transport = match snapshot.and_then(|s| s.devices.get(i)) {
            Some(state) => MmioTransport::restore(device, mem.clone(), interrupt, state)
                .map_err(|e| SnapshotError::Mismatch(format!("virtio-mmio@{base:#x}: {e}")))?,
            None => MmioTransport::new(device, mem.clone(), interrupt)
                .map_err(|e| VmError::Io("creating a virtio device", e))?,
        };
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                .map_err(|e| VmError::Kvm("KVM_IOEVENTFD", e))?;
        }
        bus.add(MmioSlot {
            base,
            irq,
            transport: Mutex::new(transport),
        });
    }
    Ok(bus)
}

/// A vCPU's control state in one line (for a triple fault's post-mortem;
/// RIP maps to a symbol with `nm vmlinux`).
fn vcpu_state(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        // KVM on AMD reinitializes the VMCB on a shutdown intercept.
        (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.selector == 0xf000 => {
            "registers already back in their reset state (KVM on AMD discards them)".into()
        }
        (Ok(r), Ok(s)) => format!(
            "rip {:#x} rsp {:#x} rflags {:#x} cs {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}/{:#x}",
            r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit
        ),
        (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
    }
}

/// What a vCPU thread works with besides its vCPU.
struct VcpuLoop<'a> {
    index: usize,
    bus: &'a PioBus,
    mmio: &'a MmioBus,
    exit: &'a ExitSignal,
    stop: &'a AtomicBool,
    control: &'a VmControl,
    profile: Option<&'a GuestProfile>,
}

impl VcpuLoop<'_> {
    /// Runs `vcpu` until the VM stops, then hands it back (for a snapshot).
    fn run(&self, mut vcpu: VcpuFd) -> VcpuFd {
        let (bus, mmio, exit) = (self.bus, self.mmio, self.exit);
        let fail = |why: String| {
            let _ = exit.signal(ExitReason::VcpuFailed(why));
        };
        while !self.stop.load(Ordering::Acquire) {
            if self.control.park_if_paused() {
                let _ = exit.signal(ExitReason::Stopped);
                break;
            }
            match vcpu.run() {
                Ok(VcpuExit::IoIn(port, data)) => bus.read(port, data),
                Ok(VcpuExit::IoOut(port, data)) => bus.write(port, data),
                Ok(VcpuExit::MmioRead(addr, data)) => mmio.read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => mmio.write(addr, data),
                Ok(VcpuExit::Shutdown) => {
                    // Where the guest was is the only clue to why it died. The
                    // line names the exit as its Display does, so whoever reads
                    // only the VMM's stderr (an engine's error) sees the same words.
                    eprintln!(
                        "runvm-vmm: {}, {}",
                        ExitReason::TripleFault,
                        vcpu_state(&vcpu)
                    );
                    let _ = exit.signal(ExitReason::TripleFault);
                    break;
                }
                Ok(VcpuExit::SystemEvent(..)) => {
                    let _ = exit.signal(ExitReason::Reset);
                    break;
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    fail(format!(
                        "KVM_EXIT_FAIL_ENTRY on cpu {cpu}, reason {reason:#x}"
                    ));
                    break;
                }
                Ok(VcpuExit::InternalError) => {
                    fail("KVM_EXIT_INTERNAL_ERROR".into());
                    break;
                }
                // HLT with an in-kernel LAPIC, IRQ windows and the like need nothing.
                Ok(_) => {}
                // A kick: a pause, the end of the VM, or a profile sample.
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if let Some(p) = self.profile {
                        p.record(self.index, &vcpu);
                    }
                }
                Err(e) => {
                    fail(format!("KVM_RUN: {e}"));
                    break;
                }
            }
        }
        vcpu
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

pub(crate) fn install_kick_handler() -> Result<(), VmError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| VmError::Io("installing the vCPU kick handler", e.into()));
    });
    result
}

/// A kick can land just before a thread enters KVM_RUN, so keep kicking
/// until every thread has noticed `stop`. Returns the vCPUs of the threads
/// that stopped, in thread order.
fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<VcpuFd>>) -> Vec<VcpuFd> {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + STOP_GRACE;
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(kick_signal());
        }
        thread::sleep(Duration::from_millis(1));
    }
    threads
        .into_iter()
        .filter(|t| t.is_finished())
        .filter_map(|t| t.join().ok())
        .collect()
}

/// How long an interrupt may stay unacknowledged before it is raised again
/// (see [`Interrupt`]).
const INTERRUPT_WATCHDOG: Duration = Duration::from_millis(500);

/// What the VMM prints (on stderr, once per interrupt line) when the
/// watchdog had to raise an interrupt again: a guest that stops taking
/// interrupts, as nested emulation sometimes makes it.
pub const UNACKED_INTERRUPT_MARKER: &str = "the guest left an interrupt unacknowledged";

/// Runs the event loop until the VM ends (true) or `timeout` passes (false).
fn event_loop(
    exit: &Arc<ExitSignal>,
    serial: Arc<Mutex<SerialDevice>>,
    console_input: Option<File>,
    timeout: Option<Duration>,
    interrupts: &[(u32, Arc<Interrupt>)],
) -> Result<bool, VmError> {
    let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> =
        EventManager::new().map_err(|e| VmError::EventLoop("creating the event loop", e))?;
    let ended = Arc::new(AtomicBool::new(false));
    events.add_subscriber(Box::new(ExitWatcher {
        exit: exit.clone(),
        ended: ended.clone(),
    }));
    let pending = Arc::new(Mutex::new(Vec::new()));
    if let Some(input) = console_input {
        events.add_subscriber(Box::new(ConsoleInput {
            input,
            serial: serial.clone(),
            pending: pending.clone(),
        }));
    }
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut next_watch = Instant::now() + INTERRUPT_WATCHDOG;
    while !ended.load(Ordering::Acquire) {
        let now = Instant::now();
        if now >= next_watch {
            for (irq, interrupt) in interrupts {
                if interrupt.reraise_if_stale() && interrupt.reraised() == 1 {
                    eprintln!(
                        "runvm-vmm: irq {irq}: {UNACKED_INTERRUPT_MARKER} for {} ms; raised it again",
                        INTERRUPT_WATCHDOG.as_millis()
                    );
                }
            }
            next_watch = now + INTERRUPT_WATCHDOG;
        }
        let mut wait = match deadline {
            None => Duration::MAX,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(false);
                }
                left
            }
        };
        if !crate::devices::legacy::lock(&pending).is_empty() {
            ConsoleInput::flush(&serial, &pending);
            wait = wait.min(Duration::from_millis(5));
        }
        if !interrupts.is_empty() {
            wait = wait.min(next_watch.saturating_duration_since(Instant::now()));
        }
        let ms = if wait == Duration::MAX {
            -1
        } else {
            wait.as_millis().clamp(1, i32::MAX as u128) as i32
        };
        events
            .run_with_timeout(ms)
            .map_err(|e| VmError::EventLoop("running the event loop", e))?;
    }
    Ok(true)
}
