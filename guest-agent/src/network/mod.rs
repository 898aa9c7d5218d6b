//! The guest's network, as the host sends it: interfaces found by MAC,
//! brought up with an IPv4 address and MTU, routes, and resolv.conf. The
//! whole request is checked before anything changes; the system calls sit
//! behind [`NetSys`] so the plan is tested without privileges.

use std::io;
use std::net::Ipv4Addr;

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
    /// Brings an interface up.
    fn set_up(&self, ifname: &str) -> io::Result<()>;
    /// Adds an IPv4 route.
    fn add_route(&self, route: &Route) -> io::Result<()>;
    /// Replaces the container's resolv.conf.
    fn write_resolv_conf(&self, contents: &str) -> io::Result<()>;
}

/// A parsed route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination network.
    pub dest: Ipv4Addr,
    /// Its prefix length (0 for the default route).
    pub prefix: u8,
    /// Next hop.
    pub gateway: Option<Ipv4Addr>,
    /// Interface name.
    pub ifname: Option<String>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// `a.b.c.d/n`
fn parse_cidr(s: &str) -> io::Result<(Ipv4Addr, u8)> {
    let bad = || {
        invalid(format!(
            "{s:?} is not an IPv4 address with a prefix length (10.0.0.2/24)"
        ))
    };
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    if prefix > 32 {
        return Err(bad());
    }
    Ok((addr, prefix))
}

fn parse_ip(s: &str, what: &str) -> io::Result<Ipv4Addr> {
    s.parse()
        .map_err(|_| invalid(format!("{what} {s:?} is not an IPv4 address")))
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
            mtu: i.mtu,
        });
    }
    let mut routes = Vec::with_capacity(cfg.routes.len());
    for r in &cfg.routes {
        let (dest, prefix) = match r.destination.as_str() {
            "default" => (Ipv4Addr::UNSPECIFIED, 0),
            d => parse_cidr(d)?,
        };
        if u32::from(dest) & !u32::from(netmask(prefix)) != 0 {
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
        let gateway = r
            .gateway
            .as_deref()
            .map(|g| parse_ip(g, "gateway"))
            .transpose()?;
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
