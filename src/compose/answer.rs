//! Part results and the composite answer.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use serde_json::{Map, Value};

/// What happened to one part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The service answered 2xx.
    Ok,
    /// The service failed; the part's fallback value stands in.
    Fallback,
    /// The service failed and there is no fallback.
    Failed,
    /// Not called (an earlier step of the orchestration failed).
    Skipped,
}

/// The result of one part, as it appears in the composite JSON.
#[derive(Debug, Clone, Serialize)]
pub struct PartResult {
    /// The part's configured name.
    #[serde(skip)]
    pub name: String,
    /// What happened.
    pub outcome: Outcome,
    /// The upstream's status, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Tries made.
    pub attempts: u32,
    /// The JSON body (or the fallback value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// Why it failed (short, no internal addresses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl PartResult {
    /// A part not called.
    pub fn skipped(name: impl Into<String>) -> Self {
        PartResult {
            name: name.into(),
            outcome: Outcome::Skipped,
            status: None,
            attempts: 0,
            body: None,
            error: None,
        }
    }

    /// `true` when the service answered 2xx.
    pub fn is_ok(&self) -> bool {
        self.outcome == Outcome::Ok
    }

    /// `true` for `ok` and `fallback`: there is a body to show.
    pub fn is_usable(&self) -> bool {
        matches!(self.outcome, Outcome::Ok | Outcome::Fallback)
    }
}

/// Results of several parts gathered into one JSON answer:
/// `{"complete": bool, "parts": {name: {"outcome", "status", "attempts", "body", "error"}}}`
/// plus any extra fields set with [`field`](Self::field).
#[derive(Debug, Clone, Default)]
pub struct Composite {
    parts: Vec<PartResult>,
    extra: Map<String, Value>,
    status: Option<StatusCode>,
}

impl Composite {
    /// An empty answer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a part's result.
    pub fn push(&mut self, part: PartResult) -> &mut Self {
        self.parts.push(part);
        self
    }

    /// Adds a top-level field (an order id, a message for the client).
    pub fn field(&mut self, key: &str, value: Value) -> &mut Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    /// Overrides the status the table in the [module docs](super) would give.
    pub fn status(&mut self, status: StatusCode) -> &mut Self {
        self.status = Some(status);
        self
    }

    /// The results so far.
    pub fn parts(&self) -> &[PartResult] {
        &self.parts
    }

    /// `true` when every part answered `ok`.
    pub fn is_complete(&self) -> bool {
        self.parts.iter().all(PartResult::is_ok)
    }

    /// The status of the answer (see the [module docs](super)).
    pub fn http_status(&self) -> StatusCode {
        if let Some(s) = self.status {
            s
        } else if self.is_complete() {
            StatusCode::OK
        } else if self.parts.iter().any(PartResult::is_usable) {
            StatusCode::MULTI_STATUS
        } else {
            StatusCode::BAD_GATEWAY
        }
    }

    /// The answer as JSON.
    pub fn to_json(&self) -> Value {
        let mut parts = Map::new();
        for p in &self.parts {
            parts.insert(
                p.name.clone(),
                serde_json::to_value(p).unwrap_or(Value::Null),
            );
        }
        let mut out = Map::new();
        out.insert("complete".into(), Value::Bool(self.is_complete()));
        out.insert("parts".into(), Value::Object(parts));
        for (k, v) in &self.extra {
            out.insert(k.clone(), v.clone());
        }
        Value::Object(out)
    }

    /// The HTTP answer: [`http_status`](Self::http_status), JSON body.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let mut res = Response::new(Full::new(Bytes::from(self.to_json().to_string())));
        *res.status_mut() = self.http_status();
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        res
    }
}
