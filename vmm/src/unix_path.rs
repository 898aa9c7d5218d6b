//! Unix socket paths of any length.
//!
//! `sun_path` holds 107 bytes, but engines put runtime state deep: docker's
//! runc shim uses `/var/run/docker/runtime-runc/moby/<64-hex ID>/`, which
//! leaves no room for a hybrid vsock socket's `_<port>` suffixes. A path
//! too long to bind or connect to directly is reached through an open
//! handle on its directory instead, as `/proc/self/fd/N/NAME`, which the
//! kernel resolves like the real path.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Longest path `sun_path` takes (108 bytes with the NUL).
pub const MAX_SUN_PATH: usize = 107;

/// Longest file name a socket may have: with `/proc/self/fd/<fd>/` in front
/// (25 bytes at most) and a vsock port suffix (`_4294967295`) it still fits.
pub const MAX_SOCKET_NAME: usize = MAX_SUN_PATH - 25 - "_4294967295".len();

/// A socket path that fits `sun_path`: the path itself when short enough,
/// else one through a handle on its directory, which lives as long as this.
#[derive(Debug)]
pub struct SocketPath {
    dir: Option<File>,
    path: PathBuf,
}

impl SocketPath {
    /// A usable form of `path`. Opens its directory when the path is long;
    /// fails when that directory cannot be opened or the file name alone
    /// is longer than [`MAX_SOCKET_NAME`].
    pub fn new(path: &Path) -> io::Result<Self> {
        let too_long = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{what} too long for a Unix socket: {}", path.display()),
            )
        };
        if path.as_os_str().len() <= MAX_SUN_PATH {
            return Ok(SocketPath {
                dir: None,
                path: path.to_owned(),
            });
        }
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a socket path needs a file name",
            )
        })?;
        if name.len() > MAX_SOCKET_NAME {
            return Err(too_long("file name"));
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(parent)?;
        let path = Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
        Ok(SocketPath {
            dir: Some(dir),
            path,
        })
    }

    /// The path to bind or connect to while `self` lives.
    pub fn as_path(&self) -> &Path {
        &self.path
    }

    /// Whether the path goes through a directory handle.
    pub fn is_indirect(&self) -> bool {
        self.dir.is_some()
    }

    /// The same socket's path with `suffix` appended to its file name.
    pub fn with_suffix(&self, suffix: &str) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(suffix);
        PathBuf::from(p)
    }
}

/// [`UnixListener::bind`] for a path of any length.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    UnixListener::bind(SocketPath::new(path)?.as_path())
}

/// [`UnixStream::connect`] for a path of any length.
pub fn connect(path: &Path) -> io::Result<UnixStream> {
    UnixStream::connect(SocketPath::new(path)?.as_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory under a temporary one whose path is longer than
    /// `sun_path` allows.
    fn deep_dir(tmp: &Path) -> PathBuf {
        let dir = tmp.join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn short_paths_are_used_as_they_are() {
        let p = SocketPath::new(Path::new("/run/x/c.sock")).unwrap();
        assert_eq!(p.as_path(), Path::new("/run/x/c.sock"));
        assert!(!p.is_indirect());
    }

    #[test]
    fn a_socket_deeper_than_sun_path_binds_and_connects() {
        let tmp = tempfile::tempdir().unwrap();
        let sock = deep_dir(tmp.path()).join("c.sock");
        assert!(sock.as_os_str().len() > MAX_SUN_PATH);
        assert!(
            UnixListener::bind(&sock).is_err(),
            "too long to bind directly"
        );
        let listener = bind(&sock).unwrap();
        assert!(sock.exists(), "the socket is where the long path says");
        let mut client = connect(&sock).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        std::io::Write::write_all(&mut client, b"hi").unwrap();
        let mut got = [0u8; 2];
        std::io::Read::read_exact(&mut server, &mut got).unwrap();
        assert_eq!(&got, b"hi");

        let p = SocketPath::new(&sock).unwrap();
        assert!(p.is_indirect());
        assert!(p.with_suffix("_1024").as_os_str().len() <= MAX_SUN_PATH);
    }

    #[test]
    fn long_names_and_missing_directories_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = deep_dir(tmp.path());
        let err = SocketPath::new(&dir.join("n".repeat(MAX_SOCKET_NAME + 1))).unwrap_err();
        assert!(err.to_string().contains("too long"), "{err}");
        assert!(SocketPath::new(&dir.join("missing").join("c.sock")).is_err());
    }
}
