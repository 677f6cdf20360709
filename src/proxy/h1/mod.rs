//! The lean HTTP/1.1 upstream path: a request without a body, to a cleartext `http://`
//! upstream, written and answered in the request's own task.
//!
//! Forwarding a small `GET` through hyper's client costs a second task per connection
//! (hyper's dispatcher), two channels and a wake-up between the tasks, and the
//! dispatcher's general poll loop, about 45 % of a proxied request's user-space
//! instructions (callgrind, issue 12). A proxy's upstream exchange is much narrower than
//! what that machinery serves: this path writes the head it was given with one `send`,
//! reads the response head with `httparse` (hyper's own parser) and frames the body by the
//! same rules as hyper's client. A body already read with the head goes out whole and the
//! connection back to the pool at once.
//!
//! Requests with a body, `https://` and HTTP/2 upstreams, and upgrades keep hyper's client.
//! The framing and the decoder are checked against hyper's client on the same bytes,
//! split at random, in `differential_tests.rs`.

mod body;
mod conn;
mod decode;
mod error;
mod head;

pub(crate) use body::H1Body;
pub(crate) use conn::{Exchange, Failed, Idle};
pub use error::Http1Error;

#[cfg(test)]
mod differential_tests;
