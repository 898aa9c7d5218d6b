//! runvm-agent: init of the micro-VM.
//!
//! For now it prepares the guest's pseudo filesystems, reports that the guest
//! reached userspace on the console, and resets the VM. The host channel and
//! process management arrive with the agent protocol.

mod init;

use std::process::ExitCode;

/// Printed on the console once the agent runs as init; the host side waits for it.
pub const READY_MARKER: &str = "RUNVM_AGENT_READY";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!(
            "runvm-agent {} (protocol {})",
            env!("CARGO_PKG_VERSION"),
            runvm_protocol::PROTOCOL_VERSION
        );
        return ExitCode::SUCCESS;
    }
    if let [flag, path] = args.as_slice() {
        if flag == "--serve-unix" {
            return serve_unix(path);
        }
    }
    if std::process::id() != 1 {
        eprintln!("runvm-agent: must run as PID 1 inside a runvm guest (try --version)");
        return ExitCode::from(2);
    }
    init::run()
}

/// Development and test mode: serve host connections on a Unix socket, one
/// at a time, as the agent will over vsock inside the guest.
fn serve_unix(path: &str) -> ExitCode {
    let listener = match std::os::unix::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("runvm-agent: cannot listen on {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    for conn in listener.incoming() {
        let served = conn.and_then(|c| {
            let out = c.try_clone()?;
            runvm_agent::server::serve(c, out)
        });
        if let Err(e) = served {
            eprintln!("runvm-agent: connection ended: {e}");
        }
    }
    ExitCode::SUCCESS
}
