//! The named link table: virtual hosts routed by `Host`, each optionally linked to another.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::Either;
use pin_project_lite::pin_project;
use tower::util::{BoxCloneSyncService, Oneshot};
use tower::ServiceExt;
use tower_service::Service;

use super::service::{Chain, ChainBody};
pub use super::table_builder::LinkTableBuilder;
use crate::body::{BoxBody, ReplayBody};
use crate::respond::status_response as plain_response;
use crate::BoxError;

/// A type-erased link: what each virtual host's service is turned into.
pub type LinkService<B> = BoxCloneSyncService<Request<ReplayBody<B>>, Response<BoxBody>, BoxError>;

/// Virtual hosts with STON-style links, routed by the `Host` header.
///
/// Each host has a service and at most one link `(condition, target)`. A request for
/// `foo.com` goes to foo's service; if the answer matches the condition it goes on to the
/// target, then to the target's own link, and so on. The table is validated by
/// [`LinkTableBuilder::build`]: a missing target, a self link and a cycle of any length
/// are refused with a [`LinkConfigError`](super::LinkConfigError) naming the hosts.
///
/// | request | answer |
/// |---|---|
/// | `Host` names a configured host (case-insensitive, port ignored, trailing dot ignored) | that host's chain |
/// | absolute-form target (`GET http://b.com/x`) | routed by its authority; `Host` is ignored (RFC 9112 §3.2.2, as nginx) |
/// | unknown `Host`, a default host configured | the default host's chain |
/// | unknown `Host`, no default | `421 Misdirected Request` |
/// | no `Host` (and no authority in the URI), no default | `400 Bad Request` |
/// | several `Host` lines, or one that is not readable text | `400 Bad Request`, even with a default host |
///
/// Everything else (loop guard, body replay, `502`/`504`, report header) is the
/// [`ChainLayer`](super::ChainLayer) given to [`LinkTableBuilder::chain`].
///
/// The table is always ready: each request clones its host's chain and waits for that
/// chain's readiness in the response future, so a host whose service applies
/// back-pressure does not block the other hosts.
pub struct LinkTable<B> {
    pub(super) inner: Arc<TableInner<B>>,
}

pub(super) struct TableInner<B> {
    pub(super) hosts: HashMap<String, usize>,
    pub(super) chains: Vec<Chain<LinkService<B>>>,
    pub(super) names: Vec<String>,
    pub(super) links: Vec<Option<usize>>,
    pub(super) default: Option<usize>,
}

impl<B> Clone for LinkTable<B> {
    fn clone(&self) -> Self {
        LinkTable {
            inner: self.inner.clone(),
        }
    }
}

impl<B> fmt::Debug for LinkTable<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkTable")
            .field("hosts", &self.inner.names)
            .field(
                "default",
                &self.inner.default.map(|i| self.inner.names[i].as_str()),
            )
            .finish()
    }
}

impl<B> LinkTable<B> {
    /// Starts an empty table.
    pub fn builder() -> LinkTableBuilder<B> {
        LinkTableBuilder::new()
    }

    /// The configured host names, in declaration order (lower case).
    pub fn hosts(&self) -> impl Iterator<Item = &str> + '_ {
        self.inner.names.iter().map(String::as_str)
    }

    /// The chain a request for `host` follows, as host names: `["foo.com", "bar.com"]`.
    /// `None` for an unknown host.
    pub fn route(&self, host: &str) -> Option<Vec<&str>> {
        let mut cur = self.lookup(host)?;
        let mut out = vec![self.inner.names[cur].as_str()];
        // Acyclic by construction; the length bound only guards against a future bug.
        while let Some(next) = self.inner.links[cur] {
            if out.len() > self.inner.names.len() {
                break;
            }
            out.push(self.inner.names[next].as_str());
            cur = next;
        }
        Some(out)
    }

    fn lookup(&self, host: &str) -> Option<usize> {
        let host = normalize_host(host)?;
        if host.bytes().any(|b| b.is_ascii_uppercase()) {
            self.inner
                .hosts
                .get(host.to_ascii_lowercase().as_str())
                .copied()
        } else {
            self.inner.hosts.get(host).copied()
        }
    }
}

/// `foo.com:8080` -> `foo.com`, `[::1]:80` -> `[::1]`, `foo.com.` -> `foo.com`.
fn normalize_host(raw: &str) -> Option<&str> {
    let raw = raw.trim();
    let host = if raw.starts_with('[') {
        match raw.find(']') {
            Some(end) => &raw[..=end],
            None => return None,
        }
    } else {
        match raw.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            Some(_) => return None,
            None => raw,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        None
    } else {
        Some(host)
    }
}

/// The host a request names, read the way every layer after the table must read it too.
#[derive(Debug, PartialEq, Eq)]
enum RequestHost<'a> {
    /// Neither an absolute-form target nor a `Host` header.
    Absent,
    /// Several `Host` lines, or one that is not readable text: ambiguous, so refused
    /// rather than guessed (a guess that differs from the next hop's is a routing or cache
    /// poisoning vector).
    Invalid,
    /// The host (with any port) as sent.
    Named(&'a str),
}

fn request_host<B>(req: &Request<B>) -> RequestHost<'_> {
    // An absolute-form target (`GET http://b.com/ HTTP/1.1`) names the host itself and the
    // `Host` header is then ignored (RFC 9112 §3.2.2), as nginx does.
    if let Some(a) = req.uri().authority() {
        return RequestHost::Named(a.host());
    }
    let mut lines = req.headers().get_all(http::header::HOST).iter();
    match (lines.next(), lines.next()) {
        (None, _) => RequestHost::Absent,
        // RFC 9112 §3.2: more than one Host line is answered 400.
        (Some(_), Some(_)) => RequestHost::Invalid,
        (Some(v), None) => match v.to_str() {
            Ok(h) => RequestHost::Named(h),
            Err(_) => RequestHost::Invalid,
        },
    }
}

impl<B> Service<Request<B>> for LinkTable<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<ChainBody<BoxBody>>;
    type Error = BoxError;
    type Future = TableFuture<B>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each request gets its host's chain cloned and made ready in the future.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let host = request_host(&req);
        let (idx, status) = match host {
            RequestHost::Named(h) => (
                self.lookup(h).or(self.inner.default),
                StatusCode::MISDIRECTED_REQUEST,
            ),
            RequestHost::Absent => (self.inner.default, StatusCode::BAD_REQUEST),
            // Not even the default host: it cannot be known which host was meant.
            RequestHost::Invalid => (None, StatusCode::BAD_REQUEST),
        };
        match idx {
            Some(i) => TableFuture {
                state: TableState::Chain {
                    fut: self.inner.chains[i].clone().oneshot(req),
                },
            },
            None => {
                tracing::debug!(
                    target: "tower_patterns::chain",
                    host = ?host,
                    status = status.as_u16(),
                    "no virtual host for request"
                );
                TableFuture {
                    state: TableState::Unknown {
                        res: Some(plain_response(status).map(Either::Right)),
                    },
                }
            }
        }
    }
}

pin_project! {
    /// Response future of [`LinkTable`].
    pub struct TableFuture<B>
    where
        B: Body,
        B: Send,
        B: Unpin,
        B: 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        #[pin]
        state: TableState<B>,
    }
}

pin_project! {
    #[project = TableStateProj]
    enum TableState<B>
    where
        B: Body,
        B: Send,
        B: Unpin,
        B: 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        Chain {
            #[pin]
            fut: Oneshot<Chain<LinkService<B>>, Request<B>>,
        },
        Unknown {
            res: Option<Response<ChainBody<BoxBody>>>,
        },
    }
}

impl<B> fmt::Debug for TableFuture<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TableFuture")
    }
}

impl<B> Future for TableFuture<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = Result<Response<ChainBody<BoxBody>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            TableStateProj::Chain { fut } => fut.poll(cx),
            TableStateProj::Unknown { res } => match res.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => crate::error::polled_after_completion("chain::TableFuture"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_normalize() {
        assert_eq!(normalize_host("foo.com"), Some("foo.com"));
        assert_eq!(normalize_host("foo.com:8080"), Some("foo.com"));
        assert_eq!(normalize_host("foo.com."), Some("foo.com"));
        assert_eq!(normalize_host("[::1]:80"), Some("[::1]"));
        assert_eq!(normalize_host("[::1"), None);
        assert_eq!(normalize_host("foo:bar"), None);
        assert_eq!(normalize_host(""), None);
        assert_eq!(normalize_host(":80"), None);
    }

    #[test]
    fn request_host_prefers_the_target_and_refuses_ambiguity() {
        let req = |uri: &str, hosts: &[&[u8]]| {
            let mut r = Request::get(uri).body(()).unwrap();
            for h in hosts {
                r.headers_mut().append(
                    http::header::HOST,
                    http::HeaderValue::from_bytes(h).unwrap(),
                );
            }
            r
        };
        // Absolute form: the authority wins over Host.
        let r = req("http://b.com:8080/x", &[b"a.com"]);
        assert_eq!(request_host(&r), RequestHost::Named("b.com"));
        let r = req("/x", &[b"a.com:80"]);
        assert_eq!(request_host(&r), RequestHost::Named("a.com:80"));
        assert_eq!(request_host(&req("/x", &[])), RequestHost::Absent);
        assert_eq!(
            request_host(&req("/x", &[b"a.com", b"a.com"])),
            RequestHost::Invalid
        );
        assert_eq!(
            request_host(&req("/x", &[b"a\xe9.com"])),
            RequestHost::Invalid
        );
    }
}
