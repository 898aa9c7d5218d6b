//! `runvm`: the OCI runtime command line.
//!
//! The runc-compatible commands arrive with the runtime work; today the binary
//! answers `--version` and rejects anything else with runc-style errors.

use std::sync::LazyLock;

use clap::Parser;

/// What `--version` prints after the name.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{}\nspec: 1.2.0\nagent protocol: {}",
        env!("CARGO_PKG_VERSION"),
        runvm_protocol::PROTOCOL_VERSION
    )
});

/// runvm: an OCI runtime that runs every container in its own KVM micro-VM.
#[derive(Debug, Parser)]
#[command(name = "runvm", version = VERSION.as_str(), about)]
struct Cli {
    /// Root directory for container state.
    #[arg(long, global = true, default_value = "/run/runvm")]
    root: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::bail!(
        "no command given (state root {}); see runvm --help",
        cli.root.display()
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn advertised_protocol_matches_the_protocol_crate() {
        let advertised = super::VERSION
            .rsplit(' ')
            .next()
            .unwrap()
            .parse::<u16>()
            .unwrap();
        assert_eq!(advertised, runvm_protocol::PROTOCOL_VERSION);
    }
}
