//! Authentication at the gateway over real sockets: a client → the gateway (`AuthLayer`
//! over `Forward`) → an echo upstream that shows what it received. Keys are generated at
//! test time (HS256 secret, ES256 with ring, RS256 with the `openssl` CLI); a JWKS server in
//! the test rotates its keys and then goes down.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{encode, EncodingKey, Header};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use support::{echo_backend, echoed_headers, header, send};
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_patterns::auth::{
    Algorithm, ApiKeys, AuthConfig, AuthError, AuthLayer, Authenticator, DecodingKey, Identity,
    Jwks, JwksConfig, JwksError, Jwt, JwtKey, MAX_REFRESH,
};
use tower_patterns::proxy::ForwardBuilder;

const HS_SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";
const ISS: &str = "https://idp.test";
const AUD: &str = "orders";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str, scope: &str) -> Value {
    json!({ "sub": sub, "scope": scope, "iss": ISS, "aud": AUD, "exp": now() + 300 })
}

/// An ES256 key pair: the signing key, the raw public point, the public key as PEM.
struct Ec {
    enc: EncodingKey,
    point: Vec<u8>,
}

impl Ec {
    fn new() -> Ec {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Ec {
            enc: EncodingKey::from_ec_der(pkcs8.as_ref()),
            point: pair.public_key().as_ref().to_vec(),
        }
    }
    fn pem(&self) -> String {
        // SubjectPublicKeyInfo of a P-256 key: fixed prefix + the uncompressed point.
        let mut der = hex("3059301306072a8648ce3d020106082a8648ce3d030107034200");
        der.extend_from_slice(&self.point);
        format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(der)
        )
    }
    fn jwk(&self, kid: &str) -> Value {
        json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&self.point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&self.point[33..65]),
        })
    }
    fn token(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = kid.map(Into::into);
        encode(&h, claims, &self.enc).unwrap()
    }
}

/// An RS256 key pair made by the `openssl` CLI.
struct Rsa {
    enc: EncodingKey,
    public_pem: Vec<u8>,
    modulus: Vec<u8>,
}

impl Rsa {
    fn new() -> Rsa {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .expect("the RS256 tests need the openssl CLI (apt-get install openssl)");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
            out.stdout
        };
        let key_s = key.to_str().unwrap();
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            key_s,
        ]);
        let public_pem = run(&["pkey", "-in", key_s, "-pubout"]);
        let modulus = String::from_utf8(run(&["rsa", "-in", key_s, "-noout", "-modulus"])).unwrap();
        let modulus = hex(modulus.trim().strip_prefix("Modulus=").unwrap());
        // PKCS#1 DER, what ring signs with (jsonwebtoken's PEM reader is not compiled in).
        let private_der = run(&["rsa", "-in", key_s, "-outform", "DER", "-traditional"]);
        Rsa {
            enc: EncodingKey::from_rsa_der(&private_der),
            public_pem,
            modulus,
        }
    }
    fn jwk(&self, kid: &str) -> Value {
        // No "alg": the key type implies RS256.
        json!({ "kty": "RSA", "kid": kid, "n": URL_SAFE_NO_PAD.encode(&self.modulus), "e": "AQAB" })
    }
    fn token(&self, kid: Option<&str>, claims: &Value) -> String {
        let mut h = Header::new(jsonwebtoken::Algorithm::RS256);
        h.kid = kid.map(Into::into);
        encode(&h, claims, &self.enc).unwrap()
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hs_token(claims: &Value) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(HS_SECRET),
    )
    .unwrap()
}

/// The gateway: `layer` over a `Forward` to a new echo upstream.
async fn gateway(layer: AuthLayer) -> SocketAddr {
    let echo = echo_backend().await;
    let forward = ForwardBuilder::new(echo.url()).build::<Incoming>().unwrap();
    let svc = ServiceBuilder::new()
        .layer(layer.respond())
        .service(forward);
    tower_patterns::server::spawn_local(svc)
        .await
        .unwrap()
        .addr()
}

async fn get(gw: SocketAddr, headers: &[(&str, &str)]) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut req = Request::get("/orders/1").header("host", "gw.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(gw, req.body(Full::new(Bytes::new())).unwrap()).await
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

fn assert_invalid(case: &str, (status, headers, body): (StatusCode, http::HeaderMap, Bytes)) {
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{case}");
    let challenge = headers.get("www-authenticate").map(|v| v.to_str().unwrap());
    assert_eq!(
        challenge,
        Some("Bearer realm=\"api\", error=\"invalid_token\""),
        "{case}"
    );
    // No detail: the same short page whatever the reason.
    assert_eq!(&body[..], b"Unauthorized\n", "{case}");
    assert_eq!(headers.get("cache-control").unwrap(), "no-store", "{case}");
}

#[tokio::test]
async fn hs_rs_es_tokens_and_api_keys_pass_and_the_identity_goes_upstream_unspoofed() {
    let ec = Ec::new();
    let rsa = Rsa::new();
    let auth = AuthConfig::new()
        .api_keys(
            ApiKeys::new()
                .key("batch-job", "k-secret-1", ["orders:read"])
                .unwrap(),
        )
        .jwt(
            Jwt::new()
                .key(JwtKey::hs256(HS_SECRET))
                .key(JwtKey::rs256_pem(&rsa.public_pem).unwrap())
                .key(JwtKey::es256_pem(ec.pem().as_bytes()).unwrap())
                .issuer(ISS)
                .audience(AUD),
        )
        .forward_claim("tenant", "x-auth-tenant")
        .build()
        .unwrap();
    let gw = gateway(auth.layer()).await;
    let mut c = claims("alice", "orders:read orders:write");
    c["tenant"] = json!("acme");
    let spoof: [(&str, &str); 4] = [
        ("x-auth-subject", "admin"),
        ("X-Auth-Scopes", "everything"),
        ("x-auth-method", "api-key"),
        ("x-auth-tenant", "other"),
    ];
    for (alg, token) in [
        ("HS256", hs_token(&c)),
        ("RS256", rsa.token(None, &c)),
        ("ES256", ec.token(None, &c)),
    ] {
        let mut h = vec![("authorization", bearer(&token))];
        h.extend(spoof.iter().map(|(k, v)| (*k, v.to_string())));
        // Twice the same spoofed header, too.
        h.push(("x-auth-subject", "root".into()));
        let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, _, body) = get(gw, &hs).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "{alg}: {}",
            String::from_utf8_lossy(&body)
        );
        let seen = echoed_headers(&body);
        let all = |n: &str| {
            seen.iter()
                .filter(|(k, _)| k == n)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("x-auth-subject"), ["alice"], "{alg}");
        assert_eq!(all("x-auth-scopes"), ["orders:read orders:write"], "{alg}");
        assert_eq!(all("x-auth-method"), ["jwt"], "{alg}");
        assert_eq!(all("x-auth-tenant"), ["acme"], "{alg}");
        // Not hidden by default.
        assert!(header(&seen, "authorization").is_some());
    }
    // The API key: its name is the subject; spoofed headers are gone as well.
    let (status, _, body) = get(gw, &[("x-api-key", "k-secret-1"), spoof[0], spoof[3]]).await;
    assert_eq!(status, StatusCode::OK);
    let seen = echoed_headers(&body);
    assert_eq!(header(&seen, "x-auth-subject"), Some("batch-job"));
    assert_eq!(header(&seen, "x-auth-scopes"), Some("orders:read"));
    assert_eq!(header(&seen, "x-auth-method"), Some("api-key"));
    assert_eq!(header(&seen, "x-auth-tenant"), None);
}

#[tokio::test]
async fn every_bad_credential_is_401_invalid_token_without_detail() {
    let ec = Ec::new();
    let rsa = Rsa::new();
    let auth = AuthConfig::new()
        .api_keys(
            ApiKeys::new()
                .key("batch-job", "k-secret-1", ["orders:read"])
                .unwrap(),
        )
        .jwt(
            Jwt::new()
                .key(JwtKey::hs256(HS_SECRET).with_kid("hs"))
                .key(JwtKey::rs256_pem(&rsa.public_pem).unwrap().with_kid("rs"))
                .key(
                    JwtKey::es256_pem(ec.pem().as_bytes())
                        .unwrap()
                        .with_kid("es"),
                )
                .issuer(ISS)
                .audience(AUD)
                .leeway(Duration::from_secs(5)),
        )
        .build()
        .unwrap();
    let gw = gateway(auth.layer()).await;
    let good = claims("alice", "orders:read");
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());

    // `alg: none`, unsigned.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&good)
    );
    // Algorithm confusion: HS256 "signed" with the RSA public key as the HMAC secret, kid of
    // the RSA key. The key's algorithm (RS256) decides, not the token's.
    let mut h = Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("rs".into());
    let confused = encode(&h, &good, &EncodingKey::from_secret(&rsa.public_pem)).unwrap();
    // An ES256 token carrying the RSA key's kid.
    let wrong_kid_alg = ec.token(Some("rs"), &good);
    let unknown_kid = ec.token(Some("nope"), &good);
    let other_key = Ec::new().token(Some("es"), &good);
    let mut expired = good.clone();
    expired["exp"] = json!(now() - 60);
    let mut not_yet = good.clone();
    not_yet["nbf"] = json!(now() + 600);
    let mut wrong_iss = good.clone();
    wrong_iss["iss"] = json!("https://evil.test");
    let mut wrong_aud = good.clone();
    wrong_aud["aud"] = json!("billing");
    let mut no_aud = good.clone();
    no_aud.as_object_mut().unwrap().remove("aud");
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut no_sub = good.clone();
    no_sub.as_object_mut().unwrap().remove("sub");
    let mut huge_exp = good.clone();
    huge_exp["exp"] = json!(u64::MAX);
    huge_exp["nbf"] = json!(u64::MAX);
    // Change the signature's last character to another canonical one: always a change
    // (the last character was 'A' in about 1 run in 16, which made this token valid).
    let mut tampered = hs_token(&good);
    let last = tampered.pop();
    tampered.push(if last == Some('A') { 'E' } else { 'A' });
    let oversized = format!("{}.{}.sig", b64(&json!({"alg": "HS256"})), "A".repeat(9000));
    let mut unforwardable = good.clone();
    unforwardable["sub"] = json!("alice\nx-auth-subject: admin");

    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("alg none", vec![("authorization", bearer(&none))]),
        (
            "HS256 with the RSA public key",
            vec![("authorization", bearer(&confused))],
        ),
        (
            "ES256 token with an RS256 kid",
            vec![("authorization", bearer(&wrong_kid_alg))],
        ),
        ("unknown kid", vec![("authorization", bearer(&unknown_kid))]),
        (
            "signed by another key",
            vec![("authorization", bearer(&other_key))],
        ),
        (
            "expired",
            vec![("authorization", bearer(&hs_token(&expired)))],
        ),
        (
            "nbf in the future",
            vec![("authorization", bearer(&hs_token(&not_yet)))],
        ),
        (
            "wrong iss",
            vec![("authorization", bearer(&hs_token(&wrong_iss)))],
        ),
        (
            "wrong aud",
            vec![("authorization", bearer(&hs_token(&wrong_aud)))],
        ),
        (
            "no aud",
            vec![("authorization", bearer(&hs_token(&no_aud)))],
        ),
        (
            "no exp",
            vec![("authorization", bearer(&hs_token(&no_exp)))],
        ),
        (
            "no sub",
            vec![("authorization", bearer(&hs_token(&no_sub)))],
        ),
        (
            "exp/nbf at u64::MAX",
            vec![("authorization", bearer(&rsa.token(Some("rs"), &huge_exp)))],
        ),
        (
            "tampered signature",
            vec![("authorization", bearer(&tampered))],
        ),
        ("malformed", vec![("authorization", bearer("abc.def"))]),
        ("not base64", vec![("authorization", bearer("a*b.c.d"))]),
        ("empty bearer", vec![("authorization", "Bearer ".into())]),
        (
            "oversized header",
            vec![("authorization", bearer(&oversized))],
        ),
        (
            "basic scheme",
            vec![("authorization", "Basic YWxpY2U6cHc=".into())],
        ),
        (
            "two authorization headers",
            vec![
                ("authorization", bearer(&hs_token(&good))),
                ("authorization", bearer(&hs_token(&good))),
            ],
        ),
        (
            "api key and bearer",
            vec![
                ("x-api-key", "k-secret-1".into()),
                ("authorization", bearer(&hs_token(&good))),
            ],
        ),
        (
            "two api key headers, both the valid key",
            vec![
                ("x-api-key", "k-secret-1".into()),
                ("accept", "*/*".into()),
                ("x-api-key", "k-secret-1".into()),
            ],
        ),
        (
            "api key and bearer with other fields between",
            vec![
                ("authorization", bearer(&hs_token(&good))),
                ("x-api-keys", "k-secret-1".into()),
                ("accept", "*/*".into()),
                ("x-api-key", "k-secret-1".into()),
            ],
        ),
        ("unknown api key", vec![("x-api-key", "k-secret-2".into())]),
        ("api key prefix", vec![("x-api-key", "k-secret-".into())]),
        (
            "sub not writable in a header",
            vec![("authorization", bearer(&hs_token(&unforwardable)))],
        ),
    ];
    for (case, headers) in &cases {
        let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_invalid(case, get(gw, &hs).await);
    }
    // Non-UTF-8 / obs-text bytes in the header: read as bytes, refused, no panic.
    let req = Request::get("/")
        .header(
            "authorization",
            http::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap(),
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_invalid("non-ascii", send(gw, req).await);

    // No credential at all: a bare challenge, no error code (RFC 6750 §3.1).
    let (status, headers, _) = get(gw, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        headers.get("www-authenticate").unwrap(),
        "Bearer realm=\"api\""
    );

    // And the good token passes on the same gateway (the cases above fail for their reason).
    let (status, _, _) = get(gw, &[("authorization", &bearer(&hs_token(&good)))]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn missing_scopes_or_claims_are_403_insufficient_scope() {
    let auth = AuthConfig::new()
        .api_keys(
            ApiKeys::new()
                .key("reader", "k-reader", ["orders:read"])
                .unwrap(),
        )
        .jwt(
            Jwt::new()
                .key(JwtKey::hs256(HS_SECRET))
                .issuer(ISS)
                .audience(AUD),
        )
        .build()
        .unwrap();
    let write = gateway(auth.layer().require_scopes(["orders:write"])).await;
    let admin = gateway(auth.layer().require_claim("roles", "admin")).await;

    let reader = hs_token(&claims("bob", "orders:read"));
    let (status, headers, body) = get(write, &[("authorization", &bearer(&reader))]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        headers.get("www-authenticate").unwrap(),
        "Bearer realm=\"api\", error=\"insufficient_scope\""
    );
    assert_eq!(&body[..], b"Forbidden\n");
    let (status, _, _) = get(write, &[("x-api-key", "k-reader")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // `scp` as an array counts as well.
    let mut c = claims("carol", "");
    c["scp"] = json!(["orders:write"]);
    let (status, _, _) = get(write, &[("authorization", &bearer(&hs_token(&c)))]).await;
    assert_eq!(status, StatusCode::OK);

    // A required claim: array membership or equality; an API key has no claims.
    c["roles"] = json!(["user", "admin"]);
    let (status, _, _) = get(admin, &[("authorization", &bearer(&hs_token(&c)))]).await;
    assert_eq!(status, StatusCode::OK);
    c["roles"] = json!("user");
    let (status, _, _) = get(admin, &[("authorization", &bearer(&hs_token(&c)))]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = get(admin, &[("x-api-key", "k-reader")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn optional_routes_pass_anonymous_requests_stripped_and_still_refuse_bad_tokens() {
    let auth = AuthConfig::new()
        .jwt(
            Jwt::new()
                .key(JwtKey::hs256(HS_SECRET))
                .issuer(ISS)
                .audience(AUD),
        )
        .hide_credentials(true)
        .build()
        .unwrap();
    let gw = gateway(auth.layer().optional()).await;
    let (status, _, body) = get(gw, &[("x-auth-subject", "admin")]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(header(&echoed_headers(&body), "x-auth-subject"), None);
    assert_invalid(
        "bad token on an optional route",
        get(gw, &[("authorization", "Bearer x.y.z")]).await,
    );
    // hide_credentials: the upstream sees the identity, not the token.
    let (status, _, body) = get(
        gw,
        &[("authorization", &bearer(&hs_token(&claims("dan", "a"))))],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let seen = echoed_headers(&body);
    assert_eq!(header(&seen, "x-auth-subject"), Some("dan"));
    assert_eq!(header(&seen, "authorization"), None);
}

#[tokio::test]
async fn hide_credentials_removes_the_api_key_it_authenticated_with() {
    // `hide` removes only the header of the credential used (the other kind cannot be
    // there: both at once is refused); the API key must still never reach the upstream.
    let auth = AuthConfig::new()
        .api_keys(
            ApiKeys::new()
                .key("batch-job", "k-secret-1", ["orders:read"])
                .unwrap(),
        )
        .jwt(
            Jwt::new()
                .key(JwtKey::hs256(HS_SECRET))
                .issuer(ISS)
                .audience(AUD),
        )
        .hide_credentials(true)
        .build()
        .unwrap();
    let gw = gateway(auth.layer()).await;
    let (status, _, body) = get(gw, &[("x-api-key", "k-secret-1")]).await;
    assert_eq!(status, StatusCode::OK);
    let seen = echoed_headers(&body);
    assert_eq!(header(&seen, "x-auth-subject"), Some("batch-job"));
    assert_eq!(header(&seen, "x-api-key"), None);
    let (status, _, body) = get(
        gw,
        &[("authorization", &bearer(&hs_token(&claims("dan", "a"))))],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let seen = echoed_headers(&body);
    assert_eq!(header(&seen, "x-auth-subject"), Some("dan"));
    assert_eq!(header(&seen, "authorization"), None);
    // Both kinds at once stays a refusal, so neither can slip past `hide`.
    assert_invalid(
        "api key and bearer",
        get(
            gw,
            &[
                ("x-api-key", "k-secret-1"),
                ("authorization", &bearer(&hs_token(&claims("dan", "a")))),
            ],
        )
        .await,
    );
}

#[tokio::test]
async fn the_identity_is_a_request_extension_for_later_layers() {
    let auth: Authenticator = AuthConfig::new()
        .api_keys(ApiKeys::new().key("svc-a", "k-a", ["x"]).unwrap())
        .build()
        .unwrap();
    let inner = tower::service_fn(|req: Request<Incoming>| async move {
        let id = req.extensions().get::<Identity>().cloned();
        let text = id
            .map(|i| format!("{} {:?}", i.subject(), i.scopes()))
            .unwrap_or_default();
        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(text))))
    });
    let svc = ServiceBuilder::new()
        .layer(auth.layer().respond())
        .service(inner);
    let gw = tower_patterns::server::spawn_local(svc)
        .await
        .unwrap()
        .addr();
    let (status, _, body) = get(gw, &[("x-api-key", "k-a")]).await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"svc-a [\"x\"]"[..]));
}

/// A JWKS endpoint whose document the test changes, that can hang and can go down
/// (listener and every open connection closed: connection refused from then on).
struct JwksServer {
    addr: SocketAddr,
    doc: Arc<Mutex<(Value, bool)>>,
    /// Documents requested so far.
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(doc: Value) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let doc = Arc::new(Mutex::new((doc, false)));
        let d = doc.clone();
        let fetches = Arc::new(AtomicUsize::new(0));
        let f = fetches.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the task closes them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (d, f) = (d.clone(), f.clone());
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        f.fetch_add(1, Ordering::SeqCst);
                        let (body, hang) = d.lock().unwrap().clone();
                        async move {
                            if hang {
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                                Bytes::from(body.to_string()),
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        JwksServer {
            addr,
            doc,
            fetches,
            task,
        }
    }
    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }
    fn set(&self, doc: Value, hang: bool) {
        *self.doc.lock().unwrap() = (doc, hang);
    }
    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

/// Key rotation at the issuer: a token signed with the new key is accepted at once, by
/// an early fetch, not after the periodic refresh (an hour here).
#[tokio::test]
async fn a_token_with_a_new_kid_triggers_one_early_jwks_fetch() {
    let (old, new) = (Rsa::new(), Ec::new());
    let server = JwksServer::start(json!({ "keys": [old.jwk("k1")] })).await;
    let jwks = Jwks::load(&server.url(), JwksConfig::new().refresh(MAX_REFRESH))
        .await
        .unwrap();
    let auth = AuthConfig::new()
        .jwt(Jwt::new().jwks(jwks.clone()).issuer(ISS).audience(AUD))
        .build()
        .unwrap();
    let gw = gateway(auth.layer()).await;
    let c = claims("erin", "a");
    let old_token = old.token(Some("k1"), &c);
    assert_eq!(
        get(gw, &[("authorization", &bearer(&old_token))]).await.0,
        StatusCode::OK
    );
    assert_eq!(server.fetches(), 1, "the load");

    server.set(json!({ "keys": [old.jwk("k1"), new.jwk("k2")] }), false);
    let new_token = new.token(Some("k2"), &c);
    let (status, headers, _) = get(gw, &[("authorization", &bearer(&new_token))]).await;
    assert_eq!(status, StatusCode::OK, "{headers:?}");
    assert_eq!(server.fetches(), 2, "one early fetch");
    assert_eq!(jwks.keys().len(), 2);
    // Known kids cost nothing more.
    for t in [&old_token, &new_token] {
        assert_eq!(
            get(gw, &[("authorization", &bearer(t))]).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(server.fetches(), 2);

    // The synchronous `Authenticator::authenticate` never fetches: unknown is refused.
    let mut h = http::HeaderMap::new();
    let other = Ec::new().token(Some("k3"), &c);
    h.insert("authorization", bearer(&other).parse().unwrap());
    assert!(auth.authenticate(&h).is_err());
    assert_eq!(server.fetches(), 2);
}

/// Made-up kids cannot make the gateway hammer the JWKS endpoint: 100 of them, half at
/// once and half one after the other, cause one fetch per interval; each is a `401`.
#[tokio::test]
async fn random_kids_cause_at_most_one_jwks_fetch_per_interval() {
    let rsa = Rsa::new();
    let server = JwksServer::start(json!({ "keys": [rsa.jwk("k1")] })).await;
    let min = Duration::from_millis(300);
    let jwks = Jwks::load(
        &server.url(),
        JwksConfig::new()
            .refresh(MAX_REFRESH)
            .unknown_kid_refresh(Some(min)),
    )
    .await
    .unwrap();
    let auth = AuthConfig::new()
        .jwt(Jwt::new().jwks(jwks).issuer(ISS).audience(AUD))
        .build()
        .unwrap();
    let gw = gateway(auth.layer()).await;
    let c = claims("mallory", "a");
    // Distinct kids, none of them published.
    let token = |i: usize| rsa.token(Some(&format!("junk-{i}")), &c);
    let started = tokio::time::Instant::now();
    let concurrent = (0..50).map(|i| {
        let t = bearer(&token(i));
        async move { get(gw, &[("authorization", &t)]).await }
    });
    for res in futures_util::future::join_all(concurrent).await {
        assert_invalid("random kid, concurrent", res);
    }
    for i in 50..100 {
        assert_invalid(
            "random kid, sequential",
            get(gw, &[("authorization", &bearer(&token(i)))]).await,
        );
    }
    let fetched = server.fetches() - 1;
    // One per started interval of `min` (the requests above are far quicker on any
    // machine, but the bound holds whatever their pace).
    let intervals = (started.elapsed().as_millis() / min.as_millis()) as usize + 1;
    assert!(
        (1..=intervals).contains(&fetched),
        "{fetched} early fetches in {intervals} interval(s)"
    );

    // Once the interval has passed, the next unknown kid may fetch again — once.
    tokio::time::sleep(min).await;
    let before = server.fetches();
    for i in 100..110 {
        assert_invalid(
            "random kid, next interval",
            get(gw, &[("authorization", &bearer(&token(i)))]).await,
        );
    }
    assert_eq!(server.fetches(), before + 1);
}

/// Early refresh off: an unknown kid waits for the periodic refresh, no fetch.
#[tokio::test]
async fn early_jwks_fetch_can_be_turned_off() {
    let (old, new) = (Rsa::new(), Ec::new());
    let server = JwksServer::start(json!({ "keys": [old.jwk("k1"), new.jwk("k2")] })).await;
    server.set(json!({ "keys": [old.jwk("k1")] }), false);
    let jwks = Jwks::load(
        &server.url(),
        JwksConfig::new()
            .refresh(MAX_REFRESH)
            .unknown_kid_refresh(None),
    )
    .await
    .unwrap();
    let auth = AuthConfig::new()
        .jwt(Jwt::new().jwks(jwks).issuer(ISS).audience(AUD))
        .build()
        .unwrap();
    let gw = gateway(auth.layer()).await;
    server.set(json!({ "keys": [old.jwk("k1"), new.jwk("k2")] }), false);
    let t = new.token(Some("k2"), &claims("erin", "a"));
    assert_invalid(
        "kid unknown, no early fetch",
        get(gw, &[("authorization", &bearer(&t))]).await,
    );
    assert_eq!(server.fetches(), 1);
}

#[tokio::test]
async fn jwks_rotates_in_the_background_and_keeps_the_last_good_keys_when_down() {
    let rsa = Rsa::new();
    let ec = Ec::new();
    let server = JwksServer::start(json!({ "keys": [rsa.jwk("r1")] })).await;
    let jwks = Jwks::load(
        &server.url(),
        JwksConfig::new()
            .refresh(Duration::from_millis(100))
            .timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    let status = jwks.status();
    let auth = AuthConfig::new()
        .jwt(Jwt::new().jwks(jwks.clone()).issuer(ISS).audience(AUD))
        .build()
        .unwrap();
    let gw = gateway(auth.layer()).await;
    let c = claims("erin", "a");
    let rs_token = rsa.token(Some("r1"), &c);
    let es_token = ec.token(Some("e2"), &c);
    assert_eq!(
        get(gw, &[("authorization", &bearer(&rs_token))]).await.0,
        StatusCode::OK
    );
    assert_invalid(
        "kid not yet published",
        get(gw, &[("authorization", &bearer(&es_token))]).await,
    );

    // Rotation: r1 retired, e2 published. Wait for the next background load (no sleep).
    let loaded = status.borrow().loaded;
    server.set(json!({ "keys": [ec.jwk("e2"), {"kty": "weird"}] }), false);
    let wait = |pred: Box<dyn Fn(&tower_patterns::auth::JwksStatus) -> bool + Send>| {
        let mut st = status.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), st.wait_for(|s| pred(s)))
                .await
                .expect("no refresh within 10 s")
                .unwrap()
                .clone()
        }
    };
    let seen = wait(Box::new(move |s| s.loaded > loaded && s.keys == 1)).await;
    assert_eq!(seen.keys, 1, "the unusable key was skipped, not fatal");
    assert_eq!(
        get(gw, &[("authorization", &bearer(&es_token))]).await.0,
        StatusCode::OK
    );
    assert_invalid(
        "retired kid",
        get(gw, &[("authorization", &bearer(&rs_token))]).await,
    );

    // A document without a usable key, then an oversized one: refused, e2 stays.
    server.set(json!({ "keys": [] }), false);
    assert!(matches!(jwks.refresh().await, Err(JwksError::Document(_))));
    server.set(
        json!({ "keys": [ec.jwk("e2")], "pad": "x".repeat(300 * 1024) }),
        false,
    );
    assert!(matches!(jwks.refresh().await, Err(JwksError::TooLarge(_))));
    assert_eq!(
        get(gw, &[("authorization", &bearer(&es_token))]).await.0,
        StatusCode::OK
    );

    // A hanging endpoint: each fetch ends at the timeout, keys kept.
    server.set(json!({ "keys": [] }), true);
    let started = tokio::time::Instant::now();
    assert!(matches!(jwks.refresh().await, Err(JwksError::Timeout)));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Down: connection refused. The background refresh fails and the keys stay.
    server.task.abort();
    let failed = status.borrow().failed;
    let seen = wait(Box::new(move |s| s.failed > failed + 1)).await;
    assert!(seen.last_error.is_some());
    assert_eq!(jwks.keys().len(), 1);
    assert_eq!(
        get(gw, &[("authorization", &bearer(&es_token))]).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn keys_keep_their_algorithm_and_bad_configuration_is_refused_at_build() {
    let k = JwtKey::new(Algorithm::ES256, DecodingKey::from_secret(b"x")).with_kid("k");
    assert_eq!((k.algorithm(), k.kid()), (Algorithm::ES256, Some("k")));
    assert!(JwtKey::rs256_pem(b"not a pem").is_err());
    // A P-256 key is not an RSA key, and the other way round.
    let ec = Ec::new();
    assert!(JwtKey::rs256_pem(ec.pem().as_bytes()).is_err());
    assert!(JwtKey::es256_pem(&Rsa::new().public_pem).is_err());
    assert!(JwtKey::es256_pem(ec.pem().as_bytes()).is_ok());
    assert!(AuthConfig::new().build().is_err());
    assert!(AuthConfig::new()
        .jwt(Jwt::new().key(JwtKey::hs256(b"s")))
        .subject_header(Some("bad header"))
        .build()
        .is_err());
    assert!(Jwks::load("not a url", JwksConfig::new()).await.is_err());
    let closed = support::closed_port().await;
    assert!(
        Jwks::load(&format!("http://{closed}/jwks"), JwksConfig::new())
            .await
            .is_err()
    );
}

fn key_headers(key: &[u8]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("x-api-key", http::HeaderValue::from_bytes(key).unwrap());
    h
}

/// `Authenticator::authenticate` looks an API key up before scanning it for visible
/// ASCII (a found key equals a configured, checked one): a miss is still named as before.
#[test]
fn an_api_key_miss_is_named_as_before_the_lookup_came_first() {
    let auth = AuthConfig::new()
        .api_keys(ApiKeys::new().key("a", "k-secret", ["r"]).unwrap())
        .build()
        .unwrap();
    let id = auth
        .authenticate(&key_headers(b"k-secret"))
        .unwrap()
        .unwrap();
    assert_eq!(id.subject(), "a");
    // Surrounding blanks are not part of the key.
    assert!(auth
        .authenticate(&key_headers(b" k-secret "))
        .unwrap()
        .is_some());
    assert!(matches!(
        auth.authenticate(&key_headers(b"k-other")),
        Err(AuthError::UnknownApiKey)
    ));
    // Not visible ASCII (inner space, obs-text): malformed, never looked up as unknown.
    for bad in [&b"k-sec ret"[..], b"k-secret\xff", b"k\tsecret"] {
        assert!(
            matches!(
                auth.authenticate(&key_headers(bad)),
                Err(AuthError::Malformed("API key not visible ASCII"))
            ),
            "{bad:?}"
        );
    }
    // Only a bearer token accepted: a malformed key is still named as such first.
    let jwt_only = AuthConfig::new()
        .jwt(Jwt::new().key(JwtKey::hs256(b"0123456789abcdef0123456789abcdef")))
        .build()
        .unwrap();
    assert!(matches!(
        jwt_only.authenticate(&key_headers(b"k sec")),
        Err(AuthError::Malformed("API key not visible ASCII"))
    ));
    assert!(matches!(
        jwt_only.authenticate(&key_headers(b"k-secret")),
        Err(AuthError::Malformed("API keys are not accepted here"))
    ));
}
