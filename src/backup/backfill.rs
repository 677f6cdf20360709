//! Back-fill: request what nobody asked for yet, so it gets backed up too.

use std::fmt;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Empty};
use tower::ServiceExt;
use tower_service::Service;

use super::error::BackfillError;
use super::key::ObjectKey;
use crate::BoxError;

/// The result of [`backfill`].
#[derive(Debug, Default)]
pub struct BackfillReport {
    /// Keys fetched in full with a 2xx status, in completion order.
    pub done: Vec<ObjectKey>,
    /// Keys that failed, in completion order, with the reason. Keys that were not valid
    /// object keys are reported with their original text.
    pub failed: Vec<(String, BackfillError)>,
}

impl fmt::Display for BackfillReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} done, {} failed", self.done.len(), self.failed.len())
    }
}

/// Requests `GET /<key>` through `svc` for every key, at most `concurrency` at a time,
/// reading each body to its end so that a backup layer inside `svc` sees the whole object
/// (the seed's auxiliary process that uploads what storage still lacks).
///
/// A key succeeds when the status is 2xx and the body was read without error. A
/// successful fetch means the object passed through the service; whether each sink
/// committed it is reported by the backup layer ([`TeeLayer::subscribe`](super::TeeLayer::subscribe)
/// and its stats).
pub async fn backfill<S, B, I>(svc: S, keys: I, concurrency: usize) -> BackfillReport
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    let jobs = keys.into_iter().map(|k| {
        let svc = svc.clone();
        let raw = k.as_ref().to_owned();
        async move {
            let res = fetch(svc, &raw).await;
            (raw, res)
        }
    });
    let mut stream = futures_util::stream::iter(jobs).buffer_unordered(concurrency.max(1));
    let mut report = BackfillReport::default();
    while let Some((raw, res)) = stream.next().await {
        match res {
            Ok(key) => {
                tracing::debug!(%key, "back-fill fetched");
                report.done.push(key);
            }
            Err(e) => {
                tracing::warn!(key = %raw, error = %e, "back-fill failed");
                report.failed.push((raw, e));
            }
        }
    }
    report
}

async fn fetch<S, B>(svc: S, raw: &str) -> Result<ObjectKey, BackfillError>
where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body,
    B::Error: Into<BoxError>,
{
    let key = ObjectKey::new(raw.trim_start_matches('/'))?;
    let path = encode_path(key.as_str());
    let req = Request::get(path)
        .body(Empty::new())
        .map_err(|e| BackfillError::Service(e.into()))?;
    let res = svc
        .oneshot(req)
        .await
        .map_err(|e| BackfillError::Service(e.into()))?;
    if !res.status().is_success() {
        return Err(BackfillError::Status(res.status()));
    }
    let mut body = std::pin::pin!(res.into_body());
    while let Some(frame) = body.frame().await {
        frame.map_err(|e| BackfillError::Body(e.into()))?;
    }
    Ok(key)
}

/// `/` + the key with every byte outside the URI path alphabet percent-encoded, so that
/// [`ObjectKey::from_path`] gives the key back.
fn encode_path(key: &str) -> String {
    let mut s = String::with_capacity(key.len() + 1);
    s.push('/');
    for b in key.bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~/!$&'()*+,;=:@".contains(&b);
        if keep {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn encode_roundtrip() {
        let p = super::encode_path("a b/ü?x#%");
        assert_eq!(p, "/a%20b/%C3%BC%3Fx%23%25");
        assert_eq!(
            super::ObjectKey::from_path(&p).unwrap().as_str(),
            "a b/ü?x#%"
        );
    }
}
