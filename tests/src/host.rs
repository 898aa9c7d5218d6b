//! Host-side peers for guests under test.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;

/// A listening socket whose connections can be echoed.
pub trait EchoListener: Send + 'static {
    /// A connection.
    type Conn: Read + Write + Send + 'static;
    /// The next connection.
    fn next(&self) -> std::io::Result<Self::Conn>;
    /// A second handle on `c` and a way to shut its write side.
    fn split(c: &Self::Conn) -> std::io::Result<Self::Conn>;
    /// Shuts the write side.
    fn close_write(c: &Self::Conn);
}

impl EchoListener for UnixListener {
    type Conn = UnixStream;
    fn next(&self) -> std::io::Result<UnixStream> {
        self.accept().map(|(c, _)| c)
    }
    fn split(c: &UnixStream) -> std::io::Result<UnixStream> {
        c.try_clone()
    }
    fn close_write(c: &UnixStream) {
        let _ = c.shutdown(Shutdown::Write);
    }
}

impl EchoListener for TcpListener {
    type Conn = TcpStream;
    fn next(&self) -> std::io::Result<TcpStream> {
        self.accept().map(|(c, _)| c)
    }
    fn split(c: &TcpStream) -> std::io::Result<TcpStream> {
        c.try_clone()
    }
    fn close_write(c: &TcpStream) {
        let _ = c.shutdown(Shutdown::Write);
    }
}

/// Echoes every connection to `listener` (a guest reaching a vsock port
/// through the hybrid socket's `_PORT` listener, or a TCP port over its
/// NIC) until the process ends; each connection's write side is shut once
/// its guest stops sending.
pub fn echo_server<L: EchoListener>(listener: L) {
    thread::spawn(move || {
        while let Ok(mut conn) = listener.next() {
            thread::spawn(move || {
                if let Ok(mut w) = L::split(&conn) {
                    let _ = std::io::copy(&mut conn, &mut w);
                    L::close_write(&w);
                }
            });
        }
    });
}

/// Runs `ip ARGS`, panicking with its stderr when it fails.
pub fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether network interface `name` exists.
pub fn link_exists(name: &str) -> bool {
    std::process::Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A persistent TAP interface with `addr` (CIDR) on the host end, up,
/// deleted when dropped; a VMM attaches to it by name.
#[derive(Debug)]
pub struct HostTap(String);

impl HostTap {
    /// Creates `name` (which must not exist).
    pub fn create(name: &str, addr: &str) -> Self {
        ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        let tap = HostTap(name.to_owned());
        ip(&["addr", "add", addr, "dev", name]);
        ip(&["link", "set", name, "up"]);
        tap
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", "dev", &self.0])
            .output();
    }
}
