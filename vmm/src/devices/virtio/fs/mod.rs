//! virtio-fs (device type 26): an in-process FUSE server (fuse-backend-rs)
//! sharing a host directory with the guest. Requests are answered on the
//! device's own thread straight from guest memory; there is no separate
//! virtiofsd process and no vhost-user socket.

pub mod counts;
pub mod share;

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::worker::DeviceWorker;
use super::{ActivateContext, ActivateError, Interrupt, VirtioDevice, INT_VRING};
use counts::RequestCounts;
use share::Share;

/// Device type of virtio-fs.
pub const TYPE_FS: u32 = 26;
/// Longest tag the config space holds.
pub const TAG_LEN: usize = 36;
const HIPRIO_QUEUE_SIZE: u16 = 128;
const REQUEST_QUEUE_SIZE: u16 = 1024;

/// How long the guest may trust what it cached about the share.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// Nothing: every access asks the host. For directories the host also changes.
    Never,
    /// Short timeouts, page cache dropped on open: host changes show up soon.
    #[default]
    Auto,
    /// Everything, for a long time: for shares only this guest changes
    /// (a container's rootfs). Fastest.
    Always,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(CacheMode::Never),
            "auto" => Ok(CacheMode::Auto),
            "always" => Ok(CacheMode::Always),
            _ => Err(format!(
                "cache mode must be never, auto or always, not {s:?}"
            )),
        }
    }
}

fn passthrough_config(dir: &Path, cache: CacheMode) -> Config {
    let (policy, timeout) = match cache {
        CacheMode::Never => (CachePolicy::Never, Duration::ZERO),
        CacheMode::Auto => (CachePolicy::Auto, Duration::from_secs(1)),
        CacheMode::Always => (CachePolicy::Always, Duration::from_secs(86400)),
    };
    Config {
        root_dir: dir.to_string_lossy().into_owned(),
        cache_policy: policy,
        attr_timeout: timeout,
        entry_timeout: timeout,
        xattr: true,
        // The guest leaves clearing set-user-ID bits and file capabilities
        // on a write to the host (which does it as its own write clears
        // them), instead of asking for security.capability first.
        killpriv_v2: true,
        no_open: cache == CacheMode::Always,
        do_import: true,
        ..Config::default()
    }
}

/// A virtio-fs device sharing `dir` under `tag`. With `read_only`, the host
/// refuses every change, whatever the guest does.
pub fn passthrough(
    tag: &str,
    dir: &Path,
    read_only: bool,
    cache: CacheMode,
) -> std::io::Result<Box<dyn VirtioDevice>> {
    let fs: PassthroughFs = PassthroughFs::new(passthrough_config(dir, cache))?;
    fs.import()?;
    let share = if read_only {
        Share::read_only(fs)
    } else {
        Share::read_write(fs)
    };
    Ok(Box::new(Fs::new(tag, share)?))
}

/// The virtio-fs device over any FUSE file system.
pub struct Fs<F: FileSystem + Send + Sync + 'static> {
    config: [u8; TAG_LEN + 4],
    server: Arc<Server<F>>,
    counts: Arc<RequestCounts>,
    worker: Option<DeviceWorker<()>>,
}

impl<F: FileSystem + Send + Sync + 'static> std::fmt::Debug for Fs<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fs")
            .field("tag", &self.tag())
            .field("active", &self.worker.is_some())
            .finish()
    }
}

impl<F: FileSystem + Send + Sync + 'static> Fs<F> {
    /// A device serving `fs` under `tag` (1 to 36 bytes).
    pub fn new(tag: &str, fs: F) -> std::io::Result<Self> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("virtio-fs tag must be 1 to {TAG_LEN} bytes"),
            ));
        }
        let mut config = [0u8; TAG_LEN + 4];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        // One request queue.
        config[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        Ok(Fs {
            config,
            server: Arc::new(Server::new(fs)),
            counts: Arc::default(),
            worker: None,
        })
    }

    fn tag(&self) -> String {
        let end = self.config[..TAG_LEN]
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(TAG_LEN);
        String::from_utf8_lossy(&self.config[..end]).into_owned()
    }

    fn stop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }
}

impl<F: FileSystem + Send + Sync + 'static> Drop for Fs<F> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Answers every available request; returns whether the guest must be
/// interrupted. A chain the server cannot parse is completed empty, which
/// the guest driver reports as an I/O error for that one request.
pub fn process_queue<F: FileSystem + Sync>(
    server: &Server<F>,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    counts: &RequestCounts,
) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let reader = Reader::from_descriptor_chain(mem, chain.clone());
        let writer = VirtioFsWriter::new(mem, chain);
        let len = match (reader, writer) {
            (Ok(r), Ok(w)) => server
                .handle_message(r, w.into(), None, Some(counts))
                .unwrap_or(0),
            _ => 0,
        };
        match queue.add_used(mem, head, len as u32) {
            Ok(()) => used = true,
            Err(virtio_queue::Error::InvalidDescriptorIndex) => {}
            Err(_) => break,
        }
    }
    used && queue.needs_notification(mem).unwrap_or(true)
}

const KILL: u64 = u64::MAX;
/// FUSE's INIT opcode: the guest mounted the share.
const FUSE_INIT: u32 = 26;

fn worker<F: FileSystem + Sync>(
    epoll: Epoll,
    server: Arc<Server<F>>,
    counts: Arc<RequestCounts>,
    mem: GuestMemoryMmap,
    mut queues: Vec<Queue>,
    evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
) {
    let mut events = [EpollEvent::default(); 4];
    loop {
        let Ok(n) = epoll.wait(-1, &mut events) else {
            continue;
        };
        let mut notify = false;
        for ev in &events[..n] {
            let i = ev.data();
            if i == KILL {
                return;
            }
            let (Some(q), Some(evt)) = (queues.get_mut(i as usize), evts.get(i as usize)) else {
                continue;
            };
            let _ = evt.read();
            notify |= process_queue(&server, q, &mem, &counts);
        }
        if notify {
            let _ = interrupt.trigger(INT_VRING);
        }
    }
}

impl<F: FileSystem + Send + Sync + 'static> VirtioDevice for Fs<F> {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[HIPRIO_QUEUE_SIZE, REQUEST_QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        super::VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            queues,
            queue_evts,
            interrupt,
            ..
        } = ctx;
        super::expect_queues(&queues, &queue_evts, 2)?;
        self.stop();
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Io)?;
        let epoll = Epoll::new().map_err(ActivateError::Io)?;
        let fds = [
            (queue_evts[0].as_raw_fd(), 0),
            (queue_evts[1].as_raw_fd(), 1),
            (kill.as_raw_fd(), KILL),
        ];
        for (fd, token) in fds {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(ActivateError::Io)?;
        }
        let server = self.server.clone();
        let counts = self.counts.clone();
        let worker = DeviceWorker::spawn("virtio-fs", kill, move || {
            worker(epoll, server, counts, mem, queues, queue_evts, interrupt)
        })
        .map_err(ActivateError::Io)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn snapshot_blocker(&self) -> Option<String> {
        // FUSE_INIT starts a session whose inodes and handles live here.
        (self.counts.get(FUSE_INIT) > 0).then(|| {
            format!(
                "the guest has mounted virtio-fs share {:?} (its open files live in this VMM)",
                self.tag()
            )
        })
    }

    fn report(&self) -> Option<String> {
        Some(format!(
            "virtio-fs {}: {}",
            self.tag(),
            self.counts.summary()
        ))
    }
}

#[cfg(test)]
mod tests;
