//! AF_VSOCK stream sockets over libc (std has none).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::Context;

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all zeroes is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

/// linux/vm_sockets.h (libc does not export it); a timeval on 64-bit.
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

const ADDR_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;

/// A listening socket.
pub struct Listener(OwnedFd);

impl Listener {
    /// Listens on `port` for any CID.
    pub fn bind(port: u32) -> anyhow::Result<Self> {
        let fd = socket().context("vsock socket")?;
        let a = addr(libc::VMADDR_CID_ANY, port);
        // SAFETY: `a` is a valid sockaddr_vm of ADDR_LEN bytes.
        cvt(unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&a).cast(), ADDR_LEN) })
            .with_context(|| format!("bind vsock port {port}"))?;
        // SAFETY: plain syscall on a socket we own.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 128) }).context("listen")?;
        Ok(Listener(fd))
    }

    /// The next connection.
    pub fn accept(&self) -> anyhow::Result<Stream> {
        // SAFETY: a null address is allowed; the result is checked.
        let fd = cvt(unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        })
        .context("accept")?;
        // SAFETY: accept4 returned a new descriptor we now own.
        Ok(Stream(File::from(unsafe { OwnedFd::from_raw_fd(fd) })))
    }
}

/// A connected stream.
pub struct Stream(File);

impl Stream {
    /// Connects to `port` on the host (CID 2).
    pub fn connect_host(port: u32) -> anyhow::Result<Self> {
        let fd = socket().context("vsock socket")?;
        // The kernel gives up on a connect after 2 s; under nested emulation
        // with many connections in flight the answer can take longer.
        let timeout = libc::timeval {
            tv_sec: 120,
            tv_usec: 0,
        };
        // SAFETY: `timeout` is a valid timeval of the length passed.
        cvt(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::AF_VSOCK,
                SO_VM_SOCKETS_CONNECT_TIMEOUT,
                std::ptr::from_ref(&timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })
        .context("setting the vsock connect timeout")?;
        let a = addr(libc::VMADDR_CID_HOST, port);
        // SAFETY: `a` is a valid sockaddr_vm of ADDR_LEN bytes.
        cvt(unsafe { libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&a).cast(), ADDR_LEN) })
            .with_context(|| format!("connect to host vsock port {port}"))?;
        Ok(Stream(File::from(fd)))
    }

    /// A second handle on the same socket.
    pub fn try_clone(&self) -> anyhow::Result<Self> {
        Ok(Stream(self.0.try_clone().context("dup")?))
    }

    /// Half-closes: the peer reads EOF, we can still read.
    pub fn shutdown_write(&self) -> anyhow::Result<()> {
        // SAFETY: plain syscall on a socket we own.
        cvt(unsafe { libc::shutdown(self.0.as_raw_fd(), libc::SHUT_WR) }).context("shutdown")?;
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
