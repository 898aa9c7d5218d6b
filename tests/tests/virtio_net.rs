//! virtio-net end to end: the guest reaches the test host over TAP devices
//! attached three ways (an existing interface by name, an fd the caller
//! opened, one the VMM creates), with ping and a TCP echo.

use std::fs::OpenOptions;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use runvm_tests::artifacts::{vmm_command, Initrd};
use runvm_tests::guest::{marked, GuestProcess};
use runvm_tests::host::{echo_server, ip, link_exists, HostTap};
use runvm_tests::kvm_test;

/// Deletes interfaces a test made that no [`HostTap`] owns, whatever
/// happens to the test.
struct Links(Vec<&'static str>);

impl Drop for Links {
    fn drop(&mut self) {
        for l in &self.0 {
            let _ = Command::new("ip").args(["link", "del", "dev", l]).output();
        }
    }
}

/// Opens TAP `name` the way a caller handing an fd to the VMM would.
fn open_tap_fd(name: &str) -> OwnedFd {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("opening /dev/net/tun");
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    // SAFETY: TUNSETIFF reads and writes the ifreq passed; checked below.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    OwnedFd::from(file)
}

/// Lets a child inherit `fd` under the same number.
fn inheritable(fd: &OwnedFd) {
    // SAFETY: clears FD_CLOEXEC on a descriptor this test owns.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) };
    assert_eq!(rc, 0);
}

kvm_test!(
    fn the_guest_reaches_the_host_over_tap_devices() {
        let _links = Links(vec!["rvmnet-b", "rvmnet-c"]);
        // A: an administrator's persistent TAP, attached by name.
        let _a = HostTap::create("rvmnet-a", "172.31.7.1/24");
        // B: a TAP this process opened and hands over as an fd.
        let fd = open_tap_fd("rvmnet-b");
        inheritable(&fd);
        ip(&["addr", "add", "172.31.8.1/24", "dev", "rvmnet-b"]);
        ip(&["link", "set", "rvmnet-b", "up"]);
        // C: does not exist; the VMM creates it and it goes with the VM.
        assert!(!link_exists("rvmnet-c"));

        // Something that is not a TAP is refused up front.
        let null = OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        inheritable(&null);
        let bad = vmm_command("vmlinux", &Initrd::busybox("/bin/busybox reboot -f"))
            .arg("--net")
            .arg(format!("fd={}", null.as_raw_fd()))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(bad.status.code(), Some(1), "{err}");
        assert!(err.contains("not a TAP"), "{err}");
        drop(null);

        let listener = TcpListener::bind("172.31.7.1:7001").unwrap();
        echo_server(listener);

        let initrd = Initrd::busybox_with_tool(
            "bb=/bin/busybox\n\
             t=/bin/runvm-guest-tool\n\
             $bb mount -t sysfs sys /sys\n\
             nic() { for d in /sys/class/net/*; do [ \"$($bb cat $d/address)\" = \"$1\" ] && $bb basename $d; done; }\n\
             a=$(nic 02:00:00:00:07:02); b=$(nic 02:00:00:00:08:02); c=$(nic 02:00:00:00:09:02)\n\
             echo \"NICS[$a $b $c]\"\n\
             $bb ip link set $a up && $bb ip addr add 172.31.7.2/24 dev $a\n\
             $bb ip link set $b up && $bb ip addr add 172.31.8.2/24 dev $b\n\
             $bb ping -c 3 -W 20 172.31.7.1 >/dev/null && echo PING-A-OK\n\
             $bb ping -c 3 -W 20 172.31.8.1 >/dev/null && echo PING-B-OK\n\
             $t send-tcp 172.31.7.1:7001 67108864 1 || echo GUEST-FAILED\n\
             $bb reboot -f",
        );
        let mut cmd = vmm_command("vmlinux", &initrd);
        cmd.args([
            "--mem-mib",
            "512",
            "--boot-timeout",
            "900",
            "--cmdline",
            "quiet",
        ])
        .args(["--net", "tap=rvmnet-a,mac=02:00:00:00:07:02"])
        .arg("--net")
        .arg(format!("fd={},mac=02:00:00:00:08:02", fd.as_raw_fd()))
        .args(["--net", "tap=rvmnet-c,mac=02:00:00:00:09:02"]);
        let mut guest = GuestProcess::spawn(cmd);
        guest.wait_for("NICS[", Duration::from_secs(600));
        assert!(
            link_exists("rvmnet-c"),
            "the VMM created the TAP it was asked for"
        );
        let run = guest.finish(Duration::from_secs(600));
        let out = &run.output;
        assert_eq!(run.status.and_then(|s| s.code()), Some(0), "{out}");
        let nics: Vec<&str> = marked(out, "NICS").split_whitespace().collect();
        assert_eq!(nics.len(), 3, "three NICs with the configured MACs: {out}");
        assert!(out.contains("PING-A-OK"), "{out}");
        assert!(out.contains("PING-B-OK"), "{out}");
        assert!(!out.contains("GUEST-FAILED"), "{out}");
        let sent: Vec<&str> = out.lines().filter(|l| l.contains("SENT-OK")).collect();
        assert_eq!(sent.len(), 1, "{out}");
        assert!(sent[0].contains("conns=1 bytes=67108864"), "{}", sent[0]);

        // The TAP the VMM made is gone; the others are left as they were.
        assert!(!link_exists("rvmnet-c"), "the created TAP outlived the VM");
        assert!(link_exists("rvmnet-a"));
        drop(fd);
    }
);
