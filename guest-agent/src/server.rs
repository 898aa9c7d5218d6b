//! Serves one host connection: creates and starts processes, relays their
//! stdio as stream frames, forwards signals and reports exits.
//!
//! The connection is a byte stream carrying frames. A frame that is well
//! formed but holds a bad message gets an error response and the connection
//! goes on; a broken frame (bad magic, version or size) desynchronizes the
//! stream, so the agent answers once and ends that connection only.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use runvm_protocol::{
    encode_json, read_frame, Event, FrameError, FrameKind, Op, Outcome, ProcessSpec, Request,
    Response, StreamChunk, StreamId,
};

/// Frames go out whole: the writer is locked for each one.
type SharedWriter = Arc<Mutex<Box<dyn Write + Send>>>;

fn send(writer: &SharedWriter, frame: &[u8]) -> io::Result<()> {
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    w.write_all(frame)?;
    w.flush()
}

fn respond(writer: &SharedWriter, seq: u64, result: Outcome) -> io::Result<()> {
    let frame = encode_json(FrameKind::Response, &Response { seq, result })
        .map_err(|e| io::Error::other(e.to_string()))?;
    send(writer, &frame)
}

fn error(message: impl Into<String>) -> Outcome {
    Outcome::Error {
        message: message.into(),
    }
}

enum Proc {
    Created(ProcessSpec),
    Running { pid: i32, stdin: Option<ChildStdin> },
}

/// Exit status as a shell reports it: the code, or 128 + the signal.
pub fn shell_status(status: std::process::ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(255)
}

/// Serves `conn` (read side) / `out` (write side) until the host hangs up.
pub fn serve(mut conn: impl Read, out: impl Write + Send + 'static) -> io::Result<()> {
    let writer: SharedWriter = Arc::new(Mutex::new(Box::new(out)));
    let mut procs: HashMap<u32, Proc> = HashMap::new();
    loop {
        let (header, payload) = match read_frame(&mut conn) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(()),
            Err(FrameError::Io(e)) => return Err(e),
            Err(e) => {
                let _ = respond(&writer, 0, error(format!("{e}; closing the connection")));
                return Ok(());
            }
        };
        match header.kind {
            FrameKind::Request => {
                let (seq, outcome) = match serde_json::from_slice::<Request>(&payload) {
                    Ok(req) => (req.seq, handle(req.op, &mut procs, &writer)),
                    Err(e) => (0, error(format!("malformed request: {e}"))),
                };
                respond(&writer, seq, outcome)?;
            }
            FrameKind::Stream => match StreamChunk::decode(&payload) {
                Ok(chunk) if chunk.stream == StreamId::Stdin => stdin(chunk, &mut procs),
                _ => respond(&writer, 0, error("malformed or non-stdin stream chunk"))?,
            },
            other => respond(&writer, 0, error(format!("unexpected {other:?} frame")))?,
        }
    }
}

fn stdin(chunk: StreamChunk, procs: &mut HashMap<u32, Proc>) {
    if let Some(Proc::Running { stdin, .. }) = procs.get_mut(&chunk.handle) {
        if chunk.data.is_empty() {
            *stdin = None;
        } else if let Some(pipe) = stdin {
            // A process that closed its stdin just does not get the bytes.
            if pipe.write_all(&chunk.data).is_err() {
                *stdin = None;
            }
        }
    }
}

fn handle(op: Op, procs: &mut HashMap<u32, Proc>, writer: &SharedWriter) -> Outcome {
    match op {
        Op::Ping => Outcome::Ok { pid: None },
        Op::Create { handle, process } => {
            if procs.contains_key(&handle) {
                return error(format!("handle {handle} is already in use"));
            }
            if process.args.is_empty() {
                return error("process.args is empty");
            }
            if process.terminal {
                return error("terminal mode is not supported by this agent yet");
            }
            procs.insert(handle, Proc::Created(process));
            Outcome::Ok { pid: None }
        }
        Op::Start { handle } => match procs.remove(&handle) {
            Some(Proc::Created(spec)) => match start(handle, &spec, writer) {
                Ok((pid, stdin)) => {
                    procs.insert(handle, Proc::Running { pid, stdin });
                    Outcome::Ok { pid: Some(pid) }
                }
                Err(e) => error(format!("cannot start {:?}: {e}", spec.args[0])),
            },
            Some(running) => {
                procs.insert(handle, running);
                error(format!("process {handle} was already started"))
            }
            None => error(format!("no process with handle {handle}")),
        },
        Op::Signal { handle, signal } => match procs.get(&handle) {
            Some(Proc::Running { pid, .. }) => {
                match Signal::try_from(signal)
                    .map_err(|e| e.to_string())
                    .and_then(|sig| kill(Pid::from_raw(*pid), sig).map_err(|e| e.to_string()))
                {
                    Ok(()) => Outcome::Ok { pid: None },
                    Err(e) => error(format!("signal {signal} to process {handle}: {e}")),
                }
            }
            _ => error(format!("no running process with handle {handle}")),
        },
        Op::CloseStdin { handle } => match procs.get_mut(&handle) {
            Some(Proc::Running { stdin, .. }) => {
                *stdin = None;
                Outcome::Ok { pid: None }
            }
            _ => error(format!("no running process with handle {handle}")),
        },
    }
}

fn start(
    handle: u32,
    spec: &ProcessSpec,
    writer: &SharedWriter,
) -> io::Result<(i32, Option<ChildStdin>)> {
    let mut cmd = Command::new(&spec.args[0]);
    cmd.args(&spec.args[1..])
        .env_clear()
        .current_dir(&spec.cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for kv in &spec.env {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    if spec.uid != nix::unistd::getuid().as_raw() || spec.gid != nix::unistd::getgid().as_raw() {
        cmd.uid(spec.uid).gid(spec.gid);
    }
    let mut child = cmd.spawn()?;
    let pid = child.id() as i32;
    let stdin = child.stdin.take();
    let pumps = [
        pump(
            handle,
            StreamId::Stdout,
            child.stdout.take(),
            writer.clone(),
        ),
        pump(
            handle,
            StreamId::Stderr,
            child.stderr.take(),
            writer.clone(),
        ),
    ];
    let writer = writer.clone();
    thread::spawn(move || wait(handle, child, pumps, writer));
    Ok((pid, stdin))
}

fn pump(
    handle: u32,
    stream: StreamId,
    source: Option<impl Read + Send + 'static>,
    writer: SharedWriter,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let Some(mut source) = source else { return };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match source.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => 0,
            };
            let chunk = StreamChunk {
                handle,
                stream,
                data: buf[..n].to_vec(),
            };
            let sent = chunk
                .encode()
                .ok()
                .is_some_and(|frame| send(&writer, &frame).is_ok());
            if n == 0 || !sent {
                return;
            }
        }
    })
}

/// Reports the exit only after both output streams reached EOF, so the host
/// has every byte before it sees the status.
fn wait(handle: u32, mut child: Child, pumps: [thread::JoinHandle<()>; 2], writer: SharedWriter) {
    let status = child.wait().map(shell_status).unwrap_or(255);
    for p in pumps {
        let _ = p.join();
    }
    if let Ok(frame) = encode_json(FrameKind::Event, &Event::Exited { handle, status }) {
        let _ = send(&writer, &frame);
    }
}
