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
    if std::process::id() != 1 {
        eprintln!("runvm-agent: must run as PID 1 inside a runvm guest (try --version)");
        return ExitCode::from(2);
    }
    init::run()
}
