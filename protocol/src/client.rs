//! The host side of the channel: a blocking client over any byte stream,
//! and the hybrid-vsock handshake that reaches the agent through the VMM's
//! Unix socket.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::{
    encode_json, read_frame, Event, FrameError, FrameKind, MessageError, Op, Outcome, Request,
    Response, StreamChunk,
};

/// What can go wrong talking to the agent.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The connection failed.
    #[error("agent connection: {0}")]
    Io(#[from] io::Error),
    /// The agent sent something that is not the protocol.
    #[error("agent protocol: {0}")]
    Frame(#[from] FrameError),
    /// A message did not decode.
    #[error("agent message: {0}")]
    Message(#[from] MessageError),
    /// The agent sent a frame only the host may send.
    #[error("the agent sent {0}")]
    Unexpected(&'static str),
    /// The agent hung up.
    #[error("the agent closed the connection")]
    Closed,
    /// The agent did not answer a call in time.
    #[error("the guest agent did not answer within {waited:?}")]
    NoAnswer {
        /// How long the call waited.
        waited: Duration,
    },
    /// The agent could not be reached in time.
    #[error("no agent answered on vsock port {port} within {waited:?}: {last}")]
    Unreachable {
        /// The guest port.
        port: u32,
        /// How long we tried.
        waited: Duration,
        /// The last failure.
        last: String,
    },
}

/// Something the agent sent unasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A process event.
    Event(Event),
    /// Process output.
    Output(StreamChunk),
}

/// Connects to guest `port` through the VMM's hybrid vsock socket `uds`,
/// retrying until `timeout` while the guest is still booting.
pub fn connect_vsock(uds: &Path, port: u32, timeout: Duration) -> Result<UnixStream, ClientError> {
    let start = Instant::now();
    loop {
        let last = match try_connect(uds, port) {
            Ok(s) => return Ok(s),
            Err(e) => e.to_string(),
        };
        if start.elapsed() >= timeout {
            return Err(ClientError::Unreachable {
                port,
                waited: start.elapsed(),
                last,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn try_connect(uds: &Path, port: u32) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    // Byte by byte: what follows the line belongs to the protocol.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 32 {
        if s.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "nothing listens on that guest port yet",
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    if !line.starts_with(b"OK ") {
        return Err(io::Error::other(format!(
            "unexpected handshake reply {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// A blocking client: requests wait for their response; events and output
/// that arrive meanwhile are kept for [`Client::next_notice`].
#[derive(Debug)]
pub struct Client<S> {
    conn: S,
    seq: u64,
    pending: VecDeque<Notice>,
}

impl<S: Read + Write> Client<S> {
    /// A client over an established connection.
    pub fn new(conn: S) -> Self {
        Client {
            conn,
            seq: 0,
            pending: VecDeque::new(),
        }
    }

    /// The underlying connection.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.conn
    }

    /// Sends `op` and waits for its outcome.
    pub fn call(&mut self, op: Op) -> Result<Outcome, ClientError> {
        self.seq += 1;
        let seq = self.seq;
        let frame = encode_json(FrameKind::Request, &Request { seq, op })?;
        self.conn.write_all(&frame)?;
        loop {
            match self.read_one()? {
                Incoming::Response(r) if r.seq == seq => return Ok(r.result),
                // One request is outstanding at a time, so any other answer
                // (the agent's seq 0 for a frame it could not parse) means
                // the two sides disagree about the stream.
                Incoming::Response(_) => {
                    return Err(ClientError::Unexpected("a response to another request"))
                }
                Incoming::Notice(n) => self.pending.push_back(n),
            }
        }
    }

    /// Sends raw stdin bytes to process `handle`; empty data is EOF.
    pub fn send_stdin(&mut self, handle: u32, data: &[u8]) -> Result<(), ClientError> {
        let chunk = StreamChunk {
            handle,
            stream: crate::StreamId::Stdin,
            data: data.to_vec(),
        };
        self.conn.write_all(&chunk.encode()?)?;
        Ok(())
    }

    /// The next event or output chunk.
    pub fn next_notice(&mut self) -> Result<Notice, ClientError> {
        if let Some(n) = self.pending.pop_front() {
            return Ok(n);
        }
        loop {
            if let Incoming::Notice(n) = self.read_one()? {
                return Ok(n);
            }
        }
    }

    fn read_one(&mut self) -> Result<Incoming, ClientError> {
        let Some((header, payload)) = read_frame(&mut self.conn)? else {
            return Err(ClientError::Closed);
        };
        Ok(match header.kind {
            FrameKind::Response => {
                Incoming::Response(serde_json::from_slice(&payload).map_err(MessageError::Json)?)
            }
            FrameKind::Event => Incoming::Notice(Notice::Event(
                serde_json::from_slice(&payload).map_err(MessageError::Json)?,
            )),
            FrameKind::Stream => Incoming::Notice(Notice::Output(StreamChunk::decode(&payload)?)),
            FrameKind::Request => return Err(ClientError::Unexpected("a request frame")),
            FrameKind::Unknown(_) => {
                return Err(ClientError::Unexpected("a frame of unknown kind"))
            }
        })
    }
}

enum Incoming {
    Response(Response),
    Notice(Notice),
}
