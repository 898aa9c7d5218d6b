//! The content-addressed blob store: `blobs/<alg>/<hex>`. A blob becomes
//! visible only after it was written in full to a temporary file in the
//! store, hashed to the digest it was asked for, synced, and renamed into
//! place, so an interrupted write leaves nothing under its name, and two
//! writers of one blob both end with the same complete file.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

use crate::digest::{Digest, HashingReader};
use crate::error::{io_err, ImageError};

/// The blob directory of a store.
#[derive(Debug, Clone)]
pub struct Blobs {
    root: PathBuf,
    tmp: PathBuf,
}

impl Blobs {
    /// The blobs under `root/blobs`, staging in `tmp` (same filesystem).
    pub fn new(root: &Path, tmp: &Path) -> Self {
        Blobs {
            root: root.join("blobs"),
            tmp: tmp.to_owned(),
        }
    }

    /// Where the blob named `d` lives (whether or not it is there).
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.root.join(d.algorithm()).join(d.encoded())
    }

    /// Whether the blob is in the store.
    pub fn has(&self, d: &Digest) -> bool {
        self.path(d).is_file()
    }

    /// Opens a stored blob.
    pub fn open(&self, d: &Digest) -> Result<File, ImageError> {
        File::open(self.path(d)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::NotFound(d.to_string()),
            _ => io_err(format!("open blob {d}"))(e),
        })
    }

    /// Reads a (small) stored blob whole, checking it against its name.
    pub fn read(&self, d: &Digest) -> Result<Vec<u8>, ImageError> {
        let mut bytes = Vec::new();
        self.open(d)?
            .read_to_end(&mut bytes)
            .map_err(io_err(format!("read blob {d}")))?;
        let mut h = d.hasher();
        h.update(&bytes);
        let actual = h.finish();
        if &actual != d {
            return Err(ImageError::DigestMismatch {
                expected: d.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Stores what `reader` yields as the blob `expected`, refusing it if
    /// it hashes to something else or (with `size`) has another length.
    /// A blob already present is not written again.
    pub fn put(
        &self,
        expected: &Digest,
        size: Option<u64>,
        reader: impl Read,
    ) -> Result<u64, ImageError> {
        let dest = self.path(expected);
        if let Ok(meta) = fs::metadata(&dest) {
            return Ok(meta.len());
        }
        let (actual, len, tmp) = self.stage(reader, expected.hasher())?;
        let mismatch = if &actual != expected {
            Some(ImageError::DigestMismatch {
                expected: expected.clone(),
                actual,
            })
        } else {
            size.filter(|&s| s != len)
                .map(|s| ImageError::SizeMismatch {
                    digest: expected.clone(),
                    expected: s,
                    actual: len,
                })
        };
        if let Some(e) = mismatch {
            drop(tmp);
            return Err(e);
        }
        self.commit(tmp, &dest)?;
        Ok(len)
    }

    /// Stores bytes made here (a manifest or config the store wrote) under
    /// their sha256.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, ImageError> {
        let d = Digest::sha256_of(bytes);
        self.put(&d, Some(bytes.len() as u64), bytes)?;
        Ok(d)
    }

    /// Stores a file under the sha256 of its content, which it returns
    /// with the length.
    pub fn put_file(&self, path: &Path) -> Result<(Digest, u64), ImageError> {
        let file = File::open(path).map_err(io_err(format!("open {}", path.display())))?;
        let (d, len, tmp) = self.stage(file, crate::digest::Hasher::sha256())?;
        let dest = self.path(&d);
        if dest.is_file() {
            return Ok((d, len));
        }
        self.commit(tmp, &dest)?;
        Ok((d, len))
    }

    fn stage(
        &self,
        reader: impl Read,
        hasher: crate::digest::Hasher,
    ) -> Result<(Digest, u64, NamedTempFile), ImageError> {
        fs::create_dir_all(&self.tmp).map_err(io_err(format!("mkdir {}", self.tmp.display())))?;
        // Readable like the rest of the store (tempfile's default is 0600).
        let mut tmp = tempfile::Builder::new()
            .prefix("blob-")
            .permissions(fs::Permissions::from_mode(0o644))
            .tempfile_in(&self.tmp)
            .map_err(io_err(format!("create a file in {}", self.tmp.display())))?;
        let mut r = HashingReader::new(reader, hasher);
        io::copy(&mut r, tmp.as_file_mut()).map_err(io_err("write a blob"))?;
        tmp.as_file_mut().flush().map_err(io_err("write a blob"))?;
        tmp.as_file().sync_all().map_err(io_err("sync a blob"))?;
        let (d, len) = r.finish();
        Ok((d, len, tmp))
    }

    fn commit(&self, tmp: NamedTempFile, dest: &Path) -> Result<(), ImageError> {
        if let Some(dir) = dest.parent() {
            fs::create_dir_all(dir).map_err(io_err(format!("mkdir {}", dir.display())))?;
        }
        tmp.persist(dest)
            .map(|_| ())
            .map_err(|e| io_err(format!("rename into {}", dest.display()))(e.error))
    }

    /// Removes a blob; gone already is fine.
    pub fn remove(&self, d: &Digest) -> Result<(), ImageError> {
        match fs::remove_file(self.path(d)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(io_err(format!("remove blob {d}"))(e))
            }
            _ => Ok(()),
        }
    }

    /// Every blob in the store.
    pub fn list(&self) -> Result<Vec<Digest>, ImageError> {
        let mut out = Vec::new();
        for alg in ["sha256", "sha512"] {
            let dir = self.root.join(alg);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if let Some(d) = e
                    .file_name()
                    .to_str()
                    .and_then(|n| format!("{alg}:{n}").parse().ok())
                {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs() -> (tempfile::TempDir, Blobs) {
        let dir = tempfile::tempdir().unwrap();
        let b = Blobs::new(dir.path(), &dir.path().join("tmp"));
        (dir, b)
    }

    fn staged(dir: &Path) -> usize {
        fs::read_dir(dir.join("tmp"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    #[test]
    fn a_blob_is_stored_under_its_digest_and_read_back() {
        let (dir, b) = blobs();
        let d = b.put_bytes(b"hello").unwrap();
        assert!(b.has(&d));
        assert_eq!(b.read(&d).unwrap(), b"hello");
        assert_eq!(b.list().unwrap(), vec![d.clone()]);
        // Writing it again is a no-op.
        assert_eq!(b.put(&d, Some(5), &b"hello"[..]).unwrap(), 5);
        b.remove(&d).unwrap();
        assert!(!b.has(&d));
        assert_eq!(staged(dir.path()), 0);
    }

    #[test]
    fn content_that_does_not_match_its_digest_or_size_is_refused_and_leaves_nothing() {
        let (dir, b) = blobs();
        let d = Digest::sha256_of(b"hello");
        let e = b.put(&d, None, &b"jello"[..]).unwrap_err();
        assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
        let e = b.put(&d, Some(4), &b"hello"[..]).unwrap_err();
        assert!(matches!(e, ImageError::SizeMismatch { .. }), "{e}");
        assert!(!b.has(&d));
        assert_eq!(staged(dir.path()), 0);
    }

    #[test]
    fn a_reader_that_fails_midway_leaves_no_blob() {
        struct Broken(usize);
        impl Read for Broken {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::new(io::ErrorKind::ConnectionReset, "gone"));
                }
                self.0 -= 1;
                buf[0] = b'x';
                Ok(1)
            }
        }
        let (dir, b) = blobs();
        let d = Digest::sha256_of(b"xxxx");
        assert!(b.put(&d, None, Broken(3)).is_err());
        assert!(!b.has(&d));
        assert_eq!(staged(dir.path()), 0);
    }

    #[test]
    fn a_corrupted_stored_blob_is_detected_on_read() {
        let (_dir, b) = blobs();
        let d = b.put_bytes(b"{}").unwrap();
        fs::write(b.path(&d), b"[]").unwrap();
        assert!(matches!(b.read(&d), Err(ImageError::DigestMismatch { .. })));
    }
}
