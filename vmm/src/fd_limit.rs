//! The VMM process's open-file limit.

/// The kernel's ceiling for any process's RLIMIT_NOFILE (`fs.nr_open`).
fn kernel_ceiling() -> Option<libc::rlim_t> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn get() -> Option<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass; the result is checked.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0).then_some(lim)
}

fn set(cur: libc::rlim_t, max: libc::rlim_t) -> bool {
    let lim = libc::rlimit {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: setrlimit reads the struct we pass; the result is checked.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 }
}

/// Raises RLIMIT_NOFILE as far as this process may: both limits to the
/// kernel's ceiling (`fs.nr_open`) where it holds CAP_SYS_RESOURCE (as
/// root does), else the soft limit to the hard one. virtio-fs keeps one
/// O_PATH descriptor per inode the guest holds, so a guest that creates or
/// walks many files needs far more than the usual soft limit of 1024, and
/// more than the hard limit of 4096 a process started outside systemd gets
/// (a guest creating 10,000 files hit it). virtiofsd raises its limit the
/// same way. Failure keeps the old limit: the share then fails file by
/// file, with EMFILE, not the VM.
pub fn raise() {
    let Some(lim) = get() else { return };
    if let Some(ceiling) = kernel_ceiling() {
        if lim.rlim_max < ceiling && set(ceiling, ceiling) {
            return;
        }
    }
    if lim.rlim_cur < lim.rlim_max {
        set(lim.rlim_max, lim.rlim_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds_cap_sys_resource() -> bool {
        caps::has_cap(
            None,
            caps::CapSet::Effective,
            caps::Capability::CAP_SYS_RESOURCE,
        )
        .unwrap()
    }

    #[test]
    fn the_limit_is_raised_to_the_kernel_ceiling_where_allowed() {
        raise();
        let lim = get().unwrap();
        assert_eq!(lim.rlim_cur, lim.rlim_max, "the soft limit is the hard one");
        if holds_cap_sys_resource() {
            assert!(
                lim.rlim_max >= kernel_ceiling().unwrap(),
                "{}",
                lim.rlim_max
            );
        }
    }
}
