//! The `Sink` contract and the in-memory sink.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, StatusCode};

use super::error::SinkError;
use super::key::ObjectKey;

/// What a sink knows about the object it is about to receive.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    /// Where to store it.
    pub key: ObjectKey,
    /// The upstream response's status.
    pub status: StatusCode,
    /// The upstream response's headers (after the inner service's processing).
    pub headers: HeaderMap,
    /// `Content-Length`, when the response had one; the tee already enforces it.
    pub content_length: Option<u64>,
    /// The request's authority (`Host` header or URI authority), lower-cased, if any:
    /// what a sink that serves several sites (a cache) needs to keep them apart.
    pub authority: Option<String>,
}

/// A destination for copies of response bodies: a directory, a bucket, a cache.
///
/// For each response the layer calls [`Sink::begin`], then [`SinkWriter::write`] for every
/// chunk in order, then exactly one of [`SinkWriter::commit`] (the whole body arrived, with
/// the right length) or [`SinkWriter::abort`] (anything else). A writer dropped without
/// either (runtime shutdown) must not leave a visible object either. The chunks are
/// [`Bytes`] shared with the client's copy: keeping them costs no copy.
///
/// An error from any method abandons only this sink's copy; the client and the other sinks
/// go on.
pub trait Sink: Send + Sync + 'static {
    /// A short name for logs and events.
    fn name(&self) -> &str;

    /// Starts a copy of the object described by `info`.
    fn begin<'a>(
        &'a self,
        info: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<Box<dyn SinkWriter>, SinkError>>;
}

/// One copy in progress. See [`Sink`].
pub trait SinkWriter: Send {
    /// Appends a chunk.
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), SinkError>>;

    /// Appends several chunks, in order: what the layer calls with each batch the tee
    /// hands over (up to a quarter of the sink's buffer, at most 256 KiB). The default
    /// calls [`write`](Self::write) for each; a writer that gathers chunks anyway should
    /// take the whole batch, so a copy costs one boxed future per batch, not per chunk.
    fn write_batch(&mut self, chunks: Vec<Bytes>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            for c in chunks {
                self.write(c).await?;
            }
            Ok(())
        })
    }

    /// Makes the object visible, atomically.
    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), SinkError>>;

    /// Discards what was written.
    fn abort(self: Box<Self>) -> BoxFuture<'static, ()>;

    /// Bytes of written chunks this writer still keeps in memory (a buffered upload that
    /// waits for its commit). They are charged to the sink's byte budget until the copy
    /// ends, so a sink whose uploads hang cannot hold unbounded memory. Default `0`: the
    /// writer keeps nothing after `write` returns.
    fn held_bytes(&self) -> u64 {
        0
    }
}

impl<S: Sink + ?Sized> Sink for Arc<S> {
    fn name(&self) -> &str {
        (**self).name()
    }

    fn begin<'a>(
        &'a self,
        info: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<Box<dyn SinkWriter>, SinkError>> {
        (**self).begin(info)
    }
}

/// A committed object of a [`MemorySink`].
#[derive(Debug, Clone)]
pub struct StoredObject {
    /// The body, as the chunks that arrived.
    pub chunks: Vec<Bytes>,
    /// The response headers.
    pub headers: HeaderMap,
}

impl StoredObject {
    /// The body in one piece (copies).
    pub fn to_bytes(&self) -> Bytes {
        let len = self.chunks.iter().map(Bytes::len).sum();
        let mut v = Vec::with_capacity(len);
        for c in &self.chunks {
            v.extend_from_slice(c);
        }
        Bytes::from(v)
    }

    /// Body length.
    pub fn len(&self) -> u64 {
        self.chunks.iter().map(|c| c.len() as u64).sum()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A sink that keeps committed objects in memory: for tests and examples. Only committed
/// objects are visible.
#[derive(Clone, Default)]
pub struct MemorySink {
    name: Arc<str>,
    objects: Arc<Mutex<HashMap<ObjectKey, StoredObject>>>,
}

impl fmt::Debug for MemorySink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySink")
            .field("name", &self.name)
            .field("objects", &self.len())
            .finish()
    }
}

impl MemorySink {
    /// An empty sink called `name`.
    pub fn new(name: &str) -> Self {
        MemorySink {
            name: Arc::from(name),
            objects: Arc::default(),
        }
    }

    /// The committed object under `key`.
    pub fn get(&self, key: &str) -> Option<StoredObject> {
        let key = ObjectKey::new(key).ok()?;
        self.lock().get(&key).cloned()
    }

    /// The committed keys, sorted.
    pub fn keys(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    /// Number of committed objects.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was committed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, StoredObject>> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct MemoryWriter {
    sink: MemorySink,
    key: ObjectKey,
    headers: HeaderMap,
    chunks: Vec<Bytes>,
}

impl Sink for MemorySink {
    fn name(&self) -> &str {
        &self.name
    }

    fn begin<'a>(
        &'a self,
        info: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<Box<dyn SinkWriter>, SinkError>> {
        let w: Box<dyn SinkWriter> = Box::new(MemoryWriter {
            sink: self.clone(),
            key: info.key.clone(),
            headers: info.headers.clone(),
            chunks: Vec::new(),
        });
        Box::pin(async move { Ok(w) })
    }
}

impl SinkWriter for MemoryWriter {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), SinkError>> {
        self.chunks.push(chunk);
        Box::pin(async { Ok(()) })
    }

    fn write_batch(&mut self, chunks: Vec<Bytes>) -> BoxFuture<'_, Result<(), SinkError>> {
        if self.chunks.is_empty() {
            self.chunks = chunks;
        } else {
            self.chunks.extend(chunks);
        }
        Box::pin(async { Ok(()) })
    }

    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), SinkError>> {
        let MemoryWriter {
            sink,
            key,
            headers,
            chunks,
        } = *self;
        sink.lock().insert(key, StoredObject { chunks, headers });
        Box::pin(async { Ok(()) })
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}
