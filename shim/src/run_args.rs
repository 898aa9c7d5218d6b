//! `runvm run IMAGE ...`: docker's options, and the bundle config they and
//! the image's config make. Pure, so the rules are unit-tested without a VM.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};

use crate::bundle::ANN_ROOTFS_OVERLAY;

/// Docker's default capability set: what a `docker run` process holds.
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// PATH when the image sets none (docker's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The CPU period `--cpus` is expressed in (docker's).
const CPU_PERIOD: u64 = 100_000;

/// Run a command in a new container from an image, in its own micro-VM.
///
/// With --bundle (or another runc-only flag: --pid-file, --console-socket,
/// --keep, --preserve-fds), or a lone ID in a directory holding
/// config.json, `runvm run` is runc's instead: `runvm run ID --bundle B`.
#[derive(Debug, Parser)]
#[command(name = "runvm run", no_binary_name = true)]
pub struct RunArgs {
    /// Remove the container when it exits.
    #[arg(long)]
    pub rm: bool,
    /// Run in the background and print the container's ID.
    #[arg(short, long)]
    pub detach: bool,
    /// Keep stdin open and pass it to the container.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the container a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// The container's name (its ID for the other commands).
    #[arg(long)]
    pub name: Option<String>,
    /// Set an environment variable: K=V, or K to pass this one's value.
    #[arg(short, long = "env")]
    pub env: Vec<String>,
    /// The working directory in the container.
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// The user: name|uid[:group|gid].
    #[arg(short, long)]
    pub user: Option<String>,
    /// Share a host directory: /HOST:/GUEST[:ro|rw].
    #[arg(short, long = "volume")]
    pub volume: Vec<String>,
    /// Memory limit (bytes, or with k, m, g): the VM gets this plus its
    /// kernel's share.
    #[arg(short, long)]
    pub memory: Option<String>,
    /// vCPUs (rounded up to a whole number).
    #[arg(long)]
    pub cpus: Option<f64>,
    /// The network: none (loopback only), bridge (an address on runvm's
    /// bridge, 10.90.0.0/16, with NAT to the outside, as docker's default
    /// network), or ns:PATH to take over the interfaces, addresses and
    /// routes of an existing network namespace (as podman's --network
    /// ns:PATH).
    #[arg(long, default_value = "none")]
    pub network: String,
    /// Publish a container's port on the host: CONTAINER, HOST:CONTAINER,
    /// IP:HOST:CONTAINER or IP::CONTAINER (no HOST: one the kernel chooses,
    /// shown by `runvm port` and `ps`), then /tcp (the default) or /udp (repeatable;
    /// needs --network bridge or ns:PATH).
    #[arg(short = 'p', long)]
    pub publish: Vec<String>,
    /// Set an annotation of the container's config, KEY=VALUE (runvm's
    /// own: io.runvm.vcpus, io.runvm.memory_mib, io.runvm.boot_timeout...).
    #[arg(long)]
    pub annotation: Vec<String>,
    /// Pull the image when it is missing (missing) or not (never).
    #[arg(long, default_value = "missing", value_parser = ["missing", "never"])]
    pub pull: String,
    #[command(flatten)]
    pub pull_args: crate::image_cmd::PullArgs,
    /// Override the image's entrypoint ("" clears it).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// The image: name, ID or ID prefix.
    pub image: String,
    /// The command and its arguments (default: the image's Cmd).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// runc's `run` flags that docker's has not: any of them picks runc's form.
const OCI_ONLY_FLAGS: &[&str] = &[
    "-b",
    "--bundle",
    "--pid-file",
    "--console-socket",
    "--keep",
    "--preserve-fds",
    "--no-pivot",
    "--no-new-keyring",
];

/// docker-form flags that take a value as the next argument.
const VALUE_FLAGS: &[&str] = &[
    "--name",
    "-e",
    "--env",
    "-w",
    "--workdir",
    "-u",
    "--user",
    "-v",
    "--volume",
    "-m",
    "--memory",
    "--cpus",
    "--entrypoint",
    "--annotation",
    "-p",
    "--publish",
    "--network",
    "--pull",
    "--username",
];

/// Which `run` the arguments are.
#[derive(Debug, PartialEq, Eq)]
pub enum RunForm {
    /// runc's: an ID and a bundle.
    Oci,
    /// docker's: an image and a command.
    Image,
}

/// Picks the form from the options before the first positional argument
/// (later ones belong to the container's command).
pub fn form(args: &[String], cwd_has_config: bool) -> RunForm {
    let mut positionals = 0;
    let mut docker_flag = false;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let flag = a.split_once('=').map_or(a, |(f, _)| f);
        if OCI_ONLY_FLAGS.contains(&flag) {
            return RunForm::Oci;
        }
        if a == "--" {
            positionals += args.len() - i - 1;
            break;
        }
        if !a.starts_with('-') || a == "-" {
            // runc takes its flags after the ID too; in docker's form the
            // image is followed by the command, whose flags are its own.
            let rest = &args[i + 1..];
            let flags = rest.iter().take_while(|r| r.starts_with('-'));
            if flags
                .clone()
                .any(|r| OCI_ONLY_FLAGS.contains(&r.split_once('=').map_or(r.as_str(), |(f, _)| f)))
            {
                return RunForm::Oci;
            }
            positionals += 1 + rest.len();
            break;
        } else {
            docker_flag |= !matches!(a, "-d" | "--detach" | "-h" | "--help");
            if VALUE_FLAGS.contains(&a) {
                i += 1;
            }
        }
        i += 1;
    }
    if cwd_has_config && positionals == 1 && !docker_flag {
        RunForm::Oci
    } else {
        RunForm::Image
    }
}

/// What the image's config says about running it (docker's field names).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ImageRunConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

impl ImageRunConfig {
    /// Reads the `config` object of an image configuration.
    pub fn from_image_config(v: &Value) -> Self {
        let c = &v["config"];
        let strings = |k: &str| -> Vec<String> {
            c[k].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let string = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
        ImageRunConfig {
            env: strings("Env"),
            entrypoint: strings("Entrypoint"),
            cmd: strings("Cmd"),
            working_dir: string("WorkingDir"),
            user: string("User"),
        }
    }
}

/// Who the process runs as, resolved in the image's /etc/passwd and
/// /etc/group.
#[derive(Debug, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub home: String,
}

/// One line of /etc/passwd or /etc/group, split on ':'.
fn entries(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect::<Vec<_>>())
}

/// Resolves docker's `User` (`name`, `uid`, `name:group`, `uid:gid`)
/// against the image's passwd and group files (empty when absent).
pub fn resolve_user(spec: &str, passwd: &str, group: &str) -> anyhow::Result<ResolvedUser> {
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let user = if user.is_empty() { "0" } else { user };
    let by_user = entries(passwd)
        .filter(|f| f.len() >= 7)
        .find(|f| match user.parse::<u32>() {
            Ok(uid) => f[2].parse::<u32>() == Ok(uid),
            Err(_) => f[0] == user,
        });
    let (uid, mut gid, name, home) = match (&by_user, user.parse::<u32>()) {
        (Some(f), _) => (
            f[2].parse::<u32>()
                .with_context(|| format!("invalid uid in the image's /etc/passwd for {user}"))?,
            f[3].parse::<u32>()
                .with_context(|| format!("invalid gid in the image's /etc/passwd for {user}"))?,
            Some(f[0]),
            f[5].to_owned(),
        ),
        (None, Ok(uid)) => (uid, 0, None, "/".to_owned()),
        (None, Err(_)) => {
            bail!("unable to find user {user}: no matching entries in the image's /etc/passwd")
        }
    };
    if let Some(g) = grp.filter(|g| !g.is_empty()) {
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => entries(group)
                .filter(|f| f.len() >= 3)
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .with_context(|| {
                    format!(
                        "unable to find group {g}: no matching entries in the image's /etc/group"
                    )
                })?,
        };
    }
    // Supplementary groups: those listing the user as a member, as docker
    // sets them (only without an explicit group).
    let mut additional_gids = Vec::new();
    if let (Some(name), None) = (name, grp) {
        for f in entries(group).filter(|f| f.len() >= 4) {
            if f[3].split(',').any(|m| m == name) {
                if let Ok(g) = f[2].parse::<u32>() {
                    if g != gid && !additional_gids.contains(&g) {
                        additional_gids.push(g);
                    }
                }
            }
        }
    }
    Ok(ResolvedUser {
        uid,
        gid,
        additional_gids,
        home: if home.is_empty() { "/".into() } else { home },
    })
}

/// Docker's `--memory`: bytes, or a number with b, k, m or g.
pub fn parse_memory(s: &str) -> anyhow::Result<u64> {
    let bad = || format!("invalid memory size {s:?}: use bytes or a number with k, m or g");
    let lower = s.trim().to_ascii_lowercase();
    let (num, unit) = match lower.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => lower.split_at(i),
        None => (lower.as_str(), ""),
    };
    let unit = unit.trim_end_matches('b');
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        _ => bail!(bad()),
    };
    let n: u64 = num.parse().with_context(bad)?;
    let bytes = n.checked_mul(1 << shift).with_context(bad)?;
    // Below this the guest's container could not even start (docker's
    // minimum is 6 MiB).
    if bytes < 6 << 20 {
        bail!("memory limit {s:?} is too small: the minimum is 6m");
    }
    Ok(bytes)
}

/// A `-v HOST:GUEST[:ro|rw]`.
#[derive(Debug, PartialEq, Eq)]
pub struct Volume {
    pub host: PathBuf,
    pub guest: String,
    pub read_only: bool,
}

pub fn parse_volume(s: &str) -> anyhow::Result<Volume> {
    let parts: Vec<&str> = s.split(':').collect();
    let (host, guest, opts) = match parts.as_slice() {
        [h, g] => (*h, *g, ""),
        [h, g, o] => (*h, *g, *o),
        _ => bail!("invalid volume {s:?}: use /HOST:/GUEST[:ro|rw]"),
    };
    if !host.starts_with('/') {
        bail!("invalid volume {s:?}: named volumes are not supported; give an absolute host path");
    }
    if !guest.starts_with('/') || guest.split('/').any(|c| c == "..") || guest == "/" {
        bail!("invalid volume {s:?}: the container path must be absolute, not / and without ..");
    }
    let mut read_only = false;
    for o in opts.split(',').filter(|o| !o.is_empty()) {
        match o {
            "ro" => read_only = true,
            "rw" => read_only = false,
            _ => bail!("invalid volume option {o:?} in {s:?}: use ro or rw"),
        }
    }
    let host = Path::new(host)
        .canonicalize()
        .with_context(|| format!("volume {s:?}: host path {host} does not exist"))?;
    if !host.is_dir() && !host.is_file() {
        bail!(
            "volume {s:?}: {} is neither a directory nor a file",
            host.display()
        );
    }
    Ok(Volume {
        host,
        guest: guest.to_owned(),
        read_only,
    })
}

/// The process's argv: docker's entrypoint and command rules.
pub fn argv(args: &RunArgs, image: &ImageRunConfig) -> anyhow::Result<Vec<String>> {
    let (entrypoint, cmd) = match &args.entrypoint {
        Some(e) if e.is_empty() => (Vec::new(), args.command.clone()),
        Some(e) => (vec![e.clone()], args.command.clone()),
        None if args.command.is_empty() => (image.entrypoint.clone(), image.cmd.clone()),
        None => (image.entrypoint.clone(), args.command.clone()),
    };
    let argv: Vec<String> = entrypoint.into_iter().chain(cmd).collect();
    if argv.is_empty() {
        bail!("no command specified: the image has no Entrypoint or Cmd; give one after the image");
    }
    Ok(argv)
}

/// The environment: the image's, `-e` on top, then the variables docker
/// always sets.
pub fn environment(
    args: &RunArgs,
    image: &ImageRunConfig,
    hostname: &str,
    home: &str,
    host_var: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Vec<String>> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: String| match env.iter_mut().find(|(ek, _)| ek == k) {
        Some(e) => e.1 = v,
        None => env.push((k.to_owned(), v)),
    };
    for e in &image.env {
        match e.split_once('=') {
            Some((k, v)) => set(k, v.to_owned()),
            None => set(e, String::new()),
        }
    }
    for e in &args.env {
        match e.split_once('=') {
            Some(("", _)) => bail!("invalid environment variable {e:?}: the name is empty"),
            Some((k, v)) => set(k, v.to_owned()),
            // docker: `-e NAME` passes this process's NAME, if set.
            None => {
                if let Some(v) = host_var(e) {
                    set(e, v);
                }
            }
        }
    }
    let mut out: Vec<String> = Vec::new();
    if !env.iter().any(|(k, _)| k == "PATH") {
        out.push(format!("PATH={DEFAULT_PATH}"));
    }
    out.push(format!("HOSTNAME={hostname}"));
    if args.tty && !env.iter().any(|(k, _)| k == "TERM") {
        out.push("TERM=xterm".into());
    }
    out.extend(
        env.iter()
            .filter(|(k, _)| k != "HOSTNAME")
            .map(|(k, v)| format!("{k}={v}")),
    );
    if !env.iter().any(|(k, _)| k == "HOME") {
        out.push(format!("HOME={home}"));
    }
    Ok(out)
}

/// Checks the options that need no image (before one is unpacked): the
/// volumes and the memory limit they give.
pub fn check(args: &RunArgs) -> anyhow::Result<(Vec<Volume>, Option<u64>)> {
    let mut volumes = Vec::new();
    for v in &args.volume {
        volumes.push(parse_volume(v)?);
    }
    let memory = args.memory.as_deref().map(parse_memory).transpose()?;
    for p in &args.publish {
        crate::publish::parse_one(p)?;
    }
    if !args.publish.is_empty() && args.network == "none" {
        bail!("-p needs a network: add --network bridge (or ns:PATH)");
    }
    if let Some(c) = args.cpus {
        if !(c.is_finite() && c > 0.0 && c <= 1024.0) {
            bail!("invalid --cpus {c}: give a number above 0");
        }
    }
    if let Some(w) = args.workdir.as_deref() {
        if !w.starts_with('/') {
            bail!("the working directory {w:?} must be an absolute path");
        }
    }
    if let Some(a) = args
        .annotation
        .iter()
        .find(|a| !a.contains('=') || a.starts_with('='))
    {
        bail!("invalid annotation {a:?}: use KEY=VALUE");
    }
    if let Some(e) = args.env.iter().find(|e| e.starts_with('=')) {
        bail!("invalid environment variable {e:?}: the name is empty");
    }
    Ok((volumes, memory))
}

/// The network namespace `--network` names, if any (`bridge` makes one
/// when the container is made: see [`join_network`]).
pub fn network_path(network: &str) -> anyhow::Result<Option<PathBuf>> {
    match network {
        "none" | "bridge" => Ok(None),
        "host" => bail!("--network host is not possible: the container has its own kernel"),
        n => match n.strip_prefix("ns:") {
            Some(p) if p.starts_with('/') => {
                if !Path::new(p).exists() {
                    bail!("--network {n}: the namespace {p} does not exist");
                }
                Ok(Some(PathBuf::from(p)))
            }
            Some(_) => bail!("--network {n}: give the namespace's absolute path"),
            None => bail!(
                "--network {n} is not supported: use none, bridge, or ns:PATH with a \
                 namespace set up beforehand (e.g. by CNI or `ip netns add`)"
            ),
        },
    }
}

/// Makes `spec`'s container take over the network namespace at `path`.
pub fn join_network(spec: &mut Value, path: &Path) -> anyhow::Result<()> {
    let namespaces = spec["linux"]["namespaces"]
        .as_array_mut()
        .context("the default spec has no namespaces")?;
    namespaces.retain(|n| n["type"] != "network");
    namespaces.push(json!({"type": "network", "path": path}));
    Ok(())
}

/// Everything the config needs beyond the options.
pub struct SpecInputs<'a> {
    pub image: &'a ImageRunConfig,
    pub rootfs: &'a Path,
    pub hostname: &'a str,
    /// The image's /etc/passwd and /etc/group.
    pub passwd: &'a str,
    pub group: &'a str,
}

/// The bundle's config.json: runc's default spec with the image's process,
/// the options, and the rootfs under an in-guest overlay so the image's
/// unpacked directory is never written.
pub fn spec(
    args: &RunArgs,
    inputs: &SpecInputs<'_>,
    host_var: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Value> {
    let image = inputs.image;
    let argv = argv(args, image)?;
    let user_spec = args.user.as_deref().unwrap_or(&image.user);
    let user = resolve_user(user_spec, inputs.passwd, inputs.group)?;
    let cwd = match args.workdir.as_deref() {
        Some(w) => w.to_owned(),
        None if image.working_dir.is_empty() => "/".to_owned(),
        None => image.working_dir.clone(),
    };
    if !cwd.starts_with('/') {
        bail!("the working directory {cwd:?} must be an absolute path");
    }
    let env = environment(args, image, inputs.hostname, &user.home, host_var)?;
    let (volumes, memory) = check(args)?;

    let mut s = serde_json::to_value(oci_spec::runtime::Spec::default())?;
    s["root"] = json!({"path": inputs.rootfs, "readonly": false});
    s["hostname"] = json!(inputs.hostname);
    let mut annotations = serde_json::Map::new();
    for a in &args.annotation {
        if let Some((k, v)) = a.split_once('=') {
            annotations.insert(k.to_owned(), json!(v));
        }
    }
    annotations.insert(ANN_ROOTFS_OVERLAY.to_owned(), json!("true"));
    if !args.publish.is_empty() {
        let rules = args
            .publish
            .iter()
            .map(|p| crate::publish::parse_one(p).map(|r| r.to_string()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        annotations.insert(
            crate::bundle::ANN_PUBLISH.to_owned(),
            json!(rules.join(",")),
        );
    }
    s["annotations"] = Value::Object(annotations);
    let p = &mut s["process"];
    p["terminal"] = json!(args.tty);
    p["args"] = json!(argv);
    p["env"] = json!(env);
    p["cwd"] = json!(cwd);
    p["user"] = json!({"uid": user.uid, "gid": user.gid});
    if !user.additional_gids.is_empty() {
        p["user"]["additionalGids"] = json!(user.additional_gids);
    }
    p["capabilities"] = json!({
        "bounding": DEFAULT_CAPS,
        "effective": DEFAULT_CAPS,
        "permitted": DEFAULT_CAPS,
    });
    p["noNewPrivileges"] = json!(false);
    let mounts = s["mounts"]
        .as_array_mut()
        .context("the default spec has no mounts")?;
    for v in volumes {
        let mode = if v.read_only { "ro" } else { "rw" };
        mounts.push(json!({
            "destination": v.guest,
            "type": "bind",
            "source": v.host,
            "options": ["rbind", mode],
        }));
    }
    if let Some(path) = network_path(&args.network)? {
        join_network(&mut s, &path)?;
    }
    let linux = &mut s["linux"];
    if let Some(bytes) = memory {
        linux["resources"]["memory"] = json!({"limit": bytes});
    }
    if let Some(c) = args.cpus {
        let quota = (c * CPU_PERIOD as f64).ceil() as i64;
        linux["resources"]["cpu"] = json!({"quota": quota, "period": CPU_PERIOD});
    }
    // The result must be a spec the runtime accepts.
    serde_json::from_value::<oci_spec::runtime::Spec>(s.clone())
        .context("the generated config.json is not a valid runtime spec")?;
    Ok(s)
}

#[cfg(test)]
#[path = "run_args_tests.rs"]
mod tests;
