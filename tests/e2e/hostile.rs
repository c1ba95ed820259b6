#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Hostile callers, end to end: forged and malformed tokens, impersonation and forwarding
//! headers, path tricks and OData filter injection through the identity lookup. Every
//! refusal is checked for its status, the gateway's `{"error":{"code","message"}}` body
//! (401s: the `WWW-Authenticate` challenge too) and that nothing reached the stand-in
//! Dataverse; the header and query cases check exactly what did arrive.

use crate::support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::{client, env, raw_request, Env, ALICE_EMAIL, ALICE_OID, BOB_OID};
use testkit::keys::{self, b64url, RsaSigningKey};
use testkit::{DirectoryUser, RecordedRequest};
use tokio::net::{TcpListener, TcpStream};

const ACCOUNTS: &str = "/api/data/v9.2/accounts";
const WHOAMI: &str = "/api/data/v9.2/WhoAmI";

// ---------------------------------------------------------------------------------------
// Helpers

/// The gateway's answer, whether it came through reqwest or a raw socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    www_authenticate: Option<String>,
    body: String,
}

impl Answer {
    async fn from_response(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let www_authenticate = response
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        let body = response.text().await.unwrap();
        Self {
            status,
            www_authenticate,
            body,
        }
    }

    /// Parses an HTTP/1.1 response read off a socket (Content-Length or chunked body).
    fn from_raw(raw: &str) -> Self {
        let (head, rest) = raw
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no response head in {raw:?}"));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut body = String::new();
            let mut rest = rest;
            while let Some((size, after)) = rest.split_once("\r\n") {
                let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                if size == 0 || after.len() < size {
                    break;
                }
                body.push_str(&after[..size]);
                rest = after[size..].trim_start_matches("\r\n");
            }
            body
        } else {
            rest.to_string()
        };
        Self {
            status,
            www_authenticate: header("www-authenticate"),
            body,
        }
    }

    /// `(code, message)` of the gateway's error body; panics on any other body.
    fn error(&self) -> (String, String) {
        let json: Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|_| panic!("not a gateway error body: {self:?}"));
        let code = json["error"]["code"].as_str().unwrap_or_default();
        let message = json["error"]["message"].as_str().unwrap_or_default();
        assert!(
            code.starts_with("DynamicsGateway.") && !message.is_empty(),
            "not a gateway error body: {self:?}"
        );
        (code.to_string(), message.to_string())
    }
}

/// A refusal as the caller must see it.
struct Refusal {
    status: u16,
    /// Error code without the `DynamicsGateway.` prefix.
    code: &'static str,
    /// Text the message (and a 401's `error_description`) must contain.
    says: &'static str,
}

const fn refusal(status: u16, code: &'static str, says: &'static str) -> Refusal {
    Refusal { status, code, says }
}

/// A 401 for an invalid token saying `says`.
const fn invalid_token(says: &'static str) -> Refusal {
    refusal(401, "InvalidToken", says)
}

/// Asserts the answer is exactly `expected`, echoes none of `secret`, and that Dataverse
/// has still seen only `before` requests.
fn assert_refused(
    env: &Env,
    case: &str,
    answer: &Answer,
    expected: &Refusal,
    secret: &str,
    before: usize,
) {
    assert_eq!(answer.status, expected.status, "{case}: {answer:?}");
    let (code, message) = answer.error();
    assert_eq!(code, format!("DynamicsGateway.{}", expected.code), "{case}");
    assert!(
        message.contains(expected.says),
        "{case}: expected {:?} in {message:?}",
        expected.says
    );
    if expected.status == 401 {
        let www = answer
            .www_authenticate
            .as_deref()
            .unwrap_or_else(|| panic!("{case}: 401 without WWW-Authenticate"));
        assert!(
            www.starts_with("Bearer error=\"invalid_token\", error_description=\""),
            "{case}: {www}"
        );
        assert!(www.contains(expected.says), "{case}: {www}");
        assert!(www.len() < 300, "{case}: challenge echoes input: {www}");
    } else {
        assert!(answer.www_authenticate.is_none(), "{case}: {answer:?}");
    }
    if secret.len() > 16 {
        assert!(
            !answer.body.contains(secret)
                && !answer
                    .www_authenticate
                    .as_deref()
                    .unwrap_or_default()
                    .contains(secret),
            "{case}: the caller's input must not be echoed"
        );
    }
    assert_eq!(
        env.dataverse.request_count(),
        before,
        "{case}: nothing may reach Dataverse"
    );
}

/// Sends `token` to the accounts list and asserts it is refused as `expected`.
async fn expect_refused(env: &Env, case: &str, token: &str, expected: &Refusal) {
    let before = env.dataverse.request_count();
    let answer = get(env, ACCOUNTS, token).await;
    assert_refused(env, case, &answer, expected, token, before);
}

async fn get(env: &Env, path: &str, token: &str) -> Answer {
    let response = client()
        .get(format!("{}{path}", env.gateway.url()))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    Answer::from_response(response).await
}

/// Sends `GET target` with the token and extra header lines over a raw socket, so nothing
/// normalises the request on the way.
async fn raw_get(env: &Env, target: &str, token: &str, extra: &str) -> Answer {
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer {token}\r\n{extra}Connection: close\r\n\r\n"
    );
    Answer::from_raw(&raw_request(env.gateway.addr, request.as_bytes()).await)
}

/// `base64url(header).base64url(payload)` signed as given with `key`, for segments no
/// `serde_json::Value` produces (duplicate members, non-JSON).
fn sign_raw(key: &RsaSigningKey, header: &str, payload: &str) -> String {
    key.sign_input(&format!("{}.{}", b64url(header), b64url(payload)))
}

fn rs256_header(env: &Env) -> String {
    json!({"alg": "RS256", "typ": "JWT", "kid": env.idp.current_key().kid()}).to_string()
}

/// The JSON text of `claims` with one more member `name: value` added first or last, so
/// the object has `name` twice when `claims` already has it.
fn with_extra_member(claims: &Value, name: &str, value: &Value, first: bool) -> String {
    let text = claims.to_string();
    let inner = &text[1..text.len() - 1];
    let member = format!("{}:{value}", Value::from(name));
    if first {
        format!("{{{member},{inner}}}")
    } else {
        format!("{{{inner},{member}}}")
    }
}

/// HMAC-signs the token with `secret` (the key-confusion attack).
fn sign_hmac(alg: &str, secret: &[u8], kid: &str, claims: &Value) -> String {
    let algorithm = match alg {
        "HS256" => aws_lc_rs::hmac::HMAC_SHA256,
        "HS384" => aws_lc_rs::hmac::HMAC_SHA384,
        "HS512" => aws_lc_rs::hmac::HMAC_SHA512,
        other => panic!("no HMAC {other}"),
    };
    let input = format!(
        "{}.{}",
        b64url(json!({"alg": alg, "typ": "JWT", "kid": kid}).to_string()),
        b64url(claims.to_string())
    );
    let tag = aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(algorithm, secret),
        input.as_bytes(),
    );
    format!("{input}.{}", b64url(tag.as_ref()))
}

/// A listener that only counts connections: where hostile tokens and requests point, to
/// prove the gateway never goes there.
struct ConnectionCounter {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

impl ConnectionCounter {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Self { addr, connections }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Asserts nobody connected, then connects once itself and sees that counted, so the
    /// zero above cannot come from a listener that was never listening.
    async fn assert_never_contacted(&self) {
        assert_eq!(
            self.connections.load(Ordering::SeqCst),
            0,
            "the gateway connected to an address chosen by the caller"
        );
        let _probe = TcpStream::connect(self.addr).await.unwrap();
        for _ in 0..100 {
            if self.connections.load(Ordering::SeqCst) == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the connection counter does not count");
    }
}

/// Asserts the request was forwarded once, as Alice, with `CallerObjectId` only.
fn assert_forwarded_as_alice(env: &Env, case: &str, answer: &Answer, before: usize) {
    assert_eq!(answer.status, 200, "{case}: {answer:?}");
    let requests = env.dataverse.requests();
    assert_eq!(requests.len(), before + 1, "{case}");
    let seen = requests.last().unwrap();
    assert_eq!(seen.header("callerobjectid"), Some(ALICE_OID), "{case}");
    assert_eq!(impersonation_headers(seen).len(), 1, "{case}");
}

/// Every header of a recorded request that some spelling would make an impersonation
/// header (case-insensitive, `-`/`_` ignored), with its value.
fn impersonation_headers(request: &RecordedRequest) -> Vec<(String, String)> {
    request
        .headers
        .iter()
        .filter(|(name, _)| {
            let squashed: String = name
                .as_str()
                .chars()
                .filter(|c| !matches!(c, '-' | '_'))
                .collect();
            squashed.contains("callerid") || squashed.contains("callerobjectid")
        })
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// JWT

#[tokio::test]
async fn tokens_without_an_allowed_asymmetric_algorithm_are_refused_whatever_they_carry() {
    let env = env().start().await;
    let claims = env.idp.claims_for(ALICE_OID);
    let key = env.idp.current_key();
    let kid = key.kid().to_string();
    let mut cases: Vec<(String, String, Refusal)> = Vec::new();
    for alg in ["none", "None", "NONE", "nOnE", ""] {
        let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
        cases.push((
            format!("alg {alg:?}, empty signature"),
            keys::unsigned_jwt(&header, &claims),
            invalid_token("algorithm"),
        ));
        // A `none` token carrying the signature of a genuine token.
        let genuine = env.idp.token_for(ALICE_OID);
        let signature = genuine.rsplit('.').next().unwrap();
        cases.push((
            format!("alg {alg:?} with a genuine signature"),
            format!("{}{signature}", keys::unsigned_jwt(&header, &claims)),
            invalid_token("algorithm"),
        ));
    }
    cases.push((
        "no alg member".into(),
        sign_raw(&key, &json!({"kid": kid}).to_string(), &claims.to_string()),
        invalid_token("not a well-formed JWT"),
    ));
    for alg in ["HS256", "HS384", "HS512"] {
        for (form, secret) in [
            ("DER", key.public_key_der()),
            ("PEM", key.public_key_pem().into_bytes()),
        ] {
            cases.push((
                format!("{alg} keyed with the issuer's public key ({form})"),
                sign_hmac(alg, &secret, &kid, &claims),
                invalid_token("algorithm"),
            ));
        }
    }
    for (case, token, expected) in &cases {
        expect_refused(&env, case, token, expected).await;
    }
}

#[tokio::test]
async fn kids_that_are_absent_unknown_hostile_or_huge_are_refused_and_never_fetched() {
    let env = env().start().await;
    let elsewhere = ConnectionCounter::start().await;
    let claims = env.idp.claims_for(ALICE_OID);
    let key = env.idp.current_key();
    let with_kid = |kid: Value| {
        sign_raw(
            &key,
            &json!({"alg": "RS256", "typ": "JWT", "kid": kid}).to_string(),
            &claims.to_string(),
        )
    };
    let huge = "k".repeat(10 * 1024);
    let cases = [
        (
            "kid absent",
            sign_raw(&key, r#"{"alg":"RS256","typ":"JWT"}"#, &claims.to_string()),
            invalid_token("no kid"),
        ),
        ("kid null", with_kid(Value::Null), invalid_token("no kid")),
        (
            "kid unknown",
            with_kid(json!("never-published")),
            invalid_token("kid) is not known"),
        ),
        (
            "kid path traversal",
            with_kid(json!("../../etc/passwd")),
            invalid_token("kid) is not known"),
        ),
        (
            "kid SQL injection",
            with_kid(json!("' OR 1=1 --")),
            invalid_token("kid) is not known"),
        ),
        (
            "kid URL",
            with_kid(json!(elsewhere.url("/keys"))),
            invalid_token("kid) is not known"),
        ),
        (
            "kid with control characters",
            with_kid(json!("k\u{0}\r\nx-evil: 1")),
            invalid_token("kid) is not known"),
        ),
        (
            "kid of 10 KB",
            with_kid(json!(huge)),
            invalid_token("kid) is not known"),
        ),
        (
            "kid a number",
            with_kid(json!(7)),
            invalid_token("not a well-formed JWT"),
        ),
        (
            "kid an object",
            with_kid(json!({"kid": key.kid()})),
            invalid_token("not a well-formed JWT"),
        ),
    ];
    for (case, token, expected) in &cases {
        let before = env.dataverse.request_count();
        let answer = get(&env, ACCOUNTS, token).await;
        assert_refused(&env, case, &answer, expected, token, before);
        assert!(!answer.body.contains(&huge[..64]), "{case}: kid echoed");
    }
    elsewhere.assert_never_contacted().await;
}

/// `jku`, `x5u` and `jwk` name keys chosen by whoever wrote the token. The gateway never
/// reads them (src/inbound/jwt.rs): with the issuer's genuine signature the token is valid
/// and accepted as if they were absent; with any other key it is refused. Either way the
/// URLs are never contacted.
#[tokio::test]
async fn jku_x5u_and_jwk_headers_are_ignored_and_never_fetched() {
    let env = env().start().await;
    let elsewhere = ConnectionCounter::start().await;
    let claims = env.idp.claims_for(ALICE_OID);
    let real = env.idp.current_key();
    let attacker = RsaSigningKey::generate("attacker-key").unwrap();
    let pointers = [
        ("jku", json!(elsewhere.url("/jwks.json"))),
        ("x5u", json!(elsewhere.url("/cert.pem"))),
        ("jwk", attacker.jwk()),
    ];
    let header = |kid: &str, members: &[(&str, Value)]| {
        let mut h = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
        for (name, value) in members {
            h[*name] = value.clone();
        }
        h
    };
    let all: Vec<(&str, Value)> = pointers.to_vec();
    let mut sets: Vec<(String, Vec<(&str, Value)>)> = pointers
        .iter()
        .map(|p| (p.0.to_string(), vec![p.clone()]))
        .collect();
    sets.push(("jku+x5u+jwk".into(), all));

    for (name, members) in &sets {
        let case = format!("{name} with the issuer's signature");
        let before = env.dataverse.request_count();
        let token = real.sign_jwt(&header(real.kid(), members), &claims);
        let answer = get(&env, ACCOUNTS, &token).await;
        assert_forwarded_as_alice(&env, &case, &answer, before);
    }
    for (name, members) in &sets {
        for (kid, why) in [
            (real.kid(), "signature is invalid"),
            (attacker.kid(), "kid) is not known"),
        ] {
            let case = format!("{name} signed by the key it names, kid {kid}");
            let token = attacker.sign_jwt(&header(kid, members), &claims);
            expect_refused(&env, &case, &token, &invalid_token(why)).await;
        }
    }
    elsewhere.assert_never_contacted().await;
}

#[tokio::test]
async fn crit_headers_are_refused_even_with_a_genuine_signature() {
    let env = env().start().await;
    let key = env.idp.current_key();
    let claims = env.idp.claims_for(ALICE_OID);
    for crit in [
        json!(["exp"]),
        json!(["b64"]),
        json!(["x-unknown"]),
        json!([]),
    ] {
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": key.kid(), "crit": crit});
        let token = key.sign_jwt(&header, &claims);
        expect_refused(
            &env,
            &format!("crit {crit}"),
            &token,
            &invalid_token("critical extensions"),
        )
        .await;
    }
}

#[tokio::test]
async fn signatures_that_do_not_cover_these_exact_bytes_with_the_issuers_key_are_refused() {
    let env = env().start().await;
    let key = env.idp.current_key();
    let genuine = env.idp.token_for(ALICE_OID);
    let parts: Vec<&str> = genuine.split('.').collect();
    let mut bob = env.idp.claims_for(ALICE_OID);
    bob["oid"] = json!(BOB_OID);
    let impostor = RsaSigningKey::generate(key.kid()).unwrap();
    let other_token = env.idp.token_for(BOB_OID);
    let other_signature = other_token.rsplit('.').next().unwrap();
    let header_edited = json!({"alg": "RS256", "typ": "at+jwt", "kid": key.kid()});
    let cases = [
        (
            "a different key re-using the issuer's kid",
            impostor.sign_jwt(&json!({"alg": "RS256", "kid": key.kid()}), &bob),
        ),
        (
            "payload edited after signing",
            format!("{}.{}.{}", parts[0], b64url(bob.to_string()), parts[2]),
        ),
        (
            "header edited after signing",
            format!(
                "{}.{}.{}",
                b64url(header_edited.to_string()),
                parts[1],
                parts[2]
            ),
        ),
        (
            "another genuine token's signature",
            format!("{}.{}.{other_signature}", parts[0], parts[1]),
        ),
        ("signature removed", format!("{}.{}.", parts[0], parts[1])),
        (
            "signature truncated",
            format!("{}.{}.{}", parts[0], parts[1], &parts[2][..40]),
        ),
    ];
    for (case, token) in &cases {
        expect_refused(&env, case, token, &invalid_token("signature is invalid")).await;
    }
    // The untouched token passes: the refusals above are about the edits.
    let before = env.dataverse.request_count();
    let answer = get(&env, ACCOUNTS, &genuine).await;
    assert_forwarded_as_alice(&env, "the genuine token", &answer, before);
}

#[tokio::test]
async fn segments_that_are_not_base64url_json_objects_are_refused() {
    let env = env().start().await;
    let key = env.idp.current_key();
    let header = rs256_header(&env);
    let claims = env.idp.claims_for(ALICE_OID).to_string();
    let signed = |h: &str, p: &str| sign_raw(&key, h, p);
    let sign_segments = |h: &str, p: &str| key.sign_input(&format!("{h}.{p}"));
    let malformed = invalid_token("not a well-formed JWT");
    let cases = [
        ("garbage base64 in all parts", "!!!.@@@.###".to_string()),
        ("empty segments", "..".to_string()),
        ("one dot", "eyJhbGciOiJSUzI1NiJ9.e30".to_string()),
        ("four parts", format!("{}.x", env.idp.token_for(ALICE_OID))),
        (
            "padded base64",
            sign_segments(&format!("{}==", b64url("{}")), &b64url(&claims)),
        ),
        (
            "standard base64 alphabet",
            sign_segments(
                &b64url(&header).replace('-', "+").replace('_', "/"),
                "ab+/cd",
            ),
        ),
        (
            "payload garbage base64",
            sign_segments(&b64url(&header), "%%%%"),
        ),
        ("header not JSON", signed("RS256", &claims)),
        ("payload not JSON", signed(&header, "<claims iss='x'/>")),
        ("header a JSON array", signed(r#"["RS256"]"#, &claims)),
        (
            "payload a JSON array",
            signed(&header, &format!("[{}]", json!(env.idp.issuer()))),
        ),
        ("payload a JSON string", signed(&header, "\"alice\"")),
        (
            "payload JSON with trailing bytes",
            signed(&header, &format!("{claims}x")),
        ),
        ("payload not UTF-8", {
            let mut bytes = claims.clone().into_bytes();
            bytes.insert(1, 0xff);
            key.sign_input(&format!("{}.{}", b64url(&header), b64url(bytes)))
        }),
    ];
    for (case, token) in &cases {
        expect_refused(&env, case, token, &malformed).await;
    }
}

#[tokio::test]
async fn exp_must_be_present_and_a_number_and_a_huge_one_is_the_issuers_choice() {
    let env = env().start().await;
    let key = env.idp.current_key();
    let header = rs256_header(&env);
    let exp_as = |exp: &str| {
        let mut claims = env.idp.claims_for(ALICE_OID);
        claims.as_object_mut().unwrap().remove("exp");
        sign_raw(
            &key,
            &header,
            &with_extra_member(&claims, "exp", &serde_json::from_str(exp).unwrap(), false),
        )
    };
    let cases = [
        (
            "exp a string",
            exp_as(&format!("\"{}\"", support::now_secs() + 3600)),
            invalid_token("no valid exp claim"),
        ),
        (
            "exp 1e20 (beyond u64)",
            exp_as("1e20"),
            invalid_token("no valid exp claim"),
        ),
        (
            "exp negative",
            exp_as("-1"),
            invalid_token("no valid exp claim"),
        ),
        (
            "exp an array",
            exp_as(&format!("[{}]", support::now_secs() + 3600)),
            invalid_token("not a well-formed JWT"),
        ),
        (
            "exp null",
            exp_as("null"),
            invalid_token("no valid exp claim"),
        ),
        (
            "exp in the past",
            exp_as(&(support::now_secs() - 3600).to_string()),
            invalid_token("expired"),
        ),
        (
            "exp missing",
            {
                let mut claims = env.idp.claims_for(ALICE_OID);
                claims.as_object_mut().unwrap().remove("exp");
                env.idp.sign(claims)
            },
            invalid_token("no valid exp claim"),
        ),
    ];
    for (case, token, expected) in &cases {
        expect_refused(&env, case, token, expected).await;
    }
    // RFC 7519 puts no bound on exp; a signed token valid until u64::MAX seconds is the
    // issuer's own statement, and the gateway accepts it like any other valid token.
    let before = env.dataverse.request_count();
    let answer = get(&env, ACCOUNTS, &exp_as(&u64::MAX.to_string())).await;
    assert_forwarded_as_alice(&env, "exp u64::MAX", &answer, before);
}

#[tokio::test]
async fn an_aud_array_is_accepted_when_any_element_is_an_accepted_audience() {
    let env = env().start().await;
    let good = env.idp.audience();
    let with_aud = |aud: Value| {
        let mut claims = env.idp.claims_for(ALICE_OID);
        claims["aud"] = aud;
        env.idp.sign(claims)
    };
    for (case, aud) in [
        ("bad then good", json!(["api://someone-else", good])),
        ("good then bad", json!([good, "api://someone-else"])),
    ] {
        let before = env.dataverse.request_count();
        let answer = get(&env, ACCOUNTS, &with_aud(aud)).await;
        assert_forwarded_as_alice(&env, case, &answer, before);
    }
    for (case, aud) in [
        (
            "only bad values",
            json!(["api://someone-else", "api://another"]),
        ),
        ("empty array", json!([])),
        (
            "good value with different case",
            json!([good.to_uppercase()]),
        ),
        ("good value as a prefix", json!([format!("{good}x")])),
    ] {
        expect_refused(&env, case, &with_aud(aud), &invalid_token("audience")).await;
    }
}

#[tokio::test]
async fn tokens_over_16_kib_are_refused_before_they_are_parsed() {
    let env = env().start().await;
    let mut claims = env.idp.claims_for(ALICE_OID);
    claims["padding"] = json!("p".repeat(16 * 1024));
    let token = env.idp.sign(claims);
    assert!(token.len() > 16 * 1024);
    expect_refused(
        &env,
        "signed token over 16 KiB",
        &token,
        &invalid_token("larger than 16384 bytes"),
    )
    .await;
    let junk = "a".repeat(16 * 1024 + 1);
    expect_refused(
        &env,
        "16 KiB + 1 of junk",
        &junk,
        &invalid_token("larger than 16384 bytes"),
    )
    .await;
}

/// serde_json keeps the last of two equal member names, the gateway's own issuer peek
/// refused duplicates of `iss` only, and other readers keep the first: so two `oid`s in a
/// signed token meant "whichever one the code path picks". The gateway refuses any token
/// with a duplicate member name, at any depth, before it looks for keys.
#[tokio::test]
async fn duplicate_members_are_refused_even_in_a_genuinely_signed_token() {
    let env = env().start().await;
    let key = env.idp.current_key();
    let header = rs256_header(&env);
    let claims = env.idp.claims_for(ALICE_OID);
    let payload =
        |name: &str, value: Value, first: bool| with_extra_member(&claims, name, &value, first);
    let cases = [
        (
            "iss twice, same value",
            sign_raw(
                &key,
                &header,
                &payload("iss", json!(env.idp.issuer()), true),
            ),
        ),
        (
            "iss twice, foreign first",
            sign_raw(
                &key,
                &header,
                &payload("iss", json!("https://evil.example/"), true),
            ),
        ),
        (
            "iss twice, foreign last",
            sign_raw(
                &key,
                &header,
                &payload("iss", json!("https://evil.example/"), false),
            ),
        ),
        (
            "oid twice, Bob last",
            sign_raw(&key, &header, &payload("oid", json!(BOB_OID), false)),
        ),
        (
            "oid twice, Bob first",
            sign_raw(&key, &header, &payload("oid", json!(BOB_OID), true)),
        ),
        (
            "aud twice",
            sign_raw(
                &key,
                &header,
                &payload("aud", json!("api://someone-else"), false),
            ),
        ),
        (
            "exp twice",
            sign_raw(&key, &header, &payload("exp", json!(u64::MAX), false)),
        ),
        (
            "duplicate inside a nested claim",
            sign_raw(
                &key,
                &header,
                &payload("xms_st", json!(null), false).replace(
                    "\"xms_st\":null",
                    "\"xms_st\":{\"sub\":\"a\",\"sub\":\"b\"}",
                ),
            ),
        ),
        (
            "kid twice in the header",
            sign_raw(
                &key,
                &format!(
                    "{{\"alg\":\"RS256\",\"kid\":\"unknown\",\"kid\":{}}}",
                    json!(key.kid())
                ),
                &claims.to_string(),
            ),
        ),
        (
            "alg twice in the header",
            sign_raw(
                &key,
                &format!(
                    "{{\"alg\":\"none\",\"alg\":\"RS256\",\"kid\":{}}}",
                    json!(key.kid())
                ),
                &claims.to_string(),
            ),
        ),
    ];
    for (case, token) in &cases {
        expect_refused(&env, case, token, &invalid_token("unique member names")).await;
    }
}

#[tokio::test]
async fn nested_claims_never_stand_in_for_the_identity_claim_or_issuer() {
    let env = env().start().await;
    let with = |name: &str, value: Value| {
        let mut claims = env.idp.claims_for(ALICE_OID);
        claims[name] = value;
        env.idp.sign(claims)
    };
    let not_mapped = refusal(403, "CallerNotMapped", "no oid claim");
    let cases = [
        (
            "oid an object naming Bob",
            with("oid", json!({"oid": BOB_OID})),
            not_mapped,
        ),
        (
            "oid an array",
            with("oid", json!([ALICE_OID])),
            refusal(403, "CallerNotMapped", "no oid claim"),
        ),
        (
            "oid null",
            with("oid", Value::Null),
            refusal(403, "CallerNotMapped", "no oid claim"),
        ),
        (
            "oid empty",
            with("oid", json!("")),
            refusal(403, "CallerNotMapped", "no oid claim"),
        ),
        (
            "iss an array",
            with("iss", json!([env.idp.issuer()])),
            invalid_token("iss claim has the wrong type"),
        ),
        (
            "iss an object",
            with("iss", json!({"iss": env.idp.issuer()})),
            invalid_token("iss claim has the wrong type"),
        ),
    ];
    for (case, token, expected) in &cases {
        expect_refused(&env, case, token, expected).await;
    }
}

// ---------------------------------------------------------------------------------------
// Headers

/// Every impersonation header spelling a caller might try, with values padded by spaces.
fn impersonation_attempts() -> String {
    [
        ("MSCRMCallerID", " 00000000-0000-0000-0000-00000000dead "),
        ("mscrmcallerid", BOB_OID),
        ("CallerObjectId", &format!("  {BOB_OID}  ")),
        ("callerobjectid", BOB_OID),
        ("CALLEROBJECTID", BOB_OID),
        ("MSCRMCallerObjectID", BOB_OID),
        ("caller_object_id", BOB_OID),
        ("Caller-Object-Id", BOB_OID),
        ("MSCRM-CallerID", BOB_OID),
        ("mscrm_callerid", BOB_OID),
        ("MSCRMCallerID", &format!("\t{BOB_OID}\t")),
    ]
    .iter()
    .map(|(name, value)| format!("{name}: {value}\r\n"))
    .collect()
}

#[tokio::test]
async fn every_spelling_of_impersonation_headers_is_stripped_and_only_the_gateways_arrives() {
    for (mode, identity, expected_name, expected_value) in [
        (
            "caller_object_id",
            support::CALLER_OBJECT_ID,
            "callerobjectid",
            ALICE_OID.to_string(),
        ),
        (
            "lookup",
            "identity:\n  mode: lookup\n  claim: oid\n",
            "mscrmcallerid",
            support::ALICE_SYSTEMUSERID.to_string(),
        ),
    ] {
        let env = env().identity(identity).start().await;
        let token = env.idp.token_for(ALICE_OID);
        let answer = raw_get(&env, WHOAMI, &token, &impersonation_attempts()).await;
        assert_eq!(answer.status, 200, "{mode}: {answer:?}");
        let forwarded: Vec<RecordedRequest> = env
            .dataverse
            .requests()
            .into_iter()
            .filter(|r| r.path_and_query == WHOAMI)
            .collect();
        assert_eq!(forwarded.len(), 1, "{mode}");
        assert_eq!(
            impersonation_headers(&forwarded[0]),
            vec![(expected_name.to_string(), expected_value)],
            "{mode}: the gateway's header is the only one"
        );
        let all = format!("{:?}", forwarded[0].headers);
        assert!(
            !all.contains(BOB_OID) && !all.contains("dead"),
            "{mode}: {all}"
        );
        let who: Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(who["UserId"], support::ALICE_SYSTEMUSERID, "{mode}");
    }
}

#[tokio::test]
async fn impersonation_header_names_with_whitespace_are_refused_by_the_http_parser() {
    // hyper refuses a header name containing whitespace with its own bare 400 before the
    // gateway sees the request: there is no gateway error body, and nothing is forwarded.
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    for line in [
        format!("CallerObjectId : {BOB_OID}\r\n"),
        format!(" CallerObjectId: {BOB_OID}\r\n"),
        format!("Caller ObjectId: {BOB_OID}\r\n"),
        format!("CallerObjectId\t: {BOB_OID}\r\n"),
    ] {
        let answer = raw_get(&env, ACCOUNTS, &token, &line).await;
        assert_eq!(answer.status, 400, "{line:?}: {answer:?}");
        assert!(answer.body.is_empty(), "{line:?}: {answer:?}");
        assert_eq!(env.dataverse.request_count(), 0, "{line:?}");
    }
}

#[tokio::test]
async fn authorization_sent_twice_is_refused_in_either_order() {
    let env = env().start().await;
    let alice = env.idp.token_for(ALICE_OID);
    let bob = env.idp.token_for(BOB_OID);
    let cases = [
        ("the same token twice", alice.clone(), alice.clone()),
        ("two valid tokens", bob.clone(), alice.clone()),
        ("junk then valid", "junk".to_string(), alice.clone()),
        ("valid then junk", alice.clone(), "junk".to_string()),
    ];
    for (case, first, second) in &cases {
        let request = format!(
            "GET {ACCOUNTS} HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer {first}\r\nAuthorization: Bearer {second}\r\nConnection: close\r\n\r\n"
        );
        let answer = Answer::from_raw(&raw_request(env.gateway.addr, request.as_bytes()).await);
        assert_refused(
            &env,
            case,
            &answer,
            &invalid_token("not a single Bearer token"),
            first,
            0,
        );
    }
    // Two tokens folded into one header value are not a token either.
    let answer = raw_get(&env, ACCOUNTS, &format!("{alice}, Bearer {bob}"), "").await;
    assert_refused(
        &env,
        "two tokens in one value",
        &answer,
        &invalid_token("not a well-formed JWT"),
        &alice,
        0,
    );
}

#[tokio::test]
async fn forwarded_headers_from_the_caller_are_not_trusted_by_default() {
    let env = env().start().await;
    let (context, seen) = get_with_forwarded(
        &env,
        &[
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Proto", "https"),
            ("Forwarded", "for=6.6.6.6;host=evil.example;proto=https"),
        ],
    )
    .await;
    assert!(
        context.starts_with(&format!("{}/api/data/", env.gateway.url())),
        "links must not be shaped by untrusted forwarded headers: {context}"
    );
    assert_eq!(seen.headers.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-host"), None);
    assert_eq!(seen.header("x-forwarded-proto"), None);
    assert_eq!(seen.header("forwarded"), None);
}

#[tokio::test]
async fn forwarded_headers_are_appended_to_and_used_when_trusted() {
    let env = env()
        .server("  trust_forwarded_headers: true\n")
        .start()
        .await;
    let (context, seen) = get_with_forwarded(
        &env,
        &[
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Host", "apps.example"),
            ("X-Forwarded-Proto", "https"),
        ],
    )
    .await;
    assert!(
        context.starts_with("https://apps.example/api/data/"),
        "{context}"
    );
    assert_eq!(seen.header("x-forwarded-for"), Some("6.6.6.6, 127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-host"), Some("apps.example"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    let host = env.dataverse.addr().to_string();
    assert_eq!(seen.header("host"), Some(host.as_str()));
}

/// GETs accounts as Alice with the caller's `forwarded` headers; checks the answer is 200
/// and that exactly one request reached Dataverse, and returns the answer's
/// `@odata.context` and that request.
async fn get_with_forwarded(env: &Env, forwarded: &[(&str, &str)]) -> (String, RecordedRequest) {
    let mut request = client()
        .get(format!("{}{ACCOUNTS}", env.gateway.url()))
        .bearer_auth(env.idp.token_for(ALICE_OID));
    for (name, value) in forwarded {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let context = body["@odata.context"].as_str().unwrap().to_owned();
    let mut seen = env.dataverse.requests();
    assert_eq!(seen.len(), 1);
    (context, seen.remove(0))
}

#[tokio::test]
async fn neither_host_nor_an_absolute_form_target_can_choose_the_upstream() {
    let env = env().start().await;
    let elsewhere = ConnectionCounter::start().await;
    let token = env.idp.token_for(ALICE_OID);
    let other = elsewhere.addr;
    let cases = [
        (
            "Host names another server",
            format!("GET {ACCOUNTS} HTTP/1.1\r\nHost: {other}\r\n"),
        ),
        (
            "Host evil.example",
            format!("GET {ACCOUNTS} HTTP/1.1\r\nHost: evil.example\r\n"),
        ),
        (
            "absolute-form http target",
            format!("GET http://{other}{ACCOUNTS} HTTP/1.1\r\nHost: {other}\r\n"),
        ),
        (
            "absolute-form https target",
            format!("GET https://evil.example{ACCOUNTS} HTTP/1.1\r\nHost: evil.example\r\n"),
        ),
        (
            "absolute-form and Host disagree",
            format!("GET http://{other}{ACCOUNTS} HTTP/1.1\r\nHost: evil.example\r\n"),
        ),
        (
            "absolute-form with userinfo",
            format!(
                "GET http://{}@{other}{ACCOUNTS} HTTP/1.1\r\nHost: {other}\r\n",
                env.dataverse.addr()
            ),
        ),
    ];
    let host = env.dataverse.addr().to_string();
    for (i, (case, head)) in cases.iter().enumerate() {
        let request = format!("{head}Authorization: Bearer {token}\r\nConnection: close\r\n\r\n");
        let answer = Answer::from_raw(&raw_request(env.gateway.addr, request.as_bytes()).await);
        assert_eq!(answer.status, 200, "{case}: {answer:?}");
        let seen = env.dataverse.requests();
        assert_eq!(
            seen.len(),
            i + 1,
            "{case}: reached the configured Dataverse"
        );
        let last = seen.last().unwrap();
        assert_eq!(last.path_and_query, ACCOUNTS, "{case}");
        assert_eq!(last.header("host"), Some(host.as_str()), "{case}");
        assert_eq!(last.headers.get_all("host").iter().count(), 1, "{case}");
    }
    elsewhere.assert_never_contacted().await;
}

// ---------------------------------------------------------------------------------------
// Paths

#[tokio::test]
async fn ambiguous_paths_in_any_encoding_are_400_and_never_forwarded() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let ambiguous = refusal(400, "AmbiguousPath", "dot segment");
    for target in [
        "/api/data/v9.2/../../../XRMServices/2011/Organization.svc",
        "/api/data/v9.2/accounts/..",
        "/api/data/./v9.2/accounts",
        "/api/data/../../admin",
        "/x/../api/data/v9.2/accounts",
        "/api/data/v9.2/%2e%2e/%2e%2e/%2e%2e/XRMServices",
        "/api/data/v9.2/%2E%2e%2f%2E%2e%2fXRMServices",
        "/api/data/v9.2/.%2e/x",
        "/api/data/v9.2/%2e./x",
        "/%2e%2e/api/data/v9.2/accounts",
        "/api/data/v9.2/%252e%252e/%252e%252e/x",
        "/api/data/v9.2/%25252e%25252e/x",
        "/api/data/v9.2/..\\..\\XRMServices",
        "/api/data/v9.2/accounts\\",
        "/api/data/v9.2/%5c..%5c..%5cXRMServices",
        "/api/data/v9.2/%255c..%255cx",
        "/api/data//v9.2/accounts",
        "/api/data/v9.2/accounts//",
        "/api/data/v9.2/%2f%2fevil.example/accounts",
        "/api/data/v9.2/accounts;/../../x",
        "/api/data/v9.2/accounts%00",
        "/api/data/v9.2/accounts%0d%0aX-Injected:%201",
        "/api/data/v9.2/%u002e%u002e/%u002e%u002e/%u002e%u002e/XRMServices",
        "/api/data/v9.2/%c0%ae%c0%ae/%c0%ae%c0%ae/x",
        "/api/data/v9.2/accounts%",
        "/api/data/v9.2/accounts%zz",
    ] {
        let answer = raw_get(&env, target, &token, "").await;
        assert_refused(&env, target, &answer, &ambiguous, &token, 0);
    }
    let not_proxied = refusal(404, "NotProxied", "only paths under /api/data/");
    for target in [
        "/API/DATA/v9.2/accounts",
        "/api/data",
        "/api/datax/v9.2/accounts",
        "/XRMServices/2011/Organization.svc",
    ] {
        let answer = raw_get(&env, target, &token, "").await;
        assert_refused(&env, target, &answer, &not_proxied, &token, 0);
    }
}

/// An encoded slash is one segment to the gateway and two to a front end that decodes it
/// before routing: `accounts(1)%2Fcontact_customer_accounts` would be decided as a read of
/// accounts and answered with contacts. Refused in the path in any case and encoding (as
/// `%5C` is); in the query it stays data.
#[tokio::test]
async fn encoded_slashes_in_the_path_are_400_and_never_forwarded() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let ambiguous = refusal(400, "AmbiguousPath", "encoded slash (`%2F`)");
    for target in [
        "/api/data/v9.2/accounts(1)%2Fcontact_customer_accounts",
        "/api/data/v9.2/accounts(1)%2fcontact_customer_accounts",
        "/api/data/v9.2/accounts%281%29%2Fprimarycontactid",
        "/api/data/v9.2/accounts%2Fcontacts",
        "/api/data/v9.2/accounts(name='a%2Fb')",
        "/api/data%2Fv9.2/accounts",
        "/api/data/v9.2/accounts(1)%252Fcontact_customer_accounts",
        "/api/data/v9.2/accounts(1)%252fcontact_customer_accounts",
        "/api/data/v9.2/accounts(1)%25252Fcontact_customer_accounts",
    ] {
        let answer = raw_get(&env, target, &token, "").await;
        assert_refused(&env, target, &answer, &ambiguous, &token, 0);
    }
    let query = "/api/data/v9.2/accounts?$filter=name%20eq%20'a%2Fb'";
    let answer = raw_get(&env, query, &token, "").await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = env.dataverse.requests();
    assert_eq!(seen.len(), 1, "only the query with %2F reached Dataverse");
    assert_eq!(seen[0].path_and_query, query);
}

#[tokio::test]
async fn query_strings_full_of_quotes_and_escapes_pass_byte_for_byte() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    for target in [
        "/api/data/v9.2/accounts?$filter=name%20eq%20'O''Neil'%20and%20(revenue%20gt%2010)&$select=name,accountid",
        "/api/data/v9.2/accounts?$filter=contains(name,%27%25x%27)%20or%20name%20eq%20%22q%22",
        "/api/data/v9.2/accounts?$select=name&$skiptoken=%253Ccookie%2520pagenumber%253D%25222%2522%2520pagingcookie%253D%2522%25253ccookie%252520page%25253d%2525221%252522%25253e%2522%2520%252F%253E",
        "/api/data/v9.2/accounts?$filter=name%20eq%20'..%2F..%2F'&x=%2e%2e/../%5c\\//",
        "/api/data/v9.2/accounts?fetchXml=%3Cfetch%3E%3Centity%20name='account'%3E%3C/entity%3E%3C/fetch%3E",
        "/api/data/v9.2/accounts?$filter=name%20eq%20'{a}|^`[]'&$top=1&&=&a==b?c",
        "/api/data/v9.2/accounts?$filter=name%20eq%20'caf\u{e9}%20\u{1f600}'",
    ] {
        let before = env.dataverse.request_count();
        let answer = raw_get(&env, target, &token, "").await;
        assert!(
            !answer.body.contains("DynamicsGateway."),
            "{target}: the gateway refused it: {answer:?}"
        );
        let seen = env.dataverse.requests();
        assert_eq!(seen.len(), before + 1, "{target}");
        assert_eq!(seen.last().unwrap().path_and_query, target, "byte for byte");
    }
}

// ---------------------------------------------------------------------------------------
// Identity lookup injection

/// The lookup the gateway must send for `filter`: every byte but RFC 3986 unreserved ones
/// percent-encoded.
fn expected_lookup(filter: &str) -> String {
    let encoded: String = filter
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("/api/data/v9.2/systemusers?$select=systemuserid,isdisabled&$filter={encoded}")
}

fn token_with(env: &Env, claim: &str, value: &str) -> String {
    let mut claims = env.idp.claims_for(ALICE_OID);
    claims[claim] = json!(value);
    env.idp.sign(claims)
}

#[tokio::test]
async fn email_lookup_escapes_hostile_values_so_only_the_exact_value_can_match() {
    let env = env()
        .identity("identity:\n  mode: lookup\n  claim: upn\n  lookup: { attribute: internalemailaddress }\n")
        .start()
        .await;
    let oneil = DirectoryUser::new(
        "0a0a0a0a-0000-4000-8000-000000000001",
        "o'neil@contoso.example",
    );
    let zoe = DirectoryUser::new(
        "0a0a0a0a-0000-4000-8000-000000000002",
        "zo\u{eb}@contoso.example",
    );
    env.dataverse.add_user(oneil.clone());
    env.dataverse.add_user(zoe.clone());

    // Each would match exactly one user (Alice) if the literal were not escaped.
    let hostile = [
        format!("x' or internalemailaddress eq '{ALICE_EMAIL}"),
        format!("x') or (internalemailaddress eq '{ALICE_EMAIL}"),
        format!("{ALICE_EMAIL}' or 'a' eq 'b"),
        format!("' or internalemailaddress eq '{ALICE_EMAIL}' or ''='"),
        format!("%27 or internalemailaddress eq %27{ALICE_EMAIL}"),
        format!("{ALICE_EMAIL}%27"),
        format!("{ALICE_EMAIL} or internalemailaddress ne null"),
        format!("x'&$filter=internalemailaddress eq '{ALICE_EMAIL}"),
        "\u{ff41}lice@contoso.example".to_string(),
        format!("{ALICE_EMAIL}\u{202e}"),
        "zoe@contoso.example".to_string(),
    ];
    for value in &hostile {
        let before = env.dataverse.request_count();
        let answer = get(&env, WHOAMI, &token_with(&env, "upn", value)).await;
        assert_refused(
            &env,
            value,
            &answer,
            &refusal(403, "CallerNotMapped", "no Dynamics user matches"),
            "",
            before + 1,
        );
        let lookup = env.dataverse.requests().pop().unwrap();
        let literal = format!("internalemailaddress eq '{}'", value.replace('\'', "''"));
        assert_eq!(lookup.path_and_query, expected_lookup(&literal), "{value}");
        assert!(impersonation_headers(&lookup).is_empty(), "{value}");
    }
    // The exact values match exactly their user.
    for (value, user) in [
        ("o'neil@contoso.example", &oneil),
        ("zo\u{eb}@contoso.example", &zoe),
        (ALICE_EMAIL, &env.alice),
    ] {
        let answer = get(&env, WHOAMI, &token_with(&env, "upn", value)).await;
        assert_eq!(answer.status, 200, "{value}: {answer:?}");
        let who: Value = serde_json::from_str(&answer.body).unwrap();
        assert_eq!(who["UserId"], user.systemuserid.as_str(), "{value}");
        let seen = env.dataverse.requests();
        let lookup = &seen[seen.len() - 2];
        let literal = format!("internalemailaddress eq '{}'", value.replace('\'', "''"));
        assert_eq!(lookup.path_and_query, expected_lookup(&literal), "{value}");
        assert_eq!(
            seen.last().unwrap().header("mscrmcallerid"),
            Some(user.systemuserid.as_str())
        );
    }
}

#[tokio::test]
async fn object_id_lookup_refuses_claims_that_are_not_guids_before_any_lookup() {
    let env = env()
        .identity("identity:\n  mode: lookup\n  claim: oid\n  lookup: { attribute: azureactivedirectoryobjectid }\n")
        .start()
        .await;
    for value in [
        "' or 1 eq 1 or ''='".to_string(),
        format!("{ALICE_OID} or true"),
        format!("{ALICE_OID}) or (true"),
        format!("{ALICE_OID}'"),
        format!("{ALICE_OID}%27"),
        format!("'{ALICE_OID}'"),
        format!("{ALICE_OID} "),
        ALICE_OID.replace('9', "\u{ff19}"),
        ALICE_OID.replace('-', "\u{2010}"),
        "alice@contoso.example".to_string(),
    ] {
        let lookups = env.dataverse.systemuser_lookups();
        let answer = get(&env, WHOAMI, &token_with(&env, "oid", &value)).await;
        assert_refused(
            &env,
            &value,
            &answer,
            &refusal(403, "CallerNotMapped", "not an Azure AD object id"),
            "",
            0,
        );
        assert_eq!(env.dataverse.systemuser_lookups(), lookups, "{value}");
    }
    // A GUID in another spelling is the same GUID: looked up in canonical form.
    let answer = get(
        &env,
        WHOAMI,
        &token_with(&env, "oid", &ALICE_OID.to_uppercase()),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = env.dataverse.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].path_and_query,
        format!("/api/data/v9.2/systemusers(azureactivedirectoryobjectid={ALICE_OID})?$select=systemuserid,isdisabled")
    );
    assert_eq!(
        seen[1].header("mscrmcallerid"),
        Some(support::ALICE_SYSTEMUSERID)
    );
}

// ---------------------------------------------------------------------------------------
// Methods and metric labels

#[tokio::test]
async fn methods_outside_the_web_api_are_405_before_authentication_and_never_forwarded() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let before = env.dataverse.requests().len();
    for method in [
        "TRACE",
        "PROPFIND",
        "MERGE",
        "OPTIONS",
        "get",
        "X-TOKEN-LIKE-12345",
    ] {
        for bearer in ["", token.as_str()] {
            let auth = if bearer.is_empty() {
                String::new()
            } else {
                format!("Authorization: Bearer {bearer}\r\n")
            };
            let raw = raw_request(
                env.gateway.addr,
                format!(
                    "{method} {ACCOUNTS} HTTP/1.1\r\nHost: gw\r\n{auth}Connection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
            let answer = Answer::from_raw(&raw);
            assert_eq!(answer.status, 405, "{method}: {raw}");
            assert!(
                raw.to_ascii_lowercase()
                    .contains("allow: get, head, post, patch, put, delete"),
                "{method}: the 405 names the methods: {raw}"
            );
            assert!(
                answer.body.contains("DynamicsGateway.MethodNotAllowed"),
                "{raw}"
            );
        }
    }
    // CONNECT, in authority form, is refused the same way.
    let raw = raw_request(
        env.gateway.addr,
        b"CONNECT dataverse.example:443 HTTP/1.1\r\nHost: dataverse.example:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        raw.starts_with("HTTP/1.1 405") || raw.starts_with("HTTP/1.1 400"),
        "{raw}"
    );
    assert_eq!(
        env.dataverse.requests().len(),
        before,
        "no refused method reaches Dataverse"
    );
}

#[tokio::test]
async fn invented_methods_never_become_metric_series() {
    let env = env().start().await;
    let scrape = || async { support::metrics_text(&env.gateway.admin_url()).await };
    let series = |text: &str, name: &str| {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .count()
    };
    // Warm up the fixed label values this test can produce.
    let _ = raw_request(
        env.gateway.addr,
        format!("GET {ACCOUNTS} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let _ = raw_request(
        env.gateway.addr,
        format!("BREW0 {ACCOUNTS} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    // A request with a valid token whose path names an environment of the caller's choosing.
    let token = env.idp.token_for(ALICE_OID);
    let invented_environment = |i: usize| {
        format!(
            "GET /tenant{i}{ACCOUNTS} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
    };
    let _ = raw_request(env.gateway.addr, invented_environment(0).as_bytes()).await;
    let before = scrape().await;
    let long = "M".repeat(4000);
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let addr = env.gateway.addr;
            let request = if i % 3 == 0 {
                invented_environment(i)
            } else {
                let method = if i % 10 == 1 {
                    format!("{long}{i}")
                } else {
                    format!("BREW{i}")
                };
                format!("{method} {ACCOUNTS} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            };
            tokio::spawn(async move { (i, raw_request(addr, request.as_bytes()).await) })
        })
        .collect();
    for task in tasks {
        let (i, raw) = task.await.unwrap();
        let expected = if i % 3 == 0 { "404" } else { "405" };
        assert!(raw.starts_with(&format!("HTTP/1.1 {expected}")), "{raw}");
    }
    let after = scrape().await;
    for name in [
        "dynamics_gateway_requests_total",
        "dynamics_gateway_request_duration_seconds_count",
    ] {
        assert_eq!(
            series(&after, name),
            series(&before, name),
            "300 invented methods added no {name} series"
        );
    }
    assert!(after.contains("method=\"other\""), "{after}");
    assert!(!after.contains("BREW"), "no method text becomes a label");
    assert!(!after.contains("tenant1"), "no path text becomes a label");
    // Every environment label is the configured one, or `none` for requests refused before routing.
    let environments: std::collections::BTreeSet<&str> = after
        .split("environment=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert_eq!(
        environments,
        ["default", "none"].into_iter().collect(),
        "{after}"
    );
    assert!(
        after.contains(
            "dynamics_gateway_requests_total{environment=\"none\",method=\"GET\",status=\"404\"} 101"
        ),
        "{after}"
    );
    assert!(
        after.len() < before.len() + 1024,
        "the scrape did not grow: {} -> {} bytes",
        before.len(),
        after.len()
    );
}

#[tokio::test]
async fn statuses_dataverse_invents_do_not_become_metric_series() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    for status in [299u16, 477, 599, 799, 999] {
        env.dataverse.respond_next(1, status, vec![], "{}");
        let answer = get(&env, ACCOUNTS, &token).await;
        assert_eq!(answer.status, status, "the status itself passes through");
    }
    let text = support::metrics_text(&env.gateway.admin_url()).await;
    for status in ["299", "477", "599", "799", "999"] {
        assert!(
            !text.contains(&format!("status=\"{status}\"")),
            "{status} is not a label"
        );
    }
    assert!(
        text.contains(
            "dynamics_gateway_requests_total{environment=\"default\",method=\"GET\",status=\"other\"} 5"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_bad_host_is_400_before_any_identity_lookup_or_upstream_call() {
    let env = env()
        .identity("identity:\n  mode: lookup\n  claim: oid\n")
        .start()
        .await;
    let token = env.idp.token_for(ALICE_OID);
    for host in ["bad host", "gw.example/path", "user@gw.example", ""] {
        let answer = raw_request(
            env.gateway.addr,
            format!("GET {ACCOUNTS} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{host:?}: {answer}");
    }
    assert_eq!(
        env.dataverse.systemuser_lookups(),
        0,
        "a lookup for a request that is refused"
    );
    assert_eq!(env.dataverse.request_count(), 0);
}
