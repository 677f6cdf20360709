//! Issue 12: a backup copy must keep up with a fast client, and when a sink still cannot,
//! the object is handed to a paced back-fill instead of being lost.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use common::*;
use futures_util::future::BoxFuture;
use http::{header, Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use tokio::sync::watch;
use tower::{service_fn, ServiceBuilder};
use tower_patterns::backup::{
    backfill, BackfillQueue, BackupOutcome, FsSink, FsyncPolicy, ObjectInfo, Sink, SinkError,
    SinkWriter, TeeLayer,
};
use tower_patterns::body::tee::AbortReason;
use tower_patterns::proxy::ForwardBuilder;

async fn origin() -> SocketAddr {
    let svc = service_fn(|req: Request<Incoming>| async move {
        let n: u64 = req
            .uri()
            .path()
            .strip_prefix("/big/")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Ok::<_, Infallible>(
            Response::builder()
                .header(header::CONTENT_LENGTH, n)
                .body(pattern_body(n))
                .unwrap(),
        )
    });
    spawn_server(svc).await
}

/// A sink whose copies wait in `begin` until the gate opens: it cannot keep up at all.
struct Gated<S> {
    inner: S,
    gate: watch::Receiver<bool>,
}

impl<S: Sink> Sink for Gated<S> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn begin<'a>(
        &'a self,
        info: &'a ObjectInfo,
    ) -> BoxFuture<'a, Result<Box<dyn SinkWriter>, SinkError>> {
        Box::pin(async move {
            let mut gate = self.gate.clone();
            let _ = gate.wait_for(|open| *open).await;
            self.inner.begin(info).await
        })
    }
}

/// Checks a stored file against the pattern the origin sends.
fn assert_pattern_file(path: &std::path::Path, size: u64) {
    let data = std::fs::read(path).unwrap();
    assert_eq!(data.len() as u64, size, "stored size");
    let mut check = PatternCheck::default();
    check.feed(&data);
    assert!(check.ok, "stored bytes differ from what the origin sent");
}

/// Downloads `/big/{size}` through `edge` as fast as the client can read, checking bytes.
async fn download(edge: SocketAddr, size: u64) {
    let res = get(edge, &format!("/big/{size}")).await;
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut check = PatternCheck::default();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            check.feed(&data);
        }
    }
    assert_eq!(check.offset, size);
    assert!(check.ok, "client got wrong bytes");
}

/// The in-process service the back-fill goes through: the same layer, its own forwarder.
fn backfill_svc(
    origin: SocketAddr,
    layer: &TeeLayer,
) -> impl tower::Service<
    Request<Empty<Bytes>>,
    Response = Response<
        impl http_body::Body<Data = Bytes, Error = impl Into<tower_patterns::BoxError>>,
    >,
    Error = impl Into<tower_patterns::BoxError>,
> + Clone {
    let fwd = ForwardBuilder::new(format!("http://{origin}"))
        .build::<Empty<Bytes>>()
        .unwrap();
    ServiceBuilder::new().layer(layer.clone()).service(fwd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_lost_to_a_slow_sink_is_handed_to_backfill_and_then_stored() {
    const SIZE: u64 = 32 << 20;
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let (open, gate) = watch::channel(false);
    let queue = BackfillQueue::new(16);
    let layer = TeeLayer::builder()
        .sink(Gated {
            inner: FsSink::new(dir.path()).fsync(FsyncPolicy::Never),
            gate,
        })
        .buffer(1 << 20)
        .backfill_queue(queue.clone())
        .build();
    let mut events = Events::new(layer.subscribe());
    let stats = layer.stats().clone();
    let fwd = ForwardBuilder::new(format!("http://{origin}"))
        .build::<Incoming>()
        .unwrap();
    let edge = spawn_server(ServiceBuilder::new().layer(layer.clone()).service(fwd)).await;

    // The sink is stuck: the client is not held back, the copy overflows...
    download(edge, SIZE).await;
    // (the copy learns it once its `begin` returns)
    open.send(true).unwrap();
    let key = format!("big/{SIZE}");
    let ev = events.wait(&key, "fs").await;
    assert!(
        matches!(
            ev.outcome,
            BackupOutcome::Aborted(AbortReason::Overflow { .. })
        ),
        "{:?}",
        ev.outcome
    );
    // ...and is not lost: its key waits for a back-fill.
    assert_eq!(stats.snapshot().handed_to_backfill, 1);
    assert!(!dir.path().join(&key).exists());
    let keys = queue.take_all();
    assert_eq!(
        keys.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
        vec![key.as_str()]
    );

    // The back-fill reads at the sink's pace (the same 1 MiB buffer): it cannot overflow.
    let report = backfill(backfill_svc(origin, &layer), keys, 1).await;
    assert_eq!(report.done.len(), 1, "{report}");
    let ev = events.wait(&key, "fs").await;
    assert!(
        matches!(ev.outcome, BackupOutcome::Committed { bytes } if bytes == SIZE),
        "{:?}",
        ev.outcome
    );
    assert_pattern_file(&dir.path().join(&key), SIZE);
    let snap = stats.snapshot();
    assert_eq!(snap.tee.overflows, 1, "only the first copy overflowed");
    assert_eq!(snap.committed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_client_256_mib_backup_is_complete_or_backfilled_never_lost() {
    const SIZE: u64 = 256 << 20;
    let origin = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let queue = BackfillQueue::new(16);
    // A small buffer: whether the disk keeps up with loopback depends on the machine.
    let layer = TeeLayer::builder()
        .sink(FsSink::new(dir.path()).fsync(FsyncPolicy::Never))
        .buffer(2 << 20)
        .sink_budget(16 << 20)
        .backfill_queue(queue.clone())
        .build();
    let mut events = Events::new(layer.subscribe());
    let stats = layer.stats().clone();
    let fwd = ForwardBuilder::new(format!("http://{origin}"))
        .build::<Incoming>()
        .unwrap();
    let edge = spawn_server(ServiceBuilder::new().layer(layer.clone()).service(fwd)).await;

    download(edge, SIZE).await;
    let key = format!("big/{SIZE}");
    let ev = events.wait(&key, "fs").await;
    match ev.outcome {
        BackupOutcome::Committed { bytes } => {
            assert_eq!(bytes, SIZE);
            assert!(queue.is_empty());
        }
        BackupOutcome::Aborted(
            AbortReason::Overflow { .. } | AbortReason::BudgetExceeded { .. },
        ) => {
            assert_eq!(stats.snapshot().handed_to_backfill, 1);
            let report = backfill(backfill_svc(origin, &layer), queue.take_all(), 1).await;
            assert_eq!(report.done.len(), 1, "{report}");
            let ev = events.wait(&key, "fs").await;
            assert!(
                matches!(ev.outcome, BackupOutcome::Committed { bytes } if bytes == SIZE),
                "{:?}",
                ev.outcome
            );
        }
        other => panic!("copy lost: {other:?}"),
    }
    assert_pattern_file(&dir.path().join(&key), SIZE);
    let snap = stats.snapshot();
    assert_eq!(snap.committed, 1);
    assert_eq!(
        snap.aborted, snap.handed_to_backfill,
        "every abort was handed on"
    );
}
