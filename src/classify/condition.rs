//! [`Condition`]: the ready-made, declarative classifier (statuses, status classes, error
//! kinds, gRPC codes) and its text form.
//!
//! Split from `classify.rs`, which keeps the traits and the error walk every classifier
//! shares; the status lists live in `statuses.rs`, sized for being copied per request.

use std::error::Error as StdError;
use std::fmt;
use std::str::FromStr;

use http::{HeaderMap, Request, Response, StatusCode};

use super::grpc::{self, GrpcBits};
use super::statuses::{Listed, Statuses};
use super::{
    error_kind, grpc_status, Classifier, Classify, FailureKind, Outcome, StreamEnd, GRPC_INTERNAL,
};
#[cfg(doc)]
use super::{TrailersLayer, GRPC_CODE_NAMES};

/// A declarative failure condition: statuses, status classes, and error kinds.
///
/// Text form (comma separated, case-insensitive, as STON's `Condition` attribute):
///
/// | token | matches |
/// |---|---|
/// | `404` | exactly that status (100-999) |
/// | `4xx`, `5xx` | the whole status class (1xx-9xx) |
/// | `transport` | connection refused/reset, protocol errors |
/// | `timeout` | connect or response timeout |
/// | `error` | any other error of the inner service |
/// | `fail` | `transport` + `timeout` + `error`: the hop failed without a response |
/// | `grpc:unavailable`, `grpc:14` | that gRPC status (by name or number), from `grpc-status` in the head or the trailers |
/// | `grpc:5xx` | the gRPC codes that map to a 5xx: `unknown`, `deadline_exceeded`, `unimplemented`, `internal`, `unavailable`, `data_loss` |
///
/// A gRPC status in the response head (a trailers-only answer) is classified at once; in
/// the trailers, the classification is deferred to the end of the body
/// ([`Classifier::defers_to_trailers`], run by [`TrailersLayer`]). A gRPC stream that ends
/// without a status counts as `internal`, an unreadable status as `unknown`, as a gRPC
/// client reports them.
///
/// Statuses given to [`Condition::ignore_status`] classify as [`Outcome::Ignored`]; they win
/// over the failure statuses. Everything else is [`Outcome::Success`].
///
/// A condition is four words (32 bytes): a bit per status class, up to four exact
/// statuses inline, a longer list of exact statuses shared behind an `Arc`. It is `Clone`,
/// not `Copy` (it was two 900-bit sets, 264 bytes, copied into every request's future).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Condition {
    statuses: Statuses,
    errors: ErrorBits,
    grpc: GrpcBits,
}

/// Which errors a [`Condition`] counts as failures, one bit each.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct ErrorBits(u8);

impl ErrorBits {
    const TRANSPORT: u8 = 1;
    const TIMEOUT: u8 = 2;
    const OTHER: u8 = 4;
    const ALL: u8 = 7;

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

impl Condition {
    /// A condition that matches nothing: every response and error is a success.
    pub fn never() -> Self {
        Self::default()
    }

    /// nginx's and Envoy's usual default: `5xx,fail`.
    pub fn server_errors_and_failures() -> Self {
        Self::never().status_class(5).any_error()
    }

    /// Count this exact status as a failure.
    ///
    /// # Panics
    /// Never: a `StatusCode` is always 100..=999.
    pub fn status(mut self, status: StatusCode) -> Self {
        self.statuses.insert_fail(status.as_u16());
        self
    }

    /// Count a whole class as failures: `status_class(5)` is `5xx`. Classes outside 1..=9
    /// are ignored.
    pub fn status_class(mut self, class: u8) -> Self {
        self.statuses.insert_class(u16::from(class));
        self
    }

    /// Classify this status as [`Outcome::Ignored`].
    pub fn ignore_status(mut self, status: StatusCode) -> Self {
        self.statuses.insert_ignore(status.as_u16());
        self
    }

    /// Count the gRPC status `code` (0-16; see [`GRPC_CODE_NAMES`]) as a failure.
    pub fn grpc_code(mut self, code: u8) -> Self {
        self.grpc.insert(code);
        self
    }

    /// Count the gRPC codes that map to a 5xx as failures (`grpc:5xx`).
    pub fn grpc_server_errors(mut self) -> Self {
        self.grpc.0 |= grpc::SERVER_CODES.0;
        self
    }

    /// Classify a response head: its status, then (when the condition names gRPC codes) a
    /// `grpc-status` header of a trailers-only gRPC answer.
    #[inline]
    pub fn classify_head(&self, status: StatusCode, headers: &HeaderMap) -> Outcome {
        let by_status = self.classify_status(status);
        if by_status != Outcome::Success || self.grpc.is_empty() {
            return by_status;
        }
        match grpc_status(headers) {
            Some(code) if self.grpc.contains(code) => Outcome::Failure(FailureKind::Grpc(code)),
            _ => Outcome::Success,
        }
    }

    /// `true` when this condition must wait for the trailers of `res`: it names gRPC
    /// codes, and `res` is a gRPC `200` without `grpc-status` in its head.
    #[inline]
    pub fn defers_to_trailers_of(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        !self.grpc.is_empty()
            && status == StatusCode::OK
            && grpc::is_grpc(headers)
            && !headers.contains_key("grpc-status")
    }

    /// Classify the end of a deferred gRPC response body.
    pub fn classify_stream_end(&self, end: StreamEnd<'_>) -> Outcome {
        let code = match end {
            StreamEnd::Error(e) => return self.classify_error_ref(e),
            StreamEnd::Trailers(t) => grpc_status(t).unwrap_or(GRPC_INTERNAL),
            StreamEnd::NoTrailers => GRPC_INTERNAL,
        };
        if self.grpc.contains(code) {
            Outcome::Failure(FailureKind::Grpc(code))
        } else {
            Outcome::Success
        }
    }

    /// Count transport errors (refused, reset, protocol) as failures.
    pub fn transport_errors(mut self) -> Self {
        self.errors.0 |= ErrorBits::TRANSPORT;
        self
    }

    /// Count timeouts as failures.
    pub fn timeouts(mut self) -> Self {
        self.errors.0 |= ErrorBits::TIMEOUT;
        self
    }

    /// Count every error (transport, timeout, other) as a failure: STON's `fail`.
    pub fn any_error(mut self) -> Self {
        self.errors.0 = ErrorBits::ALL;
        self
    }

    /// The union of two conditions.
    pub fn or(mut self, other: Condition) -> Self {
        self.statuses = self.statuses.union(&other.statuses);
        self.errors.0 |= other.errors.0;
        self.grpc.0 |= other.grpc.0;
        self
    }

    /// `true` when the condition matches no status and no error.
    pub fn is_never(&self) -> bool {
        self.statuses.no_failures() && self.errors == ErrorBits::default() && self.grpc.is_empty()
    }

    /// `true` when some response head can match: a failing status or a gRPC code. A
    /// condition of errors only (retry's default) lets a caller skip classifying every
    /// answered head.
    pub(crate) fn judges_heads(&self) -> bool {
        !self.statuses.no_failures() || !self.grpc.is_empty()
    }

    /// Classify a status code directly.
    // Inline, as `classify_head` and `defers_to_trailers_of`: every answered request the
    // balancer records goes through them; as calls they were ~25 instructions a request
    // for a plain `200` (dispatch bench).
    #[inline]
    pub fn classify_status(&self, status: StatusCode) -> Outcome {
        match self.statuses.lookup(status.as_u16()) {
            Listed::Ignored => Outcome::Ignored,
            Listed::Failure => Outcome::Failure(FailureKind::Status(status)),
            Listed::No => Outcome::Success,
        }
    }

    /// Classify an error directly (see [`error_kind`]).
    pub fn classify_error_ref(&self, err: &(dyn StdError + 'static)) -> Outcome {
        let kind = error_kind(err);
        let counted = match kind {
            FailureKind::Transport => self.errors.has(ErrorBits::TRANSPORT),
            FailureKind::Timeout => self.errors.has(ErrorBits::TIMEOUT),
            FailureKind::Other | FailureKind::Status(_) | FailureKind::Grpc(_) => {
                self.errors.has(ErrorBits::OTHER)
            }
            // Never the upstream's fault: neither a success nor a failure of it.
            FailureKind::Client => return Outcome::Ignored,
        };
        if counted {
            Outcome::Failure(kind)
        } else {
            Outcome::Success
        }
    }
}

/// `Condition` and `Arc<Condition>` classify alike: each request's classifier is a clone
/// of the condition (a few words, a long exact-status list shared) or, behind an `Arc`,
/// one reference count — what the chain's links use when one condition serves many layers.
/// One macro writes both, so neither can miss an override of the trait's defaulted
/// methods (`defers_to_trailers`, `classify_end`: gRPC's statuses).
macro_rules! condition_classifier {
    ($($ty:ty),*) => {$(
        impl Classify for $ty {
            type Classifier = $ty;
            #[inline]
            fn classify_request<B>(&self, _req: &Request<B>) -> Self::Classifier {
                self.clone()
            }
        }

        impl Classifier for $ty {
            #[inline]
            fn classify_response<B>(self, res: &Response<B>) -> Outcome {
                self.classify_head(res.status(), res.headers())
            }
            fn classify_error(self, err: &(dyn StdError + 'static)) -> Outcome {
                self.classify_error_ref(err)
            }
            #[inline]
            fn defers_to_trailers<B>(&self, res: &Response<B>) -> bool {
                self.defers_to_trailers_of(res.status(), res.headers())
            }
            fn classify_end(self, end: StreamEnd<'_>) -> Outcome {
                self.classify_stream_end(end)
            }
        }
    )*};
}

condition_classifier!(Condition, std::sync::Arc<Condition>);

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Condition({self})")
    }
}

impl fmt::Display for Condition {
    /// Prints the canonical text form; it parses back to an equal condition.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::new();
        for class in self.statuses.classes() {
            parts.push(format!("{class}xx"));
        }
        for c in self.statuses.exact_failures() {
            parts.push(c.to_string());
        }
        let e = self.errors;
        if e.0 == ErrorBits::ALL {
            parts.push("fail".into());
        } else {
            if e.has(ErrorBits::TRANSPORT) {
                parts.push("transport".into());
            }
            if e.has(ErrorBits::TIMEOUT) {
                parts.push("timeout".into());
            }
            if e.has(ErrorBits::OTHER) {
                parts.push("error".into());
            }
        }
        parts.extend(self.grpc.tokens());
        for c in self.statuses.ignored() {
            parts.push(format!("!{c}"));
        }
        f.write_str(&parts.join(","))
    }
}

/// A [`Condition`] text that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid condition token {token:?}: expected a status (404), a class (5xx), `fail`, `transport`, `timeout`, `error`, `grpc:<code name or number>`, `grpc:5xx`, or `!404` to ignore a status")]
pub struct ParseConditionError {
    /// The token that was refused.
    pub token: String,
}

impl FromStr for Condition {
    type Err = ParseConditionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cond = Condition::never();
        let bad = |t: &str| ParseConditionError {
            token: t.to_string(),
        };
        let mut any = false;
        for raw in s.split(',') {
            let t = raw.trim();
            if t.is_empty() {
                continue;
            }
            any = true;
            let lower = t.to_ascii_lowercase();
            match lower.as_str() {
                "fail" => cond = cond.any_error(),
                "transport" => cond = cond.transport_errors(),
                "timeout" => cond = cond.timeouts(),
                "error" => cond.errors.0 |= ErrorBits::OTHER,
                _ if lower.starts_with("grpc:") => {
                    let bits =
                        GrpcBits::parse_token(&lower["grpc:".len()..]).ok_or_else(|| bad(t))?;
                    cond.grpc.0 |= bits.0;
                }
                _ => {
                    let (ignore, body) = match lower.strip_prefix('!') {
                        Some(rest) => (true, rest),
                        None => (false, lower.as_str()),
                    };
                    let b = body.as_bytes();
                    if b.len() == 3 && b[1..] == *b"xx" && (b'1'..=b'9').contains(&b[0]) && !ignore
                    {
                        cond = cond.status_class(b[0] - b'0');
                    } else {
                        let code = StatusCode::from_str(body).map_err(|_| bad(t))?;
                        cond = if ignore {
                            cond.ignore_status(code)
                        } else {
                            cond.status(code)
                        };
                    }
                }
            }
        }
        if !any {
            return Err(bad(s));
        }
        Ok(cond)
    }
}

// The tests are one file apart: they are longer than the code (one per matching rule).
#[cfg(test)]
#[path = "condition_tests.rs"]
mod tests;
