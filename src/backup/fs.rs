//! A sink that writes objects as files under a directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::io::AsyncWriteExt;

use super::error::SinkError;
use super::key::{ObjectKey, RESERVED_DIR};
use super::sink::{ObjectInfo, Sink, SinkWriter};

/// When [`FsSink`] calls `fsync`.
///
/// The rename that publishes an object is atomic for readers in every mode: a reader sees
/// the old file or the whole new one, never a part. The modes differ only after a crash of
/// the machine (power loss, kernel panic):
///
/// | mode | after a machine crash |
/// |---|---|
/// | `Never` | a published file may be empty or partial (the kernel had not written it yet) |
/// | `File` (default) | a published file is complete; a file published just before the crash may be missing |
/// | `FileAndDir` | a commit that returned is durable (the directory entry is synced too) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Leave flushing to the kernel: fastest.
    Never,
    /// `fsync` the file before the rename.
    #[default]
    File,
    /// `fsync` the file before the rename and the directory after it.
    FileAndDir,
}

/// Writes each object to `root/<key>`: first to a temporary file in `root/.tmp/`, renamed
/// over the final name on commit, removed on abort. Readers (such as a static file server
/// over `root`) never see a partial object; concurrent copies of one key each write their
/// own temporary file and the last commit wins.
///
/// Temporary files live outside the key namespace: `.tmp` is a reserved first key segment
/// ([`KeyError::Reserved`](super::KeyError::Reserved)), so no request can name one, and
/// their names are 128 random bits opened with `O_EXCL` (`create_new`), so none can be
/// guessed or shared. (Before, a temporary file sat next to its object under a
/// predictable name, and a request for that name replaced the object being copied.) A
/// crash can leave files in `root/.tmp/`; everything there may be deleted while no copy
/// runs.
#[derive(Debug, Clone)]
pub struct FsSink {
    root: Arc<PathBuf>,
    fsync: FsyncPolicy,
    buffer: usize,
}

impl FsSink {
    /// A sink writing under `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FsSink {
            root: Arc::new(root.into()),
            fsync: FsyncPolicy::default(),
            buffer: 256 * 1024,
        }
    }

    /// Sets the fsync policy (default [`FsyncPolicy::File`]).
    pub fn fsync(mut self, policy: FsyncPolicy) -> Self {
        self.fsync = policy;
        self
    }

    /// Size of the write buffer in front of the file (default 256 KiB).
    pub fn write_buffer(mut self, bytes: usize) -> Self {
        self.buffer = bytes.max(4096);
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path an object is stored at.
    pub fn path_of(&self, key: &ObjectKey) -> PathBuf {
        let mut p = PathBuf::from(&*self.root);
        for seg in key.segments() {
            p.push(seg);
        }
        p
    }
}

struct FsWriter {
    file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    tmp: PathBuf,
    dest: PathBuf,
    fsync: FsyncPolicy,
}

impl Sink for FsSink {
    fn name(&self) -> &str {
        "fs"
    }

    fn begin<'a>(
        &'a self,
        info: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<Box<dyn SinkWriter>, SinkError>> {
        Box::pin(async move {
            let dest = self.path_of(&info.key);
            let Some(dir) = dest.parent() else {
                return Err(SinkError::Io(std::io::Error::other("key has no file name")));
            };
            tokio::fs::create_dir_all(dir).await?;
            let tmp_dir = self.root.join(RESERVED_DIR);
            tokio::fs::create_dir_all(&tmp_dir).await?;
            let tmp = tmp_dir.join(format!(
                "{:016x}{:016x}",
                rand::random::<u64>(),
                rand::random::<u64>()
            ));
            let file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .await?;
            let w: Box<dyn SinkWriter> = Box::new(FsWriter {
                file: Some(tokio::io::BufWriter::with_capacity(self.buffer, file)),
                tmp,
                dest,
                fsync: self.fsync,
            });
            Ok(w)
        })
    }
}

impl SinkWriter for FsWriter {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            match self.file.as_mut() {
                Some(f) => Ok(f.write_all(&chunk).await?),
                None => Err(SinkError::Io(std::io::Error::other("writer closed"))),
            }
        })
    }

    fn commit(mut self: Box<Self>) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async move {
            let Some(mut f) = self.file.take() else {
                return Err(SinkError::Io(std::io::Error::other("writer closed")));
            };
            f.flush().await?;
            let file = f.into_inner();
            if self.fsync != FsyncPolicy::Never {
                file.sync_all().await?;
            }
            drop(file);
            tokio::fs::rename(&self.tmp, &self.dest).await?;
            // Renamed: nothing left for Drop to clean up.
            self.tmp = PathBuf::new();
            if self.fsync == FsyncPolicy::FileAndDir {
                if let Some(dir) = self.dest.parent() {
                    tokio::fs::File::open(dir).await?.sync_all().await?;
                }
            }
            Ok(())
        })
    }

    fn abort(mut self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            drop(self.file.take());
            let tmp = std::mem::take(&mut self.tmp);
            if let Err(e) = tokio::fs::remove_file(&tmp).await {
                tracing::warn!(error = %e, path = %tmp.display(), "could not remove partial backup");
            }
        })
    }
}

impl Drop for FsWriter {
    fn drop(&mut self) {
        // Neither committed nor aborted (task cancelled): never leave the partial file.
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
