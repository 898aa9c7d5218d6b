//! Running a VMM process and watching its serial console.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// What a guest run printed and how it ended.
#[derive(Debug)]
pub struct GuestRun {
    /// Everything the VMM printed (serial console on stdout, then stderr).
    pub output: String,
    /// Time from spawning the VMM to the first line holding the marker.
    pub marker_after: Option<Duration>,
    /// The VMM's exit status; `None` if it had to be killed.
    pub status: Option<ExitStatus>,
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

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Spawns `cmd`, waits up to `timeout` for a line containing `marker`, then
/// up to `grace` for the process to exit by itself before killing it.
pub fn run_until_marker(
    mut cmd: Command,
    marker: &str,
    timeout: Duration,
    grace: Duration,
) -> GuestRun {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let (tx, rx) = mpsc::channel();
    pump(child.stdout.take().expect("stdout"), tx.clone());
    pump(child.stderr.take().expect("stderr"), tx);

    let mut output = String::new();
    let mut marker_after = None;
    let mut deadline = start + timeout;
    let mut status = None;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            status = Some(s);
        }
        let now = Instant::now();
        if now >= deadline || status.is_some() {
            break;
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_millis(50))) {
            Ok((at, line)) => {
                if marker_after.is_none() && line.contains(marker) {
                    marker_after = Some(at - start);
                    deadline = Instant::now() + grace;
                }
                output.push_str(&line);
                output.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                status = Some(child.wait().expect("wait for the VMM"));
                break;
            }
        }
    }
    if status.is_none() {
        kill(&mut child);
    }
    // Collect what the pipes still hold after the process ended.
    while let Ok((at, line)) = rx.recv_timeout(Duration::from_millis(200)) {
        if marker_after.is_none() && line.contains(marker) {
            marker_after = Some(at - start);
        }
        output.push_str(&line);
        output.push('\n');
    }
    GuestRun {
        output,
        marker_after,
        status,
    }
}
