//! Link-table configuration (host names, links, default host), `Host` routing of the built
//! table, and the chain's hop-count header.

use std::collections::HashMap;
use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use tower::ServiceExt;
use tower_patterns::body::ReplayBody;
use tower_patterns::chain::{ChainLayer, LinkConfigError, LinkTable};
use tower_patterns::classify::Condition;

use super::support::{config, header_value_bytes};

type Req = Request<ReplayBody<Full<Bytes>>>;

/// A host name as an operator may write it: one of a few names, in any case, with a
/// trailing dot or surrounding blanks; or something that is not a host name.
fn raw_name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (prop::sample::select(vec!["a.com", "b.com", "c.org", "d", "e-1.net", "f_g"]),
              any::<bool>(),
              prop::sample::select(vec!["", ".", "..", " ", "\t"]),
              prop::sample::select(vec!["", " "]))
            .prop_map(|(n, up, tail, head)| {
                let n = if up { n.to_ascii_uppercase() } else { n.to_string() };
                format!("{head}{n}{tail}")
            }),
        1 => prop::sample::select(vec![
            "", ".", " ", "a.com:80", "a com", "a/b", "[::1]", "é.com", "a.com\0", "*", "a@b",
        ]).prop_map(String::from),
        1 => "\\PC{0,10}",
        1 => "[a-z]{254,260}",
    ]
}

/// The meaning of a raw name, written from the documented rules: whitespace around and
/// trailing dots are ignored, case is not significant, the rest must be 1-253 of
/// `[a-z0-9._-]`.
fn meaning(raw: &str) -> Option<String> {
    let n = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    let ok = !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    ok.then_some(n)
}

#[derive(Debug, Clone)]
struct TableSpec {
    hosts: Vec<String>,
    links: Vec<(String, String, String)>,
    default: Option<String>,
}

fn spec() -> impl Strategy<Value = TableSpec> {
    (
        prop::collection::vec(raw_name(), 0..6),
        prop::collection::vec(
            (
                raw_name(),
                prop::sample::select(vec!["404", "5xx,fail", "4xx,!404", "timeout"]),
                raw_name(),
            ),
            0..6,
        ),
        prop::option::of(raw_name()),
    )
        .prop_map(|(hosts, links, default)| TableSpec {
            hosts,
            links: links
                .into_iter()
                .map(|(f, c, t)| (f, c.to_string(), t))
                .collect(),
            default,
        })
}

/// What the configuration should give, decided independently of the builder: `Ok` with
/// each host's route, or `Err` with the reasons that make it invalid.
fn model(s: &TableSpec) -> Result<HashMap<String, Vec<String>>, &'static str> {
    let mut names = Vec::new();
    for h in &s.hosts {
        let n = meaning(h).ok_or("invalid host")?;
        if names.contains(&n) {
            return Err("duplicate host");
        }
        names.push(n);
    }
    let mut next: HashMap<String, String> = HashMap::new();
    for (f, _, t) in &s.links {
        let f = meaning(f)
            .filter(|f| names.contains(f))
            .ok_or("bad link source")?;
        let t = meaning(t)
            .filter(|t| names.contains(t))
            .ok_or("bad link target")?;
        if f == t || next.insert(f, t).is_some() {
            return Err("self or duplicate link");
        }
    }
    let mut routes = HashMap::new();
    for n in &names {
        let mut route = vec![n.clone()];
        while let Some(t) = next.get(route.last().expect("non-empty")) {
            if route.contains(t) {
                return Err("cycle");
            }
            route.push(t.clone());
        }
        routes.insert(n.clone(), route);
    }
    if let Some(d) = &s.default {
        meaning(d)
            .filter(|d| names.contains(d))
            .ok_or("missing default")?;
    }
    Ok(routes)
}

type Vhost = tower::util::BoxCloneSyncService<Req, Response<Full<Bytes>>, Infallible>;

fn vhost(name: String) -> Vhost {
    Vhost::new(tower::service_fn(move |_req: Req| {
        let name = name.clone();
        async move {
            // 404 so that every link is followed to its end.
            let mut res = Response::new(Full::new(Bytes::from(name)));
            *res.status_mut() = StatusCode::NOT_FOUND;
            Ok::<_, Infallible>(res)
        }
    }))
}

fn build(s: &TableSpec) -> Result<LinkTable<Full<Bytes>>, LinkConfigError> {
    let mut b = LinkTable::builder();
    for h in &s.hosts {
        b = b.vhost(h.clone(), vhost(meaning(h).unwrap_or_default()));
    }
    for (f, c, t) in &s.links {
        b = b.link(
            f.clone(),
            c.parse::<Condition>().expect("valid condition"),
            t.clone(),
        );
    }
    if let Some(d) = &s.default {
        b = b.default_vhost(d.clone());
    }
    b.build()
}

proptest! {
    #![proptest_config(config(1024))]

    /// Any configuration: built exactly when it is valid, and then every host routes along
    /// its links (for any spelling of its name in `Host`); refused with a typed error
    /// naming a real problem otherwise. Never a panic.
    #[test]
    fn tables_build_exactly_when_valid(s in spec(), port in prop::option::of(any::<u16>())) {
        let built = build(&s);
        match (model(&s), built) {
            (Ok(routes), Ok(table)) => {
                let hosts: Vec<&str> = table.hosts().collect();
                let want: Vec<String> = s.hosts.iter().filter_map(|h| meaning(h)).collect();
                prop_assert_eq!(hosts, want.iter().map(String::as_str).collect::<Vec<_>>());
                for (name, route) in &routes {
                    let want: Vec<&str> = route.iter().map(String::as_str).collect();
                    let upper = name.to_ascii_uppercase();
                    let with_port = format!("{name}:{}", port.unwrap_or(80));
                    let dotted = format!("{name}.");
                    for spelling in [name.as_str(), upper.as_str(), with_port.as_str(), dotted.as_str()] {
                        prop_assert_eq!(table.route(spelling), Some(want.clone()), "{:?}", spelling);
                    }
                }
                prop_assert_eq!(table.route("unknown.invalid"), None);
            }
            (Err(why), Err(e)) => {
                prop_assert!(!e.to_string().is_empty());
                if let LinkConfigError::RecursiveLink { cycle } = &e {
                    prop_assert_eq!(why, "cycle");
                    // The reported cycle is real: closed, and each step is a declared link.
                    prop_assert!(cycle.len() >= 3 && cycle.first() == cycle.last(), "{:?}", cycle);
                    for w in cycle.windows(2) {
                        prop_assert!(s.links.iter().any(|(f, _, t)| {
                            meaning(f).as_deref() == Some(w[0].as_str()) && meaning(t).as_deref() == Some(w[1].as_str())
                        }), "{:?} -> {:?} is not a link", w[0], w[1]);
                    }
                }
            }
            (Ok(_), Err(e)) => prop_assert!(false, "valid table refused: {e}"),
            (Err(why), Ok(t)) => prop_assert!(false, "invalid table ({why}) built: {t:?}"),
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Any `Host` bytes (one line, two lines, none) and any request-target authority
    /// against a built table: the authority of an absolute-form target wins over `Host`
    /// (RFC 9112 §3.2.2, as nginx); several `Host` lines or an unreadable one are `400`;
    /// a named host answers (through its links); an unknown host gets `421` (or the
    /// default host); no host at all `400` (or the default). Never a panic.
    #[test]
    fn any_host_header_is_routed_or_refused(
        host in prop::option::of(prop_oneof![
            header_value_bytes(40),
            (prop::sample::select(vec!["a.com", "B.COM", "a.com.", "a.com:8080", " b.com ", "[::1]:80", "a.com:x", ":80", "a.com:", "c.org"]))
                .prop_map(|s| s.as_bytes().to_vec()),
        ]),
        second_host in prop::option::of(prop::sample::select(vec!["a.com", "b.com", "c.org"])),
        authority in prop::option::of(prop::sample::select(vec!["a.com", "B.com:8080", "c.org", "a.com.", "[::1]:80", "user@b.com"])),
        with_default in any::<bool>(),
    ) {
        let mut b = LinkTable::builder()
            .vhost("a.com", vhost("a.com".into()))
            .vhost("b.com", vhost("b.com".into()))
            .link("a.com", "404".parse().expect("valid"), "b.com");
        if with_default {
            b = b.default_vhost("b.com");
        }
        let table = b.build().expect("valid table");
        let uri = match authority {
            Some(a) => format!("http://{a}/x"),
            None => "/x".to_string(),
        };
        let mut req = Request::get(uri).body(Full::default()).expect("request");
        let mut values: Vec<http::HeaderValue> = Vec::new();
        values.extend(host.as_deref().and_then(|h| http::HeaderValue::from_bytes(h).ok()));
        values.extend(second_host.map(http::HeaderValue::from_static));
        for v in &values {
            req.headers_mut().append("host", v.clone());
        }
        let lines = values.len();
        let readable = values.first().and_then(|v| v.to_str().ok()).map(str::to_owned);
        let (status, body) = answer(table, req);

        let served = |status: StatusCode, body: &str| status == StatusCode::NOT_FOUND && body == "b.com";
        let (named, refused) = match authority {
            Some(a) => (host_meaning(a.rsplit('@').next().unwrap_or(a)), None),
            None if lines > 1 => (None, Some(StatusCode::BAD_REQUEST)),
            None if lines == 1 => match readable.as_deref() {
                None => (None, Some(StatusCode::BAD_REQUEST)),
                Some(h) => (host_meaning(h), None),
            },
            None => (None, None),
        };
        match (named, refused) {
            (_, Some(code)) => prop_assert_eq!(status, code),
            // a.com links to b.com on 404, so both end at b.com's answer.
            (Some(_), None) => prop_assert!(served(status, &body), "{} {:?}", status, body),
            (None, None) if with_default => prop_assert!(served(status, &body), "{} {:?}", status, body),
            (None, None) => {
                let want = if authority.is_some() || lines == 1 {
                    StatusCode::MISDIRECTED_REQUEST
                } else {
                    StatusCode::BAD_REQUEST
                };
                prop_assert_eq!(status, want);
            }
        }
    }

    /// Any hop-count header values (the loop guard, set by other proxies of the chain): a
    /// number above the limit is refused with `508`, anything else is forwarded.
    #[test]
    fn any_hop_header_is_counted_or_ignored(
        values in prop::collection::vec(prop_oneof![
            header_value_bytes(24),
            (0u64..20).prop_map(|n| n.to_string().into_bytes()),
            Just(b"99999999999999999999999".to_vec()),
            Just(u32::MAX.to_string().into_bytes()),
            (0u64..20).prop_map(|n| format!(" {n}\t").into_bytes()),
        ], 0..3),
    ) {
        let table = LinkTable::builder()
            .vhost("a.com", vhost("a.com".into()))
            .chain(ChainLayer::new().max_hops(8))
            .build()
            .expect("valid table");
        let mut req = Request::get("/x").header("host", "a.com").body(Full::default()).expect("request");
        let mut arrived: Option<u128> = None;
        for v in &values {
            let Ok(hv) = http::HeaderValue::from_bytes(v) else { continue };
            req.headers_mut().append("x-chain-hops", hv);
            let t = v.trim_ascii();
            if !t.is_empty() && t.iter().all(u8::is_ascii_digit) {
                // Saturating: a number too long for any integer is simply "very many".
                let n = std::str::from_utf8(t).expect("digits").parse::<u128>().unwrap_or(u128::MAX);
                arrived = Some(arrived.map_or(n, |a| a.max(n)));
            }
        }
        let (status, _) = answer(table, req);
        if arrived.is_some_and(|n| n > 8) {
            prop_assert_eq!(status, StatusCode::LOOP_DETECTED);
        } else {
            prop_assert_eq!(status, StatusCode::NOT_FOUND);
        }
    }
}

/// The configured host a readable `Host` value names, by the documented rules (port and
/// one trailing dot ignored, case-insensitive, surrounding blanks ignored).
fn host_meaning(raw: &str) -> Option<String> {
    let raw = raw.trim_matches([' ', '\t']);
    let host = match raw.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        Some(_) => return None,
        None => raw,
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    ["a.com", "b.com"].contains(&host.as_str()).then_some(host)
}

fn answer(table: LinkTable<Full<Bytes>>, req: Request<Full<Bytes>>) -> (StatusCode, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let res = table.oneshot(req).await.expect("the table answers");
        let status = res.status();
        let body = res.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    })
}
