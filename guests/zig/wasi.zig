//! wasi.zig - our own declarations of the few WASI preview 1 functions
//! (`wasi_snapshot_preview1`) the Zig guest uses: writing to stdout and
//! reading a file through a preopened directory. Declared here rather than
//! taken from Zig's std so that the module's imports are exactly these and
//! the guest does not depend on std's WASI layer, which changes between Zig
//! releases. Layouts follow the WASI preview 1 witx definitions (wasm32).

/// A WASI errno; 0 is success.
pub const Errno = u16;
pub const Fd = u32;

pub const errno_badf: Errno = 8;

/// `prestat`: a tagged union whose only variant (tag 0) is a directory with
/// the byte length of its name.
pub const Prestat = extern struct {
    tag: u8,
    dir_name_len: u32,
};
pub const preopentype_dir: u8 = 0;

pub const Iovec = extern struct {
    buf: [*]u8,
    len: usize,
};
pub const Ciovec = extern struct {
    buf: [*]const u8,
    len: usize,
};

/// `lookupflags.symlink_follow`.
pub const lookup_symlink_follow: u32 = 1;
/// `rights.fd_read`.
pub const right_fd_read: u64 = 1 << 1;

pub const stdout: Fd = 1;

pub extern "wasi_snapshot_preview1" fn fd_prestat_get(fd: Fd, buf: *Prestat) Errno;
pub extern "wasi_snapshot_preview1" fn fd_prestat_dir_name(fd: Fd, path: [*]u8, path_len: usize) Errno;
pub extern "wasi_snapshot_preview1" fn path_open(
    dirfd: Fd,
    dirflags: u32,
    path: [*]const u8,
    path_len: usize,
    oflags: u16,
    fs_rights_base: u64,
    fs_rights_inheriting: u64,
    fdflags: u16,
    opened_fd: *Fd,
) Errno;
pub extern "wasi_snapshot_preview1" fn fd_read(fd: Fd, iovs: [*]const Iovec, iovs_len: usize, nread: *usize) Errno;
pub extern "wasi_snapshot_preview1" fn fd_write(fd: Fd, iovs: [*]const Ciovec, iovs_len: usize, nwritten: *usize) Errno;
pub extern "wasi_snapshot_preview1" fn fd_close(fd: Fd) Errno;
