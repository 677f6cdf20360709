//! One request to a [`Part`](super::Part).

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::Full;

use crate::trace::TraceContext;

/// `Idempotency-Key`: the same key on every try lets the service act once.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// One request to a part; cheap to build again for each retry.
#[derive(Debug, Clone)]
pub struct Call {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) body: Option<Bytes>,
    pub(crate) headers: HeaderMap,
    pub(crate) trace: Option<TraceContext>,
    pub(crate) tries: u32,
}

impl Call {
    /// A request with `method` to `path` (origin form, `/cart/42`).
    pub fn new(method: Method, path: impl Into<String>) -> Self {
        Call {
            method,
            path: path.into(),
            body: None,
            headers: HeaderMap::new(),
            trace: None,
            tries: 1,
        }
    }

    /// `GET path`.
    pub fn get(path: impl Into<String>) -> Self {
        Self::new(Method::GET, path)
    }

    /// `POST path` with a JSON body.
    pub fn post(path: impl Into<String>, body: &serde_json::Value) -> Self {
        Self::new(Method::POST, path).json(body)
    }

    /// A JSON body (`content-type: application/json`).
    pub fn json(mut self, body: &serde_json::Value) -> Self {
        self.body = Some(Bytes::from(body.to_string()));
        self.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        self
    }

    /// A header sent on every try.
    pub fn header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Sends `Idempotency-Key: key` on every try, and makes the call retryable whatever
    /// its method. A key that is not a valid header value is refused with `None`.
    pub fn idempotency_key(mut self, key: &str) -> Option<Self> {
        self.headers
            .insert(IDEMPOTENCY_KEY, HeaderValue::from_str(key).ok()?);
        Some(self)
    }

    /// Tries at most `n` times (at least 1) on 5xx, transport errors and timeouts. Only
    /// with an idempotency key or an idempotent method; otherwise one try.
    pub fn tries(mut self, n: u32) -> Self {
        self.tries = n.max(1);
        self
    }

    /// Carries the caller's trace: the part's `Forward` sends a child `traceparent` and the
    /// request id on each try.
    pub fn trace(mut self, cx: Option<&TraceContext>) -> Self {
        self.trace = cx.cloned();
        self
    }

    /// How many tries this call may make.
    pub(crate) fn max_tries(&self) -> u32 {
        let safe = self.headers.contains_key(IDEMPOTENCY_KEY)
            || matches!(
                self.method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
            );
        if safe {
            self.tries
        } else {
            1
        }
    }

    pub(crate) fn request(&self) -> Result<Request<Full<Bytes>>, http::Error> {
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(&self.path)
            .body(Full::new(self.body.clone().unwrap_or_default()))?;
        *req.headers_mut() = self.headers.clone();
        if let Some(cx) = &self.trace {
            req.extensions_mut().insert(cx.clone());
        }
        Ok(req)
    }
}
