//! Signing material for the local identity provider, hostile-token tests and the
//! benchmarks: RSA-2048 keys (RS256 and PS256 JWTs, their JWK and public key encodings),
//! EC P-256 keys (ES256 JWTs and their JWK), HS256 signing with an arbitrary secret, and
//! unsigned (`alg: none`) tokens.
//!
//! Key generation uses aws-lc-rs (C), which makes a 2048-bit key in 80-150 ms even in a
//! debug build, so there is no
//! process-wide key pool: each IdP and each rotation generates afresh.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair as _, RsaEncoding, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
    RSA_PSS_SHA256,
};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Value};

/// Why a key could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// aws-lc-rs refused to generate the key pair.
    Generate,
    /// The public key could not be encoded (SubjectPublicKeyInfo DER, or an EC point).
    Encode,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Generate => f.write_str("signing key generation failed"),
            KeyError::Encode => f.write_str("public key encoding failed"),
        }
    }
}

impl std::error::Error for KeyError {}

impl From<KeyError> for std::io::Error {
    fn from(e: KeyError) -> Self {
        std::io::Error::other(e)
    }
}

/// An RSA-2048 key that signs RS256 (or PS256) JWTs under a `kid`.
pub struct RsaSigningKey {
    kid: String,
    key_pair: KeyPair,
    /// Big-endian modulus without leading zeros, as a JWK wants it.
    n: Vec<u8>,
    /// Big-endian public exponent without leading zeros.
    e: Vec<u8>,
    spki_der: Vec<u8>,
}

impl fmt::Debug for RsaSigningKey {
    // The private key never appears in debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RsaSigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl RsaSigningKey {
    /// Generates a fresh RSA-2048 key pair published under `kid`.
    pub fn generate(kid: impl Into<String>) -> Result<Self, KeyError> {
        let key_pair = KeyPair::generate(KeySize::Rsa2048).map_err(|_| KeyError::Generate)?;
        let public = key_pair.public_key();
        let n = public.modulus().big_endian_without_leading_zero().to_vec();
        let e = public.exponent().big_endian_without_leading_zero().to_vec();
        let spki_der = public
            .as_der()
            .map_err(|_| KeyError::Encode)?
            .as_ref()
            .to_vec();
        Ok(Self {
            kid: kid.into(),
            key_pair,
            n,
            e,
            spki_der,
        })
    }

    /// The key id published in the JWKS and put in token headers.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK: `{"kty":"RSA","use":"sig","alg":"RS256","kid","n","e"}`.
    pub fn jwk(&self) -> Value {
        self.jwk_for_alg("RS256")
    }

    /// The public key as a JWK pinned to `alg` (e.g. "PS256"): a verifier that honours the
    /// JWK's `alg` then accepts only tokens of that algorithm from this key.
    pub fn jwk_for_alg(&self, alg: &str) -> Value {
        json!({
            "kty": "RSA",
            "use": "sig",
            "alg": alg,
            "kid": self.kid,
            "n": b64url(&self.n),
            "e": b64url(&self.e),
        })
    }

    /// Modulus bytes (big-endian, no leading zeros), for tests that verify signatures.
    pub fn modulus(&self) -> &[u8] {
        &self.n
    }

    /// Public exponent bytes (big-endian, no leading zeros).
    pub fn exponent(&self) -> &[u8] {
        &self.e
    }

    /// Signs `base64url(header).base64url(claims)` with RS256. The header is used exactly
    /// as given (no `kid` or `alg` added), so tests can craft hostile headers.
    ///
    /// Signing with a freshly generated key does not fail in practice; if aws-lc-rs ever
    /// refuses, the token comes back with an empty signature so it can never verify.
    pub fn sign_jwt(&self, header: &Value, claims: &Value) -> String {
        self.sign_with(&RSA_PKCS1_SHA256, "RS256", &signing_input(header, claims))
    }

    /// As [`sign_jwt`](Self::sign_jwt), with PS256 (RSASSA-PSS, SHA-256, MGF1-SHA-256,
    /// 32-byte salt). The header is used exactly as given, so it should say `"alg":"PS256"`.
    pub fn sign_jwt_ps256(&self, header: &Value, claims: &Value) -> String {
        self.sign_with(&RSA_PSS_SHA256, "PS256", &signing_input(header, claims))
    }

    /// Signs an arbitrary signing input (`<header segment>.<payload segment>`, as given,
    /// not re-encoded) with RS256 and appends the signature: for tokens whose segments no
    /// `Value` can produce (duplicate members, non-JSON, garbage base64) that still carry a
    /// valid signature.
    pub fn sign_input(&self, signing_input: &str) -> String {
        self.sign_with(&RSA_PKCS1_SHA256, "RS256", signing_input)
    }

    fn sign_with(
        &self,
        encoding: &'static dyn RsaEncoding,
        alg: &str,
        signing_input: &str,
    ) -> String {
        let mut signature = vec![0u8; self.key_pair.public_modulus_len()];
        match self.key_pair.sign(
            encoding,
            &SystemRandom::new(),
            signing_input.as_bytes(),
            &mut signature,
        ) {
            Ok(()) => format!("{signing_input}.{}", b64url(&signature)),
            Err(_) => {
                tracing::error!(kid = %self.kid, alg, "RSA signing failed; returning an unsigned token");
                format!("{signing_input}.")
            }
        }
    }

    /// SubjectPublicKeyInfo DER of the public key. Tests use it as the HMAC secret of the
    /// "HS256 signed with the RSA public key" key-confusion attack.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.spki_der.clone()
    }

    /// The public key as PEM (`-----BEGIN PUBLIC KEY-----`), 64-column base64 lines.
    pub fn public_key_pem(&self) -> String {
        let b64 = STANDARD.encode(&self.spki_der);
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        // Base64 output is ASCII, so splitting on byte boundaries keeps whole characters.
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem
    }
}

/// An EC P-256 key that signs ES256 JWTs under a `kid`.
pub struct EcSigningKey {
    kid: String,
    key_pair: EcdsaKeyPair,
}

impl fmt::Debug for EcSigningKey {
    // The private key never appears in debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EcSigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl EcSigningKey {
    /// Generates a fresh P-256 key pair published under `kid`.
    pub fn generate(kid: impl Into<String>) -> Result<Self, KeyError> {
        let key_pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| KeyError::Generate)?;
        // SEC1 uncompressed point: 0x04 || x (32 bytes) || y (32 bytes).
        if key_pair.public_key().as_ref().len() != 65 {
            return Err(KeyError::Encode);
        }
        Ok(Self {
            kid: kid.into(),
            key_pair,
        })
    }

    /// The key id published in the JWKS and put in token headers.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as an uncompressed SEC1 point (65 bytes), for tests that verify
    /// signatures with `ECDSA_P256_SHA256_FIXED`.
    pub fn public_point(&self) -> &[u8] {
        self.key_pair.public_key().as_ref()
    }

    /// The public key as a JWK:
    /// `{"kty":"EC","crv":"P-256","use":"sig","alg":"ES256","kid","x","y"}`.
    pub fn jwk(&self) -> Value {
        let point = self.public_point();
        json!({
            "kty": "EC",
            "crv": "P-256",
            "use": "sig",
            "alg": "ES256",
            "kid": self.kid,
            "x": b64url(point.get(1..33).unwrap_or_default()),
            "y": b64url(point.get(33..65).unwrap_or_default()),
        })
    }

    /// Signs `base64url(header).base64url(claims)` with ES256 (the JOSE fixed-width
    /// `r || s` signature). The header is used exactly as given. If aws-lc-rs ever
    /// refuses, the token comes back with an empty signature so it can never verify.
    pub fn sign_jwt(&self, header: &Value, claims: &Value) -> String {
        let signing_input = signing_input(header, claims);
        match self
            .key_pair
            .sign(&SystemRandom::new(), signing_input.as_bytes())
        {
            Ok(signature) => format!("{signing_input}.{}", b64url(signature.as_ref())),
            Err(_) => {
                tracing::error!(kid = %self.kid, "ES256 signing failed; returning an unsigned token");
                format!("{signing_input}.")
            }
        }
    }
}

/// Signs `base64url(header).base64url(claims)` with HMAC-SHA256 under `secret`.
pub fn sign_hs256(secret: &[u8], header: &Value, claims: &Value) -> String {
    let signing_input = signing_input(header, claims);
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret);
    let tag = aws_lc_rs::hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", b64url(tag.as_ref()))
}

/// `base64url(header).base64url(claims).` with an empty signature segment (`alg: none`).
pub fn unsigned_jwt(header: &Value, claims: &Value) -> String {
    format!("{}.", signing_input(header, claims))
}

/// Base64url without padding, as JOSE uses it.
pub fn b64url(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn signing_input(header: &Value, claims: &Value) -> String {
    // `Value`'s Display is its compact JSON serialisation and cannot fail.
    format!(
        "{}.{}",
        b64url(header.to_string()),
        b64url(claims.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256};

    fn verify_rs256(key: &RsaSigningKey, token: &str) -> bool {
        let (input, sig) = token.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        RsaPublicKeyComponents {
            n: key.modulus(),
            e: key.exponent(),
        }
        .verify(&RSA_PKCS1_2048_8192_SHA256, input.as_bytes(), &sig)
        .is_ok()
    }

    #[test]
    fn rs256_round_trip_and_jwk_shape() {
        let key = RsaSigningKey::generate("kid-1").unwrap();
        let token = key.sign_jwt(
            &json!({"alg":"RS256","typ":"JWT","kid":"kid-1"}),
            &json!({"sub":"x"}),
        );
        assert!(verify_rs256(&key, &token));
        let jwk = key.jwk();
        assert_eq!(jwk["kty"], "RSA");
        assert_eq!(jwk["kid"], "kid-1");
        assert_eq!(jwk["e"], "AQAB");
        let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
        assert_eq!(n.len(), 256);
        let tampered = token.replacen('.', ".e30", 1);
        assert!(!verify_rs256(&key, &tampered));
    }

    #[test]
    fn ps256_round_trip_and_pinned_jwk() {
        use aws_lc_rs::signature::RSA_PSS_2048_8192_SHA256;
        let key = RsaSigningKey::generate("kid-ps").unwrap();
        let token = key.sign_jwt_ps256(&json!({"alg":"PS256","kid":"kid-ps"}), &json!({"a":1}));
        let (input, sig) = token.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        let components = RsaPublicKeyComponents {
            n: key.modulus(),
            e: key.exponent(),
        };
        assert!(components
            .verify(&RSA_PSS_2048_8192_SHA256, input.as_bytes(), &sig)
            .is_ok());
        // A PSS signature is not a PKCS#1 v1.5 one.
        assert!(!verify_rs256(&key, &token));
        assert_eq!(key.jwk_for_alg("PS256")["alg"], "PS256");
        assert_eq!(key.jwk()["alg"], "RS256");
    }

    #[test]
    fn es256_round_trip_and_jwk_shape() {
        use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
        let key = EcSigningKey::generate("kid-ec").unwrap();
        let token = key.sign_jwt(&json!({"alg":"ES256","kid":"kid-ec"}), &json!({"a":1}));
        let (input, sig) = token.rsplit_once('.').unwrap();
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        assert_eq!(sig.len(), 64, "JOSE ES256 signatures are r || s");
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.public_point());
        assert!(public.verify(input.as_bytes(), &sig).is_ok());
        assert!(public.verify(b"other input", &sig).is_err());
        let jwk = key.jwk();
        assert_eq!(jwk["kty"], "EC");
        assert_eq!(jwk["crv"], "P-256");
        assert_eq!(jwk["kid"], "kid-ec");
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
        assert_eq!([&[4u8][..], &x, &y].concat(), key.public_point());
        assert!(format!("{key:?}").contains("kid-ec"));
    }

    #[test]
    fn jsonwebtoken_accepts_ps256_and_es256_from_the_jwks() {
        use jsonwebtoken::{decode, jwk::Jwk, Algorithm, DecodingKey, Validation};
        let claims = json!({"sub":"x","exp": 4_000_000_000u64});
        let rsa = RsaSigningKey::generate("r").unwrap();
        let ec = EcSigningKey::generate("e").unwrap();
        let cases = [
            (
                Algorithm::PS256,
                rsa.jwk_for_alg("PS256"),
                rsa.sign_jwt_ps256(&json!({"alg":"PS256","kid":"r"}), &claims),
            ),
            (
                Algorithm::ES256,
                ec.jwk(),
                ec.sign_jwt(&json!({"alg":"ES256","kid":"e"}), &claims),
            ),
        ];
        for (alg, jwk, token) in cases {
            let jwk: Jwk = serde_json::from_value(jwk).unwrap();
            let key = DecodingKey::from_jwk(&jwk).unwrap();
            let mut validation = Validation::new(alg);
            validation.validate_aud = false;
            let data = decode::<Value>(&token, &key, &validation).unwrap();
            assert_eq!(data.claims["sub"], "x", "{alg:?}");
        }
    }

    #[test]
    fn pem_and_der_agree() {
        let key = RsaSigningKey::generate("k").unwrap();
        let pem = key.public_key_pem();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert_eq!(STANDARD.decode(body).unwrap(), key.public_key_der());
        assert!(pem.lines().all(|l| l.len() <= 64));
    }

    #[test]
    fn hs256_and_none() {
        let t = sign_hs256(b"secret", &json!({"alg":"HS256"}), &json!({"a":1}));
        assert_eq!(t.split('.').count(), 3);
        let u = unsigned_jwt(&json!({"alg":"none"}), &json!({"a":1}));
        assert!(u.ends_with('.'));
        assert_eq!(u.split('.').nth(2), Some(""));
    }
}
