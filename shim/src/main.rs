//! `runvm`: the OCI runtime command line. Container engines call it like
//! runc; each container runs in its own KVM micro-VM, whose VMM lives in the
//! container's monitor process (see `monitor`).

mod assets;
mod bundle;
mod console;
mod console_log;
mod containers;
mod control;
mod exec;
mod fdpass;
mod host_cgroup;
mod image_cmd;
mod info;
mod isolation;
mod kernel_params;
mod lifecycle;
mod limits;
mod logger;
mod monitor;
mod monitor_process;
mod mounts;
mod network;
mod publish;
mod ready;
mod relay;
mod report;
mod run_args;
mod signals;
mod state;
mod stdout;
mod template;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::LazyLock;

use clap::{Parser, Subcommand};

use lifecycle::Globals;

/// What `--version` prints after the name.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{}\nspec: {}\nagent protocol: {}",
        env!("CARGO_PKG_VERSION"),
        info::OCI_VERSION,
        runvm_protocol::PROTOCOL_VERSION
    )
});

/// runvm: an OCI runtime that runs every container in its own KVM micro-VM.
#[derive(Debug, Parser)]
#[command(name = "runvm", version = VERSION.as_str(), about)]
struct Cli {
    /// Root directory for container state.
    #[arg(long, global = true, default_value = "/run/runvm")]
    root: PathBuf,
    /// Also write log lines (errors, warnings, debug) to this file.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Log line format: text or json.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log debug lines too.
    #[arg(long, global = true)]
    debug: bool,
    /// The image store (images, their unpacked rootfs, containers made
    /// from them).
    #[arg(long, global = true, env = "RUNVM_STORE", default_value = image_cmd::DEFAULT_STORE)]
    store: PathBuf,
    /// Accepted for runc compatibility; a VM has no host cgroup driver to pick.
    #[arg(long, global = true, hide = true)]
    systemd_cgroup: bool,
    /// Accepted for runc compatibility; ignored.
    #[arg(long, global = true, hide = true)]
    criu: Option<String>,
    /// Accepted for runc compatibility; ignored.
    #[arg(long, global = true, hide = true, num_args = 0..=1, default_missing_value = "true")]
    rootless: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a container: boot its micro-VM and prepare the process.
    Create {
        /// Container ID.
        id: String,
        #[command(flatten)]
        opts: CreateOpts,
    },
    /// Start the process of a created container.
    Start {
        /// Container ID.
        id: String,
    },
    /// Print a container's state as OCI state JSON.
    State {
        /// Container ID.
        id: String,
    },
    /// Send a signal to the container's process.
    Kill {
        /// Signal every process of the container.
        #[arg(short, long)]
        all: bool,
        /// Container ID.
        id: String,
        /// Signal name (TERM, SIGKILL) or number.
        #[arg(default_value = "SIGTERM")]
        signal: String,
    },
    /// Delete a container (its VM and state).
    Delete {
        /// Also delete a running container, killing it.
        #[arg(short, long)]
        force: bool,
        /// Container ID.
        id: String,
    },
    /// Run a container: `runvm run [OPTIONS] IMAGE [CMD...]` (docker's), or
    /// `runvm run ID --bundle B` (runc's); `runvm run --help` for both.
    #[command(disable_help_flag = true)]
    Run {
        /// The options and arguments of either form.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Stop containers: SIGTERM, then SIGKILL after a grace period.
    Stop {
        /// Seconds to wait before SIGKILL.
        #[arg(short, long, default_value_t = 10)]
        time: u64,
        /// Container IDs.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove containers made by `runvm run IMAGE`.
    Rm {
        /// Also remove running containers, killing them.
        #[arg(short, long)]
        force: bool,
        /// Container IDs.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Print what a container made by `runvm run IMAGE` wrote.
    Logs {
        /// Keep printing until the container stops.
        #[arg(short, long)]
        follow: bool,
        /// Container ID.
        id: String,
    },
    /// Manage images: import, create, ls, inspect, rm, prune.
    Image {
        #[command(subcommand)]
        cmd: image_cmd::ImageCmd,
    },
    /// Internal: removes a `run -d --rm` container once it stops.
    #[command(hide = true)]
    Reap {
        /// Container ID.
        id: String,
    },
    /// Run one more process in a running container.
    Exec {
        /// Container ID.
        id: String,
        #[command(flatten)]
        opts: exec::ExecOpts,
    },
    /// List the processes of a container (guest PIDs); without an ID, the
    /// containers `runvm run IMAGE` made.
    Ps {
        /// table or json (a JSON array of PIDs).
        #[arg(short, long, default_value = "table")]
        format: String,
        /// Without an ID: stopped containers too.
        #[arg(short, long)]
        all: bool,
        /// Without an ID: only IDs.
        #[arg(short, long)]
        quiet: bool,
        /// Container ID.
        id: Option<String>,
        /// ps options: not supported (the processes are in the guest).
        #[arg(trailing_var_arg = true, hide = true)]
        ps_args: Vec<String>,
    },
    /// List a container's published ports as docker's `port` does
    /// (`80/tcp -> 0.0.0.0:32768`), host ports the kernel chose included.
    Port {
        /// Container ID.
        id: String,
    },
    /// Print a container's resource use as runc's events (JSON lines).
    Events {
        /// Print one stats record and exit.
        #[arg(long)]
        stats: bool,
        /// Seconds between records.
        #[arg(long, default_value = "5", value_parser = parse_seconds)]
        interval: std::time::Duration,
        /// Container ID.
        id: String,
    },
    /// Change a container's resource limits (its cgroup in the guest).
    Update {
        #[command(flatten)]
        opts: limits::UpdateOpts,
        /// Container ID.
        id: String,
    },
    /// Pause a container: its VM's vCPUs stop.
    Pause {
        /// Container ID.
        id: String,
    },
    /// Resume a paused container.
    Resume {
        /// Container ID.
        id: String,
    },
    /// List containers.
    List {
        /// table or json.
        #[arg(short, long, default_value = "table")]
        format: String,
        /// Only IDs.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Write a default config.json.
    Spec {
        /// Where to write it.
        #[arg(short, long, default_value = ".")]
        bundle: PathBuf,
    },
    /// Print what this runtime supports (JSON).
    Features,
    /// Internal: a detached exec's stand-in (started by exec --detach).
    #[command(hide = true)]
    ExecWait,
    /// Internal: the container's monitor process (started by create/run).
    #[command(hide = true)]
    Monitor {
        /// Container ID.
        id: String,
        /// Where the terminal's master goes (terminal mode).
        #[arg(long)]
        console_socket: Option<PathBuf>,
        /// A connected socket (inherited) to send the terminal's master on.
        #[arg(long, conflicts_with = "console_socket")]
        console_fd: Option<i32>,
        /// A pipe (inherited) to tell `create` on once the container is created.
        #[arg(long)]
        ready_fd: Option<i32>,
    },
}

#[derive(Debug, clap::Args)]
struct CreateOpts {
    /// The bundle directory (config.json and the rootfs).
    #[arg(short, long, default_value = ".")]
    bundle: PathBuf,
    /// Write the monitor's PID (the container's init, to the host) here.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Unix socket to send the terminal's master fd to (terminal mode).
    #[arg(long)]
    console_socket: Option<PathBuf>,
    /// Accepted for runc compatibility; the guest always pivots.
    #[arg(long)]
    no_pivot: bool,
    /// Accepted for runc compatibility; the guest has its own keyring.
    #[arg(long)]
    no_new_keyring: bool,
    /// Pass N more fds to the container: not supported by runvm (must be 0).
    #[arg(long, default_value_t = 0)]
    preserve_fds: u32,
}

impl CreateOpts {
    fn check(&self) -> anyhow::Result<()> {
        if self.preserve_fds > 0 {
            anyhow::bail!("--preserve-fds is not supported: a micro-VM cannot inherit host fds");
        }
        for (set, flag) in [
            (self.no_pivot, "--no-pivot"),
            (self.no_new_keyring, "--no-new-keyring"),
        ] {
            if set {
                logger::debug(&format!("ignoring {flag}: it does not apply to a micro-VM"));
            }
        }
        Ok(())
    }
}

/// `5`, `1.5` or `500ms` (runc takes Go durations such as `5s`).
fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("invalid interval {s:?}");
    if let Some(ms) = s.strip_suffix("ms") {
        return ms
            .parse::<u64>()
            .map(std::time::Duration::from_millis)
            .map_err(|_| bad());
    }
    let secs = s.strip_suffix('s').unwrap_or(s);
    secs.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(std::time::Duration::from_secs_f64)
        .ok_or_else(bad)
}

fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let g = Globals {
        root: cli.root.clone(),
        log: cli.log.clone(),
        log_format: cli.log_format.clone(),
        debug: cli.debug,
    };
    if cli.systemd_cgroup || cli.criu.is_some() || cli.rootless.is_some() {
        logger::debug(
            "ignoring --systemd-cgroup/--criu/--rootless: they do not apply to a micro-VM",
        );
    }
    match cli.command {
        Cmd::Create { id, opts } => {
            opts.check()?;
            lifecycle::create(
                &g,
                &id,
                &opts.bundle,
                opts.pid_file.as_deref(),
                opts.console_socket.as_deref(),
            )?;
        }
        Cmd::Start { id } => lifecycle::start(&g, &id)?,
        Cmd::State { id } => stdout::line(&info::state(&g.root, &id)?)?,
        Cmd::Kill { all, id, signal } => lifecycle::kill_container(&g, &id, &signal, all)?,
        Cmd::Delete { force, id } => lifecycle::delete(&g, &id, force)?,
        Cmd::Run { args } => return run(&g, &cli.store, args),
        Cmd::Stop { time, ids } => {
            for id in ids {
                containers::stop(&g, &cli.store, &id, std::time::Duration::from_secs(time))?;
                stdout::line(&id)?;
            }
        }
        Cmd::Rm { force, ids } => {
            for id in ids {
                containers::rm(&g, &cli.store, &id, force)?;
                stdout::line(&id)?;
            }
        }
        Cmd::Logs { follow, id } => containers::logs(&g, &cli.store, &id, follow)?,
        Cmd::Image { cmd } => image_cmd::dispatch(&cli.store, cmd)?,
        Cmd::Reap { id } => containers::reap(&g, &cli.store, &id)?,
        Cmd::Exec { id, opts } => return exec::exec(&g, &id, &opts),
        Cmd::ExecWait => return exec::waiter(),
        Cmd::Pause { id } => lifecycle::pause(&g, &id)?,
        Cmd::Port { id } => {
            let r = state::Root::new(&g.root).open(&id)?.load_live()?;
            // A stopped container's ports went with its monitor.
            if r.status != state::Status::Stopped {
                stdout::print(&publish::port_lines(&r.published))?;
            }
        }
        Cmd::Ps {
            format: _,
            all,
            quiet,
            id: None,
            ps_args,
        } => {
            if !ps_args.is_empty() {
                anyhow::bail!("give a container ID before ps options");
            }
            stdout::print(&containers::list(&g, &cli.store, all, quiet)?)?;
        }
        Cmd::Ps {
            format,
            id: Some(id),
            ps_args,
            ..
        } => {
            if !ps_args.is_empty() {
                anyhow::bail!("ps options are not supported: the processes live in the guest");
            }
            stdout::print(&report::ps(&g, &id, &format)?)?;
        }
        Cmd::Events {
            stats,
            interval,
            id,
        } => report::events(&g, &id, stats, interval, std::io::stdout())?,
        Cmd::Resume { id } => lifecycle::resume(&g, &id)?,
        Cmd::Update { opts, id } => lifecycle::update(&g, &id, &opts)?,
        Cmd::List { format, quiet } => stdout::print(&info::list(&g.root, &format, quiet)?)?,
        Cmd::Spec { bundle } => info::spec(&bundle)?,
        Cmd::Features => stdout::print(&info::features()?)?,
        Cmd::Monitor {
            id,
            console_socket,
            console_fd,
            ready_fd,
        } => {
            let dir = state::Root::new(&g.root).open(&id)?;
            let ready = ready_fd.map(ready::monitor_end).transpose()?;
            let target = match (console_socket, console_fd) {
                (Some(s), _) => Some(console::Target::Socket(s)),
                (None, Some(fd)) => Some(console::Target::Fd(fd)),
                (None, None) => None,
            };
            return Ok(monitor::run(&dir, target, ready));
        }
    }
    Ok(0)
}

/// The options of runc's `run`.
#[derive(Debug, Parser)]
#[command(name = "runvm run", no_binary_name = true)]
struct OciRun {
    /// Container ID.
    id: String,
    #[command(flatten)]
    opts: CreateOpts,
    /// Return once the process started.
    #[arg(short, long)]
    detach: bool,
    /// Keep the container's state after it exits.
    #[arg(long)]
    keep: bool,
}

/// `runvm run`: runc's form or docker's (see `run_args::form`).
fn run(g: &Globals, store: &std::path::Path, args: Vec<String>) -> anyhow::Result<i32> {
    let has_config = std::path::Path::new("config.json").is_file();
    match run_args::form(&args, has_config) {
        run_args::RunForm::Oci => {
            let a = OciRun::try_parse_from(&args).unwrap_or_else(|e| e.exit());
            a.opts.check()?;
            lifecycle::run(
                g,
                &a.id,
                &a.opts.bundle,
                a.opts.pid_file.as_deref(),
                a.opts.console_socket.as_deref(),
                a.detach,
                a.keep,
            )
        }
        run_args::RunForm::Image => {
            let a = run_args::RunArgs::try_parse_from(&args).unwrap_or_else(|e| e.exit());
            containers::run(g, store, &a)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = logger::init(cli.log.as_deref(), cli.log_format == "json", cli.debug) {
        eprintln!("runvm: error: {e:#}");
        return ExitCode::FAILURE;
    }
    let monitor = matches!(cli.command, Cmd::Monitor { .. } | Cmd::ExecWait);
    match dispatch(cli) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(255)),
        Err(e) => {
            let msg = format!("{e:#}");
            // The monitor's stderr is the container's; its errors go to the
            // log and to `create` (monitor.err) instead.
            if !monitor {
                logger::error(&msg);
                eprintln!("runvm: error: {msg}");
            }
            match e.downcast_ref::<containers::RunFailed>() {
                Some(f) => ExitCode::from(f.code),
                None => ExitCode::FAILURE,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn intervals_parse_like_runcs() {
        use std::time::Duration;
        assert_eq!(super::parse_seconds("5").unwrap(), Duration::from_secs(5));
        assert_eq!(super::parse_seconds("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(
            super::parse_seconds("1.5").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            super::parse_seconds("250ms").unwrap(),
            Duration::from_millis(250)
        );
        for bad in ["", "x", "-1", "5m", "inf"] {
            assert!(super::parse_seconds(bad).is_err(), "{bad}");
        }
    }

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
