//! virtio-vsock end to end: a real guest kernel's vsock driver against the
//! VMM's device and its hybrid Unix-socket host side.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

use runvm_tests::artifacts::{vmm_command, Initrd};
use runvm_tests::guest::GuestProcess;
use runvm_tests::host::echo_server;
use runvm_tests::kvm_test;

const MIB: usize = 1 << 20;

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// Sends `bytes` of the pattern on `s` while reading them back; checks them.
fn echo_round_trip(s: UnixStream, bytes: usize) -> Result<(), String> {
    let mut writer = s.try_clone().map_err(|e| e.to_string())?;
    let sender = thread::spawn(move || {
        let chunk: Vec<u8> = (0..251 * 4096).map(pattern).collect();
        let mut sent = 0;
        while sent < bytes {
            let n = (bytes - sent).min(chunk.len());
            writer.write_all(&chunk[..n])?;
            sent += n;
        }
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut reader = s;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("read after {got}: {e}"))?;
        if n == 0 {
            break;
        }
        if let Some(k) = (0..n).find(|&k| buf[k] != pattern(got + k)) {
            return Err(format!("byte {} differs", got + k));
        }
        got += n;
    }
    sender
        .join()
        .map_err(|_| "sender panicked".to_string())?
        .map_err(|e| format!("send: {e}"))?;
    if got == bytes {
        Ok(())
    } else {
        Err(format!("{got} of {bytes} bytes came back"))
    }
}

/// A host program connecting to guest `port` through the hybrid socket.
fn connect_guest(uds: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(uds).expect("connect to the vsock socket");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    let mut line = String::new();
    let mut r = BufReader::new(s.try_clone().unwrap());
    r.read_line(&mut line).expect("read the OK line");
    let local: u32 = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("expected OK <port>, got {line:?}"));
    assert!(local >= 1 << 30, "{line}");
    assert!(r.buffer().is_empty(), "nothing follows the OK line yet");
    s.set_read_timeout(None).unwrap();
    s
}

kvm_test!(
    fn vsock_carries_64_mib_each_way_and_100_concurrent_connections() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        // Guest-initiated connections to port 6000 land here.
        echo_server(UnixListener::bind(dir.path().join("v.sock_6000")).unwrap());

        let initrd = Initrd::busybox_with_tool(
            "bb=/bin/busybox\n\
             t=/bin/runvm-guest-tool\n\
             $t send-host 6000 67108864 1 || echo GUEST-FAILED\n\
             $t send-host 6000 262144 100 || echo GUEST-FAILED\n\
             $t echo-server 5000 101 || echo GUEST-FAILED\n\
             $bb sync\n\
             $bb reboot -f",
        );
        let mut cmd = vmm_command("vmlinux", &initrd);
        cmd.args(["--mem-mib", "512", "--boot-timeout", "900"])
            .args(["--cmdline", "quiet", "--vsock-cid", "3", "--vsock-uds"])
            .arg(&uds);
        let mut guest = GuestProcess::spawn(cmd);
        assert!(
            guest
                .wait_for("LISTENING 5000", Duration::from_secs(600))
                .is_some(),
            "the guest never listened:\n{}",
            guest.finish(Duration::from_secs(5)).output
        );

        // Host -> guest: one 64 MiB stream, then 100 at once.
        echo_round_trip(connect_guest(&uds, 5000), 64 * MIB).expect("64 MiB echo from the guest");
        let conns: Vec<_> = (0..100)
            .map(|_| {
                let s = connect_guest(&uds, 5000);
                thread::spawn(move || echo_round_trip(s, 256 * 1024))
            })
            .collect();
        for (i, c) in conns.into_iter().enumerate() {
            c.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        }

        let run = guest.finish(Duration::from_secs(300));
        assert_eq!(run.status.and_then(|s| s.code()), Some(0), "{}", run.output);
        assert!(!run.output.contains("GUEST-FAILED"), "{}", run.output);
        let sent: Vec<&str> = run
            .output
            .lines()
            .filter(|l| l.contains("SENT-OK"))
            .collect();
        assert_eq!(sent.len(), 2, "{}", run.output);
        assert!(sent[0].contains("conns=1 bytes=67108864"), "{}", sent[0]);
        assert!(sent[1].contains("conns=100 bytes=262144"), "{}", sent[1]);
        let echoed = format!("ECHOED conns=101 bytes={}", 64 * MIB + 100 * 256 * 1024);
        assert!(run.output.contains(&echoed), "{}", run.output);
        assert!(!uds.exists(), "the VMM removes its socket");
        eprintln!("{}", sent.join("\n"));
    }
);

kvm_test!(
    fn vsock_refuses_ports_nobody_listens_on() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let initrd = Initrd::busybox_with_tool(
            "t=/bin/runvm-guest-tool\n\
             $t send-host 7000 1 1 2>&1 | /bin/busybox head -1\n\
             $t echo-server 5000 1\n\
             /bin/busybox reboot -f",
        );
        let mut cmd = vmm_command("vmlinux", &initrd);
        cmd.args(["--boot-timeout", "300", "--cmdline", "quiet"])
            .args(["--vsock-cid", "3", "--vsock-uds"])
            .arg(&uds);
        let mut guest = GuestProcess::spawn(cmd);
        assert!(guest
            .wait_for("LISTENING 5000", Duration::from_secs(280))
            .is_some());
        // A port with no listener in the guest: the socket closes, no OK.
        let mut s = UnixStream::connect(&uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        writeln!(s, "CONNECT 5001").unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "", "refused: closed without OK");
        echo_round_trip(connect_guest(&uds, 5000), 1000).unwrap();
        let run = guest.finish(Duration::from_secs(120));
        assert_eq!(run.status.and_then(|s| s.code()), Some(0), "{}", run.output);
        assert!(
            run.output
                .contains("connect to host vsock port 7000: Connection reset by peer"),
            "{}",
            run.output
        );
    }
);
