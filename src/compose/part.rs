//! A [`Part`]: one service of a composition, with its breaker, timeout, retries and
//! fallback.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;

use super::answer::{Outcome, PartResult};
use super::call::Call;
use crate::body::BoxBody;
use crate::breaker::{Circuit, CircuitBreakerLayer};
use crate::proxy::{Forward, ForwardError};
use crate::BoxError;

/// Default time one try may take, to the end of the response body.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound of a part's response body.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// Pause before the second try; doubled for each further one.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);

/// The service type a part calls.
pub type PartService = BoxCloneSyncService<Request<Full<Bytes>>, Response<BoxBody>, BoxError>;

/// One service of a composition (see the [module docs](super)).
#[derive(Clone)]
pub struct Part {
    name: Arc<str>,
    svc: PartService,
    timeout: Duration,
    max_body: usize,
    fallback: Option<Value>,
}

impl std::fmt::Debug for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Part")
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Part {
    /// A part calling `svc` (a `Forward`, a `Balance`, any HTTP service).
    pub fn new<S, B>(name: impl Into<Arc<str>>, svc: S) -> Self
    where
        S: tower::Service<Request<Full<Bytes>>, Response = Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let svc = svc
            .map_err(Into::into)
            .map_response(|res: Response<B>| res.map(crate::body::boxed));
        Part {
            name: name.into(),
            svc: BoxCloneSyncService::new(svc),
            timeout: DEFAULT_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
            fallback: None,
        }
    }

    /// A part forwarding to `upstream` (`http://host:port`), on `template`'s connection
    /// pool ([`Forward::to`]).
    pub fn forward(
        name: impl Into<Arc<str>>,
        template: &Forward<Full<Bytes>>,
        upstream: &str,
    ) -> Result<Self, ForwardError> {
        Ok(Self::new(name, template.to(upstream)?))
    }

    /// Calls go through this circuit: while it is open they fail at once (and the
    /// fallback answers). Share the circuit with the balancer's gate or a route's breaker
    /// to let one view of the service decide.
    pub fn breaker(self, circuit: Circuit) -> Self {
        use tower_layer::Layer;
        // Without a fallback the breaker answers with the inner body type.
        let svc =
            BoxCloneSyncService::new(CircuitBreakerLayer::from_breaker(circuit).layer(self.svc));
        Part { svc, ..self }
    }

    /// Time one try may take, response body included (default [`DEFAULT_TIMEOUT`]).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Bound of the response body (default [`DEFAULT_MAX_BODY`]); larger is a failure.
    pub fn max_body(mut self, n: usize) -> Self {
        self.max_body = n;
        self
    }

    /// The value that stands in when the part fails (outcome `fallback`).
    pub fn fallback(mut self, value: Value) -> Self {
        self.fallback = Some(value);
        self
    }

    /// The part's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `call`, retrying as the call allows, and never fails: the result says what
    /// happened. The future owns what it needs (`'static`, `Send`), so it can be spawned
    /// or joined with others freely.
    pub fn send(&self, call: Call) -> BoxFuture<'static, PartResult> {
        let this = self.clone();
        // Boxed: proves `Send` here once, instead of at every caller's `async` block
        // (rustc's "Send is not general enough" with borrowed calls in joined futures).
        Box::pin(this.run(call))
    }

    async fn run(self, call: Call) -> PartResult {
        let tries = call.max_tries();
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0;
        let mut last = Err(String::from("not called"));
        while attempts < tries {
            if attempts > 0 {
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
            attempts += 1;
            last = match call.request() {
                Ok(req) => try_once(self.svc.clone(), req, self.max_body, self.timeout).await,
                Err(_) => Err(String::from("invalid request")),
            };
            match &last {
                Ok((status, _)) if status.is_success() => break,
                // The caller's mistake: another try would get the same answer.
                Ok((status, _)) if status.is_client_error() => break,
                _ => {}
            }
            tracing::debug!(target: "tower_patterns::compose", part = &*self.name, attempts, "part call failed");
        }
        let (outcome, status, body, error) = match last {
            Ok((s, body)) if s.is_success() => (Outcome::Ok, Some(s.as_u16()), body, None),
            Ok((s, body)) => (
                Outcome::Failed,
                Some(s.as_u16()),
                body,
                Some(format!("status {}", s.as_u16())),
            ),
            Err(e) => (Outcome::Failed, None, None, Some(e)),
        };
        match (outcome, &self.fallback) {
            (Outcome::Failed, Some(fb)) => PartResult {
                name: self.name.to_string(),
                outcome: Outcome::Fallback,
                status,
                attempts,
                body: Some(fb.clone()),
                error,
            },
            _ => PartResult {
                name: self.name.to_string(),
                outcome,
                status,
                attempts,
                body,
                error,
            },
        }
    }
}

/// One try: the status and the JSON body (`None` when empty or not JSON), or a short error
/// text. Takes owned values: the future holds no borrow (see [`Part::send`]).
async fn try_once(
    svc: PartService,
    req: Request<Full<Bytes>>,
    max: usize,
    timeout: Duration,
) -> Result<(http::StatusCode, Option<Value>), String> {
    let fut = async move {
        let res: Response<BoxBody> = match svc.oneshot(req).await {
            Ok(r) => r,
            Err(e) => return Err(e),
        };
        let status = res.status();
        // Collected by hand rather than with `http_body_util::Limited`, whose generic
        // error conversion trips rustc's higher-ranked `Send` check of this future.
        let mut body = res.into_body();
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                if buf.len().saturating_add(data.len()) > max {
                    return Err(BoxError::from(BodyTooLarge));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok::<_, BoxError>((status, buf.freeze()))
    };
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(String::from("timeout")),
        Ok(Err(e)) => Err(describe(&*e)),
        Ok(Ok((status, bytes))) => {
            let body = if bytes.is_empty() {
                None
            } else {
                serde_json::from_slice(&bytes).ok()
            };
            Ok((status, body))
        }
    }
}

/// A part's response body passed [`Part::max_body`].
#[derive(Debug, thiserror::Error)]
#[error("response body too large")]
struct BodyTooLarge;

/// A short description that names the failure but no internal address.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = Some(e);
    while let Some(x) = cur {
        if x.is::<crate::breaker::CircuitOpen>() {
            return String::from("circuit open");
        }
        if x.is::<BodyTooLarge>() {
            return String::from("response body too large");
        }
        cur = x.source();
    }
    match crate::classify::error_kind(e) {
        crate::classify::FailureKind::Timeout => "timeout".into(),
        crate::classify::FailureKind::Transport => "transport error".into(),
        _ => "error".into(),
    }
}
