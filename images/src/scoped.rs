//! Paths named by a layer, resolved inside the rootfs being built. A layer
//! is hostile until proven otherwise: its entry names must be relative and
//! free of `..`, and a symlink met on the way (left by this layer or a
//! lower one) is followed as it would be inside the container, where an
//! absolute target starts at the rootfs; one that climbs above the rootfs
//! is an escape and refuses the layer.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::error::ImageError;

/// Symlinks followed for one path before it counts as a loop (as ELOOP).
const MAX_HOPS: u32 = 40;
/// The longest entry name accepted (PATH_MAX).
pub const MAX_NAME: usize = 4096;

fn unsafe_entry(path: &[u8], why: impl Into<String>) -> ImageError {
    ImageError::UnsafeEntry {
        path: String::from_utf8_lossy(path).into_owned(),
        why: why.into(),
    }
}

/// An entry's name as a path relative to the rootfs, `./` and `.`
/// components dropped. `None` for the rootfs itself.
pub fn entry_name(raw: &[u8]) -> Result<Option<PathBuf>, ImageError> {
    if raw.len() > MAX_NAME {
        return Err(unsafe_entry(&raw[..64], "a name longer than PATH_MAX"));
    }
    if raw.contains(&0) {
        return Err(unsafe_entry(raw, "a NUL byte in the name"));
    }
    if raw.first() == Some(&b'/') {
        return Err(unsafe_entry(raw, "an absolute path"));
    }
    let mut rel = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(n) => rel.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_entry(raw, "a `..` component")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(unsafe_entry(raw, "an absolute path"))
            }
        }
    }
    Ok((!rel.as_os_str().is_empty()).then_some(rel))
}

/// Resolves `rel` (already checked by [`entry_name`]) under `root`, to a
/// path relative to `root`,
/// following symlinks inside the rootfs. With `create`, `rel` names a
/// directory: missing ones on the way, and it, are made (mode 0755) as tar
/// does for an entry's parents. The last component is followed only with
/// `follow_last`.
pub fn resolve(
    root: &Path,
    rel: &Path,
    create: bool,
    follow_last: bool,
) -> Result<PathBuf, ImageError> {
    let raw = rel.as_os_str().as_bytes();
    let mut todo: VecDeque<PathBuf> = rel
        .components()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut done = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        match c.to_str() {
            Some("..") => {
                if !done.pop() {
                    return Err(unsafe_entry(
                        raw,
                        "a symlink on its path leads outside the rootfs",
                    ));
                }
                continue;
            }
            Some(".") | Some("") => continue,
            _ => {}
        }
        let here = done.join(&c);
        let last = todo.is_empty();
        let full = root.join(&here);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.file_type().is_symlink() && (!last || follow_last) => {
                hops += 1;
                if hops > MAX_HOPS {
                    return Err(unsafe_entry(raw, "too many symlinks on its path"));
                }
                let target = fs::read_link(&full).map_err(|e| unsafe_entry(raw, e.to_string()))?;
                if target.is_absolute() {
                    done = PathBuf::new();
                }
                for t in target.components().rev() {
                    match t {
                        Component::Normal(n) => todo.push_front(PathBuf::from(n)),
                        Component::ParentDir => todo.push_front(PathBuf::from("..")),
                        _ => {}
                    }
                }
            }
            Ok(m) if !last && !m.is_dir() => {
                return Err(unsafe_entry(
                    raw,
                    format!("{} is not a directory", here.display()),
                ))
            }
            Ok(_) => done = here,
            Err(_) if create => {
                fs::create_dir(&full)
                    .map_err(|e| unsafe_entry(raw, format!("mkdir {}: {e}", here.display())))?;
                done = here;
            }
            Err(_) if last => done = here,
            Err(e) => return Err(unsafe_entry(raw, format!("{}: {e}", here.display()))),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn names_are_relative_without_parent_components() {
        assert_eq!(
            entry_name(b"./etc//passwd").unwrap(),
            Some(PathBuf::from("etc/passwd"))
        );
        assert_eq!(entry_name(b"./").unwrap(), None);
        for bad in [&b"/etc/passwd"[..], b"../x", b"a/../../x", b"a/\0b"] {
            assert!(
                matches!(entry_name(bad), Err(ImageError::UnsafeEntry { .. })),
                "{bad:?}"
            );
        }
        assert!(entry_name(&vec![b'a'; MAX_NAME + 1]).is_err());
    }

    #[test]
    fn symlinks_resolve_inside_the_rootfs_and_escapes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        symlink("usr/lib", root.join("lib")).unwrap();
        symlink("/usr", root.join("abs")).unwrap();
        symlink("../../..", root.join("usr/up")).unwrap();
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        let r = |p: &str| resolve(&root, Path::new(p), true, false);
        assert_eq!(r("lib/x.so").unwrap(), PathBuf::from("usr/lib/x.so"));
        assert_eq!(r("abs/lib/y").unwrap(), PathBuf::from("usr/lib/y"));
        // The last component is not followed: the entry replaces the link.
        assert_eq!(r("lib").unwrap(), PathBuf::from("lib"));
        assert!(matches!(
            r("usr/up/etc/passwd"),
            Err(ImageError::UnsafeEntry { .. })
        ));
        assert!(r("loop1/x").is_err());
        // Missing parents are created.
        assert_eq!(
            resolve(&root, Path::new("new/dir"), true, true).unwrap(),
            PathBuf::from("new/dir")
        );
        assert!(root.join("new/dir").is_dir());
        assert_eq!(
            resolve(&root, Path::new("lib/none"), false, false).unwrap(),
            PathBuf::from("usr/lib/none")
        );
        assert!(!root.join("usr/lib/none").exists());
        fs::write(root.join("file"), "").unwrap();
        assert!(r("file/x").is_err());
    }
}
