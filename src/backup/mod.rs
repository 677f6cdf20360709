//! Backup pipe: copy what the outside origin serves into storage while serving it.
//!
//! **The problem (seed 000, M2 backup pipe).** Content that lives outside cannot be served
//! from storage until a batch migration has copied all of it, a batch misses changes, and
//! nobody knows when it will finish. The pattern: serve the outside content at once, and
//! split its download stream into pipes — the client, a storage backup, the edge cache —
//! so storage fills in the order users ask. What nobody asks for is fetched by a
//! [back-fill](backfill()).
//!
//! [`TeeLayer`] wraps the service that fetches from outside (in a content chain, the link
//! taken on `404`). Each response body is a [`TeeBody`](crate::body::tee::TeeBody) that
//! streams to the client and copies every chunk to each [`Sink`]: [`FsSink`] (a
//! directory), `ObjectStoreSink` (feature `object-store`: S3/GCS/Azure), [`MemorySink`]
//! (tests), or your own.
//!
//! ```
//! use tower::{service_fn, ServiceBuilder, ServiceExt};
//! use tower_patterns::backup::{FsSink, FsyncPolicy, TeeLayer};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let dir = std::env::temp_dir().join(format!("tee-doc-{}", std::process::id()));
//! let layer = TeeLayer::builder()
//!     .sink(FsSink::new(&dir).fsync(FsyncPolicy::Never))
//!     .buffer(1 << 20)
//!     .build();
//! let mut events = layer.subscribe();
//! let outside = service_fn(|_req: http::Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
//!         bytes::Bytes::from("from outside"),
//!     )))
//! });
//! let svc = ServiceBuilder::new().layer(layer).service(outside);
//! let res = svc.oneshot(http::Request::get("/img/a.txt").body(()).unwrap()).await.unwrap();
//! let body = http_body_util::BodyExt::collect(res.into_body()).await.unwrap().to_bytes();
//! assert_eq!(body, "from outside");
//! let ev = events.recv().await.unwrap(); // the copy committed
//! assert_eq!(std::fs::read(dir.join("img/a.txt")).unwrap(), b"from outside");
//! # let _ = (ev, std::fs::remove_dir_all(&dir));
//! # });
//! ```
//!
//! | question | behaviour |
//! |---|---|
//! | which responses | `GET` ([`TeeLayerBuilder::methods`]) whose [`Candidate`] passes the predicate: default status `200` with a non-empty body |
//! | object key | request path, percent-decoded, leading `/` removed ([`PathKey`]); any [`NameRule`] may replace it |
//! | bad key (`..`, absolute, control chars, empty, under the reserved `.tmp/`) | served normally, not backed up; [`BackupStatus::InvalidKey`] extension, `rejected_keys` counter, `warn` event |
//! | slow sink | the client never waits; a copy more than `buffer` bytes behind is aborted (`overflows`) and, with a [`BackfillQueue`], its key queued for a [`backfill`](backfill()) that reads at the sink's pace (`handed_to_backfill`) |
//! | stalled sink | all copies to one sink share [`TeeLayerBuilder::sink_budget`] bytes (queued + [`SinkWriter::held_bytes`]); past it a copy is aborted (`budget_aborts`); past [`TeeLayerBuilder::max_pending_copies`] new copies are skipped (`skipped`) |
//! | sink error | that sink's copy ends (`sink_errors`); client and other sinks go on |
//! | commit | only after the whole body, with the length of `Content-Length` if present |
//! | truncated / failed upstream | every copy is discarded: storage never holds a partial object |
//! | client leaves early | default: keep reading upstream in the background up to 256 MiB / 60 s, then commit, within the process-wide [`DrainBudget`](crate::body::tee::DrainBudget); or [`DisconnectPolicy::Abort`](crate::body::tee::DisconnectPolicy::Abort) |
//! | observability | `tracing` events (committed / aborted / failed), [`BackupStats`], [`TeeLayer::subscribe`] |

mod backfill;
mod error;
mod fs;
mod future;
mod key;
mod layer;
#[cfg(feature = "object-store")]
mod object_store;
mod service;
mod sink;

#[cfg(feature = "object-store")]
pub use self::object_store::ObjectStoreSink;
pub use backfill::{backfill, BackfillFetch, BackfillQueue, BackfillReport};
pub use error::{BackfillError, KeyError, SinkError};
pub use fs::{FsSink, FsyncPolicy};
pub use future::ResponseFuture;
pub use key::{FnKey, NameRule, ObjectKey, PathKey, RESERVED_DIR};
pub use layer::{
    default_predicate, BackupEvent, BackupOutcome, BackupStats, BackupStatsSnapshot, Candidate,
    TeeLayer, TeeLayerBuilder,
};
pub use service::{BackupStatus, Tee};
pub use sink::{MemorySink, ObjectInfo, Sink, SinkWriter, StoredObject};
