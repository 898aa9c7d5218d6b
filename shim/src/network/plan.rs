//! What a network namespace holds, reduced to what the guest needs: which
//! interfaces become NICs, and the addresses and routes the agent sets up
//! behind them. Plain data, so the rules are tested without a namespace.

use std::net::IpAddr;

use runvm_protocol::{InterfaceConfig, NetworkConfig, RouteConfig};

/// An interface of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Its index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Its hardware address, when it has one of six bytes.
    pub mac: Option<[u8; 6]>,
    /// Its MTU.
    pub mtu: Option<u32>,
    /// An Ethernet device (ARPHRD_ETHER), not loopback.
    pub ethernet: bool,
    /// A tun/tap device (never redirected: it is a VMM's own end).
    pub tun: bool,
    /// Administratively up.
    pub up: bool,
}

/// An address on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// The interface's index.
    pub index: u32,
    /// The address.
    pub ip: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
}

/// A route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// An IPv6 route (else IPv4).
    pub ipv6: bool,
    /// Destination and prefix length; none for the default route.
    pub dest: Option<(IpAddr, u8)>,
    /// Next hop.
    pub gateway: Option<IpAddr>,
    /// Outgoing interface.
    pub oif: Option<u32>,
    /// Added by the kernel for an address (the guest's kernel adds its own).
    pub from_kernel: bool,
    /// A unicast route (not local, broadcast, blackhole...).
    pub unicast: bool,
}

/// A namespace's interfaces, addresses and routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Interfaces.
    pub links: Vec<Link>,
    /// Addresses.
    pub addresses: Vec<Address>,
    /// Routes of the main table, both families.
    pub routes: Vec<Route>,
}

/// An interface whose traffic the guest takes over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// The namespace interface's index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Its MAC, which the guest's NIC takes so peers see no change.
    pub mac: [u8; 6],
    /// Its MTU.
    pub mtu: Option<u32>,
}

/// What the guest gets from a namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestNetwork {
    /// Interfaces that become NICs.
    pub nics: Vec<Nic>,
    /// What the agent configures behind them.
    pub config: NetworkConfig,
    /// What the guest cannot have (for the log).
    pub ignored: Vec<String>,
}

/// `aa:bb:cc:dd:ee:ff`
pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Maps `snap` onto the guest: every Ethernet interface that is up (a
/// namespace's veth) becomes a NIC with its MAC, first IPv4 address, IPv6
/// addresses (the kernel makes the link-local one from the MAC, as the
/// namespace's did) and MTU; routes other than the kernel's own follow,
/// direct routes first so the gateways behind them are reachable when
/// theirs are added.
pub fn guest_network(snap: &Snapshot) -> GuestNetwork {
    let mut out = GuestNetwork::default();
    for link in &snap.links {
        if !link.ethernet || link.tun || !link.up {
            continue;
        }
        let Some(mac) = link.mac else {
            out.ignored
                .push(format!("interface {} has no Ethernet address", link.name));
            continue;
        };
        let mut address = None;
        let mut ipv6 = Vec::new();
        for a in snap.addresses.iter().filter(|a| a.index == link.index) {
            match a.ip {
                IpAddr::V4(ip) if address.is_none() => address = Some(format!("{ip}/{}", a.prefix)),
                // The guest's kernel makes its own link-local address.
                IpAddr::V6(ip) if ip.segments()[0] & 0xffc0 == 0xfe80 => {}
                IpAddr::V6(ip) => ipv6.push(format!("{ip}/{}", a.prefix)),
                ip => out
                    .ignored
                    .push(format!("address {ip}/{} of {}", a.prefix, link.name)),
            }
        }
        out.config.interfaces.push(InterfaceConfig {
            mac: mac_string(&mac),
            address,
            ipv6,
            mtu: link.mtu,
        });
        out.nics.push(Nic {
            index: link.index,
            name: link.name.clone(),
            mac,
            mtu: link.mtu,
        });
    }
    let mut direct = Vec::new();
    let mut via = Vec::new();
    for r in &snap.routes {
        if r.from_kernel || !r.unicast {
            continue;
        }
        let destination = match r.dest {
            None | Some((_, 0)) if r.ipv6 => "::/0".to_owned(),
            None | Some((_, 0)) => "default".to_owned(),
            Some((ip, prefix)) => format!("{ip}/{prefix}"),
        };
        let nic = r.oif.map(|oif| out.nics.iter().find(|n| n.index == oif));
        let mac = match nic {
            None => None,
            Some(Some(nic)) => Some(mac_string(&nic.mac)),
            Some(None) => {
                out.ignored.push(format!(
                    "route to {destination} (through an interface the guest does not have)"
                ));
                continue;
            }
        };
        let route = RouteConfig {
            destination,
            gateway: r.gateway.map(|g| g.to_string()),
            mac,
        };
        if route.gateway.is_some() {
            via.push(route);
        } else if route.mac.is_some() {
            direct.push(route);
        }
    }
    out.config.routes = direct.into_iter().chain(via).collect();
    out
}
