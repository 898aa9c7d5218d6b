//! The one conversion every raw system call in the agent needs.

use std::io;

/// `Ok` for a system call's non-negative return, else the thread's errno
/// as an error. Allocates nothing, so forked children may use it.
pub fn os_err(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn negative_returns_carry_errno() {
        assert!(super::os_err(0).is_ok());
        // SAFETY: close of an invalid descriptor only sets errno.
        let rc = unsafe { libc::close(-1) };
        let e = super::os_err(rc).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }
}
