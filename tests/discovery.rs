//! Memory registry semantics (paused time), the Discover adapter, fail-static watchers,
//! a tower balancer following the registry, and path routing with 502.

mod discovery_support;

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};
use http::StatusCode;
use tokio::sync::mpsc;
use tower::discover::Change;
use tower_patterns::discovery::{
    DiscoveryError, Instance, Lease, MemoryRegistry, Registration, Registry, RegistryEvent,
    Selector, Watcher, WatcherConfig,
};
use tower_patterns::route::{Backend, RouteError, RouteTable};

use discovery_support::{balanced, client, get, serve, until, within};

fn inst(service: &str, id: &str, port: u16) -> Instance {
    Instance::new(service, id, "127.0.0.1", port)
}

#[tokio::test(start_paused = true)]
async fn register_lookup_and_deregister() {
    let reg = MemoryRegistry::new();
    let ttl = Duration::from_secs(10);
    let a = reg
        .register(
            &inst("api", "a1", 8001)
                .with_version("1.4.0")
                .with_tag("blue"),
            ttl,
        )
        .await
        .unwrap();
    let _b = reg
        .register(&inst("api", "a2", 8002).with_version("2.1.0"), ttl)
        .await
        .unwrap();
    reg.register(&inst("web", "w1", 9001), ttl).await.unwrap();

    let all = reg.instances("api").await.unwrap();
    assert_eq!(
        all.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["a1", "a2"]
    );
    let v2 = reg
        .lookup("api", &Selector::any().version("2"))
        .await
        .unwrap();
    assert_eq!(v2.len(), 1);
    assert_eq!(v2[0].id, "a2");
    let blue = reg
        .lookup("api", &Selector::any().tag("blue"))
        .await
        .unwrap();
    assert_eq!(blue[0].id, "a1");
    assert!(reg
        .lookup("api", &Selector::any().version("3"))
        .await
        .unwrap()
        .is_empty());
    assert!(reg.instances("nobody").await.unwrap().is_empty());

    reg.deregister(&a).await.unwrap();
    // Deregistering twice is fine.
    reg.deregister(&a).await.unwrap();
    let ids: Vec<_> = reg
        .instances("api")
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids, ["a2"]);
}

#[tokio::test(start_paused = true)]
async fn invalid_instances_are_refused() {
    let reg = MemoryRegistry::new();
    let ttl = Duration::from_secs(10);
    for bad in [
        inst("api", "a/1", 80),
        inst("", "a1", 80),
        inst("api", "a1", 0),
        Instance::new("api", "a1", "user@host", 80),
    ] {
        let err = reg.register(&bad, ttl).await.unwrap_err();
        assert!(matches!(err, DiscoveryError::InvalidInstance(_)), "{err}");
    }
    let err = Registration::new(reg.clone(), inst("api", "a1", 80), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, DiscoveryError::InvalidConfig(_)));
}

#[tokio::test(start_paused = true)]
async fn registration_without_keepalive_expires_after_ttl() {
    let reg = MemoryRegistry::new();
    let watcher = Watcher::new(&reg, "api", Selector::any());
    reg.register(&inst("api", "a1", 8001), Duration::from_secs(10))
        .await
        .unwrap();
    watcher.wait_until(|s| s.len() == 1).await;

    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(
        reg.instances("api").await.unwrap().len(),
        1,
        "still inside its TTL"
    );
    let start = tokio::time::Instant::now();
    watcher.wait_until(|s| s.is_empty()).await;
    assert!(reg.instances("api").await.unwrap().is_empty());
    // Removed at the deadline (10 s after registering), by the registry's own timer.
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn keepalive_refreshes_and_expired_lease_is_lost() {
    let reg = MemoryRegistry::new();
    let ttl = Duration::from_secs(10);
    let lease = reg.register(&inst("api", "a1", 8001), ttl).await.unwrap();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(6)).await;
        reg.keep_alive(&lease).await.unwrap();
    }
    assert_eq!(reg.instances("api").await.unwrap().len(), 1);
    tokio::time::sleep(Duration::from_secs(11)).await;
    let err = reg.keep_alive(&lease).await.unwrap_err();
    assert!(err.is_lease_lost(), "{err}");
}

#[tokio::test(start_paused = true)]
async fn reregistering_an_id_replaces_it_and_old_lease_cannot_remove_it() {
    let reg = MemoryRegistry::new();
    let ttl = Duration::from_secs(10);
    let old = reg.register(&inst("api", "a1", 8001), ttl).await.unwrap();
    let _new = reg.register(&inst("api", "a1", 8005), ttl).await.unwrap();
    reg.deregister(&old).await.unwrap();
    let list = reg.instances("api").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].port, 8005);
    assert!(reg.keep_alive(&old).await.unwrap_err().is_lease_lost());
}

#[tokio::test(start_paused = true)]
async fn guard_keeps_registration_alive_and_deregisters_on_drop() {
    let reg = MemoryRegistry::new();
    let watcher = Watcher::new(&reg, "api", Selector::any());
    let guard = Registration::new(reg.clone(), inst("api", "a1", 8001), Duration::from_secs(3))
        .await
        .unwrap();
    // Twenty TTLs later it is still registered: the guard refreshes it.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(reg.instances("api").await.unwrap().len(), 1);
    assert!(guard.is_registered());
    assert_eq!(guard.registrations(), 1);
    assert_eq!(watcher.len(), 1);

    drop(guard);
    let start = tokio::time::Instant::now();
    watcher.wait_until(|s| s.is_empty()).await;
    // Removed by the deregistration, not by the TTL.
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn explicit_deregister_waits_for_the_registry() {
    let reg = MemoryRegistry::new();
    let guard = Registration::new(reg.clone(), inst("api", "a1", 8001), Duration::from_secs(3))
        .await
        .unwrap();
    guard.deregister().await.unwrap();
    assert!(reg.instances("api").await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn crashed_instance_disappears_after_ttl() {
    let reg = MemoryRegistry::new();
    let watcher = Watcher::new(&reg, "api", Selector::any());
    let guard = Registration::new(reg.clone(), inst("api", "a1", 8001), Duration::from_secs(5))
        .await
        .unwrap();
    watcher.wait_until(|s| s.len() == 1).await;
    let start = tokio::time::Instant::now();
    guard.abandon(); // no deregistration, no more keepalive: a crash
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(watcher.len(), 1, "kept until the TTL runs out");
    watcher.wait_until(|s| s.is_empty()).await;
    let gone_after = start.elapsed();
    assert!(gone_after <= Duration::from_secs(5), "{gone_after:?}");
    assert!(gone_after > Duration::from_secs(2), "{gone_after:?}");
}

#[tokio::test(start_paused = true)]
async fn guard_registers_again_when_the_registry_lost_it() {
    let reg = MemoryRegistry::new();
    let watcher = Watcher::new(&reg, "api", Selector::any());
    let guard = Registration::new(reg.clone(), inst("api", "a1", 8001), Duration::from_secs(3))
        .await
        .unwrap();
    watcher.wait_until(|s| s.len() == 1).await;
    assert!(reg.evict("api", "a1"));
    watcher.wait_until(|s| s.is_empty()).await;
    watcher.wait_until(|s| s.len() == 1).await;
    until("the guard counts it", || guard.registrations() == 2).await;
    assert!(guard.is_registered());
}

#[tokio::test(start_paused = true)]
async fn watcher_applies_version_selector() {
    let reg = MemoryRegistry::new();
    let ttl = Duration::from_secs(30);
    let v2 = Watcher::new(&reg, "api", Selector::any().version("2"));
    let all = Watcher::new(&reg, "api", Selector::any());
    reg.register(&inst("api", "old", 1).with_version("1.9.0"), ttl)
        .await
        .unwrap();
    reg.register(&inst("api", "new", 2).with_version("2.0.1"), ttl)
        .await
        .unwrap();
    reg.register(&inst("api", "newer", 3).with_version("20.0"), ttl)
        .await
        .unwrap();
    all.wait_until(|s| s.len() == 3).await;
    let snap = v2.wait_until(|s| s.len() == 1).await;
    assert_eq!(snap.instances().next().unwrap().id, "new");
    // The same id re-registered with another version leaves the selection.
    reg.register(&inst("api", "new", 2).with_version("3.0"), ttl)
        .await
        .unwrap();
    v2.wait_until(|s| s.is_empty()).await;
}

#[tokio::test(start_paused = true)]
async fn discover_sends_inserts_and_removes() {
    let reg = MemoryRegistry::new();
    let ttl = Duration::from_secs(30);
    let a = reg.register(&inst("api", "a1", 8001), ttl).await.unwrap();
    let watcher = Watcher::new(&reg, "api", Selector::any());
    watcher.wait_until(|s| s.len() == 1).await;
    let mut discover = watcher.discover(|i: &Instance| Ok::<_, Infallible>(i.port));

    match discover.next().await.unwrap().unwrap() {
        Change::Insert(k, port) => assert_eq!((k.as_str(), port), ("a1", 8001)),
        Change::Remove(k) => panic!("unexpected remove {k}"),
    }
    reg.register(&inst("api", "a2", 8002), ttl).await.unwrap();
    match discover.next().await.unwrap().unwrap() {
        Change::Insert(k, port) => assert_eq!((k.as_str(), port), ("a2", 8002)),
        Change::Remove(k) => panic!("unexpected remove {k}"),
    }
    // Moving an instance to another port replaces its endpoint under the same key.
    reg.register(&inst("api", "a2", 8003), ttl).await.unwrap();
    match discover.next().await.unwrap().unwrap() {
        Change::Insert(k, port) => assert_eq!((k.as_str(), port), ("a2", 8003)),
        Change::Remove(k) => panic!("unexpected remove {k}"),
    }
    reg.deregister(&a).await.unwrap();
    match discover.next().await.unwrap().unwrap() {
        Change::Remove(k) => assert_eq!(k, "a1"),
        Change::Insert(k, _) => panic!("unexpected insert {k}"),
    }
}

#[tokio::test(start_paused = true)]
async fn discover_leaves_out_instances_it_cannot_make() {
    let reg = MemoryRegistry::new();
    let ttl = Duration::from_secs(30);
    reg.register(&inst("api", "bad", 1), ttl).await.unwrap();
    reg.register(&inst("api", "good", 2), ttl).await.unwrap();
    let watcher = Watcher::new(&reg, "api", Selector::any());
    watcher.wait_until(|s| s.len() == 2).await;
    let mut discover = watcher.discover(|i: &Instance| {
        if i.port == 1 {
            Err("refused")
        } else {
            Ok(i.port)
        }
    });
    match discover.next().await.unwrap().unwrap() {
        Change::Insert(k, _) => assert_eq!(k, "good"),
        Change::Remove(k) => panic!("unexpected remove {k}"),
    }
}

/// A registry whose change feed the test scripts, to check the watcher's own rules
/// (the real backends are exercised in the etcd and Consul tests).
#[derive(Clone)]
struct Scripted {
    feed: Arc<std::sync::Mutex<Option<mpsc::UnboundedReceiver<RegistryEvent>>>>,
}

impl Registry for Scripted {
    fn register<'a>(
        &'a self,
        i: &'a Instance,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, DiscoveryError>> {
        Box::pin(async move { Ok(Lease::new(i.clone(), 1, ttl)) })
    }
    fn keep_alive<'a>(&'a self, _: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        Box::pin(async { Ok(()) })
    }
    fn deregister<'a>(&'a self, _: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        Box::pin(async { Ok(()) })
    }
    fn instances<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<Instance>, DiscoveryError>> {
        Box::pin(async { Ok(vec![]) })
    }
    fn events(&self, _: &str) -> BoxStream<'static, RegistryEvent> {
        let rx = self.feed.lock().unwrap().take().unwrap();
        stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) }).boxed()
    }
}

#[tokio::test(start_paused = true)]
async fn watcher_is_fail_static_and_reports_staleness() {
    let (tx, rx) = mpsc::unbounded_channel();
    let reg = Scripted {
        feed: Arc::new(std::sync::Mutex::new(Some(rx))),
    };
    let watcher = Watcher::new(&reg, "api", Selector::any());
    assert!(!watcher.snapshot().is_synced());

    tx.send(RegistryEvent::Snapshot(vec![
        inst("api", "a1", 1),
        inst("api", "a2", 2),
    ]))
    .unwrap();
    let snap = watcher.wait_until(|s| s.len() == 2).await;
    assert!(snap.is_synced() && !snap.is_stale());

    let down = || RegistryEvent::Unavailable(DiscoveryError::Protocol("connection refused".into()));
    tx.send(down()).unwrap();
    let snap = watcher.wait_until(|s| s.is_stale()).await;
    assert_eq!(snap.len(), 2, "instances kept while the registry is down");
    assert!(snap.last_error().unwrap().contains("connection refused"));
    tokio::time::sleep(Duration::from_secs(42)).await;
    tx.send(down()).unwrap();
    let snap = watcher.snapshot();
    assert_eq!(snap.len(), 2);
    assert_eq!(snap.staleness(), Some(Duration::from_secs(42)));

    // Back: the registry's answer decides, including an instance that went away meanwhile,
    // once the reconnect grace (default 10 s) has given it time to register again.
    tx.send(RegistryEvent::Snapshot(vec![inst("api", "a2", 2)]))
        .unwrap();
    let snap = watcher.wait_until(|s| !s.is_stale()).await;
    assert_eq!(snap.len(), 2, "a1 held during the reconnect grace");
    assert_eq!(snap.held(), 1);
    assert_eq!(snap.staleness(), None);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let snap = watcher.wait_until(|s| s.held() == 0).await;
    assert_eq!(snap.len(), 1);
    assert!(snap.get("a2").is_some());
    // Instances of another service in the feed are ignored.
    tx.send(RegistryEvent::Put(inst("web", "w1", 3))).unwrap();
    tx.send(RegistryEvent::Delete("a2".into())).unwrap();
    let snap = watcher.wait_until(|s| s.is_empty()).await;
    assert!(snap.get("w1").is_none());
}

fn scripted() -> (mpsc::UnboundedSender<RegistryEvent>, Scripted) {
    let (tx, rx) = mpsc::unbounded_channel();
    let reg = Scripted {
        feed: Arc::new(std::sync::Mutex::new(Some(rx))),
    };
    (tx, reg)
}

/// A bound on paused-time waits: without the hold they would wait forever.
async fn soon<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(3600), fut)
        .await
        .unwrap_or_else(|_| panic!("never happened: {what}"))
}

fn unavailable() -> RegistryEvent {
    RegistryEvent::Unavailable(DiscoveryError::Protocol("connection refused".into()))
}

/// Issue 10 item 5: etcd back after an outage longer than the TTL expires every lease at
/// once, before the instances register again. The watcher holds those removals for the
/// reconnect grace; an instance that registers again ends its hold, one that does not is
/// removed when the grace ends.
#[tokio::test(start_paused = true)]
async fn removals_right_after_a_reconnect_are_held_for_the_grace() {
    let (tx, reg) = scripted();
    let watcher = Watcher::new(&reg, "api", Selector::any());
    let all = || {
        vec![
            inst("api", "a1", 1),
            inst("api", "a2", 2),
            inst("api", "a3", 3),
        ]
    };
    tx.send(RegistryEvent::Snapshot(all())).unwrap();
    watcher.wait_until(|s| s.len() == 3).await;

    tx.send(unavailable()).unwrap();
    watcher.wait_until(|s| s.is_stale()).await;
    // Back: the listed set still has the instances, then the lease expiries arrive one by
    // one (separate etcd revisions).
    tx.send(RegistryEvent::Snapshot(all())).unwrap();
    let mut rx = watcher.subscribe();
    for id in ["a1", "a2", "a3"] {
        tx.send(RegistryEvent::Delete(id.into())).unwrap();
    }
    let snap = soon(
        "removals held",
        watcher.wait_until(|s| !s.is_stale() && s.held() == 3),
    )
    .await;
    assert_eq!(snap.len(), 3, "nothing removed during the grace");
    // Re-registrations end the hold.
    tx.send(RegistryEvent::Put(inst("api", "a1", 1))).unwrap();
    tx.send(RegistryEvent::Put(inst("api", "a2", 2))).unwrap();
    let snap = watcher.wait_until(|s| s.held() == 1).await;
    assert_eq!(snap.len(), 3);
    // Every published snapshot had all three instances.
    while rx.has_changed().unwrap() {
        rx.borrow_and_update();
        assert_eq!(watcher.snapshot().len(), 3);
    }
    // a3 never came back: removed when its grace ends, not before.
    let start = tokio::time::Instant::now();
    let snap = watcher.wait_until(|s| s.len() == 2).await;
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    assert_eq!(snap.held(), 0);
    assert!(snap.get("a3").is_none());

    // After the grace, a removal is applied at once again.
    tx.send(RegistryEvent::Delete("a2".into())).unwrap();
    let start = tokio::time::Instant::now();
    watcher.wait_until(|s| s.len() == 1).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
}

/// Issue 10 item 5: every instance disappearing in one registry update (a registry
/// restarted without its data, a mass lease expiry) keeps the last set for `empty_hold`.
#[tokio::test(start_paused = true)]
async fn all_instances_gone_at_once_are_kept_for_a_bounded_time() {
    let (tx, reg) = scripted();
    let watcher = Watcher::new(&reg, "api", Selector::any());
    tx.send(RegistryEvent::Snapshot(vec![
        inst("api", "a1", 1),
        inst("api", "a2", 2),
    ]))
    .unwrap();
    watcher.wait_until(|s| s.len() == 2).await;
    // No outage was seen: only the "all gone at once" rule applies.
    tx.send(RegistryEvent::Snapshot(vec![])).unwrap();
    let snap = soon("all held", watcher.wait_until(|s| s.held() == 2)).await;
    assert_eq!(snap.len(), 2, "never empty because of a mass expiry");
    tx.send(RegistryEvent::Put(inst("api", "a1", 1))).unwrap();
    let snap = watcher.wait_until(|s| s.held() == 1).await;
    assert_eq!(snap.len(), 2);
    // Bounded: a2 goes after the default 30 s.
    let start = tokio::time::Instant::now();
    let snap = watcher.wait_until(|s| s.len() == 1).await;
    assert_eq!(start.elapsed(), Duration::from_secs(30));
    assert!(snap.get("a1").is_some());

    // The same with the rule disabled: applied at once.
    let (tx, reg) = scripted();
    let watcher = Watcher::with_config(
        &reg,
        "api",
        Selector::any(),
        WatcherConfig::new().empty_hold(Duration::ZERO),
    );
    tx.send(RegistryEvent::Snapshot(vec![
        inst("api", "a1", 1),
        inst("api", "a2", 2),
    ]))
    .unwrap();
    watcher.wait_until(|s| s.len() == 2).await;
    tx.send(RegistryEvent::Snapshot(vec![])).unwrap();
    let start = tokio::time::Instant::now();
    watcher.wait_until(|s| s.is_empty()).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
}

/// Deregistering instances one by one (a scale-down, a deploy) still empties a service at
/// once: only a single update that removes several instances is held.
#[tokio::test(start_paused = true)]
async fn instances_deregistered_one_by_one_leave_at_once() {
    let reg = MemoryRegistry::new();
    let watcher = Watcher::new(&reg, "api", Selector::any());
    let ttl = Duration::from_secs(10);
    let g1 = Registration::new(reg.clone(), inst("api", "a1", 1), ttl)
        .await
        .unwrap();
    let g2 = Registration::new(reg.clone(), inst("api", "a2", 2), ttl)
        .await
        .unwrap();
    watcher.wait_until(|s| s.len() == 2).await;
    let start = tokio::time::Instant::now();
    g1.deregister().await.unwrap();
    watcher.wait_until(|s| s.len() == 1).await;
    g2.deregister().await.unwrap();
    let snap = watcher.wait_until(|s| s.is_empty()).await;
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(snap.held(), 0);
}

/// Configured durations saturate instead of panicking (issue 10: `Duration::MAX`).
#[tokio::test(start_paused = true)]
async fn huge_watcher_holds_saturate() {
    let (tx, reg) = scripted();
    let watcher = Watcher::with_config(
        &reg,
        "api",
        Selector::any(),
        WatcherConfig::new()
            .reconnect_grace(Duration::MAX)
            .empty_hold(Duration::MAX),
    );
    tx.send(RegistryEvent::Snapshot(vec![
        inst("api", "a1", 1),
        inst("api", "a2", 2),
    ]))
    .unwrap();
    watcher.wait_until(|s| s.len() == 2).await;
    tx.send(RegistryEvent::Snapshot(vec![])).unwrap();
    watcher.wait_until(|s| s.held() == 2).await;
    tx.send(unavailable()).unwrap();
    tx.send(RegistryEvent::Snapshot(vec![inst("api", "a1", 1)]))
        .unwrap();
    tx.send(RegistryEvent::Delete("a1".into())).unwrap();
    let snap = watcher.wait_until(|s| !s.is_stale()).await;
    assert_eq!(snap.len(), 2);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(watcher.len(), 2, "held, and the watcher task is alive");
}

/// A memory registry whose refreshes fail while `down` is set, as if it were unreachable.
#[derive(Clone)]
struct Flaky {
    inner: MemoryRegistry,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl Registry for Flaky {
    fn register<'a>(
        &'a self,
        i: &'a Instance,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Lease, DiscoveryError>> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async { Err(DiscoveryError::Protocol("unreachable".into())) });
        }
        self.inner.register(i, ttl)
    }
    fn keep_alive<'a>(&'a self, l: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(async {
                Err(DiscoveryError::Unavailable {
                    registry: "flaky",
                    source: "connection refused".into(),
                })
            });
        }
        self.inner.keep_alive(l)
    }
    fn deregister<'a>(&'a self, l: &'a Lease) -> BoxFuture<'a, Result<(), DiscoveryError>> {
        self.inner.deregister(l)
    }
    fn instances<'a>(&'a self, s: &'a str) -> BoxFuture<'a, Result<Vec<Instance>, DiscoveryError>> {
        self.inner.instances(s)
    }
    fn events(&self, s: &str) -> BoxStream<'static, RegistryEvent> {
        self.inner.events(s)
    }
}

/// Issue 10 item 5: after an outage longer than the TTL the registration must come back
/// as soon as the registry answers, not at the next TTL/3 refresh (up to 10 s here, while
/// watchers had already applied the expiry).
#[tokio::test(start_paused = true)]
async fn guard_registers_again_as_soon_as_the_registry_is_back() {
    use std::sync::atomic::Ordering;
    let reg = Flaky {
        inner: MemoryRegistry::new(),
        down: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    let ttl = Duration::from_secs(30); // refreshed every 10 s
    let guard = Registration::new(reg.clone(), inst("api", "a1", 8001), ttl)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    reg.down.store(true, Ordering::SeqCst);
    // The lease (last refreshed at 0 s) expires at 30 s; the registry is back at 41 s.
    tokio::time::sleep(Duration::from_secs(36)).await;
    assert!(reg.inner.instances("api").await.unwrap().is_empty());
    reg.down.store(false, Ordering::SeqCst);
    let back = tokio::time::Instant::now();
    let registered = tokio::time::timeout(Duration::from_secs(60), async {
        while reg.inner.instances("api").await.unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    registered.await.unwrap();
    let took = back.elapsed();
    assert!(
        took <= Duration::from_secs(1),
        "registered again after {took:?}"
    );
    assert_eq!(guard.registrations(), 2);
    assert!(guard.is_registered());
}

/// Configured durations saturate: a TTL of `Duration::MAX` never panics (issue 10 item 2).
#[tokio::test(start_paused = true)]
async fn huge_ttls_saturate() {
    let reg = MemoryRegistry::new();
    let watcher = Watcher::new(&reg, "api", Selector::any());
    let lease = reg
        .register(&inst("api", "a1", 8001), Duration::MAX)
        .await
        .unwrap();
    reg.keep_alive(&lease).await.unwrap();
    let guard = Registration::new(reg.clone(), inst("api", "a2", 8002), Duration::MAX)
        .await
        .unwrap();
    watcher.wait_until(|s| s.len() == 2).await;
    tokio::time::sleep(Duration::from_secs(86_400 * 365)).await;
    assert_eq!(reg.instances("api").await.unwrap().len(), 2);
    assert!(guard.is_registered());
    guard.deregister().await.unwrap();
    watcher.wait_until(|s| s.len() == 1).await;
    reg.deregister(&lease).await.unwrap();
}

#[tokio::test]
async fn tower_balancer_follows_the_registry() {
    use tower::ServiceExt;
    let reg = MemoryRegistry::new();
    let b1 = discovery_support::Backend::start("one").await;
    let b2 = discovery_support::Backend::start("two").await;
    let watcher = Watcher::new(&reg, "api", Selector::any());
    let balance = balanced(&watcher);
    let router_addr = serve(tower::service_fn(move |req| balance.clone().oneshot(req))).await;
    let client = client();
    let ttl = Duration::from_secs(10);
    let g1 = Registration::new(reg.clone(), inst("api", "one", b1.port()), ttl)
        .await
        .unwrap();
    let g2 = Registration::new(reg.clone(), inst("api", "two", b2.port()), ttl)
        .await
        .unwrap();
    watcher.wait_until(|s| s.len() == 2).await;

    let mut seen = HashSet::new();
    within("both instances answer", async {
        while seen.len() < 2 {
            let (status, body) = get(&client, router_addr, "/").await;
            assert_eq!(status, StatusCode::OK);
            seen.insert(body);
        }
    })
    .await;

    g1.deregister().await.unwrap();
    watcher.wait_until(|s| s.len() == 1).await;
    // The balancer drops the endpoint without a restart: every answer is from "two".
    for _ in 0..20 {
        let (status, body) = get(&client, router_addr, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "two");
    }
    drop(g2);
}

#[tokio::test]
async fn router_answers_502_without_instances_and_routes_by_longest_prefix() {
    let reg = MemoryRegistry::new();
    let api = discovery_support::Backend::start("api").await;
    let web = discovery_support::Backend::start("web").await;
    let admin = discovery_support::Backend::start("admin").await;
    let router = RouteTable::new()
        .route("/api", "api-service")
        .route("/", "webapp-service")
        .route("/api/admin", "admin-service")
        .build(|service, selector| {
            let watcher = Watcher::new(&reg, service, selector.clone());
            Backend::new(balanced(&watcher), watcher)
        })
        .unwrap();
    assert_eq!(router.resolve("/api/admin/x"), Some("admin-service"));
    assert_eq!(router.resolve("/api/v1"), Some("api-service"));
    assert_eq!(router.resolve("/index.html"), Some("webapp-service"));
    let addr = serve(router.clone()).await;
    let client = client();

    let (status, body) = get(&client, addr, "/api").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("api-service"), "{body}");

    let ttl = Duration::from_secs(10);
    let _w = Registration::new(reg.clone(), inst("webapp-service", "w", web.port()), ttl)
        .await
        .unwrap();
    router
        .backend("webapp-service")
        .unwrap()
        .watcher()
        .unwrap()
        .wait_until(|s| s.len() == 1)
        .await;
    assert_eq!(
        get(&client, addr, "/").await,
        (StatusCode::OK, "web".into())
    );
    assert_eq!(
        get(&client, addr, "/api/users").await.0,
        StatusCode::BAD_GATEWAY
    );

    let _a = Registration::new(reg.clone(), inst("api-service", "a", api.port()), ttl)
        .await
        .unwrap();
    let _m = Registration::new(reg.clone(), inst("admin-service", "m", admin.port()), ttl)
        .await
        .unwrap();
    for s in ["api-service", "admin-service"] {
        router
            .backend(s)
            .unwrap()
            .watcher()
            .unwrap()
            .wait_until(|s| s.len() == 1)
            .await;
    }
    assert_eq!(
        get(&client, addr, "/api/users").await,
        (StatusCode::OK, "api".into())
    );
    assert_eq!(
        get(&client, addr, "/api/admin/x").await,
        (StatusCode::OK, "admin".into())
    );
    assert_eq!(
        get(&client, addr, "/about").await,
        (StatusCode::OK, "web".into())
    );
}

#[tokio::test]
async fn router_maps_upstream_failure_to_502_and_unknown_path_to_404() {
    let reg = MemoryRegistry::new();
    let router = RouteTable::new()
        .route("/api", "api-service")
        .build(|service, selector| {
            let watcher = Watcher::new(&reg, service, selector.clone());
            Backend::new(balanced(&watcher), watcher)
        })
        .unwrap();
    let addr = serve(router.clone()).await;
    let client = client();
    assert_eq!(get(&client, addr, "/other").await.0, StatusCode::NOT_FOUND);

    // Registered, but nothing listens there: the proxy's 502, not a hang.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let _g = Registration::new(
        reg.clone(),
        inst("api-service", "dead", dead),
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    router
        .backend("api-service")
        .unwrap()
        .watcher()
        .unwrap()
        .wait_until(|s| s.len() == 1)
        .await;
    let (status, _) = get(&client, addr, "/api").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn router_routes_by_version() {
    let reg = MemoryRegistry::new();
    let v1 = discovery_support::Backend::start("api v1").await;
    let v2 = discovery_support::Backend::start("api v2").await;
    let router = RouteTable::new()
        .route_to("/v1/", "api-service", Selector::any().version("1"))
        .route_to("/v2/", "api-service", Selector::any().version("2"))
        .route("/latest/", "api-service")
        .build(|service, selector| {
            let watcher = Watcher::new(&reg, service, selector.clone());
            Backend::new(balanced(&watcher), watcher)
        })
        .unwrap();
    let addr = serve(router.clone()).await;
    let client = client();
    let ttl = Duration::from_secs(10);
    let _g2 = Registration::new(
        reg.clone(),
        inst("api-service", "v2", v2.port()).with_version("2.4.0"),
        ttl,
    )
    .await
    .unwrap();
    router
        .backend_for("/v2/")
        .unwrap()
        .watcher()
        .unwrap()
        .wait_until(|s| s.len() == 1)
        .await;
    // No version-1 instance yet: 502 for /v1/, even though version 2 is up.
    assert_eq!(
        get(&client, addr, "/v1/users").await.0,
        StatusCode::BAD_GATEWAY
    );
    assert_eq!(
        get(&client, addr, "/v2/users").await,
        (StatusCode::OK, "api v2".into())
    );

    let _g1 = Registration::new(
        reg.clone(),
        inst("api-service", "v1", v1.port()).with_version("1.9.3"),
        ttl,
    )
    .await
    .unwrap();
    router
        .backend_for("/v1/")
        .unwrap()
        .watcher()
        .unwrap()
        .wait_until(|s| s.len() == 1)
        .await;
    router
        .backend_for("/latest/")
        .unwrap()
        .watcher()
        .unwrap()
        .wait_until(|s| s.len() == 2)
        .await;
    for _ in 0..10 {
        assert_eq!(
            get(&client, addr, "/v1/users").await,
            (StatusCode::OK, "api v1".into())
        );
        assert_eq!(
            get(&client, addr, "/v2/users").await,
            (StatusCode::OK, "api v2".into())
        );
    }
}

#[test]
fn route_table_is_validated() {
    let make = |_: &str, _: &Selector| {
        Backend::fixed(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(
                http_body_util::Empty::<bytes::Bytes>::new(),
            ))
        }))
    };
    assert!(matches!(
        RouteTable::new().route("api", "a").build(make),
        Err(RouteError::InvalidPrefix(_))
    ));
    assert!(matches!(
        RouteTable::new()
            .route("/a", "a")
            .route("/a", "b")
            .build(make),
        Err(RouteError::DuplicatePrefix(_))
    ));
    assert!(matches!(
        RouteTable::new().route("/a", "").build(make),
        Err(RouteError::EmptyService(_))
    ));
    let mut calls = 0;
    let router = RouteTable::new()
        .route("/a", "same")
        .route("/b", "same")
        .build(|s, sel| {
            calls += 1;
            make(s, sel)
        })
        .unwrap();
    assert_eq!(calls, 1, "one backend per service");
    assert_eq!(router.resolve("/b"), Some("same"));
    assert_eq!(router.resolve("/c"), None);
}

#[tokio::test]
async fn our_balancer_follows_the_registry_round_robin() {
    use tower_patterns::balance::{Balance, ReplayLayer};
    use tower_patterns::body::ReplayBody;
    use tower_patterns::proxy::{Forward, ForwardBuilder};

    let reg = MemoryRegistry::new();
    let b1 = discovery_support::Backend::start("one").await;
    let b2 = discovery_support::Backend::start("two").await;
    let watcher = Watcher::new(&reg, "api", Selector::any());
    let template: Forward<ReplayBody<hyper::body::Incoming>> =
        ForwardBuilder::new("http://127.0.0.1:1").build().unwrap();
    let (balance, driver) = Balance::builder().build(watcher.discover(template));
    tokio::spawn(driver);
    let members = balance.clone();
    let front = serve(
        tower::ServiceBuilder::new()
            .layer(tower_patterns::proxy::ErrorResponseLayer)
            .layer(ReplayLayer::new(1024))
            .service(balance),
    )
    .await;
    let client = client();
    let ttl = Duration::from_secs(10);
    let g1 = Registration::new(reg.clone(), inst("api", "one", b1.port()), ttl)
        .await
        .unwrap();
    let g2 = Registration::new(reg.clone(), inst("api", "two", b2.port()), ttl)
        .await
        .unwrap();
    until("the balancer has both instances", || members.len() == 2).await;

    // Round robin: strictly alternating answers.
    let mut answers = Vec::new();
    for _ in 0..6 {
        let (status, body) = get(&client, front, "/").await;
        assert_eq!(status, StatusCode::OK);
        answers.push(body);
    }
    for pair in answers.windows(2) {
        assert_ne!(pair[0], pair[1], "round robin alternates: {answers:?}");
    }

    g1.deregister().await.unwrap();
    until("the balancer dropped the instance", || members.len() == 1).await;
    for _ in 0..10 {
        let (status, body) = get(&client, front, "/").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "two"));
    }
    g2.deregister().await.unwrap();
    until("the balancer is empty", || members.is_empty()).await;
    let (status, _) = get(&client, front, "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "no instance: 502");
}
