//! `compose::Part` bounds: body limit, timeout, retries, circuit, fallback; `Composite`'s
//! status table.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::json;
use tower_patterns::breaker::{Circuit, CircuitBreakerConfig, State, Window};
use tower_patterns::compose::{Call, Composite, Outcome, Part, PartResult};

/// Answers `status` with `body`, counting calls.
fn svc(
    status: u16,
    body: &'static str,
    calls: Arc<AtomicU32>,
) -> impl tower::Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future: Send,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |_req: Request<Full<Bytes>>| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            let mut res = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *res.status_mut() = StatusCode::from_u16(status).unwrap();
            Ok::<_, Infallible>(res)
        }
    })
}

#[tokio::test]
async fn a_body_over_the_bound_is_a_failure_not_a_buffer() {
    let calls = Arc::default();
    let part = Part::new("big", svc(200, "[1,2,3,4,5,6,7,8,9,10]", calls)).max_body(8);
    let r = part.send(Call::get("/")).await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(r.error.as_deref(), Some("response body too large"));
    assert!(r.body.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_try_that_never_answers_times_out_and_is_retried() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let never = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        c.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<Result<Response<Full<Bytes>>, Infallible>>()
    });
    let part = Part::new("slow", never).timeout(Duration::from_millis(100));
    let start = tokio::time::Instant::now();
    let r = part.send(Call::get("/").tries(3)).await;
    assert_eq!(r.outcome, Outcome::Failed);
    assert_eq!(r.error.as_deref(), Some("timeout"));
    assert_eq!(r.attempts, 3);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // Three timeouts plus the 10 ms and 20 ms pauses between tries.
    assert_eq!(start.elapsed(), Duration::from_millis(330));
}

#[tokio::test]
async fn a_post_without_an_idempotency_key_is_tried_once() {
    let calls = Arc::new(AtomicU32::new(0));
    let part = Part::new("pay", svc(503, "", calls.clone()));
    let r = part.send(Call::post("/pay", &json!({})).tries(3)).await;
    assert_eq!((r.attempts, r.status), (1, Some(503)));
    let r = part
        .send(
            Call::post("/pay", &json!({}))
                .idempotency_key("k1")
                .unwrap()
                .tries(3),
        )
        .await;
    assert_eq!(r.attempts, 3);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert!(Call::get("/").idempotency_key("bad\nkey").is_none());
}

#[tokio::test]
async fn an_open_circuit_fails_at_once_and_the_fallback_answers() {
    let calls = Arc::new(AtomicU32::new(0));
    let circuit = Circuit::new(
        CircuitBreakerConfig::new()
            .name("p")
            .window(Window::Count(4))
            .minimum_calls(4)
            .wait_in_open(Duration::from_secs(60)),
    )
    .unwrap();
    let part = Part::new("p", svc(500, "", calls.clone()))
        .breaker(circuit.clone())
        .fallback(json!({"available": "unknown"}));
    for _ in 0..4 {
        assert_eq!(part.send(Call::get("/")).await.outcome, Outcome::Fallback);
    }
    assert_eq!(circuit.state(), State::Open);
    let r = part.send(Call::get("/")).await;
    assert_eq!(r.outcome, Outcome::Fallback);
    assert_eq!(r.error.as_deref(), Some("circuit open"));
    assert_eq!(r.body, Some(json!({"available": "unknown"})));
    assert_eq!(calls.load(Ordering::SeqCst), 4, "not called while open");
}

#[test]
fn composite_status_table() {
    let ok = |n: &str| PartResult {
        name: n.into(),
        outcome: Outcome::Ok,
        status: Some(200),
        attempts: 1,
        body: Some(json!(1)),
        error: None,
    };
    let with = |n: &str, o: Outcome| PartResult {
        outcome: o,
        ..ok(n)
    };
    let status = |parts: Vec<PartResult>| {
        let mut c = Composite::new();
        for p in parts {
            c.push(p);
        }
        (c.http_status(), c.to_json()["complete"].clone())
    };
    assert_eq!(
        status(vec![ok("a"), ok("b")]),
        (StatusCode::OK, json!(true))
    );
    assert_eq!(
        status(vec![ok("a"), with("b", Outcome::Fallback)]),
        (StatusCode::MULTI_STATUS, json!(false))
    );
    assert_eq!(
        status(vec![
            with("a", Outcome::Fallback),
            with("b", Outcome::Failed)
        ])
        .0,
        StatusCode::MULTI_STATUS
    );
    assert_eq!(
        status(vec![with("a", Outcome::Failed), PartResult::skipped("b")]).0,
        StatusCode::BAD_GATEWAY
    );
    let mut c = Composite::new();
    c.push(ok("a")).field("order", json!("o1"));
    let j = c.to_json();
    assert_eq!(j["parts"]["a"]["outcome"], "ok");
    assert_eq!(j["order"], "o1");
}
