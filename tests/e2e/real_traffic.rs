//! Real clients' habits through the gateway: compressed answers and bodies. The stand-in
//! Dataverse compresses JSON and `$batch` answers the way the real service does when asked,
//! so a link left unrewritten inside a compressed body would show here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::io::{Read, Write};

use serde_json::Value;
use support::{client, env, error_body, expect_error, ALICE_OID};

const ACCOUNTS: &str = "/api/data/v9.2/accounts";

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn unbrotli(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    brotli::Decompressor::new(bytes, 4096)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// GET through the gateway with `Accept-Encoding`; (content-encoding, decoded JSON).
async fn compressed_get(url: &str, token: &str, accept: &str) -> (Option<String>, Value) {
    let response = client()
        .get(url)
        .bearer_auth(token)
        .header("Accept-Encoding", accept)
        .header("Prefer", "odata.maxpagesize=2")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let coding = response
        .headers()
        .get("content-encoding")
        .map(|v| v.to_str().unwrap().to_string());
    let raw = response.bytes().await.unwrap();
    let plain = match coding.as_deref() {
        Some("gzip") => gunzip(&raw),
        Some("br") => unbrotli(&raw),
        None => raw.to_vec(),
        Some(other) => panic!("unexpected coding {other}"),
    };
    (coding, serde_json::from_slice(&plain).unwrap())
}

#[tokio::test]
async fn compressed_pages_have_their_links_rewritten_and_stay_compressed() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let gw = env.gateway.url();
    let dv = env.dataverse.url();
    for (accept, expected) in [("gzip, deflate", "gzip"), ("gzip, deflate, br", "br")] {
        let (coding, page) =
            compressed_get(&format!("{gw}{ACCOUNTS}?$select=name"), &token, accept).await;
        assert_eq!(
            coding.as_deref(),
            Some(expected),
            "the caller gets the coding it accepts"
        );
        let text = page.to_string();
        assert!(
            !text.contains(&dv),
            "{accept}: no link names Dataverse: {text}"
        );
        let next = page["@odata.nextLink"].as_str().unwrap();
        assert!(next.starts_with(&format!("{gw}{ACCOUNTS}?")), "{next}");
        assert!(page["@odata.context"].as_str().unwrap().starts_with(&gw));
        // The next page, followed as given, comes back through the gateway too.
        let (_, page2) = compressed_get(next, &token, accept).await;
        assert_eq!(page2["value"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn dataverse_is_offered_only_codings_the_caller_accepts_and_the_gateway_decodes() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    for (accept, offered) in [
        (None, "identity"),
        (Some("zstd"), "identity"),
        (Some("zstd, gzip;q=0.5"), "gzip"),
        (Some("*"), "gzip, deflate, br"),
    ] {
        let mut request = client()
            .get(format!("{}{ACCOUNTS}", env.gateway.url()))
            .bearer_auth(&token);
        if let Some(accept) = accept {
            request = request.header("Accept-Encoding", accept);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        if offered == "identity" {
            assert!(response.headers().get("content-encoding").is_none());
            let page: Value = response.json().await.unwrap();
            assert!(page["value"].is_array());
        }
        let seen = env.dataverse.requests().pop().unwrap();
        assert_eq!(seen.header("accept-encoding"), Some(offered), "{accept:?}");
    }
}

#[tokio::test]
async fn bodies_the_gateway_does_not_rewrite_pass_compressed_and_untouched() {
    let env = env().start().await;
    // Not gzip at all: the gateway must not try to decode what it does not rewrite.
    let opaque = "\u{1f}\u{8b}not-really-gzip-file-content";
    env.dataverse.respond_next(
        1,
        200,
        vec![
            ("Content-Type".into(), "application/octet-stream".into()),
            ("Content-Encoding".into(), "gzip".into()),
        ],
        opaque,
    );
    let response = client()
        .get(format!(
            "{}{ACCOUNTS}(00000000-0000-0000-0000-000000000001)/entityimage/$value",
            env.gateway.url()
        ))
        .bearer_auth(env.idp.token_for(ALICE_OID))
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-encoding"], "gzip");
    assert_eq!(response.bytes().await.unwrap(), opaque.as_bytes());
}

/// Dataverse answering gzip to a caller that accepts only identity (as if it ignored the
/// `Accept-Encoding` the gateway sent): the caller gets identity, links rewritten, and a
/// `Vary` for caches.
#[tokio::test]
async fn a_coding_the_caller_does_not_accept_is_decoded_for_it() {
    let env = env().start().await;
    let page = format!(
        r#"{{"@odata.context":"{}/api/data/v9.2/$metadata#accounts","value":[]}}"#,
        env.dataverse.url()
    );
    let file = b"file bytes, not rewritten".to_vec();
    for (content_type, body) in [
        (
            "application/json; odata.metadata=minimal",
            page.as_bytes().to_vec(),
        ),
        ("application/octet-stream", file.clone()),
    ] {
        env.dataverse.respond_next_bytes(
            1,
            200,
            vec![
                ("Content-Type".into(), content_type.into()),
                ("Content-Encoding".into(), "gzip".into()),
            ],
            gzip(&body).into(),
        );
        let response = client()
            .get(format!("{}{ACCOUNTS}", env.gateway.url()))
            .bearer_auth(env.idp.token_for(ALICE_OID))
            .header("Accept-Encoding", "identity")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response.headers().get("content-encoding").is_none(),
            "{content_type}: {:?}",
            response.headers()
        );
        assert_eq!(response.headers()["vary"], "accept-encoding");
        let received = response.bytes().await.unwrap().to_vec();
        if content_type.starts_with("application/json") {
            let text = String::from_utf8(received).unwrap();
            let expected = format!("{}/api/data/v9.2/$metadata#accounts", env.gateway.url());
            assert!(text.contains(&expected), "{text}");
        } else {
            assert_eq!(received, file);
        }
    }
}

/// An answer labelled gzip whose bytes are not gzip is refused before its head: 502 in the
/// gateway's error shape, not a 200 whose body breaks off.
#[tokio::test]
async fn an_answer_that_does_not_decode_is_a_502_not_a_broken_200() {
    let env = env().start().await;
    let not_gzip = b"\x1b\x03\x00this is not a gzip stream at all".to_vec();
    for accept in ["gzip", "identity"] {
        env.dataverse.respond_next_bytes(
            1,
            200,
            vec![
                ("Content-Type".into(), "application/json".into()),
                ("Content-Encoding".into(), "gzip".into()),
            ],
            not_gzip.clone().into(),
        );
        let response = client()
            .get(format!("{}{ACCOUNTS}", env.gateway.url()))
            .bearer_auth(env.idp.token_for(ALICE_OID))
            .header("Accept-Encoding", accept)
            .send()
            .await
            .unwrap();
        let (status, code, message) = error_body(response).await;
        assert_eq!(status, 502, "{accept}: {message}");
        assert!(code.starts_with("DynamicsGateway."), "{code}");
    }
}

#[tokio::test]
async fn a_gzipped_request_body_is_decoded_for_the_bind_rewrite() {
    let env = env().start().await;
    let gw = env.gateway.url();
    let dv = env.dataverse.url();
    let body = format!(
        r#"{{"name":"Gzipped","primarycontactid@odata.bind":"{gw}/api/data/v9.2/contacts(00000000-0000-0000-0000-000000000001)"}}"#
    );
    let response = client()
        .post(format!("{gw}{ACCOUNTS}"))
        .bearer_auth(env.idp.token_for(ALICE_OID))
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "gzip")
        .body(gzip(body.as_bytes()))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let seen = env.dataverse.requests().pop().unwrap();
    assert!(seen.header("content-encoding").is_none(), "sent decoded");
    let upstream_body = seen.body_text();
    assert!(
        upstream_body.contains(&format!("{dv}/api/data/v9.2/contacts(")),
        "{status}: {upstream_body}"
    );
    assert!(!upstream_body.contains(&gw));
    assert_eq!(
        seen.header("content-length"),
        Some(upstream_body.len().to_string().as_str())
    );
}

#[tokio::test]
async fn a_compressed_request_body_is_bounded_by_its_decoded_size() {
    let env = env().server("  max_request_body: 1MiB\n").start().await;
    let token = env.idp.token_for(ALICE_OID);
    // 32 MiB of JSON whitespace compress to about 32 KiB: under the limit on the wire.
    let mut bomb = b"{\"name\":\"x\"".to_vec();
    bomb.extend(std::iter::repeat_n(b' ', 32 << 20));
    bomb.push(b'}');
    let compressed = gzip(&bomb);
    assert!(compressed.len() < 1 << 20);
    let before = env.dataverse.request_count();
    let response = client()
        .post(format!("{}{ACCOUNTS}", env.gateway.url()))
        .bearer_auth(&token)
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "gzip")
        .body(compressed)
        .send()
        .await
        .unwrap();
    expect_error(response, 413, "DynamicsGateway.RequestBodyTooLarge").await;
    // A stream cut off mid-way may have opened the request upstream, never completed it.
    assert!(
        env.dataverse
            .records("accounts")
            .iter()
            .all(|a| a["name"] != "x"),
        "nothing was created"
    );
    let _ = before;

    let response = client()
        .post(format!("{}{ACCOUNTS}", env.gateway.url()))
        .bearer_auth(&token)
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "zstd")
        .body("(zstd bytes)")
        .send()
        .await
        .unwrap();
    expect_error(response, 415, "DynamicsGateway.UnsupportedContentEncoding").await;
}

#[tokio::test]
async fn a_compressed_answer_that_inflates_past_the_cap_is_cut_off_not_held() {
    let env = env()
        .server("  max_decoded_response_body: 300B\n")
        .start()
        .await;
    let response = client()
        .get(format!("{}{ACCOUNTS}", env.gateway.url()))
        .bearer_auth(env.idp.token_for(ALICE_OID))
        .header("Accept-Encoding", "gzip")
        .send()
        .await;
    // Never a complete 200: a 502 when the cap is passed before the head goes out, else
    // the body breaks off.
    if let Ok(response) = response {
        let status = response.status();
        let body = response.bytes().await;
        assert!(
            status == 502 || body.is_err(),
            "{status}: the answer ends with an error past the cap"
        );
    }
    // Uncompressed answers are not decoded, so the cap does not apply to them.
    let response = client()
        .get(format!("{}{ACCOUNTS}", env.gateway.url()))
        .bearer_auth(env.idp.token_for(ALICE_OID))
        .send()
        .await
        .unwrap();
    let page: Value = response.json().await.unwrap();
    assert!(page["value"].as_array().unwrap().len() > 1);
}
