//! The monitor's control socket: `start`, `kill` and `exec` reach the
//! container's monitor process through it, one JSON line each way. An
//! `exec` request carries the new process's stdio as SCM_RIGHTS and its
//! connection stays open: the caller sends [`Request::Kill`] lines for the
//! process, the monitor ends with an [`ExecExit`] line.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use runvm_protocol::{GuestProcess, GuestStats, ProcessSpec, Resources};
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
    /// List the container's processes.
    Ps,
    /// The container's resource use.
    Stats,
    /// New limits for the container's cgroup.
    Update {
        /// The limits to change.
        resources: Resources,
    },
    /// Stop the VM's vCPUs.
    Pause,
    /// Let them run again.
    Resume,
    /// The host processes that stand for the container's: the monitor
    /// (the init's) and each exec's caller or detached waiter.
    HostPids,
    /// Sent on an exec's connection by the host process that stands for
    /// the exec from then on (its PID is what `--pid-file` got).
    StandIn {
        /// That process's PID.
        pid: i32,
    },
    /// Run one more process in the container. Without a terminal, its
    /// stdin, stdout and stderr come with the request (SCM_RIGHTS).
    Exec {
        /// What to run.
        process: Box<ProcessSpec>,
        /// Where the terminal's master goes (`process.terminal`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        console_socket: Option<PathBuf>,
    },
}

/// The monitor's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The process's PID in the guest (`exec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_pid: Option<i32>,
    /// Host PIDs standing for the container's processes (`host-pids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_pids: Option<Vec<i32>>,
    /// The container's processes (`ps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processes: Option<Vec<GuestProcess>>,
    /// Resource use (`stats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<GuestStats>,
}

impl Reply {
    /// A failure.
    pub fn error(msg: impl Into<String>) -> Reply {
        Reply {
            error: Some(msg.into()),
            ..Reply::default()
        }
    }
}

/// The last line on an exec connection: how the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExit {
    /// Exit code, or 128+signal.
    pub status: i32,
}

/// Longest request line the monitor reads (an exec's process spec with a
/// large environment fits).
pub const MAX_LINE: usize = 1 << 20;
/// At most this many fds come with a request (an exec's stdio).
pub const MAX_FDS: usize = 3;

/// Sends `req` to the monitor listening on `sock` and waits for its reply.
pub fn call(sock: &Path, req: &Request, timeout: Duration) -> anyhow::Result<Reply> {
    call_with_fds(sock, req, &[], timeout).map(|(_, reply)| reply)
}

/// Like [`call`], passing `fds` along; returns the connection (still open)
/// and the reply, which is known to carry no error.
pub fn call_with_fds(
    sock: &Path,
    req: &Request,
    fds: &[RawFd],
    timeout: Duration,
) -> anyhow::Result<(UnixStream, Reply)> {
    let s = vmm::unix_path::connect(sock)
        .with_context(|| format!("cannot reach the container's monitor at {}", sock.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    send_line(&s, &line, fds).context("cannot send to the container's monitor")?;
    let answer = read_line(&s)
        .context("no answer from the container's monitor")?
        .context("the container's monitor hung up")?;
    let reply: Reply = serde_json::from_slice(&answer).context("garbled monitor reply")?;
    if let Some(e) = reply.error {
        bail!("{e}");
    }
    s.set_read_timeout(None)?;
    Ok((s, reply))
}

/// Writes `line`, with `fds` attached to its first byte.
fn send_line(s: &UnixStream, line: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    let n = sendmsg::<UnixAddr>(
        s.as_raw_fd(),
        &[IoSlice::new(line)],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )?;
    (&*s).write_all(&line[n..])
}

/// Reads up to a newline, byte by byte so nothing after it is consumed;
/// `None` when the peer hung up first.
pub fn read_line(s: &UnixStream) -> anyhow::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match (&*s).read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => bail!("the line was cut short"),
            Ok(_) if byte[0] == b'\n' => return Ok(Some(line)),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
        if line.len() > MAX_LINE {
            bail!("a control line longer than {MAX_LINE} bytes");
        }
    }
}

/// Reads one request and the fds that came with it (the monitor side).
pub fn read_request(s: &UnixStream) -> anyhow::Result<(Request, Vec<OwnedFd>)> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut first = [0u8; 1];
    let mut fds = Vec::new();
    let (bytes, truncated) = {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(&mut first)];
        let msg = recvmsg::<UnixAddr>(
            s.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("reading a control request")?;
        for c in msg.cmsgs().context("reading a control request's fds")? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: SCM_RIGHTS gave this process new descriptors that
                // nothing else owns.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, msg.flags.contains(MsgFlags::MSG_CTRUNC))
    };
    if bytes == 0 {
        bail!("empty control request");
    }
    // The control buffer rounds up, so one more fd may fit in it.
    if truncated || fds.len() > MAX_FDS {
        bail!("more than {MAX_FDS} fds came with a control request");
    }
    let mut line = first.to_vec();
    if first[0] != b'\n' {
        line.extend(read_line(s)?.context("the control request was cut short")?);
    }
    let req = serde_json::from_slice(&line).context("malformed control request")?;
    Ok((req, fds))
}

/// Writes one JSON line (the monitor side: replies and exec exits).
pub fn write_line<T: Serialize>(mut s: &UnixStream, value: &T) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    s.write_all(&line)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::File;
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
                let (req, fds) = read_request(&c).unwrap();
                assert_eq!(req, want);
                assert!(fds.is_empty());
                let reply = match want {
                    Request::Kill { .. } => Reply::error("no such process"),
                    _ => Reply::default(),
                };
                write_line(&c, &reply).unwrap();
            }
        });
        call(&sock, &Request::Start, Duration::from_secs(5)).unwrap();
        let err = call(&sock, &Request::Kill { signal: 9 }, Duration::from_secs(5)).unwrap_err();
        assert_eq!(err.to_string(), "no such process");
        server.join().unwrap();
    }

    #[test]
    fn an_exec_carries_its_stdio_and_keeps_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("c.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let process = ProcessSpec {
            args: vec!["sh".into(), "-c".into(), "x".repeat(100_000)],
            ..serde_json::from_str(r#"{"args":["x"]}"#).unwrap()
        };
        let want = Request::Exec {
            process: Box::new(process),
            console_socket: None,
        };
        let expected = want.clone();
        let server = std::thread::spawn(move || {
            let (c, _) = listener.accept().unwrap();
            let (req, fds) = read_request(&c).unwrap();
            assert_eq!(req, expected);
            assert_eq!(fds.len(), 2);
            let mut out = File::from(fds.into_iter().nth(1).unwrap());
            out.write_all(b"through the passed fd").unwrap();
            drop(out);
            write_line(
                &c,
                &Reply {
                    guest_pid: Some(42),
                    ..Reply::default()
                },
            )
            .unwrap();
            let kill: Request = serde_json::from_slice(&read_line(&c).unwrap().unwrap()).unwrap();
            assert_eq!(kill, Request::Kill { signal: 15 });
            write_line(&c, &ExecExit { status: 143 }).unwrap();
        });
        let (r, w) = nix::unistd::pipe().unwrap();
        let devnull = File::open("/dev/null").unwrap();
        let (conn, reply) = call_with_fds(
            &sock,
            &want,
            &[devnull.as_raw_fd(), w.as_raw_fd()],
            Duration::from_secs(5),
        )
        .unwrap();
        drop(w);
        assert_eq!(reply.guest_pid, Some(42));
        let mut got = String::new();
        File::from(r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "through the passed fd");
        write_line(&conn, &Request::Kill { signal: 15 }).unwrap();
        let exit: ExecExit = serde_json::from_slice(&read_line(&conn).unwrap().unwrap()).unwrap();
        assert_eq!(exit, ExecExit { status: 143 });
        assert_eq!(read_line(&conn).unwrap(), None);
        server.join().unwrap();
    }

    #[test]
    fn garbage_requests_are_refused() {
        for bad in [
            &b"{\"cmd\":\"format_disk\"}\n"[..],
            b"\n",
            b"{\"cmd\":\"start\"",
        ] {
            let (a, mut b) = UnixStream::pair().unwrap();
            b.write_all(bad).unwrap();
            drop(b);
            assert!(
                read_request(&a).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn too_many_fds_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = File::open("/dev/null").unwrap();
        let fds = [f.as_raw_fd(); MAX_FDS + 1];
        send_line(&b, b"{\"cmd\":\"start\"}\n", &fds).unwrap();
        let err = read_request(&a).unwrap_err();
        assert!(format!("{err:#}").contains("fds"), "{err:#}");
    }

    #[test]
    fn an_overlong_line_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            while (&b).write_all(&chunk).is_ok() {}
        });
        assert!(read_line(&a).is_err());
        drop(a);
        writer.join().unwrap();
    }
}
