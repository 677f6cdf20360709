//! The [`Auth`] service.

use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::Full;
use tower_service::Service;

use super::error::AuthError;
use super::layer::AuthLayer;
use crate::respond::{status_response, AnswerFuture, ErrorResponseBody};

/// Response future of [`Auth`]: the inner service's, or the `401`/`403`.
pub type ResponseFuture<F> = AnswerFuture<F>;

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    pub(crate) inner: S,
    pub(crate) layer: AuthLayer,
}

impl<S> Auth<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
    /// Unwraps the service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn refuse(&self, err: AuthError) -> Response<Full<Bytes>> {
        tracing::debug!(target: "tower_patterns::auth", reason = %err, "request refused");
        let mut res = status_response(err.status());
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, self.layer.auth.challenge(&err));
        // Responses to a credential must not be cached by anyone in between.
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        res.extensions_mut().insert(err);
        res
    }
}

impl<S, B, RB> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<ErrorResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let auth = &self.layer.auth;
        // First, whatever happens next: a client must never smuggle an identity upstream.
        auth.strip(req.headers_mut());
        let identity = match auth.authenticate(req.headers()) {
            Ok(Some(id)) => id,
            Ok(None) if self.layer.optional => return AnswerFuture::inner(self.inner.call(req)),
            Ok(None) => return AnswerFuture::answered(self.refuse(AuthError::Missing)),
            Err(e) => return AnswerFuture::answered(self.refuse(e)),
        };
        if let Err(e) = auth.check(&identity, &self.layer.require) {
            return AnswerFuture::answered(self.refuse(e));
        }
        if let Err(e) = auth.write_identity(&identity, req.headers_mut()) {
            return AnswerFuture::answered(self.refuse(e));
        }
        auth.hide(req.headers_mut());
        req.extensions_mut().insert(identity);
        AnswerFuture::inner(self.inner.call(req))
    }
}
