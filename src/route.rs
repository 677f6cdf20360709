//! Path-prefix routing to services: the registry-backed gateway of seed 001.
//!
//! One entry point serves several services: `/api` goes to `api-service`, everything else
//! to `webapp-service`. Each service is backed by its own balancer fed by discovery, so a
//! new instance takes traffic without a restart. When a service has no instance the client
//! gets `502 Bad Gateway` saying which service is missing, at once, instead of a request
//! that waits for an instance.
//!
//! ```no_run
//! use tower::Layer;
//! use tower_patterns::balance::{Balance, ReplayLayer};
//! use tower_patterns::body::ReplayBody;
//! use tower_patterns::discovery::{MemoryRegistry, Selector, Watcher};
//! use tower_patterns::proxy::ForwardBuilder;
//! use tower_patterns::route::{Backend, RouteTable};
//!
//! # async fn run() -> Result<(), tower_patterns::BoxError> {
//! let registry = MemoryRegistry::new();
//! let forward = ForwardBuilder::new("http://127.0.0.1:1")
//!     .build::<ReplayBody<hyper::body::Incoming>>()?;
//! let router = RouteTable::new()
//!     .route("/api", "api-service")
//!     .route("/", "webapp-service")
//!     .build(|service, selector| {
//!         let watcher = Watcher::new(&registry, service, selector.clone());
//!         // Each instance becomes a `Forward` sharing the template's connection pool.
//!         let discover = watcher.discover(forward.clone());
//!         // Round robin over the live instances; bodies buffered so a refused connection
//!         // is retried on the next one. Any `Clone` balancer over a `Discover` fits.
//!         let (balance, driver) = Balance::builder().build(discover);
//!         tokio::spawn(driver);
//!         Backend::new(ReplayLayer::new(64 * 1024).layer(balance), watcher)
//!     })?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! tower_patterns::server::serve(listener, router).await?;
//! # Ok(()) }
//! ```
//!
//! | request | answer |
//! |---|---|
//! | path starts with several prefixes | the longest prefix wins (nginx `location` prefix rule; plain string prefix) |
//! | path matches no prefix | `404 Not Found` |
//! | route with a [`Selector`] (`route_to`) | only the instances it accepts (version-aware routing) |
//! | service has no instance (none registered, all expired) | `502 Bad Gateway`, body names the service |
//! | registry unreachable | the last known instances keep serving (fail-static) |
//! | upstream error | `502` / `504` from [`crate::respond::error_response`] |

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tower::util::Oneshot;
use tower::ServiceExt;
use tower_service::Service;

use crate::body::{boxed, BoxBody};
use crate::discovery::{Selector, Watcher};
use crate::respond::error_response;
use crate::BoxError;

/// Errors building a [`PathRouter`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// A prefix must start with `/`.
    #[error("route prefix `{0}` must start with `/`")]
    InvalidPrefix(String),
    /// The same prefix was given twice.
    #[error("route prefix `{0}` is given twice")]
    DuplicatePrefix(String),
    /// A service name is empty.
    #[error("route `{0}` has an empty service name")]
    EmptyService(String),
}

/// Prefix → service name, the routing table of the seed's `loadBalancer.js`, optionally
/// with a [`Selector`] (version-aware routing: `/v2/` → `api-service` version 2).
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<(String, String, Selector)>,
}

impl RouteTable {
    /// An empty table.
    pub fn new() -> Self {
        RouteTable::default()
    }

    /// Sends paths starting with `prefix` to `service`.
    pub fn route(self, prefix: impl Into<String>, service: impl Into<String>) -> Self {
        self.route_to(prefix, service, Selector::any())
    }

    /// Sends paths starting with `prefix` to the instances of `service` that `selector`
    /// accepts (a version, tags).
    pub fn route_to(
        mut self,
        prefix: impl Into<String>,
        service: impl Into<String>,
        selector: Selector,
    ) -> Self {
        self.routes.push((prefix.into(), service.into(), selector));
        self
    }

    /// The service for `path`: the route with the longest matching prefix.
    pub fn resolve(&self, path: &str) -> Option<&str> {
        self.routes
            .iter()
            .filter(|(p, _, _)| path.starts_with(p.as_str()))
            .max_by_key(|(p, _, _)| p.len())
            .map(|(_, s, _)| s.as_str())
    }

    /// Builds the router: `make` is called once per distinct (service, selector) and
    /// returns its backend (usually a balancer over [`Watcher::discover`] of a watcher
    /// made with that selector).
    pub fn build<S>(
        self,
        mut make: impl FnMut(&str, &Selector) -> Backend<S>,
    ) -> Result<PathRouter<S>, RouteError> {
        let mut names: Vec<(String, Selector)> = Vec::new();
        let mut backends: Vec<Backend<S>> = Vec::new();
        let mut routes: Vec<Route> = Vec::new();
        for (prefix, service, selector) in self.routes {
            if !prefix.starts_with('/') {
                return Err(RouteError::InvalidPrefix(prefix));
            }
            if service.is_empty() {
                return Err(RouteError::EmptyService(prefix));
            }
            if routes.iter().any(|r| r.prefix == prefix) {
                return Err(RouteError::DuplicatePrefix(prefix));
            }
            let backend = match names
                .iter()
                .position(|(n, sel)| *n == service && *sel == selector)
            {
                Some(i) => i,
                None => {
                    backends.push(make(&service, &selector));
                    names.push((service.clone(), selector));
                    names.len() - 1
                }
            };
            routes.push(Route {
                prefix,
                service: service.into(),
                backend,
            });
        }
        // Longest prefix first, so the first match is the best one.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(PathRouter {
            routes: routes.into(),
            backends: backends.into(),
        })
    }
}

/// The service behind one route, with the watcher that says whether it has instances.
pub struct Backend<S> {
    service: S,
    watcher: Option<Watcher>,
}

impl<S> Backend<S> {
    /// A discovery-fed backend: requests get `502` at once while `watcher` has no instance.
    pub fn new(service: S, watcher: Watcher) -> Self {
        Backend {
            service,
            watcher: Some(watcher),
        }
    }

    /// A backend without discovery (a fixed upstream): always tried.
    pub fn fixed(service: S) -> Self {
        Backend {
            service,
            watcher: None,
        }
    }

    /// The service.
    pub fn get_ref(&self) -> &S {
        &self.service
    }

    /// The watcher, if any.
    pub fn watcher(&self) -> Option<&Watcher> {
        self.watcher.as_ref()
    }
}

impl<S> fmt::Debug for Backend<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("watcher", &self.watcher)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Route {
    prefix: String,
    service: Arc<str>,
    backend: usize,
}

/// Routes each request by path prefix to a service's backend. Built by
/// [`RouteTable::build`]. Never fails: errors become `404`/`502`/`504` responses.
///
/// The backend service is cloned per request (`oneshot`), so it must be `Clone`; wrap a
/// balancer that is not in `tower::buffer::Buffer`.
pub struct PathRouter<S> {
    routes: Arc<[Route]>,
    backends: Arc<[Backend<S>]>,
}

impl<S> Clone for PathRouter<S> {
    fn clone(&self) -> Self {
        PathRouter {
            routes: self.routes.clone(),
            backends: self.backends.clone(),
        }
    }
}

impl<S> fmt::Debug for PathRouter<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_map();
        for r in self.routes.iter() {
            d.entry(&r.prefix, &r.service);
        }
        d.finish()
    }
}

impl<S> PathRouter<S> {
    /// The service name a path is routed to.
    pub fn resolve(&self, path: &str) -> Option<&str> {
        self.route(path).map(|r| &*r.service)
    }

    /// The backend a path is routed to.
    pub fn backend_for(&self, path: &str) -> Option<&Backend<S>> {
        self.route(path).map(|r| &self.backends[r.backend])
    }

    /// The backend of a service name (the first route to it).
    pub fn backend(&self, service: &str) -> Option<&Backend<S>> {
        self.routes
            .iter()
            .find(|r| &*r.service == service)
            .map(|r| &self.backends[r.backend])
    }

    fn route(&self, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| path.starts_with(r.prefix.as_str()))
    }
}

fn text(status: StatusCode, body: String) -> Response<BoxBody> {
    let mut res = Response::new(boxed(Full::new(Bytes::from(body))));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

impl<S, B, RB> Service<Request<B>> for PathRouter<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<BoxBody>;
    type Error = Infallible;
    type Future = RouteFuture<S, Request<B>>;

    #[inline]
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Each call clones its backend, whose readiness is awaited inside the call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(route) = self.route(req.uri().path()) else {
            return RouteFuture::ready(text(
                StatusCode::NOT_FOUND,
                "404 Not Found: no route for this path\n".to_string(),
            ));
        };
        let backend = &self.backends[route.backend];
        if let Some(w) = &backend.watcher {
            if w.is_empty() {
                let snap = w.snapshot();
                let why = if !snap.is_synced() && snap.is_stale() {
                    " (the registry is unreachable)"
                } else {
                    ""
                };
                tracing::debug!(service = %route.service, "no instance: 502");
                return RouteFuture::ready(text(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "502 Bad Gateway: no healthy instance of service `{}`{why}\n",
                        route.service
                    ),
                ));
            }
        }
        RouteFuture::call(backend.service.clone().oneshot(req))
    }
}

pin_project! {
    /// The response future of [`PathRouter`].
    pub struct RouteFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        inner: Inner<S, Req>,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<S, Req>
    where
        S: Service<Req>,
    {
        Ready { res: Option<Response<BoxBody>> },
        Call { #[pin] fut: Oneshot<S, Req> },
    }
}

impl<S: Service<Req>, Req> RouteFuture<S, Req> {
    fn ready(res: Response<BoxBody>) -> Self {
        RouteFuture {
            inner: Inner::Ready { res: Some(res) },
        }
    }
    fn call(fut: Oneshot<S, Req>) -> Self {
        RouteFuture {
            inner: Inner::Call { fut },
        }
    }
}

impl<S, Req, RB> Future for RouteFuture<S, Req>
where
    S: Service<Req, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Output = Result<Response<BoxBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().inner.project() {
            InnerProj::Ready { res } => match res.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => crate::error::polled_after_completion("route::RouteFuture"),
            },
            InnerProj::Call { fut } => match fut.poll(cx) {
                Poll::Ready(Ok(res)) => Poll::Ready(Ok(res.map(boxed))),
                Poll::Ready(Err(e)) => {
                    let e: BoxError = e.into();
                    tracing::debug!(error = %e, "backend failed");
                    Poll::Ready(Ok(error_response(&*e).map(boxed)))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: Service<Req>, Req> fmt::Debug for RouteFuture<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Ready { .. } => f.write_str("RouteFuture::Ready"),
            Inner::Call { .. } => f.write_str("RouteFuture::Call"),
        }
    }
}
