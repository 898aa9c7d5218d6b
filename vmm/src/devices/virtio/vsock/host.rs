//! The host side of the vsock device: where host-initiated connections come
//! from and where guest-initiated ones go. Behind a trait so the muxer can
//! be driven in tests with socket pairs instead of a filesystem.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::unix_path::SocketPath;

/// Host end of the device.
pub trait VsockHost: Send {
    /// A descriptor that polls readable while [`VsockHost::accept`] has a
    /// connection to hand out.
    fn listen_fd(&self) -> RawFd;
    /// The next host-initiated connection, `None` when there is none now.
    fn accept(&mut self) -> io::Result<Option<UnixStream>>;
    /// A connection for a guest that connects to host port `port`.
    fn connect(&mut self, port: u32) -> io::Result<UnixStream>;
}

/// Firecracker-style hybrid vsock: host programs connect to `path` and
/// write `CONNECT <port>\n`; guest connections to port P reach `path_P`.
#[derive(Debug)]
pub struct UnixHost {
    path: PathBuf,
    /// `path` in a form short enough for `sun_path`, also for `path_P`.
    reachable: SocketPath,
    listener: UnixListener,
}

impl UnixHost {
    /// Binds `path` (which must not exist yet), however long it is.
    pub fn bind(path: &Path) -> io::Result<Self> {
        let reachable = SocketPath::new(path)?;
        let listener = UnixListener::bind(reachable.as_path())?;
        listener.set_nonblocking(true)?;
        Ok(UnixHost {
            path: path.to_owned(),
            reachable,
            listener,
        })
    }

    /// The socket host programs connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl VsockHost for UnixHost {
    fn listen_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    fn accept(&mut self) -> io::Result<Option<UnixStream>> {
        match self.listener.accept() {
            Ok((s, _)) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn connect(&mut self, port: u32) -> io::Result<UnixStream> {
        connect_nonblocking(&self.reachable.with_suffix(&format!("_{port}")))
    }
}

/// Connects without blocking: a host listener whose backlog is full refuses
/// the guest (EAGAIN) instead of stalling every other connection.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    let stream = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un and the length is its size.
    let rc = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            std::ptr::from_ref(&addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_deeper_than_sun_path_serves_both_directions() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let mut host = UnixHost::bind(&path).unwrap();
        assert_eq!(host.path(), path);

        // Host-initiated: a program connects to the long path.
        let _client = crate::unix_path::connect(&path).unwrap();
        let mut accepted = None;
        for _ in 0..100 {
            accepted = host.accept().unwrap();
            if accepted.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(accepted.is_some(), "the connection was not accepted");

        // Guest-initiated to port 1024: reaches `<path>_1024`.
        let listener = crate::unix_path::bind(&dir.join("v.sock_1024")).unwrap();
        let _to_host = host.connect(1024).unwrap();
        assert!(listener.accept().is_ok());

        drop(host);
        assert!(!path.exists(), "the socket goes with the device");
    }
}
