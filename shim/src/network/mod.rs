//! The spec's network namespace, handed to the micro-VM: every interface
//! the engine (CNI, netavark) set up in it gets a TAP beside it, spliced to
//! it with tc redirects, and the guest's NIC on that TAP takes over the
//! interface's MAC, addresses and routes. The namespace keeps its
//! interfaces, so the engine tears it down as it would a runc container's.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use runvm_protocol::NetworkConfig;

use crate::state::NetworkRecord;
use vmm::devices::virtio::net::tap::Tap;

pub mod bridge;
mod netns;
pub mod plan;
mod rtnl;
mod tc;

use plan::{Address, Link, Route, Snapshot};
use rtnl::Rtnl;

/// A NIC for the VM: the TAP's fd and the MAC the guest uses.
#[derive(Debug)]
pub struct GuestNic {
    /// The TAP, opened in the namespace.
    pub tap: OwnedFd,
    /// `aa:bb:cc:dd:ee:ff`
    pub mac: String,
}

/// A namespace whose interfaces are spliced to TAPs.
#[derive(Debug)]
pub struct Attached {
    netns: PathBuf,
    /// Interfaces that got an ingress qdisc from us, by index and name
    /// (the TAPs' go with the TAPs).
    spliced: Vec<(u32, String)>,
    /// What the agent sets up in the guest.
    pub config: NetworkConfig,
}

/// Splices every usable interface of the namespace at `netns` to a TAP of
/// its own; returns the TAPs for the VM and what the guest must configure.
/// On failure nothing stays behind in the namespace.
pub fn attach(netns: &Path) -> anyhow::Result<(Attached, Vec<GuestNic>)> {
    let mut attached = Attached {
        netns: netns.to_owned(),
        spliced: Vec::new(),
        config: NetworkConfig::default(),
    };
    let result = netns::run_in(netns, || {
        let mut nl = Rtnl::open().context("netlink socket")?;
        let snap = snapshot(&mut nl)?;
        let guest = plan::guest_network(&snap);
        for what in &guest.ignored {
            crate::logger::warn(&format!(
                "{}: not given to the guest: {what}",
                netns.display()
            ));
        }
        let mut nics = Vec::with_capacity(guest.nics.len());
        let mut spliced = Vec::new();
        let r = (|| {
            for (i, nic) in guest.nics.iter().enumerate() {
                nics.push(splice(&mut nl, nic, i, &mut spliced)?);
            }
            Ok::<_, anyhow::Error>(())
        })();
        if let Err(e) = r {
            unsplice(&mut nl, &spliced);
            return Err(e);
        }
        Ok((guest.config, nics, spliced))
    });
    let (config, nics, spliced) = result?;
    attached.config = config;
    attached.spliced = spliced;
    Ok((attached, nics))
}

impl Attached {
    /// What `delete` needs to undo this after a monitor that was killed.
    pub fn record(&self) -> NetworkRecord {
        NetworkRecord {
            netns: self.netns.clone(),
            spliced: self.spliced.clone(),
        }
    }

    /// Takes over what a (dead) monitor recorded, to detach it.
    pub fn from_record(r: NetworkRecord) -> Self {
        Attached {
            netns: r.netns,
            spliced: r.spliced,
            config: NetworkConfig::default(),
        }
    }

    /// Removes the redirects from the namespace's interfaces (the TAPs
    /// vanish with the VMM's fds). The namespace may already be gone.
    pub fn detach(&mut self) {
        if self.spliced.is_empty() {
            return;
        }
        let spliced = std::mem::take(&mut self.spliced);
        let r = netns::run_in(&self.netns, || {
            let mut nl = Rtnl::open().context("netlink socket")?;
            unsplice(&mut nl, &spliced);
            Ok(())
        });
        if let Err(e) = r {
            crate::logger::debug(&format!("network teardown: {e:#}"));
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.detach();
    }
}

/// The TAP name for the `i`th NIC (inside the container's namespace).
fn tap_name(i: usize) -> String {
    format!("runvm-tap{i}")
}

fn splice(
    nl: &mut Rtnl,
    nic: &plan::Nic,
    i: usize,
    spliced: &mut Vec<(u32, String)>,
) -> anyhow::Result<GuestNic> {
    let add_qdisc = |nl: &mut Rtnl, index: u32, name: &str| {
        nl.apply(
            RouteNetlinkMessage::NewQueueDiscipline(tc::ingress_qdisc(index)),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) => anyhow::anyhow!(
                "interface {name} already has an ingress qdisc (another runvm container \
                 uses this network namespace, or tc rules of its own are there)"
            ),
            Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) => anyhow::anyhow!(
                "adding an ingress qdisc to {name}: {e} (does the host kernel have \
                 sch_ingress, cls_u32 and act_mirred?)"
            ),
            _ => anyhow::anyhow!("adding an ingress qdisc to {name}: {e}"),
        })
    };
    add_qdisc(nl, nic.index, &nic.name)?;
    spliced.push((nic.index, nic.name.clone()));

    let name = tap_name(i);
    let tap = Tap::open(&name).with_context(|| format!("creating tap {name}"))?;
    let tap_index = link_index(nl, &name)?;
    let mut up = LinkMessage::default();
    up.header.index = tap_index;
    up.header.flags = LinkFlags::Up;
    up.header.change_mask = LinkFlags::Up;
    if let Some(mtu) = nic.mtu {
        up.attributes.push(LinkAttribute::Mtu(mtu));
    }
    nl.apply(RouteNetlinkMessage::SetLink(up), 0)
        .with_context(|| format!("bringing up {name}"))?;
    add_qdisc(nl, tap_index, &name)?;
    for (from, to) in [(nic.index, tap_index), (tap_index, nic.index)] {
        nl.apply(
            RouteNetlinkMessage::NewTrafficFilter(tc::redirect(from, to)),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .with_context(|| format!("redirecting between {} and {name}", nic.name))?;
    }
    crate::logger::debug(&format!(
        "network: {} ({}) spliced to {name}",
        nic.name,
        plan::mac_string(&nic.mac)
    ));
    Ok(GuestNic {
        tap: tap.into_fd(),
        mac: plan::mac_string(&nic.mac),
    })
}

/// Deletes the ingress qdiscs (and with them the filters) of `spliced`,
/// skipping an index that now names another interface.
fn unsplice(nl: &mut Rtnl, spliced: &[(u32, String)]) {
    for (index, name) in spliced {
        let index = *index;
        match link_index(nl, name) {
            Ok(i) if i == index => {}
            _ => {
                crate::logger::debug(&format!("network teardown: {name} (index {index}) is gone"));
                continue;
            }
        }
        if let Err(e) = nl.apply(
            RouteNetlinkMessage::DelQueueDiscipline(tc::ingress_qdisc(index)),
            0,
        ) {
            crate::logger::debug(&format!("network teardown: ingress qdisc of {name}: {e}"));
        }
    }
}

fn link_index(nl: &mut Rtnl, name: &str) -> anyhow::Result<u32> {
    let links = nl
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .context("listing interfaces")?;
    for m in links {
        if let RouteNetlinkMessage::NewLink(l) = m {
            if l.attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))
            {
                return Ok(l.header.index);
            }
        }
    }
    bail!("interface {name} vanished")
}

fn route_ip(a: &RouteAddress) -> Option<std::net::IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some((*ip).into()),
        RouteAddress::Inet6(ip) => Some((*ip).into()),
        _ => None,
    }
}

/// The namespace's interfaces, addresses and main-table routes.
fn snapshot(nl: &mut Rtnl) -> anyhow::Result<Snapshot> {
    let mut snap = Snapshot::default();
    for m in nl
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .context("listing interfaces")?
    {
        let RouteNetlinkMessage::NewLink(l) = m else {
            continue;
        };
        let mut link = Link {
            index: l.header.index,
            name: String::new(),
            mac: None,
            mtu: None,
            ethernet: l.header.link_layer_type == LinkLayerType::Ether,
            tun: false,
            up: l.header.flags.contains(LinkFlags::Up),
        };
        for a in &l.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(mac) => link.mac = <[u8; 6]>::try_from(&mac[..]).ok(),
                LinkAttribute::Mtu(m) => link.mtu = Some(*m),
                LinkAttribute::LinkInfo(infos) => {
                    link.tun = infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Tun)));
                }
                _ => {}
            }
        }
        snap.links.push(link);
    }
    for m in nl
        .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
        .context("listing addresses")?
    {
        let RouteNetlinkMessage::NewAddress(a) = m else {
            continue;
        };
        // IFA_LOCAL is the interface's own address where it differs from
        // IFA_ADDRESS (the peer's, on point-to-point links).
        let local = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let addr = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = local.or(addr) {
            snap.addresses.push(Address {
                index: a.header.index,
                ip,
                prefix: a.header.prefix_len,
            });
        }
    }
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut get = RouteMessage::default();
        get.header.address_family = family;
        for m in nl
            .dump(RouteNetlinkMessage::GetRoute(get))
            .context("listing routes")?
        {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            if r.header.address_family != family {
                continue;
            }
            let mut table = u32::from(r.header.table);
            let mut route = Route {
                ipv6: family == AddressFamily::Inet6,
                dest: None,
                gateway: None,
                oif: None,
                from_kernel: r.header.protocol == RouteProtocol::Kernel,
                unicast: r.header.kind == RouteType::Unicast,
            };
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(d) => {
                        route.dest = route_ip(d).map(|ip| (ip, r.header.destination_prefix_length));
                    }
                    RouteAttribute::Gateway(g) => route.gateway = route_ip(g),
                    RouteAttribute::Oif(i) => route.oif = Some(*i),
                    RouteAttribute::Table(t) => table = *t,
                    _ => {}
                }
            }
            if table == u32::from(RouteHeader::RT_TABLE_MAIN) {
                snap.routes.push(route);
            }
        }
    }
    Ok(snap)
}

#[cfg(test)]
mod tests;
