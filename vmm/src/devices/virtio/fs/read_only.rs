//! A read-only view of any FUSE file system: every request that would
//! change the share fails with EROFS on the host side, whatever the guest
//! mounted it as. A guest that remounts read-write gains nothing.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, CreateIn, FsOptions, OpenOptions, SetattrValid,
};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, GetxattrReply, ListxattrReply, ZeroCopyReader,
    ZeroCopyWriter,
};

fn erofs<T>() -> io::Result<T> {
    Err(io::Error::from_raw_os_error(libc::EROFS))
}

/// `F`, with writes refused.
#[derive(Debug)]
pub struct ReadOnly<F>(pub F);

impl<F: FileSystem> FileSystem for ReadOnly<F> {
    type Inode = F::Inode;
    type Handle = F::Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        // Writeback caching would let the guest buffer writes it can never flush.
        self.0.init(capable).map(|o| o - FsOptions::WRITEBACK_CACHE)
    }

    fn destroy(&self) {
        self.0.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        self.0.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        self.0.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        self.0.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.0.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        _: &Context,
        _: Self::Inode,
        _: stat64,
        _: Option<Self::Handle>,
        _: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        erofs()
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.0.readlink(ctx, inode)
    }

    fn symlink(&self, _: &Context, _: &CStr, _: Self::Inode, _: &CStr) -> io::Result<Entry> {
        erofs()
    }

    fn mknod(
        &self,
        _: &Context,
        _: Self::Inode,
        _: &CStr,
        _: u32,
        _: u32,
        _: u32,
    ) -> io::Result<Entry> {
        erofs()
    }

    fn mkdir(&self, _: &Context, _: Self::Inode, _: &CStr, _: u32, _: u32) -> io::Result<Entry> {
        erofs()
    }

    fn unlink(&self, _: &Context, _: Self::Inode, _: &CStr) -> io::Result<()> {
        erofs()
    }

    fn rmdir(&self, _: &Context, _: Self::Inode, _: &CStr) -> io::Result<()> {
        erofs()
    }

    fn rename(
        &self,
        _: &Context,
        _: Self::Inode,
        _: &CStr,
        _: Self::Inode,
        _: &CStr,
        _: u32,
    ) -> io::Result<()> {
        erofs()
    }

    fn link(&self, _: &Context, _: Self::Inode, _: Self::Inode, _: &CStr) -> io::Result<Entry> {
        erofs()
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let f = flags as i32;
        if f & libc::O_ACCMODE != libc::O_RDONLY || f & libc::O_TRUNC != 0 {
            return erofs();
        }
        self.0.open(ctx, inode, flags, fuse_flags)
    }

    fn create(
        &self,
        _: &Context,
        _: Self::Inode,
        _: &CStr,
        _: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        erofs()
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.0
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    fn write(
        &self,
        _: &Context,
        _: Self::Inode,
        _: Self::Handle,
        _: &mut dyn ZeroCopyReader,
        _: u32,
        _: u64,
        _: Option<u64>,
        _: bool,
        _: u32,
        _: u32,
    ) -> io::Result<usize> {
        erofs()
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.0.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.0.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        _: &Context,
        _: Self::Inode,
        _: Self::Handle,
        _: u32,
        _: u64,
        _: u64,
    ) -> io::Result<()> {
        erofs()
    }

    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.0
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64> {
        let mut st = self.0.statfs(ctx, inode)?;
        st.f_flag |= libc::ST_RDONLY;
        Ok(st)
    }

    fn setxattr(&self, _: &Context, _: Self::Inode, _: &CStr, _: &[u8], _: u32) -> io::Result<()> {
        erofs()
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.0.getxattr(ctx, inode, name, size)
    }

    fn listxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        self.0.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, _: &Context, _: Self::Inode, _: &CStr) -> io::Result<()> {
        erofs()
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        self.0.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.0.readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.0
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.0.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.0.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            return erofs();
        }
        self.0.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.0.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.0.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.0.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.0.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.0.notify_reply()
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.0.id_remap(ctx)
    }
}
