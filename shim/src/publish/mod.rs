//! Published ports (`runvm run -p`, the `io.runvm.publish` annotation): the
//! monitor listens on a host port and carries each TCP connection, or each
//! UDP client's datagrams ([`udp`]), to the container's port at the guest's
//! address, as docker's userland proxy does. A proxy rather than DNAT
//! rules: it needs no netfilter, reaches the container from the host's own
//! loopback too, and lives and dies with the monitor, so nothing outlives
//! the container.

mod udp;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{bail, Context};

/// The transport a port is published for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// `/tcp`, the default.
    Tcp,
    /// `/udp`.
    Udp,
}

/// One published port; serialized in the annotation's form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Publish {
    /// The host address to listen on (0.0.0.0: all).
    pub host_ip: IpAddr,
    /// The host port; 0 until bound, for one the kernel chooses (docker's
    /// `-p CONTAINER` and `-p IP::CONTAINER`).
    pub host_port: u16,
    /// The container's port.
    pub container_port: u16,
    /// TCP or UDP.
    pub proto: Proto,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// The annotation's form, `IP:HOST:CONTAINER[/udp]` (`IP::CONTAINER` for
/// a host port still to be chosen), which [`parse_one`] reads back.
impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:", self.host_ip)?;
        if self.host_port != 0 {
            write!(f, "{}", self.host_port)?;
        }
        write!(f, ":{}", self.container_port)?;
        match self.proto {
            Proto::Tcp => Ok(()),
            Proto::Udp => f.write_str("/udp"),
        }
    }
}

impl TryFrom<String> for Publish {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        parse_one(&s).map_err(|e| format!("{e:#}"))
    }
}

impl From<Publish> for String {
    fn from(p: Publish) -> String {
        p.to_string()
    }
}

impl Publish {
    /// docker's `ps` form: `127.0.0.1:32768->80/tcp`.
    pub fn docker_ps(&self) -> String {
        format!(
            "{}:{}->{}/{}",
            self.host_ip,
            self.host_port,
            self.container_port,
            self.proto.name()
        )
    }

    /// docker's `port` form: `80/tcp -> 127.0.0.1:32768`.
    pub fn docker_port(&self) -> String {
        format!(
            "{}/{} -> {}:{}",
            self.container_port,
            self.proto.name(),
            self.host_ip,
            self.host_port
        )
    }
}

/// How long a connection waits for the container's port to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn port(s: &str, what: &str, spec: &str) -> anyhow::Result<u16> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => bail!("publish {spec:?}: {what} {s:?} is not a port (1-65535)"),
    }
}

/// docker's `-p` forms: `CONTAINER`, `HOST:CONTAINER`, `IP:HOST:CONTAINER`
/// and `IP::CONTAINER`, each with an optional `/tcp` or `/udp`; without a
/// host port, the kernel chooses one when the monitor binds it.
pub fn parse_one(spec: &str) -> anyhow::Result<Publish> {
    let (body, proto) = match spec.split_once('/') {
        Some((b, p)) => (b, p),
        None => (spec, "tcp"),
    };
    let proto = match proto {
        "tcp" => Proto::Tcp,
        "udp" => Proto::Udp,
        other => bail!("publish {spec:?}: {other:?} ports cannot be published (tcp or udp)"),
    };
    let parts: Vec<&str> = body.split(':').collect();
    let (ip, host, container) = match parts[..] {
        [container] => ("0.0.0.0", "", container),
        [host, container] => ("0.0.0.0", host, container),
        [ip, host, container] => (ip, host, container),
        _ => bail!("publish {spec:?}: expected [[IP:]HOST:]CONTAINER[/tcp|/udp]"),
    };
    let host_ip: IpAddr = ip
        .parse()
        .with_context(|| format!("publish {spec:?}: {ip:?} is not an IP address"))?;
    Ok(Publish {
        host_ip,
        host_port: match host {
            "" => 0,
            _ => port(host, "host port", spec)?,
        },
        container_port: port(container, "container port", spec)?,
        proto,
    })
}

/// The annotation's value: comma-separated `IP:HOST:CONTAINER[/udp]`.
pub fn parse(annotation: &str, value: &str) -> anyhow::Result<Vec<Publish>> {
    let mut out: Vec<Publish> = Vec::new();
    for spec in value.split(',').filter(|s| !s.trim().is_empty()) {
        let p = parse_one(spec.trim()).with_context(|| format!("annotation {annotation}"))?;
        if p.host_port != 0
            && out
                .iter()
                .any(|o| o.host_port == p.host_port && o.host_ip == p.host_ip && o.proto == p.proto)
        {
            bail!(
                "annotation {annotation}: host port {} is published twice",
                p.host_port
            );
        }
        out.push(p);
    }
    Ok(out)
}

/// Copies one direction until its end, then passes the end on.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

fn carry(client: TcpStream, target: SocketAddr) {
    let server = match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            crate::logger::debug(&format!("published port: cannot reach {target}: {e}"));
            return;
        }
    };
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = vmm::threads::named("publish-up").spawn(move || pipe(client2, server2));
    pipe(server, client);
    if let Ok(up) = up {
        let _ = up.join();
    }
}

/// A bound host port.
enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// Listens on every published host port (all bound before any is served,
/// so a port in use fails the container's `create`) and carries each
/// connection, or each UDP client's datagrams, to `guest` for as long as
/// this process lives. Returns the rules as bound, chosen host ports in.
pub fn start(rules: &[Publish], guest: Ipv4Addr) -> anyhow::Result<Vec<Publish>> {
    let mut listeners = Vec::with_capacity(rules.len());
    let mut bound_rules = Vec::with_capacity(rules.len());
    for r in rules {
        let at = SocketAddr::new(r.host_ip, r.host_port);
        let bound = match r.proto {
            Proto::Tcp => TcpListener::bind(at).map(Listener::Tcp),
            Proto::Udp => UdpSocket::bind(at).map(Listener::Udp),
        };
        let l = bound.with_context(|| format!("cannot publish port {} on {at}", r))?;
        let local = match &l {
            Listener::Tcp(t) => t.local_addr(),
            Listener::Udp(u) => u.local_addr(),
        }
        .context("the published port's address")?;
        bound_rules.push(Publish {
            host_port: local.port(),
            ..*r
        });
        listeners.push((l, SocketAddr::new(guest.into(), r.container_port)));
    }
    for (l, target) in listeners {
        match l {
            Listener::Tcp(l) => vmm::threads::named("publish")
                .spawn(move || {
                    for client in l.incoming() {
                        let Ok(client) = client else { continue };
                        let _ = vmm::threads::named("publish-conn")
                            .spawn(move || carry(client, target));
                    }
                })
                .map(drop),
            Listener::Udp(sock) => udp::Relay::start(sock, target),
        }
        .context("starting a published port's thread")?;
    }
    Ok(bound_rules)
}

/// `runvm port`: docker's lines for the ports a container's monitor bound.
pub fn port_lines(bound: &[Publish]) -> String {
    bound.iter().map(|p| p.docker_port() + "\n").collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn dockers_forms_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_one("8080:80").unwrap(),
            Publish {
                host_ip: Ipv4Addr::UNSPECIFIED.into(),
                host_port: 8080,
                container_port: 80,
                proto: Proto::Tcp,
            }
        );
        assert_eq!(
            parse_one("127.0.0.1:8443:443/tcp").unwrap().to_string(),
            "127.0.0.1:8443:443"
        );
        for (bad, why) in [
            ("53:53/sctp", "cannot be published (tcp or udp)"),
            ("0:80", "not a port"),
            ("8080:99999", "not a port"),
            ("host:1:2", "not an IP address"),
            ("1:2:3:4", "expected"),
            ("::81", "not an IP address"),
        ] {
            let e = format!("{:#}", parse_one(bad).unwrap_err());
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = format!("{:#}", parse("a", "8080:80,0.0.0.0:8080:81").unwrap_err());
        assert!(e.contains("published twice"), "{e}");
        assert_eq!(parse("a", "1:2, 127.0.0.1:3:4").unwrap().len(), 2);
        // UDP: its own rules, written back with the suffix; the same host
        // port may be published for both.
        let udp = parse_one("127.0.0.1:53:5353/udp").unwrap();
        assert_eq!(udp.proto, Proto::Udp);
        assert_eq!(udp.to_string(), "127.0.0.1:53:5353/udp");
        assert_eq!(parse_one(&udp.to_string()).unwrap(), udp);
        assert_eq!(parse("a", "53:53,53:53/udp").unwrap().len(), 2);
        // No host port: one to be chosen, which may appear more than once.
        let chosen = parse_one("80").unwrap();
        assert_eq!((chosen.host_port, chosen.container_port), (0, 80));
        assert_eq!(chosen.to_string(), "0.0.0.0::80");
        assert_eq!(parse_one(&chosen.to_string()).unwrap(), chosen);
        assert_eq!(
            parse_one("127.0.0.1::53/udp").unwrap().to_string(),
            "127.0.0.1::53/udp"
        );
        assert_eq!(parse("a", "80,127.0.0.1::80,0.0.0.0::80").unwrap().len(), 3);
        let bound = Publish {
            host_port: 32768,
            ..parse_one("127.0.0.1::53/udp").unwrap()
        };
        assert_eq!(bound.docker_ps(), "127.0.0.1:32768->53/udp");
        assert_eq!(bound.docker_port(), "53/udp -> 127.0.0.1:32768");
        assert_eq!(
            port_lines(&[parse_one("0.0.0.0:8080:80").unwrap(), bound]),
            "80/tcp -> 0.0.0.0:8080\n53/udp -> 127.0.0.1:32768\n"
        );
        let e = format!("{:#}", parse("a", "53:53/udp,53:54/udp").unwrap_err());
        assert!(e.contains("published twice"), "{e}");
    }

    #[test]
    fn a_published_port_carries_connections_both_ways() {
        // The "guest": a server on loopback that answers one line.
        let guest = TcpListener::bind("127.0.0.1:0").unwrap();
        let guest_port = guest.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut c, _) = guest.accept().unwrap();
            let mut got = [0u8; 5];
            c.read_exact(&mut got).unwrap();
            c.write_all(b"pong").unwrap();
            got
        });
        // A free host port: bound, noted, released.
        let host_port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rule = Publish {
            host_ip: Ipv4Addr::LOCALHOST.into(),
            host_port,
            container_port: guest_port,
            proto: Proto::Tcp,
        };
        assert_eq!(start(&[rule], Ipv4Addr::LOCALHOST).unwrap(), [rule]);
        // The same port again: in use.
        let e = format!("{:#}", start(&[rule], Ipv4Addr::LOCALHOST).unwrap_err());
        assert!(e.contains("cannot publish port"), "{e}");
        let mut c = TcpStream::connect(("127.0.0.1", host_port)).unwrap();
        c.write_all(b"ping!").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "pong");
        assert_eq!(&server.join().unwrap(), b"ping!");
        // A host port the kernel chooses, reported as bound.
        let chosen = Publish {
            host_port: 0,
            ..rule
        };
        let bound = start(&[chosen], Ipv4Addr::LOCALHOST).unwrap();
        assert_ne!(bound[0].host_port, 0);
        assert_eq!(bound[0].container_port, guest_port);
        TcpStream::connect(("127.0.0.1", bound[0].host_port)).unwrap();
    }
}
