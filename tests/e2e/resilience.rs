//! Limits and broken dependencies, end to end: oversized and slow callers, connection and
//! in-flight caps, the identity provider or token endpoint failing, Dataverse throttling.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::time::Duration;

use support::{client, env, error_body, expect_error, metric, raw_request, ALICE_OID};
use testkit::TokenEndpointMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ACCOUNTS: &str = "/api/data/v9.2/accounts";
const OPEN_APP_CONNECTIONS: &str = "dynamics_gateway_open_connections{listener=\"app\"}";

#[tokio::test]
async fn chunked_body_over_the_limit_is_413_and_never_sent() {
    let env = env().server("  max_request_body: 1KiB\n").start().await;
    let token = env.idp.token_for(ALICE_OID);
    let chunk = "x".repeat(512);
    let mut request = format!(
        "POST /api/data/v9.2/echo HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    for _ in 0..8 {
        request.push_str(&format!("200\r\n{chunk}\r\n"));
    }
    request.push_str("0\r\n\r\n");
    let response = raw_request(env.gateway.addr, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(
        response.contains("DynamicsGateway.RequestBodyTooLarge"),
        "{response}"
    );
    assert_eq!(env.dataverse.request_count(), 0);
}

#[tokio::test]
async fn small_chunked_body_is_forwarded_with_a_content_length() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let request = format!(
        "POST /api/data/v9.2/echo HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    );
    let response = raw_request(env.gateway.addr, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("hello world"), "{response}");
    let seen = &env.dataverse.requests()[0];
    assert_eq!(seen.header("content-length"), Some("11"));
    assert!(seen.header("transfer-encoding").is_none());
}

#[tokio::test]
async fn slowloris_client_is_cut_off_after_the_header_read_timeout() {
    let env = env().server("  header_read_timeout: 1s\n").start().await;
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    stream
        .write_all(b"GET /api/data/v9.2/accounts HTTP/1.1\r\nHost: gw\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    // Trickle a header byte now and then, never finishing the head.
    let mut buf = [0u8; 1024];
    let closed = loop {
        if started.elapsed() > Duration::from_secs(5) {
            break false;
        }
        if stream.write_all(b"X").await.is_err() {
            break true;
        }
        match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => {} // a 408 may come first; the close follows
            Err(_) => {}
        }
    };
    assert!(closed, "the connection must be closed");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed after {:?}",
        started.elapsed()
    );
    assert_eq!(env.dataverse.request_count(), 0);
}

#[tokio::test]
async fn too_many_and_oversized_headers_are_refused() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let mut many =
        format!("GET {ACCOUNTS} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n");
    for i in 0..150 {
        many.push_str(&format!("X-Filler-{i}: {i}\r\n"));
    }
    many.push_str("Connection: close\r\n\r\n");
    let response = raw_request(env.gateway.addr, many.as_bytes()).await;
    assert!(
        response.starts_with("HTTP/1.1 431"),
        "{}",
        &response[..response.len().min(200)]
    );

    let big = format!(
        "GET {ACCOUNTS} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "y".repeat(100 * 1024)
    );
    let response = raw_request(env.gateway.addr, big.as_bytes()).await;
    assert!(
        response.starts_with("HTTP/1.1 431"),
        "{}",
        &response[..response.len().min(200)]
    );
    assert_eq!(env.dataverse.request_count(), 0);
}

#[tokio::test]
async fn connections_over_the_cap_get_503_and_close() {
    // The per-address cap (a tenth of 2, so 1) off: this is about the global cap.
    let env = env()
        .server("  max_connections: 2\n  max_connections_per_peer: 0\n")
        .start()
        .await;
    let first = TcpStream::connect(env.gateway.addr).await.unwrap();
    let second = TcpStream::connect(env.gateway.addr).await.unwrap();
    let open = || metric(&env.gateway, OPEN_APP_CONNECTIONS);
    support::eventually("both connections are accepted", || async {
        open().await == 2.0
    })
    .await;
    let response = raw_request(
        env.gateway.addr,
        b"GET /api/data/v9.2/accounts HTTP/1.1\r\nHost: gw\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("Retry-After: 1"), "{response}");
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    let json: serde_json::Value = serde_json::from_str(body).expect("a complete JSON error body");
    assert_eq!(json["error"]["code"], "DynamicsGateway.TooManyConnections");
    drop((first, second));
    support::eventually("the connections are closed", || async {
        open().await == 0.0
    })
    .await;
    let ok = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    assert_eq!(ok.status(), 200, "a slot frees when a connection closes");
}

#[tokio::test]
async fn requests_over_the_in_flight_cap_get_503_with_retry_after() {
    let env = env().server("  max_in_flight: 2\n").start().await;
    env.dataverse.set_delay(Duration::from_millis(1500));
    let token = env.idp.token_for(ALICE_OID);
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let request = client()
                .get(format!("{}{ACCOUNTS}", env.gateway.url()))
                .bearer_auth(&token);
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    support::eventually("both slow requests are in flight", || async {
        env.dataverse.in_flight() == 2
    })
    .await;
    let started = tokio::time::Instant::now();
    let response = support::get(&env.gateway, ACCOUNTS, &token).await;
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "answered at once, not queued"
    );
    assert_eq!(response.headers()["retry-after"], "1");
    expect_error(response, 503, "DynamicsGateway.Overloaded").await;
    for t in slow {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(env.dataverse.request_count(), 2);
}

#[tokio::test]
async fn idp_down_at_start_up_leaves_the_gateway_unready_until_it_returns() {
    let env = env().idp_down().start_unready().await;
    support::eventually("a key fetch has failed", || async {
        metric(
            &env.gateway,
            "dynamics_gateway_jwks_refresh_total{result=\"failure\"}",
        )
        .await
            >= 1.0
    })
    .await;
    let ready = env.gateway.readyz().await;
    assert_eq!(ready.status(), 503);
    let why = ready.text().await.unwrap();
    assert!(why.contains("signing keys"), "{why}");
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    expect_error(response, 503, "DynamicsGateway.IdentityProviderUnavailable").await;

    env.idp.set_available(true);
    env.gateway.wait_ready().await;
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn unusable_token_responses_keep_the_gateway_unready_and_are_counted() {
    for mode in [
        TokenEndpointMode::InvalidJson,
        TokenEndpointMode::NoExpiresIn,
        TokenEndpointMode::ServerError,
    ] {
        let env = env().token_endpoint(mode.clone()).start_unready().await;
        support::eventually("two token requests", || async {
            env.idp.token_requests() >= 2
        })
        .await;
        let ready = env.gateway.readyz().await;
        assert_eq!(ready.status(), 503, "{mode:?}");
        assert_eq!(
            metric(&env.gateway, "dynamics_gateway_ready").await,
            0.0,
            "{mode:?}: the gauge agrees with /readyz"
        );
        let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
        let (status, _, message) = error_body(response).await;
        assert_eq!(status, 503, "{mode:?}: {message}");
        assert!(message.contains("token endpoint"), "{mode:?}: {message}");
        assert!(
            metric(
                &env.gateway,
                "dynamics_gateway_token_requests_total{environment=\"default\",result=\"failure\"}"
            )
            .await
                >= 2.0
        );
        env.idp.set_token_endpoint_mode(TokenEndpointMode::Ok);
        env.gateway.wait_ready().await;
        assert_eq!(metric(&env.gateway, "dynamics_gateway_ready").await, 1.0);
    }
}

#[tokio::test]
async fn s2s_token_is_refreshed_in_the_background_and_the_new_one_is_sent() {
    // expires_in 10 s (the shortest accepted): refreshed at 5 s, the first token still
    // usable until 7.5 s, so a request right after the refresh tells which one is sent.
    let env = env()
        .idp(|i| i.s2s_token_lifetime(10).expires_in_as_string(true))
        .start()
        .await;
    let token = env.idp.token_for(ALICE_OID);
    support::eventually("the background refresh", || async {
        env.idp.token_requests() >= 2
    })
    .await;
    assert_eq!(
        env.idp.token_requests(),
        2,
        "refreshed before expiry, in the background"
    );
    let response = support::get(&env.gateway, ACCOUNTS, &token).await;
    assert_eq!(response.status(), 200);
    let s2s = env.idp.issued_s2s_tokens();
    assert_eq!(
        env.dataverse
            .requests()
            .pop()
            .unwrap()
            .header("authorization"),
        Some(format!("Bearer {}", s2s[1]).as_str())
    );
    // The margin, the 503 once no token is usable and the recovery are the refresher's
    // schedule, driven under paused time in `upstream::token`'s unit tests.
}

#[tokio::test]
async fn throttled_idempotent_requests_are_retried_after_retry_after_when_enabled() {
    let env = env().start().await;
    let throttle = |n| {
        env.dataverse.respond_next(
            n,
            429,
            vec![("Retry-After".into(), "1".into())],
            r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit"}}"#,
        )
    };
    // Off by default: the 429 goes back unchanged.
    throttle(1);
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 429);

    let env = support::env()
        .dynamics("  retry_throttled: { enabled: true, max_wait: 3s }\n")
        .start()
        .await;
    env.dataverse
        .respond_next(1, 429, vec![("Retry-After".into(), "1".into())], "{}");
    let started = tokio::time::Instant::now();
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(env.dataverse.request_count(), 2);

    // Not idempotent: POST is never retried.
    env.dataverse
        .respond_next(1, 429, vec![("Retry-After".into(), "1".into())], "{}");
    let response = support::post(
        &env.gateway,
        ACCOUNTS,
        env.idp.token_for(ALICE_OID),
        "application/json",
        r#"{"name":"x"}"#,
    )
    .await;
    assert_eq!(response.status(), 429);
    assert_eq!(env.dataverse.request_count(), 3);
}

/// `Retry-After: 0` on every answer must not turn one request into a retry storm: retries
/// wait at least a second and stop after three, so Dataverse sees four calls at most.
#[tokio::test]
async fn retry_after_zero_is_retried_a_bounded_number_of_times() {
    let env = support::env()
        .dynamics("  retry_throttled: { enabled: true, max_wait: 10s }\n")
        .start()
        .await;
    env.dataverse.respond_next(
        20,
        429,
        vec![("Retry-After".into(), "0".into())],
        r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit"}}"#,
    );
    let before = env.dataverse.request_count();
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 429);
    assert_eq!(
        env.dataverse.request_count() - before,
        4,
        "one call and three retries"
    );
}

#[tokio::test]
async fn a_flood_of_distinct_callers_stays_within_the_identity_cache_bound() {
    let env = env()
        .identity("identity:\n  mode: lookup\n  claim: oid\n  cache_max_entries: 5\n")
        .start()
        .await;
    // Thirty distinct valid callers (unknown users: each answer is a cached 403).
    for i in 0..30u32 {
        let oid = format!("00000000-0000-4000-8000-{i:012}");
        let r = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(&oid)).await;
        assert_eq!(r.status(), 403);
    }
    assert_eq!(env.dataverse.systemuser_lookups(), 30);
    // The bound holds: asking again for all thirty cannot be answered from a cache of five.
    for i in 0..30u32 {
        let oid = format!("00000000-0000-4000-8000-{i:012}");
        support::get(&env.gateway, ACCOUNTS, env.idp.token_for(&oid)).await;
    }
    // moka enforces the bound asynchronously, so allow it a little slack.
    assert!(
        env.dataverse.systemuser_lookups() >= 30 + 20,
        "at most a handful of 30 answers can still be cached"
    );
}

#[tokio::test]
async fn a_token_endpoint_that_never_answers_is_timed_out_and_retried() {
    let env = env()
        .token_endpoint(TokenEndpointMode::Hang)
        .dynamics("  token_timeout: 500ms\n")
        .start_unready()
        .await;
    env.first_token_request().await;
    let ready = env.gateway.readyz().await;
    assert_eq!(ready.status(), 503);
    env.idp.set_token_endpoint_mode(TokenEndpointMode::Ok);
    // The hung request is abandoned after `dynamics.token_timeout`, counted, and retried.
    support::eventually("a token after the retry", || async {
        metric(
            &env.gateway,
            "dynamics_gateway_token_requests_total{environment=\"default\",result=\"success\"}",
        )
        .await
            >= 1.0
    })
    .await;
    assert!(
        metric(
            &env.gateway,
            "dynamics_gateway_token_requests_total{environment=\"default\",result=\"failure\"}"
        )
        .await
            >= 1.0
    );
    env.gateway.wait_ready().await;
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_request_waiting_for_the_first_token_gives_up_at_its_own_deadline() {
    let env = env()
        .token_endpoint(TokenEndpointMode::Hang)
        .dynamics("  token_timeout: 5m\n")
        .server("  request_timeout: 1s\n  exchange_timeout: 1s\n")
        .start_unready()
        .await;
    env.first_token_request().await;
    // Far below token_timeout: without the bound the request would still be waiting.
    let response = client()
        .get(format!("{}{ACCOUNTS}", env.gateway.url()))
        .bearer_auth(env.idp.token_for(ALICE_OID))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("answered within the exchange timeout, not token_timeout");
    expect_error(response, 503, "DynamicsGateway.NoUpstreamToken").await;
    assert_eq!(env.dataverse.request_count(), 0, "nothing forwarded");
}

#[tokio::test]
async fn a_caller_hanging_up_before_the_answer_is_still_counted_and_releases_its_slot() {
    let env = env().start().await;
    env.dataverse.set_delay(Duration::from_secs(3));
    let token = env.idp.token_for(ALICE_OID);
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    stream
        .write_all(
            format!("GET {ACCOUNTS} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    // Wait until the request is in flight upstream, then hang up.
    support::eventually("the request is in flight upstream", || async {
        env.dataverse.request_count() > 0
    })
    .await;
    assert_eq!(env.dataverse.request_count(), 1);
    assert_eq!(
        metric(&env.gateway, "dynamics_gateway_in_flight_requests").await,
        1.0
    );
    drop(stream);
    let mut counted = 0.0;
    for _ in 0..100 {
        counted = metric(
            &env.gateway,
            "dynamics_gateway_requests_total{environment=\"default\",method=\"GET\",status=\"499\"}",
        )
        .await;
        if counted > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(counted, 1.0, "the hung-up request is counted as 499");
    assert_eq!(
        metric(&env.gateway, "dynamics_gateway_in_flight_requests").await,
        0.0,
        "and its in-flight slot is released"
    );
}
