//! Applies a layer tarball (plain, gzip or zstd, told apart by their magic
//! bytes) onto a rootfs the way the OCI image spec says: entries replace
//! what lower layers left, `.wh.NAME` deletes NAME from lower layers and
//! `.wh..wh..opq` empties its directory of them; hard links, symlinks,
//! FIFOs and device nodes (as root; skipped and counted otherwise) are
//! made; modes, owners (as root), mtimes and xattrs are kept. Every name
//! is checked by [`crate::scoped`] first, so no entry lands outside the
//! rootfs. The uncompressed stream's sha256 is the layer's diff ID.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tar::EntryType;

use crate::digest::{Digest, Hasher, HashingReader};
use crate::error::{io_err, ImageError};
use crate::scoped::{entry_name, resolve};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// What applying a layer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStats {
    /// sha256 of the uncompressed tarball.
    pub diff_id: Digest,
    /// Bytes of uncompressed tarball read.
    pub tar_bytes: u64,
    /// Entries applied (whiteouts included).
    pub entries: u64,
    /// Device nodes not made because this process may not.
    pub skipped_devices: u64,
}

/// Who may do what while unpacking.
#[derive(Debug, Clone, Copy)]
pub struct ApplyOptions {
    /// Set owners and make device nodes (root does).
    pub privileged: bool,
}

impl ApplyOptions {
    /// Privileged when running as root.
    pub fn for_this_process() -> Self {
        ApplyOptions {
            privileged: nix::unistd::geteuid().is_root(),
        }
    }
}

/// Which compression a layer stream starts with.
fn decompressed<'a>(r: impl Read + 'a) -> Result<Box<dyn Read + 'a>, ImageError> {
    let mut r = BufReader::with_capacity(256 * 1024, r);
    let head = r.fill_buf().map_err(io_err("read the layer"))?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r).map_err(io_err("start zstd"))?)
    } else {
        Box::new(r)
    })
}

/// Applies the layer `reader` yields onto `root`.
pub fn apply(reader: impl Read, root: &Path, opts: ApplyOptions) -> Result<LayerStats, ImageError> {
    let hashing = HashingReader::new(decompressed(reader)?, Hasher::sha256());
    let mut archive = tar::Archive::new(hashing);
    let mut state = Applier {
        root,
        opts,
        created: HashSet::new(),
        dirs: Vec::new(),
        stats_entries: 0,
        skipped_devices: 0,
    };
    for entry in archive.entries().map_err(tar_err)? {
        let mut entry = entry.map_err(tar_err)?;
        state.entry(&mut entry)?;
    }
    // Directory modes and mtimes last: adding children changes the mtime,
    // and a read-only directory would refuse them.
    for (path, mode, mtime) in state.dirs.iter().rev() {
        let full = root.join(path);
        fs::set_permissions(&full, fs::Permissions::from_mode(*mode))
            .map_err(io_err(format!("chmod {}", path.display())))?;
        set_mtime(&full, *mtime)?;
    }
    let (entries, skipped_devices) = (state.stats_entries, state.skipped_devices);
    let mut rest = archive.into_inner();
    // The diff ID covers the whole stream, padding after the end included.
    io::copy(&mut rest, &mut io::sink()).map_err(tar_err)?;
    let (diff_id, tar_bytes) = rest.finish();
    Ok(LayerStats {
        diff_id,
        tar_bytes,
        entries,
        skipped_devices,
    })
}

fn tar_err(e: io::Error) -> ImageError {
    ImageError::Format(format!("not a valid layer tarball: {e}"))
}

struct Applier<'a> {
    root: &'a Path,
    opts: ApplyOptions,
    /// What this layer wrote, which its own whiteouts do not remove.
    created: HashSet<PathBuf>,
    dirs: Vec<(PathBuf, u32, u64)>,
    stats_entries: u64,
    skipped_devices: u64,
}

impl Applier<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<(), ImageError> {
        let raw = entry.path_bytes().into_owned();
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            return Ok(());
        }
        let Some(rel) = entry_name(&raw)? else {
            return Ok(()); // the rootfs itself keeps its own metadata
        };
        self.stats_entries += 1;
        let name = rel.file_name().unwrap_or_default().as_bytes().to_vec();
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        if let Some(hidden) = name.strip_prefix(WHITEOUT.as_bytes()) {
            let parent = resolve(self.root, parent_rel, true, true)?;
            if name == OPAQUE.as_bytes() {
                return self.make_opaque(&parent);
            }
            if hidden.starts_with(b".wh.") {
                return Ok(()); // aufs metadata (.wh..wh.plnk and such)
            }
            let target = parent.join(OsStr::from_bytes(hidden));
            if !self.created.contains(&target) {
                remove_any(&self.root.join(&target))?;
            }
            return Ok(());
        }
        let parent = resolve(self.root, parent_rel, true, true)?;
        let path = parent.join(OsStr::from_bytes(&name));
        let full = self.root.join(&path);
        let header = entry.header().clone();
        let mode = header.mode().map_err(tar_err)? & 0o7777;
        let mtime = header.mtime().unwrap_or(0);
        let existing = fs::symlink_metadata(&full).ok();
        if kind == EntryType::Directory {
            match existing {
                Some(m) if m.is_dir() => {}
                Some(_) => {
                    remove_any(&full)?;
                    make_dir(&full)?;
                }
                None => make_dir(&full)?,
            }
            self.dirs.push((path.clone(), mode, mtime));
        } else {
            if existing.is_some() {
                remove_any(&full)?;
            }
            match kind {
                EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                    let mut f = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .mode(0o600)
                        .open(&full)
                        .map_err(io_err(format!("create {}", path.display())))?;
                    io::copy(entry, &mut f).map_err(tar_err)?;
                }
                EntryType::Symlink => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| bad(&raw, "a symlink without a target"))?;
                    symlink(OsStr::from_bytes(&target), &full)
                        .map_err(io_err(format!("symlink {}", path.display())))?;
                }
                EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .ok_or_else(|| bad(&raw, "a hard link without a target"))?;
                    let target_rel = entry_name(&target)?
                        .ok_or_else(|| bad(&raw, "a hard link to the rootfs"))?;
                    let resolved = resolve(self.root, &target_rel, false, false)?;
                    let src = self.root.join(&resolved);
                    match fs::symlink_metadata(&src) {
                        Ok(m) if !m.is_dir() => {}
                        _ => return Err(bad(&raw, "a hard link to a missing file or a directory")),
                    }
                    fs::hard_link(&src, &full)
                        .map_err(io_err(format!("link {}", path.display())))?;
                    // A hard link shares its target's metadata: nothing to set.
                    self.created.insert(path);
                    return Ok(());
                }
                EntryType::Char | EntryType::Block | EntryType::Fifo => {
                    if !self.make_node(&header, kind, &full, &path)? {
                        return Ok(());
                    }
                }
                other => {
                    return Err(bad(&raw, format!("unsupported entry type {other:?}")));
                }
            }
            if kind != EntryType::Symlink {
                fs::set_permissions(&full, fs::Permissions::from_mode(mode))
                    .map_err(io_err(format!("chmod {}", path.display())))?;
            }
            set_mtime(&full, mtime)?;
        }
        if self.opts.privileged {
            let uid = header.uid().map_err(tar_err)? as u32;
            let gid = header.gid().map_err(tar_err)? as u32;
            std::os::unix::fs::lchown(&full, Some(uid), Some(gid))
                .map_err(io_err(format!("chown {}", path.display())))?;
            if kind != EntryType::Directory && kind != EntryType::Symlink && mode & 0o6000 != 0 {
                // chown clears set-id bits: put them back.
                fs::set_permissions(&full, fs::Permissions::from_mode(mode))
                    .map_err(io_err(format!("chmod {}", path.display())))?;
            }
        }
        self.xattrs(entry, &full)?;
        self.created.insert(path);
        Ok(())
    }

    /// Makes a device node or FIFO; false when skipped.
    fn make_node(
        &mut self,
        header: &tar::Header,
        kind: EntryType,
        full: &Path,
        path: &Path,
    ) -> Result<bool, ImageError> {
        let (sflag, dev) = match kind {
            EntryType::Fifo => (SFlag::S_IFIFO, 0),
            _ => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let flag = if kind == EntryType::Char {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                (flag, nix::sys::stat::makedev(major.into(), minor.into()))
            }
        };
        if sflag != SFlag::S_IFIFO && !self.opts.privileged {
            self.skipped_devices += 1;
            return Ok(false);
        }
        match nix::sys::stat::mknod(full, sflag, Mode::from_bits_truncate(0o600), dev) {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::EPERM) if sflag != SFlag::S_IFIFO => {
                self.skipped_devices += 1;
                Ok(false)
            }
            Err(e) => Err(io_err(format!("mknod {}", path.display()))(e.into())),
        }
    }

    fn make_opaque(&mut self, dir: &Path) -> Result<(), ImageError> {
        let full = self.root.join(dir);
        let Ok(entries) = fs::read_dir(&full) else {
            return Ok(());
        };
        for e in entries.flatten() {
            let child = dir.join(e.file_name());
            if !self.created.contains(&child) {
                remove_any(&e.path())?;
            }
        }
        Ok(())
    }

    fn xattrs<R: Read>(&self, entry: &mut tar::Entry<R>, full: &Path) -> Result<(), ImageError> {
        let Ok(Some(exts)) = entry.pax_extensions() else {
            return Ok(());
        };
        let path = CString::new(full.as_os_str().as_bytes())
            .map_err(|_| ImageError::Format("a NUL in a path".into()))?;
        for ext in exts.flatten() {
            let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            let Ok(cname) = CString::new(name) else {
                continue;
            };
            let value = ext.value_bytes();
            // SAFETY: both strings are NUL-terminated and live across the
            // call; value points at value.len() readable bytes.
            let rc = unsafe {
                libc::lsetxattr(
                    path.as_ptr(),
                    cname.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if rc != 0 {
                let e = io::Error::last_os_error();
                // Namespaces this process or filesystem cannot hold
                // (trusted.* unprivileged, xattrs on tmpfs of old kernels).
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EPERM | libc::ENOTSUP | libc::EACCES)
                ) {
                    return Err(io_err(format!(
                        "set xattr {} on {}",
                        String::from_utf8_lossy(name),
                        full.display()
                    ))(e));
                }
            }
        }
        Ok(())
    }
}

fn bad(raw: &[u8], why: impl Into<String>) -> ImageError {
    ImageError::UnsafeEntry {
        path: String::from_utf8_lossy(raw).into_owned(),
        why: why.into(),
    }
}

fn make_dir(full: &Path) -> Result<(), ImageError> {
    fs::create_dir(full).map_err(io_err(format!("mkdir {}", full.display())))
}

/// Removes a file, link or whole directory tree; missing is fine.
fn remove_any(full: &Path) -> Result<(), ImageError> {
    let res = match fs::symlink_metadata(full) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(full),
        Ok(_) => fs::remove_file(full),
        Err(_) => return Ok(()),
    };
    res.map_err(io_err(format!("remove {}", full.display())))
}

fn set_mtime(full: &Path, mtime: u64) -> Result<(), ImageError> {
    let t = TimeSpec::new(mtime.min(i64::MAX as u64) as i64, 0);
    utimensat(
        nix::fcntl::AT_FDCWD,
        full,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| io_err(format!("set the mtime of {}", full.display()))(e.into()))
}
