//! The monitor's control socket: `start` and `kill` reach the container's
//! monitor process through it, one JSON line each way.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// What a `runvm` command asks the monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Start the created process.
    Start,
    /// Signal the process (a created container ends on a fatal signal).
    Kill {
        /// Signal number.
        signal: i32,
    },
}

/// The monitor's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Longest request line the monitor reads.
pub const MAX_LINE: u64 = 4096;

/// Sends `req` to the monitor listening on `sock` and waits for its reply.
pub fn call(sock: &Path, req: &Request, timeout: Duration) -> anyhow::Result<()> {
    let mut s = UnixStream::connect(sock)
        .with_context(|| format!("cannot reach the container's monitor at {}", sock.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(s.take(MAX_LINE))
        .read_line(&mut answer)
        .context("no answer from the container's monitor")?;
    if answer.is_empty() {
        bail!("the container's monitor hung up");
    }
    let reply: Reply = serde_json::from_str(&answer).context("garbled monitor reply")?;
    match reply.error {
        Some(e) => bail!("{e}"),
        None => Ok(()),
    }
}

/// Reads one request from a connection (the monitor side).
pub fn read_request(s: &UnixStream) -> anyhow::Result<Request> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(s.take(MAX_LINE)).read_line(&mut line)?;
    serde_json::from_str(&line).context("malformed control request")
}

/// Writes the reply (the monitor side).
pub fn write_reply(mut s: &UnixStream, reply: &Reply) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(reply)?;
    line.push(b'\n');
    s.write_all(&line)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn a_request_and_its_error_travel_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            for want in [Request::Start, Request::Kill { signal: 9 }] {
                let (c, _) = listener.accept().unwrap();
                assert_eq!(read_request(&c).unwrap(), want);
                let error = matches!(want, Request::Kill { .. }).then(|| "no such process".into());
                write_reply(&c, &Reply { error }).unwrap();
            }
        });
        call(&sock, &Request::Start, Duration::from_secs(5)).unwrap();
        let err = call(&sock, &Request::Kill { signal: 9 }, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.to_string(), "no such process");
        server.join().unwrap();
    }

    #[test]
    fn garbage_requests_are_refused() {
        let (a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"{\"cmd\":\"format_disk\"}\n").unwrap();
        assert!(read_request(&a).is_err());
    }
}
