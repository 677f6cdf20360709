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
