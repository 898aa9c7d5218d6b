//! [`NetSys`] on Linux: the classic interface and routing ioctls on an
//! AF_INET socket (no netlink library in a static PID 1 for four calls).

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use super::{netmask, NetSys, Route};
use crate::os_err::os_err;

/// The guest's real network stack; resolv.conf goes to `resolv_conf`.
#[derive(Debug)]
pub struct LinuxNet {
    sock: OwnedFd,
    resolv_conf: PathBuf,
}

/// The kernel's `struct rtentry` (glibc's libc crate does not export it).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data;
    // the kernel reads the former through the latter.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

impl LinuxNet {
    /// Opens the control socket.
    pub fn new(resolv_conf: PathBuf) -> io::Result<Self> {
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        os_err(fd)?;
        Ok(LinuxNet {
            // SAFETY: `fd` was just created and is owned by nobody else.
            sock: unsafe { OwnedFd::from_raw_fd(fd) },
            resolv_conf,
        })
    }

    fn ifreq(ifname: &str) -> io::Result<libc::ifreq> {
        if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {ifname:?}"),
            ));
        }
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(ifname.as_bytes()) {
            *d = *s as libc::c_char;
        }
        Ok(req)
    }

    fn ioctl(&self, request: libc::Ioctl, req: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: every request used here reads or writes one ifreq.
        os_err(unsafe { libc::ioctl(self.sock.as_raw_fd(), request, std::ptr::from_mut(req)) })
    }
}

impl NetSys for LinuxNet {
    fn interface_by_mac(&self, mac: &str) -> io::Result<String> {
        for entry in fs::read_dir("/sys/class/net")? {
            let entry = entry?;
            let addr = fs::read_to_string(entry.path().join("address")).unwrap_or_default();
            if addr.trim().eq_ignore_ascii_case(mac) {
                return Ok(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no interface has this MAC address",
        ))
    }

    fn set_mtu(&self, ifname: &str, mtu: u32) -> io::Result<()> {
        let mut req = Self::ifreq(ifname)?;
        req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
        self.ioctl(libc::SIOCSIFMTU, &mut req)
    }

    fn set_ipv4(&self, ifname: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut req = Self::ifreq(ifname)?;
        req.ifr_ifru.ifru_addr = sockaddr(addr);
        self.ioctl(libc::SIOCSIFADDR, &mut req)?;
        let mut req = Self::ifreq(ifname)?;
        req.ifr_ifru.ifru_netmask = sockaddr(netmask(prefix));
        self.ioctl(libc::SIOCSIFNETMASK, &mut req)
    }

    fn set_up(&self, ifname: &str) -> io::Result<()> {
        let mut req = Self::ifreq(ifname)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled in the flags member.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut req)
    }

    fn add_route(&self, route: &Route) -> io::Result<()> {
        let mut dev = route
            .ifname
            .as_deref()
            .map(|n| {
                std::ffi::CString::new(n)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))
            })
            .transpose()?
            .map(std::ffi::CString::into_bytes_with_nul);
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr(route.dest),
            rt_gateway: sockaddr(route.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)),
            rt_genmask: sockaddr(netmask(route.prefix)),
            rt_flags: libc::RTF_UP
                | if route.gateway.is_some() {
                    libc::RTF_GATEWAY
                } else {
                    0
                },
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: dev
                .as_mut()
                .map_or(std::ptr::null_mut(), |d| d.as_mut_ptr().cast()),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        // SAFETY: SIOCADDRT reads one rtentry; rt_dev, when set, points at
        // a NUL-terminated name that outlives the call.
        let rc = unsafe {
            libc::ioctl(
                self.sock.as_raw_fd(),
                libc::SIOCADDRT,
                std::ptr::from_mut(&mut rt),
            )
        };
        match os_err(rc) {
            // The kernel already made the route (a connected network).
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
    }

    fn write_resolv_conf(&self, contents: &str) -> io::Result<()> {
        if let Some(dir) = self.resolv_conf.parent() {
            fs::create_dir_all(dir)?;
        }
        // A symlink (systemd-resolved images) must not redirect the write.
        let _ = fs::remove_file(&self.resolv_conf);
        fs::write(&self.resolv_conf, contents)
    }
}
