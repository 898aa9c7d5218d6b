//! Device benchmark (issue: virtio devices): virtio-fs against the test
//! host's own filesystem, and vsock throughput, in one run of the KVM host.
//!
//! The same static `runvm-guest-tool fs-bench` runs natively on the host's
//! /tmp and inside a guest on a virtio-fs share of a host /tmp directory
//! (with the read-ahead window the agent gives its virtio-fs mounts):
//! sequential write and read of a `RUNVM_BENCH_FS_MIB` (default 512) MiB
//! file and create/stat/read/delete of `RUNVM_BENCH_FS_FILES` (default
//! 10,000) small files. Then the guest streams 64 MiB through vsock to a
//! host echo server, and 64 MiB over TCP through its virtio-net NIC and a
//! TAP to a host echo server (compared with the same tool over the test
//! host's loopback). Prints figures and ratios. The guest has
//! `RUNVM_BENCH_VCPUS` (default 2) vCPUs. Run it with
//! `tests/bench.sh devices`.

use std::os::unix::net::UnixListener;
use std::process::Command;
use std::time::Duration;

use runvm_tests::artifacts::{guest_tool_binary, vmm_command, Initrd};
use runvm_tests::guest::GuestProcess;
use runvm_tests::host::{echo_server, HostTap};
use runvm_tests::kvm;

/// `key=value` fields of the first line starting with `tag`.
fn fields(output: &str, tag: &str) -> Vec<(String, String)> {
    let line = output
        .lines()
        .find(|l| l.contains(tag))
        .unwrap_or_else(|| panic!("no {tag} line in:\n{output}"));
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn field(f: &[(String, String)], key: &str) -> f64 {
    f.iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {f:?}"))
}

fn main() {
    kvm::bench_here_or_in_testhost(
        "devices [--bench]   (RUNVM_BENCH_FS_MIB=N, RUNVM_BENCH_FS_FILES=N, RUNVM_BENCH_VCPUS=N)",
        "1800",
    );
    let mib: usize = std::env::var("RUNVM_BENCH_FS_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let files: usize = std::env::var("RUNVM_BENCH_FS_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let vcpus: u32 = std::env::var("RUNVM_BENCH_VCPUS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);

    // Native baseline on the host's own filesystem.
    let native_dir = tempfile::tempdir().unwrap();
    let native = Command::new(guest_tool_binary())
        .args(["fs-bench"])
        .arg(native_dir.path())
        .args([mib.to_string(), files.to_string()])
        .output()
        .expect("run fs-bench natively");
    assert!(native.status.success(), "{native:?}");
    let native = String::from_utf8(native.stdout).unwrap();
    eprintln!("native: {}", native.trim());
    let native = fields(&native, "FSBENCH");

    // TCP over the host's loopback: the ceiling for the guest's NIC.
    let lo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let lo_addr = lo.local_addr().unwrap();
    echo_server(lo);
    let native_tcp = Command::new(guest_tool_binary())
        .args(["send-tcp", &lo_addr.to_string(), "67108864", "1"])
        .output()
        .expect("run send-tcp natively");
    assert!(native_tcp.status.success(), "{native_tcp:?}");
    let native_tcp = String::from_utf8(native_tcp.stdout).unwrap();
    let native_tcp = fields(&native_tcp, "SENT-OK");

    // The guest's NIC: a TAP with the host end at 172.31.9.1.
    let _tap = HostTap::create("rvmbench0", "172.31.9.1/24");
    echo_server(std::net::TcpListener::bind("172.31.9.1:7001").unwrap());

    // The same workload in a guest on a virtio-fs share of a host directory.
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let uds = dir.path().join("v.sock");
    echo_server(UnixListener::bind(dir.path().join("v.sock_6000")).unwrap());
    let initrd = Initrd::busybox_with_tool(&format!(
        "bb=/bin/busybox\n\
         $bb mount -t proc proc /proc\n\
         $bb mkdir -p /mnt\n\
         $bb mount -t virtiofs bench /mnt\n\
         $bb mkdir -p /sys && $bb mount -t sysfs sys /sys\n\
         dev=$($bb grep ' /mnt ' /proc/self/mountinfo | $bb cut -d' ' -f3)\n\
         echo {ra} > /sys/class/bdi/$dev/read_ahead_kb\n\
         echo \"READ-AHEAD[$($bb cat /sys/class/bdi/$dev/read_ahead_kb)]\"\n\
         /bin/runvm-guest-tool fs-bench /mnt {mib} {files}\n\
         /bin/runvm-guest-tool send-host 6000 67108864 1\n\
         $bb ip link set eth0 up && $bb ip addr add 172.31.9.2/24 dev eth0\n\
         /bin/runvm-guest-tool send-tcp 172.31.9.1:7001 67108864 1\n\
         $bb umount /mnt\n\
         $bb reboot -f",
        ra = runvm_protocol::VIRTIOFS_READ_AHEAD_KIB
    ));
    let mut cmd = vmm_command("vmlinux", &initrd);
    cmd.args(["--vcpus", &vcpus.to_string()])
        .args(["--mem-mib", "1024", "--boot-timeout", "1500"])
        .args(["--cmdline", "quiet", "--report-requests"])
        .args(["--vsock-cid", "3", "--vsock-uds"])
        .arg(&uds)
        .arg("--fs")
        .arg(format!("tag=bench,path={},cache=always", share.display()))
        .args(["--net", "tap=rvmbench0"]);
    let run = GuestProcess::spawn(cmd).finish(Duration::from_secs(1600));
    assert_eq!(run.status.and_then(|s| s.code()), Some(0), "{}", run.output);
    let ra = runvm_protocol::VIRTIOFS_READ_AHEAD_KIB;
    assert!(
        run.output.contains(&format!("READ-AHEAD[{ra}]")),
        "{}",
        run.output
    );
    let guest = fields(&run.output, "FSBENCH");
    let sent: Vec<&str> = run
        .output
        .lines()
        .filter(|l| l.contains("SENT-OK"))
        .collect();
    assert_eq!(sent.len(), 2, "{}", run.output);
    let vsock = fields(sent[0], "SENT-OK");
    let tcp = fields(sent[1], "SENT-OK");

    let (nw, nr, nm) = (
        field(&native, "write_mib_s"),
        field(&native, "read_mib_s"),
        field(&native, "meta_s"),
    );
    let (gw, gr, gm) = (
        field(&guest, "write_mib_s"),
        field(&guest, "read_mib_s"),
        field(&guest, "meta_s"),
    );
    println!("devices benchmark (one test host run; host fs = test host /tmp, tmpfs; guest: {vcpus} vCPUs, 1 GiB)");
    println!("{mib} MiB sequential write   native {nw:8.1} MiB/s   virtio-fs {gw:8.1} MiB/s   ratio {:.2}", gw / nw);
    println!("{mib} MiB sequential read    native {nr:8.1} MiB/s   virtio-fs {gr:8.1} MiB/s   ratio {:.2}", gr / nr);
    println!("{files} files create/stat/read/delete   native {nm:.2} s   virtio-fs {gm:.2} s   ratio {:.2}x", gm / nm);
    println!(
        "  of which create {:.2} s, stat {:.2} s, read {:.2} s, delete {:.2} s (virtio-fs)",
        field(&guest, "create_s"),
        field(&guest, "stat_s"),
        field(&guest, "readsmall_s"),
        field(&guest, "delete_s")
    );
    // Every request is a guest exit and a host wake-up: the count is what
    // the metadata workload's time follows.
    if let Some(line) = run.output.lines().find(|l| l.contains("virtio-fs bench: ")) {
        let report = line.split("virtio-fs bench: ").nth(1).unwrap_or(line);
        let total: f64 = report
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(f64::NAN);
        println!(
            "  virtio-fs requests, whole guest run ({:.1} per small file): {report}",
            total / files as f64
        );
    }
    println!(
        "vsock 64 MiB guest->host echo: {:.1} MiB/s (both directions counted), {:.2} s",
        field(&vsock, "mib_per_s"),
        field(&vsock, "secs")
    );
    let (gt, nt) = (field(&tcp, "mib_per_s"), field(&native_tcp, "mib_per_s"));
    println!(
        "TCP 64 MiB guest->host echo over virtio-net: {gt:.1} MiB/s (both directions counted), {:.2} s; test host loopback {nt:.1} MiB/s; ratio {:.2}",
        field(&tcp, "secs"),
        gt / nt
    );
}
