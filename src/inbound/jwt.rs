//! One JWT, before and after its signature is checked. Parsing reads each segment once:
//! one base64url decode and one JSON pass that builds the claims and refuses duplicate
//! member names at every depth. Before the signature check only `iss`, `tid`, `alg` and
//! `kid` are looked at, to choose the issuer and key; nothing else is trusted until the
//! signature is. `jku`, `x5u` and `jwk` headers are never used to find keys, so a token
//! cannot point the gateway at keys of its choosing.
//!
//! The checks after parsing are the ones `jsonwebtoken::decode` made when the gateway
//! called it, in the same order and with the same outcome for every token (the unit
//! tests compare both on hostile tokens); they live here so that the key is parsed once
//! per JWKS key rather than once per token, and the segments are decoded and parsed once.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{
    self as sig, ParsedPublicKey, RsaParameters, RsaPublicKeyComponents, VerificationAlgorithm,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Number, Value};

use super::AuthError;

/// Tokens larger than this are refused before any parsing (Azure AD tokens are ~2 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A token split and parsed, not yet verified.
#[derive(Debug)]
pub struct UnverifiedToken<'a> {
    /// `header.payload`, what the signature covers.
    signing_input: &'a str,
    signature: &'a str,
    /// The header's members; `alg` is a string and `kid` a string or absent.
    header: Map<String, Value>,
    /// The payload's members; `iss` is a string.
    claims: Map<String, Value>,
}

/// What a verified token hands on: its claims and its `typ` header.
#[derive(Debug)]
pub struct VerifiedClaims {
    pub claims: Map<String, Value>,
    /// The `typ` header when it is a string.
    pub token_type: Option<String>,
}

/// How an issuer's tokens are checked once their signature is: `exp`, `iss` and `aud`
/// required, `exp` and `nbf` with `leeway` seconds of clock skew.
#[derive(Debug, Clone)]
pub struct ClaimRules {
    /// The exact `iss` required; `None` for a `{tenantid}` template, checked by the caller.
    pub issuer: Option<String>,
    /// At least one of the token's `aud` values must be one of these.
    pub audiences: Vec<String>,
    pub leeway: u64,
}

/// What `jsonwebtoken` reported for a token it could not read, kept for the same tokens.
fn undecodable() -> AuthError {
    AuthError::Malformed("its segments do not decode")
}

impl<'a> UnverifiedToken<'a> {
    pub fn parse(raw: &'a str) -> Result<Self, AuthError> {
        if raw.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge {
                max: MAX_TOKEN_BYTES,
            });
        }
        let mut parts = raw.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed("a JWT has three dot-separated parts"));
        };
        let signing_input = &raw[..header.len() + 1 + payload.len()];
        let header_map = decode_segment(header, "header")?;
        // What the former typed peek at the header refused: `alg` must be a string and
        // `kid` a string when present.
        let alg_ok = header_map.get("alg").is_some_and(Value::is_string);
        let kid_ok = header_map
            .get("kid")
            .is_none_or(|k| k.is_string() || k.is_null());
        if !alg_ok || !kid_ok {
            return Err(AuthError::Malformed("header is not a JSON object with alg"));
        }
        if header_map.get("crit").is_some_and(|c| !c.is_null()) {
            return Err(AuthError::UnsupportedCritical);
        }
        let claims = decode_segment(payload, "payload")?;
        match claims.get("iss") {
            Some(Value::String(_)) => {}
            None | Some(Value::Null) => return Err(AuthError::MissingClaim("iss".into())),
            Some(_) => return Err(AuthError::InvalidClaim("iss".into())),
        }
        Ok(Self {
            signing_input,
            signature,
            header: header_map,
            claims,
        })
    }

    /// The unverified `iss`: only used to pick which issuer's keys to verify with.
    pub fn issuer(&self) -> &str {
        self.claims.get("iss").and_then(Value::as_str).unwrap_or("")
    }

    /// The unverified `tid`: only used to match a `{tenantid}` issuer template.
    pub fn tenant(&self) -> Option<&str> {
        self.claims.get("tid").and_then(Value::as_str)
    }

    pub fn kid(&self) -> Option<&str> {
        self.header.get("kid").and_then(Value::as_str)
    }

    /// The `typ` header; only trusted once the signature (which covers it) is checked.
    pub fn token_type(&self) -> Option<&str> {
        self.header.get("typ").and_then(Value::as_str)
    }

    fn alg(&self) -> &str {
        self.header.get("alg").and_then(Value::as_str).unwrap_or("")
    }

    /// The header's algorithm, if it is one of `allowed`.
    pub fn algorithm(&self, allowed: &[Algorithm]) -> Result<Algorithm, AuthError> {
        let alg = Algorithm::from_str(self.alg())
            .ok()
            .filter(|a| allowed.contains(a))
            .ok_or_else(|| AuthError::DisallowedAlgorithm(sanitize(self.alg())))?;
        Ok(alg)
    }

    /// Checks the header's member types, the signature with `key` under `alg` (which the
    /// caller took from [`algorithm`](Self::algorithm)), then `exp`, `nbf`, `iss` and
    /// `aud`, and returns the claims.
    pub fn verify(
        self,
        key: &PublicKey,
        alg: Algorithm,
        rules: &ClaimRules,
    ) -> Result<VerifiedClaims, AuthError> {
        check_header_types(&self.header)?;
        if alg.family() != key.family {
            return Err(undecodable());
        }
        let signature = URL_SAFE_NO_PAD
            .decode(self.signature)
            .map_err(|_| undecodable())?;
        key.verify(alg, self.signing_input.as_bytes(), &signature)?;
        check_claims(&self.claims, rules, now())?;
        let token_type = match self.header.get("typ") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        Ok(VerifiedClaims {
            claims: self.claims,
            token_type,
        })
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A JWKS key, parsed once for each algorithm its issuer allows rather than on every
/// token (parsing an RSA key costs about a fifth of a verification).
pub struct PublicKey {
    family: AlgorithmFamily,
    /// `None` where the key does not parse for that algorithm (a P-384 point for ES256,
    /// an RSA modulus out of range): tokens then fail their signature check, as before.
    parsed: Vec<(Algorithm, Option<ParsedPublicKey>)>,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("family", &self.family)
            .finish_non_exhaustive()
    }
}

fn verification_algorithm(alg: Algorithm) -> Option<&'static dyn VerificationAlgorithm> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &sig::ED25519,
        _ => return None,
    })
}

fn rsa_parameters(alg: Algorithm) -> Option<&'static RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

impl PublicKey {
    /// The key of a JWK, for the `algorithms` of its family; `None` for a symmetric key,
    /// which a public JWKS must never be trusted with.
    pub fn new(key: &DecodingKey, algorithms: &[Algorithm]) -> Option<Self> {
        let family = key.family();
        if matches!(family, AlgorithmFamily::Hmac) {
            return None;
        }
        let parsed = algorithms
            .iter()
            .filter(|alg| alg.family() == family)
            .map(|&alg| (alg, parse_key(key, alg)))
            .collect();
        Some(Self { family, parsed })
    }

    /// A key that verifies nothing, for unit tests that only count keys.
    #[cfg(test)]
    pub(crate) fn placeholder() -> Self {
        Self {
            family: AlgorithmFamily::Rsa,
            parsed: Vec::new(),
        }
    }

    fn verify(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> Result<(), AuthError> {
        let key = self
            .parsed
            .iter()
            .find(|(a, _)| *a == alg)
            .and_then(|(_, key)| key.as_ref())
            .ok_or(AuthError::BadSignature)?;
        key.verify_sig(message, signature)
            .map_err(|_| AuthError::BadSignature)
    }
}

/// The key as aws-lc-rs reads it for `alg`, exactly as jsonwebtoken handed it over:
/// an RSA JWK as its `n`/`e` components, an EC JWK as the point `04 || x || y`, an OKP
/// JWK as `x`.
fn parse_key(key: &DecodingKey, alg: Algorithm) -> Option<ParsedPublicKey> {
    match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, e } => RsaPublicKeyComponents {
            n: n.as_slice(),
            e: e.as_slice(),
        }
        .to_parsed_public_key(rsa_parameters(alg)?)
        .ok(),
        DecodingKeyKind::SecretOrDer(bytes) => {
            ParsedPublicKey::new(verification_algorithm(alg)?, bytes).ok()
        }
    }
}

/// The header member types `jsonwebtoken::Header` required (it refused the token as
/// unreadable otherwise); unknown members may hold anything.
fn check_header_types(header: &Map<String, Value>) -> Result<(), AuthError> {
    let strings = |v: &Value| {
        v.as_array()
            .is_some_and(|items| items.iter().all(Value::is_string))
    };
    for (name, value) in header {
        if value.is_null() {
            continue;
        }
        let ok = match name.as_str() {
            "typ" | "cty" | "jku" | "kid" | "x5u" | "x5t" | "x5t#S256" | "url" | "nonce"
            | "enc" | "zip" => value.is_string(),
            "x5c" | "crit" => strings(value),
            "jwk" => Jwk::deserialize(value).is_ok(),
            "alg" => Algorithm::deserialize(value).is_ok(),
            _ => true,
        };
        if !ok {
            return Err(undecodable());
        }
    }
    Ok(())
}

/// `exp` or `nbf` as jsonwebtoken read it: a non-negative integer, or a finite
/// non-negative number below 2^64 rounded to the nearest second.
enum NumericDate {
    Absent,
    Invalid,
    At(u64),
}

fn numeric_date(value: Option<&Value>) -> NumericDate {
    let Some(value) = value else {
        return NumericDate::Absent;
    };
    let Value::Number(n) = value else {
        return NumericDate::Invalid;
    };
    if let Some(secs) = n.as_u64() {
        return NumericDate::At(secs);
    }
    match n.as_f64() {
        Some(f) if n.is_f64() && f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
            // In range, so the cast neither saturates nor wraps.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            NumericDate::At(f.round() as u64)
        }
        _ => NumericDate::Invalid,
    }
}

/// `iss` or `aud` as jsonwebtoken read it: a string or an array of strings; `null` is
/// absent.
enum StringOrSet<'a> {
    Absent,
    Invalid,
    Values(Vec<&'a str>),
}

fn string_or_set(value: Option<&Value>) -> StringOrSet<'_> {
    match value {
        None | Some(Value::Null) => StringOrSet::Absent,
        Some(Value::String(s)) => StringOrSet::Values(vec![s.as_str()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(Value::as_str)
            .collect::<Option<Vec<_>>>()
            .map_or(StringOrSet::Invalid, StringOrSet::Values),
        Some(_) => StringOrSet::Invalid,
    }
}

/// The claim checks of `jsonwebtoken::decode` as the gateway configured it (required
/// `exp`, `iss`, `aud`; `nbf` checked when present), with its outcomes:
/// - `exp`, `nbf` holding a non-empty array or object, or `sub` any array or object,
///   made its claims reader fail outright: Malformed;
/// - a required claim absent, `null`, or of the wrong type: MissingClaim;
/// - `nbf` of the wrong type (or `null`): InvalidClaim;
/// - expired when `exp < now - leeway`, not yet valid when `nbf > now + leeway`;
/// - `iss` (string or array) must include the issuer, `aud` (string or array, not empty)
///   must include one of the audiences.
///
/// Required claims are reported in the order exp, iss, aud (jsonwebtoken's order varied
/// with its set's hashing).
fn check_claims(
    claims: &Map<String, Value>,
    rules: &ClaimRules,
    now: u64,
) -> Result<(), AuthError> {
    let filled = |v: &Value| match v {
        Value::Array(items) => !items.is_empty(),
        Value::Object(members) => !members.is_empty(),
        _ => false,
    };
    if claims.get("exp").is_some_and(filled)
        || claims.get("nbf").is_some_and(filled)
        || claims
            .get("sub")
            .is_some_and(|s| s.is_array() || s.is_object())
    {
        return Err(undecodable());
    }
    let NumericDate::At(exp) = numeric_date(claims.get("exp")) else {
        return Err(AuthError::MissingClaim("exp".into()));
    };
    let StringOrSet::Values(iss) = string_or_set(claims.get("iss")) else {
        return Err(AuthError::MissingClaim("iss".into()));
    };
    let StringOrSet::Values(aud) = string_or_set(claims.get("aud")) else {
        return Err(AuthError::MissingClaim("aud".into()));
    };
    let nbf = match numeric_date(claims.get("nbf")) {
        NumericDate::Invalid => return Err(AuthError::InvalidClaim("nbf".into())),
        NumericDate::Absent => None,
        NumericDate::At(nbf) => Some(nbf),
    };
    if exp < now.saturating_sub(rules.leeway) {
        return Err(AuthError::Expired);
    }
    if nbf.is_some_and(|nbf| nbf > now.saturating_add(rules.leeway)) {
        return Err(AuthError::NotYetValid);
    }
    if let Some(issuer) = &rules.issuer {
        if !iss.contains(&issuer.as_str()) {
            return Err(AuthError::UnknownIssuer);
        }
    }
    if !aud.iter().any(|a| rules.audiences.iter().any(|r| r == a)) {
        return Err(AuthError::AudienceMismatch);
    }
    Ok(())
}

fn decode_segment(segment: &str, what: &'static str) -> Result<Map<String, Value>, AuthError> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|_| {
        AuthError::Malformed(if what == "header" {
            "header is not base64url"
        } else {
            "payload is not base64url"
        })
    })?;
    // serde_json keeps the last of two equal member names and other readers may keep the
    // first: a token with two `oid`s would name whichever user each reader happens to
    // pick. No issuer sends duplicates, so they are refused outright, at any depth.
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let object = UniqueObject
        .deserialize(&mut de)
        .and_then(|object| de.end().map(|()| object));
    object.map_err(|_| {
        AuthError::Malformed(if what == "header" {
            "header is not a JSON object with unique member names"
        } else {
            "payload is not a JSON object with unique member names"
        })
    })
}

/// A JSON object whose objects, at every depth, have no two members of the same name,
/// read into the same `Map` serde_json would build.
struct UniqueObject;

impl<'de> DeserializeSeed<'de> for UniqueObject {
    type Value = Map<String, Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        match deserializer.deserialize_map(UniqueValueVisitor)? {
            Value::Object(map) => Ok(map),
            _ => Err(de::Error::custom("not an object")),
        }
    }
}

/// A JSON value whose objects, at every depth, have no two members of the same name.
struct UniqueValue(Value);

impl<'de> Deserialize<'de> for UniqueValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(UniqueValueVisitor)
            .map(UniqueValue)
    }
}

/// Builds values as `serde_json::Value`'s own visitor does, refusing a repeated name.
struct UniqueValueVisitor;

impl<'de> Visitor<'de> for UniqueValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON without duplicate member names")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            let UniqueValue(value) = map.next_value()?;
            if members.insert(name, value).is_some() {
                return Err(de::Error::custom("duplicate member name"));
            }
        }
        Ok(Value::Object(members))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(UniqueValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(Value::Number(n.into()))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(Number::from_f64(n).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::String(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Value, E> {
        Ok(Value::String(s))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
}

/// Caller-controlled text that ends up in an error message: short and printable only.
fn sanitize(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        .take(32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(v: &str) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    #[test]
    fn parse_reads_alg_kid_and_issuer() {
        let t = format!(
            "{}.{}.sig",
            seg(r#"{"alg":"RS256","kid":"k1"}"#),
            seg(r#"{"iss":"https://i"}"#)
        );
        let u = UnverifiedToken::parse(&t).unwrap();
        assert_eq!(u.issuer(), "https://i");
        assert_eq!(u.kid(), Some("k1"));
        assert_eq!(u.algorithm(&[Algorithm::RS256]).unwrap(), Algorithm::RS256);
        assert!(matches!(
            u.algorithm(&[Algorithm::PS256]),
            Err(AuthError::DisallowedAlgorithm(_))
        ));
    }

    #[test]
    fn parse_refuses_malformed_tokens() {
        assert!(matches!(
            UnverifiedToken::parse("a.b"),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            UnverifiedToken::parse("!!.??.x"),
            Err(AuthError::Malformed(_))
        ));
        let big = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(
            UnverifiedToken::parse(&big),
            Err(AuthError::TooLarge { .. })
        ));
        let crit = format!(
            "{}.{}.s",
            seg(r#"{"alg":"RS256","crit":["x"]}"#),
            seg(r#"{"iss":"i"}"#)
        );
        assert!(matches!(
            UnverifiedToken::parse(&crit),
            Err(AuthError::UnsupportedCritical)
        ));
        // Found by the `jwt` fuzz target: arrays deserialize into the derived structs.
        for (header, payload) in [
            (r#"["RS256","k1"]"#, r#"{"iss":"i"}"#),
            (r#"{"alg":"RS256"}"#, r#"["https://issuer"]"#),
        ] {
            let t = format!("{}.{}.s", seg(header), seg(payload));
            assert!(
                matches!(UnverifiedToken::parse(&t), Err(AuthError::Malformed(_))),
                "{header} {payload}"
            );
        }
        let spaced = format!(
            "{}.{}.s",
            seg(" \n{\"alg\":\"RS256\"}"),
            seg("\t{\"iss\":\"i\"}")
        );
        assert!(UnverifiedToken::parse(&spaced).is_ok());
        let none = format!("{}.{}.", seg(r#"{"alg":"none"}"#), seg(r#"{"iss":"i"}"#));
        let u = UnverifiedToken::parse(&none).unwrap();
        assert!(matches!(
            u.algorithm(&[Algorithm::RS256]),
            Err(AuthError::DisallowedAlgorithm(_))
        ));
    }

    #[test]
    fn parse_refuses_duplicate_member_names_at_any_depth() {
        let header = seg(r#"{"alg":"RS256","kid":"k"}"#);
        for payload in [
            r#"{"iss":"i","iss":"i"}"#,
            r#"{"iss":"i","oid":"a","oid":"b"}"#,
            r#"{"iss":"i","x":{"a":1,"a":2}}"#,
            r#"{"iss":"i","x":[{"a":1,"a":2}]}"#,
        ] {
            let t = format!("{header}.{}.s", seg(payload));
            assert!(
                matches!(
                    UnverifiedToken::parse(&t),
                    Err(AuthError::Malformed(
                        "payload is not a JSON object with unique member names"
                    ))
                ),
                "{payload}"
            );
        }
        let t = format!(
            "{}.{}.s",
            seg(r#"{"alg":"RS256","kid":"k","jku":"a","jku":"b"}"#),
            seg(r#"{"iss":"i"}"#)
        );
        assert!(matches!(
            UnverifiedToken::parse(&t),
            Err(AuthError::Malformed(
                "header is not a JSON object with unique member names"
            ))
        ));
        // Equal names in different objects are not duplicates.
        let t = format!(
            "{header}.{}.s",
            seg(r#"{"iss":"i","a":{"iss":1,"x":[{"y":1},{"y":2}]}}"#)
        );
        assert_eq!(UnverifiedToken::parse(&t).unwrap().issuer(), "i");
    }
    fn claims(json: Value) -> Map<String, Value> {
        json.as_object().cloned().unwrap()
    }

    fn check(json: Value) -> Result<(), AuthError> {
        let rules = ClaimRules {
            issuer: Some("i".into()),
            audiences: vec!["a".into(), "b".into()],
            leeway: 60,
        };
        check_claims(&claims(json), &rules, 1_000_000)
    }

    #[test]
    fn exp_and_nbf_allow_the_leeway_and_no_more() {
        use serde_json::json;
        let ok = |exp: Value, nbf: Value| check(json!({"iss":"i","aud":"a","exp":exp,"nbf":nbf}));
        assert!(ok(json!(999_940), json!(1_000_060)).is_ok());
        assert!(matches!(
            ok(json!(999_939), json!(0)),
            Err(AuthError::Expired)
        ));
        assert!(matches!(
            ok(json!(2_000_000), json!(1_000_061)),
            Err(AuthError::NotYetValid)
        ));
        // Fractions round to the nearest second.
        assert!(ok(json!(999_939.5), json!(1_000_060.4)).is_ok());
        assert!(matches!(
            ok(json!(999_939.4), json!(0)),
            Err(AuthError::Expired)
        ));
        assert!(matches!(
            ok(json!(2_000_000), json!(1_000_060.5)),
            Err(AuthError::NotYetValid)
        ));
    }

    #[test]
    fn required_claims_of_the_wrong_type_are_missing_and_a_bad_nbf_is_invalid() {
        use serde_json::json;
        let missing =
            |c: Value, name: &str| matches!(check(c), Err(AuthError::MissingClaim(n)) if n == name);
        assert!(missing(json!({"iss":"i","aud":"a"}), "exp"));
        for exp in [
            json!(null),
            json!("2000000"),
            json!(-1),
            json!(true),
            json!([]),
            json!({}),
            json!(1e30),
        ] {
            assert!(
                missing(json!({"iss":"i","aud":"a","exp":exp}), "exp"),
                "{exp}"
            );
        }
        assert!(missing(json!({"iss":"i","exp":2_000_000}), "aud"));
        for aud in [
            json!(null),
            json!(1),
            json!(["a", 1]),
            json!([["a"]]),
            json!({"a":"a"}),
        ] {
            assert!(
                missing(json!({"iss":"i","aud":aud,"exp":2_000_000}), "aud"),
                "{aud}"
            );
        }
        assert!(missing(
            json!({"iss":null,"aud":"a","exp":2_000_000}),
            "iss"
        ));
        for nbf in [json!(null), json!("1"), json!(-5), json!([]), json!({})] {
            assert!(
                matches!(check(json!({"iss":"i","aud":"a","exp":2_000_000,"nbf":nbf})), Err(AuthError::InvalidClaim(n)) if n == "nbf"),
                "{nbf}"
            );
        }
        // What jsonwebtoken's claims reader could not get past at all.
        for c in [
            json!({"iss":"i","aud":"a","exp":[2_000_000]}),
            json!({"iss":"i","aud":"a","exp":2_000_000,"nbf":{"a":1}}),
            json!({"iss":"i","aud":"a","exp":2_000_000,"sub":[]}),
            json!({"iss":"i","aud":"a","exp":2_000_000,"sub":{}}),
        ] {
            assert!(
                matches!(check(c.clone()), Err(AuthError::Malformed(_))),
                "{c}"
            );
        }
    }

    #[test]
    fn iss_and_aud_need_one_accepted_value() {
        use serde_json::json;
        let exp = 2_000_000;
        assert!(check(json!({"iss":"i","aud":["x","b"],"exp":exp})).is_ok());
        assert!(check(json!({"iss":["x","i"],"aud":"a","exp":exp})).is_ok());
        assert!(matches!(
            check(json!({"iss":"i","aud":[],"exp":exp})),
            Err(AuthError::AudienceMismatch)
        ));
        assert!(matches!(
            check(json!({"iss":"i","aud":"c","exp":exp})),
            Err(AuthError::AudienceMismatch)
        ));
        assert!(matches!(
            check(json!({"iss":"j","aud":"a","exp":exp})),
            Err(AuthError::UnknownIssuer)
        ));
        assert!(matches!(
            check(json!({"iss":[],"aud":"a","exp":exp})),
            Err(AuthError::UnknownIssuer)
        ));
        let template = ClaimRules {
            issuer: None,
            audiences: vec!["a".into()],
            leeway: 0,
        };
        assert!(check_claims(
            &claims(json!({"iss":"any","aud":"a","exp":exp})),
            &template,
            1
        )
        .is_ok());
    }

    #[test]
    fn segments_parse_into_the_map_serde_json_builds() {
        let json = r#" {"a":[1,-2,3.5,-0,1e2,null,true,"s\u00e9"],"b":{"c":{"d":[]}},"e":18446744073709551615} "#;
        let seg = URL_SAFE_NO_PAD.encode(json);
        let expected: Map<String, Value> = serde_json::from_str(json).unwrap();
        assert_eq!(decode_segment(&seg, "payload").unwrap(), expected);
        for bad in ["[]", "1", "{} x", "{\"a\":1,}", ""] {
            assert!(
                decode_segment(&URL_SAFE_NO_PAD.encode(bad), "payload").is_err(),
                "{bad}"
            );
        }
    }
}

/// The new checks against the `jsonwebtoken::decode` call they replace, on the same
/// signed tokens: every outcome (claims, or error kind and text) must be the same.
#[cfg(test)]
mod same_as_jsonwebtoken {
    use super::*;
    use jsonwebtoken::errors::ErrorKind;
    use jsonwebtoken::Validation;
    use std::sync::OnceLock;
    use testkit::keys::{EcSigningKey, RsaSigningKey};

    const ISS: &str = "https://issuer.example/v2.0";
    const AUD: &str = "api://gw";

    fn rsa() -> &'static RsaSigningKey {
        static KEY: OnceLock<RsaSigningKey> = OnceLock::new();
        KEY.get_or_init(|| RsaSigningKey::generate("k").unwrap())
    }

    fn ec() -> &'static EcSigningKey {
        static KEY: OnceLock<EcSigningKey> = OnceLock::new();
        KEY.get_or_init(|| EcSigningKey::generate("e").unwrap())
    }

    fn decoding_key(jwk: Value) -> DecodingKey {
        DecodingKey::from_jwk(&serde_json::from_value::<Jwk>(jwk).unwrap()).unwrap()
    }

    fn rules(issuer: Option<&str>) -> ClaimRules {
        ClaimRules {
            issuer: issuer.map(str::to_owned),
            audiences: vec![AUD.to_owned(), "api://other".to_owned()],
            leeway: 60,
        }
    }

    /// The gateway's former verification: `jsonwebtoken::decode` and its error mapping.
    fn jsonwebtoken_verify(
        token: &str,
        key: &DecodingKey,
        alg: Algorithm,
        rules: &ClaimRules,
    ) -> Result<Map<String, Value>, AuthError> {
        let mut v = Validation::new(alg);
        v.leeway = rules.leeway;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        if let Some(issuer) = &rules.issuer {
            v.set_issuer(&[issuer]);
        }
        v.set_audience(&rules.audiences);
        jsonwebtoken::decode::<Map<String, Value>>(token, key, &v)
            .map(|data| data.claims)
            .map_err(|e| match e.into_kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidAudience => AuthError::AudienceMismatch,
                ErrorKind::InvalidIssuer => AuthError::UnknownIssuer,
                ErrorKind::InvalidAlgorithm => AuthError::DisallowedAlgorithm("x".into()),
                ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(sanitize(&c)),
                ErrorKind::InvalidClaimFormat(c) => AuthError::InvalidClaim(sanitize(&c)),
                ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey => AuthError::BadSignature,
                _ => AuthError::Malformed("its segments do not decode"),
            })
    }

    /// Both verifications of `token`; `None` when parsing or the algorithm refuses it
    /// first (shared by both paths).
    fn both(
        token: &str,
        jwk: Value,
        allowed: &[Algorithm],
        rules: &ClaimRules,
    ) -> Option<(String, String)> {
        let parsed = UnverifiedToken::parse(token).ok()?;
        let alg = parsed.algorithm(allowed).ok()?;
        let key = decoding_key(jwk);
        let old = jsonwebtoken_verify(token, &key, alg, rules);
        let new = parsed
            .verify(&PublicKey::new(&key, allowed).unwrap(), alg, rules)
            .map(|v| v.claims);
        Some((format!("{old:?}"), format!("{new:?}")))
    }

    fn signed(header: &str, payload: &str) -> String {
        rsa().sign_input(&format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        ))
    }

    fn assert_same(token: &str, jwk: Value, allowed: &[Algorithm], rules: &ClaimRules) -> String {
        let (old, new) = both(token, jwk, allowed, rules).expect("parsed and allowed");
        assert_eq!(old, new, "{token}");
        new
    }

    #[test]
    fn claims_are_judged_as_jsonwebtoken_judged_them() {
        let now = now();
        let (past, soon, later) = (now - 600, now + 10, now + 600);
        let h = r#"{"alg":"RS256","kid":"k","typ":"JWT"}"#;
        let base = format!(r#""iss":"{ISS}","aud":"{AUD}""#);
        let mut payloads = vec![
            format!(r#"{{{base},"exp":{later}}}"#),
            format!(r#"{{{base},"exp":{later}.4,"sub":"s","x":{{"y":[1,{{"z":null}}]}}}}"#),
            format!(r#"{{{base}}}"#),
            format!(r#"{{"iss":"{ISS}","exp":{later}}}"#),
            format!(r#"{{"iss":"{ISS}","exp":{later},"aud":null}}"#),
            format!(r#"{{{base},"exp":{past}}}"#),
            format!(r#"{{{base},"exp":{}}}"#, now - 30),
            format!(r#"{{{base},"exp":{past}.9e0}}"#),
            format!(r#"{{{base},"exp":{later},"nbf":{later}}}"#),
            format!(r#"{{{base},"exp":{later},"nbf":{soon}}}"#),
            format!(r#"{{{base},"exp":{later},"nbf":1.5}}"#),
            format!(r#"{{"iss":"{ISS}","exp":{later},"aud":"api://nope"}}"#),
            format!(r#"{{"iss":"{ISS}","exp":{later},"aud":[]}}"#),
            format!(r#"{{"iss":"{ISS}","exp":{later},"aud":["a","{AUD}"]}}"#),
            format!(r#"{{"iss":"{ISS}","exp":{later},"aud":["a","b"]}}"#),
            format!(r#"{{"iss":"{ISS}","exp":{later},"aud":["{AUD}",1]}}"#),
            format!(r#"{{"iss":"{ISS}","exp":{later},"aud":[["{AUD}"]]}}"#),
            format!(r#"{{"iss":"{ISS}","exp":{later},"aud":{{"a":"{AUD}"}}}}"#),
            format!(r#"{{"iss":"{ISS}","exp":{later},"aud":5}}"#),
            format!(r#"{{"iss":"https://other","exp":{later},"aud":"{AUD}"}}"#),
        ];
        for exp in [
            "null",
            "\"1\"",
            "-1",
            "-0",
            "true",
            "[]",
            "[1]",
            "[[]]",
            "{}",
            "{\"a\":1}",
            "1e30",
            "18446744073709551616",
            "-1.5",
        ] {
            payloads.push(format!(r#"{{{base},"exp":{exp}}}"#));
            payloads.push(format!(r#"{{{base},"exp":{later},"nbf":{exp}}}"#));
            payloads.push(format!(r#"{{{base},"exp":{later},"sub":{exp}}}"#));
            payloads.push(format!(r#"{{{base},"exp":{later},"other":{exp}}}"#));
        }
        let mut seen = std::collections::BTreeSet::new();
        for rules in [rules(Some(ISS)), rules(None), rules(Some("https://else"))] {
            for payload in &payloads {
                let outcome = assert_same(
                    &signed(h, payload),
                    rsa().jwk(),
                    &[Algorithm::RS256],
                    &rules,
                );
                seen.insert(outcome.split('(').nth(1).unwrap_or_default().to_owned());
            }
        }
        // The cases reach every outcome, so the comparison covers each rule.
        for outcome in [
            "Expired",
            "NotYetValid",
            "AudienceMismatch",
            "UnknownIssuer",
            "Malformed",
            "MissingClaim",
            "InvalidClaim",
            "{",
        ] {
            assert!(
                seen.iter().any(|s| s.starts_with(outcome)),
                "{outcome}: {seen:?}"
            );
        }
    }

    #[test]
    fn header_members_are_typed_as_jsonwebtoken_typed_them() {
        let payload = format!(r#"{{"iss":"{ISS}","aud":"{AUD}","exp":{}}}"#, now() + 600);
        let jwk = rsa().jwk().to_string();
        let mut malformed = 0;
        for extra in [
            r#""typ":1"#,
            r#""typ":null"#,
            r#""cty":[]"#,
            r#""jku":"https://x""#,
            r#""x5u":2"#,
            r#""x5t":"a""#,
            r#""x5t#S256":{}"#,
            r#""url":true"#,
            r#""nonce":"n""#,
            r#""enc":"A128GCM""#,
            r#""enc":3"#,
            r#""zip":"DEF""#,
            r#""zip":[]"#,
            r#""x5c":["a","b"]"#,
            r#""x5c":"a""#,
            r#""x5c":[1]"#,
            r#""x5c":null"#,
            r#""crit":null"#,
            r#""jwk":{}"#,
            r#""jwk":null"#,
            r#""jwk":"k""#,
            &format!(r#""jwk":{jwk}"#),
            r#""other":{"a":[1,{"b":2}]}"#,
            r#""kid2":5"#,
        ] {
            let header = format!(r#"{{"alg":"RS256","kid":"k",{extra}}}"#);
            let outcome = assert_same(
                &signed(&header, &payload),
                rsa().jwk(),
                &[Algorithm::RS256],
                &rules(Some(ISS)),
            );
            malformed += usize::from(outcome.starts_with("Err(Malformed"));
        }
        assert!(malformed >= 10, "{malformed}");
    }

    #[test]
    fn signatures_and_key_families_fail_as_with_jsonwebtoken() {
        let rules = rules(Some(ISS));
        let payload = format!(r#"{{"iss":"{ISS}","aud":"{AUD}","exp":{}}}"#, now() + 600);
        let good = signed(r#"{"alg":"RS256","kid":"k"}"#, &payload);
        let all = [
            Algorithm::RS256,
            Algorithm::PS256,
            Algorithm::ES256,
            Algorithm::ES384,
        ];
        let (input, _) = good.rsplit_once('.').unwrap();
        let cases = [
            (good.clone(), "Ok"),
            (format!("{input}.AAAA"), "Err(BadSignature"),
            (format!("{input}.!!"), "Err(Malformed"),
            (format!("{input}."), "Err(BadSignature"),
            (format!("{input}.A"), "Err(Malformed"),
            (format!("{good}A"), "Err(BadSignature"),
        ];
        for (token, expected) in &cases {
            let outcome = assert_same(token, rsa().jwk(), &all, &rules);
            assert!(outcome.starts_with(expected), "{outcome}");
        }
        // An RS256 token checked with an EC key, and the other way round.
        let outcome = assert_same(&good, ec().jwk(), &all, &rules);
        assert!(outcome.starts_with("Err(Malformed"), "{outcome}");
        let header = serde_json::json!({"alg": "ES256", "kid": "e"});
        let claims: Value = serde_json::from_str(&payload).unwrap();
        let es = ec().sign_jwt(&header, &claims);
        assert!(assert_same(&es, ec().jwk(), &all, &rules).starts_with("Ok"));
        assert!(assert_same(&es, rsa().jwk(), &all, &rules).starts_with("Err(Malformed"));
        // A P-256 key under ES384: the signature cannot verify.
        let es384 = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"ES384","kid":"e"}"#),
            es.split_once('.').unwrap().1
        );
        let outcome = assert_same(&es384, ec().jwk(), &all, &rules);
        assert!(outcome.starts_with("Err(BadSignature"), "{outcome}");
    }
}
