//! Handing a descriptor to a child process at a fixed number.

use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes the child `cmd` starts find `fd` (ours) at `target`, open across
/// its exec.
pub fn inherit_as(cmd: &mut Command, fd: RawFd, target: RawFd) {
    let hook = move || {
        // dup2 onto itself would keep close-on-exec set.
        let r = if fd == target {
            // SAFETY: fcntl on a descriptor this process owns.
            unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }
        } else {
            // SAFETY: dup2 on a descriptor this process owns; the copy
            // has close-on-exec clear.
            unsafe { libc::dup2(fd, target) }
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: between fork and exec the hook only calls dup2 or fcntl,
    // which are async-signal-safe.
    unsafe { cmd.pre_exec(hook) };
}
