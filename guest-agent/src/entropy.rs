//! Seeds the guest kernel's random pool from bytes the host drew for this
//! VM (`runvm-seed` in the initramfs), crediting them, so the CRNG is ready
//! at once even before virtio-rng's first bytes arrive.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

/// `_IOW('R', 0x03, int[2])`
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// The most the agent takes from a seed file.
pub const MAX_SEED: usize = 512;

/// `struct rand_pool_info` for `seed`: entropy in bits, size, bytes.
pub fn pool_info(seed: &[u8]) -> io::Result<Vec<u8>> {
    if seed.len() < 32 || seed.len() > MAX_SEED {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a seed of {} bytes (32 to {MAX_SEED})", seed.len()),
        ));
    }
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
    info.extend_from_slice(seed);
    Ok(info)
}

/// Adds `seed` to the pool behind `device` (`/dev/urandom`) and credits it.
pub fn seed(device: &str, seed: &[u8]) -> io::Result<()> {
    let info = pool_info(seed)?;
    let dev = OpenOptions::new().write(true).open(device)?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes
    // follow its two ints; `info` holds exactly that.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the kernel's CRNG rekey from its input pool now rather than at
/// its next scheduled reseed: a guest restored from a snapshot must not
/// hand out what every other copy of the snapshot hands out.
pub fn reseed(device: &str) -> io::Result<()> {
    let dev = OpenOptions::new().write(true).open(device)?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(dev.as_raw_fd(), RNDRESEEDCRNG) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_info_credits_every_bit_of_the_seed() {
        let info = pool_info(&[7u8; 64]).unwrap();
        assert_eq!(&info[..4], &512i32.to_ne_bytes());
        assert_eq!(&info[4..8], &64i32.to_ne_bytes());
        assert_eq!(&info[8..], &[7u8; 64]);
    }

    #[test]
    fn odd_seeds_and_devices_are_refused() {
        assert!(pool_info(&[1; 8]).is_err());
        assert!(pool_info(&[1; MAX_SEED + 1]).is_err());
        // A file is not the random device: the ioctl fails, nothing panics.
        let f = tempfile::NamedTempFile::new().unwrap();
        let e = seed(f.path().to_str().unwrap(), &[1; 64]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
    }
}
