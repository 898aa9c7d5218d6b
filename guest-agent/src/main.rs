//! runvm-agent: init of the micro-VM.
//!
//! It mounts the guest's pseudo filesystems and the container rootfs (a
//! virtio-fs tag named on the kernel command line), then serves the host
//! over vsock until told to shut down. Without a vsock device it only
//! reports that the guest reached userspace and resets (the boot smoke test).

mod init;
mod template;
mod vsock;

use runvm_agent::reaper::Reaper;
use runvm_agent::server::Agent;

use std::process::ExitCode;

/// Printed on the console once the agent runs as init; the host side waits for it.
pub const READY_MARKER: &str = "RUNVM_AGENT_READY";
/// Printed once the agent listens for the host on vsock.
pub const LISTENING_MARKER: &str = "RUNVM_AGENT_LISTENING";
/// Printed by a template's agent once it waits for a copy's setup: where
/// the host snapshots it.
pub const TEMPLATE_MARKER: &str = "RUNVM_AGENT_TEMPLATE_READY";

fn main() -> ExitCode {
    // As init, the arguments are the kernel command line's words that the
    // kernel did not take for itself: the guest's, not flags for the agent.
    if std::process::id() == 1 {
        return init::run();
    }
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
        if flag == "--hold-mount-ns" {
            return match runvm_agent::mount_ns::hold(std::path::Path::new(path), &[]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("runvm-agent: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    }
    if let [flag, path, mounts] = args.as_slice() {
        if flag == "--hold-mount-ns" {
            let held = serde_json::from_str::<Vec<runvm_protocol::GuestMount>>(mounts)
                .map_err(|e| format!("mount list: {e}"))
                .and_then(|m| runvm_agent::mount_ns::hold(std::path::Path::new(path), &m));
            return match held {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("runvm-agent: {e}");
                    ExitCode::FAILURE
                }
            };
        }
    }
    eprintln!("runvm-agent: must run as PID 1 inside a runvm guest (try --version)");
    ExitCode::from(2)
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
    let reaper = match Reaper::start() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("runvm-agent: cannot start the reaper: {e}");
            return ExitCode::FAILURE;
        }
    };
    let agent = Agent::new(reaper, None, Box::new(|| std::process::exit(0)));
    for conn in listener.incoming() {
        let served = conn.and_then(|c| {
            let out = c.try_clone()?;
            agent.serve(c, out)
        });
        if let Err(e) = served {
            eprintln!("runvm-agent: connection ended: {e}");
        }
    }
    ExitCode::SUCCESS
}
