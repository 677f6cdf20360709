//! Circuit breaker semantics. Time logic runs on Tokio's paused clock; the last tests run a
//! real flaky backend on 127.0.0.1 reached through `proxy::Forward`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::Either;
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_patterns::breaker::{
    Circuit, CircuitBreakerConfig, CircuitBreakerLayer, CircuitOpen, IllegalTransition, Mode,
    State, WaitStrategy, Window,
};
use tower_patterns::classify::{Condition, FailureKind, Outcome};
use tower_patterns::gate::Gate;
use tower_patterns::BoxError;

const S: Outcome = Outcome::Success;
const F: Outcome = Outcome::Failure(FailureKind::Status(StatusCode::INTERNAL_SERVER_ERROR));

/// An in-process upstream: answers the status in `x-status` after `x-delay-ms`.
async fn upstream(req: Request<String>) -> Result<Response<String>, Infallible> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let Some(ms) = header("x-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let status = header("x-status").unwrap_or(200) as u16;
    Ok(Response::builder()
        .status(status)
        .body(String::new())
        .unwrap())
}

fn req(status: u16) -> Request<String> {
    Request::builder()
        .header("x-status", status)
        .body(String::new())
        .unwrap()
}

fn slow_req(status: u16, ms: u64) -> Request<String> {
    Request::builder()
        .header("x-status", status)
        .header("x-delay-ms", ms)
        .body(String::new())
        .unwrap()
}

fn rejection(err: &BoxError) -> CircuitOpen {
    *err.downcast_ref::<CircuitOpen>()
        .unwrap_or_else(|| panic!("expected CircuitOpen, got {err}"))
}

fn cfg() -> CircuitBreakerConfig {
    CircuitBreakerConfig::new()
        .failure_rate_threshold(50.0)
        .window(Window::Count(10))
        .minimum_calls(5)
        .wait_in_open(Duration::from_secs(10))
        .half_open_permits(4)
}

/// Drives the breaker directly through the gate API.
fn run(b: &Circuit, outcomes: &[Outcome]) {
    for o in outcomes {
        let p = b.try_acquire().expect("admitted");
        b.complete(p, *o, Duration::from_millis(1));
    }
}

/// Trips the breaker and waits out the open state; the next acquire goes half-open.
async fn to_half_open(b: &Circuit) {
    run(b, &[F, F, F, F, F]);
    assert_eq!(b.state(), State::Open);
    tokio::time::sleep(Duration::from_secs(10)).await;
}

#[tokio::test(start_paused = true)]
async fn min_calls_five_at_fifty_percent_opens_on_the_fifth_call() {
    let layer = CircuitBreakerLayer::new(cfg()).unwrap();
    let b = layer.breaker().clone();
    let svc = ServiceBuilder::new().layer(layer).service_fn(upstream);
    for (i, status) in [500, 500, 500, 200].into_iter().enumerate() {
        let res = svc.clone().oneshot(req(status)).await.unwrap();
        assert_eq!(res.status().as_u16(), status);
        assert_eq!(b.state(), State::Closed, "after call {}", i + 1);
    }
    // 3 failures out of 4: 75%, but below the minimum of 5 calls.
    assert_eq!(b.metrics().failure_rate, None);
    svc.clone().oneshot(req(200)).await.unwrap();
    assert_eq!(b.state(), State::Open, "3 of 5 failed: 60% >= 50%");
    assert_eq!(b.metrics().failure_rate, Some(60.0));

    let err = svc.clone().oneshot(req(200)).await.unwrap_err();
    let open = rejection(&err);
    assert_eq!(open.state, State::Open);
    assert_eq!(open.remaining, Some(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let err = svc.clone().oneshot(req(200)).await.unwrap_err();
    assert_eq!(rejection(&err).remaining, Some(Duration::from_secs(6)));
    assert_eq!(b.metrics().not_permitted_calls, 2);
}

#[tokio::test(start_paused = true)]
async fn exactly_at_threshold_trips_and_just_below_does_not() {
    let b = Circuit::new(cfg().minimum_calls(4)).unwrap();
    run(&b, &[F, S, S, S]);
    assert_eq!(b.state(), State::Closed, "25% < 50%");
    run(&b, &[F]);
    // window 10: F S S S F = 40%
    assert_eq!(b.state(), State::Closed);
    run(&b, &[F]);
    assert_eq!(b.state(), State::Open, "3 of 6 = 50% trips (>=)");
}

#[tokio::test(start_paused = true)]
async fn slow_calls_open_on_slow_rate_while_failure_rate_is_below_threshold() {
    let layer = CircuitBreakerLayer::new(
        cfg()
            .slow_call_duration(Duration::from_secs(4))
            .slow_call_rate_threshold(60.0),
    )
    .unwrap();
    let b = layer.breaker().clone();
    let svc = ServiceBuilder::new().layer(layer).service_fn(upstream);
    let calls = [
        (200, 5_000),
        (200, 5_000),
        (500, 100),
        (200, 100),
        (200, 5_000),
    ];
    for (i, (status, ms)) in calls.into_iter().enumerate() {
        assert_eq!(b.state(), State::Closed, "before call {}", i + 1);
        let started = Instant::now();
        svc.clone().oneshot(slow_req(status, ms)).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(ms));
    }
    assert_eq!(b.state(), State::Open);
    let m = b.metrics();
    assert_eq!(m.slow_call_rate, Some(60.0));
    assert_eq!(m.failure_rate, Some(20.0), "failure rate stayed below 50%");
    assert_eq!((m.calls, m.slow_calls, m.failed_calls), (5, 3, 1));
}

#[tokio::test(start_paused = true)]
async fn time_window_forgets_calls_older_than_the_window() {
    let time_cfg = || {
        cfg()
            .window(Window::Time(Duration::from_secs(10)))
            .minimum_calls(4)
    };
    // Control: the same calls inside one window trip.
    let b = Circuit::new(time_cfg()).unwrap();
    run(&b, &[F, F]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    run(&b, &[S, S]);
    assert_eq!(b.state(), State::Open);

    // With the failures older than the window, they no longer count.
    let b = Circuit::new(time_cfg()).unwrap();
    run(&b, &[F, F]);
    assert_eq!(b.metrics().calls, 2);
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(b.metrics().calls, 0, "expired");
    run(&b, &[S, S, F]);
    assert_eq!(b.metrics().failure_rate, None, "3 calls < minimum 4");
    run(&b, &[S]);
    let m = b.metrics();
    assert_eq!((m.calls, m.failed_calls), (4, 1));
    assert_eq!(m.failure_rate, Some(25.0));
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_trip_without_a_rate() {
    let b = Circuit::new(
        CircuitBreakerConfig::new()
            .no_failure_rate()
            .consecutive_failures(3)
            .wait_in_open(Duration::from_secs(1)),
    )
    .unwrap();
    run(&b, &[F, F, S, F, F]);
    assert_eq!(b.state(), State::Closed, "the success broke the run");
    assert_eq!(b.metrics().consecutive_failures, 2);
    run(&b, &[F]);
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn half_open_rejects_the_fifth_of_four_and_a_dropped_call_returns_its_permit() {
    let b = Circuit::new(cfg()).unwrap();
    to_half_open(&b).await;
    let mut permits: Vec<_> = (0..4)
        .map(|i| b.try_acquire().unwrap_or_else(|e| panic!("probe {i}: {e}")))
        .collect();
    assert_eq!(b.state(), State::HalfOpen);
    let err = b.try_acquire().unwrap_err();
    assert_eq!(err.state, State::HalfOpen);
    assert_eq!(err.remaining, None);
    assert_eq!(b.metrics().half_open_available, Some(0));

    // Cancelled: the permit comes back and nothing is recorded.
    drop(permits.pop());
    assert_eq!(b.metrics().half_open_available, Some(1));
    assert_eq!(b.metrics().calls, 0);
    permits.push(b.try_acquire().expect("returned permit"));
    assert!(b.try_acquire().is_err());
}

#[tokio::test(start_paused = true)]
async fn dropped_response_future_returns_its_half_open_permit() {
    // resilience4j #903: a probe whose future is dropped before completing must not leak.
    let layer = CircuitBreakerLayer::new(cfg().half_open_permits(1)).unwrap();
    let b = layer.breaker().clone();
    let mut svc = ServiceBuilder::new().layer(layer).service_fn(upstream);
    to_half_open(&b).await;

    let fut = svc.ready().await.unwrap().call(slow_req(200, 60_000));
    // The probe holds the only permit.
    let err = svc.ready().await.unwrap().call(req(200)).await.unwrap_err();
    assert_eq!(rejection(&err).state, State::HalfOpen);
    drop(fut);
    assert_eq!(b.metrics().half_open_available, Some(1));
    let res = svc.ready().await.unwrap().call(req(200)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(b.state(), State::Closed, "the one probe succeeded");
}

#[tokio::test(start_paused = true)]
async fn half_open_probes_decide_by_the_same_thresholds() {
    let b = Circuit::new(cfg()).unwrap();
    to_half_open(&b).await;
    run(&b, &[F, F, S]);
    assert_eq!(
        b.state(),
        State::HalfOpen,
        "undecided until all 4 probes report"
    );
    run(&b, &[F]);
    assert_eq!(b.state(), State::Open, "F F S F: 75% >= 50%");

    tokio::time::sleep(Duration::from_secs(10)).await;
    run(&b, &[F, S, S, S]);
    assert_eq!(b.state(), State::Closed, "F S S S: 25% < 50%");
    // The closed window starts empty.
    assert_eq!(b.metrics().calls, 0);
}

#[tokio::test(start_paused = true)]
async fn slow_probes_reopen_the_circuit() {
    let b = Circuit::new(
        cfg()
            .no_failure_rate()
            .slow_call_rate_threshold(50.0)
            .slow_call_duration(Duration::from_secs(2))
            .half_open_permits(2),
    )
    .unwrap();
    let slow = |b: &Circuit, n: usize| {
        for _ in 0..n {
            let p = b.try_acquire().unwrap();
            b.complete(p, S, Duration::from_secs(3));
        }
    };
    slow(&b, 5);
    assert_eq!(b.state(), State::Open, "100% slow, all successful");
    tokio::time::sleep(Duration::from_secs(10)).await;
    slow(&b, 1);
    run(&b, &[S]);
    assert_eq!(b.state(), State::Open, "1 of 2 probes slow: 50% >= 50%");
    tokio::time::sleep(Duration::from_secs(10)).await;
    let p = b.try_acquire().unwrap();
    b.complete(p, S, Duration::from_millis(1_999));
    run(&b, &[S]);
    assert_eq!(b.state(), State::Closed, "just under the slow duration");
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_in_half_open_return_their_permits() {
    let layer = CircuitBreakerLayer::new(cfg().half_open_permits(2))
        .unwrap()
        .classify(Condition::server_errors_and_failures().ignore_status(StatusCode::NOT_FOUND));
    let b = layer.breaker().clone();
    let svc = ServiceBuilder::new().layer(layer).service_fn(upstream);
    to_half_open(&b).await;
    for _ in 0..5 {
        let res = svc.clone().oneshot(req(404)).await.unwrap();
        assert_eq!(res.status(), 404);
        assert_eq!(b.metrics().half_open_available, Some(2));
        assert_eq!(b.metrics().calls, 0);
    }
    svc.clone().oneshot(req(200)).await.unwrap();
    assert_eq!(b.state(), State::HalfOpen);
    svc.clone().oneshot(req(200)).await.unwrap();
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn ignored_outcomes_in_closed_state_neither_count_nor_trip() {
    let b = Circuit::new(cfg()).unwrap();
    for _ in 0..20 {
        let p = b.try_acquire().unwrap();
        b.complete(p, Outcome::Ignored, Duration::ZERO);
    }
    assert_eq!(b.metrics().calls, 0);
    run(&b, &[F, F, S, S, S]);
    assert_eq!(b.state(), State::Closed, "40%");
}

#[tokio::test(start_paused = true)]
async fn forced_open_stays_open_after_the_wait() {
    let b = Circuit::new(cfg()).unwrap();
    let mut rx = b.subscribe();
    b.force_open();
    assert_eq!(*rx.borrow_and_update(), State::ForcedOpen);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let err = b.try_acquire().unwrap_err();
    assert_eq!(err.state, State::ForcedOpen);
    assert_eq!(err.remaining, None);
    assert_eq!(b.state(), State::ForcedOpen);
    assert_eq!(
        b.transition_to(State::HalfOpen),
        Err(IllegalTransition {
            from: State::ForcedOpen,
            to: State::HalfOpen
        })
    );
    b.force_closed();
    assert!(b.try_acquire().is_ok());
    assert_eq!(*rx.borrow_and_update(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn same_state_transitions_emit_nothing_and_illegal_ones_are_errors() {
    let b = Circuit::new(cfg()).unwrap();
    let rx = b.subscribe();
    assert_eq!(b.transition_to(State::Closed), Ok(false));
    b.force_closed();
    assert!(!rx.has_changed().unwrap());
    assert_eq!(
        b.transition_to(State::HalfOpen),
        Err(IllegalTransition {
            from: State::Closed,
            to: State::HalfOpen
        })
    );
    assert_eq!(b.transition_to(State::Open), Ok(true));
    assert!(rx.has_changed().unwrap());
    assert_eq!(b.transition_to(State::HalfOpen), Ok(true));
    assert_eq!(b.transition_to(State::HalfOpen), Ok(false));
}

#[tokio::test(start_paused = true)]
async fn disabled_and_metrics_only() {
    let b = Circuit::new(cfg()).unwrap();
    b.disable();
    run(&b, &[F; 20]);
    assert_eq!(b.state(), State::Disabled);
    assert_eq!(b.metrics().calls, 0, "disabled records nothing");

    b.metrics_only();
    run(&b, &[F; 20]);
    assert_eq!(b.state(), State::MetricsOnly, "never trips");
    let m = b.metrics();
    assert_eq!(
        (m.calls, m.failed_calls, m.failure_rate),
        (10, 10, Some(100.0))
    );

    b.reset();
    assert_eq!(b.state(), State::Closed);
    assert_eq!(b.metrics().calls, 0);
}

#[tokio::test(start_paused = true)]
async fn subscription_sees_every_transition() {
    let b = Circuit::new(cfg().automatic_half_open(true)).unwrap();
    let mut rx = b.subscribe();
    run(&b, &[F; 5]);
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), State::Open);
    // Automatic: the timer moves it to half-open with no call.
    let opened = Instant::now();
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), State::HalfOpen);
    assert_eq!(opened.elapsed(), Duration::from_secs(10));
    run(&b, &[S; 4]);
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow_and_update(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn lazy_half_open_waits_for_a_call() {
    let b = Circuit::new(cfg()).unwrap();
    run(&b, &[F; 5]);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(b.state(), State::Open, "nothing happens without a call");
    assert_eq!(b.open_remaining(), Some(Duration::ZERO));
    let _p = b.try_acquire().unwrap();
    assert_eq!(b.state(), State::HalfOpen);
}

#[tokio::test(start_paused = true)]
async fn max_half_open_wait_goes_back_to_open() {
    // Automatic: a timer reopens the circuit.
    let b = Circuit::new(cfg().max_half_open_wait(Duration::from_secs(5))).unwrap();
    to_half_open(&b).await;
    let stuck = b.try_acquire().unwrap();
    let mut rx = b.subscribe();
    rx.changed().await.unwrap();
    assert_eq!(*rx.borrow(), State::Open);
    // A late result of the stale probe changes nothing.
    b.complete(stuck, S, Duration::ZERO);
    assert_eq!(b.state(), State::Open);
    assert_eq!(b.open_remaining(), Some(Duration::from_secs(10)));
}

#[test]
fn without_a_runtime_half_open_and_its_maximum_wait_are_checked_lazily() {
    // No Tokio runtime: no timers, real clock. Every check below happens after at least
    // the configured time, so it cannot race.
    let b = Circuit::new(
        cfg()
            .wait_in_open(Duration::from_millis(20))
            .automatic_half_open(true)
            .max_half_open_wait(Duration::from_millis(20)),
    )
    .unwrap();
    run(&b, &[F; 5]);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(b.state(), State::Open, "no runtime, no timer");
    let _probe = b.try_acquire().unwrap();
    assert_eq!(b.state(), State::HalfOpen);
    std::thread::sleep(Duration::from_millis(30));
    assert!(b.try_acquire().is_err());
    assert_eq!(b.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn exponential_backoff_grows_caps_and_resets_on_close() {
    let b = Circuit::new(
        cfg()
            .half_open_permits(1)
            .wait_strategy(WaitStrategy::Exponential {
                initial: Duration::from_secs(1),
                multiplier: 2.0,
                max: Duration::from_secs(5),
                jitter: 0.0,
            }),
    )
    .unwrap();
    run(&b, &[F; 5]);
    let mut waits = vec![b.open_remaining().unwrap()];
    for _ in 0..3 {
        tokio::time::sleep(*waits.last().unwrap()).await;
        run(&b, &[F]); // the probe fails: open again, longer
        waits.push(b.open_remaining().unwrap());
    }
    let secs: Vec<u64> = waits.iter().map(|d| d.as_secs()).collect();
    assert_eq!(secs, [1, 2, 4, 5]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    run(&b, &[S]);
    assert_eq!(b.state(), State::Closed);
    run(&b, &[F; 5]);
    assert_eq!(b.open_remaining(), Some(Duration::from_secs(1)), "reset");
}

/// Issue 10 item 13: an operator close (from open, forced-open, disabled, metrics-only)
/// is a close too, so the next opening starts again from the initial wait.
#[tokio::test(start_paused = true)]
async fn backoff_resets_on_every_close_not_only_half_open_to_closed() {
    let exp = || {
        Circuit::new(
            cfg()
                .half_open_permits(1)
                .wait_strategy(WaitStrategy::Exponential {
                    initial: Duration::from_secs(1),
                    multiplier: 2.0,
                    max: Duration::from_secs(60),
                    jitter: 0.0,
                }),
        )
        .unwrap()
    };
    // Grows the backoff to 4 s (three openings: 1, 2, 4), leaving the breaker open.
    async fn grow(b: &Circuit) {
        run(b, &[F; 5]);
        for _ in 0..2 {
            tokio::time::sleep(b.open_remaining().unwrap()).await;
            run(b, &[F]);
        }
        assert_eq!(b.open_remaining(), Some(Duration::from_secs(4)));
    }
    type Close = fn(&Circuit);
    let closes: [(&str, Close, Option<Close>); 5] = [
        ("force_closed from open", |b| b.force_closed(), None),
        (
            "transition_to(Closed) from open",
            |b| {
                b.transition_to(State::Closed).unwrap();
            },
            None,
        ),
        (
            "force_closed from forced-open",
            |b| b.force_closed(),
            Some(|b| b.force_open()),
        ),
        (
            "force_closed from disabled",
            |b| b.force_closed(),
            Some(|b| b.disable()),
        ),
        (
            "force_closed from metrics-only",
            |b| b.force_closed(),
            Some(|b| b.metrics_only()),
        ),
    ];
    for (what, close, before) in closes {
        let b = exp();
        grow(&b).await;
        if let Some(before) = before {
            before(&b);
        }
        close(&b);
        assert_eq!(b.state(), State::Closed, "{what}");
        run(&b, &[F; 5]);
        assert_eq!(b.state(), State::Open, "{what}");
        assert_eq!(
            b.open_remaining(),
            Some(Duration::from_secs(1)),
            "{what}: the backoff restarts after a close"
        );
    }
}

/// Configured durations saturate (issue 10): `Duration::MAX` anywhere is refused with a
/// typed error or means "practically never", and never panics.
#[tokio::test(start_paused = true)]
async fn huge_configured_durations_saturate() {
    let err = Circuit::new(cfg().window(Window::Time(Duration::MAX))).unwrap_err();
    assert!(err.to_string().contains("window"), "{err}");
    for wait in [
        WaitStrategy::Constant(Duration::MAX),
        WaitStrategy::Exponential {
            initial: Duration::MAX,
            multiplier: 2.0,
            max: Duration::MAX,
            jitter: 0.5,
        },
    ] {
        let b = Circuit::new(
            cfg()
                .half_open_permits(1)
                .wait_strategy(wait)
                .slow_call_duration(Duration::MAX)
                .max_half_open_wait(Duration::MAX),
        )
        .unwrap();
        run(&b, &[F; 5]);
        assert_eq!(b.state(), State::Open);
        assert!(b.open_remaining().unwrap() > Duration::from_secs(86_400 * 365));
        tokio::time::sleep(Duration::from_secs(86_400)).await;
        assert!(b.try_acquire().is_err(), "still open");
        b.transition_to(State::HalfOpen).unwrap();
        let p = b.try_acquire().unwrap();
        b.complete(p, F, Duration::MAX);
        assert_eq!(b.state(), State::Open);
        let _ = b.metrics();
    }
}

#[tokio::test(start_paused = true)]
async fn jitter_stays_within_its_bounds() {
    for _ in 0..20 {
        let b = Circuit::new(cfg().wait_strategy(WaitStrategy::Exponential {
            initial: Duration::from_secs(10),
            multiplier: 1.5,
            max: Duration::from_secs(60),
            jitter: 0.5,
        }))
        .unwrap();
        run(&b, &[F; 5]);
        let w = b.open_remaining().unwrap();
        assert!(
            w >= Duration::from_secs(5) && w <= Duration::from_secs(15),
            "{w:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn fallback_answers_rejected_calls_with_the_reason() {
    let fallback = tower::service_fn(|req: Request<String>| async move {
        let why = req.extensions().get::<CircuitOpen>().copied().unwrap();
        Ok::<_, Infallible>(Response::new(format!(
            "fallback: retry in {}s",
            why.remaining.unwrap().as_secs()
        )))
    });
    let layer = CircuitBreakerLayer::new(cfg())
        .unwrap()
        .fallback_service(fallback);
    let b = layer.breaker().clone();
    let hits = Arc::new(AtomicU32::new(0));
    let h = hits.clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |r: Request<String>| {
            h.fetch_add(1, Ordering::SeqCst);
            upstream(r)
        });
    for _ in 0..5 {
        svc.clone().oneshot(req(503)).await.unwrap();
    }
    assert_eq!(b.state(), State::Open);
    let res = svc.clone().oneshot(req(200)).await.unwrap();
    // The fallback's own body is on the right of the breaker's body enum.
    assert!(matches!(res.body(), Either::Right(b) if b == "fallback: retry in 10s"));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        5,
        "the upstream was not called"
    );
}

#[tokio::test(start_paused = true)]
async fn closure_fallback_and_errors_count_as_failures() {
    let layer = CircuitBreakerLayer::new(cfg()).unwrap().fallback_fn(
        |_r: Request<String>, why: CircuitOpen| async move {
            Ok::<_, Infallible>(Response::new(why.to_string()))
        },
    );
    let b = layer.breaker().clone();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service_fn(|_r: Request<String>| async {
            Err::<Response<String>, _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
        });
    for _ in 0..5 {
        let err = svc.clone().oneshot(req(200)).await.unwrap_err();
        assert!(err.downcast_ref::<std::io::Error>().is_some());
    }
    assert_eq!(b.state(), State::Open);
    let res = svc.clone().oneshot(req(200)).await.unwrap();
    assert!(
        matches!(res.body(), Either::Right(b) if b.contains("call not permitted")),
        "{:?}",
        res.body()
    );
}

#[tokio::test(start_paused = true)]
async fn reject_in_call_works_behind_buffer() {
    let layer = CircuitBreakerLayer::new(cfg()).unwrap();
    let b = layer.breaker().clone();
    let svc = ServiceBuilder::new()
        .buffer(8)
        .layer(layer)
        .service_fn(upstream);
    for _ in 0..5 {
        svc.clone().oneshot(req(500)).await.unwrap();
    }
    assert_eq!(b.state(), State::Open);
    for _ in 0..3 {
        let err = svc.clone().oneshot(req(200)).await.unwrap_err();
        assert_eq!(rejection(&err).state, State::Open);
    }
    // The buffer is still healthy: after the wait, probes go through and close it.
    tokio::time::sleep(Duration::from_secs(10)).await;
    for _ in 0..4 {
        svc.clone().oneshot(req(200)).await.unwrap();
    }
    assert_eq!(b.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn back_pressure_mode_waits_in_poll_ready() {
    let layer = CircuitBreakerLayer::new(cfg().half_open_permits(1))
        .unwrap()
        .mode(Mode::BackPressure);
    let b = layer.breaker().clone();
    let mut svc = ServiceBuilder::new().layer(layer).service_fn(upstream);
    for _ in 0..5 {
        svc.ready().await.unwrap().call(req(500)).await.unwrap();
    }
    assert_eq!(b.state(), State::Open);
    let opened = Instant::now();
    // Readiness waits out the open state instead of failing.
    svc.ready().await.unwrap();
    assert_eq!(opened.elapsed(), Duration::from_secs(10));
    assert_eq!(b.state(), State::HalfOpen);
    // The reserved permit is the only probe; a second service waits for it.
    let mut other = svc.clone();
    let waiting = tokio::spawn(async move {
        other.ready().await.unwrap();
        other.call(req(200)).await.unwrap().status()
    });
    tokio::task::yield_now().await;
    assert!(!waiting.is_finished());
    let res = svc.call(req(200)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(b.state(), State::Closed);
    assert_eq!(waiting.await.unwrap(), 200, "woken by the transition");
    assert_eq!(
        b.metrics().not_permitted_calls,
        0,
        "waiting is not a refusal"
    );
}

#[test]
fn concurrent_callers_never_exceed_the_permits() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let b = rt.block_on(async {
        let b = Circuit::new(cfg().half_open_permits(7)).unwrap();
        to_half_open(&b).await;
        let p = b.try_acquire().unwrap();
        drop(p); // returned: 7 available in half-open
        b
    });
    assert_eq!(b.state(), State::HalfOpen);
    for round in 0..20 {
        let admitted = Arc::new(AtomicUsize::new(0));
        let held: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let b = b.clone();
                    let admitted = admitted.clone();
                    s.spawn(move || {
                        let mut mine = Vec::new();
                        for _ in 0..2_000 {
                            if let Some(p) = Gate::try_acquire(&b) {
                                admitted.fetch_add(1, Ordering::SeqCst);
                                mine.push(p);
                            }
                        }
                        mine
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(admitted.load(Ordering::SeqCst), 7, "round {round}");
        // Cancel them all concurrently; every permit comes back exactly once.
        std::thread::scope(|s| {
            let mut held = held;
            while let Some(p) = held.pop() {
                s.spawn(move || drop(p));
            }
        });
        assert_eq!(b.metrics().half_open_available, Some(7));
    }
}

#[test]
fn concurrent_closed_calls_trip_exactly_once() {
    // Exponential backoff: a second opening would double the wait, so the wait shows
    // how many times the circuit opened.
    let b = Circuit::new(
        cfg()
            .window(Window::Count(100))
            .minimum_calls(100)
            .wait_strategy(WaitStrategy::Exponential {
                initial: Duration::from_secs(3600),
                multiplier: 2.0,
                max: Duration::from_secs(100_000),
                jitter: 0.0,
            }),
    )
    .unwrap();
    let admitted = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..10_000 {
                    if let Ok(p) = b.try_acquire() {
                        admitted.fetch_add(1, Ordering::Relaxed);
                        b.complete(p, F, Duration::ZERO);
                    }
                }
            });
        }
    });
    assert_eq!(b.state(), State::Open);
    assert!(b.open_remaining().unwrap() <= Duration::from_secs(3600));
    let m = b.metrics();
    assert_eq!((m.calls, m.failed_calls), (100, 100));
    let admitted = admitted.load(Ordering::Relaxed) as u64;
    assert!(admitted >= 100);
    assert_eq!(admitted + m.not_permitted_calls, 40_000);
}

#[test]
fn invalid_configuration_is_a_typed_error() {
    use tower_patterns::breaker::ConfigError;
    assert!(matches!(
        Circuit::new(cfg().failure_rate_threshold(0.0)),
        Err(ConfigError::Percent { .. })
    ));
    assert!(matches!(
        Circuit::new(cfg().window(Window::Count(0))),
        Err(ConfigError::Zero("window"))
    ));
    assert!(matches!(
        Circuit::new(cfg().no_failure_rate()),
        Err(ConfigError::NoTripCondition)
    ));
    assert!(matches!(
        Circuit::new(cfg().half_open_permits(1_000_000)),
        Err(ConfigError::TooLarge { .. })
    ));
    assert!(matches!(
        Circuit::new(cfg().wait_strategy(WaitStrategy::Exponential {
            initial: Duration::from_secs(1),
            multiplier: 0.5,
            max: Duration::from_secs(2),
            jitter: 0.0
        })),
        Err(ConfigError::Multiplier(_))
    ));
}

// ---- real sockets ----------------------------------------------------------------------

mod real {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tower_patterns::proxy::ForwardBuilder;

    /// A flaky backend on 127.0.0.1:0: 503 while `down` is set.
    async fn flaky_backend(
        down: Arc<AtomicBool>,
        hits: Arc<AtomicU32>,
    ) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || {
                let down = down.clone();
                let hits = hits.clone();
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    if down.load(Ordering::SeqCst) {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "down")
                    } else {
                        (axum::http::StatusCode::OK, "b")
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        (addr, tx)
    }

    type Body = Full<Bytes>;
    type FallbackBody = http_body_util::Either<tower_patterns::proxy::ForwardBody, Full<Bytes>>;

    fn client(
        addr: std::net::SocketAddr,
        cfg: CircuitBreakerConfig,
    ) -> (
        impl Service<Request<Body>, Response = Response<FallbackBody>, Error = BoxError> + Clone,
        Circuit,
    ) {
        let forward = ForwardBuilder::new(format!("http://{addr}"))
            .connect_timeout(Duration::from_secs(2))
            .build::<Body>()
            .unwrap();
        let layer = CircuitBreakerLayer::new(cfg).unwrap().fallback_fn(
            |_r: Request<Body>, why: CircuitOpen| async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(200)
                        .header("x-fallback", why.state.as_str())
                        // The fallback's own body type: no `ForwardBody` to build, no boxing.
                        .body(Full::new(Bytes::from("fallback")))
                        .unwrap(),
                )
            },
        );
        let b = layer.breaker().clone();
        let svc = ServiceBuilder::new().layer(layer).service(forward);
        (svc, b)
    }

    async fn get<S>(svc: &S) -> (u16, String, bool)
    where
        S: Service<Request<Body>, Response = Response<FallbackBody>, Error = BoxError> + Clone,
    {
        let req = Request::get("/").body(Body::default()).unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        let status = res.status().as_u16();
        let fallback = res.headers().contains_key("x-fallback");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            String::from_utf8_lossy(&body).into_owned(),
            fallback,
        )
    }

    #[tokio::test]
    async fn flaky_backend_trips_falls_back_and_recovers() {
        let down = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU32::new(0));
        let (addr, _stop) = flaky_backend(down.clone(), hits.clone()).await;
        let (svc, b) = client(
            addr,
            CircuitBreakerConfig::new()
                .window(Window::Count(10))
                .minimum_calls(4)
                // Long enough that the fallback calls below all land in the open state.
                .wait_in_open(Duration::from_secs(1))
                .automatic_half_open(true)
                .half_open_permits(2),
        );
        let mut rx = b.subscribe();
        for _ in 0..4 {
            assert_eq!(get(&svc).await, (200, "b".into(), false));
        }
        down.store(true, Ordering::SeqCst);
        let mut statuses = Vec::new();
        while b.state() == State::Closed {
            statuses.push(get(&svc).await.0);
        }
        // 4 successes in the window: it takes 4 failures to reach 50%.
        assert_eq!(statuses, [503, 503, 503, 503]);
        assert_eq!(b.state(), State::Open);
        let before = hits.load(Ordering::SeqCst);
        for _ in 0..10 {
            assert_eq!(get(&svc).await, (200, "fallback".into(), true));
        }
        assert_eq!(hits.load(Ordering::SeqCst), before, "B is isolated");

        down.store(false, Ordering::SeqCst);
        rx.borrow_and_update();
        tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|s| *s == State::HalfOpen),
        )
        .await
        .expect("automatic half-open")
        .unwrap();
        assert_eq!(get(&svc).await, (200, "b".into(), false));
        assert_eq!(get(&svc).await, (200, "b".into(), false));
        assert_eq!(b.state(), State::Closed);
        assert_eq!(hits.load(Ordering::SeqCst), before + 2);
    }

    #[tokio::test]
    async fn refused_connections_are_failures_and_gate_skips_the_endpoint() {
        let down = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU32::new(0));
        let (addr, stop) = flaky_backend(down, hits).await;
        let (svc, b) = client(
            addr,
            CircuitBreakerConfig::new()
                .no_failure_rate()
                .consecutive_failures(3)
                .wait_in_open(Duration::from_secs(60)),
        );
        assert_eq!(get(&svc).await.0, 200);
        // Kill B: the listener closes, connections are refused (a transport failure).
        stop.send(()).unwrap();
        let mut errors = 0;
        while b.state() == State::Closed && errors < 50 {
            let req = Request::get("/").body(Body::default()).unwrap();
            match svc.clone().oneshot(req).await {
                Err(e) => {
                    errors += 1;
                    assert_eq!(
                        tower_patterns::classify::error_kind(&*e),
                        FailureKind::Transport,
                        "{e}"
                    );
                }
                Ok(res) => assert_eq!(res.status(), 200),
            }
        }
        assert_eq!(b.state(), State::Open);
        assert!(errors >= 3);
        // A balancer holding this breaker as a gate does not pick the endpoint now; a
        // skipped endpoint is not a refused call.
        let refused = b.metrics().not_permitted_calls;
        assert!(Gate::try_acquire(&b).is_none());
        assert_eq!(b.metrics().not_permitted_calls, refused);
        let (status, _, fallback) = get(&svc).await;
        assert_eq!((status, fallback), (200, true));
    }
}

#[test]
fn tracing_events_for_transitions_rejections_and_exceeded_rates() {
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let out = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || out.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let b = Circuit::new(cfg().name("orders")).unwrap();
        run(&b, &[F; 5]);
        assert!(b.try_acquire().is_err());
        b.force_open();
        b.force_open(); // same state: no second event
    });
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let find = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(find("failure rate exceeded threshold"), 1, "{text}");
    assert_eq!(find("call not permitted"), 1, "{text}");
    assert_eq!(find("circuit breaker state transition"), 2, "{text}");
    assert_eq!(find("from=closed to=open"), 1, "{text}");
    assert_eq!(find("from=open to=forced-open"), 1, "{text}");
    assert!(lines
        .iter()
        .all(|l| !l.contains("circuit breaker") || l.contains("breaker=orders")));
}

#[tokio::test(start_paused = true)]
async fn back_pressure_wakes_when_an_operator_closes_a_forced_open_circuit() {
    let layer = CircuitBreakerLayer::new(cfg())
        .unwrap()
        .mode(Mode::BackPressure);
    let b = layer.breaker().clone();
    let mut svc = ServiceBuilder::new().layer(layer).service_fn(upstream);
    b.force_open();
    let waiting = tokio::spawn(async move {
        svc.ready().await.unwrap();
        svc.call(req(200)).await.unwrap().status()
    });
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(
        !waiting.is_finished(),
        "forced open: still waiting after an hour"
    );
    b.force_closed();
    assert_eq!(waiting.await.unwrap(), 200);
}
