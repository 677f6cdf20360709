//! The compositions: the cart view (read composition) and the checkout orchestration.

use super::*;

/// What the compositions use.
pub struct Bff {
    pub(super) cart: Part,
    /// Reads: a fallback value stands in when the product service fails.
    pub(super) product_read: Part,
    /// Writes: never a fallback (a stock update did or did not happen).
    pub(super) product: Part,
    pub(super) checkout: Part,
}

/// What a caller can look at after building the gateway.
/// Read composition: the cart, then every product it lists, concurrently.
pub(super) async fn cart_view(
    State(bff): State<Arc<Bff>>,
    Path(user): Path<String>,
    Extension(cx): Extension<TraceContext>,
) -> Response {
    if !valid_user(&user) {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let mut answer = Composite::new();
    let cart = bff
        .cart
        .send(Call::get(format!("/cart/{user}")).tries(2).trace(Some(&cx)))
        .await;
    let ids: Vec<String> = cart
        .body
        .as_ref()
        .and_then(|b| b["items"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|i| i["product"].as_str().map(str::to_owned))
        .collect();
    answer.push(cart);
    let reads = ids.iter().map(|id| {
        let call = Call::get(format!("/product/{id}"))
            .tries(2)
            .trace(Some(&cx));
        let product = bff.product_read.clone();
        let id = id.clone();
        async move {
            let mut r = product.send(call).await;
            r.name = format!("product:{id}");
            r
        }
    });
    for r in futures_util::future::join_all(reads).await {
        answer.push(r);
    }
    json_response(&answer)
}

/// The checkout orchestration: read the cart, `checkout/pay`, then `product/update`, then
/// `cart/delete`. Every step carries an idempotency key derived from the
/// client's `Idempotency-Key` (or a new one), so retries — ours, or the client resending
/// the checkout with the same key — never charge or update twice.
pub(super) async fn checkout_flow(
    State(bff): State<Arc<Bff>>,
    Path(user): Path<String>,
    Extension(cx): Extension<TraceContext>,
    headers: HeaderMap,
) -> Response {
    if !valid_user(&user) {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let order = key(&headers)
        .filter(|k| !k.is_empty() && k.len() <= 64)
        .unwrap_or_else(|| TraceId::random().to_string());
    let mut answer = Composite::new();
    answer.field("order", json!(order));
    let step = |call: Call, suffix: &str| {
        call.idempotency_key(&format!("{order}:{suffix}"))
            .map(|c| c.tries(3).trace(Some(&cx)))
    };
    let read = Call::get(format!("/cart/{user}")).tries(2).trace(Some(&cx));
    let cart = bff.cart.send(read).await;
    let items = cart
        .body
        .as_ref()
        .map(|b| b["items"].clone())
        .unwrap_or(Value::Null);
    let amount: u64 = items
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| i["qty"].as_u64().unwrap_or(0) * 1000)
        .sum();
    let cart_ok = cart.is_ok() && amount > 0;
    answer.push(cart);
    let pay = match (
        cart_ok,
        step(
            Call::post("/checkout/pay", &json!({"user": user, "amount": amount})),
            "pay",
        ),
    ) {
        (true, Some(call)) => bff.checkout.send(call).await,
        _ => PartResult::skipped("checkout/pay"),
    };
    let paid = pay.is_ok();
    let mut pay = pay;
    pay.name = "checkout/pay".into();
    answer.push(pay);
    if !paid {
        // Nothing was charged: the cart and the stock are untouched.
        answer.push(PartResult::skipped("cart/delete"));
        answer.push(PartResult::skipped("product/update"));
        answer.field("payment", json!("not charged"));
        answer.status(StatusCode::BAD_GATEWAY);
        return json_response(&answer);
    }
    let (Some(delete), Some(update)) = (
        step(Call::post("/cart/delete", &json!({"user": user})), "cart"),
        step(
            Call::post("/product/update", &json!({"items": items})),
            "stock",
        ),
    ) else {
        answer.status(StatusCode::BAD_REQUEST);
        return json_response(&answer);
    };
    // In sequence, the cart last: while any step is missing the cart is still there, so
    // the client's resend (same key) reads it again and finishes the remaining steps.
    let mut updated = bff.product.send(update).await;
    updated.name = "product/update".into();
    let mut deleted = if updated.is_ok() {
        bff.cart.send(delete).await
    } else {
        PartResult::skipped("cart/delete")
    };
    deleted.name = "cart/delete".into();
    let done = deleted.is_ok() && updated.is_ok();
    answer.push(updated);
    answer.push(deleted);
    answer.field("payment", json!("captured"));
    if !done {
        // Paid, but a later step failed after its retries: say so, and how to finish.
        answer.field(
            "next",
            json!(
                "resend the checkout with the same Idempotency-Key: the payment is not taken again"
            ),
        );
        answer.status(StatusCode::MULTI_STATUS);
    }
    json_response(&answer)
}

/// A user id goes into upstream paths: letters, digits, `-` and `_` only (axum decodes
/// `%2F`, and `../product/update` must not reach another endpoint of the service).
fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn json_response(answer: &Composite) -> Response {
    let (parts, body) = answer.response().into_parts();
    Response::from_parts(parts, Body::new(body))
}
