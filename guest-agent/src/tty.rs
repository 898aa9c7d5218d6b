//! Terminals for processes started with `terminal: true`: a pseudo-terminal
//! pair whose slave side becomes the process's stdio and controlling
//! terminal, and whose master side the agent relays and resizes.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use runvm_protocol::ConsoleSize;

/// What a terminal starts as when the host gives no size.
pub const DEFAULT_SIZE: ConsoleSize = ConsoleSize {
    height: 24,
    width: 80,
};

/// Both sides of a new pseudo-terminal, close-on-exec.
#[derive(Debug)]
pub struct Pty {
    /// The agent's side.
    pub master: OwnedFd,
    /// The process's side.
    pub slave: OwnedFd,
}

fn winsize(size: ConsoleSize) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: size.height,
        ws_col: size.width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

fn cloexec(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

/// Opens a pseudo-terminal of `size`.
pub fn open(size: ConsoleSize) -> io::Result<Pty> {
    let pty = nix::pty::openpty(&winsize(size), None)?;
    // Only the process's stdio (dup'ed by the spawn) may carry the slave
    // side into the container; the master never goes there.
    cloexec(&pty.master)?;
    cloexec(&pty.slave)?;
    Ok(Pty {
        master: pty.master,
        slave: pty.slave,
    })
}

/// Resizes the terminal whose master side is `master`; the kernel sends
/// SIGWINCH to its foreground process group.
pub fn resize(master: &OwnedFd, size: ConsoleSize) -> io::Result<()> {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer passed.
    let rc = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCSWINSZ,
            std::ptr::from_ref(&ws),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_terminal_has_the_requested_size_and_can_be_resized() {
        let pty = open(ConsoleSize {
            height: 30,
            width: 100,
        })
        .unwrap();
        let size = |fd: &OwnedFd| {
            let mut ws = winsize(DEFAULT_SIZE);
            // SAFETY: TIOCGWINSZ writes one winsize into the pointer passed.
            let rc = unsafe {
                libc::ioctl(
                    fd.as_raw_fd(),
                    libc::TIOCGWINSZ,
                    std::ptr::from_mut(&mut ws),
                )
            };
            assert_eq!(rc, 0);
            (ws.ws_row, ws.ws_col)
        };
        assert_eq!(size(&pty.slave), (30, 100));
        resize(
            &pty.master,
            ConsoleSize {
                height: 50,
                width: 132,
            },
        )
        .unwrap();
        assert_eq!(size(&pty.slave), (50, 132));
    }
}
