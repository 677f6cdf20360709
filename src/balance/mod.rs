//! Load balancing.
pub mod client;
pub mod discover;
mod endpoint;
mod error;
mod future;
mod hash;
mod pick;
mod replay;
mod retry;
mod service;
mod sticky;

pub use endpoint::{EndpointState, EndpointStatus, PassiveHealth};
pub use error::{error_response, error_status, BalanceError, BuildError, StickyError};
pub use future::ResponseFuture;
pub use hash::hash_bytes;
pub use pick::{HashKey, Picker};
pub use replay::{Replay, ReplayFuture, ReplayLayer};
pub use retry::{is_connect_error, CloneBody, Retry};
pub use service::{Balance, BalanceBuilder, Built, Driver, MakeGate, NoGates};
pub use sticky::{SameSite, StickyCookie};
