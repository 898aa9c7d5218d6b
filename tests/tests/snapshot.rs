//! VM snapshots end to end: a guest stopped at a console line, written to
//! a directory, and restored by new VMM processes that go on running it
//! with host sides of their own (another vsock socket, another directory
//! behind the same virtio-fs tag).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use runvm_tests::artifacts::{vmm_binary, vmm_command, Initrd};
use runvm_tests::guest::GuestProcess;
use runvm_tests::kvm_test;

/// The guest: prints a line before the snapshot point, waits for one vsock
/// connection (the snapshot is taken once it listens), echoes it, then
/// mounts the share that was left unmounted, prints its file, and reads
/// the virtio-rng device.
const SCRIPT: &str = "bb=/bin/busybox\n\
     $bb mkdir -p /mnt /dev\n\
     $bb mount -t devtmpfs dev /dev\n\
     echo BEFORE-SNAPSHOT\n\
     /bin/runvm-guest-tool echo-server 5000 1 || echo GUEST-FAILED\n\
     $bb mount -t virtiofs data /mnt || echo MOUNT-FAILED\n\
     echo \"SHARE-SAYS $($bb cat /mnt/who)\"\n\
     echo \"CPUS $($bb nproc)\"\n\
     $bb head -c 64 /dev/hwrng | $bb wc -c\n\
     echo RANDOM-OK\n\
     $bb sync\n\
     $bb reboot -f";

const VCPUS: &str = "2";
const MEM_MIB: &str = "256";

fn share(dir: &Path, who: &str) -> std::path::PathBuf {
    let d = dir.join(who);
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("who"), who).unwrap();
    d
}

/// Connects to guest port `port` through the hybrid vsock socket `uds`,
/// sends `payload` and reads it back.
fn echo(uds: &Path, port: u32, payload: &[u8]) -> Vec<u8> {
    let mut s = UnixStream::connect(uds).expect("connect to the restored VM's vsock socket");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    let mut line = String::new();
    BufReader::new(s.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
    s.write_all(payload).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    back
}

fn restore_command(snap: &Path, uds: &Path, share: &Path) -> Command {
    let mut cmd = Command::new(vmm_binary());
    cmd.arg("--restore")
        .arg(snap)
        .args(["--vcpus", VCPUS, "--mem-mib", MEM_MIB, "--rng"])
        .args(["--boot-timeout", "600", "--vsock-cid", "3", "--vsock-uds"])
        .arg(uds)
        .arg("--fs")
        .arg(format!("tag=data,path={}", share.display()));
    cmd
}

kvm_test!(
    fn a_snapshot_restores_twice_with_its_own_socket_and_share_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("snap");
        let initrd = Initrd::busybox_with_tool(SCRIPT);
        let mut cmd = vmm_command("vmlinux", &initrd);
        cmd.args(["--vcpus", VCPUS, "--mem-mib", MEM_MIB, "--rng"])
            .args(["--cmdline", "quiet", "--boot-timeout", "600"])
            .args(["--vsock-cid", "3", "--vsock-uds"])
            .arg(dir.path().join("boot.sock"))
            .arg("--fs")
            .arg(format!(
                "tag=data,path={}",
                share(dir.path(), "template").display()
            ))
            .args(["--snapshot-after", "LISTENING 5000", "--snapshot-to"])
            .arg(&snap);
        let taken = GuestProcess::spawn(cmd).finish(Duration::from_secs(600));
        assert_eq!(
            taken.status.and_then(|s| s.code()),
            Some(0),
            "{}",
            taken.output
        );
        assert!(
            taken.output.contains("BEFORE-SNAPSHOT")
                && taken.output.contains("written to a snapshot")
                && !taken.output.contains("SHARE-SAYS"),
            "{}",
            taken.output
        );
        assert!(snap.join("vm.json").is_file() && snap.join("memory").is_file());
        let mem_file = std::fs::metadata(snap.join("memory")).unwrap();
        assert_eq!(mem_file.len(), 256 << 20);

        // Two VMs from the one snapshot at once, each with its own host side.
        let clones: Vec<(GuestProcess, std::path::PathBuf, &str)> = ["first", "second"]
            .into_iter()
            .map(|who| {
                let uds = dir.path().join(format!("{who}.sock"));
                let cmd = restore_command(&snap, &uds, &share(dir.path(), who));
                (GuestProcess::spawn(cmd), uds, who)
            })
            .collect();
        for (mut guest, uds, who) in clones {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while !uds.exists() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{who}: no vsock socket:\n{}",
                    guest.finish(Duration::from_secs(5)).output
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
            let t = std::time::Instant::now();
            assert!(echo(&uds, 5000, &payload) == payload, "{who}: echo differs");
            eprintln!("{who}: echo after restore took {:?}", t.elapsed());
            let done = guest.wait_for("RANDOM-OK", Duration::from_secs(300));
            let run = guest.finish(Duration::from_secs(120));
            assert!(done.is_some(), "{who}: {}", run.output);
            assert_eq!(run.status.and_then(|s| s.code()), Some(0), "{}", run.output);
            // The restored guest goes on from the snapshot: it never boots
            // or prints what came before it again.
            assert!(!run.output.contains("BEFORE-SNAPSHOT"), "{}", run.output);
            assert!(!run.output.contains("FAILED"), "{}", run.output);
            assert!(
                run.output.contains(&format!("SHARE-SAYS {who}")),
                "{}",
                run.output
            );
            assert!(run.output.contains("CPUS 2"), "{}", run.output);
            assert!(run.output.contains("\n64\nRANDOM-OK"), "{}", run.output);
            assert!(!uds.exists(), "the VMM removes its socket");
        }
    }
);

kvm_test!(
    fn a_snapshot_is_refused_while_a_share_is_mounted_and_a_mismatched_restore_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("snap");
        let initrd = Initrd::busybox(
            "bb=/bin/busybox\n\
             $bb mkdir -p /mnt\n\
             $bb mount -t virtiofs data /mnt || echo MOUNT-FAILED\n\
             echo MOUNTED\n\
             $bb sleep 600",
        );
        let mut cmd = vmm_command("vmlinux", &initrd);
        cmd.args(["--cmdline", "quiet", "--boot-timeout", "600", "--fs"])
            .arg(format!(
                "tag=data,path={}",
                share(dir.path(), "d").display()
            ))
            .args(["--snapshot-after", "MOUNTED", "--snapshot-to"])
            .arg(&snap);
        let run = GuestProcess::spawn(cmd).finish(Duration::from_secs(600));
        assert_eq!(run.status.and_then(|s| s.code()), Some(1), "{}", run.output);
        assert!(
            run.output.contains(
                "cannot snapshot this VM: the guest has mounted virtio-fs share \"data\""
            ),
            "{}",
            run.output
        );
        assert!(!snap.exists(), "a refused snapshot leaves no directory");

        // A snapshot of the same guest before its mount, restored into a VM
        // of another size: refused before anything runs.
        let initrd = Initrd::busybox(
            "echo READY\n/bin/busybox sleep 2\necho RESUMED\n/bin/busybox reboot -f",
        );
        let mut cmd = vmm_command("vmlinux", &initrd);
        cmd.args(["--cmdline", "quiet", "--boot-timeout", "600"])
            .args(["--snapshot-after", "READY", "--snapshot-to"])
            .arg(&snap);
        let run = GuestProcess::spawn(cmd).finish(Duration::from_secs(600));
        assert_eq!(run.status.and_then(|s| s.code()), Some(0), "{}", run.output);
        let out = Command::new(vmm_binary())
            .arg("--restore")
            .arg(&snap)
            .args(["--mem-mib", "256", "--boot-timeout", "60"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(
                "the VM does not match the snapshot: it has 128 MiB of memory, the VM 256 MiB"
            ),
            "{err}"
        );
        let out = Command::new(vmm_binary())
            .arg("--restore")
            .arg(&snap)
            .args(["--rng", "--boot-timeout", "60"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("its virtio devices are of types [], the VM's [4]"),
            "{err}"
        );
        // Restored as it was taken, it goes on where it stopped.
        let mut cmd = Command::new(vmm_binary());
        cmd.arg("--restore")
            .arg(&snap)
            .args(["--boot-timeout", "60"]);
        let run = GuestProcess::spawn(cmd).finish(Duration::from_secs(120));
        assert_eq!(run.status.and_then(|s| s.code()), Some(0), "{}", run.output);
        assert!(run.output.contains("RESUMED"), "{}", run.output);
        assert!(!run.output.contains("READY"), "{}", run.output);
    }
);
