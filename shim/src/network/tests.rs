use std::net::{IpAddr, Ipv4Addr};

use netlink_packet_core::{Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::tc::{TcAttribute, TcFilterU32Option, TcOption};
use netlink_packet_route::RouteNetlinkMessage;
use runvm_protocol::{InterfaceConfig, RouteConfig};

use super::plan::{guest_network, Address, Link, Route, Snapshot};
use super::tc;
use runvm_tests::netns::{ip, Netns};

const VETH_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x58, 0x00, 0x02];

fn link(index: u32, name: &str) -> Link {
    Link {
        index,
        name: name.into(),
        mac: Some(VETH_MAC),
        mtu: Some(1500),
        ethernet: true,
        tun: false,
        up: true,
    }
}

fn lo() -> Link {
    Link {
        mac: Some([0; 6]),
        ethernet: false,
        mtu: Some(65536),
        ..link(1, "lo")
    }
}

fn v4(index: u32, a: [u8; 4], prefix: u8) -> Address {
    Address {
        index,
        ip: IpAddr::V4(Ipv4Addr::from(a)),
        prefix,
    }
}

fn route(dest: Option<([u8; 4], u8)>, gw: Option<[u8; 4]>, oif: u32) -> Route {
    Route {
        ipv6: false,
        dest: dest.map(|(d, p)| (Ipv4Addr::from(d).into(), p)),
        gateway: gw.map(|g| Ipv4Addr::from(g).into()),
        oif: Some(oif),
        from_kernel: false,
        unicast: true,
    }
}

/// What CNI's bridge plugin leaves in a namespace.
fn cni_bridge() -> Snapshot {
    Snapshot {
        links: vec![lo(), link(2, "eth0")],
        addresses: vec![
            v4(1, [127, 0, 0, 1], 8),
            v4(2, [10, 88, 0, 5], 16),
            Address {
                index: 2,
                ip: "fe80::858:aff:fe58:2".parse().unwrap(),
                prefix: 64,
            },
        ],
        routes: vec![
            Route {
                from_kernel: true,
                ..route(Some(([10, 88, 0, 0], 16)), None, 2)
            },
            route(None, Some([10, 88, 0, 1]), 2),
        ],
    }
}

#[test]
fn a_veth_becomes_a_nic_with_its_mac_address_and_default_route() {
    let g = guest_network(&cni_bridge());
    assert_eq!(g.nics.len(), 1);
    assert_eq!(g.nics[0].index, 2);
    assert_eq!(g.nics[0].mac, VETH_MAC);
    assert_eq!(
        g.config.interfaces,
        vec![InterfaceConfig {
            mac: "0a:58:0a:58:00:02".into(),
            address: Some("10.88.0.5/16".into()),
            ipv6: vec![],
            mtu: Some(1500),
        }]
    );
    assert_eq!(
        g.config.routes,
        vec![RouteConfig {
            destination: "default".into(),
            gateway: Some("10.88.0.1".into()),
            mac: Some("0a:58:0a:58:00:02".into()),
        }]
    );
    assert!(g.config.dns.is_none(), "resolv.conf comes as a spec mount");
    assert!(g.ignored.is_empty(), "{:?}", g.ignored);
}

#[test]
fn an_empty_namespace_gives_no_nic() {
    let snap = Snapshot {
        links: vec![lo()],
        addresses: vec![v4(1, [127, 0, 0, 1], 8)],
        routes: vec![],
    };
    let g = guest_network(&snap);
    assert!(g.nics.is_empty());
    assert!(g.config.interfaces.is_empty() && g.config.routes.is_empty());
}

#[test]
fn taps_down_links_and_links_without_a_mac_are_left_alone() {
    let mut snap = cni_bridge();
    snap.links.push(Link {
        tun: true,
        ..link(3, "runvm-tap0")
    });
    snap.links.push(Link {
        up: false,
        ..link(4, "eth1")
    });
    snap.links.push(Link {
        mac: None,
        ..link(5, "wg0")
    });
    let g = guest_network(&snap);
    assert_eq!(g.nics.iter().map(|n| n.index).collect::<Vec<_>>(), [2]);
    assert_eq!(g.ignored, ["interface wg0 has no Ethernet address"]);
}

#[test]
fn direct_routes_come_before_the_gateways_behind_them() {
    // Calico and CNI's ptp plugin: a /32 address, the gateway on a link route.
    let snap = Snapshot {
        links: vec![lo(), link(2, "eth0")],
        addresses: vec![v4(2, [192, 168, 7, 9], 32)],
        routes: vec![
            route(None, Some([169, 254, 1, 1]), 2),
            route(Some(([169, 254, 1, 1], 32)), None, 2),
        ],
    };
    let g = guest_network(&snap);
    let dests: Vec<_> = g
        .config
        .routes
        .iter()
        .map(|r| (r.destination.as_str(), r.gateway.as_deref()))
        .collect();
    assert_eq!(
        dests,
        [("169.254.1.1/32", None), ("default", Some("169.254.1.1"))]
    );
}

fn v6(index: u32, a: &str, prefix: u8) -> Address {
    Address {
        index,
        ip: a.parse().unwrap(),
        prefix,
    }
}

fn route6(dest: Option<(&str, u8)>, gw: Option<&str>, oif: u32) -> Route {
    Route {
        ipv6: true,
        dest: dest.map(|(d, p)| (d.parse().unwrap(), p)),
        gateway: gw.map(|g| g.parse().unwrap()),
        oif: Some(oif),
        from_kernel: false,
        unicast: true,
    }
}

#[test]
fn a_dual_stack_veth_brings_its_ipv6_addresses_and_routes() {
    // netavark's dual-stack bridge, plus a route a router advertised
    // through a link-local gateway.
    let mut snap = cni_bridge();
    snap.addresses.push(v6(2, "fd00:88::5", 64));
    snap.addresses.push(v6(2, "2001:db8::5", 64));
    // The kernel's own, which the guest's kernel makes again from the MAC.
    snap.addresses.push(v6(2, "fe80::858:aff:fe58:2", 64));
    snap.routes.push(Route {
        from_kernel: true,
        ..route6(Some(("fd00:88::", 64)), None, 2)
    });
    snap.routes.push(Route {
        from_kernel: true,
        ..route6(Some(("fe80::", 64)), None, 2)
    });
    snap.routes.push(Route {
        from_kernel: true,
        unicast: false,
        ..route6(Some(("ff00::", 8)), None, 2)
    });
    snap.routes.push(route6(None, Some("fd00:88::1"), 2));
    snap.routes
        .push(route6(Some(("2001:db8:9::", 48)), Some("fe80::1"), 2));
    let g = guest_network(&snap);
    assert!(g.ignored.is_empty(), "{:?}", g.ignored);
    assert_eq!(
        g.config.interfaces[0].ipv6,
        ["fd00:88::5/64", "2001:db8::5/64"]
    );
    let mac = Some("0a:58:0a:58:00:02".to_owned());
    assert_eq!(
        g.config.routes,
        [
            RouteConfig {
                destination: "default".into(),
                gateway: Some("10.88.0.1".into()),
                mac: mac.clone(),
            },
            RouteConfig {
                destination: "::/0".into(),
                gateway: Some("fd00:88::1".into()),
                mac: mac.clone(),
            },
            RouteConfig {
                destination: "2001:db8:9::/48".into(),
                gateway: Some("fe80::1".into()),
                mac,
            },
        ]
    );
}

#[test]
fn what_the_guest_cannot_have_is_reported_not_dropped_silently() {
    let mut snap = cni_bridge();
    snap.addresses.push(v4(2, [10, 88, 0, 6], 16));
    snap.routes
        .push(route(Some(([10, 9, 0, 0], 16)), Some([10, 88, 0, 1]), 7));
    snap.routes.push(Route {
        unicast: false,
        ..route(Some(([10, 88, 255, 255], 32)), None, 2)
    });
    let g = guest_network(&snap);
    assert_eq!(
        g.config.interfaces[0].address.as_deref(),
        Some("10.88.0.5/16")
    );
    assert_eq!(
        g.ignored,
        [
            "address 10.88.0.6/16 of eth0",
            "route to 10.9.0.0/16 (through an interface the guest does not have)",
        ]
    );
    assert_eq!(g.config.routes.len(), 1);
}

/// Emits `msg` as the kernel would receive it and parses it back.
fn round_trip(msg: RouteNetlinkMessage) -> RouteNetlinkMessage {
    let mut m = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
    m.finalize();
    let mut buf = vec![0; m.buffer_len()];
    m.serialize(&mut buf);
    match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf)
        .unwrap()
        .payload
    {
        NetlinkPayload::InnerMessage(m) => m,
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_redirect_filter_matches_everything_and_steals_it_to_the_other_side() {
    let msg = tc::redirect(2, 7);
    assert!(msg.buffer_len() > 0);
    let RouteNetlinkMessage::NewTrafficFilter(back) =
        round_trip(RouteNetlinkMessage::NewTrafficFilter(msg))
    else {
        panic!("not a filter");
    };
    assert_eq!(back.header.index, 2);
    assert_eq!(u32::from(back.header.parent), 0xffff_0000, "ingress");
    assert_eq!(
        back.header.info & 0xffff,
        u32::from((libc::ETH_P_ALL as u16).to_be())
    );
    assert!(back.attributes.contains(&TcAttribute::Kind("u32".into())));
    let opts = back
        .attributes
        .iter()
        .find_map(|a| match a {
            TcAttribute::Options(o) => Some(o),
            _ => None,
        })
        .unwrap();
    let text = format!("{opts:?}");
    assert!(
        text.contains("EgressRedir") && text.contains("ifindex: 7"),
        "{text}"
    );
    assert!(text.contains("Stolen"), "{text}");
    let sel = opts
        .iter()
        .find_map(|o| match o {
            TcOption::U32(TcFilterU32Option::Selector(s)) => Some(s),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (sel.keys[0].mask, sel.keys[0].val),
        (0, 0),
        "matches every frame"
    );
}

#[test]
fn the_ingress_qdisc_has_the_ingress_handle() {
    let RouteNetlinkMessage::NewQueueDiscipline(q) = round_trip(
        RouteNetlinkMessage::NewQueueDiscipline(tc::ingress_qdisc(4)),
    ) else {
        panic!("not a qdisc");
    };
    assert_eq!(q.header.index, 4);
    assert_eq!(u32::from(q.header.handle), 0xffff_0000);
    assert_eq!(u32::from(q.header.parent), 0xffff_fff1);
    assert!(q.attributes.contains(&TcAttribute::Kind("ingress".into())));
}

/// The real thing in a real namespace (needs root, as the whole suite).
#[test]
fn attach_splices_the_veth_to_a_tap_and_detach_leaves_the_namespace_as_it_was() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (network namespaces, tc), as the rest of the suite"
    );
    let ns = Netns::new("u", "10.213.7").with_ipv6("fd00:213:7:0");
    let before = ns.fingerprint();

    let (mut attached, nics) = super::attach(std::path::Path::new(&ns.path())).unwrap();
    assert_eq!(nics.len(), 1);
    assert_eq!(nics[0].mac, ns.mac());
    assert_eq!(
        attached.config.interfaces[0].address.as_deref(),
        Some("10.213.7.2/24")
    );
    assert_eq!(attached.config.interfaces[0].ipv6, ["fd00:213:7::2/64"]);
    let routes: Vec<_> = attached
        .config
        .routes
        .iter()
        .map(|r| (r.destination.as_str(), r.gateway.as_deref()))
        .collect();
    assert_eq!(
        routes,
        [
            ("default", Some("10.213.7.1")),
            ("::/0", Some("fd00:213:7::1"))
        ]
    );
    let links = ns.exec(&["ip", "-o", "link"]);
    assert!(
        links.contains("runvm-tap0") && links.contains("UP"),
        "{links}"
    );
    for (dev, to) in [("eth0", "runvm-tap0"), ("runvm-tap0", "eth0")] {
        let filters = ns.exec(&["tc", "filter", "show", "dev", dev, "ingress"]);
        assert!(
            filters.contains(&format!("mirred (Egress Redirect to device {to}) stolen")),
            "{dev}: {filters}"
        );
    }
    // This thread never left its own namespace.
    assert!(!ip(&["-o", "link"]).contains("runvm-tap0"));

    // A second container cannot take the same interfaces.
    let e = super::attach(std::path::Path::new(&ns.path())).unwrap_err();
    assert!(
        format!("{e:#}").contains("already has an ingress qdisc"),
        "{e:#}"
    );

    attached.detach();
    drop(nics);
    assert_eq!(ns.fingerprint(), before);

    // Attached again (a restarted container), then a monitor killed
    // before it could detach: `delete` undoes it from the state record.
    let (attached, nics) = super::attach(std::path::Path::new(&ns.path())).unwrap();
    let record: crate::state::NetworkRecord =
        serde_json::from_str(&serde_json::to_string(&attached.record()).unwrap()).unwrap();
    std::mem::forget(attached);
    drop(nics);
    super::Attached::from_record(record).detach();
    assert_eq!(ns.fingerprint(), before);
}

#[test]
fn a_path_that_is_not_a_network_namespace_is_refused() {
    let f = tempfile::NamedTempFile::new().unwrap();
    let e = super::attach(f.path()).unwrap_err();
    assert!(
        format!("{e:#}").contains("is not a network namespace"),
        "{e:#}"
    );
}
