//! An etcd v3 registry (feature `etcd`).
//!
//! Layout: one key per instance, `<prefix>/<service>/<id>`, whose value is the
//! [`Instance`] as JSON and which is attached to a lease of the registration's TTL. The
//! [`Registration`](super::Registration) guard keeps the lease alive; if the process dies,
//! etcd deletes the key when the lease expires. Watchers list the prefix and then watch it
//! from the listed revision, so no change between the two is missed; after any error they
//! list again.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, WatchOptions,
};
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};
use tokio::sync::mpsc;

use super::{Backoff, DiscoveryError, Instance, Lease, Registry, RegistryEvent};

const NAME: &str = "etcd";

/// Default HTTP/2 keep-alive ping interval. etcd refuses pings closer together than its
/// `--grpc-keepalive-min-time` (default 5 s): after three such pings it sends
/// `GOAWAY too_many_pings` and cuts the connection, so a faster client is disconnected
/// every few seconds by a perfectly healthy etcd. 10 s stays well above that minimum.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may stay unanswered before the connection is considered dead.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a watcher checks that etcd still answers while its watch is silent.
const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// etcd's default `--grpc-keepalive-min-time`.
const ETCD_MIN_PING_INTERVAL: Duration = Duration::from_secs(5);

/// Builds an [`EtcdRegistry`].
#[derive(Debug, Clone)]
pub struct EtcdRegistryBuilder {
    endpoints: Vec<String>,
    prefix: String,
    request_timeout: Duration,
    connect_timeout: Duration,
    keep_alive: (Duration, Duration),
    user: Option<(String, String)>,
}

impl EtcdRegistryBuilder {
    /// Key prefix (default `/services`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Time allowed for each unary request (default 3 s).
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.request_timeout = t;
        self
    }

    /// Time allowed to open a connection (default 2 s).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// HTTP/2 keep-alive pings: `interval` between pings on a connection that has open
    /// streams (a watch), `timeout` for the answer (defaults 10 s and 5 s). Pings are not
    /// sent on an idle connection, and the interval is raised to at least 5 s, etcd's
    /// default `--grpc-keepalive-min-time`: etcd answers faster pings with
    /// `GOAWAY too_many_pings` and drops the connection.
    pub fn keep_alive(mut self, interval: Duration, timeout: Duration) -> Self {
        self.keep_alive = (interval.max(ETCD_MIN_PING_INTERVAL), timeout);
        self
    }

    /// Authenticates with etcd's user/password auth.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((name.into(), password.into()));
        self
    }

    /// Creates the client. Connections are made lazily, so this succeeds while etcd is
    /// down (registrations and watchers then retry), unless authentication is configured.
    pub async fn connect(self) -> Result<EtcdRegistry, DiscoveryError> {
        if self.endpoints.is_empty() {
            return Err(DiscoveryError::InvalidConfig("no etcd endpoint".into()));
        }
        let prefix = self.prefix.trim_end_matches('/').to_string();
        if prefix.is_empty() || !prefix.starts_with('/') {
            return Err(DiscoveryError::InvalidConfig(format!(
                "etcd key prefix `{}` must start with `/` and not be `/`",
                self.prefix
            )));
        }
        let (interval, timeout) = self.keep_alive;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            // HTTP/2 pings notice a dead etcd that did not close the connection. Only
            // while a stream (a watch) is open: etcd enforces its keep-alive policy
            // without `PermitWithoutStream`, so any ping on an idle connection within
            // two hours of the previous one counts as a strike.
            .with_keep_alive(interval, timeout)
            .with_keep_alive_while_idle(false);
        if let Some((name, password)) = self.user {
            opts = opts.with_user(name, password);
        }
        let client = Client::connect(&self.endpoints, Some(opts))
            .await
            .map_err(|e| DiscoveryError::unavailable(NAME, e))?;
        Ok(EtcdRegistry {
            client,
            prefix: prefix.into(),
            request_timeout: self.request_timeout,
            interruptions: Arc::new(AtomicU64::new(0)),
        })
    }
}

/// A [`Registry`] stored in etcd v3 (feature `etcd`). Clones share the connection.
#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    prefix: Arc<str>,
    request_timeout: Duration,
    interruptions: Arc<AtomicU64>,
}

impl fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdRegistry {
    /// A builder for `endpoints` such as `["http://127.0.0.1:2379"]`.
    pub fn builder<I, E>(endpoints: I) -> EtcdRegistryBuilder
    where
        I: IntoIterator<Item = E>,
        E: Into<String>,
    {
        EtcdRegistryBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: "/services".into(),
            request_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
            keep_alive: (KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT),
            user: None,
        }
    }

    /// Connects with default options and the `/services` prefix.
    pub async fn connect<I, E>(endpoints: I) -> Result<Self, DiscoveryError>
    where
        I: IntoIterator<Item = E>,
        E: Into<String>,
    {
        Self::builder(endpoints).connect().await
    }

    /// How many times a watcher's list or watch stream failed and had to be made again
    /// (connection cut, etcd unreachable, request timed out), summed over all watchers of
    /// this client and its clones. A healthy etcd leaves it at 0; a steadily growing count
    /// means the connection is being cut (e.g. pings refused by etcd's keep-alive policy).
    pub fn interruptions(&self) -> u64 {
        self.interruptions.load(Ordering::Relaxed)
    }

    /// The key of an instance: `<prefix>/<service>/<id>`.
    pub fn key(&self, instance: &Instance) -> String {
        format!("{}/{}/{}", self.prefix, instance.service, instance.id)
    }

    fn service_prefix(&self, service: &str) -> String {
        format!("{}/{}/", self.prefix, service)
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, DiscoveryError> {
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(r) => r.map_err(|e| DiscoveryError::unavailable(NAME, e)),
            Err(_) => Err(DiscoveryError::unavailable(NAME, "request timed out")),
        }
    }
}

/// etcd's largest lease TTL (`MaxLeaseTTL`, about 285 years); it refuses a larger one.
const MAX_LEASE_TTL_SECS: i64 = 9_000_000_000;

/// A TTL as etcd lease seconds: whole seconds rounded up (never shorter than asked), at
/// least 1, saturated at etcd's maximum instead of overflowing or being refused.
fn lease_ttl_secs(ttl: Duration) -> i64 {
    let secs = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0))
        .max(1);
    i64::try_from(secs).map_or(MAX_LEASE_TTL_SECS, |s| s.min(MAX_LEASE_TTL_SECS))
}

fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        // gRPC NOT_FOUND (5): "etcdserver: requested lease not found".
        etcd_client::Error::GRpcStatus(s) => {
            s.code() as i32 == 5 || s.message().contains("lease not found")
        }
        _ => false,
    }
}

/// Reads one key/value; `None` (with a warning) for a value that is not an instance of
/// `service` under its own id.
fn parse(kv: &KeyValue, service: &str) -> Option<Instance> {
    let key = String::from_utf8_lossy(kv.key());
    let id = key.rsplit('/').next().unwrap_or_default();
    match serde_json::from_slice::<Instance>(kv.value()) {
        Ok(i) if i.service == service && i.id == id && i.validate().is_ok() => Some(i),
        Ok(i) => {
            tracing::warn!(%key, instance = %i, "ignoring an etcd entry that does not match its key");
            None
        }
        Err(e) => {
            tracing::warn!(%key, error = %e, "ignoring an etcd entry that is not an instance");
            None
        }
    }
}

impl Registry for EtcdRegistry {
    fn register<'a>(
        &'a self,
        instance: &'a Instance,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, DiscoveryError>> {
        Box::pin(async move {
            instance.validate()?;
            let value = serde_json::to_vec(instance)
                .map_err(|e| DiscoveryError::InvalidInstance(e.to_string()))?;
            let secs = lease_ttl_secs(ttl);
            let mut client = self.client.clone();
            let lease = self.timed(client.lease_grant(secs, None)).await?.id();
            let put = self
                .timed(client.put(
                    self.key(instance),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                ))
                .await;
            if let Err(e) = put {
                let _ = self.timed(client.lease_revoke(lease)).await;
                return Err(e);
            }
            tracing::info!(%instance, lease, ttl = secs, "registered in etcd");
            Ok(Lease::new(instance.clone(), lease, ttl))
        })
    }

    fn keep_alive<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            match tokio::time::timeout(self.request_timeout, client.lease_keep_alive(lease.id()))
                .await
            {
                Ok(Ok(_keeper)) => Ok(()),
                Ok(Err(e)) if lease_not_found(&e) => {
                    Err(DiscoveryError::LeaseLost(lease.instance().id.clone()))
                }
                Ok(Err(e)) => Err(DiscoveryError::unavailable(NAME, e)),
                Err(_) => Err(DiscoveryError::unavailable(NAME, "keepalive timed out")),
            }
        })
    }

    fn deregister<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        Box::pin(async move {
            // Revoking deletes the key attached to this lease only, never a newer
            // registration of the same id.
            let mut client = self.client.clone();
            match tokio::time::timeout(self.request_timeout, client.lease_revoke(lease.id())).await
            {
                Ok(Ok(_)) => {
                    tracing::info!(instance = %lease.instance(), "deregistered from etcd");
                    Ok(())
                }
                Ok(Err(e)) if lease_not_found(&e) => Ok(()),
                Ok(Err(e)) => Err(DiscoveryError::unavailable(NAME, e)),
                Err(_) => Err(DiscoveryError::unavailable(NAME, "revoke timed out")),
            }
        })
    }

    fn instances<'a>(
        &'a self,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Instance>, DiscoveryError>> {
        Box::pin(async move {
            let mut client = self.client.clone();
            let resp = self
                .timed(client.get(
                    self.service_prefix(service),
                    Some(GetOptions::new().with_prefix()),
                ))
                .await?;
            Ok(resp
                .kvs()
                .iter()
                .filter_map(|kv| parse(kv, service))
                .collect())
        })
    }

    fn events(&self, service: &str) -> BoxStream<'static, RegistryEvent> {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(follow(self.clone(), service.to_string(), tx));
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) }).boxed()
    }
}

/// Lists then watches `service`, again and again, until the receiver is dropped.
async fn follow(reg: EtcdRegistry, service: String, tx: mpsc::Sender<RegistryEvent>) {
    let prefix = reg.service_prefix(&service);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    let mut client = reg.client.clone();
    loop {
        let listed = tokio::select! {
            _ = tx.closed() => return,
            r = reg.timed(client.get(prefix.clone(), Some(GetOptions::new().with_prefix()))) => r,
        };
        let error = match listed {
            Ok(resp) => {
                let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                let list = resp
                    .kvs()
                    .iter()
                    .filter_map(|kv| parse(kv, &service))
                    .collect();
                if tx.send(RegistryEvent::Snapshot(list)).await.is_err() {
                    return;
                }
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1);
                let watch = tokio::select! {
                    _ = tx.closed() => return,
                    r = reg.timed(client.watch(prefix.clone(), Some(opts))) => r,
                };
                match watch {
                    Ok(mut stream) => {
                        backoff.reset();
                        let mut probe_at = tokio::time::Instant::now() + PROBE_INTERVAL;
                        loop {
                            let msg = tokio::select! {
                                _ = tx.closed() => return,
                                m = stream.message() => {
                                    // etcd answered: no probe needed for a while.
                                    probe_at = tokio::time::Instant::now() + PROBE_INTERVAL;
                                    m
                                }
                                () = tokio::time::sleep_until(probe_at) => {
                                    // A paused or wedged etcd keeps the connection open
                                    // and the watch silent; when it resumes it expires
                                    // every lease at once. Noticing the outage makes the
                                    // watcher hold those removals (reconnect grace).
                                    let probe = GetOptions::new().with_prefix().with_count_only();
                                    match reg.timed(client.get(prefix.clone(), Some(probe))).await {
                                        Ok(_) => {
                                            probe_at = tokio::time::Instant::now() + PROBE_INTERVAL;
                                            continue;
                                        }
                                        Err(e) => break Some(e),
                                    }
                                }
                            };
                            match msg {
                                Ok(Some(resp)) if resp.canceled() => {
                                    // Compacted past our revision or cancelled: list again.
                                    tracing::debug!(
                                        reason = resp.cancel_reason(),
                                        "etcd watch cancelled"
                                    );
                                    break None;
                                }
                                Ok(Some(resp)) => {
                                    for ev in resp.events() {
                                        let Some(kv) = ev.kv() else { continue };
                                        let event = match ev.event_type() {
                                            EventType::Put => match parse(kv, &service) {
                                                Some(i) => RegistryEvent::Put(i),
                                                None => continue,
                                            },
                                            EventType::Delete => {
                                                let key = String::from_utf8_lossy(kv.key());
                                                let id = key.rsplit('/').next().unwrap_or_default();
                                                RegistryEvent::Delete(id.to_string())
                                            }
                                        };
                                        if tx.send(event).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                                Ok(None) => {
                                    break Some(DiscoveryError::unavailable(
                                        NAME,
                                        "watch stream closed",
                                    ))
                                }
                                Err(e) => break Some(DiscoveryError::unavailable(NAME, e)),
                            }
                        }
                    }
                    Err(e) => Some(e),
                }
            }
            Err(e) => Some(e),
        };
        if let Some(e) = error {
            reg.interruptions.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(service = %service, error = %e, "etcd watch interrupted");
            if tx.send(RegistryEvent::Unavailable(e)).await.is_err() {
                return;
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ttls_round_up_and_saturate() {
        assert_eq!(lease_ttl_secs(Duration::ZERO), 1);
        assert_eq!(lease_ttl_secs(Duration::from_millis(1500)), 2);
        assert_eq!(lease_ttl_secs(Duration::from_secs(10)), 10);
        assert_eq!(
            lease_ttl_secs(Duration::from_secs(u64::MAX)),
            MAX_LEASE_TTL_SECS
        );
        assert_eq!(lease_ttl_secs(Duration::MAX), MAX_LEASE_TTL_SECS);
        assert_eq!(
            lease_ttl_secs(Duration::from_secs(i64::MAX as u64 + 7)),
            MAX_LEASE_TTL_SECS
        );
    }
}
