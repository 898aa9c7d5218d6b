//! Handing a descriptor to a child process at a fixed number.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Sources are copied to this number or above, and targets lie below it.
const SOURCE_FLOOR: RawFd = 10;

/// Makes the child `cmd` starts find `fd` (ours) at `target` (below 10),
/// open across its exec. Several calls on one command are safe: each hook
/// copies from its own close-on-exec duplicate numbered 10 or above, which
/// no other hook's `dup2` onto a low number can overwrite.
pub fn inherit_as(cmd: &mut Command, fd: RawFd, target: RawFd) -> std::io::Result<()> {
    debug_assert!((0..SOURCE_FLOOR).contains(&target), "target {target}");
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor the caller owns makes a new
    // one, numbered SOURCE_FLOOR or above, that nothing else owns.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, SOURCE_FLOOR) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `copy` was just created above and is owned here alone; the
    // hook keeps it open until the command is dropped.
    let source = unsafe { OwnedFd::from_raw_fd(copy) };
    let hook = move || {
        // SAFETY: dup2 onto a low number from a descriptor this process
        // owns; the copy has close-on-exec clear.
        if unsafe { libc::dup2(source.as_raw_fd(), target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: between fork and exec the hook only calls dup2, which is
    // async-signal-safe.
    unsafe { cmd.pre_exec(hook) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn two_inheritances_on_one_command_both_arrive() {
        let (a, _a_peer) = UnixStream::pair().unwrap();
        let (b, _b_peer) = UnixStream::pair().unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "readlink /proc/self/fd/3; readlink /proc/self/fd/4"]);
        inherit_as(&mut cmd, b.as_raw_fd(), 3).unwrap();
        inherit_as(&mut cmd, a.as_raw_fd(), 4).unwrap();
        let out = cmd.output().unwrap();
        let inode = |s: &UnixStream| {
            std::fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd()))
                .unwrap()
                .display()
                .to_string()
        };
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{}\n{}\n", inode(&b), inode(&a))
        );
    }
}
