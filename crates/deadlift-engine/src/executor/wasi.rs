//! WASI preview 1 for plug-ins whose grant allows it, on `wasi-common`: the same
//! implementation the `extism` SDK links, so guests see the same behaviour. A WASI
//! context has no environment variables, no arguments and no stdin; stdout and stderr
//! are captured (up to [`MAX_CAPTURED_BYTES`] per call) into the call's logs. Clocks and
//! random are available. The only directories are those the grant maps, each read-write
//! or read-only ([`ReadOnlyDir`]).

use std::any::Any;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use wasi_common::dir::{OpenResult, ReaddirCursor, ReaddirEntity, WasiDir};
use wasi_common::file::{Advice, FdFlags, FileType, Filestat, OFlags, WasiFile};
use wasi_common::pipe::WritePipe;
use wasi_common::{Error, ErrorExt, WasiCtx};

use crate::error::CallError;
use crate::grant::Grant;

/// Most bytes of stdout and of stderr kept per call; the rest is dropped (and said so).
pub(crate) const MAX_CAPTURED_BYTES: usize = 64 * 1024;

/// Bytes a guest wrote to stdout or stderr during one call.
#[derive(Debug, Clone, Default)]
pub(crate) struct Captured(Arc<Mutex<(Vec<u8>, bool)>>);

impl Captured {
    /// What was written since the last take, and whether some of it was dropped.
    pub fn take(&self) -> (Vec<u8>, bool) {
        std::mem::take(&mut *self.0.lock())
    }
}

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut guard = self.0.lock();
        let (buffer, truncated) = &mut *guard;
        let room = MAX_CAPTURED_BYTES.saturating_sub(buffer.len());
        buffer.extend_from_slice(&bytes[..bytes.len().min(room)]);
        *truncated |= bytes.len() > room;
        // Report everything written, so the guest neither retries nor fails.
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A store's WASI context and its captured output.
pub(crate) struct WasiState {
    pub ctx: WasiCtx,
    pub stdout: Captured,
    pub stderr: Captured,
}

impl std::fmt::Debug for WasiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasiState").finish_non_exhaustive()
    }
}

/// Builds the WASI context a grant allows.
pub(crate) fn context(grant: &Grant) -> Result<WasiState, CallError> {
    let stdout = Captured::default();
    let stderr = Captured::default();
    let ctx = wasi_common::sync::WasiCtxBuilder::new()
        .stdout(Box::new(WritePipe::new(stdout.clone())))
        .stderr(Box::new(WritePipe::new(stderr.clone())))
        .build();
    for (host, guest) in &grant.allowed_paths {
        let (read_only, host) = match host.strip_prefix("ro:") {
            Some(path) => (true, path),
            None => (false, host.as_str()),
        };
        let invalid = |e: &dyn std::fmt::Display| CallError::GrantInvalid {
            reason: format!("cannot map directory `{host}` to `{guest}`: {e}"),
        };
        let dir =
            wasi_common::sync::Dir::open_ambient_dir(host, wasi_common::sync::ambient_authority())
                .map_err(|e| invalid(&e))?;
        let dir = wasi_common::sync::dir::Dir::from_cap_std(dir);
        let dir: Box<dyn WasiDir> = if read_only {
            Box::new(ReadOnlyDir(Box::new(dir)))
        } else {
            Box::new(dir)
        };
        ctx.push_preopened_dir(dir, guest)
            .map_err(|e| invalid(&e))?;
    }
    Ok(WasiState {
        ctx,
        stdout,
        stderr,
    })
}

/// A directory (and everything under it) that can be read but not changed.
pub(crate) struct ReadOnlyDir(Box<dyn WasiDir>);

#[async_trait::async_trait]
impl WasiDir for ReadOnlyDir {
    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn open_file(
        &self,
        symlink_follow: bool,
        path: &str,
        oflags: OFlags,
        read: bool,
        write: bool,
        fdflags: FdFlags,
    ) -> Result<OpenResult, Error> {
        let changes = OFlags::CREATE | OFlags::TRUNCATE | OFlags::EXCLUSIVE;
        if write || oflags.intersects(changes) || fdflags.contains(FdFlags::APPEND) {
            return Err(Error::perm());
        }
        match self
            .0
            .open_file(symlink_follow, path, oflags, read, false, fdflags)
            .await?
        {
            OpenResult::Dir(dir) => Ok(OpenResult::Dir(Box::new(ReadOnlyDir(dir)))),
            OpenResult::File(file) => Ok(OpenResult::File(Box::new(ReadOnlyFile(file)))),
        }
    }

    async fn readdir(
        &self,
        cursor: ReaddirCursor,
    ) -> Result<Box<dyn Iterator<Item = Result<ReaddirEntity, Error>> + Send>, Error> {
        self.0.readdir(cursor).await
    }

    async fn read_link(&self, path: &str) -> Result<PathBuf, Error> {
        self.0.read_link(path).await
    }

    async fn get_filestat(&self) -> Result<Filestat, Error> {
        self.0.get_filestat().await
    }

    async fn get_path_filestat(
        &self,
        path: &str,
        follow_symlinks: bool,
    ) -> Result<Filestat, Error> {
        self.0.get_path_filestat(path, follow_symlinks).await
    }

    async fn create_dir(&self, _path: &str) -> Result<(), Error> {
        Err(Error::perm())
    }

    async fn symlink(&self, _old_path: &str, _new_path: &str) -> Result<(), Error> {
        Err(Error::perm())
    }

    async fn remove_dir(&self, _path: &str) -> Result<(), Error> {
        Err(Error::perm())
    }

    async fn unlink_file(&self, _path: &str) -> Result<(), Error> {
        Err(Error::perm())
    }

    async fn rename(
        &self,
        _path: &str,
        _dest_dir: &dyn WasiDir,
        _dest_path: &str,
    ) -> Result<(), Error> {
        Err(Error::perm())
    }

    async fn hard_link(
        &self,
        _path: &str,
        _target_dir: &dyn WasiDir,
        _target_path: &str,
    ) -> Result<(), Error> {
        Err(Error::perm())
    }

    async fn set_times(
        &self,
        _path: &str,
        _atime: Option<wasi_common::SystemTimeSpec>,
        _mtime: Option<wasi_common::SystemTimeSpec>,
        _follow_symlinks: bool,
    ) -> Result<(), Error> {
        Err(Error::perm())
    }
}

/// A file opened under a [`ReadOnlyDir`]: it reads, seeks and reports, but refuses
/// every change, its metadata (times, size, flags) included. A file opened without
/// write access still carries the methods that change it; they end here.
pub(crate) struct ReadOnlyFile(Box<dyn WasiFile>);

#[async_trait::async_trait]
impl WasiFile for ReadOnlyFile {
    fn as_any(&self) -> &dyn Any {
        self.0.as_any()
    }

    async fn get_filetype(&self) -> Result<FileType, Error> {
        self.0.get_filetype().await
    }

    #[cfg(unix)]
    fn pollable(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.0.pollable()
    }

    fn isatty(&self) -> bool {
        self.0.isatty()
    }

    async fn get_fdflags(&self) -> Result<FdFlags, Error> {
        self.0.get_fdflags().await
    }

    async fn set_fdflags(&mut self, _flags: FdFlags) -> Result<(), Error> {
        Err(Error::perm())
    }

    async fn get_filestat(&self) -> Result<Filestat, Error> {
        self.0.get_filestat().await
    }

    async fn set_filestat_size(&self, _size: u64) -> Result<(), Error> {
        Err(Error::perm())
    }

    async fn advise(&self, offset: u64, len: u64, advice: Advice) -> Result<(), Error> {
        self.0.advise(offset, len, advice).await
    }

    async fn set_times(
        &self,
        _atime: Option<wasi_common::SystemTimeSpec>,
        _mtime: Option<wasi_common::SystemTimeSpec>,
    ) -> Result<(), Error> {
        Err(Error::perm())
    }

    async fn read_vectored<'a>(&self, bufs: &mut [std::io::IoSliceMut<'a>]) -> Result<u64, Error> {
        self.0.read_vectored(bufs).await
    }

    async fn read_vectored_at<'a>(
        &self,
        bufs: &mut [std::io::IoSliceMut<'a>],
        offset: u64,
    ) -> Result<u64, Error> {
        self.0.read_vectored_at(bufs, offset).await
    }

    async fn write_vectored<'a>(&self, _bufs: &[std::io::IoSlice<'a>]) -> Result<u64, Error> {
        Err(Error::perm())
    }

    async fn write_vectored_at<'a>(
        &self,
        _bufs: &[std::io::IoSlice<'a>],
        _offset: u64,
    ) -> Result<u64, Error> {
        Err(Error::perm())
    }

    async fn seek(&self, pos: std::io::SeekFrom) -> Result<u64, Error> {
        self.0.seek(pos).await
    }

    async fn peek(&self, buf: &mut [u8]) -> Result<u64, Error> {
        self.0.peek(buf).await
    }

    fn num_ready_bytes(&self) -> Result<u64, Error> {
        self.0.num_ready_bytes()
    }

    async fn readable(&self) -> Result<(), Error> {
        self.0.readable().await
    }
}
