//! JWT validation cost per algorithm (RS256, PS256, ES256), through the gateway's real
//! inbound path: `inbound::Authenticator::authenticate(&HeaderMap)` with the keys loaded
//! from a JWKS served on loopback (see `common`).
//!
//! - `jwt/raw_verify/*`: aws-lc-rs signature verification alone, the floor the issue
//!   compares with (`UnparsedPublicKey::verify`, and `RsaPublicKeyComponents::verify`,
//!   which is what jsonwebtoken does with a key that came from a JWK's `n`/`e`; both
//!   parse the key on every call), and `ParsedPublicKey::verify_sig` with the key parsed
//!   once (the floor for a gateway that keeps parsed keys).
//! - `jwt/jsonwebtoken_decode/*`: the library call the gateway makes, without the gateway.
//! - `jwt/parse_unverified`: the gateway's peek at `alg`/`kid`/`iss` before choosing a key.
//! - `jwt/authenticate_first_seen/*`: every timed call gets a token never presented before
//!   (signed outside the timed section), so a verified-token cache can never hit.
//! - `jwt/authenticate_repeated/*`: the same token on every call (a cache's best case).
//!
//! Run: `cargo bench --bench jwt` (filter e.g. `cargo bench --bench jwt -- repeated`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use aws_lc_rs::signature::{
    ParsedPublicKey, RsaPublicKeyComponents, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::{bearer_headers, Alg, Fixture, AUDIENCE};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use dynamics_gateway::inbound::jwt::UnverifiedToken;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::hint::black_box;

/// `(signing input, signature bytes)` of a compact JWS.
fn split(token: &str) -> (&[u8], Vec<u8>) {
    let (input, sig) = token.rsplit_once('.').unwrap();
    (input.as_bytes(), URL_SAFE_NO_PAD.decode(sig).unwrap())
}

fn raw_verify(c: &mut Criterion, fx: &Fixture) {
    let mut g = c.benchmark_group("jwt/raw_verify");
    let rs = fx.token(Alg::Rs256);
    let (input, sig) = split(&rs);
    let spki = fx.keys.rs256.public_key_der();
    let unparsed = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &spki);
    assert!(unparsed.verify(input, &sig).is_ok());
    g.bench_function("RS256_unparsed_public_key", |b| {
        b.iter(|| unparsed.verify(black_box(input), black_box(&sig)))
    });
    let components = RsaPublicKeyComponents {
        n: fx.keys.rs256.modulus(),
        e: fx.keys.rs256.exponent(),
    };
    assert!(components
        .verify(&RSA_PKCS1_2048_8192_SHA256, input, &sig)
        .is_ok());
    let parsed = ParsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &spki).unwrap();
    assert!(parsed.verify_sig(input, &sig).is_ok());
    g.bench_function("RS256_parsed_public_key", |b| {
        b.iter(|| parsed.verify_sig(black_box(input), black_box(&sig)))
    });
    g.bench_function("RS256_components", |b| {
        b.iter(|| components.verify(&RSA_PKCS1_2048_8192_SHA256, black_box(input), &sig))
    });

    let ps = fx.token(Alg::Ps256);
    let (input, sig) = split(&ps);
    let components = RsaPublicKeyComponents {
        n: fx.keys.ps256.modulus(),
        e: fx.keys.ps256.exponent(),
    };
    assert!(components
        .verify(&RSA_PSS_2048_8192_SHA256, input, &sig)
        .is_ok());
    g.bench_function("PS256_components", |b| {
        b.iter(|| components.verify(&RSA_PSS_2048_8192_SHA256, black_box(input), &sig))
    });

    let es = fx.token(Alg::Es256);
    let (input, sig) = split(&es);
    let unparsed = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, fx.keys.es256.public_point());
    assert!(unparsed.verify(input, &sig).is_ok());
    g.bench_function("ES256_unparsed_public_key", |b| {
        b.iter(|| unparsed.verify(black_box(input), black_box(&sig)))
    });
    let parsed =
        ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, fx.keys.es256.public_point()).unwrap();
    assert!(parsed.verify_sig(input, &sig).is_ok());
    g.bench_function("ES256_parsed_public_key", |b| {
        b.iter(|| parsed.verify_sig(black_box(input), black_box(&sig)))
    });
    g.finish();
}

fn jsonwebtoken_decode(c: &mut Criterion, fx: &Fixture) {
    let mut g = c.benchmark_group("jwt/jsonwebtoken_decode");
    for alg in Alg::ALL {
        let (jwk, algorithm) = match alg {
            Alg::Rs256 => (fx.keys.rs256.jwk_for_alg("RS256"), Algorithm::RS256),
            Alg::Ps256 => (fx.keys.ps256.jwk_for_alg("PS256"), Algorithm::PS256),
            Alg::Es256 => (fx.keys.es256.jwk(), Algorithm::ES256),
        };
        let jwk: Jwk = serde_json::from_value(jwk).unwrap();
        let key = DecodingKey::from_jwk(&jwk).unwrap();
        // The same validation the gateway's JwksCache builds.
        let mut validation = Validation::new(algorithm);
        validation.leeway = 60;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.set_issuer(&[&fx.issuer]);
        validation.set_audience(&[AUDIENCE]);
        let token = fx.token(alg);
        jsonwebtoken::decode::<Map<String, Value>>(&token, &key, &validation).unwrap();
        g.bench_function(BenchmarkId::from_parameter(alg.name()), |b| {
            b.iter(|| {
                jsonwebtoken::decode::<Map<String, Value>>(black_box(&token), &key, &validation)
            })
        });
    }
    g.finish();
}

fn parse_unverified(c: &mut Criterion, fx: &Fixture) {
    let token = fx.token(Alg::Rs256);
    c.bench_function("jwt/parse_unverified", |b| {
        b.iter(|| UnverifiedToken::parse(black_box(&token)).map(|t| t.kid().is_some()))
    });
}

fn authenticate(c: &mut Criterion, fx: &Fixture) {
    let auth = &fx.gateway.pipeline.inbound;
    let mut g = c.benchmark_group("jwt/authenticate_repeated");
    for alg in Alg::ALL {
        let headers = bearer_headers(&fx.token(alg));
        fx.rt.block_on(auth.authenticate(&headers)).unwrap();
        g.bench_function(BenchmarkId::from_parameter(alg.name()), |b| {
            b.to_async(&fx.rt)
                .iter(|| async { auth.authenticate(black_box(&headers)).await.unwrap() })
        });
    }
    g.finish();

    // Signing a fresh RSA token costs ~25x its verification, so this group keeps its
    // iteration count small: flat sampling, 20 samples, a short measurement window.
    let mut g = c.benchmark_group("jwt/authenticate_first_seen");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(800));
    for alg in Alg::ALL {
        g.bench_function(BenchmarkId::from_parameter(alg.name()), |b| {
            b.to_async(&fx.rt).iter_custom(|iters| async move {
                let fresh: Vec<_> = (0..iters).map(|_| bearer_headers(&fx.token(alg))).collect();
                let started = Instant::now();
                for headers in &fresh {
                    black_box(auth.authenticate(headers).await.unwrap());
                }
                started.elapsed()
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let fx = Fixture::new();
    raw_verify(c, &fx);
    jsonwebtoken_decode(c, &fx);
    parse_unverified(c, &fx);
    authenticate(c, &fx);
}

criterion_group!(jwt, benches);
criterion_main!(jwt);
