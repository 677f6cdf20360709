//! Tests of the watcher's task (`follow`) beside it: how it treats the end of a
//! registry's feed.

use super::*;

fn shared() -> Arc<Shared> {
    Arc::new(Shared {
        service: "svc".to_string(),
        selector: Selector::any(),
        current: ArcSwap::from_pointee(Snapshot::empty()),
        changed: watch::channel(0).0,
    })
}

/// A feed that ends right behind an event, both ready at once: the batch that reads the
/// event sees the end. An `unfold` (as the memory and etcd registries' feeds are) panics
/// when polled after its end; the task must apply the batch and stop without polling it
/// again (it did poll again before the feed was fused: "`Unfold` must not be polled after
/// it returned `Poll::Ready(None)`" when the example's registry was dropped).
#[tokio::test]
async fn a_feed_that_ends_inside_a_batch_is_applied_and_not_polled_again() {
    let events = futures_util::stream::unfold(true, |first| async move {
        first.then(|| {
            let list = vec![Instance::new("svc", "a", "127.0.0.1", 1)];
            (RegistryEvent::Snapshot(list), false)
        })
    })
    .boxed();
    let shared = shared();
    tokio::time::timeout(
        Duration::from_secs(5),
        follow(shared.clone(), events, WatcherConfig::default()),
    )
    .await
    .expect("the task stops when its feed ends");
    let now = shared.current.load_full();
    assert_eq!(now.len(), 1, "the last batch was applied");
    assert!(now.synced);
}
