//! The store on disk:
//!
//! ```text
//! <root>/blobs/sha256/<hex>     content-addressed blobs (manifests, configs, layers)
//! <root>/images.json            names and IDs of the images (replaced atomically)
//! <root>/rootfs/<manifest hex>  an image's layers applied, once, shared read-only
//! <root>/holds/<container>      the manifest a container runs on
//! <root>/tmp/                   staging: nothing there is visible as stored
//! <root>/index.lock, gc.lock    flock(2) locks
//! ```
//!
//! Writers of images.json hold `index.lock`; importers and unpackers hold
//! `gc.lock` shared and garbage collection holds it exclusively, so it
//! never removes a blob an import has just written but not yet named.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use oci_spec::image::{ImageConfiguration, ImageManifest};
use serde::{Deserialize, Serialize};

use crate::blobs::Blobs;
use crate::digest::Digest;
use crate::error::{io_err, json_err, ImageError};
use crate::layer::{self, ApplyOptions};
use crate::reference::Reference;

/// An image in the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// Its normalized names (`docker.io/library/busybox:latest`); may be empty.
    pub names: Vec<String>,
    /// The manifest's digest: what the store keys the image on.
    pub manifest: String,
    /// The config's digest: the image ID Docker shows.
    pub config: String,
    /// Sum of the layers' (compressed) sizes.
    pub size: u64,
    /// When the image was built (from its config), if it says.
    #[serde(default)]
    pub created: Option<String>,
}

impl ImageRecord {
    /// The first 12 hex digits of the image ID, as `docker images` shows.
    pub fn short_id(&self) -> &str {
        let hex = self.config.split_once(':').map_or("", |(_, h)| h);
        &hex[..hex.len().min(12)]
    }

    fn manifest_digest(&self) -> Result<Digest, ImageError> {
        Ok(self.manifest.parse()?)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    images: Vec<ImageRecord>,
}

/// What garbage collection removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcStats {
    /// Blobs no image refers to.
    pub blobs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Unpacked rootfs directories of images no longer in the store.
    pub rootfs: usize,
}

/// An flock(2) held until dropped.
#[derive(Debug)]
pub struct Lock(#[allow(dead_code)] File);

impl Lock {
    fn take(path: &Path, exclusive: bool) -> Result<Lock, ImageError> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(format!("open {}", path.display())))?;
        let op = if exclusive {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        loop {
            // SAFETY: flock on a descriptor this function owns.
            let rc = unsafe { libc::flock(f.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(Lock(f));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err(format!("lock {}", path.display()))(e));
            }
        }
    }
}

/// The image store rooted at a directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    blobs: Blobs,
}

impl Store {
    /// Opens (creating as needed) the store at `root`.
    pub fn open(root: &Path) -> Result<Store, ImageError> {
        for d in ["blobs/sha256", "rootfs", "holds", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(format!("mkdir {}", p.display())))?;
        }
        Ok(Store {
            root: root.to_owned(),
            blobs: Blobs::new(root, &root.join("tmp")),
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Its blobs.
    pub fn blobs(&self) -> &Blobs {
        &self.blobs
    }

    /// The staging directory (same filesystem as everything stored).
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A new directory under [`Store::tmp`], removed with the guard unless
    /// kept.
    pub(crate) fn staging_dir(&self, prefix: &str) -> Result<tempfile::TempDir, ImageError> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(self.tmp())
            .map_err(io_err(format!(
                "create a directory in {}",
                self.tmp().display()
            )))
    }

    /// Held while importing or unpacking; garbage collection waits for it.
    pub fn writing(&self) -> Result<Lock, ImageError> {
        Lock::take(&self.root.join("gc.lock"), false)
    }

    fn read_index(&self) -> Result<Index, ImageError> {
        let path = self.root.join("images.json");
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(json_err(path.display().to_string()))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::default()),
            Err(e) => Err(io_err(format!("read {}", path.display()))(e)),
        }
    }

    fn update_index<T>(
        &self,
        f: impl FnOnce(&mut Index) -> Result<T, ImageError>,
    ) -> Result<T, ImageError> {
        let _lock = Lock::take(&self.root.join("index.lock"), true)?;
        let mut index = self.read_index()?;
        let out = f(&mut index)?;
        // Beside it, not in tmp/: gc clears tmp/ without this lock.
        let tmp = self
            .root
            .join(format!(".images.json.{}", std::process::id()));
        let bytes = serde_json::to_vec_pretty(&index).map_err(json_err("images.json"))?;
        fs::write(&tmp, bytes).map_err(io_err(format!("write {}", tmp.display())))?;
        fs::rename(&tmp, self.root.join("images.json")).map_err(io_err("replace images.json"))?;
        Ok(out)
    }

    /// Every image.
    pub fn images(&self) -> Result<Vec<ImageRecord>, ImageError> {
        Ok(self.read_index()?.images)
    }

    /// The manifest of a stored image.
    pub fn manifest(&self, rec: &ImageRecord) -> Result<ImageManifest, ImageError> {
        let bytes = self.blobs.read(&rec.manifest_digest()?)?;
        serde_json::from_slice(&bytes).map_err(json_err(format!("manifest {}", rec.manifest)))
    }

    /// The config of a stored image.
    pub fn config(&self, rec: &ImageRecord) -> Result<ImageConfiguration, ImageError> {
        let bytes = self.blobs.read(&rec.config.parse()?)?;
        serde_json::from_slice(&bytes).map_err(json_err(format!("image config {}", rec.config)))
    }

    /// Records the image whose manifest blob is `manifest` (its config and
    /// layers already stored) under `names`, which move to it from any
    /// image that had them.
    pub fn add(&self, manifest: &Digest, names: &[Reference]) -> Result<ImageRecord, ImageError> {
        let bytes = self.blobs.read(manifest)?;
        let m: ImageManifest =
            serde_json::from_slice(&bytes).map_err(json_err(format!("manifest {manifest}")))?;
        let config_digest: Digest = m.config().digest().to_string().parse()?;
        let config_bytes = self.blobs.read(&config_digest)?;
        let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
            .map_err(json_err(format!("image config {config_digest}")))?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != m.layers().len() {
            return Err(ImageError::Format(format!(
                "manifest {manifest} has {} layers where its config lists {} diff IDs",
                m.layers().len(),
                diff_ids.len()
            )));
        }
        let mut size = 0;
        for l in m.layers() {
            let d: Digest = l.digest().to_string().parse()?;
            if !self.blobs.has(&d) {
                return Err(ImageError::NotFound(format!("layer {d}")));
            }
            size += l.size();
        }
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let rec = ImageRecord {
            names: names.clone(),
            manifest: manifest.to_string(),
            config: config_digest.to_string(),
            size,
            created: config.created().clone(),
        };
        self.update_index(|index| {
            for other in &mut index.images {
                other.names.retain(|n| !names.contains(n));
            }
            match index.images.iter_mut().find(|r| r.manifest == rec.manifest) {
                Some(existing) => {
                    for n in &names {
                        if !existing.names.contains(n) {
                            existing.names.push(n.clone());
                        }
                    }
                    Ok(existing.clone())
                }
                None => {
                    index.images.push(rec.clone());
                    Ok(rec)
                }
            }
        })
    }

    /// Finds an image by name (short or full), ID or manifest digest, or a
    /// unique prefix of either's hex.
    pub fn find(&self, what: &str) -> Result<ImageRecord, ImageError> {
        let images = self.images()?;
        let full = what.parse::<Reference>().ok().map(|r| r.to_string());
        if let Some(rec) = images.iter().find(|r| {
            r.names
                .iter()
                .any(|n| n == what || Some(n) == full.as_ref())
        }) {
            return Ok(rec.clone());
        }
        let hex = what
            .strip_prefix("sha256:")
            .unwrap_or(what)
            .to_ascii_lowercase();
        if hex.len() >= 4 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            let hits: Vec<_> = images
                .iter()
                .filter(|r| {
                    [&r.config, &r.manifest]
                        .iter()
                        .any(|d| d.split_once(':').is_some_and(|(_, h)| h.starts_with(&hex)))
                })
                .collect();
            match hits.len() {
                0 => {}
                1 => return Ok(hits[0].clone()),
                _ => return Err(ImageError::Ambiguous(what.into())),
            }
        }
        Err(ImageError::NotFound(what.into()))
    }

    /// The image's rootfs, unpacked on first use (layers checked against
    /// the config's diff IDs) and shared read-only by its containers.
    /// `progress` hears each layer as it is applied.
    pub fn rootfs(
        &self,
        rec: &ImageRecord,
        progress: &mut dyn FnMut(UnpackEvent),
    ) -> Result<PathBuf, ImageError> {
        let manifest = rec.manifest_digest()?;
        let dest = self.root.join("rootfs").join(manifest.encoded());
        if dest.is_dir() {
            return Ok(dest);
        }
        let _writing = self.writing()?;
        let m = self.manifest(rec)?;
        let config = self.config(rec)?;
        let staging = self.staging_dir("rootfs-")?;
        self.unpack_into(&m, &config, staging.path(), progress)?;
        match fs::rename(staging.path(), &dest) {
            Ok(()) => {
                // Renamed away: nothing is left for the guard to remove.
                let _ = staging.keep();
                Ok(dest)
            }
            // Another process unpacked it first: theirs is as good, and
            // ours goes with the guard.
            Err(_) if dest.is_dir() => Ok(dest),
            Err(e) => Err(io_err(format!("rename into {}", dest.display()))(e)),
        }
    }

    fn unpack_into(
        &self,
        m: &ImageManifest,
        config: &ImageConfiguration,
        staging: &Path,
        progress: &mut dyn FnMut(UnpackEvent),
    ) -> Result<(), ImageError> {
        let opts = ApplyOptions::for_this_process();
        let total = m.layers().len();
        for (i, (l, want)) in m
            .layers()
            .iter()
            .zip(config.rootfs().diff_ids())
            .enumerate()
        {
            let d: Digest = l.digest().to_string().parse()?;
            progress(UnpackEvent::Layer {
                index: i,
                total,
                digest: d.clone(),
                size: l.size(),
            });
            let stats = layer::apply(self.blobs.open(&d)?, staging, opts)?;
            let want: Digest = want.parse()?;
            if stats.diff_id != want {
                return Err(ImageError::Format(format!(
                    "layer {d} unpacks to {} but the config says {want}",
                    stats.diff_id
                )));
            }
            progress(UnpackEvent::Done {
                index: i,
                tar_bytes: stats.tar_bytes,
            });
        }
        fs::set_permissions(staging, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(io_err("chmod the rootfs"))?;
        Ok(())
    }

    /// Marks `container` as running on `rec`, so the image is not removed
    /// under it.
    pub fn hold(&self, container: &str, rec: &ImageRecord) -> Result<(), ImageError> {
        let p = self.hold_path(container)?;
        fs::write(&p, &rec.manifest).map_err(io_err(format!("write {}", p.display())))
    }

    /// Lets go of `container`'s hold; none is fine.
    pub fn release(&self, container: &str) -> Result<(), ImageError> {
        match fs::remove_file(self.hold_path(container)?) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove a hold")(e)),
            _ => Ok(()),
        }
    }

    fn hold_path(&self, container: &str) -> Result<PathBuf, ImageError> {
        if container.is_empty() || container.contains(['/', '\0']) || container.starts_with('.') {
            return Err(ImageError::Format(format!(
                "bad container name {container:?}"
            )));
        }
        Ok(self.root.join("holds").join(container))
    }

    /// The containers holding `rec`.
    pub fn holders(&self, rec: &ImageRecord) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.root.join("holds"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| fs::read_to_string(e.path()).is_ok_and(|m| m == rec.manifest))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        out.sort();
        out
    }

    /// Removes `what`: a name is untagged, and the image goes when no name
    /// is left (an ID removes it outright). An image some container holds
    /// is refused unless `force`. Then unreferenced blobs are collected.
    /// Returns what was untagged or deleted.
    pub fn remove(&self, what: &str, force: bool) -> Result<Vec<String>, ImageError> {
        let rec = self.find(what)?;
        let full = what.parse::<Reference>().ok().map(|r| r.to_string());
        let untag = rec
            .names
            .iter()
            .find(|n| *n == what || Some(*n) == full.as_ref())
            .cloned();
        let mut done = Vec::new();
        let last_name = untag.is_none() || rec.names.len() <= 1;
        if last_name && !force {
            let holders = self.holders(&rec);
            if !holders.is_empty() {
                return Err(ImageError::InUse {
                    image: what.into(),
                    containers: holders.join(", "),
                });
            }
        }
        self.update_index(|index| {
            if let (Some(n), false) = (&untag, last_name) {
                for r in &mut index.images {
                    r.names.retain(|x| x != n);
                }
                done.push(format!("Untagged: {n}"));
            } else {
                index.images.retain(|r| r.manifest != rec.manifest);
                for n in &rec.names {
                    done.push(format!("Untagged: {n}"));
                }
                done.push(format!("Deleted: {}", rec.config));
            }
            Ok(())
        })?;
        if last_name {
            self.gc()?;
        }
        Ok(done)
    }

    /// Removes blobs no image refers to, rootfs directories of images no
    /// longer stored, and staging leftovers of dead writers.
    pub fn gc(&self) -> Result<GcStats, ImageError> {
        let _exclusive = Lock::take(&self.root.join("gc.lock"), true)?;
        let images = self.images()?;
        let mut keep = std::collections::HashSet::new();
        let mut keep_rootfs = std::collections::HashSet::new();
        for rec in &images {
            let m = rec.manifest_digest()?;
            keep_rootfs.insert(m.encoded().to_owned());
            keep.insert(m);
            keep.insert(rec.config.parse::<Digest>()?);
            if let Ok(manifest) = self.manifest(rec) {
                for l in manifest.layers() {
                    keep.insert(l.digest().to_string().parse()?);
                }
            }
        }
        let mut stats = GcStats::default();
        for d in self.blobs.list()? {
            if !keep.contains(&d) {
                stats.bytes += fs::metadata(self.blobs.path(&d)).map_or(0, |m| m.len());
                self.blobs.remove(&d)?;
                stats.blobs += 1;
            }
        }
        for e in fs::read_dir(self.root.join("rootfs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep_rootfs.contains(&name) {
                fs::remove_dir_all(e.path())
                    .map_err(io_err(format!("remove {}", e.path().display())))?;
                stats.rootfs += 1;
            }
        }
        // Holding gc.lock exclusively means no writer is staging now.
        for e in fs::read_dir(self.tmp()).into_iter().flatten().flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
        Ok(stats)
    }
}

/// Progress of an unpack, for bars or log lines.
#[derive(Debug, Clone)]
pub enum UnpackEvent {
    /// Layer `index` of `total` starts.
    Layer {
        /// 0-based.
        index: usize,
        /// Layers in the image.
        total: usize,
        /// Its blob.
        digest: Digest,
        /// Its compressed size.
        size: u64,
    },
    /// Layer `index` is applied.
    Done {
        /// 0-based.
        index: usize,
        /// Uncompressed bytes.
        tar_bytes: u64,
    },
}
