//! gRPC status for [`Condition`](super::Condition).
//!
//! A gRPC call answers HTTP `200` whatever happened; its real result is the `grpc-status`
//! code, sent either in the response head (a "trailers-only" response, typical for an
//! immediate error such as `UNAVAILABLE`) or in the trailers after the last message. A
//! breaker or a balancer that only looks at the HTTP status would count every failed call
//! as a success. So a `Condition` can name gRPC codes (`grpc:unavailable`, `grpc:14`,
//! `grpc:5xx`), which are read from the head when present; otherwise the classifier
//! [defers](super::Classifier::defers_to_trailers) to the end of the body.
//!
//! Whoever records outcomes (the balancer's passive health and endpoint gates, the
//! circuit breaker) then leaves a callback on the response's
//! [`LateOutcomes`](super::LateOutcomes) instead of recording at once; running them at the
//! end of the body is [`late`](super::late)'s part.

use http::HeaderMap;

/// The gRPC status codes by number (`grpc-status` values 0-16), lower case as the
/// `Condition` text takes them.
pub const GRPC_CODE_NAMES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

/// `UNKNOWN`: what a gRPC client reports for a `grpc-status` it cannot read.
pub const GRPC_UNKNOWN: u8 = 2;
/// `INTERNAL`: what a gRPC client reports when the stream ends without a status.
pub const GRPC_INTERNAL: u8 = 13;

/// The codes `grpc:5xx` names: those the gRPC-HTTP mapping (grpc-gateway, Envoy) turns into
/// a 5xx — `UNKNOWN` 500, `DEADLINE_EXCEEDED` 504, `UNIMPLEMENTED` 501, `INTERNAL` 500,
/// `UNAVAILABLE` 503, `DATA_LOSS` 500. The server's fault, not the caller's.
pub(crate) const SERVER_CODES: GrpcBits =
    GrpcBits(1 << 2 | 1 << 4 | 1 << 12 | 1 << 13 | 1 << 14 | 1 << 15);

/// The upper-case name of a gRPC code (`UNAVAILABLE`), or `None` beyond 16.
pub fn grpc_code_name(code: u8) -> Option<&'static str> {
    const UPPER: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    UPPER.get(usize::from(code)).copied()
}

/// A set of gRPC codes (0..=16).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct GrpcBits(pub(crate) u32);

impl GrpcBits {
    pub(crate) fn insert(&mut self, code: u8) {
        if code <= 16 {
            self.0 |= 1 << code;
        }
    }
    pub(crate) fn contains(&self, code: u8) -> bool {
        code <= 16 && self.0 & (1 << code) != 0
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// Canonical text tokens: `grpc:5xx` for that group, then single names.
    pub(crate) fn tokens(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = self.0;
        if self.0 & SERVER_CODES.0 == SERVER_CODES.0 {
            out.push("grpc:5xx".to_string());
            rest &= !SERVER_CODES.0;
        }
        for (code, name) in GRPC_CODE_NAMES.iter().enumerate() {
            if rest & (1 << code) != 0 {
                out.push(format!("grpc:{name}"));
            }
        }
        out
    }

    /// Parses what follows `grpc:`: a name (`unavailable`, `DEADLINE-EXCEEDED`), a number
    /// (`14`), or `5xx`. `None` when it is none of these.
    pub(crate) fn parse_token(t: &str) -> Option<GrpcBits> {
        let t = t.trim();
        if t.eq_ignore_ascii_case("5xx") {
            return Some(SERVER_CODES);
        }
        let mut bits = GrpcBits::default();
        if let Ok(n) = t.parse::<u8>() {
            if n > 16 {
                return None;
            }
            bits.insert(n);
            return Some(bits);
        }
        let norm = t.to_ascii_lowercase().replace('-', "_");
        let code = GRPC_CODE_NAMES.iter().position(|n| *n == norm)?;
        bits.insert(u8::try_from(code).ok()?);
        Some(bits)
    }
}

/// `true` when the headers carry a gRPC response (`content-type: application/grpc...`).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The `grpc-status` of a head or trailers: `None` when absent; a value that is not a
/// number 0-16 reads as `UNKNOWN`, as a gRPC client reports it (an unreadable status fails
/// closed rather than passing as `OK`).
pub fn grpc_status(headers: &HeaderMap) -> Option<u8> {
    let v = headers.get("grpc-status")?;
    let code = std::str::from_utf8(v.as_bytes())
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok())
        .filter(|c| *c <= 16);
    Some(code.unwrap_or(GRPC_UNKNOWN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::StreamEnd;
    use http::{Request, Response};

    #[test]
    fn tokens_parse_and_print_back() {
        assert_eq!(
            GrpcBits::parse_token("unavailable"),
            Some(GrpcBits(1 << 14))
        );
        assert_eq!(
            GrpcBits::parse_token("DEADLINE-EXCEEDED"),
            Some(GrpcBits(1 << 4))
        );
        assert_eq!(GrpcBits::parse_token("14"), Some(GrpcBits(1 << 14)));
        assert_eq!(GrpcBits::parse_token("5XX"), Some(SERVER_CODES));
        assert_eq!(GrpcBits::parse_token("17"), None);
        assert_eq!(GrpcBits::parse_token("nope"), None);
        let mut b = SERVER_CODES;
        b.insert(8);
        assert_eq!(b.tokens(), ["grpc:5xx", "grpc:resource_exhausted"]);
        assert_eq!(grpc_code_name(14), Some("UNAVAILABLE"));
        assert_eq!(grpc_code_name(17), None);
    }

    #[test]
    fn an_unreadable_status_is_unknown_not_ok() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(grpc_status(&h), Some(14));
        h.insert("grpc-status", "99".parse().unwrap());
        assert_eq!(grpc_status(&h), Some(GRPC_UNKNOWN));
        h.insert(
            "grpc-status",
            http::HeaderValue::from_bytes(b"\xff0").unwrap(),
        );
        assert_eq!(grpc_status(&h), Some(GRPC_UNKNOWN));
    }

    use crate::classify::{Classifier, Classify, Condition, FailureKind, Outcome};

    fn grpc_res(head_status: Option<&'static str>) -> Response<()> {
        let mut b = Response::builder().header("content-type", "application/grpc+proto");
        if let Some(s) = head_status {
            b = b.header("grpc-status", s);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn condition_text_with_grpc_codes_round_trips() {
        let c: Condition = "5xx, grpc:unavailable, GRPC:4".parse().unwrap();
        assert_eq!(c.to_string(), "5xx,grpc:deadline_exceeded,grpc:unavailable");
        assert_eq!(c.to_string().parse::<Condition>().unwrap(), c);
        let g: Condition = "grpc:5xx,grpc:resource_exhausted".parse().unwrap();
        assert_eq!(g.to_string(), "grpc:5xx,grpc:resource_exhausted");
        assert_eq!(g.to_string().parse::<Condition>().unwrap(), g);
        assert!(!g.is_never());
        assert!("grpc:teapot".parse::<Condition>().is_err());
        assert!("grpc:17".parse::<Condition>().is_err());
        assert_eq!(
            Condition::never().grpc_server_errors().grpc_code(8),
            g,
            "builder and text agree"
        );
    }

    #[test]
    fn a_trailers_only_status_is_classified_from_the_head() {
        let c: Condition = "grpc:unavailable".parse().unwrap();
        let k = c.classify_request(&Request::new(()));
        let res = grpc_res(Some("14"));
        assert!(!k.defers_to_trailers(&res));
        assert_eq!(
            k.clone().classify_response(&res),
            Outcome::Failure(FailureKind::Grpc(14))
        );
        assert_eq!(k.classify_response(&grpc_res(Some("5"))), Outcome::Success);
        // Without gRPC codes in the condition, grpc-status is not looked at.
        let http_only: Condition = "5xx".parse().unwrap();
        assert_eq!(
            http_only.clone().classify_response(&grpc_res(Some("14"))),
            Outcome::Success
        );
        assert!(!http_only.defers_to_trailers(&grpc_res(None)));
        assert_eq!(
            FailureKind::Grpc(14).to_string(),
            "grpc status 14 (UNAVAILABLE)"
        );
    }

    #[test]
    fn a_status_in_the_trailers_is_classified_at_the_end() {
        let c: Condition = "grpc:5xx,transport".parse().unwrap();
        assert!(c.defers_to_trailers(&grpc_res(None)));
        // Not gRPC, or not 200: decided from the head.
        let plain = Response::builder().body(()).unwrap();
        assert!(!c.defers_to_trailers(&plain));
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(
            c.clone().classify_end(StreamEnd::Trailers(&t)),
            Outcome::Failure(FailureKind::Grpc(14))
        );
        t.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(
            c.clone().classify_end(StreamEnd::Trailers(&t)),
            Outcome::Success
        );
        // No status at all: INTERNAL, as a gRPC client reports it.
        assert_eq!(
            c.clone().classify_end(StreamEnd::NoTrailers),
            Outcome::Failure(FailureKind::Grpc(GRPC_INTERNAL))
        );
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(
            c.classify_end(StreamEnd::Error(&reset)),
            Outcome::Failure(FailureKind::Transport)
        );
    }
}
