//! Builds the guest's initramfs (newc cpio) in memory, so booting needs no
//! external `cpio` tool. Entries are written in the order they are added;
//! parents must come before children, as the kernel's unpacker expects.

use std::io::{self, Write};

use thiserror::Error;

/// Why an initramfs could not be produced.
#[derive(Debug, Error)]
pub enum InitramfsError {
    /// A path was empty, absolute, or had a `..` component.
    #[error("invalid initramfs path {0:?}")]
    BadPath(String),
    /// A file is larger than newc's 32-bit size field.
    #[error("initramfs entry {0:?} is larger than 4 GiB")]
    TooLarge(String),
    /// Writing the archive failed.
    #[error("writing the initramfs")]
    Io(#[from] io::Error),
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug)]
enum Body {
    None,
    Data(Vec<u8>),
}

#[derive(Debug)]
struct Entry {
    path: String,
    mode: u32,
    rdev: (u32, u32),
    body: Body,
}

/// An initramfs under construction.
#[derive(Debug, Default)]
pub struct Initramfs {
    entries: Vec<Entry>,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// The least a guest needs before its `/init` runs: `/dev/console`
    /// (the kernel opens it for init's stdio before devtmpfs exists) and
    /// mount points for proc and sys; `/init` is `init` (mode 0755).
    pub fn with_init(init: Vec<u8>) -> Result<Self, InitramfsError> {
        let mut ar = Initramfs::new();
        ar.dir("dev", 0o755)?
            .char_dev("dev/console", 0o600, 5, 1)?
            .dir("proc", 0o555)?
            .dir("sys", 0o555)?
            .file("init", 0o755, init)?;
        Ok(ar)
    }

    /// Adds a directory with permission bits `perm`.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<&mut Self, InitramfsError> {
        self.push(path, S_IFDIR | (perm & 0o7777), (0, 0), Body::None)
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(
        &mut self,
        path: &str,
        perm: u32,
        data: Vec<u8>,
    ) -> Result<&mut Self, InitramfsError> {
        if u32::try_from(data.len()).is_err() {
            return Err(InitramfsError::TooLarge(path.into()));
        }
        self.push(path, S_IFREG | (perm & 0o7777), (0, 0), Body::Data(data))
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        let data = target.as_bytes().to_vec();
        self.push(path, S_IFLNK | 0o777, (0, 0), Body::Data(data))
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, InitramfsError> {
        self.push(path, S_IFCHR | (perm & 0o7777), (major, minor), Body::None)
    }

    fn push(
        &mut self,
        path: &str,
        mode: u32,
        rdev: (u32, u32),
        body: Body,
    ) -> Result<&mut Self, InitramfsError> {
        let bad = path.is_empty()
            || path.starts_with('/')
            || path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..");
        if bad {
            return Err(InitramfsError::BadPath(path.into()));
        }
        self.entries.push(Entry {
            path: path.into(),
            mode,
            rdev,
            body,
        });
        Ok(self)
    }

    /// Writes the archive, trailer included.
    pub fn write_to<W: Write>(&self, mut w: W) -> Result<W, InitramfsError> {
        for (ino, e) in (1u32..).zip(&self.entries) {
            let data: &[u8] = match &e.body {
                Body::None => &[],
                Body::Data(d) => d,
            };
            let nlink = if e.mode & S_IFDIR != 0 { 2 } else { 1 };
            let mut writer = cpio::newc::Builder::new(&e.path)
                .ino(ino)
                .mode(e.mode)
                .nlink(nlink)
                .rdev_major(e.rdev.0)
                .rdev_minor(e.rdev.1)
                .write(w, data.len() as u32);
            writer.write_all(data)?;
            w = writer.finish()?;
        }
        Ok(cpio::newc::trailer(w)?)
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, InitramfsError> {
        self.write_to(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = bytes;
        loop {
            let mut reader = cpio::newc::Reader::new(rest).unwrap();
            let (name, mode) = (reader.entry().name().to_owned(), reader.entry().mode());
            if reader.entry().is_trailer() {
                break;
            }
            let mut data = Vec::new();
            io::Read::read_to_end(&mut reader, &mut data).unwrap();
            out.push((name, mode, data));
            rest = reader.finish().unwrap();
        }
        out
    }

    #[test]
    fn entries_round_trip_through_a_cpio_reader() {
        let mut ar = Initramfs::new();
        ar.dir("dev", 0o755).unwrap();
        ar.char_dev("dev/console", 0o600, 5, 1).unwrap();
        ar.file("init", 0o755, b"\x7fELF...".to_vec()).unwrap();
        ar.symlink("sbin", "init").unwrap();
        let bytes = ar.to_bytes().unwrap();
        assert_eq!(&bytes[..6], b"070701", "newc magic");
        assert_eq!(bytes.len() % 4, 0, "newc pads to 4 bytes");
        let got = read_all(&bytes);
        let names: Vec<_> = got.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "sbin"]);
        assert_eq!(got[0].1, S_IFDIR | 0o755);
        assert_eq!(got[1].1, S_IFCHR | 0o600);
        assert_eq!(
            got[2],
            ("init".into(), S_IFREG | 0o755, b"\x7fELF...".to_vec())
        );
        assert_eq!(got[3].2, b"init");
    }

    #[test]
    fn escaping_or_empty_paths_are_refused() {
        let mut ar = Initramfs::new();
        for p in ["", "/init", "../x", "a/../b", "a//b", "./a"] {
            assert!(
                matches!(ar.file(p, 0o644, vec![]), Err(InitramfsError::BadPath(_))),
                "{p:?}"
            );
        }
    }
}
