//! The 16550 serial console and the i8042 controller (both from vm-superio),
//! on a small port-I/O bus that the vCPU threads dispatch into.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitReason, ExitSignal};

/// COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// COM1's eight registers.
pub const SERIAL_PORT_LEN: u16 = 8;
/// COM1's ISA interrupt.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD_PORT: u16 = 0x64;

/// Raises an interrupt by writing the eventfd that KVM has as an irqfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The i8042's CPU reset line ends the VM.
#[derive(Debug, Clone)]
pub struct ResetTrigger(pub Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.signal(ExitReason::Reset)
    }
}

const PANIC_TEXT: &[u8] = b"Kernel panic - not syncing";
const MAX_LINE: usize = 256;

/// Where the serial console's output goes. It also watches the lines for a
/// kernel panic, so a guest that panics (and resets, `panic=-1`) is reported
/// as having panicked rather than as a clean reset.
pub struct ConsoleSink {
    out: Option<Box<dyn Write + Send>>,
    line: Vec<u8>,
    panicked: Arc<AtomicBool>,
    /// A line containing this text ends the VM for a snapshot.
    snapshot_after: Option<(Vec<u8>, Arc<ExitSignal>)>,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("connected", &self.out.is_some())
            .finish()
    }
}

impl ConsoleSink {
    /// `out` of `None` discards the output (but still watches for panics).
    pub fn new(out: Option<Box<dyn Write + Send>>, panicked: Arc<AtomicBool>) -> Self {
        ConsoleSink {
            out,
            line: Vec::with_capacity(MAX_LINE),
            panicked,
            snapshot_after: None,
        }
    }

    /// Ends the VM with [`ExitReason::SnapshotRequested`] once a line
    /// contains `text` (the line itself still goes out first).
    pub fn snapshot_after(mut self, text: &str, exit: Arc<ExitSignal>) -> Self {
        self.snapshot_after = Some((text.as_bytes().to_vec(), exit));
        self
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                if self.line.windows(PANIC_TEXT.len()).any(|w| w == PANIC_TEXT) {
                    self.panicked.store(true, Ordering::Release);
                }
                if let Some((text, exit)) = &self.snapshot_after {
                    if !text.is_empty() && self.line.windows(text.len()).any(|w| w == text) {
                        let _ = exit.signal(ExitReason::SnapshotRequested);
                    }
                }
                self.line.clear();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.scan(buf);
        if let Some(out) = &mut self.out {
            // A console reader that went away must not stop the guest.
            if out.write_all(buf).is_err() {
                self.out = None;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(out) = &mut self.out {
            let _ = out.flush();
        }
        Ok(())
    }
}

/// The serial port as the VM uses it.
pub type SerialDevice = Serial<EventFdTrigger, NoEvents, ConsoleSink>;

/// The 16550's registers and receive FIFO, as a snapshot holds them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    registers: [u8; 9],
    in_buffer: Vec<u8>,
}

impl SerialSnapshot {
    /// Saves `serial`'s state.
    pub fn save(serial: &SerialDevice) -> Self {
        let s = serial.state();
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// A serial port in this state, raising `trigger` and writing to `out`.
    pub fn restore(&self, trigger: EventFdTrigger, out: ConsoleSink) -> io::Result<SerialDevice> {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            self.registers;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: self.in_buffer.clone(),
        };
        Serial::from_state(&state, trigger, NoEvents, out)
            .map_err(|e| io::Error::other(format!("restoring the serial port: {e:?}")))
    }

    /// Raises a restored port's interrupt if it has one pending (IIR bit 0
    /// clear), once there are vCPUs to take it.
    pub fn raise_if_pending(serial: &SerialDevice) -> io::Result<()> {
        if serial.state().interrupt_identification & 1 == 0 {
            serial.interrupt_evt().trigger()?;
        }
        Ok(())
    }
}

/// Port-I/O devices, shared by all vCPU threads.
#[derive(Debug)]
pub struct PioBus {
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Mutex<I8042Device<ResetTrigger>>,
}

impl PioBus {
    /// A bus with the serial console and the i8042.
    pub fn new(serial: Arc<Mutex<SerialDevice>>, reset: ResetTrigger) -> Self {
        PioBus {
            serial,
            i8042: Mutex::new(I8042Device::new(reset)),
        }
    }

    /// A guest `in`; ports without a device read as all ones.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + SERIAL_PORT_LEN).contains(&p)
                && data.len() == 1 =>
            {
                lock(&self.serial).read((p - SERIAL_PORT_BASE) as u8)
            }
            I8042_DATA_PORT | I8042_CMD_PORT if data.len() == 1 => {
                lock(&self.i8042).read((port - I8042_DATA_PORT) as u8)
            }
            _ => 0xff,
        };
        data.fill(value);
    }

    /// A guest `out`; writes to ports without a device are dropped.
    pub fn write(&self, port: u16, data: &[u8]) {
        let [value] = data else { return };
        match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + SERIAL_PORT_LEN).contains(&p) => {
                // Output errors are the sink's business; the guest goes on.
                let _ = lock(&self.serial).write((p - SERIAL_PORT_BASE) as u8, *value);
            }
            I8042_DATA_PORT | I8042_CMD_PORT => {
                let _ = lock(&self.i8042).write((port - I8042_DATA_PORT) as u8, *value);
            }
            _ => {}
        }
    }
}

/// A device mutex poisoned by a panicking vCPU thread still holds valid
/// device state; keep serving it rather than cascading the panic.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn bus() -> (PioBus, Shared, Arc<ExitSignal>, Arc<AtomicBool>) {
        let out = Shared::default();
        let panicked = Arc::new(AtomicBool::new(false));
        let sink = ConsoleSink::new(Some(Box::new(out.clone())), panicked.clone());
        let irq = EventFdTrigger(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let serial = Arc::new(Mutex::new(Serial::new(irq, sink)));
        let exit = Arc::new(ExitSignal::new().unwrap());
        (
            PioBus::new(serial, ResetTrigger(exit.clone())),
            out,
            exit,
            panicked,
        )
    }

    #[test]
    fn bytes_written_to_com1_reach_the_console() {
        let (bus, out, _, _) = bus();
        for b in b"hello\n" {
            bus.write(SERIAL_PORT_BASE, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hello\n");
    }

    #[test]
    fn i8042_reset_command_signals_a_reset() {
        let (bus, _, exit, _) = bus();
        assert!(exit.reason().is_none());
        bus.write(I8042_CMD_PORT, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn panic_lines_are_noticed() {
        let (bus, _, _, panicked) = bus();
        for b in b"[ 1.0] Kernel panic - not syncing: VFS\n" {
            bus.write(SERIAL_PORT_BASE, &[*b]);
        }
        assert!(panicked.load(Ordering::Acquire));
    }

    #[test]
    fn odd_sized_or_unknown_accesses_are_harmless() {
        let (bus, out, exit, _) = bus();
        let mut wide = [0u8; 4];
        bus.read(SERIAL_PORT_BASE, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        bus.write(SERIAL_PORT_BASE, &[1, 2]);
        bus.write(0x80, &[0x42]);
        let mut b = [0u8; 1];
        bus.read(0x1234, &mut b);
        assert_eq!(b, [0xff]);
        assert!(out.0.lock().unwrap().is_empty());
        assert!(exit.reason().is_none());
    }
}
