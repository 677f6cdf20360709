//! The cache store as a backup sink: one tee, three pipes (client, storage, cache).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::policy;
use super::store::{CachedResponse, Store};
use crate::backup::{ObjectInfo, Sink, SinkError, SinkWriter};

/// Fills a cache [`Store`] from a [`TeeLayer`](crate::backup::TeeLayer), next to the
/// storage sinks, so the one download from outside feeds the client, the storage and the
/// edge cache at once (the seed's three pipes).
///
/// The entry is stored under the request's authority + `/` + the object key, which is
/// what [`authority_key`](super::authority_key) gives for the same request without a
/// query. Freshness comes from the response headers like in [`CacheLayer`](super::CacheLayer);
/// an uncacheable response is not stored (the sink's copy ends with an error event).
#[derive(Clone)]
pub struct StoreSink {
    store: Arc<dyn Store>,
    default_ttl: Option<Duration>,
}

impl std::fmt::Debug for StoreSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSink")
            .field("default_ttl", &self.default_ttl)
            .finish()
    }
}

impl StoreSink {
    /// A sink filling `store` (share the same store with a [`CacheLayer`](super::CacheLayer)).
    pub fn new(store: Arc<dyn Store>) -> Self {
        StoreSink {
            store,
            default_ttl: None,
        }
    }

    /// Lifetime of responses without `Cache-Control`/`Expires` (default: not stored).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = Some(ttl);
        self
    }
}

struct StoreWriter {
    store: Arc<dyn Store>,
    key: String,
    entry: CachedResponse,
    len: u64,
    max: u64,
}

impl Sink for StoreSink {
    fn name(&self) -> &str {
        "cache"
    }

    fn begin<'a>(
        &'a self,
        info: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<Box<dyn SinkWriter>, SinkError>> {
        let max = self.store.max_entry_size();
        let result = match policy::freshness(&info.headers, self.default_ttl) {
            _ if !policy::cacheable_status(info.status) => Err(uncacheable()),
            None => Err(uncacheable()),
            Some(_) if info.content_length.is_some_and(|l| l > max) => {
                Err(SinkError::TooLarge { limit: max })
            }
            Some(ttl) => {
                let mut headers = info.headers.clone();
                let initial_age = policy::initial_age(&headers);
                headers.remove(http::header::AGE);
                let w: Box<dyn SinkWriter> = Box::new(StoreWriter {
                    store: self.store.clone(),
                    key: format!("{}/{}", info.authority.as_deref().unwrap_or(""), info.key),
                    entry: CachedResponse {
                        status: info.status,
                        headers,
                        body: Vec::new(),
                        stored_at: Instant::now(),
                        fresh_for: ttl,
                        initial_age,
                    },
                    len: 0,
                    max,
                });
                Ok(w)
            }
        };
        Box::pin(async move { result })
    }
}

fn uncacheable() -> SinkError {
    SinkError::Other("response is not cacheable".into())
}

impl SinkWriter for StoreWriter {
    fn write(&mut self, chunk: Bytes) -> BoxFuture<'_, Result<(), SinkError>> {
        self.len += chunk.len() as u64;
        let res = if self.len > self.max {
            Err(SinkError::TooLarge { limit: self.max })
        } else {
            self.entry.body.push(chunk);
            Ok(())
        };
        Box::pin(async move { res })
    }

    fn commit(self: Box<Self>) -> BoxFuture<'static, Result<(), SinkError>> {
        let StoreWriter {
            store, key, entry, ..
        } = *self;
        let res = if store.put(&key, entry) {
            Ok(())
        } else {
            Err(SinkError::TooLarge {
                limit: store.max_entry_size(),
            })
        };
        Box::pin(async move { res })
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}
