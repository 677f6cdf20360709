//! Request and response bodies the patterns need.
//!
//! - [`replay`]: a request body kept (up to a limit) so the request can be sent again to
//!   the next link of a chain or the next endpoint of a balancer.
//! - [`tee`]: a response body that streams to the client and copies to sinks (backup,
//!   cache) without ever waiting for them.

pub mod replay;
pub mod tee;

pub use replay::{ReplayBody, ReplayError};

use bytes::Bytes;
use http_body::Body;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;

use crate::BoxError;

/// The boxed body type used where responses of different services must be unified.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// Boxes any body into a [`BoxBody`].
pub fn boxed<B>(body: B) -> BoxBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// How much of a discarded response body is read to keep its connection (see [`discard`]),
/// and for how long, unless configured otherwise.
pub(crate) const DISCARD_LIMIT: u64 = 64 * 1024;
pub(crate) const DISCARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Discards the body of a response that is not returned (a chain link's skipped answer,
/// a balancer try that is retried elsewhere): the one way the crate does it. A short body
/// is read to its end in the background so its keep-alive connection is reused; a long
/// or unknown one is dropped at once (closing that connection, as nginx does).
pub(crate) fn discard<RB>(body: RB, limit: u64, timeout: std::time::Duration)
where
    RB: Body + Send + 'static,
{
    if body.is_end_stream() || limit == 0 || body.size_hint().lower() > limit {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let drain = async {
            let mut body = std::pin::pin!(body);
            let mut read = 0u64;
            while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                let Ok(frame) = frame else { return };
                if let Some(d) = frame.data_ref() {
                    read += bytes::Buf::remaining(d) as u64;
                    if read > limit {
                        return;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(timeout, drain).await;
    });
}
