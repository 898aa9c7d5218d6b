//! Work done inside another network namespace, on a thread of its own: a
//! thread's namespace is its own, so the monitor's other threads (and the
//! VMM's) stay where they are.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::thread;

use anyhow::{anyhow, Context};
use nix::sched::{setns, CloneFlags};

/// Runs `f` on a thread that joined the network namespace at `path`.
pub fn run_in<T: Send>(
    path: &Path,
    f: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    let ns = File::open(path)
        .with_context(|| format!("cannot open network namespace {}", path.display()))?;
    thread::scope(|s| {
        vmm::threads::named("netns")
            .spawn_scoped(s, move || {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| match e {
                    nix::errno::Errno::EINVAL => {
                        anyhow!("{} is not a network namespace", path.display())
                    }
                    e => anyhow!("cannot join network namespace {}: {e}", path.display()),
                })?;
                f()
            })
            .context("starting a thread for the network namespace")?
            .join()
            .map_err(|_| anyhow!("the network namespace thread panicked"))?
    })
}
