//! Host-side peers for guests under test.

use std::os::unix::net::UnixListener;
use std::thread;

/// Echoes every connection to `listener` (a guest reaching a vsock port
/// through the hybrid socket's `_PORT` listener) until the process ends;
/// each connection's write side is shut once its guest stops sending.
pub fn echo_server(listener: UnixListener) {
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            thread::spawn(move || {
                let Ok(mut w) = conn.try_clone() else { return };
                let _ = std::io::copy(&mut conn, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}
