//! A Consul registry (feature `consul`), through the local agent's HTTP API.
//!
//! - register: `PUT /v1/agent/service/register` with a TTL check (`service:<id>`), which
//!   the [`Registration`](super::Registration) guard keeps passing with
//!   `PUT /v1/agent/check/pass/service:<id>`; a process that dies stops passing it, the
//!   check turns critical after the TTL (the instance leaves the healthy list) and Consul
//!   removes the service after `deregister_critical_after`.
//! - deregister: `PUT /v1/agent/service/deregister/<id>`.
//! - list/watch: `GET /v1/health/service/<name>?passing` as a blocking query (`index` from
//!   the last `X-Consul-Index`, `wait`), so a change arrives as soon as Consul has it.
//! - the instance's `version` travels in the service `Meta` under `version`.
//!
//! No Consul agent can be installed on the machine this crate is developed on: the tests
//! run against a small local server that follows Consul's documented HTTP API (the
//! endpoints above, TTL checks, blocking queries with `X-Consul-Index`). Behaviour of a real
//! agent beyond that documented contract is not covered by them.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::mpsc;

mod wire;

use self::wire::{check_id, duration, CheckBody, HealthEntry, RegisterBody};
use super::{Backoff, DiscoveryError, Instance, Lease, Registry, RegistryEvent};

const NAME: &str = "consul";
/// Largest response body read from the agent.
const MAX_BODY: usize = 16 * 1024 * 1024;
const VERSION_META: &str = "version";

/// Builds a [`ConsulRegistry`].
#[derive(Debug, Clone)]
pub struct ConsulRegistryBuilder {
    address: String,
    token: Option<String>,
    wait: Duration,
    request_timeout: Duration,
    deregister_critical_after: Duration,
}

impl ConsulRegistryBuilder {
    /// ACL token sent as `X-Consul-Token`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// How long a blocking query may wait for a change (default 30 s; Consul caps at 10 min).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// Time allowed for a non-blocking request (default 5 s).
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }

    /// How long a service whose check is critical stays before Consul removes it
    /// (`DeregisterCriticalServiceAfter`, default 1 min).
    pub fn deregister_critical_after(mut self, d: Duration) -> Self {
        self.deregister_critical_after = d;
        self
    }

    /// Builds the client (no request is made yet).
    pub fn build(self) -> Result<ConsulRegistry, DiscoveryError> {
        let bad = |why: &str| {
            DiscoveryError::InvalidConfig(format!("consul address `{}`: {why}", self.address))
        };
        let uri: Uri = self.address.parse().map_err(|_| bad("not a URI"))?;
        if uri.scheme_str() != Some("http") {
            return Err(bad("only http:// is supported"));
        }
        let authority = uri
            .authority()
            .ok_or_else(|| bad("missing host"))?
            .to_string();
        let token = match self.token {
            Some(t) => Some(
                HeaderValue::from_str(&t)
                    .map_err(|_| DiscoveryError::InvalidConfig("invalid consul token".into()))?,
            ),
            None => None,
        };
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(http);
        Ok(ConsulRegistry {
            inner: Arc::new(Inner {
                client,
                authority,
                token,
                wait: self.wait.max(Duration::from_secs(1)),
                request_timeout: self.request_timeout,
                deregister_critical_after: self.deregister_critical_after,
            }),
        })
    }
}

struct Inner {
    client: Client<HttpConnector, Full<Bytes>>,
    authority: String,
    token: Option<HeaderValue>,
    wait: Duration,
    request_timeout: Duration,
    deregister_critical_after: Duration,
}

/// A [`Registry`] backed by a Consul agent (feature `consul`). Clones share the client.
#[derive(Clone)]
pub struct ConsulRegistry {
    inner: Arc<Inner>,
}

impl fmt::Debug for ConsulRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulRegistry")
            .field("agent", &self.inner.authority)
            .field("wait", &self.inner.wait)
            .finish_non_exhaustive()
    }
}

impl ConsulRegistry {
    /// A builder for the agent at `address` (`http://127.0.0.1:8500`).
    pub fn builder(address: impl Into<String>) -> ConsulRegistryBuilder {
        ConsulRegistryBuilder {
            address: address.into(),
            token: None,
            wait: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
            deregister_critical_after: Duration::from_secs(60),
        }
    }

    /// A client with default options for the agent at `address`.
    pub fn new(address: impl Into<String>) -> Result<Self, DiscoveryError> {
        Self::builder(address).build()
    }

    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Option<u64>, Bytes), DiscoveryError> {
        let uri = format!("http://{}{}", self.inner.authority, path_and_query);
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = &self.inner.token {
            req = req.header("x-consul-token", t.clone());
        }
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| DiscoveryError::InvalidConfig(e.to_string()))?;
        let call = async {
            let res = self
                .inner
                .client
                .request(req)
                .await
                .map_err(|e| DiscoveryError::unavailable(NAME, e))?;
            let status = res.status();
            let index = match res.headers().get("x-consul-index") {
                Some(v) => Some(
                    v.to_str()
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .ok_or_else(|| DiscoveryError::Protocol("invalid X-Consul-Index".into()))?,
                ),
                None => None,
            };
            let body = Limited::new(res.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| DiscoveryError::unavailable(NAME, e))?
                .to_bytes();
            Ok((status, index, body))
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(DiscoveryError::unavailable(NAME, "request timed out")),
        }
    }

    fn failed(status: StatusCode, body: &Bytes) -> DiscoveryError {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)])
            .trim()
            .to_string();
        if status.is_client_error() {
            DiscoveryError::Protocol(format!("agent answered {status}: {text}"))
        } else {
            DiscoveryError::unavailable(NAME, format!("agent answered {status}: {text}"))
        }
    }

    /// One health query; `index` 0 returns at once, otherwise it blocks up to `wait`.
    async fn health(
        &self,
        service: &str,
        index: u64,
    ) -> Result<(Vec<Instance>, u64), DiscoveryError> {
        let (pq, timeout) = if index == 0 {
            (
                format!("/v1/health/service/{service}?passing=1"),
                self.inner.request_timeout,
            )
        } else {
            let wait = self.inner.wait;
            (
                format!(
                    "/v1/health/service/{service}?passing=1&index={index}&wait={}",
                    duration(wait)
                ),
                // Consul adds up to wait/16 of jitter.
                wait.saturating_add(wait / 16)
                    .saturating_add(self.inner.request_timeout),
            )
        };
        let (status, new_index, body) = self.send(Method::GET, &pq, None, timeout).await?;
        if status != StatusCode::OK {
            return Err(Self::failed(status, &body));
        }
        let entries: Vec<HealthEntry> = serde_json::from_slice(&body)
            .map_err(|e| DiscoveryError::Protocol(format!("health response: {e}")))?;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let s = e.service;
            let address = if s.address.is_empty() {
                e.node.map(|n| n.address).unwrap_or_default()
            } else {
                s.address
            };
            let mut metadata = s.meta.unwrap_or_default();
            let version = metadata.remove(VERSION_META);
            let inst = Instance {
                id: s.id,
                service: s.service,
                address,
                port: s.port,
                tags: s.tags.unwrap_or_default(),
                version,
                metadata,
            };
            match inst.validate() {
                Ok(()) if inst.service == service => out.push(inst),
                Ok(()) => {}
                Err(err) => {
                    tracing::warn!(instance = %inst, error = %err, "ignoring a Consul entry")
                }
            }
        }
        let new_index =
            new_index.ok_or_else(|| DiscoveryError::Protocol("missing X-Consul-Index".into()))?;
        Ok((out, new_index))
    }
}

impl Registry for ConsulRegistry {
    fn register<'a>(
        &'a self,
        instance: &'a Instance,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, DiscoveryError>> {
        Box::pin(async move {
            instance.validate()?;
            let mut meta: BTreeMap<&str, &str> = instance
                .metadata
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            if let Some(v) = &instance.version {
                meta.insert(VERSION_META, v);
            }
            let body = RegisterBody {
                id: &instance.id,
                name: &instance.service,
                tags: &instance.tags,
                address: &instance.address,
                port: instance.port,
                meta,
                check: CheckBody {
                    check_id: check_id(instance),
                    name: format!("TTL check of {}", instance.id),
                    ttl: duration(ttl),
                    status: "passing",
                    deregister_critical_service_after: duration(
                        self.inner.deregister_critical_after,
                    ),
                },
            };
            let body = serde_json::to_vec(&body)
                .map_err(|e| DiscoveryError::InvalidInstance(e.to_string()))?;
            let (status, _, resp) = self
                .send(
                    Method::PUT,
                    "/v1/agent/service/register",
                    Some(body),
                    self.inner.request_timeout,
                )
                .await?;
            if status != StatusCode::OK {
                return Err(match Self::failed(status, &resp) {
                    DiscoveryError::Protocol(m) => DiscoveryError::InvalidInstance(m),
                    e => e,
                });
            }
            let lease = Lease::new(instance.clone(), 0, ttl);
            // Some agents ignore the initial status: pass the check once right away.
            self.keep_alive(&lease).await?;
            tracing::info!(%instance, ?ttl, "registered in consul");
            Ok(lease)
        })
    }

    fn keep_alive<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        Box::pin(async move {
            let pq = format!("/v1/agent/check/pass/{}", check_id(lease.instance()));
            let (status, _, body) = self
                .send(
                    Method::PUT,
                    &pq,
                    Some(Vec::new()),
                    self.inner.request_timeout,
                )
                .await?;
            if status == StatusCode::OK {
                return Ok(());
            }
            let text = String::from_utf8_lossy(&body);
            // The agent forgot the check (restarted without state, or removed the
            // critical service): register again.
            if status == StatusCode::NOT_FOUND
                || text.contains("Unknown check")
                || text.contains("does not have associated TTL")
            {
                return Err(DiscoveryError::LeaseLost(lease.instance().id.clone()));
            }
            Err(Self::failed(status, &body))
        })
    }

    fn deregister<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        Box::pin(async move {
            let pq = format!("/v1/agent/service/deregister/{}", lease.instance().id);
            let (status, _, body) = self
                .send(
                    Method::PUT,
                    &pq,
                    Some(Vec::new()),
                    self.inner.request_timeout,
                )
                .await?;
            if status == StatusCode::OK || status == StatusCode::NOT_FOUND {
                tracing::info!(instance = %lease.instance(), "deregistered from consul");
                Ok(())
            } else {
                Err(Self::failed(status, &body))
            }
        })
    }

    fn instances<'a>(
        &'a self,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Instance>, DiscoveryError>> {
        Box::pin(async move {
            check_service_name(service)?;
            Ok(self.health(service, 0).await?.0)
        })
    }

    fn events(&self, service: &str) -> BoxStream<'static, RegistryEvent> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(follow(self.clone(), service.to_string(), tx));
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) }).boxed()
    }
}

fn check_service_name(service: &str) -> Result<(), DiscoveryError> {
    // The name goes into a URL path.
    Instance::new(service, "x", "127.0.0.1", 1).validate()
}

/// Blocking queries in a loop, until the receiver is dropped.
async fn follow(reg: ConsulRegistry, service: String, tx: mpsc::Sender<RegistryEvent>) {
    if let Err(e) = check_service_name(&service) {
        let _ = tx.send(RegistryEvent::Unavailable(e)).await;
        return;
    }
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    let mut index = 0u64;
    let mut fresh = true;
    loop {
        let res = tokio::select! {
            _ = tx.closed() => return,
            r = reg.health(&service, index) => r,
        };
        match res {
            Ok((list, new_index)) => {
                backoff.reset();
                // Documented rules: an index that goes backwards resets the query, and
                // the index used to block must be at least 1.
                let next = if new_index < index {
                    0
                } else {
                    new_index.max(1)
                };
                if (fresh || new_index != index)
                    && tx.send(RegistryEvent::Snapshot(list)).await.is_err()
                {
                    return;
                }
                fresh = false;
                index = next;
            }
            Err(e) => {
                tracing::debug!(service = %service, error = %e, "consul query failed");
                if tx.send(RegistryEvent::Unavailable(e)).await.is_err() {
                    return;
                }
                // After an outage, the next answer is a full list again.
                index = 0;
                fresh = true;
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}
