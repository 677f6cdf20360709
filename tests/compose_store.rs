//! `compose` over real sockets: the Node.js chapter's store as `examples/api_gateway/`
//! builds it (included here): the cart read composition and the checkout orchestration,
//! including a step that fails after the payment succeeded.

#[path = "../examples/api_gateway/main.rs"]
#[allow(dead_code)]
mod gateway;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use gateway::{fetch, gateway, serve, start_upstreams, Upstreams, API_KEY};
use http::StatusCode;
use serde_json::Value;

async fn start() -> (Upstreams, SocketAddr) {
    let up = start_upstreams().await.unwrap();
    let (app, handles) = gateway(&up, None).unwrap();
    for w in &handles.watchers {
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            w.wait_until(|s| s.len() == 2),
        )
        .await
        .unwrap();
    }
    let gw = serve(app).await.unwrap();
    (up, gw)
}

fn outcome<'a>(body: &'a Value, part: &str) -> &'a str {
    body["parts"][part]["outcome"]
        .as_str()
        .unwrap_or_else(|| panic!("{part} in {body}"))
}

#[tokio::test]
async fn cart_view_composes_the_cart_and_its_products() {
    let (_up, gw) = start().await;
    let (status, body) = fetch(gw, "GET", "/bff/cart/u1", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["complete"], true);
    assert_eq!(outcome(&body, "cart"), "ok");
    assert_eq!(body["parts"]["product:p1"]["body"]["name"], "keyboard");
    assert_eq!(body["parts"]["product:p2"]["body"]["name"], "mouse");
}

#[tokio::test]
async fn cart_view_falls_back_per_product_when_the_product_service_fails() {
    let (up, gw) = start().await;
    up.store.products_down.store(true, Ordering::SeqCst);
    let (status, body) = fetch(gw, "GET", "/bff/cart/u1", &[]).await.unwrap();
    assert_eq!(status, StatusCode::MULTI_STATUS, "{body}");
    assert_eq!(body["complete"], false);
    assert_eq!(outcome(&body, "cart"), "ok");
    let p1 = &body["parts"]["product:p1"];
    assert_eq!(p1["outcome"], "fallback", "{body}");
    assert_eq!(p1["status"], 503);
    assert_eq!(p1["attempts"], 2);
    assert_eq!(p1["body"]["available"], "unknown");
}

#[tokio::test]
async fn checkout_pays_then_empties_the_cart_and_updates_the_stock() {
    let (up, gw) = start().await;
    let key = [("idempotency-key", "order-1"), ("x-api-key", API_KEY)];
    let (status, body) = fetch(gw, "POST", "/bff/checkout/u2", &key).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["order"], "order-1");
    for part in ["cart", "checkout/pay", "cart/delete", "product/update"] {
        assert_eq!(outcome(&body, part), "ok", "{part}: {body}");
    }
    assert_eq!(up.store.stock("p1"), 99);
    assert_eq!(up.store.stock("p2"), 98);
    assert!(!up.store.carts.lock().unwrap().contains_key("u2"));
    assert_eq!(up.store.charges.lock().unwrap()["order-1:pay"], 3000);
}

#[tokio::test]
async fn a_step_failing_once_after_payment_is_retried_with_the_same_key() {
    let (up, gw) = start().await;
    up.store.fail_updates.store(1, Ordering::SeqCst);
    let (status, body) = fetch(
        gw,
        "POST",
        "/bff/checkout/u3",
        &[("idempotency-key", "o2"), ("x-api-key", API_KEY)],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["parts"]["product/update"]["attempts"], 2, "{body}");
    assert_eq!(up.store.stock("p1"), 99, "updated once");
}

#[tokio::test]
async fn a_step_failing_after_payment_answers_207_and_a_resend_completes_without_charging_twice() {
    let (up, gw) = start().await;
    up.store.fail_updates.store(100, Ordering::SeqCst);
    let key = [("idempotency-key", "o3"), ("x-api-key", API_KEY)];
    let (status, body) = fetch(gw, "POST", "/bff/checkout/u4", &key).await.unwrap();
    assert_eq!(status, StatusCode::MULTI_STATUS, "{body}");
    assert_eq!(body["complete"], false);
    assert_eq!(body["payment"], "captured");
    assert_eq!(outcome(&body, "checkout/pay"), "ok");
    assert_eq!(
        outcome(&body, "cart/delete"),
        "skipped",
        "the cart stays for the resend"
    );
    let upd = &body["parts"]["product/update"];
    assert_eq!(upd["outcome"], "failed", "{body}");
    assert_eq!(upd["attempts"], 3);
    assert_eq!(upd["status"], 503);
    assert!(body["next"].as_str().unwrap().contains("Idempotency-Key"));
    assert_eq!(up.store.stock("p1"), 100, "not updated");

    // The client resends with the same key once the service is back: the payment is not
    // taken again, the stock is updated once, the deleted cart is not an error.
    up.store.fail_updates.store(0, Ordering::SeqCst);
    let pay_calls = up.store.pay_calls.load(Ordering::SeqCst);
    let (status, body) = fetch(gw, "POST", "/bff/checkout/u4", &key).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(up.store.pay_calls.load(Ordering::SeqCst), pay_calls + 1);
    assert_eq!(up.store.charges.lock().unwrap().len(), 1, "charged once");
    assert_eq!(up.store.stock("p1"), 99);
    assert!(!up.store.carts.lock().unwrap().contains_key("u4"));
}

#[tokio::test]
async fn a_declined_payment_changes_nothing_and_answers_502() {
    let (up, gw) = start().await;
    up.store.payment_declined.store(true, Ordering::SeqCst);
    let (status, body) = fetch(
        gw,
        "POST",
        "/bff/checkout/u5",
        &[("idempotency-key", "o4"), ("x-api-key", API_KEY)],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["payment"], "not charged");
    assert_eq!(body["parts"]["checkout/pay"]["status"], 402);
    assert_eq!(
        body["parts"]["checkout/pay"]["attempts"], 1,
        "a 4xx is not retried"
    );
    assert_eq!(outcome(&body, "cart/delete"), "skipped");
    assert_eq!(outcome(&body, "product/update"), "skipped");
    assert!(up.store.carts.lock().unwrap().contains_key("u5"));
    assert_eq!(up.store.stock("p1"), 100);
}

#[tokio::test]
async fn a_user_id_cannot_reach_other_upstream_paths() {
    let (up, gw) = start().await;
    let (status, _) = fetch(gw, "GET", "/bff/cart/..%2Fproduct%2Fp1", &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = fetch(
        gw,
        "POST",
        "/bff/checkout/u1%3Fx",
        &[("idempotency-key", "k"), ("x-api-key", API_KEY)],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(up.store.pay_calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn checkout_needs_the_api_key() {
    let (up, gw) = start().await;
    let (status, _) = fetch(gw, "POST", "/bff/checkout/u6", &[("idempotency-key", "o6")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = fetch(
        gw,
        "POST",
        "/bff/checkout/u6",
        &[
            ("idempotency-key", "o6"),
            ("x-api-key", "wrong-key-0123456789abcdef"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        up.store.pay_calls.load(Ordering::SeqCst),
        0,
        "nothing reached the services"
    );
    // The cart view needs none.
    let (status, _) = fetch(gw, "GET", "/bff/cart/u6", &[]).await.unwrap();
    assert_eq!(status, StatusCode::OK);
}
