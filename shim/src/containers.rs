//! Containers made from images (`runvm run IMAGE`, `ps`, `stop`, `rm`,
//! `logs`): each gets a bundle under `<store>/containers/<id>/` and runs
//! through the same `lifecycle::run` as runc's `run`, so its state lives
//! under `--root` like any other container's.

use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use runvm_images::{scoped, ImageError, Store};
use serde::{Deserialize, Serialize};

use crate::image_cmd;
use crate::lifecycle::{self, Globals};
use crate::network::bridge;
use crate::run_args::{self, ImageRunConfig, RunArgs, SpecInputs};
use crate::state::{self, Root, Status};

/// What `ps` shows about a container, kept next to its bundle.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    id: String,
    image: String,
    image_id: String,
    command: Vec<String>,
    created: String,
}

const META: &str = "meta.json";
/// Where a detached container's stdout and stderr go, and a foreground
/// one's are copied.
const OUTPUT_LOG: &str = "output.log";

fn containers_dir(store: &Path) -> PathBuf {
    store.join("containers")
}

/// 64 random hex digits, as docker's container IDs.
fn random_id() -> anyhow::Result<String> {
    let mut b = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A file of the image's rootfs, read with its symlinks resolved inside it
/// (an image's `/etc/passwd -> /etc/shadow` must not read the host's).
fn rootfs_text(rootfs: &Path, rel: &str) -> String {
    scoped::resolve(rootfs, Path::new(rel), false, true)
        .ok()
        .and_then(|p| fs::read_to_string(rootfs.join(p)).ok())
        .unwrap_or_default()
}

/// Undoes a half-made container unless defused.
struct Partial<'a> {
    g: &'a Globals,
    store: &'a Store,
    id: String,
    dir: PathBuf,
    armed: bool,
}

impl Drop for Partial<'_> {
    fn drop(&mut self) {
        if self.armed {
            remove_container(self.g, self.store, &self.id, &self.dir);
        }
    }
}

/// Deletes the container's VM state, its bundle directory and its hold on
/// the image; best effort, as it also cleans up after failures.
fn remove_container(g: &Globals, store: &Store, id: &str, dir: &Path) {
    if Root::new(&g.root).dir(id).exists() {
        if let Err(e) = lifecycle::delete(g, id, true) {
            crate::logger::warn(&format!("deleting container {id}: {e:#}"));
        }
    }
    // After the VM is gone, which held the namespace's interfaces.
    bridge::detach(id);
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            crate::logger::warn(&format!("removing {}: {e}", dir.display()));
        }
    }
    if let Err(e) = store.release(id) {
        crate::logger::warn(&format!("releasing the image of {id}: {e}"));
    }
}

/// `runvm run IMAGE` failed before its command ran; the exit status says
/// why, as docker's does.
#[derive(Debug)]
pub struct RunFailed {
    /// 127: the command is not there; 126: it cannot be run; 125: anything
    /// else (the image, the flags, the VM).
    pub code: u8,
    error: anyhow::Error,
}

impl std::fmt::Display for RunFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for RunFailed {}

/// Docker's exit status for a `run` that failed with `message`: it reads
/// the runtime's words the same way (runvm words a failed exec as runc).
pub fn failure_code(message: &str) -> u8 {
    let m = message.to_lowercase();
    // Only the process's own failures; an image or a bind mount that is
    // not there is docker's 125.
    let process = m.contains("the guest agent refused the process")
        || m.contains("the guest agent could not start the process");
    if process
        && (m.contains("executable file not found")
            || (m.contains("exec: ") && m.contains("no such file or directory")))
    {
        127
    } else if process && m.contains("exec: ") && m.contains("permission denied") {
        126
    } else {
        125
    }
}

/// `runvm run IMAGE ...`; a failure before the command ran is a
/// [`RunFailed`].
pub fn run(g: &Globals, store_path: &Path, args: &RunArgs) -> anyhow::Result<i32> {
    run_image(g, store_path, args).map_err(|error| {
        let code = failure_code(&format!("{error:#}"));
        anyhow::Error::new(RunFailed { code, error })
    })
}

fn run_image(g: &Globals, store_path: &Path, args: &RunArgs) -> anyhow::Result<i32> {
    if args.tty && args.detach {
        bail!("-d with -t is not supported yet: run a detached container without a terminal");
    }
    if args.tty && !std::io::stdin().is_terminal() {
        bail!("the input device is not a TTY: drop -t, or run from a terminal");
    }
    run_args::check(args)?;
    let store = image_cmd::open(store_path)?;
    let rec = match store.find(&args.image) {
        Ok(r) => r,
        // As docker does: an image that is not here is pulled.
        Err(ImageError::NotFound(_)) if args.pull != "never" => {
            eprintln!("Unable to find image '{}' locally", args.image);
            image_cmd::pull(&store, &args.image, &args.pull_args)?
        }
        Err(ImageError::NotFound(_)) => bail!(
            "image {:?} not found in {} (and --pull never)",
            args.image,
            store_path.display()
        ),
        Err(e) => return Err(e.into()),
    };
    let full_id = random_id()?;
    let id = match &args.name {
        Some(n) => {
            state::validate_id(n)?;
            n.clone()
        }
        None => full_id[..12].to_owned(),
    };
    let dir = containers_dir(store_path).join(&id);
    if Root::new(&g.root).dir(&id).exists() || dir.exists() {
        bail!("the container name {id:?} is already in use: remove it (runvm rm {id}) or pick another");
    }
    let rootfs = image_cmd::rootfs_with_progress(&store, &rec)?;
    fs::create_dir_all(containers_dir(store_path))?;
    fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut partial = Partial {
        g,
        store: &store,
        id: id.clone(),
        dir: dir.clone(),
        armed: true,
    };
    store.hold(&id, &rec)?;

    let config = serde_json::to_value(store.config(&rec)?)?;
    let image = ImageRunConfig::from_image_config(&config);
    let inputs = SpecInputs {
        image: &image,
        rootfs: &rootfs,
        hostname: &full_id[..12],
        passwd: &rootfs_text(&rootfs, "etc/passwd"),
        group: &rootfs_text(&rootfs, "etc/group"),
    };
    let mut spec = run_args::spec(args, &inputs, |k| std::env::var(k).ok())?;
    if args.network == "bridge" {
        // Undone by `partial` (remove_container) on any failure from here.
        let (netns, ip) = bridge::attach(&id)?;
        crate::logger::debug(&format!("container {id}: {ip} on {}", bridge::BRIDGE));
        run_args::join_network(&mut spec, &netns)?;
        let resolv = dir.join("resolv.conf");
        fs::write(&resolv, bridge::resolv_conf(&bridge::host_resolv_conf()))?;
        spec["mounts"]
            .as_array_mut()
            .context("the default spec has no mounts")?
            .push(serde_json::json!({
                "destination": "/etc/resolv.conf",
                "type": "bind",
                "source": resolv,
                "options": ["rbind", "ro"],
            }));
    }
    fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
    let meta = Meta {
        id: id.clone(),
        image: args.image.clone(),
        image_id: rec.config.clone(),
        // What the spec runs, as `ps` shows it.
        command: serde_json::from_value(spec["process"]["args"].clone())?,
        created: state::now_rfc3339(),
    };
    fs::write(dir.join(META), serde_json::to_vec_pretty(&meta)?)?;

    let log = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(dir.join(OUTPUT_LOG))
        .context("cannot create the container's output log")?;
    if !args.interactive && !args.tty {
        redirect(File::open("/dev/null")?.as_raw_fd(), 0)?;
    }
    let code = if args.detach {
        // The monitor inherits these: the container writes to its log.
        let saved = Redirected::new(&[(log.as_raw_fd(), 1), (log.as_raw_fd(), 2)])?;
        let r = lifecycle::run(g, &id, &dir, None, None, true, true);
        drop(saved);
        r?
    } else if args.tty {
        // The terminal's output is relayed by this process; it is not logged.
        lifecycle::run(g, &id, &dir, None, None, false, true)?
    } else {
        let tee = Tee::start(log)?;
        let r = lifecycle::run(g, &id, &dir, None, None, false, true);
        tee.finish();
        r?
    };
    partial.armed = false;
    if args.detach {
        crate::stdout::line(&id)?;
        if args.rm {
            spawn_reaper(g, store_path, &id)?;
        }
    } else if args.rm {
        remove_container(g, &store, &id, &dir);
    }
    Ok(code)
}

/// `dup2(from, to)`, failing clearly.
fn redirect(from: RawFd, to: RawFd) -> anyhow::Result<()> {
    // SAFETY: dup2 on two descriptors this process owns; `to` is one of
    // stdin/stdout/stderr, which it replaces atomically.
    if unsafe { libc::dup2(from, to) } < 0 {
        return Err(std::io::Error::last_os_error()).context("dup2");
    }
    Ok(())
}

/// A copy of fd `fd`, closed when dropped.
fn dup(fd: RawFd) -> anyhow::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an open fd returns a new fd this process
    // then owns alone.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).context("dup");
    }
    // SAFETY: `n` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Standard fds pointed elsewhere, put back when dropped.
struct Redirected {
    saved: Vec<(OwnedFd, RawFd)>,
}

impl Redirected {
    fn new(map: &[(RawFd, RawFd)]) -> anyhow::Result<Self> {
        let mut r = Redirected { saved: Vec::new() };
        for &(from, to) in map {
            r.saved.push((dup(to)?, to));
            redirect(from, to)?;
        }
        Ok(r)
    }
}

impl Drop for Redirected {
    fn drop(&mut self) {
        for (fd, to) in self.saved.drain(..).rev() {
            let _ = std::io::stdout().flush();
            let _ = redirect(fd.as_raw_fd(), to);
        }
    }
}

/// A foreground container's stdout and stderr copied to this process's and
/// to its log, for `runvm logs`.
struct Tee {
    redirected: Redirected,
    threads: Vec<std::thread::JoinHandle<()>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl Tee {
    fn start(log: File) -> anyhow::Result<Self> {
        let (out_r, out_w) = nix::unistd::pipe().context("pipe")?;
        let (err_r, err_w) = nix::unistd::pipe().context("pipe")?;
        let targets = [dup(1)?, dup(2)?];
        let redirected = Redirected::new(&[(out_w.as_raw_fd(), 1), (err_w.as_raw_fd(), 2)])?;
        drop((out_w, err_w));
        let log = std::sync::Arc::new(std::sync::Mutex::new(log));
        let (tx, done) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        for (from, to) in [out_r, err_r].into_iter().zip(targets) {
            let log = log.clone();
            let tx = tx.clone();
            threads.push(std::thread::spawn(move || {
                let mut from = File::from(from);
                let mut to = File::from(to);
                let mut buf = [0u8; 16 << 10];
                while let Ok(n) = from.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let _ = to.write_all(&buf[..n]);
                    if let Ok(mut l) = log.lock() {
                        let _ = l.write_all(&buf[..n]);
                    }
                }
                let _ = tx.send(());
            }));
        }
        Ok(Tee {
            redirected,
            threads,
            done,
        })
    }

    /// Restores stdout and stderr and waits for the copies to drain (not
    /// forever: a process that kept the pipe open must not hang `run`).
    fn finish(self) {
        drop(self.redirected);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut finished = 0;
        while finished < self.threads.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.done.recv_timeout(left).is_err() {
                return;
            }
            finished += 1;
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// `run -d --rm`: a detached process removes the container once it exits.
fn spawn_reaper(g: &Globals, store: &Path, id: &str) -> anyhow::Result<()> {
    let mut cmd = g.self_command()?;
    cmd.arg("--store")
        .arg(store)
        .arg("reap")
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; the reaper leaves our session
    // so a closing terminal does not end it.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            nix::unistd::setsid()
                .map(|_| ())
                .map_err(std::io::Error::from)
        });
    }
    cmd.spawn().context("cannot start the --rm reaper")?;
    Ok(())
}

/// The container's live state record, `None` when its state is gone.
fn record(g: &Globals, id: &str) -> Option<state::Record> {
    let root = Root::new(&g.root);
    if !root.dir(id).exists() {
        return None;
    }
    root.open(id).ok()?.load_live().ok()
}

/// The container's live status, `None` when its state is gone.
fn status(g: &Globals, id: &str) -> Option<(Status, Option<i32>)> {
    record(g, id).map(|r| (r.status, r.exit_status))
}

/// Internal `reap ID`: waits for the container to stop, then removes it.
pub fn reap(g: &Globals, store_path: &Path, id: &str) -> anyhow::Result<()> {
    while matches!(status(g, id), Some((s, _)) if s != Status::Stopped) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let store = image_cmd::open(store_path)?;
    remove_container(g, &store, id, &containers_dir(store_path).join(id));
    Ok(())
}

fn load_meta(store: &Path, id: &str) -> anyhow::Result<Meta> {
    state::validate_id(id)?;
    let path = containers_dir(store).join(id).join(META);
    let text = fs::read(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow::anyhow!("no such container: {id}"),
        _ => anyhow::Error::new(e).context(format!("cannot read {}", path.display())),
    })?;
    serde_json::from_slice(&text).with_context(|| format!("corrupt {}", path.display()))
}

/// `runvm ps` without an ID: the containers made from images.
pub fn list(g: &Globals, store: &Path, all: bool, quiet: bool) -> anyhow::Result<String> {
    let mut rows = Vec::new();
    let dir = containers_dir(store);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e.flatten().collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    for e in entries {
        let id = e.file_name().to_string_lossy().into_owned();
        let Ok(meta) = load_meta(store, &id) else {
            continue;
        };
        let rec = record(g, &id);
        let st = rec.as_ref().map(|r| (r.status, r.exit_status));
        if !all && matches!(st, None | Some((Status::Stopped, _))) {
            continue;
        }
        let text = match st {
            Some((Status::Stopped, Some(c))) => format!("exited ({c})"),
            Some((Status::Stopped, None)) | None => "exited".to_owned(),
            Some((s, _)) => s.to_string(),
        };
        // docker's PORTS column: what a live container's monitor bound.
        let ports = match rec {
            Some(r) if r.status != Status::Stopped => r
                .published
                .iter()
                .map(|p| p.docker_ps())
                .collect::<Vec<_>>()
                .join(", "),
            _ => String::new(),
        };
        rows.push((meta, text, ports));
    }
    rows.sort_by(|a, b| b.0.created.cmp(&a.0.created));
    let mut out = String::new();
    if quiet {
        for (m, _, _) in rows {
            out += &format!("{}\n", m.id);
        }
        return Ok(out);
    }
    out += &format!(
        "{:<16} {:<24} {:<28} {:<22} {:<14} {}\n",
        "CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS"
    );
    for (m, st, ports) in rows {
        let mut command = m.command.join(" ");
        if command.chars().count() > 26 {
            command = command.chars().take(25).collect::<String>() + "…";
        }
        let created = m.created.get(..19).unwrap_or(&m.created).replace('T', " ");
        let line = format!(
            "{:<16} {:<24} {:<28} {:<22} {:<14} {}",
            m.id,
            m.image,
            format!("\"{command}\""),
            created,
            st,
            ports
        );
        out += line.trim_end();
        out.push('\n');
    }
    Ok(out)
}

/// `runvm stop`: SIGTERM, then SIGKILL after `timeout`.
pub fn stop(g: &Globals, store: &Path, id: &str, timeout: Duration) -> anyhow::Result<()> {
    let known = load_meta(store, id).is_ok();
    match status(g, id) {
        None if !known => bail!("no such container: {id}"),
        None | Some((Status::Stopped, _)) => return Ok(()),
        Some(_) => {}
    }
    let stopped = |limit: Duration| {
        let start = Instant::now();
        loop {
            if matches!(status(g, id), None | Some((Status::Stopped, _))) {
                return true;
            }
            if start.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    if let Err(e) = lifecycle::kill_container(g, id, "TERM", false) {
        crate::logger::debug(&format!("SIGTERM to {id}: {e:#}"));
    }
    if stopped(timeout) {
        return Ok(());
    }
    lifecycle::kill_container(g, id, "KILL", true)?;
    if !stopped(Duration::from_secs(10)) {
        bail!("container {id} did not stop after SIGKILL");
    }
    Ok(())
}

/// `runvm rm`: the container's VM state, bundle and log.
pub fn rm(g: &Globals, store_path: &Path, id: &str, force: bool) -> anyhow::Result<()> {
    let known = load_meta(store_path, id).is_ok();
    let st = status(g, id);
    if !known && st.is_none() {
        bail!("no such container: {id}");
    }
    if let Some((s, _)) = st {
        if s != Status::Stopped && !force {
            bail!("container {id} is {s}: stop it first (runvm stop {id}) or use rm -f");
        }
    }
    let store = image_cmd::open(store_path)?;
    remove_container(g, &store, id, &containers_dir(store_path).join(id));
    if Root::new(&g.root).dir(id).exists() {
        bail!("container {id} could not be deleted");
    }
    Ok(())
}

/// `runvm logs`: what the container wrote; with `follow`, until it stops.
pub fn logs(g: &Globals, store: &Path, id: &str, follow: bool) -> anyhow::Result<()> {
    load_meta(store, id)?;
    let path = containers_dir(store).join(id).join(OUTPUT_LOG);
    let mut f = File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    let mut buf = [0u8; 16 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        out.flush()?;
        if !follow || matches!(status(g, id), None | Some((Status::Stopped, _))) {
            // One more read: what the container wrote just before it ended.
            std::io::copy(&mut f, &mut out)?;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::failure_code;

    #[test]
    fn failed_runs_exit_as_dockers_do() {
        let refused = "the guest agent refused the process: cannot start";
        assert_eq!(
            failure_code(&format!(
                "{refused} \"nosuch\": exec: \"nosuch\": executable file not found in $PATH"
            )),
            127
        );
        assert_eq!(
            failure_code(&format!(
                "{refused} \"/x\": exec: \"/x\": stat /x: no such file or directory"
            )),
            127
        );
        assert_eq!(
            failure_code(&format!(
                "{refused} \"/etc/passwd\": exec: \"/etc/passwd\": permission denied"
            )),
            126
        );
        // A working directory that is not there is the runtime's failure,
        // not a missing command; so are images and mounts.
        assert_eq!(
            failure_code(&format!(
                "{refused} \"sh\": chdir to cwd (\"/x\") set in config.json failed: \
                 No such file or directory (os error 2)"
            )),
            125
        );
        assert_eq!(
            failure_code("image \"nosuch\" not found in /var/lib/runvm (and --pull never)"),
            125
        );
        assert_eq!(
            failure_code("bind mount source /no/such: No such file or directory"),
            125
        );
    }
}
