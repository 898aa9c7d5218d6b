//! The VMM process's open-file limit.

/// Raises the soft RLIMIT_NOFILE to the hard limit. virtio-fs keeps one
/// O_PATH descriptor per inode the guest holds, so a guest walking a large
/// tree needs far more than the default soft limit. Failure keeps the old
/// limit: the share then fails file by file, with EMFILE, not the VM.
pub fn raise_to_hard_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; the result is checked.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max
    {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we pass. Failure only keeps the old limit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}
