use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::error::KeyError;
use super::future::{Plan, ResponseFuture};
use super::key::ObjectKey;
use super::layer::SinkSlot;
use super::layer::{BackupEvent, BackupOutcome, Candidate, Config, TeeLayer};
use super::sink::ObjectInfo;
use crate::body::tee::{outlet_in, AbortReason, ByteBudget, Inlet, NextBatch, TeeBody, TeeOptions};
use crate::fields::content_length;

/// Whether a response is being backed up, as a response extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupStatus {
    /// Copies to the sinks started under this key.
    Started(ObjectKey),
    /// The key derived from the request was refused: served, not backed up.
    InvalidKey(KeyError),
}

/// The service made by [`TeeLayer`].
#[derive(Clone)]
pub struct Tee<S> {
    inner: S,
    cfg: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for Tee<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tee")
            .field("inner", &self.inner)
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl<S> Tee<S> {
    pub(crate) fn from_parts(inner: S, cfg: Arc<Config>) -> Self {
        Tee { inner, cfg }
    }

    /// Wraps `inner` with the configuration of `layer`.
    pub fn new(inner: S, layer: &TeeLayer) -> Self {
        Tee::from_parts(inner, layer.cfg.clone())
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Tee<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes> + Send + 'static,
{
    type Response = Response<TeeBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        if self.cfg.sinks.is_empty() || !self.cfg.methods.contains(req.method()) {
            return ResponseFuture::new(self.inner.call(req), Plan::None);
        }
        let (parts, body) = req.into_parts();
        let plan = match self.cfg.name_rule.key(&parts) {
            None => Plan::None,
            Some(Ok(key)) => Plan::Backup {
                key,
                method: parts.method.clone(),
                authority: crate::cache::request_authority(&parts),
                cfg: self.cfg.clone(),
                paced: parts.extensions.get::<super::BackfillFetch>().is_some(),
            },
            Some(Err(e)) => {
                self.cfg.stats.rejected_keys.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, path = parts.uri.path(), "backup skipped: invalid object key");
                Plan::Rejected(e)
            }
        };
        ResponseFuture::new(self.inner.call(Request::from_parts(parts, body)), plan)
    }
}

/// Decides on a response and, if it is to be copied, starts one task per sink.
pub(crate) fn start<B>(
    res: Response<B>,
    key: ObjectKey,
    method: &http::Method,
    authority: Option<String>,
    cfg: &Arc<Config>,
    paced: bool,
) -> Response<TeeBody<B>>
where
    B: Body<Data = Bytes> + Send + 'static,
{
    let (mut parts, body) = res.into_parts();
    let len = content_length(&parts.headers);
    let hint = body.size_hint();
    let candidate = Candidate {
        method,
        key: &key,
        status: parts.status,
        headers: &parts.headers,
        content_length: len,
        body_empty: body.is_end_stream() || hint.exact() == Some(0) || len == Some(0),
    };
    if !(cfg.predicate)(&candidate) || tokio::runtime::Handle::try_current().is_err() {
        return Response::from_parts(parts, TeeBody::passthrough(body));
    }
    let info = Arc::new(ObjectInfo {
        key: key.clone(),
        status: parts.status,
        headers: parts.headers.clone(),
        content_length: len,
        authority,
    });
    let mut outlets = Vec::with_capacity(cfg.sinks.len());
    for slot in &cfg.sinks {
        // A sink that stalls collects copies that wait for it; past the limit, skip (the
        // client is never slowed, the skip is counted).
        let Some(pending) = slot.try_begin() else {
            // Counted always; logged on the 1st, 2nd, 4th, 8th… skip so a long stall
            // cannot flood the log.
            let n = cfg.stats.skipped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    key = %info.key,
                    sink = &*slot.name,
                    skipped = n,
                    "backup skipped: too many copies pending on this sink"
                );
            }
            continue;
        };
        let (out, inlet) = outlet_in(cfg.buffer, slot.budget.clone());
        outlets.push(out);
        cfg.stats.started.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(drive(
            slot.clone(),
            pending,
            info.clone(),
            inlet,
            cfg.clone(),
        ));
    }
    parts.extensions.insert(BackupStatus::Started(key));
    let opts = TeeOptions {
        expected_len: len,
        on_disconnect: cfg.on_disconnect,
        stats: Some(cfg.stats.tee.clone()),
        drain_budget: cfg.drain_budget.clone(),
    };
    // A backup is stored only at its end: its chunks may go to the sink in batches.
    let tee = TeeBody::new(body, outlets, &opts)
        .paced(paced)
        .batched(true);
    Response::from_parts(parts, tee)
}

/// Bytes a writer keeps after `write` ([`SinkWriter::held_bytes`](super::SinkWriter::held_bytes)),
/// charged to the sink's budget; returned when the copy ends, however it ends.
struct Held<'a> {
    budget: &'a ByteBudget,
    n: u64,
}

/// Held bytes are charged in steps of this much: a writer's buffer grows with every chunk,
/// and one budget update per chunk was a read-modify-write on a counter that every copy
/// to the sink shares. The charge is never below what the writer holds.
const HELD_STEP: u64 = 256 << 10;

impl Held<'_> {
    /// Moves the charge to cover `now` bytes; `false` if the budget cannot take the growth.
    fn update(&mut self, now: u64) -> bool {
        if now > self.n {
            // Up to the next step; near the limit, only what is held.
            let ahead = now.div_ceil(HELD_STEP).saturating_mul(HELD_STEP);
            if self.budget.try_charge(ahead - self.n) {
                self.n = ahead;
            } else if self.budget.try_charge(now - self.n) {
                self.n = now;
            } else {
                return false;
            }
        } else if now.saturating_add(HELD_STEP) <= self.n {
            let keep = now.div_ceil(HELD_STEP).saturating_mul(HELD_STEP);
            self.budget.release(self.n - keep);
            self.n = keep;
        }
        true
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.release(self.n);
    }
}

/// Feeds one sink from its inlet and records how the copy ended.
async fn drive(
    slot: SinkSlot,
    pending: super::layer::PendingCopy,
    info: Arc<ObjectInfo>,
    mut inlet: Inlet,
    cfg: Arc<Config>,
) {
    let _pending = pending;
    let name = slot.name.clone();
    let stats = &cfg.stats;
    let mut held = Held {
        budget: &slot.budget,
        n: 0,
    };
    let outcome = match slot.sink.begin(&info).await {
        Err(e) => BackupOutcome::Failed(Arc::new(e)),
        Ok(mut w) => {
            let mut bytes = 0u64;
            loop {
                // Whole batches: one write call and one budget update per batch.
                match inlet.next_batch().await {
                    NextBatch::Data(chunks) => {
                        let n: u64 = chunks.iter().map(|c| c.len() as u64).sum();
                        if let Err(e) = w.write_batch(chunks).await {
                            // Stop receiving first so the tee stops queueing for us.
                            drop(inlet);
                            w.abort().await;
                            break BackupOutcome::Failed(Arc::new(e));
                        }
                        if !held.update(w.held_bytes()) {
                            drop(inlet);
                            w.abort().await;
                            let limit = slot.budget.limit();
                            stats.tee.count_budget_abort();
                            break BackupOutcome::Aborted(AbortReason::BudgetExceeded { limit });
                        }
                        bytes += n;
                    }
                    NextBatch::End => {
                        drop(inlet);
                        break match w.commit().await {
                            Ok(()) => BackupOutcome::Committed { bytes },
                            Err(e) => BackupOutcome::Failed(Arc::new(e)),
                        };
                    }
                    NextBatch::Abort(reason) => {
                        drop(inlet);
                        w.abort().await;
                        break BackupOutcome::Aborted(reason);
                    }
                }
            }
        }
    };
    crate::telemetry::backup(&outcome);
    match &outcome {
        BackupOutcome::Committed { bytes } => {
            stats.committed.fetch_add(1, Ordering::Relaxed);
            stats.committed_bytes.fetch_add(*bytes, Ordering::Relaxed);
            tracing::info!(key = %info.key, sink = &*name, bytes, "backup committed");
        }
        BackupOutcome::Aborted(reason) => {
            stats.aborted.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(key = %info.key, sink = &*name, %reason, "backup aborted");
            // The sink could not keep up with the client: not lost, re-fetched later at
            // the sink's pace, when a back-fill queue is configured.
            let too_slow = matches!(
                reason,
                AbortReason::Overflow { .. } | AbortReason::BudgetExceeded { .. }
            );
            if too_slow {
                if let Some(q) = &cfg.backfill {
                    if q.push(info.key.clone()) {
                        stats.handed_to_backfill.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(key = %info.key, sink = &*name, "backup handed to back-fill");
                    }
                }
            }
        }
        BackupOutcome::Failed(e) => {
            stats.sink_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(key = %info.key, sink = &*name, error = %e, source = ?std::error::Error::source(&**e), "backup sink failed");
        }
    }
    if cfg.events.receiver_count() > 0 {
        let _ = cfg.events.send(BackupEvent {
            key: info.key.clone(),
            sink: name,
            outcome,
        });
    }
}
