//! Self-registration of a running instance.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::{Backoff, DiscoveryError, Instance, Lease, Registry};

type Reply = oneshot::Sender<Result<(), DiscoveryError>>;

/// How long a deregistration may take when the guard stops.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest wait between refresh attempts while the registry does not answer.
const UNREACHABLE_RETRY_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Status {
    registrations: AtomicU64,
    registered: AtomicBool,
}

/// A registration that lives as long as this guard.
///
/// - [`Registration::new`] registers the instance and returns once the registry has it.
/// - A background task refreshes the lease every third of the TTL. If the registry lost
///   the registration (its lease expired while the registry was unreachable, or it lost its
///   data), the task registers the instance again as soon as the registry answers.
/// - [`Registration::deregister`] removes it and waits for the registry's answer: call it
///   on graceful shutdown (see [`shutdown_signal`]). Dropping the guard also deregisters,
///   in the background (also when a panic unwinds through its owner).
/// - If the process dies without either, the registry drops the instance after the TTL.
pub struct Registration {
    instance: Instance,
    status: Arc<Status>,
    stop: Option<oneshot::Sender<Reply>>,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("instance", &self.instance)
            .field("registered", &self.is_registered())
            .field("registrations", &self.registrations())
            .finish()
    }
}

impl Registration {
    /// Registers `instance` in `registry` with `ttl` and keeps it registered until the
    /// guard is dropped or [`deregister`](Registration::deregister)ed.
    ///
    /// Fails if the instance is invalid or the first registration fails (the caller
    /// decides whether to retry or to start unregistered).
    pub async fn new<R: Registry>(
        registry: R,
        instance: Instance,
        ttl: Duration,
    ) -> Result<Self, DiscoveryError> {
        instance.validate()?;
        if ttl < Duration::from_millis(30) {
            return Err(DiscoveryError::InvalidConfig(
                "registration ttl must be at least 30ms".into(),
            ));
        }
        let lease = registry.register(&instance, ttl).await?;
        let status = Arc::new(Status::default());
        status.registrations.store(1, Ordering::Relaxed);
        status.registered.store(true, Ordering::Release);
        let (stop_tx, stop_rx) = oneshot::channel();
        tokio::spawn(keep(registry, lease, ttl, status.clone(), stop_rx));
        Ok(Registration {
            instance,
            status,
            stop: Some(stop_tx),
        })
    }

    /// The registered instance.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// `false` while the registry has lost the registration and it is not registered
    /// again yet.
    pub fn is_registered(&self) -> bool {
        self.status.registered.load(Ordering::Acquire)
    }

    /// How many times the instance was registered (1, plus one per re-registration).
    pub fn registrations(&self) -> u64 {
        self.status.registrations.load(Ordering::Relaxed)
    }

    /// Stops keeping the lease alive and removes the registration, waiting for the
    /// registry's answer (at most 5 s).
    pub async fn deregister(mut self) -> Result<(), DiscoveryError> {
        let Some(stop) = self.stop.take() else {
            return Ok(());
        };
        let (tx, rx) = oneshot::channel();
        if stop.send(tx).is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }

    /// Stops keeping the lease alive **without** deregistering, as if the process had
    /// crashed: the registry drops the instance when the TTL runs out. For tests and
    /// crash drills.
    pub fn abandon(mut self) {
        // Dropping the stop sender without sending ends the task silently.
        self.stop.take();
        self.status.registered.store(false, Ordering::Release);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let (tx, _rx) = oneshot::channel();
            let _ = stop.send(tx);
        }
    }
}

enum Stop {
    Deregister(Reply),
    Abandon,
}

async fn keep<R: Registry>(
    registry: R,
    mut lease: Lease,
    ttl: Duration,
    status: Arc<Status>,
    mut stop: oneshot::Receiver<Reply>,
) {
    let interval = ttl / 3;
    // While the registry does not answer, ask again much sooner than the next regular
    // refresh: when it comes back after an outage longer than the TTL it has expired the
    // lease, and every moment until the instance registers again is a moment watchers may
    // see it gone. Bounded by the refresh interval, so a short TTL is not slowed down.
    let retry_cap = interval.min(UNREACHABLE_RETRY_MAX);
    let mut retry = Backoff::new(Duration::from_millis(100).min(retry_cap), retry_cap);
    let mut unreachable = false;
    let stopped = loop {
        // Refresh the lease every third of the TTL, so two refreshes may fail in a row.
        let wait = if unreachable {
            retry.next_delay()
        } else {
            interval
        };
        tokio::select! {
            biased;
            s = &mut stop => break s.map_or(Stop::Abandon, Stop::Deregister),
            _ = tokio::time::sleep(wait) => {}
        }
        let result = tokio::select! {
            biased;
            s = &mut stop => break s.map_or(Stop::Abandon, Stop::Deregister),
            r = tokio::time::timeout(interval, registry.keep_alive(&lease)) => r,
        };
        match result {
            Ok(Ok(())) => {
                retry.reset();
                if unreachable {
                    tracing::info!(instance = %lease.instance(), "registry reachable again; lease kept");
                    unreachable = false;
                }
            }
            Ok(Err(e)) if e.is_lease_lost() => {
                tracing::warn!(instance = %lease.instance(), "registry lost the registration; registering again");
                status.registered.store(false, Ordering::Release);
                match reregister(&registry, &lease, ttl, &mut stop).await {
                    Ok(l) => {
                        lease = l;
                        unreachable = false;
                        retry.reset();
                        status.registrations.fetch_add(1, Ordering::Relaxed);
                        status.registered.store(true, Ordering::Release);
                        tracing::info!(instance = %lease.instance(), "registered again");
                    }
                    Err(s) => break s,
                }
            }
            Ok(Err(e)) => {
                if !unreachable {
                    tracing::warn!(instance = %lease.instance(), error = %e, "cannot refresh the registration; retrying");
                    unreachable = true;
                }
            }
            Err(_elapsed) => {
                if !unreachable {
                    tracing::warn!(instance = %lease.instance(), "registry did not answer the refresh in time; retrying");
                    unreachable = true;
                }
            }
        }
    };
    match stopped {
        Stop::Deregister(reply) => {
            let result = if status.registered.swap(false, Ordering::AcqRel) {
                match tokio::time::timeout(DEREGISTER_TIMEOUT, registry.deregister(&lease)).await {
                    Ok(r) => r,
                    Err(_) => Err(DiscoveryError::unavailable(
                        "registry",
                        "deregistration timed out",
                    )),
                }
            } else {
                Ok(())
            };
            if let Err(e) = &result {
                tracing::warn!(instance = %lease.instance(), error = %e, "deregistration failed; the registry drops it after the TTL");
            }
            let _ = reply.send(result);
        }
        Stop::Abandon => {
            status.registered.store(false, Ordering::Release);
        }
    }
}

/// Registers again with backoff until it works or the guard stops.
async fn reregister<R: Registry>(
    registry: &R,
    old: &Lease,
    ttl: Duration,
    stop: &mut oneshot::Receiver<Reply>,
) -> Result<Lease, Stop> {
    let mut backoff = Backoff::new(
        Duration::from_millis(50).min(ttl / 3),
        ttl.max(Duration::from_secs(1)),
    );
    loop {
        let attempt = tokio::select! {
            biased;
            s = &mut *stop => return Err(s.map_or(Stop::Abandon, Stop::Deregister)),
            r = tokio::time::timeout(ttl, registry.register(old.instance(), ttl)) => r,
        };
        match attempt {
            Ok(Ok(lease)) => return Ok(lease),
            Ok(Err(e)) => {
                tracing::debug!(instance = %old.instance(), error = %e, "registering again failed");
            }
            Err(_) => tracing::debug!(instance = %old.instance(), "registering again timed out"),
        }
        tokio::select! {
            biased;
            s = &mut *stop => return Err(s.map_or(Stop::Abandon, Stop::Deregister)),
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Completes on SIGINT or SIGTERM (Ctrl-C elsewhere): pass it to
/// [`serve_with_shutdown`](crate::server::serve_with_shutdown), then
/// [`Registration::deregister`], as the seed's instances deregister on exit and SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                None
            }
        };
        let term = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let int = async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::warn!(error = %e, "cannot listen for SIGINT");
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = int => {}
            _ = term => {}
        }
    }
    #[cfg(not(unix))]
    {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
