//! [`ResponseFuture`] of [`Auth`](super::Auth): the inner call or the refusal, after an
//! early JWKS fetch when the token's `kid` was unknown.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::error::AuthError;
use super::layer::AuthLayer;
use super::service::Step;
use crate::respond::{AnswerFuture, ErrorResponseBody};

/// The early JWKS fetch a request with an unknown `kid` waits for (bounded inside).
pub(crate) type UnknownKidWait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a waiting request resumes with.
struct Parked<S, B> {
    req: Request<B>,
    svc: S,
    layer: AuthLayer,
}

pin_project! {
    /// Response future of [`Auth`](super::Auth): the inner service's, or the `401`/`403`
    /// — after the early JWKS fetch for a token with an unknown `kid`.
    #[project = Proj]
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        answer: AnswerFuture<S::Future>,
        // Only for an unknown `kid`: the fetch, then the request's second look. Boxed:
        // inline, the request and service would make every response future of the layer
        // hundreds of bytes larger, copied on each move on the common path too.
        waiting: Option<Box<(UnknownKidWait, Option<Parked<S, B>>)>>,
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn ready(answer: AnswerFuture<S::Future>) -> Self {
        ResponseFuture {
            answer,
            waiting: None,
        }
    }

    pub(crate) fn waiting(wait: UnknownKidWait, req: Request<B>, svc: S, layer: AuthLayer) -> Self {
        ResponseFuture {
            // Replaced when the fetch is over; never polled before.
            answer: AnswerFuture::Answered { res: None },
            waiting: Some(Box::new((wait, Some(Parked { req, svc, layer })))),
        }
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Output = Result<Response<ErrorResponseBody<RB>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Proj {
            mut answer,
            waiting,
        } = self.as_mut().project();
        if let Some(w) = waiting {
            let (wait, parked) = &mut **w;
            ready!(wait.as_mut().poll(cx));
            let Some(Parked {
                mut req,
                mut svc,
                layer,
            }) = parked.take()
            else {
                crate::error::polled_after_completion("auth::ResponseFuture");
            };
            *waiting = None;
            // The second look: still unknown is a `401` now.
            let next = match layer.step(&mut req, false) {
                Step::Call => AnswerFuture::inner(svc.call(req)),
                Step::Refuse(res) => AnswerFuture::answered(res),
                // Not with `early_refresh` false; refused all the same, never waiting twice.
                Step::Wait(..) => AnswerFuture::answered(layer.refuse(AuthError::InvalidToken(
                    "no key for this kid and algorithm".into(),
                ))),
            };
            answer.set(next);
        }
        answer.poll(cx)
    }
}
