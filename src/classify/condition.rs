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

    /// Classify a status code directly.
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

impl Classify for Condition {
    type Classifier = Condition;
    #[inline]
    fn classify_request<B>(&self, _req: &Request<B>) -> Condition {
        // A few words; a long exact-status list is shared, not copied.
        self.clone()
    }
}

impl Classifier for Condition {
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

/// One [`Condition`] shared by many layers (or many clones of one) by reference: each
/// request's classifier is then a pointer (and a reference-count round trip) instead of a
/// copy of the condition. The chain's links use it.
impl Classify for std::sync::Arc<Condition> {
    type Classifier = std::sync::Arc<Condition>;
    #[inline]
    fn classify_request<B>(&self, _req: &Request<B>) -> Self::Classifier {
        self.clone()
    }
}

impl Classifier for std::sync::Arc<Condition> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn res(code: u16) -> Response<()> {
        Response::builder().status(code).body(()).unwrap()
    }

    fn classify(c: &Condition, code: u16) -> Outcome {
        c.classify_request(&Request::new(()))
            .classify_response(&res(code))
    }

    #[test]
    fn exact_status_set() {
        let c: Condition = "403, 404".parse().unwrap();
        assert!(classify(&c, 404).is_failure());
        assert!(classify(&c, 403).is_failure());
        assert_eq!(classify(&c, 405), Outcome::Success);
        assert_eq!(classify(&c, 200), Outcome::Success);
    }

    #[test]
    fn status_classes() {
        let c: Condition = "4xx".parse().unwrap();
        for code in [400, 404, 451, 499] {
            assert!(classify(&c, code).is_failure(), "{code}");
        }
        assert_eq!(classify(&c, 500), Outcome::Success);
        assert_eq!(classify(&c, 399), Outcome::Success);
        let c: Condition = "5XX".parse().unwrap();
        assert!(classify(&c, 503).is_failure());
        assert_eq!(classify(&c, 404), Outcome::Success);
    }

    #[test]
    fn ignored_wins_over_failure() {
        let c: Condition = "5xx,!503".parse().unwrap();
        assert_eq!(classify(&c, 503), Outcome::Ignored);
        assert!(classify(&c, 502).is_failure());
    }

    #[test]
    fn errors_by_kind() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let timed_out = std::io::Error::from(std::io::ErrorKind::TimedOut);
        let other = std::io::Error::other("boom");
        let elapsed = tower::timeout::error::Elapsed::new();

        let transport_only: Condition = "transport".parse().unwrap();
        assert_eq!(
            transport_only.classify_error_ref(&refused),
            Outcome::Failure(FailureKind::Transport)
        );
        assert_eq!(
            transport_only.classify_error_ref(&timed_out),
            Outcome::Success
        );
        assert_eq!(
            transport_only.classify_error_ref(&elapsed),
            Outcome::Success
        );

        let timeout_only: Condition = "timeout".parse().unwrap();
        assert_eq!(
            timeout_only.classify_error_ref(&elapsed),
            Outcome::Failure(FailureKind::Timeout)
        );
        assert_eq!(
            timeout_only.classify_error_ref(&timed_out),
            Outcome::Failure(FailureKind::Timeout)
        );
        assert_eq!(timeout_only.classify_error_ref(&refused), Outcome::Success);

        let fail: Condition = "fail".parse().unwrap();
        assert_eq!(
            fail.classify_error_ref(&other),
            Outcome::Failure(FailureKind::Other)
        );
        assert!(fail.classify_error_ref(&refused).is_failure());
        // A response is never an error.
        assert_eq!(classify(&fail, 500), Outcome::Success);
    }

    #[test]
    fn combination_and_round_trip() {
        let c: Condition = "404,5xx,fail".parse().unwrap();
        assert!(classify(&c, 404).is_failure());
        assert!(classify(&c, 500).is_failure());
        assert_eq!(classify(&c, 403), Outcome::Success);
        assert_eq!(c.to_string(), "5xx,404,fail");
        let back: Condition = c.to_string().parse().unwrap();
        assert_eq!(back, c);
        let or = Condition::never()
            .status(StatusCode::NOT_FOUND)
            .or(Condition::never().timeouts());
        assert_eq!(or.to_string(), "404,timeout");
        assert_eq!(or, "404,timeout".parse().unwrap());
    }

    #[test]
    fn parse_errors_name_the_token() {
        for bad in ["", " , ", "4x", "1000", "abc", "0xx", "!4xx", "99"] {
            let err = bad.parse::<Condition>().unwrap_err();
            assert!(err.to_string().contains("invalid condition token"), "{bad}");
        }
        let err = "404,nope".parse::<Condition>().unwrap_err();
        assert_eq!(err.token, "nope");
    }

    /// A classifier is copied into every request's response future: the common conditions
    /// must be a few words, not two 900-bit status sets.
    #[test]
    fn a_condition_is_a_few_words() {
        assert!(
            std::mem::size_of::<Condition>() <= 32,
            "Condition is {} bytes",
            std::mem::size_of::<Condition>()
        );
    }

    #[test]
    fn never_and_defaults() {
        assert!(Condition::never().is_never());
        let d = Condition::server_errors_and_failures();
        assert_eq!(d.to_string(), "5xx,fail");
        assert!(!d.is_never());
    }

    #[test]
    fn exact_statuses_in_and_out_of_a_class() {
        // Inside a failing class an exact status adds nothing, whatever the order.
        let a = Condition::never()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .status_class(5);
        let b = Condition::never()
            .status_class(5)
            .status(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "5xx");
        // Outside it, only that status.
        let c = a.status(StatusCode::NOT_FOUND);
        assert!(classify(&c, 404).is_failure());
        assert_eq!(classify(&c, 403), Outcome::Success);
        assert_eq!(classify(&c, 405), Outcome::Success);
        assert!(classify(&c, 599).is_failure());
        assert_eq!(c.to_string(), "5xx,404");
    }

    #[test]
    fn ignore_wins_over_an_exact_status_and_a_class() {
        let c: Condition = "404,5xx,!404,!503".parse().unwrap();
        assert_eq!(classify(&c, 404), Outcome::Ignored);
        assert_eq!(classify(&c, 503), Outcome::Ignored);
        assert!(classify(&c, 500).is_failure());
        // Ignoring a status no failure names is still ignoring it.
        assert_eq!(classify(&c, 200), Outcome::Success);
        let only: Condition = "!200".parse().unwrap();
        assert_eq!(classify(&only, 200), Outcome::Ignored);
        assert!(only.is_never());
    }

    #[test]
    fn many_exact_statuses_stay_exact() {
        // More exact statuses than fit inline: shared, same meaning, same text.
        let text = "401,403,404,405,409,410,429,!418,!451";
        let c: Condition = text.parse().unwrap();
        for code in 100..1000u16 {
            let want = match code {
                418 | 451 => Outcome::Ignored,
                401 | 403 | 404 | 405 | 409 | 410 | 429 => {
                    Outcome::Failure(FailureKind::Status(StatusCode::from_u16(code).unwrap()))
                }
                _ => Outcome::Success,
            };
            assert_eq!(classify(&c, code), want, "{code}");
        }
        assert_eq!(c.to_string(), text);
        assert_eq!(c.clone(), c);
        assert_eq!(c.to_string().parse::<Condition>().unwrap(), c);
        // Listing all of a class one by one is that class.
        let mut all = Condition::never();
        for code in 200..300 {
            all = all.status(StatusCode::from_u16(code).unwrap());
        }
        assert_eq!(all, Condition::never().status_class(2));
        assert_eq!(all.to_string(), "2xx");
    }

    #[test]
    fn grpc_codes_from_the_head() {
        let c: Condition = "5xx,grpc:unavailable".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(
            c.classify_head(StatusCode::OK, &h),
            Outcome::Failure(FailureKind::Grpc(14))
        );
        h.insert("grpc-status", "5".parse().unwrap());
        assert_eq!(c.classify_head(StatusCode::OK, &h), Outcome::Success);
        // The HTTP status decides first.
        assert!(c.classify_head(StatusCode::BAD_GATEWAY, &h).is_failure());
        // A condition naming no gRPC code never reads grpc-status.
        let plain: Condition = "5xx".parse().unwrap();
        h.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(plain.classify_head(StatusCode::OK, &h), Outcome::Success);
        // A trailers-only answer is not deferred; a plain gRPC 200 is.
        let mut grpc_ok = HeaderMap::new();
        grpc_ok.insert("content-type", "application/grpc".parse().unwrap());
        assert!(c.defers_to_trailers_of(StatusCode::OK, &grpc_ok));
        assert!(!plain.defers_to_trailers_of(StatusCode::OK, &grpc_ok));
        grpc_ok.insert("grpc-status", "0".parse().unwrap());
        assert!(!c.defers_to_trailers_of(StatusCode::OK, &grpc_ok));
        assert_eq!(
            c.classify_stream_end(StreamEnd::NoTrailers),
            Outcome::Success,
            "internal is not named"
        );
        let g: Condition = "grpc:5xx".parse().unwrap();
        assert_eq!(
            g.classify_stream_end(StreamEnd::NoTrailers),
            Outcome::Failure(FailureKind::Grpc(GRPC_INTERNAL))
        );
        assert_eq!(g.to_string(), "grpc:5xx");
    }

    #[test]
    fn or_merges_every_part() {
        let a: Condition = "404,!503,transport,grpc:14".parse().unwrap();
        let b: Condition = "5xx,timeout".parse().unwrap();
        let u = a.clone().or(b.clone());
        assert_eq!(u, b.or(a));
        assert_eq!(
            u.to_string(),
            "5xx,404,transport,timeout,grpc:unavailable,!503"
        );
        assert_eq!(classify(&u, 503), Outcome::Ignored);
    }
}
