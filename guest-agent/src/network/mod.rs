//! The guest's network, as the host sends it: interfaces found by MAC,
//! brought up with an IPv4 address, IPv6 addresses and MTU, routes of
//! both families, and resolv.conf. The
//! whole request is checked before anything changes; the system calls sit
//! behind [`NetSys`] so the plan is tested without privileges.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use runvm_protocol::{DnsConfig, NetworkConfig};

mod sys;
pub use sys::LinuxNet;

/// The system calls network setup needs.
pub trait NetSys {
    /// The interface whose address is `mac`.
    fn interface_by_mac(&self, mac: &str) -> io::Result<String>;
    /// Sets an interface's MTU.
    fn set_mtu(&self, ifname: &str, mtu: u32) -> io::Result<()>;
    /// Sets an interface's IPv4 address and netmask.
    fn set_ipv4(&self, ifname: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()>;
    /// Turns off duplicate address detection on an interface, so that its
    /// IPv6 addresses (the link-local one too) are usable at once.
    fn skip_ipv6_dad(&self, ifname: &str) -> io::Result<()>;
    /// Adds an IPv6 address (and the kernel its prefix route).
    fn add_ipv6(&self, ifname: &str, addr: Ipv6Addr, prefix: u8) -> io::Result<()>;
    /// Brings an interface up.
    fn set_up(&self, ifname: &str) -> io::Result<()>;
    /// Adds a route of either family.
    fn add_route(&self, route: &Route) -> io::Result<()>;
    /// Replaces the container's resolv.conf.
    fn write_resolv_conf(&self, contents: &str) -> io::Result<()>;
}

/// A parsed route; `dest` and `gateway` are of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network.
    pub dest: IpAddr,
    /// Its prefix length (0 for the default route).
    pub prefix: u8,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// Interface name.
    pub ifname: Option<String>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// `a.b.c.d/n`
fn parse_cidr(s: &str) -> io::Result<(Ipv4Addr, u8)> {
    match parse_any_cidr(s) {
        Some((IpAddr::V4(ip), prefix)) => Ok((ip, prefix)),
        _ => Err(invalid(format!(
            "{s:?} is not an IPv4 address with a prefix length (10.0.0.2/24)"
        ))),
    }
}

/// `x:y::z/n`
fn parse_cidr6(s: &str) -> io::Result<(Ipv6Addr, u8)> {
    match parse_any_cidr(s) {
        Some((IpAddr::V6(ip), prefix)) => Ok((ip, prefix)),
        _ => Err(invalid(format!(
            "{s:?} is not an IPv6 address with a prefix length (fd00:1::2/64)"
        ))),
    }
}

/// An address of either family with a prefix length that fits it.
fn parse_any_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((addr, prefix))
}

/// Whether `ip` has bits set beyond the first `prefix`.
fn host_bits(ip: IpAddr, prefix: u8) -> bool {
    let (bits, width) = match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    };
    let host = width - u32::from(prefix);
    host > 0 && bits & (u128::MAX >> (128 - host)) != 0
}

/// An IPv6 link-local address (fe80::/10): a next hop only on a named
/// interface.
fn link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// The netmask of a prefix length.
pub fn netmask(prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0))
}

/// resolv.conf text for `dns`.
pub fn resolv_conf(dns: &DnsConfig) -> io::Result<String> {
    let mut out = String::new();
    for s in &dns.servers {
        let ip: std::net::IpAddr = s
            .parse()
            .map_err(|_| invalid(format!("name server {s:?} is not an IP address")))?;
        out.push_str(&format!("nameserver {ip}\n"));
    }
    let word = |w: &String, what: &str| {
        if w.is_empty() || w.contains(char::is_whitespace) {
            Err(invalid(format!("{what} {w:?} must be one word")))
        } else {
            Ok(())
        }
    };
    for w in &dns.search {
        word(w, "search domain")?;
    }
    for w in &dns.options {
        word(w, "resolver option")?;
    }
    if !dns.search.is_empty() {
        out.push_str(&format!("search {}\n", dns.search.join(" ")));
    }
    if !dns.options.is_empty() {
        out.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    Ok(out)
}

struct Interface {
    name: String,
    address: Option<(Ipv4Addr, u8)>,
    ipv6: Vec<(Ipv6Addr, u8)>,
    mtu: Option<u32>,
}

/// Checks all of `cfg`, then applies it: interfaces, routes, DNS.
pub fn configure(cfg: &NetworkConfig, sys: &dyn NetSys) -> io::Result<()> {
    let mut interfaces = Vec::with_capacity(cfg.interfaces.len());
    for i in &cfg.interfaces {
        let name = sys
            .interface_by_mac(&i.mac.to_ascii_lowercase())
            .map_err(|e| io::Error::new(e.kind(), format!("interface {}: {e}", i.mac)))?;
        if let Some(mtu) = i.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(invalid(format!(
                    "MTU {mtu} of {} is out of range (68 to 65535)",
                    i.mac
                )));
            }
        }
        interfaces.push(Interface {
            name,
            address: i.address.as_deref().map(parse_cidr).transpose()?,
            ipv6: i
                .ipv6
                .iter()
                .map(|a| parse_cidr6(a))
                .collect::<io::Result<_>>()?,
            mtu: i.mtu,
        });
    }
    let mut routes = Vec::with_capacity(cfg.routes.len());
    for r in &cfg.routes {
        let (dest, prefix) = match r.destination.as_str() {
            "default" => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
            d => parse_any_cidr(d).ok_or_else(|| {
                invalid(format!(
                    "route destination {d:?} is not `default` or a network with a prefix \
                     length (10.1.0.0/16, fd00:2::/64)"
                ))
            })?,
        };
        if host_bits(dest, prefix) {
            return Err(invalid(format!(
                "route destination {} has host bits set",
                r.destination
            )));
        }
        let ifname = match &r.mac {
            Some(mac) => Some(
                sys.interface_by_mac(&mac.to_ascii_lowercase())
                    .map_err(|e| io::Error::new(e.kind(), format!("route via {mac}: {e}")))?,
            ),
            None => None,
        };
        let gateway = match r.gateway.as_deref() {
            None => None,
            Some(g) => match g.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv4() == dest.is_ipv4() => Some(ip),
                Ok(_) => {
                    return Err(invalid(format!(
                        "gateway {g} of the route to {} is of the other address family",
                        r.destination
                    )))
                }
                Err(_) => return Err(invalid(format!("gateway {g:?} is not an IP address"))),
            },
        };
        if gateway.is_some_and(link_local) && ifname.is_none() {
            return Err(invalid(format!(
                "the route to {} through link-local gateway {} needs an interface",
                r.destination,
                r.gateway.as_deref().unwrap_or_default()
            )));
        }
        if gateway.is_none() && ifname.is_none() {
            return Err(invalid(format!(
                "route to {} needs a gateway or an interface",
                r.destination
            )));
        }
        routes.push(Route {
            dest,
            prefix,
            gateway,
            ifname,
        });
    }
    let resolv = cfg.dns.as_ref().map(resolv_conf).transpose()?;

    sys.set_up("lo")?;
    for i in &interfaces {
        let ctx =
            |e: io::Error, what: &str| io::Error::new(e.kind(), format!("{}: {what}: {e}", i.name));
        if let Some(mtu) = i.mtu {
            sys.set_mtu(&i.name, mtu)
                .map_err(|e| ctx(e, "setting the MTU"))?;
        }
        if let Some((addr, prefix)) = i.address {
            sys.set_ipv4(&i.name, addr, prefix)
                .map_err(|e| ctx(e, "setting the address"))?;
        }
        if !i.ipv6.is_empty() {
            // Before the interface is up, so that not even its link-local
            // address waits for detection.
            sys.skip_ipv6_dad(&i.name)
                .map_err(|e| ctx(e, "turning off IPv6 duplicate address detection"))?;
        }
        for &(addr, prefix) in &i.ipv6 {
            sys.add_ipv6(&i.name, addr, prefix)
                .map_err(|e| ctx(e, &format!("adding {addr}/{prefix}")))?;
        }
        sys.set_up(&i.name).map_err(|e| ctx(e, "bringing it up"))?;
    }
    for r in &routes {
        sys.add_route(r)
            .map_err(|e| io::Error::new(e.kind(), format!("adding route {r:?}: {e}")))?;
    }
    if let Some(text) = resolv {
        sys.write_resolv_conf(&text)
            .map_err(|e| io::Error::new(e.kind(), format!("writing resolv.conf: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
