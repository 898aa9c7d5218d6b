//! What the agent costs, measured in the guest: how long after the kernel
//! handed over the first process starts, and the agent's memory.

use std::sync::atomic::{AtomicBool, Ordering};

/// Milliseconds since the guest kernel started (CLOCK_BOOTTIME).
pub fn boottime_ms() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as f64 * 1000.0 + t.tv_nsec() as f64 / 1e6)
        .unwrap_or(0.0)
}

/// `VmRSS` and `VmHWM` of this process, in KiB, from `status`
/// (`/proc/self/status`'s text).
pub fn rss_kib(status: &str) -> (u64, u64) {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The agent's boot marks, reported once, when the first process starts.
#[derive(Debug)]
pub struct BootFigures {
    /// When the agent began (boottime ms): the kernel's handover.
    pub started_ms: f64,
    /// When it listened for the host.
    pub listening_ms: f64,
    reported: AtomicBool,
}

impl BootFigures {
    /// Marks taken by the agent as the guest's init.
    pub fn new(started_ms: f64, listening_ms: f64) -> Self {
        BootFigures {
            started_ms,
            listening_ms,
            reported: AtomicBool::new(false),
        }
    }

    /// The report line for a first process asked for at `requested_ms`
    /// and running its program at `exec_ms`; `None` after the first.
    pub fn report(&self, requested_ms: f64, exec_ms: f64, status: &str) -> Option<String> {
        if self.reported.swap(true, Ordering::Relaxed) {
            return None;
        }
        let (rss, hwm) = rss_kib(status);
        let waited = requested_ms - self.listening_ms;
        Some(format!(
            "runvm-agent: figures: handover to the first process's program {:.1} ms \
             (agent setup {:.1} ms, waiting for the host {:.1} ms, start {:.1} ms); \
             agent RSS {rss} KiB, peak {hwm} KiB",
            exec_ms - self.started_ms,
            self.listening_ms - self.started_ms,
            waited,
            exec_ms - requested_ms,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_splits_the_time_and_comes_once() {
        let f = BootFigures::new(1000.0, 1040.0);
        let status = "Name:\tinit\nVmHWM:\t    2100 kB\nVmRSS:\t    1800 kB\n";
        let line = f.report(1500.0, 1503.5, status).unwrap();
        assert_eq!(
            line,
            "runvm-agent: figures: handover to the first process's program 503.5 ms \
             (agent setup 40.0 ms, waiting for the host 460.0 ms, start 3.5 ms); \
             agent RSS 1800 KiB, peak 2100 KiB"
        );
        assert_eq!(f.report(2000.0, 2001.0, status), None);
    }

    #[test]
    fn boottime_moves_forward() {
        let a = boottime_ms();
        let b = boottime_ms();
        assert!(a > 0.0 && b >= a);
    }
}
