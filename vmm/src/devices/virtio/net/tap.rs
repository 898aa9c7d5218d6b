//! Linux TAP devices: opened by name (created when missing, gone again when
//! the VMM closes it unless it was made persistent) or taken over as an fd a
//! caller opened. Frames carry the 12-byte virtio-net header, so checksum
//! and segmentation offloads pass through the host kernel untouched.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{NetBackend, HDR_LEN};
use super::{F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6};

/// Longest interface name (IFNAMSIZ less the NUL).
pub const MAX_NAME: usize = libc::IFNAMSIZ - 1;

/// An open TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    offloads: u64,
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains(['/', '\0', ' ']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a valid interface name (1 to {MAX_NAME} bytes)"),
        ));
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

impl Tap {
    /// Attaches to TAP interface `name`, creating it when it does not exist
    /// (which needs CAP_NET_ADMIN).
    pub fn open(name: &str) -> io::Result<Self> {
        let mut req = ifreq(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/net/tun: {e}")))?;
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes the ifreq we pass; checked.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        check(rc, &format!("attaching to tap {name}"))?;
        Self::configure(file)
    }

    /// Takes over a TAP fd a caller opened (with IFF_TAP, IFF_NO_PI and
    /// IFF_VNET_HDR).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        let file = File::from(fd);
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes into the ifreq we pass; checked.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut req) };
        check(rc, "the fd is not a TAP device (TUNGETIFF)")?;
        // SAFETY: TUNGETIFF filled in the flags member of the union.
        let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
        let want = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if flags & want != want {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the fd must be a TAP opened with IFF_TAP, IFF_NO_PI and IFF_VNET_HDR",
            ));
        }
        // SAFETY: fcntl on an fd we own; checked.
        let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        check(fl, "F_GETFL")?;
        // SAFETY: fcntl on an fd we own; checked.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) };
        check(rc, "F_SETFL")?;
        Self::configure(file)
    }

    fn configure(file: File) -> io::Result<Self> {
        let hdr = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads the int we pass; checked.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) };
        check(rc, "TUNSETVNETHDRSZ")?;
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes into the ifreq we pass; checked.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut req) };
        check(rc, "TUNGETIFF")?;
        let name: Vec<u8> = req
            .ifr_name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        let mut tap = Tap {
            file,
            name: String::from_utf8_lossy(&name).into_owned(),
            offloads: 0,
        };
        // Probe what this kernel's tap takes, then start with none until a
        // driver accepts them.
        let all = F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6;
        if tap.set_offload(all).is_ok() {
            tap.offloads = all;
        } else if tap.set_offload(F_GUEST_CSUM).is_ok() {
            tap.offloads = F_GUEST_CSUM;
        }
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TAP's fd, for a VMM that takes it over with [`Tap::from_fd`]
    /// (a runtime that opened it in another network namespace).
    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.file)
    }

    fn set_offload(&self, guest_features: u64) -> io::Result<()> {
        let mut flags: libc::c_uint = 0;
        if guest_features & F_GUEST_CSUM != 0 {
            flags |= libc::TUN_F_CSUM;
            if guest_features & F_GUEST_TSO4 != 0 {
                flags |= libc::TUN_F_TSO4;
            }
            if guest_features & F_GUEST_TSO6 != 0 {
                flags |= libc::TUN_F_TSO6;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value; checked.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        check(rc, "TUNSETOFFLOAD")
    }
}

impl NetBackend for Tap {
    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.file.write(frame).map(|_| ())
    }

    fn guest_offloads(&self) -> u64 {
        self.offloads
    }

    fn enable_offloads(&mut self, acked: u64) -> io::Result<()> {
        self.set_offload(acked & self.offloads)
    }
}
