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

/// One published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish {
    /// The host address to listen on (0.0.0.0: all).
    pub host_ip: IpAddr,
    /// The host port.
    pub host_port: u16,
    /// The container's port.
    pub container_port: u16,
    /// TCP or UDP.
    pub proto: Proto,
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.host_ip, self.host_port, self.container_port
        )?;
        match self.proto {
            Proto::Tcp => Ok(()),
            Proto::Udp => f.write_str("/udp"),
        }
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

/// docker's `-p` forms: `HOST:CONTAINER`, `IP:HOST:CONTAINER`, each with
/// an optional `/tcp` or `/udp`.
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
        [host, container] => ("0.0.0.0", host, container),
        [ip, host, container] => (ip, host, container),
        [_] => bail!(
            "publish {spec:?}: give the host port too (HOST:CONTAINER); runvm does not pick one"
        ),
        _ => bail!("publish {spec:?}: expected [IP:]HOST:CONTAINER[/tcp|/udp]"),
    };
    let host_ip: IpAddr = ip
        .parse()
        .with_context(|| format!("publish {spec:?}: {ip:?} is not an IP address"))?;
    Ok(Publish {
        host_ip,
        host_port: port(host, "host port", spec)?,
        container_port: port(container, "container port", spec)?,
        proto,
    })
}

/// The annotation's value: comma-separated `IP:HOST:CONTAINER[/udp]`.
pub fn parse(annotation: &str, value: &str) -> anyhow::Result<Vec<Publish>> {
    let mut out: Vec<Publish> = Vec::new();
    for spec in value.split(',').filter(|s| !s.trim().is_empty()) {
        let p = parse_one(spec.trim()).with_context(|| format!("annotation {annotation}"))?;
        if out
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
/// this process lives.
pub fn start(rules: &[Publish], guest: Ipv4Addr) -> anyhow::Result<()> {
    let mut listeners = Vec::with_capacity(rules.len());
    for r in rules {
        let at = SocketAddr::new(r.host_ip, r.host_port);
        let bound = match r.proto {
            Proto::Tcp => TcpListener::bind(at).map(Listener::Tcp),
            Proto::Udp => UdpSocket::bind(at).map(Listener::Udp),
        };
        let l = bound.with_context(|| format!("cannot publish port {} on {at}", r))?;
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
    Ok(())
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
            ("80", "give the host port"),
            ("53:53/sctp", "cannot be published (tcp or udp)"),
            ("0:80", "not a port"),
            ("8080:99999", "not a port"),
            ("host:1:2", "not an IP address"),
            ("1:2:3:4", "expected"),
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
        start(&[rule], Ipv4Addr::LOCALHOST).unwrap();
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
    }
}
