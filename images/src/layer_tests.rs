//! Layer application: the OCI rules, and hostile tarballs.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use tar::{EntryType, Header};

use crate::error::ImageError;
use crate::layer::{apply, ApplyOptions};

/// Builds a tarball entry by entry, names written raw so hostile ones
/// (which tar::Builder refuses to write) can be made.
#[derive(Default)]
struct Tarball {
    bytes: Vec<u8>,
}

impl Tarball {
    fn raw(&mut self, name: &[u8], kind: EntryType, mode: u32, link: &[u8], data: &[u8]) {
        let mut h = Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name);
            gnu.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1_600_000_000);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_cksum();
        self.bytes.extend_from_slice(h.as_bytes());
        self.bytes.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.bytes.extend(std::iter::repeat_n(0, pad));
    }
    fn file(&mut self, name: &str, data: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            EntryType::Regular,
            0o644,
            b"",
            data.as_bytes(),
        );
        self
    }
    fn dir(&mut self, name: &str) -> &mut Self {
        self.raw(name.as_bytes(), EntryType::Directory, 0o755, b"", b"");
        self
    }
    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            EntryType::Symlink,
            0o777,
            target.as_bytes(),
            b"",
        );
        self
    }
    fn link(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            name.as_bytes(),
            EntryType::Link,
            0o644,
            target.as_bytes(),
            b"",
        );
        self
    }
    fn done(&self) -> Vec<u8> {
        let mut b = self.bytes.clone();
        b.extend(std::iter::repeat_n(0, 1024));
        b
    }
}

fn apply_bytes(bytes: &[u8], root: &Path) -> Result<crate::layer::LayerStats, ImageError> {
    apply(bytes, root, ApplyOptions::for_this_process())
}

fn rootfs() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("rootfs");
    fs::create_dir(&root).unwrap();
    (dir, root)
}

fn read(root: &Path, p: &str) -> String {
    fs::read_to_string(root.join(p)).unwrap()
}

#[test]
fn files_links_and_metadata_are_made_as_the_tarball_says() {
    let (_d, root) = rootfs();
    let mut t = Tarball::default();
    t.dir("./etc/")
        .file("./etc/hostname", "box\n")
        .symlink("./etc/alias", "hostname")
        .link("./etc/hard", "./etc/hostname")
        .file("deep/er/file", "made parents\n");
    t.raw(b"bin/su", EntryType::Regular, 0o4755, b"", b"#!\n");
    t.raw(b"run/fifo", EntryType::Fifo, 0o600, b"", b"");
    t.raw(b"dev/null", EntryType::Char, 0o666, b"", b"");
    let stats = apply_bytes(&t.done(), &root).unwrap();
    assert_eq!(stats.entries, 8);
    assert_eq!(read(&root, "etc/hostname"), "box\n");
    assert_eq!(
        fs::read_link(root.join("etc/alias")).unwrap(),
        Path::new("hostname")
    );
    let a = fs::metadata(root.join("etc/hostname")).unwrap();
    let b = fs::metadata(root.join("etc/hard")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    assert_eq!(a.mtime(), 1_600_000_000);
    assert_eq!(
        fs::metadata(root.join("etc")).unwrap().mtime(),
        1_600_000_000
    );
    assert_eq!(read(&root, "deep/er/file"), "made parents\n");
    let su = fs::metadata(root.join("bin/su")).unwrap();
    assert!(fs::symlink_metadata(root.join("run/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    if nix::unistd::geteuid().is_root() {
        assert_eq!(
            su.permissions().mode() & 0o7777,
            0o4755,
            "setuid kept after chown"
        );
        assert_eq!((a.uid(), a.gid()), (1000, 1001));
        assert!(fs::symlink_metadata(root.join("dev/null"))
            .unwrap()
            .file_type()
            .is_char_device());
        assert_eq!(stats.skipped_devices, 0);
    } else {
        assert_eq!(stats.skipped_devices, 1);
    }
}

#[test]
fn whiteouts_and_opaque_directories_hide_lower_layers_only() {
    let (_d, root) = rootfs();
    let mut lower = Tarball::default();
    lower
        .file("a/b", "b")
        .file("a/c", "c")
        .file("d", "d")
        .file("x/1", "1")
        .file("x/2", "2")
        .file("f", "file");
    apply_bytes(&lower.done(), &root).unwrap();
    let mut upper = Tarball::default();
    upper
        .file("a/.wh.b", "")
        .file(".wh.d", "")
        .file("x/new", "new")
        .file("x/.wh..wh..opq", "")
        .dir("f/")
        .file("f/inside", "a directory replaced the file");
    apply_bytes(&upper.done(), &root).unwrap();
    assert!(!root.join("a/b").exists());
    assert_eq!(read(&root, "a/c"), "c");
    assert!(!root.join("d").exists());
    let mut x: Vec<_> = fs::read_dir(root.join("x"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    x.sort();
    assert_eq!(x, ["new"]);
    assert_eq!(read(&root, "f/inside"), "a directory replaced the file");
    assert!(!root.join(".wh.d").exists() && !root.join("x/.wh..wh..opq").exists());
}

#[test]
fn gzip_and_zstd_layers_have_the_diff_id_of_their_tarball() {
    let mut t = Tarball::default();
    t.file("hello", "hi\n");
    let plain = t.done();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&plain[..], 3).unwrap();
    let want = crate::Digest::sha256_of(&plain);
    for bytes in [&plain, &gz, &zst] {
        let (_d, root) = rootfs();
        let stats = apply_bytes(bytes, &root).unwrap();
        assert_eq!(stats.diff_id, want);
        assert_eq!(stats.tar_bytes, plain.len() as u64);
        assert_eq!(read(&root, "hello"), "hi\n");
    }
}

/// A hostile layer is refused with an UnsafeEntry error and writes nothing
/// outside the rootfs.
fn refused(t: &Tarball, outside: &str) -> String {
    let (dir, root) = rootfs();
    fs::create_dir_all(dir.path().join("etc")).unwrap();
    let e = apply_bytes(&t.done(), &root).unwrap_err();
    assert!(matches!(e, ImageError::UnsafeEntry { .. }), "{e}");
    assert!(!dir.path().join(outside).exists(), "{outside} was written");
    e.to_string()
}

#[test]
fn path_escapes_are_refused() {
    let mut t = Tarball::default();
    t.file("../evil", "x");
    assert!(refused(&t, "evil").contains("`..`"));
    let mut t = Tarball::default();
    t.file("ok", "").file("a/../../evil", "x");
    refused(&t, "evil");
    let mut t = Tarball::default();
    t.file("/evil", "x");
    assert!(refused(&t, "evil").contains("absolute"));
}

#[test]
fn symlink_escapes_are_refused_and_absolute_links_stay_inside() {
    let mut t = Tarball::default();
    t.symlink("up", "../..").file("up/etc/evil", "x");
    assert!(refused(&t, "etc/evil").contains("outside the rootfs"));
    let mut t = Tarball::default();
    t.symlink("a", "b/../../..")
        .dir("b")
        .file("a/etc/evil", "x");
    refused(&t, "etc/evil");
    // An absolute target means the container's /, never the host's.
    let (dir, root) = rootfs();
    let mut t = Tarball::default();
    t.symlink("hostetc", "/etc")
        .file("hostetc/passwd", "inside");
    apply_bytes(&t.done(), &root).unwrap();
    assert_eq!(read(&root, "etc/passwd"), "inside");
    assert!(!dir.path().join("etc/passwd").exists());
}

#[test]
fn hardlink_escapes_are_refused() {
    let mut t = Tarball::default();
    t.link("stolen", "../secret");
    refused(&t, "secret-copy");
    let mut t = Tarball::default();
    t.symlink("up", "..").link("stolen", "up/secret");
    assert!(refused(&t, "x").contains("outside the rootfs"));
    let mut t = Tarball::default();
    t.link("stolen", "/etc/shadow");
    refused(&t, "x");
    let mut t = Tarball::default();
    t.link("dangling", "missing");
    refused(&t, "x");
}

#[test]
fn truncated_and_huge_header_archives_fail_cleanly() {
    let mut t = Tarball::default();
    t.file("big", &"x".repeat(4000));
    let whole = t.done();
    let (_d, root) = rootfs();
    let e = apply_bytes(&whole[..2000], &root).unwrap_err();
    assert!(matches!(e, ImageError::Format(_)), "{e}");
    // A GNU long name claiming 1 TiB with nothing behind it.
    let mut h = Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(EntryType::GNULongName);
    h.set_size(1 << 40);
    h.set_cksum();
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend_from_slice(&[b'a'; 512]);
    let (_d, root) = rootfs();
    let e = apply_bytes(&bytes, &root).unwrap_err();
    assert!(matches!(e, ImageError::Format(_)), "{e}");
    // Garbage is not a tarball.
    let (_d, root) = rootfs();
    assert!(apply_bytes(&[0x55; 1024], &root).is_err());
    // A corrupt gzip stream.
    let (_d, root) = rootfs();
    assert!(apply_bytes(&[0x1f, 0x8b, 8, 0, 1, 2, 3], &root).is_err());
}
