//! Unit tests of [`Condition`]: every matching rule (exact statuses in and out of a
//! class, ignore over fail, error kinds, gRPC), the text form and the size.

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

#[test]
fn judges_heads_only_with_a_failing_status_or_grpc_code() {
    let judged = |s: &str| s.parse::<Condition>().unwrap().judges_heads();
    assert!(!Condition::never().judges_heads());
    assert!(!Condition::never().any_error().judges_heads());
    assert!(!judged("transport,timeout"));
    // An ignored status alone never makes a head a failure.
    assert!(!judged("!503"));
    assert!(judged("503"));
    assert!(judged("5xx"));
    assert!(judged("404,!503"));
    assert!(judged("grpc:14"));
    // Whatever it says, a condition that judges no head classifies every head a success.
    for c in ["transport,timeout", "!503", "fail"] {
        let c: Condition = c.parse().unwrap();
        if !c.judges_heads() {
            for status in [200, 404, 500, 502, 503, 504] {
                assert!(!classify(&c, status).is_failure(), "{c} {status}");
            }
        }
    }
}
