//! A sink writing to S3, GCS, Azure or a local directory through the `object_store` crate.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

use super::error::SinkError;
use super::sink::{ObjectInfo, Sink, SinkWriter};

/// Streams objects into an [`ObjectStore`].
///
/// | object | upload |
/// |---|---|
/// | `Content-Length` ≤ `part_size` | buffered (≤ `part_size`), one `PUT` on commit |
/// | larger or unknown length | multipart upload: parts of `part_size` bytes, at most `concurrency` in flight; completed on commit, aborted (parts deleted) on abort |
///
/// Memory per copy is therefore at most `part_size × (concurrency + 1)`. Either way the
/// object becomes visible only when the upload completes: S3 never exposes a partial
/// multipart upload. With [`ObjectStoreSink::if_absent`] a single `PUT` is conditional
/// (`If-None-Match: *`) and an object that is already there counts as committed.
#[derive(Clone)]
pub struct ObjectStoreSink {
    store: Arc<dyn ObjectStore>,
    prefix: Option<Path>,
    part_size: usize,
    concurrency: usize,
    if_absent: bool,
}

impl fmt::Debug for ObjectStoreSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStoreSink")
            .field("store", &self.store.to_string())
            .field("prefix", &self.prefix)
            .field("part_size", &self.part_size)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl ObjectStoreSink {
    /// A sink writing to `store` (8 MiB parts, 2 in flight).
    pub fn new(store: Arc<dyn ObjectStore>) -> Self {
        ObjectStoreSink {
            store,
            prefix: None,
            part_size: 8 << 20,
            concurrency: 2,
            if_absent: false,
        }
    }

    /// Stores objects under `prefix/` (for example `backup`).
    pub fn prefix(mut self, prefix: &str) -> Result<Self, SinkError> {
        let p = Path::parse(prefix).map_err(|e| SinkError::Other(e.into()))?;
        self.prefix = Some(p);
        Ok(self)
    }

    /// Multipart part size (default 8 MiB; S3 requires at least 5 MiB).
    pub fn part_size(mut self, bytes: usize) -> Self {
        self.part_size = bytes.max(5 << 20);
        self
    }

    /// Parts uploaded at once per copy (default 2).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Do not overwrite an existing object on single-`PUT` uploads (default `false`:
    /// newer content wins, like the file sink).
    pub fn if_absent(mut self, yes: bool) -> Self {
        self.if_absent = yes;
        self
    }

    fn location(&self, key: &str) -> Result<Path, SinkError> {
        let full = match &self.prefix {
            Some(p) if !p.as_ref().is_empty() => format!("{}/{}", p.as_ref(), key),
            _ => key.to_owned(),
        };
        Path::parse(full).map_err(|e| SinkError::Other(e.into()))
    }
}

enum Upload {
    Single { chunks: Vec<Bytes>, len: usize },
    Multi(WriteMultipart),
}

struct StoreWriter {
    store: Arc<dyn ObjectStore>,
    location: Path,
    upload: Upload,
    limit: usize,
    concurrency: usize,
    if_absent: bool,
}

impl Sink for ObjectStoreSink {
    fn name(&self) -> &str {
        "object-store"
    }

    fn begin<'a>(
        &'a self,
        info: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<Box<dyn SinkWriter>, SinkError>> {
        Box::pin(async move {
            let location = self.location(info.key.as_str())?;
            let small = info
                .content_length
                .is_some_and(|n| n <= self.part_size as u64);
            let upload = if small {
                Upload::Single {
                    chunks: Vec::new(),
                    len: 0,
                }
            } else {
                let up = self
                    .store
                    .put_multipart(&location)
                    .await
                    .map_err(|e| SinkError::Other(e.into()))?;
                Upload::Multi(WriteMultipart::new_with_chunk_size(up, self.part_size))
            };
            let w: Box<dyn SinkWriter> = Box::new(StoreWriter {
                store: self.store.clone(),
                location,
                upload,
                limit: self.part_size,
                concurrency: self.concurrency,
                if_absent: self.if_absent,
            });
            Ok(w)
        })
    }
}

impl SinkWriter for StoreWriter {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            match &mut self.upload {
                Upload::Single { chunks, len } => {
                    *len += chunk.len();
                    if *len > self.limit {
                        // The tee enforces Content-Length, so this only guards the memory bound.
                        return Err(SinkError::TooLarge {
                            limit: self.limit as u64,
                        });
                    }
                    chunks.push(chunk);
                }
                Upload::Multi(w) => {
                    w.wait_for_capacity(self.concurrency)
                        .await
                        .map_err(|e| SinkError::Other(e.into()))?;
                    w.put(chunk);
                }
            }
            Ok(())
        })
    }

    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), SinkError>> {
        Box::pin(async move {
            let StoreWriter {
                store,
                location,
                upload,
                if_absent,
                ..
            } = *self;
            match upload {
                Upload::Single { chunks, .. } => {
                    let payload: PutPayload = chunks.into_iter().collect();
                    let mode = if if_absent {
                        PutMode::Create
                    } else {
                        PutMode::Overwrite
                    };
                    match store
                        .put_opts(&location, payload, PutOptions::from(mode))
                        .await
                    {
                        Ok(_) => Ok(()),
                        Err(object_store::Error::AlreadyExists { .. }) if if_absent => Ok(()),
                        Err(e) => Err(SinkError::Other(e.into())),
                    }
                }
                Upload::Multi(w) => w
                    .finish()
                    .await
                    .map(|_| ())
                    .map_err(|e| SinkError::Other(e.into())),
            }
        })
    }

    fn held_bytes(&self) -> u64 {
        // Single uploads keep every chunk until the `PUT` succeeds, through all of
        // `object_store`'s retries; multipart uploads hold at most `part_size ×
        // (concurrency + 1)` and release it as parts complete.
        match &self.upload {
            Upload::Single { len, .. } => *len as u64,
            Upload::Multi(_) => 0,
        }
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Upload::Multi(w) = self.upload {
                if let Err(e) = w.abort().await {
                    tracing::warn!(error = %e, location = %self.location, "multipart abort failed");
                }
            }
        })
    }
}
