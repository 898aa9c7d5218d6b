//! The network plan, checked against a recording [`NetSys`].

use std::cell::RefCell;
use std::collections::HashMap;

use runvm_protocol::{DnsConfig, InterfaceConfig, NetworkConfig, RouteConfig};

use super::*;

#[derive(Default)]
struct Record {
    macs: HashMap<String, String>,
    calls: RefCell<Vec<String>>,
    fail_on: Option<&'static str>,
}

impl Record {
    fn with_nics(nics: &[(&str, &str)]) -> Self {
        Record {
            macs: nics
                .iter()
                .map(|(m, n)| (m.to_string(), n.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn call(&self, c: String) -> io::Result<()> {
        let fail = self.fail_on.is_some_and(|f| c.starts_with(f));
        self.calls.borrow_mut().push(c);
        if fail {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        } else {
            Ok(())
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }
}

impl NetSys for Record {
    fn interface_by_mac(&self, mac: &str) -> io::Result<String> {
        self.macs.get(mac).cloned().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "no interface has this MAC address")
        })
    }
    fn set_mtu(&self, ifname: &str, mtu: u32) -> io::Result<()> {
        self.call(format!("mtu {ifname} {mtu}"))
    }
    fn set_ipv4(&self, ifname: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        self.call(format!("addr {ifname} {addr}/{prefix}"))
    }
    fn skip_ipv6_dad(&self, ifname: &str) -> io::Result<()> {
        self.call(format!("nodad {ifname}"))
    }
    fn add_ipv6(&self, ifname: &str, addr: Ipv6Addr, prefix: u8) -> io::Result<()> {
        self.call(format!("addr6 {ifname} {addr}/{prefix}"))
    }
    fn set_up(&self, ifname: &str) -> io::Result<()> {
        self.call(format!("up {ifname}"))
    }
    fn add_route(&self, r: &Route) -> io::Result<()> {
        self.call(format!(
            "route {}/{} via {:?} dev {:?}",
            r.dest, r.prefix, r.gateway, r.ifname
        ))
    }
    fn write_resolv_conf(&self, contents: &str) -> io::Result<()> {
        self.call(format!("resolv {contents:?}"))
    }
}

fn nic(mac: &str, address: Option<&str>, mtu: Option<u32>) -> InterfaceConfig {
    InterfaceConfig {
        mac: mac.into(),
        address: address.map(Into::into),
        ipv6: Vec::new(),
        mtu,
    }
}

fn route(dest: &str, gw: Option<&str>, mac: Option<&str>) -> RouteConfig {
    RouteConfig {
        destination: dest.into(),
        gateway: gw.map(Into::into),
        mac: mac.map(Into::into),
    }
}

#[test]
fn a_typical_container_network_is_applied_in_order() {
    let sys = Record::with_nics(&[("02:00:00:00:00:05", "eth0"), ("02:00:00:00:00:06", "eth1")]);
    let cfg = NetworkConfig {
        interfaces: vec![
            nic("02:00:00:00:00:05", Some("10.88.0.5/16"), Some(1400)),
            nic("02:00:00:00:00:06", None, None),
        ],
        routes: vec![
            route("default", Some("10.88.0.1"), None),
            route("192.168.7.0/24", None, Some("02:00:00:00:00:06")),
        ],
        dns: Some(DnsConfig {
            servers: vec!["10.88.0.1".into(), "2001:db8::53".into()],
            search: vec!["example.com".into(), "corp".into()],
            options: vec!["ndots:2".into()],
        }),
    };
    configure(&cfg, &sys).unwrap();
    assert_eq!(
        sys.calls(),
        [
            "up lo",
            "mtu eth0 1400",
            "addr eth0 10.88.0.5/16",
            "up eth0",
            "up eth1",
            "route 0.0.0.0/0 via Some(10.88.0.1) dev None",
            "route 192.168.7.0/24 via None dev Some(\"eth1\")",
            "resolv \"nameserver 10.88.0.1\\nnameserver 2001:db8::53\\nsearch example.com corp\\noptions ndots:2\\n\"",
        ]
    );
}

#[test]
fn a_dual_stack_network_gets_its_ipv6_addresses_and_routes() {
    let sys = Record::with_nics(&[("02:00:00:00:00:05", "eth0")]);
    let mut eth0 = nic("02:00:00:00:00:05", Some("10.88.0.5/16"), None);
    eth0.ipv6 = vec!["fd00:88::5/64".into(), "2001:db8:1::5/48".into()];
    let cfg = NetworkConfig {
        interfaces: vec![eth0],
        routes: vec![
            route("default", Some("10.88.0.1"), None),
            route("::/0", Some("fd00:88::1"), None),
            route(
                "2001:db8:2::/48",
                Some("fe80::1"),
                Some("02:00:00:00:00:05"),
            ),
            route("fd00:99::/64", None, Some("02:00:00:00:00:05")),
        ],
        dns: None,
    };
    configure(&cfg, &sys).unwrap();
    assert_eq!(
        sys.calls(),
        [
            "up lo",
            "addr eth0 10.88.0.5/16",
            "nodad eth0",
            "addr6 eth0 fd00:88::5/64",
            "addr6 eth0 2001:db8:1::5/48",
            "up eth0",
            "route 0.0.0.0/0 via Some(10.88.0.1) dev None",
            "route ::/0 via Some(fd00:88::1) dev None",
            "route 2001:db8:2::/48 via Some(fe80::1) dev Some(\"eth0\")",
            "route fd00:99::/64 via None dev Some(\"eth0\")",
        ]
    );
}

#[test]
fn an_interface_without_ipv6_keeps_detection_on() {
    let sys = Record::with_nics(&[("02:00:00:00:00:05", "eth0")]);
    let cfg = NetworkConfig {
        interfaces: vec![nic("02:00:00:00:00:05", Some("10.0.0.2/24"), None)],
        ..Default::default()
    };
    configure(&cfg, &sys).unwrap();
    assert!(!sys.calls().iter().any(|c| c.starts_with("nodad")));
}

#[test]
fn macs_match_whatever_their_case() {
    let sys = Record::with_nics(&[("02:00:00:00:00:0a", "eth0")]);
    let cfg = NetworkConfig {
        interfaces: vec![nic("02:00:00:00:00:0A", Some("10.0.0.2/24"), None)],
        ..Default::default()
    };
    configure(&cfg, &sys).unwrap();
    assert!(sys.calls().contains(&"addr eth0 10.0.0.2/24".to_owned()));
}

#[test]
fn bad_requests_change_nothing_and_say_what_is_wrong() {
    let nics = [("02:00:00:00:00:05", "eth0")];
    let ok_nic = || nic("02:00:00:00:00:05", Some("10.0.0.2/24"), None);
    let cases: Vec<(NetworkConfig, &str)> = vec![
        (
            NetworkConfig {
                interfaces: vec![nic("02:00:00:00:00:99", None, None)],
                ..Default::default()
            },
            "02:00:00:00:00:99",
        ),
        (
            NetworkConfig {
                interfaces: vec![nic("02:00:00:00:00:05", Some("10.0.0.2"), None)],
                ..Default::default()
            },
            "prefix length",
        ),
        (
            NetworkConfig {
                interfaces: vec![nic("02:00:00:00:00:05", Some("fd00::2/64"), None)],
                ..Default::default()
            },
            "IPv4",
        ),
        (
            NetworkConfig {
                interfaces: vec![nic("02:00:00:00:00:05", Some("10.0.0.2/33"), None)],
                ..Default::default()
            },
            "prefix length",
        ),
        (
            NetworkConfig {
                interfaces: vec![nic("02:00:00:00:00:05", None, Some(20))],
                ..Default::default()
            },
            "MTU",
        ),
        (
            NetworkConfig {
                interfaces: vec![ok_nic()],
                routes: vec![route("10.1.2.3/16", Some("10.0.0.1"), None)],
                ..Default::default()
            },
            "host bits",
        ),
        (
            NetworkConfig {
                interfaces: vec![ok_nic()],
                routes: vec![route("10.1.0.0/16", None, None)],
                ..Default::default()
            },
            "needs a gateway or an interface",
        ),
        (
            NetworkConfig {
                interfaces: vec![ok_nic()],
                routes: vec![route("default", Some("gateway.local"), None)],
                ..Default::default()
            },
            "gateway",
        ),
        (
            NetworkConfig {
                interfaces: vec![InterfaceConfig {
                    ipv6: vec!["10.0.0.3/24".into()],
                    ..ok_nic()
                }],
                ..Default::default()
            },
            "not an IPv6 address",
        ),
        (
            NetworkConfig {
                interfaces: vec![InterfaceConfig {
                    ipv6: vec!["fd00::3/129".into()],
                    ..ok_nic()
                }],
                ..Default::default()
            },
            "not an IPv6 address",
        ),
        (
            NetworkConfig {
                interfaces: vec![ok_nic()],
                routes: vec![route("fd00:1::1/64", Some("fd00::1"), None)],
                ..Default::default()
            },
            "host bits",
        ),
        (
            NetworkConfig {
                interfaces: vec![ok_nic()],
                routes: vec![route("::/0", Some("10.0.0.1"), None)],
                ..Default::default()
            },
            "other address family",
        ),
        (
            NetworkConfig {
                interfaces: vec![ok_nic()],
                routes: vec![route("default", Some("fd00::1"), None)],
                ..Default::default()
            },
            "other address family",
        ),
        (
            NetworkConfig {
                interfaces: vec![ok_nic()],
                routes: vec![route("::/0", Some("fe80::1"), None)],
                ..Default::default()
            },
            "link-local gateway fe80::1 needs an interface",
        ),
        (
            NetworkConfig {
                interfaces: vec![ok_nic()],
                routes: vec![route("10.1.0.0", Some("10.0.0.1"), None)],
                ..Default::default()
            },
            "prefix length",
        ),
        (
            NetworkConfig {
                interfaces: vec![ok_nic()],
                dns: Some(DnsConfig {
                    servers: vec!["dns.example".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
            "name server",
        ),
        (
            NetworkConfig {
                dns: Some(DnsConfig {
                    search: vec!["a b".into()],
                    ..Default::default()
                }),
                ..Default::default()
            },
            "one word",
        ),
    ];
    for (cfg, why) in cases {
        let sys = Record::with_nics(&nics);
        let err = configure(&cfg, &sys).unwrap_err().to_string();
        assert!(err.contains(why), "{why}: {err}");
        assert!(
            sys.calls().is_empty(),
            "{why}: nothing may change: {:?}",
            sys.calls()
        );
    }
}

#[test]
fn a_failing_system_call_names_the_interface_and_step() {
    let mut sys = Record::with_nics(&[("02:00:00:00:00:05", "eth0")]);
    sys.fail_on = Some("addr");
    let cfg = NetworkConfig {
        interfaces: vec![nic("02:00:00:00:00:05", Some("10.0.0.2/24"), None)],
        ..Default::default()
    };
    let err = configure(&cfg, &sys).unwrap_err().to_string();
    assert!(err.contains("eth0: setting the address"), "{err}");
}

#[test]
fn netmasks_follow_prefix_lengths() {
    assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
    assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
    assert_eq!(netmask(17), Ipv4Addr::new(255, 255, 128, 0));
    assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
}
