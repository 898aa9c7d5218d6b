//! The virtio-fs device and the share wrapper, without a guest: FUSE
//! messages are built by hand in guest memory and fed through a queue.

use std::ffi::CString;
use std::io;

use fuse_backend_rs::abi::fuse_abi::{
    CreateIn, FsOptions, InHeader, InitIn, InitOut, OutHeader, ReadIn,
};
use fuse_backend_rs::api::filesystem::{Context, Entry, FileSystem};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::PassthroughFs;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::counts::RequestCounts;
use super::share::Share;
use super::{passthrough_config, process_queue, CacheMode};
use crate::devices::virtio::test_ring::{Ring, WRITE};

const FUSE_INIT: u32 = 26;
const FUSE_LOOKUP: u32 = 1;
const FUSE_READ: u32 = 15;
const REQ: u64 = 0x10_0000;
const REPLY: u64 = 0x20_0000;
const ROOT: u64 = 1;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

fn passthrough(dir: &std::path::Path) -> PassthroughFs {
    passthrough_cached(dir, CacheMode::Auto)
}

fn passthrough_cached(dir: &std::path::Path, cache: CacheMode) -> PassthroughFs {
    let fs: PassthroughFs = PassthroughFs::new(passthrough_config(dir, cache)).unwrap();
    fs.import().unwrap();
    fs
}

fn header(opcode: u32, unique: u64, nodeid: u64, body_len: usize) -> InHeader {
    InHeader {
        len: (std::mem::size_of::<InHeader>() + body_len) as u32,
        opcode,
        unique,
        nodeid,
        ..Default::default()
    }
}

/// Writes a request at REQ + 0x1000 * slot and posts it with a reply buffer.
fn post(ring: &mut Ring<'_>, mem: &GuestMemoryMmap, slot: u64, req: &[u8]) {
    let at = REQ + 0x1000 * slot;
    mem.write_slice(req, GuestAddress(at)).unwrap();
    ring.post_chain(&[
        (at, req.len() as u32, 0),
        (REPLY + 0x1000 * slot, 0x1000, WRITE),
    ]);
}

fn reply(mem: &GuestMemoryMmap, slot: u64) -> OutHeader {
    mem.read_obj(GuestAddress(REPLY + 0x1000 * slot)).unwrap()
}

fn init_request() -> Vec<u8> {
    init_request_offering(FsOptions::empty())
}

/// An INIT from a guest kernel that supports `offered`.
fn init_request_offering(offered: FsOptions) -> Vec<u8> {
    let init = InitIn {
        major: 7,
        minor: 31,
        max_readahead: 0x2_0000,
        flags: offered.bits() as u32,
    };
    let mut req = header(FUSE_INIT, 1, 0, std::mem::size_of::<InitIn>())
        .as_slice()
        .to_vec();
    req.extend_from_slice(init.as_slice());
    req
}

#[test]
fn init_and_lookup_are_answered_from_the_shared_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello"), "hi").unwrap();
    let server = Server::new(passthrough(dir.path()));
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    let mut q = ring.queue();

    post(&mut ring, &mem, 0, &init_request());
    let mut lookup = |name: &str, slot: u64, unique: u64| {
        let name = CString::new(name).unwrap();
        let mut req = header(FUSE_LOOKUP, unique, ROOT, name.as_bytes_with_nul().len())
            .as_slice()
            .to_vec();
        req.extend_from_slice(name.as_bytes_with_nul());
        post(&mut ring, &mem, slot, &req);
    };
    lookup("hello", 1, 2);
    lookup("missing", 2, 3);
    lookup("..", 3, 4);
    assert!(process_queue(
        &server,
        &mut q,
        &mem,
        &RequestCounts::default()
    ));
    assert_eq!(ring.used_idx(), 4);

    let init = reply(&mem, 0);
    assert_eq!((init.error, init.unique), (0, 1));
    assert!(init.len as usize > std::mem::size_of::<OutHeader>());
    let found = reply(&mem, 1);
    assert_eq!((found.error, found.unique), (0, 2));
    // fuse_entry_out: nodeid, generation, timeouts, then the attributes.
    let size: u64 = mem
        .read_obj(GuestAddress(REPLY + 0x1000 + 16 + 40 + 8))
        .unwrap();
    assert_eq!(size, 2, "the entry carries the host file's size");
    assert_eq!(reply(&mem, 2).error, -libc::ENOENT);
    // '..' of the share's root is the root itself, never the host parent.
    assert_eq!(reply(&mem, 3).error, 0);
    let ino: u64 = mem
        .read_obj(GuestAddress(REPLY + 0x3000 + 16 + 40))
        .unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(ino, std::fs::metadata(dir.path()).unwrap().ino());
    assert_ne!(ino, std::fs::metadata(dir.path().join("..")).unwrap().ino());
}

#[test]
fn malformed_requests_complete_without_harm() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::new(passthrough(dir.path()));
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    let mut q = ring.queue();
    post(&mut ring, &mem, 0, &init_request());
    // Shorter than a FUSE header.
    post(&mut ring, &mem, 1, &[1, 2, 3]);
    // A header claiming a huge body.
    let mut lying = header(FUSE_LOOKUP, 9, ROOT, 0);
    lying.len = u32::MAX;
    post(&mut ring, &mem, 2, lying.as_slice());
    // An opcode nobody knows.
    post(&mut ring, &mem, 3, header(9999, 10, ROOT, 0).as_slice());
    // Buffers outside guest memory, and a chain with no reply buffer.
    ring.post_chain(&[(0xffff_0000_0000, 64, 0), (REPLY, 64, WRITE)]);
    ring.post_chain(&[(REQ, 40, 0)]);
    // A reply buffer too small for any answer.
    ring.post_chain(&[(REQ + 0x1000, 40, 0), (REPLY + 0x6000, 4, WRITE)]);
    let counts = RequestCounts::default();
    assert!(process_queue(&server, &mut q, &mem, &counts));
    assert_eq!(ring.used_idx(), 7, "every chain is returned");
    assert_eq!(reply(&mem, 0).error, 0, "INIT still worked");
    assert_eq!(reply(&mem, 3).error, -libc::ENOSYS);
    // Counted as the server parsed them: the chain without a reply buffer
    // as the INIT its bytes still hold; opcode 9999 and the zeros after
    // [1, 2, 3] under "other".
    assert_eq!((counts.get(FUSE_INIT), counts.get(9999)), (2, 2));
}

#[test]
fn random_chains_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), "x").unwrap();
    let server = Server::new(passthrough(dir.path()));
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    let mut q = ring.queue();
    post(&mut ring, &mem, 0, &init_request());
    process_queue(&server, &mut q, &mem, &RequestCounts::default());
    let mut rng = crate::devices::virtio::rng::tests::XorShift(0xdead_beef_1234_5678);
    let mut answered = 0;
    for round in 0..2000u64 {
        let body: Vec<u8> = (0..rng.next() % 128).map(|_| rng.next() as u8).collect();
        let mut req = header((rng.next() % 50) as u32, round, rng.next() % 4, body.len())
            .as_slice()
            .to_vec();
        if rng.next() % 4 == 0 {
            req.truncate((rng.next() % 40) as usize);
        }
        req.extend_from_slice(&body);
        post(&mut ring, &mem, round % 64, &req);
        let before = ring.used_idx();
        process_queue(&server, &mut q, &mem, &RequestCounts::default());
        assert_eq!(ring.used_idx(), before.wrapping_add(1));
        if reply(&mem, round % 64).unique == round {
            answered += 1;
        }
    }
    assert!(
        answered > 500,
        "only {answered} random requests got a reply"
    );
}

/// A directory holding a file `f` ("data") and a directory `d`, shared
/// by `share`, with the entries of both.
fn shared_file_and_dir(
    share: fn(PassthroughFs) -> Share<PassthroughFs>,
) -> (tempfile::TempDir, Share<PassthroughFs>, Entry, Entry) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), "data").unwrap();
    std::fs::create_dir(dir.path().join("d")).unwrap();
    let fs = share(passthrough(dir.path()));
    let ctx = Context::new();
    let f = fs.lookup(&ctx, ROOT, c"f").unwrap();
    let d = fs.lookup(&ctx, ROOT, c"d").unwrap();
    (dir, fs, f, d)
}

/// The names in a host directory, sorted.
fn names_in(dir: impl AsRef<std::path::Path>) -> Vec<std::ffi::OsString> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    names
}

fn erofs<T: std::fmt::Debug>(r: io::Result<T>) -> bool {
    r.unwrap_err().raw_os_error() == Some(libc::EROFS)
}

#[test]
fn the_read_only_wrapper_refuses_every_change() {
    let (dir, fs, f, d) = shared_file_and_dir(Share::read_only);
    let ctx = Context::new();
    let name = |s: &str| CString::new(s).unwrap();

    assert!(fs.open(&ctx, f.inode, libc::O_RDONLY as u32, 0).is_ok());
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert!(erofs(fs.open(&ctx, f.inode, flags as u32, 0)), "{flags:#x}");
    }
    assert!(erofs(fs.mkdir(&ctx, ROOT, &name("new"), 0o755, 0)));
    assert!(erofs(fs.mknod(
        &ctx,
        ROOT,
        &name("n"),
        libc::S_IFREG | 0o644,
        0,
        0
    )));
    assert!(erofs(fs.unlink(&ctx, ROOT, &name("f"))));
    assert!(erofs(fs.rmdir(&ctx, ROOT, &name("d"))));
    assert!(erofs(fs.rename(
        &ctx,
        ROOT,
        &name("f"),
        d.inode,
        &name("g"),
        0
    )));
    assert!(erofs(fs.link(&ctx, f.inode, d.inode, &name("h"))));
    assert!(erofs(fs.symlink(&ctx, &name("f"), ROOT, &name("s"))));
    assert!(erofs(fs.setxattr(&ctx, f.inode, &name("user.x"), b"1", 0)));
    assert!(erofs(fs.removexattr(&ctx, f.inode, &name("user.x"))));
    assert!(erofs(fs.access(&ctx, f.inode, libc::W_OK as u32)));
    assert!(fs.access(&ctx, f.inode, libc::R_OK as u32).is_ok());
    let st = fs.statfs(&ctx, ROOT).unwrap();
    assert_ne!(st.f_flag & libc::ST_RDONLY, 0);

    // The host directory is exactly as it was.
    let names = names_in(dir.path());
    assert_eq!(names, ["d", "f"]);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("f")).unwrap(),
        "data"
    );
}

/// The INIT reply a share gives a guest offering what Linux 6.12 offers.
fn negotiate<F: FileSystem + Sync>(fs: F) -> InitOut {
    let offered = FsOptions::ASYNC_READ
        | FsOptions::ATOMIC_O_TRUNC
        | FsOptions::BIG_WRITES
        | FsOptions::MAX_PAGES
        | FsOptions::PARALLEL_DIROPS
        | FsOptions::WRITEBACK_CACHE
        | FsOptions::HANDLE_KILLPRIV_V2
        | FsOptions::DO_READDIRPLUS
        | FsOptions::READDIRPLUS_AUTO
        | FsOptions::ZERO_MESSAGE_OPEN
        | FsOptions::ZERO_MESSAGE_OPENDIR;
    let server = Server::new(fs);
    let mem = memory();
    let mut ring = Ring::new(&mem, 0);
    let mut q = ring.queue();
    post(&mut ring, &mem, 0, &init_request_offering(offered));
    process_queue(&server, &mut q, &mem, &RequestCounts::default());
    assert_eq!(reply(&mem, 0).error, 0);
    mem.read_obj(GuestAddress(
        REPLY + std::mem::size_of::<OutHeader>() as u64,
    ))
    .unwrap()
}

#[test]
fn shares_take_one_mebibyte_requests_and_leave_suid_clearing_to_the_host() {
    let dir = tempfile::tempdir().unwrap();
    for share in [
        Share::read_write(passthrough(dir.path())),
        Share::read_only(passthrough(dir.path())),
    ] {
        let out = negotiate(share);
        let flags = FsOptions::from_bits_truncate(out.flags as u64);
        // Without these the guest sends one page per WRITE.
        assert!(flags.contains(FsOptions::BIG_WRITES | FsOptions::MAX_PAGES));
        assert_eq!((out.max_write, out.max_pages), (1 << 20, 256));
        assert!(flags.contains(FsOptions::ASYNC_READ | FsOptions::PARALLEL_DIROPS));
        assert!(flags.contains(FsOptions::ATOMIC_O_TRUNC));
        assert!(flags.contains(FsOptions::HANDLE_KILLPRIV_V2));
        // The guest may not hold writes back from the host.
        assert!(!flags.contains(FsOptions::WRITEBACK_CACHE));
        // Locks stay in the guest, so a FLUSH never has one to release.
        assert!(!flags.intersects(FsOptions::POSIX_LOCKS | FsOptions::FLOCK_LOCKS));
    }
    // The bare file system asks for none of it: the wrapper is what does.
    let bare = FsOptions::from_bits_truncate(negotiate(passthrough(dir.path())).flags as u64);
    assert!(!bare.contains(FsOptions::BIG_WRITES));
}

#[test]
fn a_cache_always_share_opens_files_with_no_message() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), "data").unwrap();
    let flags = |cache| {
        let out = negotiate(Share::read_write(passthrough_cached(dir.path(), cache)));
        FsOptions::from_bits_truncate(out.flags as u64)
    };
    let always = flags(CacheMode::Always);
    assert!(always.contains(FsOptions::ZERO_MESSAGE_OPEN));
    // With no OPEN to carry it, O_TRUNC becomes the guest's SETATTR.
    assert!(!always.contains(FsOptions::ATOMIC_O_TRUNC));
    // Directories still open with a message: READDIR needs the handle.
    assert!(!always.contains(FsOptions::ZERO_MESSAGE_OPENDIR));
    for cache in [CacheMode::Auto, CacheMode::Never] {
        let other = flags(cache);
        assert!(!other.contains(FsOptions::ZERO_MESSAGE_OPEN), "{cache:?}");
        assert!(other.contains(FsOptions::ATOMIC_O_TRUNC), "{cache:?}");
    }

    // The refusal the guest turns zero-message opens on from.
    let share = Share::read_write(passthrough_cached(dir.path(), CacheMode::Always));
    let offered = FsOptions::ZERO_MESSAGE_OPEN | FsOptions::HANDLE_KILLPRIV_V2;
    share.init(offered).unwrap();
    let ctx = Context::new();
    let f = share.lookup(&ctx, ROOT, c"f").unwrap();
    let err = share
        .open(&ctx, f.inode, libc::O_RDONLY as u32, 0)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSYS));
    let (st, _) = share.getattr(&ctx, f.inode, None).unwrap();
    assert_eq!(st.st_size, 4);
}

#[test]
fn a_file_opened_for_reading_is_closed_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), "data").unwrap();
    let share = Share::read_write(passthrough(dir.path()));
    share.init(FsOptions::empty()).unwrap();
    let ctx = Context::new();
    let f = share.lookup(&ctx, ROOT, c"f").unwrap();
    const NOFLUSH: u32 = 1 << 5;
    for (flags, noflush) in [
        (libc::O_RDONLY, true),
        (libc::O_WRONLY, false),
        (libc::O_RDWR, false),
    ] {
        let (handle, opts, _) = share.open(&ctx, f.inode, flags as u32, 0).unwrap();
        assert_eq!(opts.bits() & NOFLUSH != 0, noflush, "open flags {flags:#o}");
        let handle = handle.unwrap();
        share
            .release(&ctx, f.inode, 0, handle, false, false, None)
            .unwrap();
    }
}

#[test]
fn a_read_write_share_passes_every_change_through() {
    let (dir, fs, f, d) = shared_file_and_dir(Share::read_write);
    std::fs::create_dir(dir.path().join("gone")).unwrap();
    let ctx = Context::new();
    let name = |s: &str| CString::new(s).unwrap();

    let (h, _, _) = fs.open(&ctx, f.inode, libc::O_RDWR as u32, 0).unwrap();
    fs.release(&ctx, f.inode, 0, h.unwrap(), false, false, None)
        .unwrap();
    fs.mkdir(&ctx, ROOT, &name("new"), 0o755, 0).unwrap();
    fs.mknod(&ctx, ROOT, &name("n"), libc::S_IFREG | 0o644, 0, 0)
        .unwrap();
    let create = CreateIn {
        flags: libc::O_WRONLY as u32,
        mode: 0o600,
        umask: 0,
        fuse_flags: 0,
    };
    fs.create(&ctx, ROOT, &name("c"), create).unwrap();
    fs.rmdir(&ctx, ROOT, &name("gone")).unwrap();
    fs.rename(&ctx, ROOT, &name("n"), d.inode, &name("moved"), 0)
        .unwrap();
    fs.link(&ctx, f.inode, d.inode, &name("hard")).unwrap();
    fs.symlink(&ctx, &name("f"), ROOT, &name("s")).unwrap();
    fs.setxattr(&ctx, f.inode, &name("user.x"), b"1", 0)
        .unwrap();
    fs.removexattr(&ctx, f.inode, &name("user.x")).unwrap();
    fs.unlink(&ctx, ROOT, &name("c")).unwrap();
    fs.access(&ctx, f.inode, libc::W_OK as u32).unwrap();
    let st = fs.statfs(&ctx, ROOT).unwrap();
    assert_eq!(st.f_flag & libc::ST_RDONLY, 0);

    let names = names_in(dir.path());
    assert_eq!(names, ["d", "f", "new", "s"]);
    let inside = names_in(dir.path().join("d"));
    assert_eq!(inside, ["hard", "moved"]);
    assert_eq!(
        std::fs::read_link(dir.path().join("s")).unwrap(),
        std::path::Path::new("f")
    );
}

#[test]
fn reads_without_an_open_reach_regular_files_only() {
    // On a zero-message share the host opens the inode a READ names. A
    // hostile guest naming a FIFO must get an error, not a host thread
    // blocked in open(2) waiting for a writer.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("f"), "hello").unwrap();
    let fifo = CString::new(
        dir.path()
            .join("fifo")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: a NUL-terminated path; mkfifo touches no memory of ours.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    let fs = passthrough_cached(dir.path(), CacheMode::Always);
    let (tx, rx) = std::sync::mpsc::channel();
    // A VMM-sized thread: a default 2 MiB stack, cached by glibc once the
    // thread ends, would be handed to the next small thread another test
    // spawns (threads.rs checks its stack mapping's size).
    crate::threads::named("fs-probe")
        .spawn(move || {
            let server = Server::new(Share::read_write(fs));
            let mem = memory();
            let mut ring = Ring::new(&mem, 0);
            let mut q = ring.queue();
            let counts = RequestCounts::default();
            post(
                &mut ring,
                &mem,
                0,
                &init_request_offering(FsOptions::ZERO_MESSAGE_OPEN),
            );
            for (slot, name) in [(1, "f"), (2, "fifo")] {
                let name = CString::new(name).unwrap();
                let mut req = header(FUSE_LOOKUP, slot + 1, ROOT, name.as_bytes_with_nul().len())
                    .as_slice()
                    .to_vec();
                req.extend_from_slice(name.as_bytes_with_nul());
                post(&mut ring, &mem, slot, &req);
            }
            process_queue(&server, &mut q, &mem, &counts);
            for slot in [1, 2] {
                let nodeid: u64 = mem
                    .read_obj(GuestAddress(REPLY + 0x1000 * slot + 16))
                    .unwrap();
                // fh 0: no OPEN gave the guest a handle. The size fits the
                // reply buffer past its header, as a guest's would.
                let read = ReadIn {
                    fh: 0,
                    size: 64,
                    ..Default::default()
                };
                let mut req = header(FUSE_READ, slot + 10, nodeid, std::mem::size_of::<ReadIn>())
                    .as_slice()
                    .to_vec();
                req.extend_from_slice(read.as_slice());
                post(&mut ring, &mem, slot + 2, &req);
            }
            process_queue(&server, &mut q, &mem, &counts);
            let data: [u8; 5] = mem
                .read_obj(GuestAddress(
                    REPLY + 0x3000 + std::mem::size_of::<OutHeader>() as u64,
                ))
                .unwrap();
            let _ = tx.send((reply(&mem, 3), data, reply(&mem, 4)));
        })
        .unwrap();
    let (file, data, fifo) = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the device thread answered (a READ of a FIFO must not block)");
    assert_eq!((file.error, file.len as usize), (0, 16 + 5));
    assert_eq!(&data, b"hello");
    assert_eq!(fifo.error, -libc::EBADF);
}
