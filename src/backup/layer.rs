use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use http::{HeaderMap, Method, StatusCode};
use tokio::sync::broadcast;
use tower_layer::Layer;

use super::backfill::BackfillQueue;
use super::error::SinkError;
use super::key::{NameRule, ObjectKey, PathKey};
use super::service::Tee;
use super::sink::Sink;
use crate::body::tee::{
    AbortReason, ByteBudget, DisconnectPolicy, DrainBudget, TeeStats, TeeStatsSnapshot,
};

/// What the backup predicate sees of a response.
#[derive(Debug)]
#[non_exhaustive]
pub struct Candidate<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The object key the response would be stored under.
    pub key: &'a ObjectKey,
    /// The response status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: &'a HeaderMap,
    /// `Content-Length`, if present and valid.
    pub content_length: Option<u64>,
    /// Whether the body is known to be empty.
    pub body_empty: bool,
}

/// The default predicate: `GET`, status `200`, a body that is not known to be empty.
pub fn default_predicate(c: &Candidate<'_>) -> bool {
    c.method == Method::GET && c.status == StatusCode::OK && !c.body_empty
}

type Predicate = dyn Fn(&Candidate<'_>) -> bool + Send + Sync;

/// How one sink's copy of one object ended, as broadcast by [`TeeLayer::subscribe`].
#[derive(Debug, Clone)]
pub enum BackupOutcome {
    /// The object is stored.
    Committed {
        /// Its size.
        bytes: u64,
    },
    /// The copy was abandoned by the tee; nothing was stored.
    Aborted(AbortReason),
    /// The sink failed; nothing was stored.
    Failed(Arc<SinkError>),
}

/// One sink's result for one object.
#[derive(Debug, Clone)]
pub struct BackupEvent {
    /// The object key.
    pub key: ObjectKey,
    /// The sink's [`Sink::name`].
    pub sink: Arc<str>,
    /// What happened.
    pub outcome: BackupOutcome,
}

/// Counters of a [`TeeLayer`] (atomics; read with [`BackupStats::snapshot`]).
#[derive(Debug, Default)]
pub struct BackupStats {
    pub(crate) tee: Arc<TeeStats>,
    pub(crate) started: AtomicU64,
    pub(crate) committed: AtomicU64,
    pub(crate) committed_bytes: AtomicU64,
    pub(crate) aborted: AtomicU64,
    pub(crate) sink_errors: AtomicU64,
    pub(crate) rejected_keys: AtomicU64,
    pub(crate) skipped: AtomicU64,
    pub(crate) handed_to_backfill: AtomicU64,
}

/// A point-in-time copy of [`BackupStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackupStatsSnapshot {
    /// Sink copies started (one per sink per backed-up response).
    pub started: u64,
    /// Copies committed.
    pub committed: u64,
    /// Bytes committed.
    pub committed_bytes: u64,
    /// Copies abandoned by the tee (overflow, upstream error, length, client gone).
    pub aborted: u64,
    /// Copies that failed in the sink.
    pub sink_errors: u64,
    /// Responses not backed up because their key was invalid.
    pub rejected_keys: u64,
    /// Copies not started because their sink already had
    /// [`TeeLayerBuilder::max_pending_copies`] copies pending (a stalled sink).
    pub skipped: u64,
    /// Copies lost to a sink too slow for the client (overflow, byte budget) whose key was
    /// queued for a paced back-fill ([`TeeLayerBuilder::backfill_queue`]).
    pub handed_to_backfill: u64,
    /// The tee's own counters (buffer use, abort causes).
    pub tee: TeeStatsSnapshot,
}

impl BackupStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> BackupStatsSnapshot {
        let r = Ordering::Relaxed;
        BackupStatsSnapshot {
            started: self.started.load(r),
            committed: self.committed.load(r),
            committed_bytes: self.committed_bytes.load(r),
            aborted: self.aborted.load(r),
            sink_errors: self.sink_errors.load(r),
            rejected_keys: self.rejected_keys.load(r),
            skipped: self.skipped.load(r),
            handed_to_backfill: self.handed_to_backfill.load(r),
            tee: self.tee.snapshot(),
        }
    }
}

/// One sink with the limits shared by all its copies.
#[derive(Clone)]
pub(crate) struct SinkSlot {
    pub(crate) name: Arc<str>,
    pub(crate) sink: Arc<dyn Sink>,
    /// Bytes queued for (or kept by) this sink's copies, all together.
    pub(crate) budget: Arc<ByteBudget>,
    pending: Arc<AtomicUsize>,
    max_pending: usize,
}

/// A copy counted as pending on its sink until dropped.
pub(crate) struct PendingCopy(Arc<AtomicUsize>);

impl Drop for PendingCopy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl SinkSlot {
    /// Counts one more pending copy, unless `max_pending` are already running.
    pub(crate) fn try_begin(&self) -> Option<PendingCopy> {
        let max = self.max_pending;
        self.pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(PendingCopy(self.pending.clone()))
    }
}

pub(crate) struct Config {
    pub(crate) sinks: Vec<SinkSlot>,
    pub(crate) buffer: usize,
    pub(crate) methods: Vec<Method>,
    pub(crate) predicate: Arc<Predicate>,
    pub(crate) name_rule: Arc<dyn NameRule>,
    pub(crate) on_disconnect: DisconnectPolicy,
    pub(crate) drain_budget: Option<Arc<DrainBudget>>,
    pub(crate) stats: Arc<BackupStats>,
    pub(crate) events: broadcast::Sender<BackupEvent>,
    pub(crate) backfill: Option<BackfillQueue>,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field(
                "sinks",
                &self.sinks.iter().map(|s| &*s.name).collect::<Vec<_>>(),
            )
            .field("buffer", &self.buffer)
            .field("methods", &self.methods)
            .field("on_disconnect", &self.on_disconnect)
            .finish()
    }
}

/// Copies upstream response bodies to sinks while they stream to the client: the backup
/// pipe. See the [module docs](super).
#[derive(Clone, Debug)]
pub struct TeeLayer {
    pub(crate) cfg: Arc<Config>,
}

/// Builds a [`TeeLayer`].
pub struct TeeLayerBuilder {
    sinks: Vec<(Arc<str>, Arc<dyn Sink>)>,
    buffer: usize,
    methods: Vec<Method>,
    predicate: Arc<Predicate>,
    name_rule: Arc<dyn NameRule>,
    on_disconnect: DisconnectPolicy,
    sink_budget: u64,
    max_pending: usize,
    drain_budget: Option<Arc<DrainBudget>>,
    backfill: Option<BackfillQueue>,
}

impl fmt::Debug for TeeLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TeeLayerBuilder")
            .field("sinks", &self.sinks.len())
            .field("buffer", &self.buffer)
            .finish()
    }
}

impl TeeLayer {
    /// This layer with [`ErrorResponseLayer`](crate::respond::ErrorResponseLayer) on top:
    /// the `Infallible`-error form that mounts directly in axum (`Router::layer`,
    /// `route_layer`) and in hyper; errors become responses with the status each error
    /// stands for. See `docs/foundation.md`, "Mounting in axum".
    pub fn respond(self) -> tower::layer::util::Stack<Self, crate::respond::ErrorResponseLayer> {
        tower::layer::util::Stack::new(self, crate::respond::ErrorResponseLayer)
    }

    /// A layer copying to `sink` with the defaults (see [`TeeLayerBuilder`]).
    pub fn new(sink: impl Sink) -> Self {
        TeeLayer::builder().sink(sink).build()
    }

    /// Starts a builder with no sink.
    pub fn builder() -> TeeLayerBuilder {
        TeeLayerBuilder {
            sinks: Vec::new(),
            buffer: 4 << 20,
            methods: vec![Method::GET],
            predicate: Arc::new(default_predicate),
            name_rule: Arc::new(PathKey),
            on_disconnect: DisconnectPolicy::default(),
            sink_budget: 64 << 20,
            max_pending: 256,
            drain_budget: None,
            backfill: None,
        }
    }

    /// Bytes queued for (or held by) a sink's copies right now, per sink in the order
    /// they were added, with each sink's budget: `(name, used, limit)`.
    pub fn sink_budgets(&self) -> Vec<(Arc<str>, u64, u64)> {
        self.cfg
            .sinks
            .iter()
            .map(|s| (s.name.clone(), s.budget.used(), s.budget.limit()))
            .collect()
    }

    /// The most bytes each sink's copies held at once (never above its budget), per sink
    /// in the order they were added.
    pub fn sink_budget_peaks(&self) -> Vec<u64> {
        self.cfg.sinks.iter().map(|s| s.budget.peak()).collect()
    }

    /// The layer's counters (shared by every service it made).
    pub fn stats(&self) -> &Arc<BackupStats> {
        &self.cfg.stats
    }

    /// Receives a [`BackupEvent`] for every copy that ends. Events are only produced while
    /// someone is subscribed; a slow receiver misses old events (`Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<BackupEvent> {
        self.cfg.events.subscribe()
    }
}

impl TeeLayerBuilder {
    /// Adds a sink (a backup destination; any number, each with its own buffer).
    pub fn sink(mut self, sink: impl Sink) -> Self {
        let name: Arc<str> = Arc::from(sink.name());
        self.sinks.push((name, Arc::new(sink)));
        self
    }

    /// Adds a shared sink.
    pub fn sink_arc(mut self, sink: Arc<dyn Sink>) -> Self {
        self.sinks.push((Arc::from(sink.name()), sink));
        self
    }

    /// Bytes each sink may fall behind the client before its copy is aborted (default
    /// 4 MiB). This bounds the memory a response costs: `buffer` × sinks, plus one chunk.
    pub fn buffer(mut self, bytes: usize) -> Self {
        self.buffer = bytes;
        self
    }

    /// Request methods considered at all (default `GET`); others pass through untouched,
    /// without computing a key.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Which responses are copied (default [`default_predicate`]).
    pub fn predicate<F>(mut self, f: F) -> Self
    where
        F: Fn(&Candidate<'_>) -> bool + Send + Sync + 'static,
    {
        self.predicate = Arc::new(f);
        self
    }

    /// How requests are named (default [`PathKey`]); the result is validated.
    pub fn name_rule(mut self, rule: impl NameRule) -> Self {
        self.name_rule = Arc::new(rule);
        self
    }

    /// What to do when the client leaves early (default: finish within 256 MiB / 60 s).
    pub fn on_disconnect(mut self, policy: DisconnectPolicy) -> Self {
        self.on_disconnect = policy;
        self
    }

    /// Bytes all copies to one sink may hold together: queued behind the client plus what
    /// a writer keeps until its commit ([`SinkWriter::held_bytes`](super::SinkWriter::held_bytes)).
    /// A copy that would pass it is aborted ([`AbortReason::BudgetExceeded`]); the client is
    /// never slowed. Default 64 MiB per sink.
    pub fn sink_budget(mut self, bytes: u64) -> Self {
        self.sink_budget = bytes;
        self
    }

    /// Copies that may be pending on one sink at once (started, not yet committed or
    /// aborted: a sink whose `begin` hangs collects them). Beyond it new copies to that
    /// sink are skipped and counted ([`BackupStatsSnapshot::skipped`]). Default 256.
    pub fn max_pending_copies(mut self, n: usize) -> Self {
        self.max_pending = n;
        self
    }

    /// The cap on background drains after client disconnects (default
    /// [`DrainBudget::global`], shared by the whole process).
    pub fn drain_budget(mut self, budget: Arc<DrainBudget>) -> Self {
        self.drain_budget = Some(budget);
        self
    }

    /// Where the keys of copies lost to a sink too slow for the client go (overflow of
    /// the buffer or the sink's byte budget): instead of only being counted as aborted,
    /// each is queued (and counted in [`BackupStatsSnapshot::handed_to_backfill`]) for
    /// [`backfill`](super::backfill()), which re-fetches at the sink's pace. Default: none.
    pub fn backfill_queue(mut self, queue: BackfillQueue) -> Self {
        self.backfill = Some(queue);
        self
    }

    /// Builds the layer.
    pub fn build(self) -> TeeLayer {
        let (events, _) = broadcast::channel(1024);
        TeeLayer {
            cfg: Arc::new(Config {
                sinks: self
                    .sinks
                    .into_iter()
                    .map(|(name, sink)| SinkSlot {
                        name,
                        sink,
                        budget: ByteBudget::new(self.sink_budget),
                        pending: Arc::default(),
                        max_pending: self.max_pending,
                    })
                    .collect(),
                buffer: self.buffer,
                methods: self.methods,
                predicate: self.predicate,
                name_rule: self.name_rule,
                on_disconnect: self.on_disconnect,
                drain_budget: self.drain_budget,
                stats: Arc::default(),
                events,
                backfill: self.backfill,
            }),
        }
    }
}

impl<S> Layer<S> for TeeLayer {
    type Service = Tee<S>;

    fn layer(&self, inner: S) -> Tee<S> {
        Tee::from_parts(inner, self.cfg.clone())
    }
}
