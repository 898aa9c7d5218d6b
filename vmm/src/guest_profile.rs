//! Where the guest spends its time (`runvm-vmm --guest-profile FILE`): a
//! thread kicks every vCPU out of KVM_RUN once per [`PERIOD`] and each vCPU
//! records its instruction pointer before it goes back in. Kernel addresses
//! map to functions with the guest kernel's symbols (`nm -n vmlinux`); the
//! boot benchmark prints such a summary.
//!
//! This samples wall time, not guest CPU time: a vCPU stuck in the host
//! (a page fault the host handles, a device exit) is sampled where the guest
//! stopped, which is what a boot-time profile needs. A halted vCPU is sampled
//! at its next exit, so idle time shows as few samples rather than as the
//! idle loop.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::sync::Mutex;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use crate::pause::VmControl;

const CR0_PE: u64 = 1;

/// How often every vCPU is kicked for a sample.
pub const PERIOD: Duration = Duration::from_millis(2);

/// The first line of a profile file; each line after it is
/// `VCPU MICROSECONDS MODE RIP` (decimal, decimal, one letter of [`Mode`],
/// hex without a prefix), the time counted from when the vCPUs started.
pub const HEADER: &str = "# runvm-vmm guest profile: vcpu elapsed_us mode rip";

/// What the vCPU was running when sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Protected or long mode at privilege level 0 (`k`).
    Kernel,
    /// Privilege level 3 (`u`).
    User,
    /// Real mode (`r`): a vCPU the guest has not started yet.
    Real,
}

impl Mode {
    fn letter(self) -> char {
        match self {
            Mode::Kernel => 'k',
            Mode::User => 'u',
            Mode::Real => 'r',
        }
    }

    fn from_letter(s: &str) -> Option<Self> {
        match s {
            "k" => Some(Mode::Kernel),
            "u" => Some(Mode::User),
            "r" => Some(Mode::Real),
            _ => None,
        }
    }
}

/// One sample: which vCPU, when, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// The vCPU's index.
    pub vcpu: usize,
    /// Since the vCPUs started.
    pub elapsed: Duration,
    /// The privilege level or mode it ran in.
    pub mode: Mode,
    /// The guest's instruction pointer.
    pub rip: u64,
}

/// Samples collected while a VM runs, written once it has ended.
#[derive(Debug)]
pub struct GuestProfile {
    samples: Mutex<Vec<Sample>>,
    start: Instant,
}

impl GuestProfile {
    /// An empty profile; its times count from now.
    pub fn new() -> Self {
        Self {
            samples: Mutex::new(Vec::new()),
            start: Instant::now(),
        }
    }

    /// Called by a vCPU thread after a kick brought it out of KVM_RUN.
    pub(crate) fn record(&self, vcpu: usize, fd: &VcpuFd) {
        // A vCPU that cannot report its registers just gives no sample.
        if let (Ok(regs), Ok(sregs)) = (fd.get_regs(), fd.get_sregs()) {
            let mode = if sregs.cr0 & CR0_PE == 0 {
                Mode::Real
            } else if sregs.cs.selector & 3 == 3 {
                Mode::User
            } else {
                Mode::Kernel
            };
            let sample = Sample {
                vcpu,
                elapsed: self.start.elapsed(),
                mode,
                rip: regs.rip,
            };
            self.samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sample);
        }
    }

    /// Kicks the VM's vCPUs every [`PERIOD`] until the VM stops running.
    pub(crate) fn start_kicking(control: VmControl) -> io::Result<JoinHandle<()>> {
        crate::threads::named("guest-profile").spawn(move || {
            while control.kick_all() {
                thread::sleep(PERIOD);
            }
        })
    }

    /// Writes the samples, in the order taken, to `out` (opened by the
    /// caller before the VM boots, so that a path that cannot be written
    /// fails at once).
    pub fn write_to(&self, out: File) -> io::Result<()> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        write_samples(BufWriter::new(out), &samples)
    }
}

impl Default for GuestProfile {
    fn default() -> Self {
        Self::new()
    }
}

fn write_samples(mut out: impl Write, samples: &[Sample]) -> io::Result<()> {
    writeln!(out, "{HEADER}")?;
    for s in samples {
        writeln!(
            out,
            "{} {} {} {:x}",
            s.vcpu,
            s.elapsed.as_micros(),
            s.mode.letter(),
            s.rip
        )?;
    }
    out.flush()
}

/// Reads a profile written by [`GuestProfile::write_to`].
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err("not a runvm-vmm guest profile (its first line differs)".into());
    }
    lines
        .enumerate()
        .map(|(i, line)| {
            let bad = || {
                format!(
                    "line {}: expected `VCPU MICROSECONDS MODE RIP`: {line:?}",
                    i + 2
                )
            };
            let f: Vec<&str> = line.split(' ').collect();
            let [vcpu, us, mode, rip] = f[..] else {
                return Err(bad());
            };
            Ok(Sample {
                vcpu: vcpu.parse().map_err(|_| bad())?,
                elapsed: Duration::from_micros(us.parse().map_err(|_| bad())?),
                mode: Mode::from_letter(mode).ok_or_else(bad)?,
                rip: u64::from_str_radix(rip, 16).map_err(|_| bad())?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_profile_reads_back_sample_for_sample() {
        let samples = vec![
            Sample {
                vcpu: 0,
                elapsed: Duration::from_micros(2_013),
                mode: Mode::Kernel,
                rip: 0xffff_ffff_8190_2092,
            },
            Sample {
                vcpu: 1,
                elapsed: Duration::from_micros(4_100),
                mode: Mode::User,
                rip: 0x7f23_7eba_ac94,
            },
            Sample {
                vcpu: 1,
                elapsed: Duration::from_micros(4_200),
                mode: Mode::Real,
                rip: 0xfff0,
            },
        ];
        let mut out = Vec::new();
        write_samples(&mut out, &samples).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            format!("{HEADER}\n0 2013 k ffffffff81902092\n1 4100 u 7f237ebaac94\n1 4200 r fff0\n")
        );
        assert_eq!(parse(&text).unwrap(), samples);
    }

    #[test]
    fn a_file_that_is_not_a_profile_is_refused_with_the_line() {
        assert!(parse("0 1 k ff\n").unwrap_err().contains("first line"));
        let err = parse(&format!("{HEADER}\n0 1 k ff\n0 2 k\n")).unwrap_err();
        assert!(err.starts_with("line 3:"), "{err}");
        let err = parse(&format!("{HEADER}\n0 1 k zz\n")).unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
        let err = parse(&format!("{HEADER}\n0 1 x ff\n")).unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
    }
}
