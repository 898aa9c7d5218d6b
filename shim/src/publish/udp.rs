//! A published UDP port. Datagrams have no connections, so the relay keeps
//! a flow per client address, as docker's userland proxy does: a socket of
//! its own connected to the container's port, whose answers go back to
//! that client from the published port. A flow ends once nothing passed
//! either way for [`IDLE`]; at most [`MAX_FLOWS`] exist at once, and a
//! client beyond them is not served (a debug log line) rather than letting
//! whoever can reach the port grow the monitor's sockets and threads
//! without bound.

use std::collections::HashMap;
use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::logger;

/// How long a flow outlives its last datagram (docker's UDP conntrack
/// timeout).
const IDLE: Duration = Duration::from_secs(90);
/// The most clients served at once.
const MAX_FLOWS: usize = 1024;
/// The largest UDP payload.
const MAX_DATAGRAM: usize = 65536;

/// One client's path to the container.
#[derive(Debug)]
struct Flow {
    /// Connected to the container's port.
    sock: UdpSocket,
    /// When a datagram last passed either way, in ms after [`Relay::epoch`].
    last: AtomicU64,
}

/// The published port and its flows.
#[derive(Debug)]
pub struct Relay {
    public: UdpSocket,
    target: SocketAddr,
    flows: Mutex<HashMap<SocketAddr, Arc<Flow>>>,
    epoch: Instant,
    idle: Duration,
    max_flows: usize,
}

impl Relay {
    /// Serves `public` (bound to the published port), relaying to `target`,
    /// for as long as this process lives.
    pub fn start(public: UdpSocket, target: SocketAddr) -> io::Result<()> {
        Self::start_with(public, target, IDLE, MAX_FLOWS).map(drop)
    }

    fn start_with(
        public: UdpSocket,
        target: SocketAddr,
        idle: Duration,
        max_flows: usize,
    ) -> io::Result<Arc<Relay>> {
        let relay = Arc::new(Relay {
            public,
            target,
            flows: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            idle,
            max_flows,
        });
        let serving = relay.clone();
        vmm::threads::named("publish-udp").spawn(move || serving.serve())?;
        Ok(relay)
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn flows(&self) -> MutexGuard<'_, HashMap<SocketAddr, Arc<Flow>>> {
        self.flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Client datagrams to the container.
    fn serve(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let (n, client) = match self.public.recv_from(&mut buf) {
                Ok(got) => got,
                // An ICMP error some earlier answer drew, or a signal.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionRefused
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    logger::monitor_error(&format!("published UDP port: {e}; no longer served"));
                    return;
                }
            };
            let Some(flow) = self.flow(client) else {
                continue;
            };
            flow.last.store(self.now(), Ordering::Relaxed);
            if let Err(e) = flow.sock.send(&buf[..n]) {
                logger::debug(&format!("published UDP port: to {}: {e}", self.target));
            }
        }
    }

    /// The flow of `client`, made (with the thread that carries its
    /// answers) on its first datagram; none past the limit.
    fn flow(self: &Arc<Self>, client: SocketAddr) -> Option<Arc<Flow>> {
        let mut flows = self.flows();
        if let Some(f) = flows.get(&client) {
            return Some(f.clone());
        }
        if flows.len() >= self.max_flows {
            logger::debug(&format!(
                "published UDP port: {} clients already, {client} not served",
                flows.len()
            ));
            return None;
        }
        let made = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).and_then(|sock| {
            sock.connect(self.target)?;
            sock.set_read_timeout(Some(self.idle))?;
            Ok(sock)
        });
        let sock = match made {
            Ok(s) => s,
            Err(e) => {
                logger::debug(&format!(
                    "published UDP port: a socket to {}: {e}",
                    self.target
                ));
                return None;
            }
        };
        let flow = Arc::new(Flow {
            sock,
            last: AtomicU64::new(self.now()),
        });
        let (relay, answering) = (self.clone(), flow.clone());
        vmm::threads::named("publish-udp-flow")
            .spawn(move || relay.answer(client, answering))
            .ok()?;
        flows.insert(client, flow.clone());
        Some(flow)
    }

    /// The container's datagrams back to `client`, until the flow is idle.
    fn answer(&self, client: SocketAddr, flow: Arc<Flow>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            match flow.sock.recv(&mut buf) {
                Ok(n) => {
                    flow.last.store(self.now(), Ordering::Relaxed);
                    if let Err(e) = self.public.send_to(&buf[..n], client) {
                        logger::debug(&format!("published UDP port: to {client}: {e}"));
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    // Checked under the lock, so that a client datagram
                    // either finds this flow still current or a new one.
                    let mut flows = self.flows();
                    let quiet = self.now() - flow.last.load(Ordering::Relaxed);
                    if quiet >= self.idle.as_millis() as u64 {
                        if flows.get(&client).is_some_and(|f| Arc::ptr_eq(f, &flow)) {
                            flows.remove(&client);
                        }
                        return;
                    }
                }
                // Nothing listens at the container's port (yet): an ICMP
                // error, not the flow's end.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionRefused | ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    logger::debug(&format!("published UDP port: from {}: {e}", self.target));
                    self.flows().remove(&client);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A "container" port on loopback answering `re:` + each datagram;
    /// returns its address and the sources it heard from.
    fn echo() -> (SocketAddr, Arc<Mutex<Vec<SocketAddr>>>) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = sock.local_addr().unwrap();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let seen = heard.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            loop {
                let (n, from) = sock.recv_from(&mut buf).unwrap();
                seen.lock().unwrap().push(from);
                let mut answer = b"re:".to_vec();
                answer.extend_from_slice(&buf[..n]);
                sock.send_to(&answer, from).unwrap();
            }
        });
        (at, heard)
    }

    fn client() -> UdpSocket {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        c
    }

    /// Sends `what` to `to` and returns the answer, if one came.
    fn ask(c: &UdpSocket, to: SocketAddr, what: &str) -> Option<String> {
        c.send_to(what.as_bytes(), to).unwrap();
        let mut buf = [0u8; 1500];
        let (n, from) = c.recv_from(&mut buf).ok()?;
        assert_eq!(from, to, "the answer comes from the published port");
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    fn start_relay(target: SocketAddr, idle: Duration, max: usize) -> (SocketAddr, Arc<Relay>) {
        let public = UdpSocket::bind("127.0.0.1:0").unwrap();
        let at = public.local_addr().unwrap();
        (at, Relay::start_with(public, target, idle, max).unwrap())
    }

    #[test]
    fn each_client_gets_its_own_flow_and_its_own_answers() {
        let (target, heard) = echo();
        let (port, relay) = start_relay(target, IDLE, MAX_FLOWS);
        let (a, b) = (client(), client());
        assert_eq!(ask(&a, port, "one").as_deref(), Some("re:one"));
        assert_eq!(ask(&b, port, "two").as_deref(), Some("re:two"));
        assert_eq!(ask(&a, port, "three").as_deref(), Some("re:three"));
        let heard = heard.lock().unwrap().clone();
        assert_eq!(heard.len(), 3);
        assert_eq!(heard[0], heard[2], "one flow per client");
        assert_ne!(heard[0], heard[1]);
        assert_eq!(relay.flows().len(), 2);
    }

    #[test]
    fn idle_flows_end_and_a_client_that_comes_back_gets_a_new_one() {
        let (target, heard) = echo();
        let (port, relay) = start_relay(target, Duration::from_millis(200), MAX_FLOWS);
        let a = client();
        assert_eq!(ask(&a, port, "x").as_deref(), Some("re:x"));
        let start = Instant::now();
        while !relay.flows().is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the flow never ended"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(ask(&a, port, "y").as_deref(), Some("re:y"));
        let heard = heard.lock().unwrap().clone();
        assert_ne!(heard[0], heard[1], "a new flow, from a new socket");
    }

    #[test]
    fn clients_past_the_limit_are_not_served_and_nothing_listening_is_survived() {
        // Nothing listens at the target: the ICMP errors end no flow and
        // leave the relay serving.
        let closed = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (port, relay) = start_relay(closed, IDLE, 2);
        let c = client();
        for _ in 0..3 {
            assert_eq!(ask(&c, port, "anyone?"), None);
        }
        assert_eq!(relay.flows().len(), 1);

        let (target, _) = echo();
        let (port, relay) = start_relay(target, IDLE, 2);
        let clients: Vec<UdpSocket> = (0..3).map(|_| client()).collect();
        assert!(ask(&clients[0], port, "a").is_some());
        assert!(ask(&clients[1], port, "b").is_some());
        assert_eq!(ask(&clients[2], port, "c"), None, "past the limit");
        assert!(
            ask(&clients[0], port, "d").is_some(),
            "the first still served"
        );
        assert_eq!(relay.flows().len(), 2);
    }
}
