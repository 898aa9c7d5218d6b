//! Signal names and numbers as `runvm kill` takes them, and the monitor's
//! signal forwarding.

use std::str::FromStr;

use anyhow::{bail, Context};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// `TERM`, `SIGTERM`, `term` or `15` to a signal number (1 to 64; the
/// real-time signals by number only).
pub fn parse(s: &str) -> anyhow::Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        bail!("invalid signal number {n}: signals are 1 to 64");
    }
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name)
        .map(|sig| sig as i32)
        .with_context(|| format!("invalid signal {s:?}"))
}

/// Signals the monitor forwards to the container's process instead of
/// dying of them (as runc's foreground `run` does).
pub const FORWARDED: [Signal; 7] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Blocks [`FORWARDED`] in the calling thread (threads started later inherit
/// the mask) and returns a descriptor that reads them.
pub fn forwarded_signalfd() -> anyhow::Result<SignalFd> {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.thread_block().context("blocking signals")?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC).context("signalfd")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_parse_like_runc() {
        for (s, n) in [
            ("TERM", 15),
            ("SIGKILL", 9),
            ("kill", 9),
            ("9", 9),
            ("sigusr1", 10),
            ("64", 64),
        ] {
            assert_eq!(parse(s).unwrap(), n, "{s}");
        }
        for bad in ["", "0", "65", "-1", "SIGNOPE", "TERM9"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
