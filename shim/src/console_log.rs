//! The guest's serial console as a file in the container's state
//! directory, bounded. The guest kernel, and any container process that
//! can write to `/dev/ttyS0` or `/dev/kmsg`, can print for as long as the
//! container runs, and the state directory is on the host's `/run`, in
//! memory: unbounded, a hostile guest could fill it. The file keeps the
//! first [`HEAD`] bytes (the boot, which explains a VM that never came up)
//! and the most recent output after them, at most [`MAX`] bytes in all;
//! a line in between says how much was dropped.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

/// The most the file holds unless [`MAX_ENV`] says otherwise.
pub const MAX: u64 = 1 << 20;
/// What is kept from the start (at most a sixteenth of the bound).
pub const HEAD: u64 = 64 << 10;
/// The operator's bound in bytes, from the environment of `runvm create`
/// or `run` (at least [`MIN`]).
pub const MAX_ENV: &str = "RUNVM_CONSOLE_LOG_MAX";
/// The smallest bound taken.
pub const MIN: u64 = 4096;

/// The bound: [`MAX_ENV`] if it holds a number, else [`MAX`].
pub fn bound() -> u64 {
    std::env::var(MAX_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(MAX, |v| v.max(MIN))
}

/// A console log that never grows past its bound.
#[derive(Debug)]
pub struct BoundedLog {
    file: File,
    len: u64,
    dropped: u64,
    max: u64,
    head: u64,
    /// Where the kept start ends, fixed by the first rotation.
    head_end: Option<u64>,
    /// The length of the dropped-bytes line after the head.
    marker_len: u64,
}

impl BoundedLog {
    /// Writes to `file`, an empty file opened for reading and writing,
    /// at most `max` bytes.
    pub fn new(file: File, max: u64) -> Self {
        let max = max.max(MIN);
        Self::with_bounds(file, max, HEAD.min(max / 16))
    }

    fn with_bounds(file: File, max: u64, head: u64) -> Self {
        BoundedLog {
            file,
            len: 0,
            dropped: 0,
            max,
            head,
            head_end: None,
            marker_len: 0,
        }
    }

    /// Keeps the head and the newest half of what follows it, and makes
    /// room for `incoming` more bytes.
    fn rotate(&mut self, incoming: u64) -> io::Result<()> {
        let head = *self.head_end.get_or_insert(self.head.min(self.len));
        // Half the room after the head, less what is about to arrive.
        let room = (self.max - head) / 2;
        // The output after the head and the last marker.
        let body = self.len - head - self.marker_len;
        let keep = room.saturating_sub(incoming).min(body);
        let mut tail = vec![0; keep as usize];
        self.file.read_exact_at(&mut tail, self.len - keep)?;
        // The kept part starts at a line: none is cut in half.
        let start = match keep < body {
            true => tail
                .iter()
                .position(|&b| b == b'\n')
                .map_or(tail.len(), |i| i + 1),
            false => 0,
        };
        self.dropped += body - keep + start as u64;
        self.file.set_len(head)?;
        self.file.seek(SeekFrom::Start(head))?;
        let marker = format!(
            "\n[runvm: {} bytes of console output dropped here]\n",
            self.dropped
        );
        self.file.write_all(marker.as_bytes())?;
        self.file.write_all(&tail[start..])?;
        self.marker_len = marker.len() as u64;
        self.len = head + self.marker_len + (tail.len() - start) as u64;
        Ok(())
    }
}

impl Write for BoundedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // More than a rotation keeps: only its last lines are worth it.
        let limit = ((self.max - self.head) / 4) as usize;
        let mut data = buf;
        if buf.len() > limit {
            let end = &buf[buf.len() - limit..];
            let start = end.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
            data = &end[start..];
            self.dropped += (buf.len() - data.len()) as u64;
        }
        if data.len() < buf.len() || self.len + data.len() as u64 > self.max {
            self.rotate(data.len() as u64)?;
        }
        self.file.write_all(data)?;
        self.len += data.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The last `lines` lines of the console log at `path` (empty when there
/// is none).
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn endless_output_keeps_the_boot_and_the_latest_lines_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = BoundedLog::with_bounds(open(&path), 4096, 512);
        // The serial port writes a byte at a time.
        let mut written = 0u64;
        for i in 0..20_000 {
            for b in format!("line {i}\n").bytes() {
                assert_eq!(log.write(&[b]).unwrap(), 1);
                written += 1;
            }
            assert!(std::fs::metadata(&path).unwrap().len() <= 4096);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("line 0\nline 1\n"), "{text}");
        assert!(text.ends_with("line 19998\nline 19999\n"), "{text}");
        assert_eq!(text.matches("console output dropped").count(), 1, "{text}");
        // Every line is whole, and what is missing is what was counted.
        let after = text.split("dropped here]\n").nth(1).unwrap();
        let first: u64 = after.lines().next().unwrap()[5..].parse().unwrap();
        let dropped: u64 = text
            .split("[runvm: ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let head_end = text.find("\n[runvm").unwrap();
        let kept_lines = (0..first).map(|i| format!("line {i}\n").len() as u64);
        let before_first: u64 = kept_lines.sum();
        assert_eq!(dropped, before_first - head_end as u64, "{text}");
        assert!(written > 4096 * 10);
        assert_eq!(tail(&path, 2), "line 19998\nline 19999");
    }

    #[test]
    fn one_huge_write_keeps_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = BoundedLog::with_bounds(open(&path), 4096, 512);
        log.write_all(b"boot ok\n").unwrap();
        let big: Vec<u8> = (0..100_000u32)
            .flat_map(|i| format!("{i}\n").into_bytes())
            .collect();
        assert_eq!(log.write(&big).unwrap(), big.len());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() <= 4096);
        assert!(text.starts_with("boot ok\n"), "{text}");
        assert!(text.ends_with("99998\n99999\n"), "{text}");
        assert!(text.contains("console output dropped"), "{text}");
    }

    #[test]
    fn output_within_the_bound_is_kept_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = BoundedLog::new(open(&path), MAX);
        log.write_all(b"RUNVM_AGENT_READY\nhello\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "RUNVM_AGENT_READY\nhello\n"
        );
        assert_eq!(tail(&path, 10), "RUNVM_AGENT_READY\nhello");
        assert_eq!(tail(&dir.path().join("none"), 10), "");
    }
}
