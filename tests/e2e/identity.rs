//! Identity stage, end to end: each mode sends exactly one, correct impersonation header;
//! callers who cannot be mapped are refused with 403 before anything is forwarded.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use support::{env, error_body, expect_error, ALICE_EMAIL, ALICE_OID, BOB_OID};

const WHOAMI: &str = "/api/data/v9.2/WhoAmI";

async fn get_whoami(env: &support::Env, token: &str) -> reqwest::Response {
    support::get(&env.gateway, WHOAMI, token).await
}

/// The WhoAmI calls that reached Dataverse (lookups excluded).
fn forwarded(env: &support::Env) -> Vec<testkit::RecordedRequest> {
    env.dataverse
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.starts_with(WHOAMI))
        .collect()
}

#[tokio::test]
async fn caller_object_id_mode_sends_the_oid_as_caller_object_id() {
    let env = env().start().await;
    let response = get_whoami(&env, &env.idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 200);
    let who: serde_json::Value = response.json().await.unwrap();
    assert_eq!(who["UserId"], env.alice.systemuserid.as_str());
    let seen = forwarded(&env);
    assert_eq!(seen[0].header("callerobjectid"), Some(ALICE_OID));
    assert!(seen[0].header("mscrmcallerid").is_none());
}

#[tokio::test]
async fn caller_object_id_mode_refuses_a_claim_that_is_not_a_guid() {
    let env = env()
        .identity("identity:\n  mode: caller_object_id\n  claim: preferred_username\n")
        .start()
        .await;
    let response = get_whoami(&env, &env.idp.token_for(ALICE_OID)).await;
    let message = expect_error(response, 403, "DynamicsGateway.CallerNotMapped").await;
    assert!(message.contains("preferred_username"), "{message}");
    assert_eq!(env.dataverse.request_count(), 0);
}

#[tokio::test]
async fn lookup_mode_sends_the_systemuserid_and_shares_one_lookup_between_concurrent_requests() {
    let env = env()
        .identity("identity:\n  mode: lookup\n  claim: oid\n  lookup: { attribute: azureactivedirectoryobjectid }\n")
        .start()
        .await;
    let token = env.idp.token_for(ALICE_OID);
    let statuses = support::concurrent_gets(&env.gateway, WHOAMI, &token, 100).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        env.dataverse.systemuser_lookups(),
        1,
        "one lookup for one caller"
    );
    assert_eq!(env.idp.token_requests(), 1);
    let seen = forwarded(&env);
    assert_eq!(seen.len(), 100);
    for r in &seen {
        assert_eq!(
            r.header("mscrmcallerid"),
            Some(env.alice.systemuserid.as_str())
        );
        assert!(r.header("callerobjectid").is_none());
    }
    let lookup = env
        .dataverse
        .requests()
        .into_iter()
        .find(|r| r.path_and_query.contains("systemusers"))
        .unwrap();
    assert!(lookup.header("mscrmcallerid").is_none() && lookup.header("callerobjectid").is_none());
    assert!(
        lookup
            .path_and_query
            .ends_with(&format!("/systemusers(azureactivedirectoryobjectid={ALICE_OID})?$select=systemuserid,isdisabled")),
        "{}",
        lookup.path_and_query
    );
    let hits = support::metric(
        &env.gateway,
        "dynamics_gateway_identity_cache_requests_total{result=\"hit\"}",
    )
    .await;
    assert_eq!(hits, 99.0);
}

#[tokio::test]
async fn lookup_mode_refuses_unknown_and_disabled_users_and_remembers_the_answer() {
    let env = env()
        .identity("identity:\n  mode: lookup\n  claim: oid\n")
        .start()
        .await;
    let stranger = "5a5a5a5a-0000-4000-8000-000000000000";
    for _ in 0..2 {
        let (status, _, message) =
            error_body(get_whoami(&env, &env.idp.token_for(stranger)).await).await;
        assert_eq!(status, 403);
        assert!(message.contains("no Dynamics user"), "{message}");
    }
    let (status, _, message) =
        error_body(get_whoami(&env, &env.idp.token_for(BOB_OID)).await).await;
    assert_eq!(status, 403);
    assert!(message.contains("disabled"), "{message}");
    assert_eq!(
        env.dataverse.systemuser_lookups(),
        2,
        "the negative answer is cached"
    );
    assert!(forwarded(&env).is_empty());
}

#[tokio::test]
async fn lookup_by_email_escapes_the_literal_so_injection_matches_nobody() {
    let env = env()
        .identity("identity:\n  mode: lookup\n  claim: upn\n  lookup: { attribute: internalemailaddress }\n")
        .start()
        .await;
    let mut claims = env.idp.claims_for(ALICE_OID);
    claims["upn"] = serde_json::json!(ALICE_EMAIL);
    assert_eq!(get_whoami(&env, &env.idp.sign(claims)).await.status(), 200);

    let mut claims = env.idp.claims_for(ALICE_OID);
    claims["upn"] = serde_json::json!("x' or internalemailaddress ne 'x");
    let (status, _, _) = error_body(get_whoami(&env, &env.idp.sign(claims)).await).await;
    assert_eq!(status, 403);
    let lookup = env
        .dataverse
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.contains("systemusers"))
        .last()
        .unwrap();
    assert!(
        lookup
            .path_and_query
            .contains("%27x%27%27%20or%20internalemailaddress%20ne%20%27%27x%27"),
        "{}",
        lookup.path_and_query
    );
}

#[tokio::test]
async fn static_mode_maps_listed_callers_and_refuses_others() {
    let systemuserid = support::ALICE_SYSTEMUSERID;
    let env = env()
        .identity(&format!("identity:\n  mode: static\n  claim: oid\n  static:\n    \"{ALICE_OID}\": {systemuserid}\n"))
        .start()
        .await;
    let response = get_whoami(&env, &env.idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        forwarded(&env)[0].header("mscrmcallerid"),
        Some(systemuserid)
    );
    let (status, code, _) = error_body(get_whoami(&env, &env.idp.token_for(BOB_OID)).await).await;
    assert_eq!(
        (status, code.as_str()),
        (403, "DynamicsGateway.CallerNotMapped")
    );
    assert_eq!(forwarded(&env).len(), 1);
}
