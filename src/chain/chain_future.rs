//! The response future of the chain's entry ([`ChainFuture`]): waits for the request body to
//! be buffered for replay (when a link may hop), calls the first link and turns a chain
//! failure into the status the client gets (`502`/`504`) with the hop report header.
//!
//! Apart from [`LinkFuture`](super::LinkFuture) because it runs once per request, at the edge,
//! and shares none of the hop state machine.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Either;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::error::ChainError;
use super::hops::{ChainHops, Hop, HopResult};
use super::service::{ChainBody, ChainConfig};
use crate::body::{ReplayBody, ReplayError};
use crate::classify::error_kind;
use crate::error::polled_after_completion;
use crate::respond::status_response as plain_response;
use crate::BoxError;

type Req<B> = Request<ReplayBody<B>>;

type BufferFuture<B> = Pin<Box<dyn Future<Output = Result<Req<B>, ReplayError>> + Send + 'static>>;

pin_project! {
    /// Response future of [`Chain`](super::Chain).
    pub struct ChainFuture<S, B, RB>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        #[pin]
        state: ChainState<S, B, RB>,
        config: Arc<ChainConfig>,
    }
}

pin_project! {
    #[project = ChainStateProj]
    enum ChainState<S, B, RB>
    where
        S: Service<Request<ReplayBody<B>>>,
    {
        Ready {
            res: Option<Response<ChainBody<RB>>>,
        },
        Buffering {
            fut: BufferFuture<B>,
            svc: Option<S>,
        },
        Calling {
            #[pin]
            fut: S::Future,
        },
        Done,
    }
}

impl<S, B, RB> ChainFuture<S, B, RB>
where
    S: Service<Req<B>>,
{
    pub(crate) fn ready(
        res: Response<http_body_util::Full<bytes::Bytes>>,
        config: Arc<ChainConfig>,
    ) -> Self {
        ChainFuture {
            state: ChainState::Ready {
                res: Some(res.map(Either::Right)),
            },
            config,
        }
    }

    pub(crate) fn calling(fut: S::Future, config: Arc<ChainConfig>) -> Self {
        ChainFuture {
            state: ChainState::Calling { fut },
            config,
        }
    }

    pub(crate) fn buffering(fut: BufferFuture<B>, svc: S, config: Arc<ChainConfig>) -> Self {
        ChainFuture {
            state: ChainState::Buffering {
                fut,
                svc: Some(svc),
            },
            config,
        }
    }
}

impl<S, B, RB> fmt::Debug for ChainFuture<S, B, RB>
where
    S: Service<Req<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChainFuture")
    }
}

impl<S, B, RB> Future for ChainFuture<S, B, RB>
where
    S: Service<Req<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ChainBody<RB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                ChainStateProj::Ready { res } => {
                    let out = res.take();
                    this.state.set(ChainState::Done);
                    return match out {
                        Some(res) => Poll::Ready(Ok(res)),
                        None => polled_after_completion("chain::ChainFuture"),
                    };
                }
                ChainStateProj::Buffering { fut, svc } => {
                    let buffered = ready!(fut.as_mut().poll(cx));
                    let res = match (buffered, svc.take()) {
                        (Ok(req), Some(mut svc)) => {
                            let fut = svc.call(req);
                            this.state.set(ChainState::Calling { fut });
                            continue;
                        }
                        (Err(e), _) => {
                            tracing::debug!(
                                target: "tower_patterns::chain",
                                error = %e,
                                "request body failed while buffering"
                            );
                            plain_response(StatusCode::BAD_REQUEST).map(Either::Right)
                        }
                        (Ok(_), None) => {
                            plain_response(StatusCode::INTERNAL_SERVER_ERROR).map(Either::Right)
                        }
                    };
                    this.state.set(ChainState::Done);
                    return Poll::Ready(Ok(res));
                }
                ChainStateProj::Calling { fut } => {
                    let result = ready!(fut.poll(cx)).map_err(Into::into);
                    this.state.set(ChainState::Done);
                    return Poll::Ready(Ok(finish(this.config, result)));
                }
                ChainStateProj::Done => polled_after_completion("chain::ChainFuture"),
            }
        }
    }
}

/// Turns the links' answer into the client's response: errors become 502/504, the trail
/// goes into the report header.
fn finish<RB>(
    config: &ChainConfig,
    result: Result<Response<RB>, BoxError>,
) -> Response<ChainBody<RB>> {
    let mut res = match result {
        Ok(mut res) => {
            if let Some(name) = &config.entry_name {
                if res.extensions().get::<ChainHops>().is_none() {
                    let hop = Hop::new(name.clone(), HopResult::Status(res.status()));
                    res.extensions_mut().insert(ChainHops::new(hop));
                }
            }
            res.map(Either::Left)
        }
        Err(e) => {
            let (hops, source) = match e.downcast::<ChainError>() {
                Ok(ce) => {
                    let (h, s) = ce.into_parts();
                    (Some(h), s)
                }
                Err(e) => {
                    let hops = config.entry_name.as_ref().map(|name| {
                        ChainHops::new(Hop::new(name.clone(), HopResult::Error(error_kind(&*e))))
                    });
                    (hops, e)
                }
            };
            let mut res = crate::respond::error_response(&*source).map(Either::Right);
            tracing::warn!(
                target: "tower_patterns::chain",
                error = %source,
                hops = %hops.as_ref().map(|h| h.to_string()).unwrap_or_default(),
                status = res.status().as_u16(),
                "content chain ended with an error"
            );
            if let Some(h) = hops {
                res.extensions_mut().insert(h);
            }
            res
        }
    };
    if let Some(name) = &config.report_header {
        let value = res
            .extensions()
            .get::<ChainHops>()
            .and_then(|h| HeaderValue::try_from(h.header_value()).ok());
        if let Some(v) = value {
            res.headers_mut().insert(name.clone(), v);
        }
    }
    res
}
