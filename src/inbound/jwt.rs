//! One JWT, before and after its signature is checked. Parsing here reads only what is
//! needed to choose the issuer and key (`iss`, `alg`, `kid`); nothing read before the
//! signature check is trusted for anything else. `jku`, `x5u` and `jwk` headers are never
//! looked at, so a token cannot point the gateway at keys of its choosing.

use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use super::AuthError;

/// Tokens larger than this are refused before any parsing (Azure AD tokens are ~2 KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A token split and peeked at, not yet verified.
#[derive(Debug)]
pub struct UnverifiedToken<'a> {
    raw: &'a str,
    alg: String,
    kid: Option<String>,
    /// The `typ` header when it is a string.
    typ: Option<String>,
    issuer: String,
    tenant: Option<String>,
}

#[derive(Deserialize)]
struct PeekHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
    #[serde(default)]
    typ: Option<Value>,
}

#[derive(Deserialize)]
struct PeekClaims {
    iss: Option<Value>,
    tid: Option<Value>,
}

impl<'a> UnverifiedToken<'a> {
    pub fn parse(raw: &'a str) -> Result<Self, AuthError> {
        if raw.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge {
                max: MAX_TOKEN_BYTES,
            });
        }
        let mut parts = raw.split('.');
        let (Some(header), Some(payload), Some(_signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed("a JWT has three dot-separated parts"));
        };
        let header: PeekHeader = decode_segment(header, "header")?;
        if header.crit.is_some() {
            return Err(AuthError::UnsupportedCritical);
        }
        let claims: PeekClaims = decode_segment(payload, "payload")?;
        let issuer = match claims.iss {
            Some(Value::String(s)) => s,
            Some(_) => return Err(AuthError::InvalidClaim("iss".into())),
            None => return Err(AuthError::MissingClaim("iss".into())),
        };
        let tenant = match claims.tid {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        Ok(Self {
            raw,
            alg: header.alg,
            kid: header.kid,
            typ: match header.typ {
                Some(Value::String(s)) => Some(s),
                _ => None,
            },
            issuer,
            tenant,
        })
    }

    /// The unverified `iss`: only used to pick which issuer's keys to verify with.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The unverified `tid`: only used to match a `{tenantid}` issuer template.
    pub fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The `typ` header; only trusted once the signature (which covers it) is checked.
    pub fn token_type(&self) -> Option<&str> {
        self.typ.as_deref()
    }

    /// The header's algorithm, if it is one of `allowed`.
    pub fn algorithm(&self, allowed: &[Algorithm]) -> Result<Algorithm, AuthError> {
        let alg = Algorithm::from_str(&self.alg)
            .ok()
            .filter(|a| allowed.contains(a))
            .ok_or_else(|| AuthError::DisallowedAlgorithm(sanitize(&self.alg)))?;
        Ok(alg)
    }

    /// Checks signature, `iss`, `aud`, `exp` and `nbf`, and returns the claims.
    pub fn verify(
        &self,
        key: &DecodingKey,
        validation: &Validation,
    ) -> Result<Map<String, Value>, AuthError> {
        jsonwebtoken::decode::<Map<String, Value>>(self.raw, key, validation)
            .map(|data| data.claims)
            .map_err(|e| match e.into_kind() {
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidAudience => AuthError::AudienceMismatch,
                ErrorKind::InvalidIssuer => AuthError::UnknownIssuer,
                ErrorKind::InvalidAlgorithm => AuthError::DisallowedAlgorithm(sanitize(&self.alg)),
                ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(sanitize(&c)),
                ErrorKind::InvalidClaimFormat(c) => AuthError::InvalidClaim(sanitize(&c)),
                ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey => AuthError::BadSignature,
                _ => AuthError::Malformed("its segments do not decode"),
            })
    }
}

fn decode_segment<T: for<'de> Deserialize<'de>>(
    segment: &str,
    what: &'static str,
) -> Result<T, AuthError> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|_| {
        AuthError::Malformed(if what == "header" {
            "header is not base64url"
        } else {
            "payload is not base64url"
        })
    })?;
    // serde_json keeps the last of two equal member names, the struct peeks above refuse
    // duplicates of their own fields, and other readers may keep the first: a token with
    // two `oid`s would name whichever user each reader happens to pick. No issuer sends
    // duplicates, so they are refused outright, at any depth.
    serde_json::from_slice::<UniqueObject>(&bytes).map_err(|_| {
        AuthError::Malformed(if what == "header" {
            "header is not a JSON object with unique member names"
        } else {
            "payload is not a JSON object with unique member names"
        })
    })?;
    let value = serde_json::from_slice(&bytes).map_err(|_| {
        AuthError::Malformed(if what == "header" {
            "header is not a JSON object with alg"
        } else {
            "payload is not a JSON object"
        })
    })?;
    Ok(value)
}

/// A JSON object whose objects, at every depth, have no two members of the same name.
struct UniqueObject;

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_map(UniqueMembersVisitor)
            .map(|_| UniqueObject)
    }
}

/// A JSON value whose objects, at every depth, have no two members of the same name.
struct UniqueMembers;

impl<'de> Deserialize<'de> for UniqueMembers {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueMembersVisitor)
    }
}

struct UniqueMembersVisitor;

impl<'de> Visitor<'de> for UniqueMembersVisitor {
    type Value = UniqueMembers;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON without duplicate member names")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueMembers, A::Error> {
        let mut seen = HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            if !seen.insert(name) {
                return Err(de::Error::custom("duplicate member name"));
            }
            map.next_value::<UniqueMembers>()?;
        }
        Ok(UniqueMembers)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueMembers, A::Error> {
        while seq.next_element::<UniqueMembers>()?.is_some() {}
        Ok(UniqueMembers)
    }

    fn visit_bool<E>(self, _: bool) -> Result<UniqueMembers, E> {
        Ok(UniqueMembers)
    }
    fn visit_i64<E>(self, _: i64) -> Result<UniqueMembers, E> {
        Ok(UniqueMembers)
    }
    fn visit_u64<E>(self, _: u64) -> Result<UniqueMembers, E> {
        Ok(UniqueMembers)
    }
    fn visit_f64<E>(self, _: f64) -> Result<UniqueMembers, E> {
        Ok(UniqueMembers)
    }
    fn visit_str<E>(self, _: &str) -> Result<UniqueMembers, E> {
        Ok(UniqueMembers)
    }
    fn visit_unit<E>(self) -> Result<UniqueMembers, E> {
        Ok(UniqueMembers)
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
}
