//! virtio-fs end to end: the guest kernel's virtiofs driver mounts host
//! directories served by the VMM's in-process FUSE server.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use runvm_tests::artifacts::{vmm_command, Initrd};
use runvm_tests::guest::{marked, GuestProcess};
use runvm_tests::kvm_test;

const CAPS: &std::ffi::CStr = c"security.capability";

fn c_path(path: &std::path::Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// Gives `path` a file capability (CAP_NET_RAW, effective), the value
/// `setcap cap_net_raw+ep` writes.
fn set_capability(path: &std::path::Path) {
    let mut value = 0x0200_0001u32.to_le_bytes().to_vec(); // revision 2, effective
    value.extend_from_slice(&(1u32 << 13).to_le_bytes()); // permitted: CAP_NET_RAW
    value.extend_from_slice(&[0; 12]); // inheritable, and the upper 32 capabilities
    let p = c_path(path);
    // SAFETY: both names are NUL-terminated and the value is value.len() bytes.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            CAPS.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(rc, 0, "setxattr: {}", std::io::Error::last_os_error());
}

fn has_capability(path: &std::path::Path) -> bool {
    let p = c_path(path);
    // SAFETY: both names are NUL-terminated; a null buffer of size 0 asks
    // only for the value's length.
    let n = unsafe { libc::getxattr(p.as_ptr(), CAPS.as_ptr(), std::ptr::null_mut(), 0) };
    n > 0
}

fn sha256(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// How many requests of `opcode` the VMM's `--report-requests` line for
/// share `tag` counted.
fn requests(out: &str, tag: &str, opcode: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.contains(&format!("virtio-fs {tag}: ")))
        .unwrap_or_else(|| panic!("no request report for {tag}: {out}"));
    line.split([':', ','])
        .filter_map(|f| f.trim().strip_prefix(&format!("{opcode} ")))
        .map(|n| n.parse::<u64>().unwrap())
        .sum()
}

kvm_test!(
    fn a_guest_reads_and_writes_a_shared_directory() {
        // `auto` answers OPEN and RELEASE for every file the guest opens;
        // `always` (a container's rootfs) opens with no message at all, and
        // the host opens the file for each READ and WRITE itself.
        for cache in ["auto", "always"] {
            reads_and_writes(cache);
        }
    }
);

fn reads_and_writes(cache: &str) {
    let root = tempfile::tempdir().unwrap();
    let share = root.path().join("share");
    fs::create_dir(&share).unwrap();
    // Host-only secret next to the share, and a symlink pointing at it.
    fs::write(root.path().join("secret"), "host secret").unwrap();
    std::os::unix::fs::symlink(root.path().join("secret"), share.join("escape")).unwrap();
    std::os::unix::fs::symlink("../secret", share.join("escape-rel")).unwrap();
    // 24 MiB of non-repeating data.
    let big: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(share.join("big"), &big).unwrap();
    fs::create_dir_all(share.join("tree/a/b")).unwrap();
    for i in 0..50 {
        fs::write(share.join(format!("tree/a/b/f{i}")), format!("file {i}\n")).unwrap();
    }
    let tree = std::process::Command::new("sh")
        .arg("-c")
        .arg("cd tree && find . -type f | sort | xargs cat | sha256sum")
        .current_dir(&share)
        .output()
        .unwrap();
    let tree = String::from_utf8(tree.stdout).unwrap();
    // Set-user-ID and set-group-ID files a user writes to lose the bits;
    // root keeps them (it holds CAP_FSETID).
    for (name, mode) in [("suid", 0o4777), ("sgid", 0o2777), ("rootsuid", 0o4755)] {
        fs::write(share.join(name), "start\n").unwrap();
        fs::set_permissions(share.join(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    // A file capability goes on any write, root's included; the host's
    // write clears it (the guest leaves that to the host).
    fs::write(share.join("capfile"), "start\n").unwrap();
    set_capability(&share.join("capfile"));
    assert!(has_capability(&share.join("capfile")));
    fs::write(share.join("trunc"), "a much longer first version\n").unwrap();
    let ro = root.path().join("ro");
    fs::create_dir(&ro).unwrap();
    fs::write(ro.join("keep"), "unchanged").unwrap();

    let initrd = Initrd::busybox(
            "bb=/bin/busybox\n\
             $bb mkdir -p /mnt /ro\n\
             $bb mount -t proc proc /proc\n\
             $bb mount -t virtiofs data /mnt || echo MOUNT-FAILED\n\
             $bb mount -t virtiofs frozen /ro || echo MOUNT-FAILED\n\
             echo \"BIG[$($bb sha256sum /mnt/big)]\"\n\
             echo \"TREE[$(cd /mnt/tree && $bb find . -type f | $bb sort | $bb xargs $bb cat | $bb sha256sum)]\"\n\
             echo \"ESCAPE[$($bb cat /mnt/escape 2>&1)]\"\n\
             echo \"ESCAPEREL[$($bb cat /mnt/escape-rel 2>&1)]\"\n\
             echo \"DOTDOT[$($bb ls /mnt/.. | $bb tr '\\n' ' ')]\"\n\
             $bb cp /mnt/big /mnt/big.copy\n\
             echo hello > /mnt/from-guest\n\
             $bb ln /mnt/from-guest /mnt/hard\n\
             $bb ln -s from-guest /mnt/sym\n\
             $bb mkdir -p /mnt/gdir/a/b && $bb mv /mnt/gdir/a /mnt/gdir/c\n\
             echo x > /mnt/owned && $bb chown 1234:5678 /mnt/owned && $bb chmod 640 /mnt/owned\n\
             $bb rm /mnt/tree/a/b/f0\n\
             $bb mkdir -p /etc && echo 'u:x:1000:1000::/:/bin/sh' > /etc/passwd && echo 'u:x:1000:' > /etc/group\n\
             $bb su u -c 'echo more >> /mnt/suid && echo more >> /mnt/sgid' || echo SU-FAILED\n\
             echo more >> /mnt/rootsuid\n\
             echo more >> /mnt/capfile\n\
             echo short > /mnt/trunc\n\
             echo \"ROWRITE[$( (echo no > /ro/new) 2>&1 && echo written || echo refused)]\"\n\
             $bb mount -o remount,rw /ro || echo REMOUNT-FAILED\n\
             echo \"ROREMOUNT[$( (echo no > /ro/keep) 2>&1 && echo written || echo refused)]\"\n\
             echo \"ROREAD[$($bb cat /ro/keep)]\"\n\
             $bb sync\n\
             $bb umount /mnt /ro\n\
             $bb reboot -f",
        );
    let mut cmd = vmm_command("vmlinux", &initrd);
    cmd.args([
        "--mem-mib",
        "256",
        "--boot-timeout",
        "600",
        "--cmdline",
        "quiet",
        "--report-requests",
    ])
    .arg("--fs")
    .arg(format!("tag=data,path={},cache={cache}", share.display()))
    .arg("--fs")
    .arg(format!("tag=frozen,path={},ro,cache=always", ro.display()));
    let run = GuestProcess::spawn(cmd).finish(Duration::from_secs(660));
    let out = &format!("cache={cache}\n{}", run.output);
    assert_eq!(run.status.and_then(|s| s.code()), Some(0), "{out}");
    assert!(!out.contains("MOUNT-FAILED"), "{out}");
    assert!(out.contains("ROREMOUNT"), "{out}");
    // Only the first OPEN reaches the host of an `always` share: its
    // refusal is what turns zero-message opens on in the guest.
    let opens = requests(out, "data", "OPEN");
    if cache == "always" {
        assert!(opens <= 1, "{out}");
        // Likewise the first FLUSH, which turns the guest's flushes off.
        assert!(requests(out, "data", "FLUSH") <= 1, "{out}");
    } else {
        // Every file the guest opened is closed, so without FOPEN_NOFLUSH
        // FLUSHes would be at least as many as OPENs; the 50 files of the
        // tree, read once each, are among the opens that never flush.
        assert!(opens > 50, "{out}");
        assert!(requests(out, "data", "FLUSH") + 40 <= opens, "{out}");
    }

    // What the guest read matches the host.
    assert!(
        marked(out, "BIG").starts_with(&sha256(&share.join("big"))),
        "{out}"
    );
    assert_eq!(marked(out, "TREE")[..64], tree[..64], "{out}");
    // Symlinks resolve in the guest, never on the host.
    assert!(!marked(out, "ESCAPE").contains("host secret"), "{out}");
    assert!(!marked(out, "ESCAPEREL").contains("host secret"), "{out}");
    assert!(!marked(out, "DOTDOT").contains("secret"), "{out}");

    // What the guest wrote is on the host, with its metadata.
    assert_eq!(fs::read(share.join("big.copy")).unwrap(), big);
    assert_eq!(
        fs::read_to_string(share.join("from-guest")).unwrap(),
        "hello\n"
    );
    let (a, b) = (
        fs::metadata(share.join("from-guest")).unwrap(),
        fs::metadata(share.join("hard")).unwrap(),
    );
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "a hard link");
    assert_eq!(
        fs::read_link(share.join("sym")).unwrap(),
        std::path::Path::new("from-guest")
    );
    assert!(share.join("gdir/c/b").is_dir(), "renamed directory");
    assert!(!share.join("gdir/a").exists());
    let owned = fs::metadata(share.join("owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1234, 5678));
    assert_eq!(owned.permissions().mode() & 0o7777, 0o640);
    assert!(!share.join("tree/a/b/f0").exists());
    assert!(!out.contains("SU-FAILED"), "{out}");
    for (name, mode) in [("suid", 0o777), ("sgid", 0o777), ("rootsuid", 0o4755)] {
        let meta = fs::metadata(share.join(name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{name}: {out}");
        assert_eq!(
            fs::read_to_string(share.join(name)).unwrap(),
            "start\nmore\n"
        );
    }
    assert_eq!(
        fs::read_to_string(share.join("capfile")).unwrap(),
        "start\nmore\n"
    );
    assert!(!has_capability(&share.join("capfile")), "{out}");
    assert_eq!(fs::read_to_string(share.join("trunc")).unwrap(), "short\n");

    // The read-only share refused every change, even after a remount.
    for key in ["ROWRITE", "ROREMOUNT"] {
        let got = marked(out, key).replace('\n', " ");
        assert!(
            got.contains("Read-only file system") && got.ends_with("refused"),
            "{out}"
        );
    }
    assert_eq!(marked(out, "ROREAD"), "unchanged", "{out}");
    assert!(!ro.join("new").exists());
    assert_eq!(fs::read_to_string(ro.join("keep")).unwrap(), "unchanged");
}

kvm_test!(
    fn a_guest_holds_more_files_than_a_default_descriptor_limit() {
        // The VMM keeps a descriptor per inode the guest holds; 5000 exceeds
        // the hard limit of 4096 a process gets outside systemd.
        const FILES: usize = 5000;
        let share = tempfile::tempdir().unwrap();
        let initrd = Initrd::busybox(&format!(
            "bb=/bin/busybox\n\
             $bb mkdir -p /mnt\n\
             $bb mount -t virtiofs data /mnt || echo MOUNT-FAILED\n\
             $bb mkdir /mnt/many\n\
             i=0; while [ $i -lt {FILES} ]; do : > /mnt/many/f$i || break; i=$((i+1)); done\n\
             echo \"MADE[$i]\"\n\
             echo \"LISTED[$($bb ls /mnt/many | $bb wc -l)]\"\n\
             $bb umount /mnt\n\
             $bb reboot -f"
        ));
        let mut cmd = vmm_command("vmlinux", &initrd);
        cmd.args(["--mem-mib", "256", "--boot-timeout", "600"])
            .args(["--cmdline", "quiet"])
            .arg("--fs")
            .arg(format!("tag=data,path={}", share.path().display()));
        let run = GuestProcess::spawn(cmd).finish(Duration::from_secs(660));
        let out = &run.output;
        assert_eq!(run.status.and_then(|s| s.code()), Some(0), "{out}");
        assert!(!out.contains("MOUNT-FAILED"), "{out}");
        assert_eq!(marked(out, "MADE"), FILES.to_string(), "{out}");
        assert_eq!(marked(out, "LISTED").trim(), FILES.to_string(), "{out}");
        assert_eq!(
            fs::read_dir(share.path().join("many")).unwrap().count(),
            FILES
        );
    }
);
