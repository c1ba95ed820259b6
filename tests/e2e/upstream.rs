//! Upstream stage, end to end: what reaches Dataverse (headers exactly), the S2S token's
//! life (one fetch, kept through an outage, replaced once on 401), streaming of large
//! bodies, OData link rewriting both ways, and the gateway's own error answers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::time::Duration;

use support::{client, env, expect_error, ALICE_OID};
use testkit::TokenEndpointMode;

const ACCOUNTS: &str = "/api/data/v9.2/accounts";

#[tokio::test]
async fn forwards_with_s2s_token_and_impersonation_and_strips_caller_identity_headers() {
    let env = env().start().await;
    let caller_token = env.idp.token_for(ALICE_OID);
    let response = client()
        .get(format!(
            "{}{ACCOUNTS}?$select=name&$filter=name%20eq%20%27O%27%27Neil%27",
            env.gateway.url()
        ))
        .bearer_auth(&caller_token)
        .header("MSCRMCallerID", "00000000-0000-0000-0000-00000000dead")
        .header("mscrmcallerid", "00000000-0000-0000-0000-00000000beef")
        .header("CallerObjectId", support::BOB_OID)
        .header("MSCRMCallerObjectID", support::BOB_OID)
        .header("X-Forwarded-For", "6.6.6.6")
        .header("Prefer", "odata.include-annotations=\"*\"")
        .header("If-None-Match", "null")
        .header("OData-MaxVersion", "4.0")
        .header("x-request-id", "req-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-123");
    let requests = env.dataverse.requests();
    assert_eq!(requests.len(), 1);
    let seen = &requests[0];
    assert_eq!(
        seen.path_and_query,
        format!("{ACCOUNTS}?$select=name&$filter=name%20eq%20%27O%27%27Neil%27")
    );
    let s2s = env.idp.issued_s2s_tokens();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {}", s2s[0]).as_str())
    );
    assert_eq!(seen.headers.get_all("callerobjectid").iter().count(), 1);
    assert_eq!(seen.header("callerobjectid"), Some(ALICE_OID));
    assert!(seen.header("mscrmcallerid").is_none());
    assert!(seen.header("mscrmcallerobjectid").is_none());
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(
        seen.header("prefer"),
        Some("odata.include-annotations=\"*\"")
    );
    assert_eq!(seen.header("if-none-match"), Some("null"));
    assert_eq!(seen.header("odata-maxversion"), Some("4.0"));
    assert_eq!(seen.header("x-request-id"), Some("req-123"));
    let host = env.dataverse.addr().to_string();
    assert_eq!(seen.header("host"), Some(host.as_str()));
    assert!(
        !format!("{:?}", seen.headers).contains(&caller_token),
        "the caller's token must not reach Dynamics"
    );
}

#[tokio::test]
async fn the_caller_cannot_choose_the_upstream_host() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let request = format!(
        "GET http://evil.example:9/api/data/v9.2/accounts HTTP/1.1\r\nHost: evil.example:9\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let response = support::raw_request(env.gateway.addr, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = env.dataverse.requests();
    assert_eq!(
        seen.len(),
        1,
        "the request went to the configured Dataverse"
    );
    assert_eq!(seen[0].path_and_query, ACCOUNTS);
}

#[tokio::test]
async fn paths_outside_the_web_api_are_404_and_traversal_is_400() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let response = client()
        .get(format!(
            "{}/XRMServices/2011/Organization.svc",
            env.gateway.url()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    expect_error(response, 404, "DynamicsGateway.NotProxied").await;
    let request = format!(
        "GET /api/data/v9.2/%2e%2e/%2e%2e/XRMServices HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let response = support::raw_request(env.gateway.addr, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert_eq!(env.dataverse.request_count(), 0);
}

#[tokio::test]
async fn hundred_concurrent_requests_share_one_token_fetch() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let statuses = support::concurrent_gets(&env.gateway, ACCOUNTS, &token, 100).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(env.idp.token_requests(), 1);
    assert_eq!(env.dataverse.request_count(), 100);
}

#[tokio::test]
async fn token_endpoint_down_after_start_keeps_serving_with_the_current_token() {
    let env = env().start().await;
    env.idp
        .set_token_endpoint_mode(TokenEndpointMode::ServerError);
    env.idp.set_available(false);
    for _ in 0..3 {
        let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
        assert_eq!(response.status(), 200);
    }
}

#[tokio::test]
async fn dynamics_401_causes_one_token_refresh_and_a_retry() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    assert_eq!(env.idp.token_requests(), 1);
    env.dataverse.revoke_tokens();
    let client = client();
    let url = format!("{}{ACCOUNTS}", env.gateway.url());
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let request = if i % 2 == 0 {
                client.get(&url)
            } else {
                client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(r#"{"name":"Retried"}"#)
            }
            .bearer_auth(&token);
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    for t in tasks {
        let status = t.await.unwrap();
        assert!(status == 200 || status == 204, "status {status}");
    }
    assert_eq!(env.idp.token_requests(), 2, "twenty 401s cause one refresh");
    let s2s = env.idp.issued_s2s_tokens();
    let last = env.dataverse.requests().pop().unwrap();
    assert_eq!(
        last.header("authorization"),
        Some(format!("Bearer {}", s2s[1]).as_str())
    );
}

#[tokio::test]
async fn readyz_is_503_until_first_s2s_token_and_recovers_without_restart() {
    let env = env()
        .token_endpoint(TokenEndpointMode::InvalidClient)
        .start_unready()
        .await;
    env.first_token_request().await;
    let ready = env.gateway.readyz().await;
    assert_eq!(ready.status(), 503);
    let why = ready.text().await.unwrap();
    assert!(why.contains("S2S token"), "{why}");
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    let message = expect_error(response, 503, "DynamicsGateway.NoUpstreamToken").await;
    // The cause (AADSTS code, client id) is for the log, not the caller (issue 9, point 12).
    assert!(!message.contains("AADSTS"), "{message}");
    assert!(!message.contains(&env.idp.client_secret()), "{message}");
    assert_eq!(env.dataverse.request_count(), 0);

    env.idp.set_token_endpoint_mode(TokenEndpointMode::Ok);
    env.gateway.wait_ready().await;
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn twenty_mib_upload_and_download_stream_through_intact() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    upload_is_echoed_intact(&env, &token, 20 * 1024 * 1024).await;

    let n = 20 * 1024 * 1024;
    let response = client()
        .get(format!(
            "{}/api/data/v9.2/download?bytes={n}",
            env.gateway.url()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len(), n);
    assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
}

#[tokio::test]
async fn body_over_the_limit_is_413_and_never_sent() {
    let env = env().server("  max_request_body: 1KiB\n").start().await;
    upload_is_refused_413_and_never_sent(&env, 4096).await;
}

#[tokio::test]
async fn odata_links_point_back_at_the_gateway_and_next_link_round_trips() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let gw = env.gateway.url();
    let dv = env.dataverse.url();
    // Pages of two, so the stand-in answers with a next link.
    let page_of_two = |url: &str| {
        client()
            .get(url)
            .bearer_auth(&token)
            .header("Prefer", "odata.maxpagesize=2")
            .send()
    };
    let response = page_of_two(&format!("{gw}{ACCOUNTS}?$select=name"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let page: serde_json::Value = response.json().await.unwrap();
    let context = page["@odata.context"].as_str().unwrap();
    assert!(
        context.starts_with(&format!("{gw}/api/data/v9.2/$metadata#accounts")),
        "{context}"
    );
    let next = page["@odata.nextLink"].as_str().unwrap().to_string();
    assert!(
        next.starts_with(&format!("{gw}/api/data/v9.2/accounts?")),
        "{next}"
    );
    assert!(!next.contains(&dv));
    // Following the link as given reaches the same query upstream, byte for byte.
    let response = page_of_two(&next).await.unwrap();
    assert_eq!(response.status(), 200);
    let page2: serde_json::Value = response.json().await.unwrap();
    assert_eq!(page2["value"].as_array().unwrap().len(), 1);
    let upstream_seen = env.dataverse.requests().pop().unwrap().path_and_query;
    assert_eq!(format!("{gw}{upstream_seen}"), next);

    // A create answers with OData-EntityId pointing at the gateway; @odata.bind values
    // naming the gateway reach Dataverse naming Dataverse.
    let bind = format!("{gw}/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)");
    let response = client()
        .post(format!("{gw}/api/data/v9.2/contacts"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"lastname":"Smith","parentcustomerid_account@odata.bind":"{bind}"}}"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let entity_id = response.headers()["odata-entityid"].to_str().unwrap();
    assert!(
        entity_id.starts_with(&format!("{gw}/api/data/v9.2/contacts(")),
        "{entity_id}"
    );
    let seen = env.dataverse.requests().pop().unwrap().body_text();
    assert!(
        seen.contains(&format!(
            "\"{dv}/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)\""
        )),
        "{seen}"
    );
    assert!(!seen.contains(&gw), "{seen}");
}

#[tokio::test]
async fn batch_request_lines_and_responses_are_rewritten() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let gw = env.gateway.url();
    let dv = env.dataverse.url();
    let body = format!(
        "\r\n--batch_x\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nGET {gw}/api/data/v9.2/accounts?$select=name&$orderby=name asc HTTP/1.1\r\nAccept: application/json\r\n\r\n\r\n--batch_x\r\nContent-Type: multipart/mixed;boundary=changeset_y\r\n\r\n--changeset_y\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\nPOST {gw}/api/data/v9.2/accounts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{{\"name\":\"Batched\"}}\r\n--changeset_y--\r\n--batch_x--\r\n"
    );
    let response = client()
        .post(format!("{gw}/api/data/v9.2/$batch"))
        .bearer_auth(&token)
        .header("content-type", "multipart/mixed;boundary=batch_x")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.starts_with("--batchresponse_"), "{text}");
    assert!(
        text.contains(&format!("{gw}/api/data/v9.2/accounts(")),
        "{text}"
    );
    assert!(!text.contains(&dv), "{text}");
    let seen = env
        .dataverse
        .requests()
        .into_iter()
        .find(|r| r.path_and_query.ends_with("$batch"))
        .unwrap();
    let upstream_body = seen.body_text();
    assert!(
        upstream_body.contains(&format!(
            "GET {dv}/api/data/v9.2/accounts?$select=name&$orderby=name asc HTTP/1.1"
        )),
        "{upstream_body}"
    );
    assert!(!upstream_body.contains(&gw));
}

#[tokio::test]
async fn dynamics_errors_and_throttling_pass_through_unchanged() {
    let env = env().start().await;
    env.dataverse.respond_next(
        1,
        429,
        vec![("Retry-After".into(), "7".into())],
        r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit"}}"#,
    );
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let json: serde_json::Value = response.json().await.unwrap();
    assert_eq!(json["error"]["code"], "0x80072322");
}

#[tokio::test]
async fn slow_dynamics_is_504_and_unreachable_dynamics_is_502() {
    let env = env().server("  request_timeout: 1s\n").start().await;
    env.dataverse.set_delay(Duration::from_secs(3));
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    expect_error(response, 504, "DynamicsGateway.UpstreamTimeout").await;

    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let idp = testkit::Idp::builder().start().await.unwrap();
    let yaml = support::config_yaml(&idp, &format!("http://{closed}"), "", "", "");
    let gateway = support::start_gateway(&yaml).await;
    gateway.wait_ready().await;
    let response = support::get(&gateway, ACCOUNTS, idp.token_for(ALICE_OID)).await;
    expect_error(response, 502, "DynamicsGateway.UpstreamUnreachable").await;
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_refused_before_anything_is_sent() {
    // Larger than the 64 KiB the gateway reads ahead, so only the declared length can stop it.
    let env = env().server("  max_request_body: 1MiB\n").start().await;
    upload_is_refused_413_and_never_sent(&env, 3 << 20).await;
}

#[tokio::test]
async fn path_override_headers_never_reach_dynamics() {
    let env = env().start().await;
    let response = client()
        .get(format!("{}{ACCOUNTS}", env.gateway.url()))
        .bearer_auth(env.idp.token_for(ALICE_OID))
        .header("X-Original-URL", "/XRMServices/2011/Organization.svc")
        .header("X-Rewrite-URL", "/XRMServices/2011/Organization.svc")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = env.dataverse.requests().pop().unwrap();
    assert!(seen.header("x-original-url").is_none() && seen.header("x-rewrite-url").is_none());
}

/// POSTs `size` bytes to the stand-in's echo as Alice: refused 413, and Dataverse got nothing.
/// POSTs `len` patterned bytes to the stand-in's echo and asserts they come back unchanged.
async fn upload_is_echoed_intact(env: &support::Env, token: &str, len: u32) {
    let body: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    let response = support::post(
        &env.gateway,
        "/api/data/v9.2/echo",
        token,
        "application/octet-stream",
        body.clone(),
    )
    .await;
    assert_eq!(response.status(), 200);
    let echoed = response.bytes().await.unwrap();
    assert_eq!(echoed.len(), body.len());
    assert!(echoed == body, "upload echoed intact");
}

async fn upload_is_refused_413_and_never_sent(env: &support::Env, size: usize) {
    let response = client()
        .post(format!("{}/api/data/v9.2/echo", env.gateway.url()))
        .bearer_auth(env.idp.token_for(ALICE_OID))
        .body(vec![b'x'; size])
        .send()
        .await
        .unwrap();
    expect_error(response, 413, "DynamicsGateway.RequestBodyTooLarge").await;
    assert_eq!(env.dataverse.request_count(), 0);
}

#[tokio::test]
async fn dataverse_is_spoken_to_in_the_configured_http_version() {
    use http::Version;
    for (setting, expected) in [
        (None, Version::HTTP_11),
        (Some("auto"), Version::HTTP_11),
        (Some("http1"), Version::HTTP_11),
        (Some("http2"), Version::HTTP_2),
    ] {
        let mut builder = env();
        if let Some(value) = setting {
            builder = builder.dynamics(&format!("  upstream_http: {value}\n"));
        }
        let env = builder.start().await;
        let authority = env.dataverse.addr().to_string();
        let token = env.idp.token_for(ALICE_OID);
        let statuses = support::concurrent_gets(&env.gateway, ACCOUNTS, &token, 16).await;
        assert!(
            statuses.iter().all(|s| *s == 200),
            "{setting:?}: {statuses:?}"
        );
        upload_is_echoed_intact(&env, &token, 2 * 1024 * 1024).await;
        let requests = env.dataverse.requests();
        let forwarded: Vec<_> = requests
            .iter()
            .filter(|r| !r.path_and_query.contains("systemusers"))
            .collect();
        assert_eq!(forwarded.len(), 17, "{setting:?}");
        for seen in forwarded {
            assert_eq!(
                seen.version, expected,
                "{setting:?}: {}",
                seen.path_and_query
            );
            assert_eq!(
                seen.header("callerobjectid"),
                Some(ALICE_OID),
                "{setting:?}"
            );
            assert!(seen
                .header("authorization")
                .is_some_and(|a| a.starts_with("Bearer ")));
            // HTTP/1.1 names the organisation in Host, HTTP/2 in :authority alone.
            let host = (expected == Version::HTTP_11).then_some(authority.as_str());
            assert_eq!(seen.header("host"), host, "{setting:?}");
            assert!(seen.headers.get_all("host").iter().count() <= 1);
        }
    }
}
