//! Where each guest process's stdio lives on the host, and the threads that
//! move bytes between the two: the container's init uses the monitor's own
//! stdio (or its terminal), an `exec`'d process the fds its caller passed,
//! and its exit status goes back on the caller's connection.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use runvm_protocol::mux::MuxClient;
use runvm_protocol::{Op, StreamId};

use crate::console;
use crate::control::{self, ExecExit};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A process's host side: where its output goes and who hears of its exit.
pub struct Sink {
    writers: Mutex<Writers>,
    exit: Mutex<ExitState>,
    done: AtomicBool,
    /// Stdin chunks the agent reported taken, and its signal.
    stdin_taken: Mutex<u64>,
    stdin_progress: Condvar,
}

struct Writers {
    out: Box<dyn Write + Send>,
    err: Box<dyn Write + Send>,
    out_ok: bool,
    err_ok: bool,
}

/// The status may arrive before the caller's connection is attached (a
/// process that exits at once): whichever comes second sends it.
#[derive(Default)]
struct ExitState {
    conn: Option<UnixStream>,
    status: Option<i32>,
}

impl Sink {
    /// Output to `out` and `err` (the same terminal in terminal mode).
    pub fn new(out: Box<dyn Write + Send>, err: Box<dyn Write + Send>) -> Arc<Sink> {
        Arc::new(Sink {
            writers: Mutex::new(Writers {
                out,
                err,
                out_ok: true,
                err_ok: true,
            }),
            exit: Mutex::new(ExitState::default()),
            done: AtomicBool::new(false),
            stdin_taken: Mutex::new(0),
            stdin_progress: Condvar::new(),
        })
    }

    /// The agent took one more stdin chunk of this process.
    pub fn stdin_taken(&self) {
        *lock(&self.stdin_taken) += 1;
        self.stdin_progress.notify_all();
    }

    /// Waits up to `limit` for the agent to take more than `seen` chunks.
    fn wait_stdin_taken(&self, seen: u64, limit: Duration) -> bool {
        let taken = lock(&self.stdin_taken);
        let (taken, _) = self
            .stdin_progress
            .wait_timeout_while(taken, limit, |n| *n <= seen)
            .unwrap_or_else(|p| p.into_inner());
        *taken > seen
    }

    /// Writes output. A reader that went away (EPIPE) loses the rest of
    /// that stream; it is still drained so the agent connection moves on.
    pub fn write(&self, stream: StreamId, data: &[u8]) {
        let mut w = lock(&self.writers);
        let w = &mut *w;
        let (ok, dst) = match stream {
            StreamId::Stderr => (&mut w.err_ok, &mut w.err),
            _ => (&mut w.out_ok, &mut w.out),
        };
        if *ok && dst.write_all(data).and_then(|()| dst.flush()).is_err() {
            *ok = false;
        }
    }

    /// The caller's connection, which gets the exit status.
    pub fn attach(&self, conn: UnixStream) {
        let mut e = lock(&self.exit);
        match e.status {
            Some(status) => send_exit(&conn, status),
            None => e.conn = Some(conn),
        }
    }

    /// The process ended with `status`; its output is complete.
    pub fn exited(&self, status: i32) {
        self.done.store(true, Ordering::Release);
        // Closes the passed stdout/stderr: the caller reads EOF.
        {
            let mut w = lock(&self.writers);
            w.out = Box::new(std::io::sink());
            w.err = Box::new(std::io::sink());
        }
        let mut e = lock(&self.exit);
        e.status = Some(status);
        if let Some(conn) = e.conn.take() {
            send_exit(&conn, status);
        }
    }

    /// Whether the process has ended.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

fn send_exit(conn: &UnixStream, status: i32) {
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let _ = control::write_line(conn, &ExecExit { status });
}

/// The sinks of the processes that still run, by agent handle.
#[derive(Clone, Default)]
pub struct Routes(Arc<Mutex<HashMap<u32, Arc<Sink>>>>);

impl Routes {
    /// Routes `handle`'s output and exit to `sink`.
    pub fn add(&self, handle: u32, sink: Arc<Sink>) {
        lock(&self.0).insert(handle, sink);
    }

    /// The sink of `handle`, if it still runs.
    pub fn get(&self, handle: u32) -> Option<Arc<Sink>> {
        lock(&self.0).get(&handle).cloned()
    }

    /// Forgets `handle`, returning its sink.
    pub fn remove(&self, handle: u32) -> Option<Arc<Sink>> {
        lock(&self.0).remove(&handle)
    }
}

/// Stdin chunks (of up to 64 KiB) a relay sends ahead of the agent: enough
/// to keep a reading process busy over a round trip, few enough that the
/// guest holds little for one that does not read.
const STDIN_WINDOW: u64 = 4;

/// How often a stdin relay looks whether its process has ended.
const STDIN_POLL: Duration = Duration::from_millis(500);

/// Copies `input` to process `handle`'s stdin; its end is the process's
/// EOF. Stops when the process ends, even if `input` never does. A chunk
/// goes only while fewer than [`STDIN_WINDOW`] wait in the agent: a process
/// that reads its input slowly slows this relay (as a pipe would its
/// writer), not the agent's connection.
pub fn stdin(
    agent: Arc<MuxClient<UnixStream>>,
    handle: u32,
    mut input: File,
    sink: Arc<Sink>,
) -> anyhow::Result<()> {
    vmm::threads::named(format!("stdin-{handle}"))
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut sent = 0u64;
            loop {
                if sink.is_done() {
                    return;
                }
                let mut fds = [PollFd::new(input.as_fd(), PollFlags::POLLIN)];
                match poll(&mut fds, PollTimeout::from(STDIN_POLL.as_millis() as u16)) {
                    Ok(0) => continue,
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return,
                }
                let n = match input.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => 0,
                };
                if agent.send_stdin(handle, &buf[..n]).is_err() || n == 0 {
                    return;
                }
                sent += 1;
                // At most STDIN_WINDOW chunks the agent has not taken yet.
                if let Some(enough) = sent.checked_sub(STDIN_WINDOW) {
                    while !sink.wait_stdin_taken(enough, STDIN_POLL) {
                        if sink.is_done() || agent.ended().is_some() {
                            return;
                        }
                    }
                }
            }
        })
        .context("starting a stdin relay")?;
    Ok(())
}

/// How often the terminal's size is compared with what the guest has.
const RESIZE_POLL: Duration = Duration::from_millis(200);

/// Passes size changes of a host terminal on to process `handle`'s. The
/// caller resizes the master it holds; the slave side sees the new size
/// but no SIGWINCH (the monitor is not its session leader), hence polling.
pub fn watch_size(
    tty: File,
    agent: Arc<MuxClient<UnixStream>>,
    handle: u32,
    sink: Arc<Sink>,
) -> anyhow::Result<()> {
    vmm::threads::named(format!("tty-size-{handle}"))
        .spawn(move || {
            let mut last = None;
            while agent.ended().is_none() && !sink.is_done() {
                let now = console::size(&tty);
                if let Some(size) = now.filter(|_| now != last) {
                    if agent.call(Op::ResizeTerminal { handle, size }).is_err() {
                        return;
                    }
                    last = now;
                }
                thread::sleep(RESIZE_POLL);
            }
        })
        .context("starting the terminal size watcher")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn an_exit_before_the_connection_attaches_is_still_delivered_once() {
        for exit_first in [true, false] {
            let sink = Sink::new(Box::new(std::io::sink()), Box::new(std::io::sink()));
            let (ours, mut theirs) = UnixStream::pair().unwrap();
            if exit_first {
                sink.exited(3);
                sink.attach(ours);
            } else {
                sink.attach(ours);
                sink.exited(3);
            }
            drop(sink);
            let mut got = String::new();
            theirs.read_to_string(&mut got).unwrap();
            assert_eq!(got, "{\"status\":3}\n");
        }
    }

    #[test]
    fn output_reaches_its_streams_and_stops_at_the_exit() {
        let (out_r, out_w) = nix::unistd::pipe().unwrap();
        let (err_r, err_w) = nix::unistd::pipe().unwrap();
        let sink = Sink::new(Box::new(File::from(out_w)), Box::new(File::from(err_w)));
        sink.write(StreamId::Stdout, b"out");
        sink.write(StreamId::Stderr, b"err");
        assert!(!sink.is_done());
        sink.exited(0);
        assert!(sink.is_done());
        sink.write(StreamId::Stdout, b" late");
        // The pipes' write ends were closed by the exit: EOF follows.
        let mut got = String::new();
        File::from(out_r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "out");
        got.clear();
        File::from(err_r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "err");
    }

    #[test]
    fn a_reader_that_went_away_does_not_stop_the_relay() {
        let (out_r, out_w) = nix::unistd::pipe().unwrap();
        drop(out_r);
        let sink = Sink::new(Box::new(File::from(out_w)), Box::new(std::io::sink()));
        sink.write(StreamId::Stdout, b"lost");
        sink.write(StreamId::Stdout, b"lost too");
        sink.exited(0);
    }

    #[test]
    fn stdin_goes_ahead_of_the_agent_by_a_window_and_ends_with_eof() {
        use runvm_protocol::{read_frame, FrameKind, StreamChunk};
        let (host, mut agent) = UnixStream::pair().unwrap();
        agent
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (client, _notices) = MuxClient::start(host.try_clone().unwrap(), host).unwrap();
        let sink = Sink::new(Box::new(std::io::sink()), Box::new(std::io::sink()));
        let (input_r, input_w) = nix::unistd::pipe().unwrap();
        stdin(Arc::new(client), 7, File::from(input_r), Arc::clone(&sink)).unwrap();
        fn next_chunk(agent: &mut UnixStream) -> Vec<u8> {
            let (h, payload) = read_frame(agent).unwrap().unwrap();
            assert_eq!(h.kind, FrameKind::Stream);
            let c = StreamChunk::decode(&payload).unwrap();
            assert_eq!((c.handle, c.stream), (7, StreamId::Stdin));
            c.data
        }
        let mut input = File::from(input_w);
        // One write per chunk, each read by the relay before the next.
        for i in 0..STDIN_WINDOW {
            input.write_all(format!("chunk {i}").as_bytes()).unwrap();
            assert_eq!(next_chunk(&mut agent), format!("chunk {i}").as_bytes());
        }
        // The window is full: the next chunk waits for the agent.
        input.write_all(b"waits").unwrap();
        agent
            .set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        assert!(read_frame(&mut agent).is_err(), "sent past the window");
        agent
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        sink.stdin_taken();
        assert_eq!(next_chunk(&mut agent), b"waits");
        // The end of input is an empty chunk, after what came before it.
        drop(input);
        sink.stdin_taken();
        assert_eq!(next_chunk(&mut agent), b"");
    }
}
