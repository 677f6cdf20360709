use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use hyper::body::Incoming;
use hyper_util::client::legacy::ResponseFuture as ClientFuture;
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::error::ForwardError;
use super::headers::strip_hop_by_hop;
use super::service::Upstream;

pin_project! {
    /// Response future of [`Forward`](super::Forward).
    pub struct ResponseFuture {
        state: State,
        #[pin]
        sleep: Option<Sleep>,
    }
}

enum State {
    Running {
        fut: ClientFuture,
        upstream: Arc<Upstream>,
        timeout: Duration,
    },
    Failed(Option<ForwardError>),
}

impl ResponseFuture {
    pub(super) fn new(
        fut: ClientFuture,
        upstream: Arc<Upstream>,
        timeout: Option<Duration>,
    ) -> Self {
        ResponseFuture {
            sleep: timeout.map(tokio::time::sleep),
            state: State::Running {
                fut,
                upstream,
                timeout: timeout.unwrap_or_default(),
            },
        }
    }

    pub(super) fn failed(e: ForwardError) -> Self {
        ResponseFuture {
            state: State::Failed(Some(e)),
            sleep: None,
        }
    }
}

impl std::fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseFuture")
    }
}

fn is_timed_out(err: &(dyn StdError + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

fn map_client_error(e: hyper_util::client::legacy::Error, upstream: &Upstream) -> ForwardError {
    let upstream = upstream.authority().to_string();
    if e.is_connect() {
        if is_timed_out(&e) {
            ForwardError::ConnectTimeout { upstream }
        } else {
            ForwardError::Connect {
                upstream,
                source: Box::new(e),
            }
        }
    } else {
        ForwardError::Transport {
            upstream,
            source: Box::new(e),
        }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response<Incoming>, ForwardError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.state {
            State::Failed(e) => match e.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => panic!("ResponseFuture polled after completion"),
            },
            State::Running {
                fut,
                upstream,
                timeout,
            } => {
                if let Poll::Ready(res) = Pin::new(fut).poll(cx) {
                    return Poll::Ready(match res {
                        Ok(mut res) => {
                            strip_hop_by_hop(res.headers_mut());
                            Ok(res)
                        }
                        Err(e) => Err(map_client_error(e, upstream)),
                    });
                }
                if let Some(sleep) = this.sleep.as_pin_mut() {
                    if sleep.poll(cx).is_ready() {
                        return Poll::Ready(Err(ForwardError::ResponseTimeout {
                            upstream: upstream.authority().to_string(),
                            after: *timeout,
                        }));
                    }
                }
                Poll::Pending
            }
        }
    }
}
