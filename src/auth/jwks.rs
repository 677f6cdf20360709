//! A JWKS document fetched over HTTP and refreshed in the background.

use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use tokio::sync::watch;
use tower::ServiceExt;

use super::error::JwksError;
use super::jwt::JwtKey;
use crate::proxy::{Forward, ForwardBuilder};

/// Shortest refresh interval accepted (shorter ones are raised to it).
pub const MIN_REFRESH: Duration = Duration::from_millis(100);
/// Longest refresh interval accepted (one day).
pub const MAX_REFRESH: Duration = Duration::from_secs(24 * 3600);
/// Longest fetch timeout accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`JwksConfig::unknown_kid_refresh`]: at most one early fetch per 30 s.
pub const DEFAULT_UNKNOWN_KID_REFRESH: Duration = Duration::from_secs(30);

/// How a [`Jwks`] is fetched.
#[derive(Debug, Clone)]
pub struct JwksConfig {
    refresh: Duration,
    timeout: Duration,
    max_bytes: usize,
    unknown_kid_refresh: Option<Duration>,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            refresh: Duration::from_secs(300),
            timeout: Duration::from_secs(5),
            max_bytes: 256 * 1024,
            unknown_kid_refresh: Some(DEFAULT_UNKNOWN_KID_REFRESH),
        }
    }
}

impl JwksConfig {
    /// Refresh every 5 minutes, 5 s timeout per fetch (connect to last byte), documents
    /// up to 256 KiB; a token with an unknown `kid` triggers at most one early fetch per
    /// 30 s.
    pub fn new() -> Self {
        Self::default()
    }
    /// Time between two fetches, clamped to [`MIN_REFRESH`]..=[`MAX_REFRESH`].
    pub fn refresh(mut self, every: Duration) -> Self {
        self.refresh = every.clamp(MIN_REFRESH, MAX_REFRESH);
        self
    }
    /// Time one fetch may take, whole body included; clamped to 1 ms..=[`MAX_TIMEOUT`].
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t.clamp(Duration::from_millis(1), MAX_TIMEOUT);
        self
    }
    /// Largest document read (bigger ones fail the fetch; the last good keys stay).
    pub fn max_bytes(mut self, n: usize) -> Self {
        self.max_bytes = n;
        self
    }
    /// Early refresh on an unknown `kid`.
    ///
    /// An issuer that rotates its keys signs with the new key at once, so a token whose
    /// `kid` is not in the current set usually means "fetch again", not "forged". With
    /// `Some(min)`, such a token makes the gateway fetch the document right away and the
    /// request waits for that fetch (at most [`timeout`](Self::timeout) for its turn, then
    /// the fetch's own timeout) before it is verified again; still unknown is `401`. The
    /// fetch is single-flight (concurrent requests wait for the one fetch) and happens at
    /// most once per `min` — whatever the outcome — so tokens with made-up `kid`s cannot
    /// make the gateway hammer the endpoint: within the interval they are `401` at once.
    /// `min` is clamped to [`MIN_REFRESH`]..=[`MAX_REFRESH`]; `None` turns it off (unknown
    /// `kid`s wait for the periodic refresh). Default: [`DEFAULT_UNKNOWN_KID_REFRESH`].
    pub fn unknown_kid_refresh(mut self, min: Option<Duration>) -> Self {
        self.unknown_kid_refresh = min.map(|m| m.clamp(MIN_REFRESH, MAX_REFRESH));
        self
    }
}

/// Load results, for monitoring (and for tests that wait for a refresh instead of
/// sleeping): see [`Jwks::status`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwksStatus {
    /// Successful loads so far (the first one included).
    pub loaded: u64,
    /// Failed fetches so far; the keys of the last successful load stayed in use.
    pub failed: u64,
    /// The last failure, if the last fetch failed.
    pub last_error: Option<String>,
    /// Number of keys in use.
    pub keys: usize,
}

struct Shared {
    keys: ArcSwap<Vec<JwtKey>>,
    status: watch::Sender<JwksStatus>,
    client: Forward<Empty<Bytes>>,
    target: Uri,
    host: http::HeaderValue,
    config: JwksConfig,
    refresher: std::sync::Mutex<Option<tokio::task::AbortHandle>>,
    /// When the last early (unknown-`kid`) fetch started; the lock makes it single-flight.
    early: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The refresher holds only a `Weak`; stop it with the last handle.
        if let Ok(mut h) = self.refresher.lock() {
            if let Some(h) = h.take() {
                h.abort();
            }
        }
    }
}

/// The keys of a JWKS endpoint, loaded once by [`Jwks::load`] and then refreshed in the
/// background (a tokio task) every [`JwksConfig::refresh`].
///
/// A fetch that fails — endpoint down, timeout, not `200`, oversized, not JSON, no usable
/// key — keeps the keys of the last good load (logged at `warn`, counted in
/// [`JwksStatus::failed`]). The document is fetched with this crate's [`Forward`] client
/// (no second HTTP stack). Cloning is cheap; the refresher stops when the last clone is
/// dropped.
#[derive(Clone)]
pub struct Jwks {
    shared: Arc<Shared>,
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.shared.target)
            .field("keys", &self.shared.keys.load().len())
            .finish()
    }
}

impl Jwks {
    /// Fetches `url` once (an error if that fails: a gateway should not start without
    /// keys) and starts the background refresh. Needs a tokio runtime.
    pub async fn load(url: &str, config: JwksConfig) -> Result<Jwks, JwksError> {
        let target: Uri = url.parse().map_err(|_| JwksError::Url(url.to_owned()))?;
        let (Some(scheme), Some(authority)) = (target.scheme_str(), target.authority()) else {
            return Err(JwksError::Url(url.to_owned()));
        };
        let host = http::HeaderValue::from_str(authority.as_str())
            .map_err(|_| JwksError::Url(url.to_owned()))?;
        let client = ForwardBuilder::new(format!("{scheme}://{authority}"))
            .connect_timeout(config.timeout)
            // The whole fetch is bounded by `config.timeout` (one clear `Timeout` error).
            .without_response_timeout()
            .append_forwarded_for(false)
            .build()
            .map_err(|e| JwksError::Fetch(Box::new(e)))?;
        let shared = Arc::new(Shared {
            keys: ArcSwap::from_pointee(Vec::new()),
            status: watch::channel(JwksStatus::default()).0,
            client,
            target,
            host,
            config,
            refresher: std::sync::Mutex::new(None),
            early: tokio::sync::Mutex::new(None),
        });
        let jwks = Jwks { shared };
        jwks.refresh().await?;
        let weak = Arc::downgrade(&jwks.shared);
        let every = jwks.shared.config.refresh;
        let task = tokio::spawn(refresh_loop(weak, every));
        if let Ok(mut slot) = jwks.shared.refresher.lock() {
            *slot = Some(task.abort_handle());
        }
        Ok(jwks)
    }

    /// The keys in use now.
    pub fn keys(&self) -> Arc<Vec<JwtKey>> {
        self.shared.keys.load_full()
    }

    /// Watches the load results.
    pub fn status(&self) -> watch::Receiver<JwksStatus> {
        self.shared.status.subscribe()
    }

    /// Fetches the document now; on success its keys replace the current ones, on failure
    /// the current ones stay. Returns the number of keys loaded.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        let s = &self.shared;
        let result = match tokio::time::timeout(s.config.timeout, fetch(s)).await {
            Ok(r) => r,
            Err(_) => Err(JwksError::Timeout),
        };
        match result {
            Ok(keys) => {
                let n = keys.len();
                s.keys.store(Arc::new(keys));
                s.status.send_modify(|st| {
                    st.loaded = st.loaded.saturating_add(1);
                    st.last_error = None;
                    st.keys = n;
                });
                tracing::debug!(target: "tower_patterns::auth", url = %s.target, keys = n, "JWKS loaded");
                Ok(n)
            }
            Err(e) => {
                tracing::warn!(target: "tower_patterns::auth", url = %s.target, error = %e, "JWKS fetch failed; keeping the last good keys");
                s.status.send_modify(|st| {
                    st.failed = st.failed.saturating_add(1);
                    st.last_error = Some(e.to_string());
                });
                Err(e)
            }
        }
    }
}

impl Jwks {
    /// Whether a token with an unknown `kid` may wait for an early fetch.
    pub(crate) fn refreshes_unknown_kids(&self) -> bool {
        self.shared.config.unknown_kid_refresh.is_some()
    }

    /// The early fetch for a token whose `kid` was not in `seen` (the key set it was
    /// checked against): single-flight and at most once per
    /// [`JwksConfig::unknown_kid_refresh`]. Resolves when the keys may have changed — or
    /// at once when another fetch already replaced `seen`, or the interval has not passed.
    /// Owns what it needs: a request future can hold it across polls.
    pub(crate) fn unknown_kid(
        &self,
        seen: Arc<Vec<JwtKey>>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let jwks = self.clone();
        async move {
            let s = &jwks.shared;
            let Some(min) = s.config.unknown_kid_refresh else {
                return;
            };
            // Waiting for the turn is bounded too: a slow fetch ahead of us must not hold
            // requests longer than one fetch timeout.
            let Ok(mut last) = tokio::time::timeout(s.config.timeout, s.early.lock()).await else {
                return;
            };
            if !Arc::ptr_eq(&seen, &s.keys.load()) {
                // Another fetch (early or periodic) loaded a new set while we waited.
                return;
            }
            let now = tokio::time::Instant::now();
            if last.is_some_and(|t| now.saturating_duration_since(t) < min) {
                return;
            }
            *last = Some(now);
            tracing::debug!(target: "tower_patterns::auth", url = %s.target, "unknown kid: early JWKS fetch");
            // Bounded by the fetch timeout; failures are logged and counted inside.
            let _ = jwks.refresh().await;
        }
    }
}

async fn refresh_loop(weak: Weak<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = weak.upgrade() else { return };
        // Failures are logged and counted inside; the next tick tries again.
        let _ = Jwks { shared }.refresh().await;
    }
}

async fn fetch(s: &Shared) -> Result<Vec<JwtKey>, JwksError> {
    let path = s.target.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = Request::get(path)
        .header(header::HOST, s.host.clone())
        .header(header::ACCEPT, "application/json")
        .body(Empty::new())
        .map_err(|e| JwksError::Fetch(Box::new(e)))?;
    let res = s
        .client
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| JwksError::Fetch(Box::new(e)))?;
    if res.status() != StatusCode::OK {
        return Err(JwksError::Status(res.status()));
    }
    let max = s.config.max_bytes;
    let body = Limited::new(res.into_body(), max)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                JwksError::TooLarge(max)
            } else {
                JwksError::Fetch(e)
            }
        })?
        .to_bytes();
    parse(&body)
}

/// The usable keys of a JWKS document. Keys this crate cannot use (unknown key type,
/// encryption keys) are skipped, so one exotic key does not hide the others; a document
/// without a single usable key is an error.
pub(crate) fn parse(body: &[u8]) -> Result<Vec<JwtKey>, JwksError> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| JwksError::Document(e.to_string()))?;
    let Some(list) = doc.get("keys").and_then(|k| k.as_array()) else {
        return Err(JwksError::Document("no \"keys\" array".into()));
    };
    let mut keys = Vec::with_capacity(list.len());
    for (i, k) in list.iter().enumerate() {
        let parsed = serde_json::from_value::<jsonwebtoken::jwk::Jwk>(k.clone())
            .map_err(|e| e.to_string())
            .and_then(|jwk| JwtKey::from_jwk(&jwk));
        match parsed {
            Ok(key) => keys.push(key),
            Err(e) => {
                tracing::debug!(target: "tower_patterns::auth", index = i, error = %e, "JWKS key skipped")
            }
        }
    }
    if keys.is_empty() {
        return Err(JwksError::Document("no usable key".into()));
    }
    Ok(keys)
}
