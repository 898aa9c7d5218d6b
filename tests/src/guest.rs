//! Running a VMM process and talking to its serial console.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// What a guest run printed and how it ended.
#[derive(Debug)]
pub struct GuestRun {
    /// Everything the VMM printed (serial console on stdout, and stderr).
    pub output: String,
    /// The VMM's exit status; `None` if it had to be killed.
    pub status: Option<ExitStatus>,
    /// Wall time from spawn to exit (or kill).
    pub elapsed: Duration,
}

/// A running VMM whose output is read line by line.
#[derive(Debug)]
pub struct GuestProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<(Instant, String)>,
    output: String,
    start: Instant,
}

fn pump<R: Read + Send + 'static>(r: R, tx: mpsc::Sender<(Instant, String)>) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
}

impl GuestProcess {
    /// Spawns `cmd` with piped stdio.
    pub fn spawn(mut cmd: Command) -> Self {
        let start = Instant::now();
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let (tx, rx) = mpsc::channel();
        pump(child.stdout.take().expect("stdout"), tx.clone());
        pump(child.stderr.take().expect("stderr"), tx);
        GuestProcess {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            output: String::new(),
            start,
        }
    }

    /// Waits up to `timeout` for a line containing `marker`; returns the time
    /// from spawn to that line, or `None` (the process ended, or time ran out).
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> Option<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    self.output.push_str(&line);
                    self.output.push('\n');
                    if line.contains(marker) {
                        return Some(at - self.start);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Writes `bytes` to the VMM's stdin.
    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(bytes).expect("write to the VMM's stdin");
        stdin.flush().expect("flush the VMM's stdin");
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `grace` for the process to exit by itself, kills it
    /// otherwise, and returns everything it printed.
    pub fn finish(mut self, grace: Duration) -> GuestRun {
        drop(self.stdin.take());
        let deadline = Instant::now() + grace;
        let mut status = None;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                status = Some(s);
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        if status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let elapsed = self.start.elapsed();
        while let Ok((_, line)) = self.lines.recv_timeout(Duration::from_millis(300)) {
            self.output.push_str(&line);
            self.output.push('\n');
        }
        GuestRun {
            output: self.output,
            status,
            elapsed,
        }
    }
}

/// The value of the first `KEY[...]` a guest printed.
pub fn marked<'a>(output: &'a str, key: &str) -> &'a str {
    let open = format!("{key}[");
    output
        .split(&open)
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .unwrap_or_else(|| panic!("no {key}[...] in:\n{output}"))
}
