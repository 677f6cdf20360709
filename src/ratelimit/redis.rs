//! [`RedisLimiter`]: the same GCRA, shared by every gateway instance through Redis.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use governor::Quota;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use super::limiter::{Check, Decision, Limiter};
use super::local::LocalLimiter;

/// Default of [`RedisLimiterBuilder::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);
/// Default of [`RedisLimiterBuilder::retry_after_failure`].
pub const DEFAULT_RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// GCRA in one atomic script, on Redis's clock (`TIME`), so every instance and every
/// clock skew between them sees the same buckets. The key holds the theoretical arrival
/// time (TAT) in microseconds and expires when the bucket is full again, so idle keys cost
/// Redis nothing. Returns `{1, 0}` (allowed) or `{0, wait_us}`.
///
/// Same decision as governor: allowed iff `max(tat, now) + T - now <= T * burst`, i.e. a
/// fresh key admits `burst` requests at once, then one per `T`.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local tat = now
local v = redis.call('GET', KEYS[1])
if v then tat = math.max(tonumber(v), now) end
local new_tat = tat + T
if new_tat - now > tau then
  return {0, new_tat - tau - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
";

/// What a [`RedisLimiter`] does when Redis does not answer within the timeout (down,
/// hung, network partition). The choice is the operator's; the default keeps limiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnRedisFailure {
    /// Degrade to a per-instance [`LocalLimiter`] with the same quota (or
    /// [`RedisLimiterBuilder::local_quota`]): still limited, but per instance, so N
    /// instances admit up to N times the quota while Redis is away. The default.
    #[default]
    Local,
    /// Fail open: admit everything until Redis is back (availability over protection).
    Allow,
    /// Fail closed: answer `503` with `Retry-After` until Redis is back (protection over
    /// availability).
    Deny,
}

/// A [`RedisLimiter`] that cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis URL: {0}")]
pub struct RedisLimiterError(#[source] redis::RedisError);

/// Builds a [`RedisLimiter`].
pub struct RedisLimiterBuilder {
    client: redis::Client,
    quota: Quota,
    local_quota: Option<Quota>,
    prefix: String,
    timeout: Duration,
    retry_after_failure: Duration,
    on_failure: OnRedisFailure,
}

impl fmt::Debug for RedisLimiterBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiterBuilder")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("on_failure", &self.on_failure)
            .finish_non_exhaustive()
    }
}

impl RedisLimiterBuilder {
    /// Prefix of the Redis keys (default `rl:`); give each limit its own.
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.into();
        self
    }
    /// Longest wait for Redis per request, connecting included (default 50 ms, clamped to
    /// 1 ms..=10 s). Past it the request is decided by [`OnRedisFailure`].
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t.clamp(Duration::from_millis(1), Duration::from_secs(10));
        self
    }
    /// After a failure, requests skip Redis for this long (default 1 s, at least 10 ms),
    /// so an outage costs one timeout per interval, not one per request.
    pub fn retry_after_failure(mut self, d: Duration) -> Self {
        self.retry_after_failure = d.max(Duration::from_millis(10));
        self
    }
    /// What happens while Redis is unreachable.
    pub fn on_failure(mut self, f: OnRedisFailure) -> Self {
        self.on_failure = f;
        self
    }
    /// The quota of the local fallback (default: the shared quota; a share such as
    /// quota / instances keeps the total closer to the shared limit).
    pub fn local_quota(mut self, q: Quota) -> Self {
        self.local_quota = Some(q);
        self
    }

    /// Builds the limiter. Connects lazily, on the first request (Redis may be down at
    /// start). Inside a tokio runtime (the fallback's eviction task).
    pub fn build<K>(self) -> RedisLimiter<K>
    where
        K: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static,
    {
        let emission = self.quota.replenish_interval();
        let t_us = u64::try_from(emission.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let tau_us = t_us.saturating_mul(u64::from(self.quota.burst_size().get()));
        RedisLimiter {
            shared: Arc::new(Shared {
                client: self.client,
                conn: OnceCell::new(),
                script: redis::Script::new(GCRA),
                t_us,
                tau_us,
                prefix: self.prefix,
                timeout: self.timeout,
                retry_after_failure: self.retry_after_failure,
                on_failure: self.on_failure,
                skip_until: AtomicU64::new(0),
                epoch: Instant::now(),
                local: LocalLimiter::new(self.local_quota.unwrap_or(self.quota)),
            }),
        }
    }
}

struct Shared<K: Hash + Eq + Clone> {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    script: redis::Script,
    t_us: u64,
    tau_us: u64,
    prefix: String,
    timeout: Duration,
    retry_after_failure: Duration,
    on_failure: OnRedisFailure,
    /// Nanoseconds since `epoch` before which Redis is not asked (after a failure).
    skip_until: AtomicU64,
    epoch: Instant,
    local: LocalLimiter<K>,
}

/// The [`Limiter`] shared by gateway instances: the same GCRA as [`LocalLimiter`], kept in
/// Redis by one Lua script (atomic: concurrent instances cannot both take the last cell).
///
/// Every request waits at most [`timeout`](RedisLimiterBuilder::timeout) for Redis; when
/// Redis fails or is slow, the request is decided by [`OnRedisFailure`] and Redis is left
/// alone for [`retry_after_failure`](RedisLimiterBuilder::retry_after_failure) (decisions in
/// that window are immediate). The connection ([`ConnectionManager`]) reconnects by itself.
pub struct RedisLimiter<K: Hash + Eq + Clone> {
    shared: Arc<Shared<K>>,
}

impl<K: Hash + Eq + Clone> Clone for RedisLimiter<K> {
    fn clone(&self) -> Self {
        RedisLimiter {
            shared: self.shared.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone> fmt::Debug for RedisLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.shared.prefix)
            .field("timeout", &self.shared.timeout)
            .field("on_failure", &self.shared.on_failure)
            .finish_non_exhaustive()
    }
}

impl RedisLimiter<()> {
    /// A limiter of `quota` per key in the Redis at `url` (`redis://127.0.0.1:6379/`).
    pub fn builder(url: &str, quota: Quota) -> Result<RedisLimiterBuilder, RedisLimiterError> {
        Ok(RedisLimiterBuilder {
            client: redis::Client::open(url).map_err(RedisLimiterError)?,
            quota,
            local_quota: None,
            prefix: "rl:".into(),
            timeout: DEFAULT_TIMEOUT,
            retry_after_failure: DEFAULT_RETRY_AFTER_FAILURE,
            on_failure: OnRedisFailure::Local,
        })
    }
}

impl<K: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static> RedisLimiter<K> {
    /// `true` while requests skip Redis after a failure.
    pub fn degraded(&self) -> bool {
        self.shared.now_ns() < self.shared.skip_until.load(Ordering::Relaxed)
    }

    /// The local fallback limiter.
    pub fn local(&self) -> &LocalLimiter<K> {
        &self.shared.local
    }
}

impl<K: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static> Shared<K> {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The decision while Redis is away.
    fn fallback(&self, key: Option<&K>) -> Decision {
        match self.on_failure {
            OnRedisFailure::Local => self.local.decide(key),
            OnRedisFailure::Allow => Decision::Allow,
            OnRedisFailure::Deny => Decision::Unavailable {
                retry_after: self.retry_after_failure,
            },
        }
    }

    async fn ask(&self, key: String) -> redis::RedisResult<(i64, i64)> {
        let conn = self
            .conn
            .get_or_try_init(|| {
                // Its own timeouts stay within ours; ours bounds the whole call anyway.
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1);
                ConnectionManager::new_with_config(self.client.clone(), cfg)
            })
            .await?;
        let mut conn = conn.clone();
        let (allowed, wait_us): (i64, i64) = self
            .script
            .key(key)
            .arg(self.t_us)
            .arg(self.tau_us)
            .invoke_async(&mut conn)
            .await?;
        Ok((allowed, wait_us))
    }

    async fn decide(self: Arc<Self>, key: Option<K>) -> Decision {
        let name = match &key {
            Some(k) => format!("{}k:{k}", self.prefix),
            None => format!("{}-", self.prefix),
        };
        match tokio::time::timeout(self.timeout, self.ask(name)).await {
            Ok(Ok((1, _))) => Decision::Allow,
            Ok(Ok((_, wait_us))) => Decision::Deny {
                retry_after: Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
            },
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timeout".to_owned(),
                };
                let until = self.now_ns().saturating_add(
                    u64::try_from(self.retry_after_failure.as_nanos()).unwrap_or(u64::MAX),
                );
                self.skip_until.store(until, Ordering::Relaxed);
                tracing::warn!(target: "tower_patterns::ratelimit", error = %why, policy = ?self.on_failure, "Redis rate limiter unavailable; degrading");
                self.fallback(key.as_ref())
            }
        }
    }
}

/// Future of a Redis check: boxed, it is a network round trip anyway.
pub type RedisCheck = Pin<Box<dyn Future<Output = Decision> + Send>>;

impl<K: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static> Limiter<K> for RedisLimiter<K> {
    type Future = RedisCheck;
    fn check(&self, key: Option<&K>) -> Check<RedisCheck> {
        if self.degraded() {
            return Check::Now(self.shared.fallback(key));
        }
        Check::Later(Box::pin(self.shared.clone().decide(key.cloned())))
    }
}
