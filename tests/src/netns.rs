//! Network namespaces as an engine's CNI plugin leaves them, for the tests
//! that hand one to runvm: a veth whose far end stays in the test's own
//! namespace, an address on each end and a default route (of IPv6 too,
//! where asked), plus a one-shot TCP peer on the far end.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::Command;
use std::thread::JoinHandle;

/// Runs `ip` (iproute2); panics with its stderr when it fails.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named namespace (`/run/netns/NAME`) with `eth0` inside, removed on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    host_end: String,
    /// The far end's address.
    pub host_ip: String,
    /// The far end's IPv6 address, once [`Netns::with_ipv6`] gave it one.
    pub host_ip6: Option<String>,
}

impl Netns {
    /// `tag` keeps names apart between tests; `net` is the first three
    /// octets of a /24 (the far end gets .1, eth0 .2 and a default route
    /// through .1).
    pub fn new(tag: &str, net: &str) -> Self {
        let id = std::process::id();
        let ns = Netns {
            name: format!("runvm-{tag}-{id}"),
            host_end: format!("rv{tag}{id}"),
            host_ip: format!("{net}.1"),
            host_ip6: None,
        };
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_end,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns.name,
        ]);
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &ns.host_end]);
        ip(&["link", "set", &ns.host_end, "up"]);
        ns.exec(&["ip", "addr", "add", &format!("{net}.2/24"), "dev", "eth0"]);
        ns.exec(&["ip", "link", "set", "eth0", "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&["ip", "route", "add", "default", "via", &ns.host_ip]);
        ns
    }

    /// Adds IPv6: `net6` is the first four groups of a /64 (`fd00:213:7:0`;
    /// the far end gets ::1, eth0 ::2 and a default route through ::1),
    /// without duplicate address detection, so both are usable at once.
    pub fn with_ipv6(mut self, net6: &str) -> Self {
        let host = format!("{net6}::1");
        ip(&[
            "addr",
            "add",
            &format!("{host}/64"),
            "dev",
            &self.host_end,
            "nodad",
        ]);
        self.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{net6}::2/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        self.exec(&["ip", "-6", "route", "add", "default", "via", &host]);
        self.host_ip6 = Some(host);
        self
    }

    /// `/run/netns/NAME`
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `cmd` inside the namespace; its stdout.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend(cmd);
        ip(&args)
    }

    /// eth0's MAC.
    pub fn mac(&self) -> String {
        self.exec(&["cat", "/sys/class/net/eth0/address"])
            .trim()
            .to_owned()
    }

    /// What a runtime must leave as it found it: the interfaces (by name;
    /// their carrier state changes on its own) and eth0's qdiscs and
    /// filters.
    pub fn fingerprint(&self) -> String {
        format!(
            "{}{}{}",
            self.exec(&["ls", "/sys/class/net"]),
            self.exec(&["tc", "qdisc", "show", "dev", "eth0"]),
            self.exec(&["tc", "filter", "show", "dev", "eth0", "ingress"])
        )
    }

    /// A peer on the far end that reads one line, answers `from-host` and
    /// hangs up; its port, and the line it got.
    pub fn serve_once(&self) -> (u16, JoinHandle<String>) {
        serve_once_at(&format!("{}:0", self.host_ip))
    }

    /// [`Netns::serve_once`] on the far end's IPv6 address.
    pub fn serve_once6(&self) -> (u16, JoinHandle<String>) {
        let ip6 = self.host_ip6.as_deref().expect("Netns::with_ipv6 first");
        serve_once_at(&format!("[{ip6}]:0"))
    }
}

/// A peer at `addr` (`IP:0` for any port) that reads one line, answers
/// `from-host` and hangs up; its port, and the line it got.
pub fn serve_once_at(addr: &str) -> (u16, JoinHandle<String>) {
    let listener = TcpListener::bind(addr).unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).unwrap();
        (&conn).write_all(b"from-host\n").unwrap();
        line
    });
    (port, server)
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_end])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
