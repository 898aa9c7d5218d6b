//! The pipe on which the monitor tells `create` that the container is
//! created, so that `create` returns as soon as it is rather than at its
//! next look at the state file.
//!
//! The state file stays the truth (`create` still reads the status there
//! and still notices a monitor that died): the pipe only wakes `create`
//! early. The monitor writes one byte once the `created` state is saved;
//! its end closing without that byte (the monitor failed or died) wakes
//! `create` too, which then finds out why the usual way.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use anyhow::Context;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// The descriptor number the monitor finds its end on (3 is the console's).
pub const MONITOR_FD: RawFd = 4;
/// How often `create` looks at the state once the pipe is closed.
const FALLBACK_POLL: Duration = Duration::from_millis(20);

/// What [`ReadyPipe::wait`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// The monitor says the container is created.
    Ready,
    /// The monitor's end closed without a word (it failed or died), or the
    /// pipe could not be read: from now on waits only sleep.
    Closed,
    /// Nothing within the limit.
    Timeout,
}

/// `create`'s end.
#[derive(Debug)]
pub struct ReadyPipe {
    read: Option<File>,
}

/// A new pipe: `create`'s end and the end to hand to the monitor (both
/// close-on-exec; `fdpass::inherit_as` places the latter at [`MONITOR_FD`]).
pub fn pair() -> anyhow::Result<(ReadyPipe, OwnedFd)> {
    let (read, write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).context("cannot create the monitor's ready pipe")?;
    Ok((
        ReadyPipe {
            read: Some(File::from(read)),
        },
        write,
    ))
}

impl ReadyPipe {
    /// Waits up to `limit` for the monitor's word.
    pub fn wait(&mut self, limit: Duration) -> Woken {
        let Some(read) = self.read.as_mut() else {
            std::thread::sleep(limit.min(FALLBACK_POLL));
            return Woken::Closed;
        };
        let ms = u16::try_from(limit.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(read.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) => return Woken::Timeout,
            Err(nix::errno::Errno::EINTR) => return Woken::Timeout,
            Ok(_) | Err(_) => {}
        }
        let mut byte = [0u8; 1];
        match read.read(&mut byte) {
            Ok(1) => Woken::Ready,
            // EOF or an error: the state file and the child tell the rest.
            _ => {
                self.read = None;
                Woken::Closed
            }
        }
    }
}

/// The monitor's end, taken over from the inherited descriptor `fd`; it is
/// made close-on-exec so that nothing the monitor starts holds it open.
pub fn monitor_end(fd: RawFd) -> anyhow::Result<File> {
    // SAFETY: F_GETFD only reads the flags of a descriptor number; an
    // unused number fails with EBADF and is reported, not adopted.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("--ready-fd {fd} is not an open descriptor"));
    }
    // SAFETY: `fd` is open (checked above) and was passed to this process
    // for it alone to own; nothing else in the monitor refers to it.
    let file = unsafe { File::from_raw_fd(fd) };
    fcntl(&file, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .with_context(|| format!("cannot set close-on-exec on --ready-fd {fd}"))?;
    Ok(file)
}

/// Tells `create` the container is created (the state is saved); a
/// `create` that is gone already is not an error.
pub fn signal(mut end: File) {
    let _ = end.write_all(b"1");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_monitors_word_wakes_the_waiter_as_ready() {
        let (mut pipe, write) = pair().unwrap();
        signal(File::from(write));
        assert_eq!(pipe.wait(Duration::from_secs(30)), Woken::Ready);
    }

    #[test]
    fn a_closed_end_wakes_the_waiter_as_closed_and_later_waits_only_sleep() {
        let (mut pipe, write) = pair().unwrap();
        drop(write);
        assert_eq!(pipe.wait(Duration::from_secs(30)), Woken::Closed);
        assert!(pipe.read.is_none());
        assert_eq!(pipe.wait(Duration::from_millis(1)), Woken::Closed);
    }

    #[test]
    fn silence_is_a_timeout() {
        let (mut pipe, _write) = pair().unwrap();
        assert_eq!(pipe.wait(Duration::from_millis(5)), Woken::Timeout);
    }

    #[test]
    fn the_monitor_refuses_a_descriptor_that_is_not_open() {
        let e = monitor_end(987_654).unwrap_err();
        assert!(format!("{e:#}").contains("not an open descriptor"), "{e:#}");
    }

    #[test]
    fn the_monitors_end_is_made_close_on_exec() {
        let (_pipe, write) = pair().unwrap();
        let raw = write.as_raw_fd();
        fcntl(&write, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        std::mem::forget(write);
        let end = monitor_end(raw).unwrap();
        let flags = fcntl(&end, FcntlArg::F_GETFD).unwrap();
        assert!(FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC));
    }
}
