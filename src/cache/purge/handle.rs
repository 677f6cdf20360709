//! Answering an authorised `PURGE`: a catch-up request, a purge fanned out to us, or a
//! client's purge (applied here, then fanned out to the fleet, answers collected as JSON).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;

use super::super::body::CacheBody;
use super::super::future::ResponseFuture;
use super::super::layer::Config;
use super::super::service::message;
use super::{apply, index, Target, MAX_ORIGIN_LEN, X_PURGE_LOG_SINCE, X_PURGE_ORIGIN};

fn local_answer<B>(target: &Target, removed: Option<u64>) -> Response<CacheBody<B>> {
    match (target, removed) {
        (_, None) => message(
            StatusCode::NOT_IMPLEMENTED,
            "this store cannot purge by prefix or surrogate key\n",
        ),
        (Target::Key(_), Some(0)) => message(StatusCode::NOT_FOUND, "not cached\n"),
        (Target::Key(_), Some(_)) => message(StatusCode::OK, "purged\n"),
        (_, Some(n)) => text(
            StatusCode::OK,
            format!("purged {n}\n"),
            "text/plain; charset=utf-8",
        ),
    }
}

fn text<B>(status: StatusCode, body: String, ctype: &'static str) -> Response<CacheBody<B>> {
    let mut res = Response::new(CacheBody::bytes(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    res
}

/// An authorised `PURGE`: a catch-up request, a purge fanned out to us, or a client's
/// purge (fanned out when a fleet is configured).
pub(crate) fn handle<F, B: Send + 'static, S, R>(
    cfg: &Arc<Config>,
    parts: &http::request::Parts,
) -> ResponseFuture<F, B, S, R> {
    let p = &cfg.purger;
    if let Some(since) = parts.headers.get(X_PURGE_LOG_SINCE) {
        return ResponseFuture::ready(match parse_since(since.as_bytes()) {
            Some(since) => text(
                StatusCode::OK,
                p.log.page(since),
                "text/plain; charset=utf-8",
            ),
            None => message(StatusCode::BAD_REQUEST, "bad x-purge-log-since\n"),
        });
    }
    let target = match Target::of(parts, cfg) {
        Ok(t) => t,
        Err(why) => return ResponseFuture::ready(message(StatusCode::BAD_REQUEST, why)),
    };
    if let Some(origin) = parts.headers.get(X_PURGE_ORIGIN) {
        let o = origin.as_bytes();
        let Some(origin) = std::str::from_utf8(o)
            .ok()
            .filter(|o| !o.is_empty() && o.len() <= MAX_ORIGIN_LEN)
            .filter(|o| o.bytes().all(|b| b.is_ascii_graphic()))
        else {
            return ResponseFuture::ready(message(StatusCode::BAD_REQUEST, "bad x-purge-origin\n"));
        };
        if !p.log.record_remote(origin, &target) {
            return ResponseFuture::ready(message(StatusCode::OK, "already applied\n"));
        }
        return ResponseFuture::ready(local_answer(&target, apply(cfg, &target)));
    }
    let removed = apply(cfg, &target);
    let (Some(fleet), Some(_)) = (p.fleet.clone(), removed) else {
        // No fleet, or this store cannot do it (`501`: not logged, not sent on).
        return ResponseFuture::ready(local_answer(&target, removed));
    };
    let origin = p.log.record_local(&target);
    // What the peers need to compute the same target: path, authority, tag headers.
    let uri = parts
        .uri
        .path_and_query()
        .map_or_else(|| http::Uri::from_static("/"), |p| p.clone().into());
    let mut headers = http::HeaderMap::new();
    if let Some(host) = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        .or_else(|| parts.headers.get(header::HOST).cloned())
    {
        headers.insert(header::HOST, host);
    }
    for name in index::TAG_HEADERS {
        for v in parts.headers.get_all(name) {
            headers.append(name, v.clone());
        }
    }
    let own = local_answer::<B>(&target, removed).status();
    ResponseFuture::boxed(async move {
        // A node that just started may not have heard from the registry yet.
        fleet.synced(fleet.inner.peer_timeout).await;
        let peers = fleet.peers();
        let sends = peers.iter().map(|peer| {
            let mut r = Request::new(Empty::<Bytes>::new());
            *r.method_mut() = Method::from_bytes(b"PURGE").unwrap_or(Method::DELETE);
            *r.uri_mut() = uri.clone();
            *r.headers_mut() = headers.clone();
            if let Some(b) = fleet.bearer() {
                r.headers_mut().insert(header::AUTHORIZATION, b);
            }
            if let Ok(o) = HeaderValue::from_str(&origin) {
                r.headers_mut().insert(X_PURGE_ORIGIN, o);
            }
            let fleet = fleet.clone();
            async move {
                let t = fleet.inner.peer_timeout;
                (
                    peer.id.clone(),
                    fleet.send(peer, r, t).await.map(|r| r.status()),
                )
            }
        });
        let results = futures_util::future::join_all(sends).await;
        let mut all = true;
        let mut json = format!(
            "{{\"origin\":{},\"nodes\":{{{}:{{\"status\":{}}}",
            json_str(&origin),
            json_str(fleet.self_id()),
            own.as_u16()
        );
        for (id, r) in results {
            json.push(',');
            json.push_str(&json_str(&id));
            match r {
                Ok(s) => {
                    all &= s == StatusCode::OK || s == StatusCode::NOT_FOUND;
                    json.push_str(&format!(":{{\"status\":{}}}", s.as_u16()));
                }
                Err(e) => {
                    all = false;
                    tracing::warn!(peer = id, error = %e, "fleet purge: peer did not answer; it catches up from the log");
                    json.push_str(&format!(":{{\"error\":{}}}", json_str(&e.to_string())));
                }
            }
        }
        json.push_str("}}\n");
        // 202: logged here; a node that did not confirm catches up from the log.
        let status = if all {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        };
        text(status, json, "application/json")
    })
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `-` (from the start) or `<boot hex>-<seq>`.
fn parse_since(v: &[u8]) -> Option<Option<(u64, u64)>> {
    let v = std::str::from_utf8(v).ok()?.trim();
    if v == "-" {
        return Some(None);
    }
    let (boot, seq) = v.split_once('-')?;
    Some(Some((
        u64::from_str_radix(boot, 16).ok()?,
        seq.parse().ok()?,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_and_json() {
        assert_eq!(parse_since(b"-"), Some(None));
        assert_eq!(parse_since(b"ff-12"), Some(Some((255, 12))));
        assert_eq!(parse_since(b"ff"), None);
        assert_eq!(parse_since(b"\xff-1"), None);
        assert_eq!(json_str("a\"b\\\n"), "\"a\\\"b\\\\\\u000a\"");
    }
}
