//! Inbound stage, end to end: every refused token answers 401 with the right
//! `WWW-Authenticate`, and nothing reaches Dataverse.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use serde_json::json;
use support::{client, env, error_body, expect_error, ALICE_OID};
use testkit::keys::{self, RsaSigningKey};

const ACCOUNTS: &str = "/api/data/v9.2/accounts";

/// Sends `token` and asserts a 401 whose `WWW-Authenticate` error description contains
/// `description`, and that Dataverse saw nothing.
async fn assert_refused(env: &support::Env, token: &str, description: &str) {
    let before = env.dataverse.request_count();
    let response = support::get(&env.gateway, ACCOUNTS, token).await;
    let www = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let (status, code, message) = error_body(response).await;
    assert_eq!(status, 401, "{message}");
    assert_eq!(code, "DynamicsGateway.InvalidToken");
    assert!(www.starts_with("Bearer error=\"invalid_token\""), "{www}");
    assert!(
        www.contains(description),
        "expected {description:?} in {www}"
    );
    assert!(
        !message.contains(token) && !www.contains(token),
        "the token must never be echoed"
    );
    assert_eq!(
        env.dataverse.request_count(),
        before,
        "nothing may reach Dataverse"
    );
}

#[tokio::test]
async fn missing_token_answers_401_with_bare_bearer_challenge() {
    let env = env().start().await;
    let response = client()
        .get(format!("{}{ACCOUNTS}", env.gateway.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    expect_error(response, 401, "DynamicsGateway.MissingToken").await;
    assert_eq!(env.dataverse.request_count(), 0);
}

#[tokio::test]
async fn rejects_expired_not_yet_valid_and_wrong_audience_tokens() {
    let env = env().start().await;
    let mut claims = env.idp.claims_for(ALICE_OID);
    claims["exp"] = json!(support::now_secs() - 3600);
    claims["iat"] = json!(support::now_secs() - 7200);
    claims["nbf"] = json!(support::now_secs() - 7200);
    assert_refused(&env, &env.idp.sign(claims), "expired").await;

    let mut claims = env.idp.claims_for(ALICE_OID);
    claims["nbf"] = json!(support::now_secs() + 3600);
    assert_refused(&env, &env.idp.sign(claims), "not valid yet").await;

    let mut claims = env.idp.claims_for(ALICE_OID);
    claims["aud"] = json!("api://some-other-api");
    assert_refused(&env, &env.idp.sign(claims), "audience").await;

    let mut claims = env.idp.claims_for(ALICE_OID);
    claims.as_object_mut().unwrap().remove("exp");
    assert_refused(&env, &env.idp.sign(claims), "exp").await;
}

#[tokio::test]
async fn rejects_unknown_issuer_even_when_signed_by_a_known_key() {
    let env = env().start().await;
    let mut claims = env.idp.claims_for(ALICE_OID);
    claims["iss"] = json!("https://login.microsoftonline.com/another-tenant/v2.0");
    assert_refused(&env, &env.idp.sign(claims), "issuer").await;
}

#[tokio::test]
async fn rejects_bad_signatures() {
    let env = env().start().await;
    // A payload edited after signing.
    let token = env.idp.token_for(ALICE_OID);
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let mut claims = env.idp.claims_for(ALICE_OID);
    claims["oid"] = json!(support::BOB_OID);
    parts[1] = keys::b64url(claims.to_string().as_bytes());
    assert_refused(&env, &parts.join("."), "signature").await;

    // A different key re-using the issuer's kid.
    let impostor = RsaSigningKey::generate(env.idp.current_key().kid()).unwrap();
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": env.idp.current_key().kid()});
    let forged = impostor.sign_jwt(&header, &env.idp.claims_for(ALICE_OID));
    assert_refused(&env, &forged, "signature").await;
}

#[tokio::test]
async fn rejects_alg_none_and_hmac_signed_with_the_public_key() {
    let env = env().start().await;
    let claims = env.idp.claims_for(ALICE_OID);
    let kid = env.idp.current_key().kid().to_string();
    for alg in ["none", "None", "NONE"] {
        let token = keys::unsigned_jwt(&json!({"alg": alg, "kid": kid}), &claims);
        assert_refused(&env, &token, "algorithm").await;
    }
    let key = env.idp.current_key();
    for secret in [key.public_key_der(), key.public_key_pem().into_bytes()] {
        let token = keys::sign_hs256(
            &secret,
            &json!({"alg": "HS256", "typ": "JWT", "kid": kid}),
            &claims,
        );
        assert_refused(&env, &token, "algorithm").await;
    }
}

#[tokio::test]
async fn rejects_unknown_kid_and_refetches_at_most_once_per_interval() {
    let env = env().inbound("  jwks_refetch_interval: 1h\n").start().await;
    let fetches = env.idp.jwks_requests();
    let stranger = RsaSigningKey::generate("not-published").unwrap();
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": "not-published"});
    let token = stranger.sign_jwt(&header, &env.idp.claims_for(ALICE_OID));
    for _ in 0..5 {
        assert_refused(&env, &token, "kid").await;
    }
    // The start-up fetch counts towards the interval: random kids cause no extra fetch.
    assert_eq!(
        env.idp.jwks_requests(),
        fetches,
        "unknown kids must not hammer the IdP"
    );
}

#[tokio::test]
async fn key_rotation_at_the_idp_is_picked_up_without_restart() {
    let env = env().start().await;
    let first = env.idp.token_for(ALICE_OID);
    let ok = support::get(&env.gateway, ACCOUNTS, &first).await;
    assert_eq!(ok.status(), 200);
    let old_kid = env.idp.current_key().kid().to_string();
    let fetches = env.idp.jwks_requests();
    let new_kid = env.idp.rotate_key(false);
    assert_ne!(new_kid, old_kid);
    let second = env.idp.token_for(ALICE_OID);
    let response = support::get(&env.gateway, ACCOUNTS, &second).await;
    assert_eq!(
        response.status(),
        200,
        "token signed with the rotated-in key"
    );
    assert_eq!(
        env.idp.jwks_requests(),
        fetches + 1,
        "one refetch for the new kid"
    );
}

#[tokio::test]
async fn cached_keys_keep_working_while_the_idp_is_down() {
    let env = env().start().await;
    env.idp.set_available(false);
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn two_authorization_headers_are_refused() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let request = format!(
        "GET {ACCOUNTS} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let response = support::raw_request(env.gateway.addr, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert_eq!(env.dataverse.request_count(), 0);
}
