//! The agent of a template guest: booted without a container, it listens,
//! says so on the console (where the host snapshots the VM), and every
//! copy restored from the snapshot goes on here, taking its container from
//! the first request of its host ([`Op::Setup`]).

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;

use nix::time::{clock_settime, ClockId};
use runvm_protocol::{
    encode_json, read_frame, FrameKind, GuestSetup, Op, Outcome, Request, Response,
};

use crate::init::{personalize, BootParams};

/// Prints `marker` and waits for a connection whose first request sets the
/// guest up; returns what the guest now is and that connection, which the
/// agent serves from then on.
pub fn wait_for_setup(listener: &OwnedFd, marker: &str) -> Result<(BootParams, File), String> {
    println!("{marker}");
    let _ = std::io::stdout().flush();
    loop {
        let mut conn = crate::vsock::accept(listener).map_err(|e| format!("vsock accept: {e}"))?;
        let (seq, setup) = match read_setup(&mut conn) {
            Ok(request) => request,
            Err(message) => {
                // Not a setup: this connection gets nothing else.
                let _ = respond(&mut conn, 0, Outcome::Error { message });
                continue;
            }
        };
        return match apply(*setup) {
            Ok(params) => {
                respond(&mut conn, seq, Outcome::Ok { pid: None })?;
                Ok((params, conn))
            }
            Err(message) => {
                let _ = respond(
                    &mut conn,
                    seq,
                    Outcome::Error {
                        message: message.clone(),
                    },
                );
                Err(message)
            }
        };
    }
}

fn read_setup(conn: &mut File) -> Result<(u64, Box<GuestSetup>), String> {
    let (header, payload) = read_frame(conn)
        .map_err(|e| e.to_string())?
        .ok_or("the host hung up before setting the guest up")?;
    if header.kind != FrameKind::Request {
        return Err(format!(
            "expected the guest's setup, got a {:?} frame",
            header.kind
        ));
    }
    match serde_json::from_slice::<Request>(&payload) {
        Ok(Request {
            seq,
            op: Op::Setup { setup },
        }) => Ok((seq, setup)),
        Ok(_) => Err("this guest is a template's copy: its first request must set it up".into()),
        Err(e) => Err(format!("malformed request: {e}")),
    }
}

fn respond(conn: &mut File, seq: u64, result: Outcome) -> Result<(), String> {
    let frame =
        encode_json(FrameKind::Response, &Response { seq, result }).map_err(|e| e.to_string())?;
    conn.write_all(&frame)
        .map_err(|e| format!("answering the setup: {e}"))
}

/// Makes this copy of the template the container's guest.
fn apply(setup: GuestSetup) -> Result<BootParams, String> {
    if !setup.macs.is_empty() {
        let net = runvm_agent::network::LinuxNet::new("/etc/resolv.conf".into())
            .map_err(|e| format!("network control socket: {e}"))?;
        for (from, to) in &setup.macs {
            net.change_mac(from, to)
                .map_err(|e| format!("giving the NIC {from} the address {to}: {e}"))?;
        }
    }
    let (secs, nanos) = setup.realtime;
    if nanos >= 1_000_000_000 {
        return Err(format!("a wall clock of {secs}s and {nanos}ns"));
    }
    let now = nix::sys::time::TimeSpec::new(secs, i64::from(nanos));
    clock_settime(ClockId::CLOCK_REALTIME, now).map_err(|e| format!("setting the clock: {e}"))?;
    let params = BootParams {
        rootfs_tag: Some(setup.rootfs_tag),
        rootfs_ro: setup.rootfs_ro,
        rootfs_overlay: setup.rootfs_overlay,
        hostname: setup.hostname,
        mounts: setup.mounts,
        template: false,
    };
    personalize(&params, Some(&setup.seed), &setup.copied_files, true)?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_file(kind: FrameKind, payload: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&runvm_protocol::encode_frame(kind, payload).unwrap())
            .unwrap();
        std::io::Seek::rewind(&mut f).unwrap();
        f
    }

    #[test]
    fn only_a_setup_request_sets_a_copy_up() {
        let setup = GuestSetup {
            seed: vec![7; 64],
            realtime: (1_800_000_000, 5),
            rootfs_tag: "rootfs".into(),
            hostname: Some("box".into()),
            ..Default::default()
        };
        let req = Request {
            seq: 9,
            op: Op::Setup {
                setup: Box::new(setup.clone()),
            },
        };
        let mut f = frame_file(FrameKind::Request, &serde_json::to_vec(&req).unwrap());
        let (seq, got) = read_setup(&mut f).unwrap();
        assert_eq!((seq, *got), (9, setup));

        let ping = serde_json::to_vec(&Request {
            seq: 1,
            op: Op::Ping,
        })
        .unwrap();
        let e = read_setup(&mut frame_file(FrameKind::Request, &ping)).unwrap_err();
        assert!(e.contains("its first request must set it up"), "{e}");
        let e = read_setup(&mut frame_file(FrameKind::Event, b"{}")).unwrap_err();
        assert!(e.contains("got a Event frame"), "{e}");
        let e = read_setup(&mut frame_file(FrameKind::Request, b"{")).unwrap_err();
        assert!(e.starts_with("malformed request"), "{e}");
        let e = read_setup(&mut tempfile::tempfile().unwrap()).unwrap_err();
        assert!(e.contains("hung up"), "{e}");
    }

    #[test]
    fn a_wall_clock_with_too_many_nanoseconds_is_refused_before_anything_changes() {
        let e = apply(GuestSetup {
            realtime: (1, 1_000_000_000),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e, "a wall clock of 1s and 1000000000ns");
    }
}
