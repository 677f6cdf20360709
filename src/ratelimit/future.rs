//! Response future of [`RateLimit`](super::RateLimit), and its refusals.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::error::{retry_after_secs, RateLimited};
use super::limiter::Decision;
use crate::respond::{status_response, AnswerFuture, ErrorResponseBody};

pin_project! {
    /// Response future of [`RateLimit`](super::RateLimit): the inner service's future or
    /// the refusal; with a Redis limiter, first the (bounded) check.
    #[project = Proj]
    pub struct ResponseFuture<S, R, C>
    where
        S: Service<R>,
    {
        #[pin]
        state: State<S, R, C>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, R, C>
    where
        S: Service<R>,
    {
        Checking {
            #[pin]
            check: C,
            // Boxed: only an asynchronous limiter (Redis) parks the request, and inline
            // the request and service would make every response future of the layer
            // hundreds of bytes larger — copied on each move, on the common path too.
            parked: Option<Box<(S, R)>>,
        },
        Ready {
            #[pin]
            fut: AnswerFuture<S::Future>,
        },
    }
}

impl<S: Service<R>, R, C> ResponseFuture<S, R, C> {
    pub(crate) fn ready(fut: AnswerFuture<S::Future>) -> Self {
        ResponseFuture {
            state: State::Ready { fut },
        }
    }
    pub(crate) fn checking(check: C, svc: S, req: R) -> Self {
        ResponseFuture {
            state: State::Checking {
                check,
                parked: Some(Box::new((svc, req))),
            },
        }
    }
}

impl<S, R, C, RB> Future for ResponseFuture<S, R, C>
where
    S: Service<R, Response = Response<RB>>,
    C: Future<Output = Decision>,
{
    type Output = Result<Response<ErrorResponseBody<RB>>, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            match state.as_mut().project() {
                StateProj::Checking { check, parked } => {
                    let decision = ready!(check.poll(cx));
                    let next = match (decision, parked.take()) {
                        (Decision::Allow, Some(parked)) => {
                            let (mut svc, req) = *parked;
                            AnswerFuture::inner(svc.call(req))
                        }
                        (Decision::Allow, None) => {
                            crate::error::polled_after_completion("ratelimit::ResponseFuture")
                        }
                        (d, _) => AnswerFuture::answered(refusal(d)),
                    };
                    state.set(State::Ready { fut: next });
                }
                StateProj::Ready { fut } => return fut.poll(cx),
            }
        }
    }
}

/// The `429`/`503` of a refusing decision, with `Retry-After`.
pub(crate) fn refusal(d: Decision) -> Response<Full<Bytes>> {
    let (status, why) = match d {
        Decision::Deny { retry_after } => (
            StatusCode::TOO_MANY_REQUESTS,
            RateLimited::Exceeded { retry_after },
        ),
        Decision::Unavailable { retry_after } => (
            StatusCode::SERVICE_UNAVAILABLE,
            RateLimited::Unavailable { retry_after },
        ),
        // Not a refusal; never asked for one.
        Decision::Allow => (
            StatusCode::TOO_MANY_REQUESTS,
            RateLimited::Exceeded {
                retry_after: Default::default(),
            },
        ),
    };
    let retry_after = match why {
        RateLimited::Exceeded { retry_after } | RateLimited::Unavailable { retry_after } => {
            retry_after
        }
    };
    let mut res = status_response(status);
    res.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after_secs(retry_after)),
    );
    res.extensions_mut().insert(why);
    res
}
