//! The agent's vsock listener.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

/// Listens on `port` for the host (any CID may connect; only the host can).
pub fn listen_port(port: u32) -> io::Result<OwnedFd> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &VsockAddr::new(libc_cid_any(), port))?;
    listen(&fd, Backlog::new(8).unwrap_or(Backlog::MAXCONN))?;
    Ok(fd)
}

const fn libc_cid_any() -> u32 {
    u32::MAX // VMADDR_CID_ANY
}

/// The next connection, as a file for read/write.
pub fn accept(listener: &OwnedFd) -> io::Result<File> {
    let fd = accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)?;
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Whether the guest has a virtio-vsock device (device ID 19).
pub fn device_present() -> bool {
    std::fs::read_dir("/sys/bus/virtio/devices")
        .map(|entries| {
            entries.flatten().any(|e| {
                std::fs::read_to_string(e.path().join("device"))
                    .is_ok_and(|id| id.trim() == "0x0013")
            })
        })
        .unwrap_or(false)
}
