//! [`NetSys`] on Linux: the classic interface and routing ioctls on an
//! AF_INET socket, and their IPv6 forms on an AF_INET6 one (no netlink
//! library in a static PID 1 for a handful of calls).

use std::fs;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;

use super::{netmask, NetSys, Route};
use crate::os_err::os_err;

/// The guest's real network stack; resolv.conf goes to `resolv_conf`.
#[derive(Debug)]
pub struct LinuxNet {
    sock: OwnedFd,
    /// Opened on first use: most containers have no IPv6 address.
    sock6: OnceLock<OwnedFd>,
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

/// The kernel's `struct in6_rtmsg` (the libc crate's has private fields).
#[repr(C)]
struct In6RtMsg {
    rtmsg_dst: libc::in6_addr,
    rtmsg_src: libc::in6_addr,
    rtmsg_gateway: libc::in6_addr,
    rtmsg_type: u32,
    rtmsg_dst_len: u16,
    rtmsg_src_len: u16,
    rtmsg_metric: u32,
    rtmsg_info: libc::c_ulong,
    rtmsg_flags: u32,
    rtmsg_ifindex: libc::c_int,
}

fn in6_addr(ip: Ipv6Addr) -> libc::in6_addr {
    libc::in6_addr {
        s6_addr: ip.octets(),
    }
}

/// A datagram socket of `family`, close-on-exec.
fn control_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    os_err(fd)?;
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `route`'s gateway as an address of its destination's family (`family`
/// picks it); one of the other family is refused.
fn gateway<T>(route: &Route, family: impl Fn(IpAddr) -> Option<T>) -> io::Result<Option<T>> {
    route
        .gateway
        .map(|g| {
            family(g).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("gateway {g} is not of the route's address family"),
                )
            })
        })
        .transpose()
}

fn ifindex(ifname: &str) -> io::Result<libc::c_int> {
    let name = std::ffi::CString::new(ifname)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a name"))?;
    // SAFETY: reads a NUL-terminated name that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    libc::c_int::try_from(index).map_err(|_| io::Error::other("interface index out of range"))
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
        Ok(LinuxNet {
            sock: control_socket(libc::AF_INET)?,
            sock6: OnceLock::new(),
            resolv_conf,
        })
    }

    fn sock6(&self) -> io::Result<&OwnedFd> {
        if let Some(s) = self.sock6.get() {
            return Ok(s);
        }
        let s = control_socket(libc::AF_INET6)?;
        Ok(self.sock6.get_or_init(|| s))
    }

    fn add_route6(&self, dest: Ipv6Addr, route: &Route) -> io::Result<()> {
        let gateway = gateway(route, |ip| match ip {
            IpAddr::V6(g) => Some(g),
            IpAddr::V4(_) => None,
        })?;
        let mut rt = In6RtMsg {
            rtmsg_dst: in6_addr(dest),
            rtmsg_src: in6_addr(Ipv6Addr::UNSPECIFIED),
            rtmsg_gateway: in6_addr(gateway.unwrap_or(Ipv6Addr::UNSPECIFIED)),
            // 0: the kernel's default (a unicast route, metric 1024).
            rtmsg_type: 0,
            rtmsg_dst_len: u16::from(route.prefix),
            rtmsg_src_len: 0,
            rtmsg_metric: 0,
            rtmsg_info: 0,
            rtmsg_flags: u32::from(libc::RTF_UP)
                | if gateway.is_some() {
                    u32::from(libc::RTF_GATEWAY)
                } else {
                    0
                },
            rtmsg_ifindex: route
                .ifname
                .as_deref()
                .map(ifindex)
                .transpose()?
                .unwrap_or(0),
        };
        // SAFETY: SIOCADDRT on an AF_INET6 socket reads one in6_rtmsg.
        let rc = unsafe {
            libc::ioctl(
                self.sock6()?.as_raw_fd(),
                libc::SIOCADDRT,
                std::ptr::from_mut(&mut rt),
            )
        };
        match os_err(rc) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
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

    /// Gives the interface whose address is `from` the address `to` (both
    /// `aa:bb:cc:dd:ee:ff`); it must be down.
    pub fn change_mac(&self, from: &str, to: &str) -> io::Result<()> {
        let bytes: Vec<u8> = to
            .split(':')
            .map(|b| u8::from_str_radix(b, 16))
            .collect::<Result<_, _>>()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("bad MAC {to:?}")))?;
        let Ok(mac) = <[u8; 6]>::try_from(bytes) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad MAC {to:?}"),
            ));
        };
        let ifname = self.interface_by_mac(&from.to_ascii_lowercase())?;
        let mut req = Self::ifreq(&ifname)?;
        let mut addr = libc::sockaddr {
            sa_family: libc::ARPHRD_ETHER,
            sa_data: [0; 14],
        };
        for (d, s) in addr.sa_data.iter_mut().zip(mac) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = addr;
        self.ioctl(libc::SIOCSIFHWADDR, &mut req)
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

    fn skip_ipv6_dad(&self, ifname: &str) -> io::Result<()> {
        if ifname.contains('/') || ifname.starts_with('.') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {ifname:?}"),
            ));
        }
        fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad"), "0")
    }

    fn add_ipv6(&self, ifname: &str, addr: Ipv6Addr, prefix: u8) -> io::Result<()> {
        let mut req = libc::in6_ifreq {
            ifr6_addr: in6_addr(addr),
            ifr6_prefixlen: u32::from(prefix),
            ifr6_ifindex: ifindex(ifname)?,
        };
        // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads one in6_ifreq.
        let rc = unsafe {
            libc::ioctl(
                self.sock6()?.as_raw_fd(),
                libc::SIOCSIFADDR,
                std::ptr::from_mut(&mut req),
            )
        };
        os_err(rc)
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
        let dest = match route.dest {
            IpAddr::V6(dest) => return self.add_route6(dest, route),
            IpAddr::V4(dest) => dest,
        };
        let gateway = gateway(route, |ip| match ip {
            IpAddr::V4(g) => Some(g),
            IpAddr::V6(_) => None,
        })?;
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
            rt_dst: sockaddr(dest),
            rt_gateway: sockaddr(gateway.unwrap_or(Ipv4Addr::UNSPECIFIED)),
            rt_genmask: sockaddr(netmask(route.prefix)),
            rt_flags: libc::RTF_UP
                | if gateway.is_some() {
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
