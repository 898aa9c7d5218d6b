//! Terminal mode: the monitor opens a host pty, hands its master to the
//! caller over `--console-socket` (as runc does: one message whose payload
//! is the pty's name and whose SCM_RIGHTS carries the fd) and relays between
//! the slave side and the guest's terminal. The guest's pty does the line
//! discipline, so the host slave is raw: bytes pass through unchanged.

use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::Context;
use nix::pty::openpty;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};
use runvm_protocol::ConsoleSize;

/// Where a terminal's master goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// `--console-socket`: connect and send it (as runc does).
    Socket(std::path::PathBuf),
    /// A connected socket the caller handed down (a foreground `runvm run`
    /// that relays the terminal itself).
    Fd(RawFd),
}

/// Opens a pty, sends its master to `target` and returns the slave.
pub fn hand_over_to(target: &Target) -> anyhow::Result<File> {
    match target {
        Target::Socket(path) => hand_over(path),
        Target::Fd(fd) => {
            // SAFETY: the caller passed this descriptor to this process for
            // this use alone (see `fdpass::inherit_as`).
            let conn = UnixStream::from(unsafe { OwnedFd::from_raw_fd(*fd) });
            hand_over_on(&conn)
        }
    }
}

/// A foreground terminal session: this process's terminal (raw) relayed to
/// and from `master` until [`Attached::finish`].
pub struct Attached {
    _raw: Option<RawGuard>,
    output: std::thread::JoinHandle<()>,
    master: File,
}

impl Attached {
    /// Starts relaying stdin to `master` and `master` to stdout.
    pub fn start(master: File) -> anyhow::Result<Attached> {
        use std::io::{Read, Write};
        let stdin = std::io::stdin();
        let raw = if nix::unistd::isatty(stdin.as_fd()).unwrap_or(false) {
            copy_size(stdin.as_fd(), master.as_fd());
            Some(make_raw(stdin.as_fd())?)
        } else {
            None
        };
        let mut to_guest = master.try_clone()?;
        vmm::threads::named("tty-in").spawn(move || {
            let mut buf = [0u8; 4096];
            let mut input = std::io::stdin().lock();
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 || to_guest.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        })?;
        let mut from_guest = master.try_clone()?;
        let output = vmm::threads::named("tty-out").spawn(move || {
            let mut buf = [0u8; 4096];
            let mut out = std::io::stdout();
            // EIO once the last slave fd is gone.
            while let Ok(n) = from_guest.read(&mut buf) {
                if n == 0 || out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    return;
                }
            }
        })?;
        Ok(Attached {
            _raw: raw,
            output,
            master,
        })
    }

    /// The master, to resize on SIGWINCH.
    pub fn master(&self) -> &File {
        &self.master
    }

    /// Lets trailing output drain (at most `limit`), then restores the
    /// terminal.
    pub fn finish(self, limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        while !self.output.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Opens a pty, sends its master to `socket` and returns the slave.
pub fn hand_over(socket: &Path) -> anyhow::Result<File> {
    let conn = vmm::unix_path::connect(socket)
        .with_context(|| format!("cannot connect to console socket {}", socket.display()))?;
    hand_over_on(&conn).with_context(|| format!("cannot send the pty to {}", socket.display()))
}

/// Opens a pty, sends its master on `conn` and returns the slave.
pub fn hand_over_on(conn: &UnixStream) -> anyhow::Result<File> {
    let pty = openpty(None, None).context("cannot open a pty")?;
    let mut t = tcgetattr(&pty.slave).context("tcgetattr")?;
    cfmakeraw(&mut t);
    tcsetattr(&pty.slave, SetArg::TCSANOW, &t).context("tcsetattr")?;
    let name = nix::unistd::ttyname(pty.slave.as_fd()).context("ttyname")?;
    let fds = [pty.master.as_raw_fd()];
    sendmsg::<UnixAddr>(
        conn.as_raw_fd(),
        &[IoSlice::new(name.as_os_str().as_encoded_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .context("sendmsg")?;
    Ok(File::from(pty.slave))
}

/// Receives a pty master sent by [`hand_over_on`].
pub fn receive(conn: &UnixStream) -> anyhow::Result<File> {
    let mut name = [0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut name)];
    let msg = recvmsg::<UnixAddr>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .context("receiving the terminal")?;
    let mut master = None;
    for c in msg.cmsgs().context("receiving the terminal")? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: SCM_RIGHTS gave this process a new descriptor
                // that nothing else owns.
                let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                master.get_or_insert(f);
            }
        }
    }
    master.context("no terminal came (the monitor refused or hung up)")
}

/// Makes the terminal on `fd` raw until the returned guard drops (a
/// foreground terminal session: the guest's pty does the line discipline).
pub fn make_raw(fd: BorrowedFd<'_>) -> anyhow::Result<RawGuard> {
    let saved = tcgetattr(fd).context("tcgetattr")?;
    let mut raw = saved.clone();
    cfmakeraw(&mut raw);
    tcsetattr(fd, SetArg::TCSANOW, &raw).context("tcsetattr")?;
    let fd = fd.try_clone_to_owned()?;
    Ok(RawGuard { fd, saved })
}

/// Restores a terminal's settings when dropped.
pub struct RawGuard {
    fd: OwnedFd,
    saved: Termios,
}

impl Drop for RawGuard {
    fn drop(&mut self) {
        let _ = tcsetattr(&self.fd, SetArg::TCSANOW, &self.saved);
    }
}

/// Copies the size of the terminal on `from` to the one on `to`.
pub fn copy_size(from: BorrowedFd<'_>, to: BorrowedFd<'_>) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we pass.
    let got = unsafe { libc::ioctl(from.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    if got == 0 {
        // SAFETY: TIOCSWINSZ reads the winsize we pass.
        unsafe { libc::ioctl(to.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    }
}

/// The terminal's size, if it has been set.
pub fn size(tty: &File) -> Option<ConsoleSize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we pass.
    let r = unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(ConsoleSize {
        height: ws.ws_row,
        width: ws.ws_col,
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn a_master_sent_on_a_connection_is_received() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut slave = hand_over_on(&a).unwrap();
        let mut master = receive(&b).unwrap();
        slave.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        master.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
        copy_size(master.as_fd(), master.as_fd());
        drop(a);
        assert!(receive(&b).is_err(), "a hang-up is no terminal");
    }

    #[test]
    fn the_master_reaches_the_console_socket_and_bytes_pass_raw() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut slave = hand_over(&path).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let mut name = [0u8; 256];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut name)];
        let msg = recvmsg::<UnixAddr>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .unwrap();
        let fd = match msg.cmsgs().unwrap().next() {
            Some(ControlMessageOwned::ScmRights(fds)) => fds[0],
            other => panic!("no fd: {other:?}"),
        };
        let n = msg.bytes;
        assert!(String::from_utf8_lossy(&name[..n]).starts_with("/dev/pts/"));
        // SAFETY: SCM_RIGHTS gave this process a new descriptor it owns.
        let mut master = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        // Raw: no echo, no CR translation, ^D is a byte.
        master.write_all(b"ab\n\x04").unwrap();
        let mut got = [0u8; 4];
        slave.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ab\n\x04");
        slave.write_all(b"out\n").unwrap();
        let mut got = [0u8; 4];
        master.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"out\n");
        assert_eq!(size(&slave), None);
        let ws = libc::winsize {
            ws_row: 40,
            ws_col: 100,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads the winsize we pass.
        let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0);
        assert_eq!(
            size(&slave),
            Some(ConsoleSize {
                height: 40,
                width: 100
            })
        );
    }
}
