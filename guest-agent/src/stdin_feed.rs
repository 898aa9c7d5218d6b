//! A process's input, written on a thread of its own. A process that does
//! not read its stdin (or a grandchild that holds the pipe and sleeps) then
//! blocks only that thread, never the connection the agent serves every
//! process on. After each chunk the feed reports it taken, and the host
//! sends the next one only then, so nothing piles up in the guest either.

use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc::{self, Sender};
use std::thread;

/// The writing end of one process's input.
#[derive(Debug)]
pub struct StdinFeed {
    chunks: Option<Sender<Vec<u8>>>,
}

impl StdinFeed {
    /// Feeds `input` (a pipe, or a terminal's master side when `terminal`),
    /// calling `taken` after each chunk is written or dropped.
    pub fn start(
        input: File,
        terminal: bool,
        taken: impl Fn() + Send + 'static,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        thread::Builder::new()
            .name("stdin-feed".into())
            .spawn(move || {
                let mut input = Some(input);
                for chunk in rx {
                    // A process that closed its input just does not get
                    // the bytes; the host still hears they were taken.
                    if let Some(f) = input.as_mut() {
                        if f.write_all(&chunk).is_err() {
                            input = None;
                        }
                    }
                    taken();
                }
                // The end of input, after everything queued before it. A
                // terminal gets its end-of-file character (^D): closing
                // the master would hang it up.
                if let (true, Some(f)) = (terminal, input.as_mut()) {
                    let _ = f.write_all(&[4]);
                }
            })?;
        Ok(StdinFeed { chunks: Some(tx) })
    }

    /// Queues `chunk` for the process. Returns false once the input is
    /// closed (the chunk is then not written, and not reported taken).
    pub fn write(&self, chunk: Vec<u8>) -> bool {
        self.chunks.as_ref().is_some_and(|c| c.send(chunk).is_ok())
    }

    /// Ends the input once what is queued has been written.
    pub fn close(&mut self) {
        self.chunks = None;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;

    fn pipe() -> (File, File) {
        let (r, w): (OwnedFd, OwnedFd) = nix::unistd::pipe().unwrap();
        (File::from(r), File::from(w))
    }

    fn counter() -> (Arc<AtomicUsize>, impl Fn() + Send + 'static) {
        let n = Arc::new(AtomicUsize::new(0));
        let m = Arc::clone(&n);
        (n, move || {
            m.fetch_add(1, Ordering::SeqCst);
        })
    }

    fn wait_until(what: impl Fn() -> bool) {
        let start = Instant::now();
        while !what() {
            assert!(start.elapsed() < Duration::from_secs(10), "timed out");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn chunks_arrive_in_order_then_eof_and_each_is_reported_taken() {
        let (mut r, w) = pipe();
        let (taken, on_taken) = counter();
        let mut feed = StdinFeed::start(w, false, on_taken).unwrap();
        assert!(feed.write(b"one ".to_vec()));
        assert!(feed.write(b"two".to_vec()));
        feed.close();
        assert!(!feed.write(b"late".to_vec()));
        let mut got = String::new();
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "one two");
        wait_until(|| taken.load(Ordering::SeqCst) == 2);
    }

    #[test]
    fn a_reader_that_never_reads_blocks_only_its_feed() {
        let (_r, w) = pipe();
        let (taken, on_taken) = counter();
        let feed = StdinFeed::start(w, false, on_taken).unwrap();
        // More than a pipe holds: the feed's thread blocks in the write...
        let start = Instant::now();
        assert!(feed.write(vec![b'x'; 1 << 20]));
        assert!(feed.write(b"more".to_vec()));
        // ...and the caller does not.
        assert!(start.elapsed() < Duration::from_secs(1));
        thread::sleep(Duration::from_millis(100));
        assert_eq!(taken.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn chunks_for_a_closed_reader_are_dropped_but_reported_taken() {
        let (r, w) = pipe();
        drop(r);
        let (taken, on_taken) = counter();
        let feed = StdinFeed::start(w, false, on_taken).unwrap();
        assert!(feed.write(b"nobody reads this".to_vec()));
        assert!(feed.write(b"nor this".to_vec()));
        wait_until(|| taken.load(Ordering::SeqCst) == 2);
    }

    #[test]
    fn a_terminal_gets_its_eof_character_at_the_end() {
        let (mut r, w) = pipe();
        let (_, on_taken) = counter();
        let mut feed = StdinFeed::start(w, true, on_taken).unwrap();
        assert!(feed.write(b"ls\n".to_vec()));
        feed.close();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ls\n\x04");
    }
}
