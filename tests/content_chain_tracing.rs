//! The chain emits one `tracing` event per hop. In its own test binary: the subscriber is
//! global here, so no test running in parallel can race the callsite interest cache.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tower::ServiceExt;
use tower_patterns::body::ReplayBody;
use tower_patterns::chain::{ChainLayer, LinkService, LinkTable};

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type Req = Request<ReplayBody<Full<Bytes>>>;

fn store(name: &'static str, has: &'static str) -> LinkService<Full<Bytes>> {
    let svc = tower::service_fn(move |req: Req| {
        let status = if req.uri().path() == has {
            StatusCode::OK
        } else {
            StatusCode::NOT_FOUND
        };
        let mut res = Response::new(Full::new(Bytes::from(name)));
        *res.status_mut() = status;
        std::future::ready(Ok::<_, Infallible>(res))
    });
    LinkService::new(
        svc.map_response(|r| r.map(tower_patterns::body::boxed))
            .map_err(Into::into),
    )
}

#[tokio::test]
async fn each_hop_emits_a_tracing_event() {
    let buf = Buf::default();
    let writer = buf.clone();
    tracing_subscriber::fmt()
        .with_env_filter("tower_patterns::chain=debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let table = LinkTable::builder()
        .vhost("a.com", store("a", "/none"))
        .vhost("b.com", store("b", "/none"))
        .vhost("c.com", store("c", "/f"))
        .link("a.com", "404".parse().unwrap(), "b.com")
        .link("b.com", "4xx".parse().unwrap(), "c.com")
        .chain(ChainLayer::new())
        .build()
        .unwrap();
    let req = Request::get("/f")
        .header("host", "a.com")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = table.oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let hops: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("content chain hop"))
        .collect();
    assert_eq!(hops.len(), 2, "{log}");
    assert!(
        hops[0].contains("from=a.com to=b.com reason=status 404"),
        "{log}"
    );
    assert!(
        hops[1].contains("from=b.com to=c.com reason=status 404"),
        "{log}"
    );
}
