//! The host side of the vsock device: where host-initiated connections come
//! from and where guest-initiated ones go. Behind a trait so the muxer can
//! be driven in tests with socket pairs instead of a filesystem.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

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
    listener: UnixListener,
}

impl UnixHost {
    /// Binds `path` (which must not exist yet).
    pub fn bind(path: &Path) -> io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(UnixHost {
            path: path.to_owned(),
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
        let mut name = self.path.clone().into_os_string();
        name.push(format!("_{port}"));
        connect_nonblocking(Path::new(&name))
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
