//! Host-side peers for guests under test.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::thread;

/// Echoes every connection to `listener` (a guest reaching a vsock port
/// through the hybrid socket's `_PORT` listener) until the process ends;
/// each connection's write side is shut once its guest stops sending.
pub fn echo_server(listener: UnixListener) {
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            thread::spawn(move || {
                if let Ok(w) = conn.try_clone() {
                    echo(conn, w, |w| w.shutdown(std::net::Shutdown::Write));
                }
            });
        }
    });
}

/// [`echo_server`] for TCP (a guest reaching the host over its NIC).
pub fn tcp_echo_server(listener: TcpListener) {
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            thread::spawn(move || {
                if let Ok(w) = conn.try_clone() {
                    echo(conn, w, |w| w.shutdown(std::net::Shutdown::Write));
                }
            });
        }
    });
}

fn echo<R: Read, W: Write>(mut r: R, mut w: W, close: impl FnOnce(&W) -> std::io::Result<()>) {
    let _ = std::io::copy(&mut r, &mut w);
    let _ = close(&w);
}
