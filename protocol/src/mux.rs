//! A host client shared by threads: one reader thread routes each response
//! to the call waiting for it and everything else (output, exits) to a
//! bounded channel, so one thread can relay output while another signals
//! the process.
//!
//! The notice channel is bounded on purpose: when nobody drains output the
//! reader stops reading, vsock credit stops the guest, and a chatty guest
//! cannot grow host memory. The price: a call made while output is not
//! being drained waits until it is.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::client::{ClientError, Notice};
use crate::{
    encode_json, read_frame, FrameKind, MessageError, Op, Outcome, Request, Response, StreamChunk,
    StreamId,
};

/// How many notices may wait for the relay before the reader stops reading.
pub const NOTICE_BACKLOG: usize = 64;

/// Calls waiting for their response, by `seq`.
#[derive(Default)]
struct Waiting {
    calls: HashMap<u64, Sender<Outcome>>,
    /// Why the reader stopped; later calls fail at once with it.
    ended: Option<String>,
}

/// A client many threads can call through at once.
#[derive(Debug)]
pub struct MuxClient<W> {
    writer: Mutex<W>,
    seq: AtomicU64,
    waiting: Arc<Mutex<Waiting>>,
}

impl std::fmt::Debug for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting")
            .field("calls", &self.calls.len())
            .field("ended", &self.ended)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<W: Write> MuxClient<W> {
    /// Starts the reader thread on `reader` (the connection's read half) and
    /// returns the client and the channel of notices. The channel closes
    /// when the agent hangs up or breaks the protocol.
    pub fn start<R: Read + Send + 'static>(
        reader: R,
        writer: W,
    ) -> std::io::Result<(Self, Receiver<Notice>)> {
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let (tx, rx) = mpsc::sync_channel(NOTICE_BACKLOG);
        let w = Arc::clone(&waiting);
        thread::Builder::new()
            .name("agent-reader".into())
            .spawn(move || read_loop(reader, &w, &tx))?;
        Ok((
            MuxClient {
                writer: Mutex::new(writer),
                seq: AtomicU64::new(0),
                waiting,
            },
            rx,
        ))
    }

    /// Sends `op` and waits for its outcome.
    pub fn call(&self, op: Op) -> Result<Outcome, ClientError> {
        let (_, rx) = self.send_call(op)?;
        // The reader drops every sender when it stops, so this never waits
        // on a connection that is gone.
        rx.recv().map_err(|_| ClientError::Closed)
    }

    /// Sends `op` and waits at most `limit` for its outcome. A guest that
    /// stops answering costs the caller `limit`, not its thread: an answer
    /// that comes later is dropped like any unasked one.
    pub fn call_within(&self, op: Op, limit: Duration) -> Result<Outcome, ClientError> {
        let (seq, rx) = self.send_call(op)?;
        match rx.recv_timeout(limit) {
            Ok(outcome) => Ok(outcome),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ClientError::Closed),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                lock(&self.waiting).calls.remove(&seq);
                Err(ClientError::NoAnswer { waited: limit })
            }
        }
    }

    /// Registers a call and writes its request; its seq and where its
    /// outcome will come.
    fn send_call(&self, op: Op) -> Result<(u64, Receiver<Outcome>), ClientError> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let frame = encode_json(FrameKind::Request, &Request { seq, op })?;
        let (tx, rx) = mpsc::channel();
        {
            let mut waiting = lock(&self.waiting);
            if waiting.ended.is_some() {
                return Err(ClientError::Closed);
            }
            waiting.calls.insert(seq, tx);
        }
        let sent = lock(&self.writer).write_all(&frame);
        if let Err(e) = sent {
            lock(&self.waiting).calls.remove(&seq);
            return Err(e.into());
        }
        Ok((seq, rx))
    }

    /// Sends stdin bytes to process `handle`; empty data is EOF.
    pub fn send_stdin(&self, handle: u32, data: &[u8]) -> Result<(), ClientError> {
        let chunk = StreamChunk {
            handle,
            stream: StreamId::Stdin,
            data: data.to_vec(),
        };
        lock(&self.writer).write_all(&chunk.encode()?)?;
        Ok(())
    }
}

fn read_loop<R: Read>(mut reader: R, waiting: &Mutex<Waiting>, notices: &SyncSender<Notice>) {
    let why = loop {
        let (header, payload) = match read_frame(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => break "the agent closed the connection".to_owned(),
            Err(e) => break format!("agent protocol: {e}"),
        };
        let notice = match header.kind {
            FrameKind::Response => match serde_json::from_slice::<Response>(&payload) {
                Ok(r) => {
                    let mut w = lock(waiting);
                    if r.seq == 0 {
                        // The agent could not read a request far enough to
                        // answer it (an agent older than this host): every
                        // call waiting now fails with its reason instead of
                        // waiting forever.
                        if let Outcome::Error { .. } = &r.result {
                            for (_, tx) in w.calls.drain() {
                                let _ = tx.send(r.result.clone());
                            }
                        }
                    } else if let Some(tx) = w.calls.remove(&r.seq) {
                        // An answer nobody waits for (a seq the host never
                        // used) is dropped: the guest does not get to pick
                        // which call returns what.
                        let _ = tx.send(r.result);
                    }
                    continue;
                }
                Err(e) => break format!("agent message: {}", MessageError::Json(e)),
            },
            FrameKind::Event => match serde_json::from_slice(&payload) {
                Ok(ev) => Notice::Event(ev),
                Err(e) => break format!("agent message: {}", MessageError::Json(e)),
            },
            FrameKind::Stream => match StreamChunk::decode(&payload) {
                Ok(c) if c.stream != StreamId::Stdin => Notice::Output(c),
                Ok(_) => break "the agent sent stdin".to_owned(),
                Err(e) => break format!("agent message: {e}"),
            },
            FrameKind::Request => break "the agent sent a request frame".to_owned(),
            FrameKind::Unknown(k) => break format!("the agent sent a frame of unknown kind {k}"),
        };
        if notices.send(notice).is_err() {
            break "nobody reads notices any more".to_owned();
        }
    };
    let mut w = lock(waiting);
    w.ended = Some(why);
    w.calls.clear();
}

impl<W> MuxClient<W> {
    /// Why the connection ended, once it has.
    pub fn ended(&self) -> Option<String> {
        lock(&self.waiting).ended.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::{encode_frame, Event};

    fn respond(agent: &mut UnixStream, seq: u64, result: Outcome) {
        let frame = encode_json(FrameKind::Response, &Response { seq, result }).unwrap();
        agent.write_all(&frame).unwrap();
    }

    fn next_request(agent: &mut UnixStream) -> Request {
        let (h, payload) = read_frame(agent).unwrap().unwrap();
        assert_eq!(h.kind, FrameKind::Request);
        serde_json::from_slice(&payload).unwrap()
    }

    #[test]
    fn responses_reach_their_callers_and_notices_the_channel() {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let (client, notices) = MuxClient::start(host.try_clone().unwrap(), host).unwrap();
        let client = Arc::new(client);
        let c = Arc::clone(&client);
        let call = thread::spawn(move || c.call(Op::Ping).unwrap());
        let req = next_request(&mut agent);
        assert_eq!(req.op, Op::Ping);
        // Output and an exit arrive before the answer; the call still gets it.
        let out = StreamChunk {
            handle: 1,
            stream: StreamId::Stdout,
            data: b"hi".to_vec(),
        };
        agent.write_all(&out.encode().unwrap()).unwrap();
        let ev = Event::Exited {
            handle: 1,
            status: 3,
        };
        agent
            .write_all(&encode_json(FrameKind::Event, &ev).unwrap())
            .unwrap();
        // A response to a seq nobody sent is ignored.
        respond(&mut agent, 999, Outcome::Ok { pid: Some(1) });
        respond(&mut agent, req.seq, Outcome::Ok { pid: None });
        assert_eq!(call.join().unwrap(), Outcome::Ok { pid: None });
        assert_eq!(notices.recv().unwrap(), Notice::Output(out));
        assert_eq!(notices.recv().unwrap(), Notice::Event(ev));
    }

    #[test]
    fn a_hang_up_fails_waiting_and_later_calls() {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let (client, notices) = MuxClient::start(host.try_clone().unwrap(), host).unwrap();
        let client = Arc::new(client);
        let c = Arc::clone(&client);
        let call = thread::spawn(move || c.call(Op::Ping));
        next_request(&mut agent);
        drop(agent);
        assert!(matches!(call.join().unwrap(), Err(ClientError::Closed)));
        assert_eq!(
            notices.recv_timeout(Duration::from_secs(5)),
            Err(mpsc::RecvTimeoutError::Disconnected)
        );
        assert!(matches!(client.call(Op::Ping), Err(ClientError::Closed)));
        assert!(client.ended().is_some());
    }

    #[test]
    fn a_guest_that_breaks_the_protocol_ends_the_connection() {
        for bad in [
            encode_frame(FrameKind::Request, b"{}").unwrap(),
            encode_frame(FrameKind::Event, b"not json").unwrap(),
            StreamChunk {
                handle: 1,
                stream: StreamId::Stdin,
                data: vec![1],
            }
            .encode()
            .unwrap(),
            b"garbage that is no frame header".to_vec(),
        ] {
            let (host, mut agent) = UnixStream::pair().unwrap();
            let (client, notices) = MuxClient::start(host.try_clone().unwrap(), host).unwrap();
            agent.write_all(&bad).unwrap();
            assert_eq!(
                notices.recv_timeout(Duration::from_secs(5)),
                Err(mpsc::RecvTimeoutError::Disconnected)
            );
            assert!(matches!(client.call(Op::Ping), Err(ClientError::Closed)));
        }
    }

    #[test]
    fn an_error_the_agent_could_not_address_fails_the_waiting_call() {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let (client, _notices) = MuxClient::start(host.try_clone().unwrap(), host).unwrap();
        let call = thread::spawn(move || client.call(Op::Ping));
        let _ = next_request(&mut agent);
        respond(
            &mut agent,
            0,
            Outcome::Error {
                message: "malformed request: unknown field `x`".into(),
            },
        );
        match call.join().unwrap() {
            Ok(Outcome::Error { message }) => {
                assert!(message.contains("unknown field"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_call_the_agent_leaves_unanswered_gives_up_and_its_late_answer_is_dropped() {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let (client, notices) = MuxClient::start(host.try_clone().unwrap(), host).unwrap();
        let limit = Duration::from_millis(100);
        match client.call_within(Op::Ping, limit) {
            Err(ClientError::NoAnswer { waited }) => assert_eq!(waited, limit),
            other => panic!("{other:?}"),
        }
        let late = next_request(&mut agent);
        respond(&mut agent, late.seq, Outcome::Ok { pid: Some(1) });
        // The next call gets its own answer, not the late one.
        let client = Arc::new(client);
        let c = Arc::clone(&client);
        let call = thread::spawn(move || c.call_within(Op::Ping, Duration::from_secs(30)));
        let req = next_request(&mut agent);
        assert_ne!(req.seq, late.seq);
        respond(&mut agent, req.seq, Outcome::Ok { pid: Some(2) });
        assert_eq!(call.join().unwrap().unwrap(), Outcome::Ok { pid: Some(2) });
        assert!(notices.try_recv().is_err(), "a late answer is no notice");
        assert!(client.ended().is_none());
    }
}
