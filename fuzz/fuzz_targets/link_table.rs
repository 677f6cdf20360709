//! Link-table configuration from text: `host[>target]` per line, then `Host` lookups.
//! Building never panics; a built table routes every host along a finite path.
#![no_main]

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use libfuzzer_sys::fuzz_target;
use tower_patterns::body::ReplayBody;
use tower_patterns::chain::LinkTable;
use tower_patterns::classify::Condition;

type Svc = tower::util::BoxCloneSyncService<
    Request<ReplayBody<Full<Bytes>>>,
    Response<Full<Bytes>>,
    Infallible,
>;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let svc = || {
        Svc::new(tower::service_fn(|_req| async {
            Ok(Response::new(Full::default()))
        }))
    };
    let mut b = LinkTable::<Full<Bytes>>::builder();
    let mut hosts = Vec::new();
    for line in text.lines() {
        match line.split_once('>') {
            Some((from, to)) => b = b.link(from, Condition::never().status_class(4), to),
            None => {
                b = b.vhost(line, svc());
                hosts.push(line);
            }
        }
    }
    if let Ok(table) = b.build() {
        let n = table.hosts().count();
        for h in hosts
            .iter()
            .chain(text.split(' ').collect::<Vec<_>>().iter())
        {
            if let Some(route) = table.route(h) {
                assert!(!route.is_empty() && route.len() <= n, "{h:?}: {route:?}");
            }
        }
    }
});
