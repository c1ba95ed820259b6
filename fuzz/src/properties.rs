//! The fuzz targets' bodies: one `fuzz_<target>(data)` per target, each asserting
//! properties of the gateway code that parses untrusted input (not just "does not
//! panic"). Shared, as the one copy, by the libFuzzer targets in `fuzz/fuzz_targets/`
//! and by the main crate's `tests/e2e/fuzz_corpus.rs`, which replays the committed seeds.
//!
//! Targets and what they assert:
//! - `jwt`: `UnverifiedToken::parse` never panics, refuses anything over 16 KiB, and
//!   what it accepts has three parts whose header/payload decode to what it reports;
//!   `algorithm` only ever returns an allowed algorithm spelled exactly so; error text
//!   quoting the token is sanitised; `verify` with a key the input cannot know fails.
//! - `path`: whatever `proxied_path_and_query` accepts starts with `/api/data/`, is the
//!   request's own path and query, and has no `.`/`..` segment, backslash, `//` or control
//!   byte as written or after each of up to 3 percent-decodings; prefixed to the
//!   Dataverse origin it still names that host and that path.
//! - `filter`: a string attribute's literal parses back (undoubling `''`) to exactly the
//!   input and no `'` ends it early; a GUID attribute accepts only GUIDs, written as a
//!   bare lowercase hyphenated GUID.
//! - `json_links` / `batch_links`: for several `from`/`to` pairs, the streaming rewriter
//!   fed in arbitrary chunks equals the whole-buffer output; input without `from` comes
//!   out unchanged; when `to` does not occur in the input, rewriting the output back with
//!   the pair swapped restores the input; a finished rewriter can be reused; valid JSON
//!   stays valid JSON. `$batch` requests (boundary `batch`) are also checked: refused in
//!   one chunking means refused in every chunking, and what is accepted has no part header
//!   that names an identity, credential, cookie or method override.
//! - `json_access`: the access checks of a request body never change its bytes, decide
//!   the same in every chunking, and agree with serde_json's reading on top-level deep
//!   inserts and binds of a table the rule does not grant.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use dynamics_gateway::access::{
    AccessPolicy, AccessRequest, Grant, ImpersonationPolicy, Metadata, RawAccess,
};
use dynamics_gateway::config::LookupAttribute;
use dynamics_gateway::identity::lookup::filter;
use dynamics_gateway::inbound::jwt::{ClaimRules, PublicKey, UnverifiedToken, MAX_TOKEN_BYTES};
use dynamics_gateway::inbound::AuthError;
use dynamics_gateway::inbound::CallerKind;
use dynamics_gateway::request_target::{proxied_path_and_query, API_PREFIX};
use dynamics_gateway::upstream::batch_parts::PartRules;
use dynamics_gateway::upstream::link_body::ChunkRewriter;
use dynamics_gateway::upstream::odata_links::{
    rewrite_batch_request, rewrite_batch_response, rewrite_json, BatchLinkRewriter, JsonKeys,
    JsonLinkRewriter, LinkRewrite,
};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: [(&str, Target); 7] = [
    ("jwt", fuzz_jwt),
    ("path", fuzz_path),
    ("filter", fuzz_filter),
    ("json_links", fuzz_json_links),
    ("batch_links", fuzz_batch_links),
    ("query_options", fuzz_query_options),
    ("json_access", fuzz_json_access),
];

// ---------------------------------------------------------------------------------------
// json_access

/// The access checks of a `POST accounts` body under a rule granting only that, with the
/// CSDL fixture: reading the body never changes a byte of it; the decision is the same in
/// every chunking; and against serde_json's reading of valid JSON, a deep insert or bind
/// of contacts at the top level is always refused, a flat object of scalars never.
pub fn fuzz_json_access(data: &[u8]) {
    let yaml = "default: deny
rules:
  - name: creators
    when: {}
    allow: { methods: [POST], entity_sets: [accounts] }
";
    let raw: RawAccess = serde_norway::from_str(yaml).unwrap();
    let policy = AccessPolicy::from_raw(raw, "access").unwrap();
    let metadata = std::sync::Arc::new(
        Metadata::from_reader(include_str!("../../tests/fixtures/csdl.xml").as_bytes()).unwrap(),
    );
    let claims = serde_json::Map::new();
    let request = AccessRequest {
        method: &http::Method::POST,
        path: "/api/data/v9.2/accounts",
        query: "",
        target: &dynamics_gateway::access::Target::from_path("/api/data/v9.2/accounts"),
        metadata: Some(&metadata),
        claims: &claims,
        issuer: "fuzz",
        tenant: None,
        kind: CallerKind::User,
        stored_query_table: None,
    };
    let grant = policy.decide(&request).unwrap();
    let access = policy.body_access(&request, &grant).unwrap();
    let rewrite = LinkRewrite::new("http://localhost:8080", "https://contoso.crm.dynamics.com");
    let plain = rewrite_json(&rewrite, JsonKeys::RequestBinds, data);
    let run = |chunks: &[&[u8]]| {
        let inspector = access.inspector().unwrap();
        let mut r = JsonLinkRewriter::inspected(rewrite.clone(), inspector);
        let mut out = Vec::new();
        let mut refused = None;
        for c in chunks {
            r.push(c, &mut out);
            if refused.is_none() {
                refused = r.refusal().map(|d| d.message.clone());
            }
        }
        r.finish(&mut out);
        (out, refused)
    };
    let (out, refused) = run(&[data]);
    assert_eq!(out, plain, "reading the body changed it");
    for chunks in splits(data) {
        assert_eq!(
            run(&chunks),
            (out.clone(), refused.clone()),
            "chunking changed the decision"
        );
    }
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let has_object = |v: &Value| match v {
        Value::Object(_) => true,
        Value::Array(items) => items.iter().any(Value::is_object),
        _ => false,
    };
    let contacts = body.iter().any(|(key, value)| {
        (matches!(
            key.as_str(),
            "primarycontactid" | "contact_customer_accounts"
        ) && has_object(value))
            || (key.ends_with("@odata.bind")
                && value.as_str().is_some_and(|v| v.starts_with("contacts(")))
    });
    if contacts {
        assert!(
            refused.is_some(),
            "a deep insert or bind of contacts passed"
        );
    }
    if body.values().all(|v| !v.is_object() && !v.is_array())
        && body.keys().all(|k| !k.contains('@'))
    {
        assert_eq!(refused, None, "a flat record was refused");
    }
}

// ---------------------------------------------------------------------------------------
// query_options

/// The OData query-option parser the access rules read tables from: total on any input,
/// nesting bounded, and every path it reports made of non-empty segments without `/`.
pub fn fuzz_query_options(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let options = dynamics_gateway::access::odata::parse_query(&text);
    check_options(&options, 0);
    // The same text as a bare expression.
    if let Some(paths) = dynamics_gateway::access::odata::expression_paths(&text) {
        for path in paths {
            assert!(
                path.iter().all(|s| !s.is_empty() && !s.contains('/')),
                "{path:?}"
            );
        }
    }
}

fn check_options(options: &dynamics_gateway::access::odata::QueryOptions, depth: usize) {
    assert!(
        depth <= dynamics_gateway::access::odata::MAX_DEPTH,
        "nested deeper than the bound"
    );
    for (_, path) in &options.paths {
        assert!(!path.is_empty() && path.iter().all(|s| !s.is_empty() && !s.contains('/')));
    }
    for expand in &options.expand {
        assert!(expand
            .path
            .iter()
            .all(|s| !s.is_empty() && !s.contains('/')));
        check_options(&expand.options, depth + 1);
    }
}

// ---------------------------------------------------------------------------------------
// jwt

/// The algorithms an issuer may allow (`inbound.issuers[].algorithms`).
const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// The input three ways: as the raw token; as `header JSON \n payload JSON \n signature`
/// base64url-encoded into a token (so mutations reach the JSON parsing); and padded past
/// the size limit.
pub fn fuzz_jwt(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    check_token(&raw);

    let mut parts = data.splitn(3, |&b| b == b'\n');
    let header = parts.next().unwrap_or_default();
    let payload = parts.next().unwrap_or_default();
    let signature = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let built = format!(
        "{}.{}.{signature}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    check_token(&built);

    let padding = (MAX_TOKEN_BYTES + 1).saturating_sub(built.len());
    let oversized = format!("{built}{}", "A".repeat(padding));
    assert!(
        matches!(
            UnverifiedToken::parse(&oversized),
            Err(AuthError::TooLarge { .. })
        ),
        "a token of {} bytes was not refused as too large",
        oversized.len()
    );
}

fn check_token(token: &str) {
    let parsed = UnverifiedToken::parse(token);
    if token.len() > MAX_TOKEN_BYTES {
        assert!(
            matches!(parsed, Err(AuthError::TooLarge { .. })),
            "oversized token not refused"
        );
        return;
    }
    let Ok(unverified) = parsed else {
        return;
    };
    let segments: Vec<&str> = token.split('.').collect();
    assert_eq!(segments.len(), 3, "accepted a token without three parts");
    for segment in &segments[..2] {
        let bytes = URL_SAFE_NO_PAD
            .decode(segment)
            .expect("accepted a segment that is not base64url");
        assert_eq!(
            bytes.iter().find(|b| !b.is_ascii_whitespace()),
            Some(&b'{'),
            "accepted a header or payload that is not a JSON object"
        );
    }
    // serde_json's Value refuses some input the peek skips over in fields it ignores
    // (`1e400`, invalid UTF-8 in an unknown string): compare only what it can read.
    if let Some(payload) = decode_json(segments[1]) {
        assert_eq!(
            payload.get("iss").and_then(Value::as_str),
            Some(unverified.issuer()),
            "issuer differs from the payload's iss"
        );
    }
    let header = decode_json(segments[0]);
    if let Some(header) = &header {
        assert!(
            header.get("crit").is_none_or(Value::is_null),
            "accepted a crit header"
        );
        assert_eq!(
            header.get("kid").and_then(Value::as_str),
            unverified.kid(),
            "kid differs from the header's kid"
        );
    }
    // The header's alg as JSON reads it (None: unreadable, not compared).
    let alg_text = header
        .as_ref()
        .map(|h| h.get("alg").and_then(Value::as_str).unwrap_or_default());
    match unverified.algorithm(&ASYMMETRIC) {
        Ok(alg) => {
            assert!(ASYMMETRIC.contains(&alg), "{alg:?} is not allowed");
            if let Some(text) = alg_text {
                assert_eq!(
                    text,
                    format!("{alg:?}"),
                    "algorithm accepted from a different spelling"
                );
            }
        }
        Err(AuthError::DisallowedAlgorithm(shown)) => assert_sanitised(&shown),
        Err(e) => panic!("algorithm() failed with {e:?}"),
    }
    // Only HS256 allowed: "none" in any case, or anything else, must never pass.
    if let Ok(alg) = unverified.algorithm(&[Algorithm::HS256]) {
        assert_eq!(alg, Algorithm::HS256);
        assert!(alg_text.is_none_or(|t| t == "HS256"), "{alg_text:?}");
    }
    // Up to the signature check and through it: a key the input cannot know never
    // verifies (an RSA modulus with no known factors, parsed for every algorithm).
    let Ok(alg) = unverified.algorithm(&ASYMMETRIC) else {
        return;
    };
    let key = DecodingKey::from_rsa_raw_components(&[0xc5; 256], &[1, 0, 1]);
    let key = PublicKey::new(&key, &ASYMMETRIC).expect("an RSA key is not symmetric");
    let rules = ClaimRules {
        issuer: None,
        audiences: Vec::new(),
        leeway: 0,
    };
    match unverified.verify(&key, alg, &rules) {
        Ok(_) => panic!("a token verified against a key it cannot know"),
        Err(AuthError::MissingClaim(c) | AuthError::InvalidClaim(c)) => assert_sanitised(&c),
        Err(AuthError::DisallowedAlgorithm(shown)) => assert_sanitised(&shown),
        Err(_) => {}
    }
}

fn decode_json(segment: &str) -> Option<Value> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).ok()?).ok()
}

/// Token text quoted in an error message: short, and only `[A-Za-z0-9_.-]`.
fn assert_sanitised(shown: &str) {
    assert!(shown.len() <= 32, "unsanitised error text {shown:?}");
    assert!(
        shown
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')),
        "unsanitised error text {shown:?}"
    );
}

// ---------------------------------------------------------------------------------------
// path

/// The input as a request target, as written and with `/api/data/` in front (so
/// mutations spend their time below the prefix).
pub fn fuzz_path(data: &[u8]) {
    check_target(data);
    check_target(&[API_PREFIX.as_bytes(), data].concat());
}

fn check_target(target: &[u8]) {
    let Ok(uri) = http::Uri::try_from(target) else {
        return;
    };
    let Ok(pq) = proxied_path_and_query(&uri) else {
        return;
    };
    assert!(pq.starts_with(API_PREFIX), "accepted {pq:?}");
    let own = uri.path_and_query().map(|p| p.as_str()).unwrap_or_default();
    assert_eq!(
        pq, own,
        "forwarded something other than the request's path and query"
    );
    let path = uri.path();
    assert!(pq.starts_with(path));

    let mut current = path.as_bytes().to_vec();
    for round in 0..=3 {
        let unambiguous = current.starts_with(API_PREFIX.as_bytes())
            && !current.contains(&b'\\')
            && !current.windows(2).any(|w| w == b"//")
            && !current.iter().any(|&b| b < 0x20 || b == 0x7f)
            && !current
                .windows(3)
                .any(|w| w[0] == b'%' && w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f'))
            && !current
                .split(|&b| b == b'/')
                .any(|seg| seg == b"." || seg == b"..");
        assert!(
            unambiguous,
            "accepted {path:?}, which after {round} percent-decodings is {:?}",
            String::from_utf8_lossy(&current)
        );
        current = percent_decode(&current);
    }

    // What the forwarder sends: the Dataverse origin followed by exactly this.
    let upstream: http::Uri = format!("https://contoso.crm.dynamics.com{pq}")
        .parse()
        .expect("accepted path and query do not make an upstream URI");
    assert_eq!(
        upstream.authority().map(|a| a.as_str()),
        Some("contoso.crm.dynamics.com")
    );
    assert_eq!(upstream.path(), path);
}

/// Byte-wise percent-decoding (independent of the gateway's UTF-8 lossy one).
fn percent_decode(s: &[u8]) -> Vec<u8> {
    fn hex(b: u8) -> Option<u8> {
        char::from(b)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let (Some(h), Some(l)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------
// filter

/// The input as a claim value, for every lookup attribute.
pub fn fuzz_filter(data: &[u8]) {
    let value = String::from_utf8_lossy(data);
    for attribute in [
        LookupAttribute::InternalEmailAddress,
        LookupAttribute::DomainName,
    ] {
        let f = filter(attribute, &value).expect("a string attribute refused a value");
        let literal = f
            .strip_prefix(attribute.name())
            .and_then(|rest| rest.strip_prefix(" eq "))
            .unwrap_or_else(|| panic!("filter {f:?} is not `{} eq ...`", attribute.name()));
        assert_eq!(
            parse_string_literal(literal).as_deref(),
            Some(&*value),
            "literal {literal:?} does not parse back to the value"
        );
    }

    let attribute = LookupAttribute::AzureActiveDirectoryObjectId;
    if let Ok(f) = filter(attribute, &value) {
        let id = uuid::Uuid::try_parse(&value).expect("a GUID attribute accepted a non-GUID");
        assert_eq!(
            f,
            format!("{} eq {}", attribute.name(), id.hyphenated()),
            "GUID filter is not the bare hyphenated GUID"
        );
        let literal = &f[attribute.name().len() + 4..];
        assert!(
            literal.len() == 36
                && literal
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f' | b'-')),
            "GUID literal {literal:?}"
        );
    }
}

/// An OData single-quoted string literal that must make up all of `literal`: `''` is one
/// quote, and a lone `'` may only be the closing one at the very end.
fn parse_string_literal(literal: &str) -> Option<String> {
    let inner = literal.strip_prefix('\'')?;
    let mut out = String::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' {
            out.push(c);
        } else if chars.peek() == Some(&'\'') {
            chars.next();
            out.push('\'');
        } else {
            // The closing quote: nothing may follow it.
            return chars.next().is_none().then_some(out);
        }
    }
    None // never closed
}

// ---------------------------------------------------------------------------------------
// json_links / batch_links

/// `from` -> `to` pairs as the gateway uses them: Dataverse origin <-> public base, with
/// and without a path, and one whose `to` extends `from`.
const PAIRS: [(&str, &str); 5] = [
    ("https://contoso.crm.dynamics.com", "http://localhost:8080"),
    ("http://localhost:8080", "https://contoso.crm.dynamics.com"),
    (
        "https://org.crm4.dynamics.com",
        "https://gw.example/dataverse",
    ),
    (
        "https://gw.example/dataverse",
        "https://org.crm4.dynamics.com",
    ),
    ("https://a.example", "https://a.example/x"),
];

/// Fed in every chunking, a fresh rewriter gives the whole-buffer output `out` (or, for a
/// refused `$batch` request, is refused too), and after `finish` (which resets it) the same
/// rewriter gives it again.
fn check_chunked(data: &[u8], out: Option<&[u8]>, what: &str, make: impl Fn() -> ChunkRewriter) {
    let run = |r: &mut ChunkRewriter, chunks: &[&[u8]]| -> Option<Vec<u8>> {
        let mut chunked = Vec::new();
        for c in chunks {
            r.push(c, &mut chunked).ok()?;
        }
        r.finish(&mut chunked).ok()?;
        Some(chunked)
    };
    for (i, chunks) in splits(data).into_iter().enumerate() {
        let mut r = make();
        let chunked = run(&mut r, &chunks);
        assert_eq!(chunked.as_deref(), out, "chunked output differs ({what})");
        if i == 0 {
            let mut r = make();
            let _ = run(&mut r, &[data]);
            let again = run(&mut r, &[data]);
            assert_eq!(again.as_deref(), out, "reused rewriter differs ({what})");
        }
    }
}

/// The input as a JSON body, for every pair and key set.
pub fn fuzz_json_links(data: &[u8]) {
    for (from, to) in PAIRS {
        let rewrite = LinkRewrite::new(from, to);
        for keys in [JsonKeys::ResponseLinks, JsonKeys::RequestBinds] {
            let run = |rw: &LinkRewrite, body: &[u8]| rewrite_json(rw, keys, body);
            let out = run(&rewrite, data);
            check_rewrite(&rewrite, data, &out, run);
            check_chunked(
                data,
                Some(&out),
                &format!("{keys:?}, {from} -> {to}"),
                || ChunkRewriter::Json(JsonLinkRewriter::new(rewrite.clone(), keys)),
            );
            if serde_json::from_slice::<Value>(data).is_ok() {
                assert!(
                    serde_json::from_slice::<Value>(&out).is_ok(),
                    "valid JSON rewritten into invalid JSON"
                );
            }
        }
    }
}

/// The grant and boundary the `$batch` request checks run with: no control header allowed.
fn part_rules() -> PartRules {
    let grant = Grant {
        rule: "fuzz".into(),
        impersonation: ImpersonationPolicy::Required,
        control_headers: Vec::new().into(),
    };
    PartRules::new(grant, b"batch".to_vec(), 64 * 1024)
}

/// Header names a part may never carry on, however spelled.
const CALLER_ONLY: [&str; 8] = [
    "callerobjectid",
    "mscrmcallerid",
    "mscrmcallerobjectid",
    "authorization",
    "cookie",
    "xhttpmethod",
    "xhttpmethodoverride",
    "xmethodoverride",
];

/// The input as a `$batch` body, for every pair and both directions.
pub fn fuzz_batch_links(data: &[u8]) {
    for (from, to) in PAIRS {
        let rewrite = LinkRewrite::new(from, to);
        let out = rewrite_batch_response(&rewrite, data);
        check_rewrite(&rewrite, data, &out, rewrite_batch_response);
        check_chunked(
            data,
            Some(&out),
            &format!("Response, {from} -> {to}"),
            || ChunkRewriter::Batch(BatchLinkRewriter::response(rewrite.clone())),
        );

        let rules = part_rules();
        let request = rewrite_batch_request(&rewrite, &rules, data).ok();
        check_chunked(
            data,
            request.as_deref(),
            &format!("Request, {from} -> {to}"),
            || ChunkRewriter::Batch(BatchLinkRewriter::request(rewrite.clone(), rules.clone())),
        );
        let Some(out) = request else { continue };
        for line in out.split(|&b| b == b'\n') {
            let name: String = line
                .split(|&b| b == b':')
                .next()
                .unwrap_or_default()
                .iter()
                .filter(|b| b.is_ascii_alphanumeric())
                .map(|b| char::from(b.to_ascii_lowercase()))
                .collect();
            assert!(
                !(line.contains(&b':') && CALLER_ONLY.contains(&name.as_str())),
                "accepted a part header {:?}",
                String::from_utf8_lossy(line)
            );
        }
        // Control headers are dropped and Host values rewritten, so the round trips below
        // hold only for bodies without them.
        if !contains_ci(data, b"mscrm") && !contains_ci(data, b"host") {
            check_rewrite(&rewrite, data, &out, |rw, body| {
                rewrite_batch_request(rw, &rules, body).unwrap_or_default()
            });
        }
    }
}

fn contains_ci(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Shared by both rewriters: unchanged without `from`, and undone by the swapped pair when
/// `to` was not there to begin with.
fn check_rewrite(
    rewrite: &LinkRewrite,
    input: &[u8],
    out: &[u8],
    run: impl Fn(&LinkRewrite, &[u8]) -> Vec<u8>,
) {
    // Origins match without case in request lines: compare the same way.
    if !contains_any_ci(input, &forms(rewrite.from())) {
        assert_eq!(out, input, "changed a body that does not contain `from`");
    }
    // A `from` written in another case comes back in `from`'s own case: not a round trip.
    let same_case = forms(rewrite.from())
        .iter()
        .all(|f| count(input, f, false) == count(input, f, true));
    if !contains_any_ci(input, &forms(rewrite.to())) && same_case {
        let back = run(&rewrite.reversed(), out);
        assert_eq!(
            back, input,
            "swapping `from`/`to` back does not restore the input"
        );
    }
}

/// How a URL prefix can appear in a body: raw (headers, request lines), JSON-escaped,
/// and JSON-escaped with `\/` slashes. (The pairs above need no other JSON escaping.)
fn forms(url: &str) -> [Vec<u8>; 2] {
    [
        url.as_bytes().to_vec(),
        url.replace('/', "\\/").into_bytes(),
    ]
}

/// Occurrences of `needle`, with or without case.
fn count(haystack: &[u8], needle: &[u8], ignore_case: bool) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| {
            if ignore_case {
                w.eq_ignore_ascii_case(needle)
            } else {
                *w == needle
            }
        })
        .count()
}

fn contains_any_ci(haystack: &[u8], needles: &[Vec<u8>]) -> bool {
    needles.iter().any(|n| contains_ci(haystack, n))
}

/// Chunkings of `data` chosen from its own bytes (deterministic, so a crash replays):
/// one byte at a time, a few pseudo-random splits into two, and a few into many.
fn splits(data: &[u8]) -> Vec<Vec<&[u8]>> {
    let mut all = vec![data.chunks(1).collect::<Vec<_>>()];
    // FNV-1a of the data seeds an xorshift.
    let mut state = data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    let mut next = move |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        usize::try_from(state % u64::try_from(bound.max(1)).unwrap_or(1)).unwrap_or(0)
    };
    for _ in 0..3 {
        let (a, b) = data.split_at(next(data.len() + 1));
        all.push(vec![a, b]);
    }
    for max in [3, 17, 200] {
        let mut chunks = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let (a, b) = rest.split_at((next(max) + 1).min(rest.len()));
            chunks.push(a);
            rest = b;
        }
        all.push(chunks);
    }
    all
}
