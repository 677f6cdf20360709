//! `classify::Condition` text ("404,5xx,fail,!503"), as written in configuration.

use proptest::prelude::*;
use tower_patterns::classify::{Condition, FailureKind, Outcome};

use super::support::{config, junk_bytes};

/// One token of the text form, with what it means for the model below.
#[derive(Debug, Clone)]
enum Token {
    Status(u16),
    Class(u8),
    Ignore(u16),
    Transport,
    Timeout,
    Error,
    Fail,
}

impl Token {
    fn text(&self, upper: bool) -> String {
        let t = match self {
            Token::Status(c) => c.to_string(),
            Token::Class(c) => format!("{c}xx"),
            Token::Ignore(c) => format!("!{c}"),
            Token::Transport => "transport".into(),
            Token::Timeout => "timeout".into(),
            Token::Error => "error".into(),
            Token::Fail => "fail".into(),
        };
        if upper {
            t.to_ascii_uppercase()
        } else {
            t
        }
    }
}

fn token() -> impl Strategy<Value = Token> {
    prop_oneof![
        (100u16..1000).prop_map(Token::Status),
        (1u8..=9).prop_map(Token::Class),
        (100u16..1000).prop_map(Token::Ignore),
        Just(Token::Transport),
        Just(Token::Timeout),
        Just(Token::Error),
        Just(Token::Fail),
    ]
}

/// What a list of tokens means, computed independently of the parser.
#[derive(Default)]
struct Model {
    fail: Vec<bool>,
    ignore: Vec<bool>,
    transport: bool,
    timeout: bool,
    other: bool,
}

impl Model {
    fn of(tokens: &[Token]) -> Self {
        let mut m = Model {
            fail: vec![false; 1000],
            ignore: vec![false; 1000],
            ..Model::default()
        };
        for t in tokens {
            match *t {
                Token::Status(c) => m.fail[c as usize] = true,
                Token::Class(k) => {
                    let k = k as usize;
                    m.fail[k * 100..k * 100 + 100].fill(true);
                }
                Token::Ignore(c) => m.ignore[c as usize] = true,
                Token::Transport => m.transport = true,
                Token::Timeout => m.timeout = true,
                Token::Error => m.other = true,
                Token::Fail => (m.transport, m.timeout, m.other) = (true, true, true),
            }
        }
        m
    }

    fn status(&self, code: u16) -> Outcome {
        let status = http::StatusCode::from_u16(code).expect("100..=999");
        if self.ignore[code as usize] {
            Outcome::Ignored
        } else if self.fail[code as usize] {
            Outcome::Failure(FailureKind::Status(status))
        } else {
            Outcome::Success
        }
    }
}

/// Separators as people type them: spaces, tabs, empty items.
fn separator() -> impl Strategy<Value = String> {
    prop::sample::select(vec![",", ", ", " ,", ",,", " , ", "\t,", ",\t"]).prop_map(String::from)
}

fn outcomes(c: &Condition) -> Vec<Outcome> {
    (100u16..1000)
        .map(|code| c.classify_status(http::StatusCode::from_u16(code).expect("100..=999")))
        .collect()
}

fn check_errors(c: &Condition, m: &Model) -> Result<(), TestCaseError> {
    let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    let timed_out = std::io::Error::from(std::io::ErrorKind::TimedOut);
    let other = std::io::Error::other("boom");
    for (err, counted, kind) in [
        (&refused, m.transport, FailureKind::Transport),
        (&timed_out, m.timeout, FailureKind::Timeout),
        (&other, m.other, FailureKind::Other),
    ] {
        let want = if counted {
            Outcome::Failure(kind)
        } else {
            Outcome::Success
        };
        prop_assert_eq!(c.classify_error_ref(err), want, "{:?}", kind);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    /// Arbitrary text (any Unicode, any bytes made UTF-8) is parsed or refused with a
    /// typed error naming a token of the input; never a panic.
    #[test]
    fn arbitrary_text_never_panics(raw in junk_bytes(96), s in "\\PC{0,64}") {
        for text in [String::from_utf8_lossy(&raw).into_owned(), s] {
            match text.parse::<Condition>() {
                Ok(c) => {
                    // Whatever parsed prints to text that parses back to it.
                    let back: Condition = c.to_string().parse().map_err(|e| {
                        TestCaseError::fail(format!("{c} did not re-parse: {e}"))
                    })?;
                    prop_assert_eq!(back, c);
                }
                Err(e) => {
                    prop_assert!(text.contains(e.token.trim()) || e.token == text);
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }
    }

    /// A list of valid tokens in any case with any separators parses, and classifies every
    /// status 100-999 and every error kind exactly as the tokens say.
    #[test]
    fn valid_tokens_mean_what_they_say(
        tokens in prop::collection::vec((token(), any::<bool>()), 1..12),
        seps in prop::collection::vec(separator(), 12),
    ) {
        let mut text = String::new();
        for (i, (t, upper)) in tokens.iter().enumerate() {
            if i > 0 {
                text.push_str(&seps[i]);
            }
            text.push_str(&t.text(*upper));
        }
        let c: Condition = text.parse().map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
        let plain: Vec<Token> = tokens.into_iter().map(|(t, _)| t).collect();
        let m = Model::of(&plain);
        let want: Vec<Outcome> = (100u16..1000).map(|code| m.status(code)).collect();
        prop_assert_eq!(outcomes(&c), want, "{}", text);
        check_errors(&c, &m)?;

        // parse(format(x)) == x, and the canonical text is a fixed point.
        let printed = c.to_string();
        let back: Condition = printed.parse().map_err(|e| TestCaseError::fail(format!("{printed:?}: {e}")))?;
        prop_assert_eq!(&back, &c);
        prop_assert_eq!(back.to_string(), printed);
    }

    /// One bad token anywhere refuses the whole text and is the token reported.
    #[test]
    fn one_bad_token_refuses_the_list(
        tokens in prop::collection::vec(token(), 0..6),
        bad in prop_oneof![
            (0u16..100).prop_map(|c| c.to_string()),
            (1000u32..100_000).prop_map(|c| c.to_string()),
            Just("0xx".to_string()),
            Just("!5xx".to_string()),
            Just("18446744073709551616".to_string()),
            "[a-z]{1,8}".prop_filter("not a keyword", |s| {
                !["fail", "transport", "timeout", "error"].contains(&s.as_str())
            }),
            "\\PC{1,4}".prop_filter("not blank or a separator", |s| {
                !s.trim().is_empty() && !s.contains(',') && s.trim().parse::<Condition>().is_err()
            }),
        ],
        at in any::<prop::sample::Index>(),
    ) {
        let mut parts: Vec<String> = tokens.iter().map(|t| t.text(false)).collect();
        let pos = at.index(parts.len() + 1);
        parts.insert(pos, bad.clone());
        let text = parts.join(",");
        let err = text.parse::<Condition>().expect_err("a bad token is refused");
        prop_assert_eq!(err.token, bad.trim());
    }

    /// Conditions built through the API print to text that parses back to them.
    #[test]
    fn built_conditions_round_trip(
        statuses in prop::collection::vec(100u16..1000, 0..8),
        classes in prop::collection::vec(0u8..=12, 0..3),
        ignored in prop::collection::vec(100u16..1000, 0..4),
        errors in (any::<bool>(), any::<bool>(), any::<bool>()),
    ) {
        let mut c = Condition::never();
        for s in statuses {
            c = c.status(http::StatusCode::from_u16(s).expect("100..=999"));
        }
        for k in classes {
            c = c.status_class(k);
        }
        for s in ignored {
            c = c.ignore_status(http::StatusCode::from_u16(s).expect("100..=999"));
        }
        if errors.0 { c = c.transport_errors(); }
        if errors.1 { c = c.timeouts(); }
        if errors.2 { c = c.or("error".parse().expect("keyword")); }
        let printed = c.to_string();
        if printed.is_empty() {
            // Only `Condition::never()` prints as nothing; "" is refused as a config value.
            prop_assert!(c.is_never() && c == Condition::never());
        } else {
            let back: Condition = printed.parse().map_err(|e| TestCaseError::fail(format!("{printed:?}: {e}")))?;
            prop_assert_eq!(back, c);
        }
    }
}
