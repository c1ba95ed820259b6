//! `$batch` parts as an attacker writes them, end to end through the real gateway and a
//! stand-in Dataverse that honours a part's own impersonation headers (the worst case):
//! a part cannot choose whom it runs as, carry credentials, cookies or method overrides,
//! pass a control header its grant does not allow, or name another host or path; .NET-style
//! parts with `Content-Length` are rewritten with their lengths fixed, within a bound. Also
//! top-level method overrides and all-dot path segments.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use serde_json::json;
use support::{client, env, error_body, raw_request, Env, ALICE_OID, ALICE_SYSTEMUSERID};
use testkit::{DirectoryUser, RecordedRequest};

const BOUNDARY: &str = "batch_7d2f";

/// A user the attacker would like to be.
const VICTIM_OID: &str = "c0ffee00-1111-4222-8333-944455556666";

async fn post_batch(env: &Env, token: &str, body: impl Into<String>) -> reqwest::Response {
    post_batch_to(env, "/api/data/v9.2/$batch", token, body).await
}

/// [`post_batch`] to another path.
async fn post_batch_to(
    env: &Env,
    path: &str,
    token: &str,
    body: impl Into<String>,
) -> reqwest::Response {
    client()
        .post(format!("{}{path}", env.gateway.url()))
        .bearer_auth(token)
        .header(
            "content-type",
            format!("multipart/mixed; boundary={BOUNDARY}"),
        )
        .body(body.into())
        .send()
        .await
        .unwrap()
}

/// `$batch` requests the stand-in received.
fn batches(env: &Env) -> Vec<RecordedRequest> {
    env.dataverse
        .requests()
        .into_iter()
        .filter(|r| r.path_and_query.ends_with("$batch"))
        .collect()
}

/// A batch of one part: `part_headers` (each line ending in CRLF) after its Content-Type,
/// then `request` (request line and any header lines) with an empty body.
fn one_part(part_headers: &str, request: &str) -> String {
    format!(
        "--{BOUNDARY}\r\nContent-Type: application/http\r\n{part_headers}\r\n{request}\r\n\r\n\r\n--{BOUNDARY}--\r\n"
    )
}

/// Posts `body` and checks the gateway refused it with 400 `BatchPartRefused` (`case`
/// says what was sent, for the failure message); returns the error message.
async fn part_refused(env: &Env, token: &str, body: String, case: &str) -> String {
    let (status, code, message) = error_body(post_batch(env, token, body).await).await;
    assert_eq!(
        (status, code.as_str()),
        (400, "DynamicsGateway.BatchPartRefused"),
        "{case}: {message}"
    );
    message
}

/// One GET WhoAmI part with extra header lines, at top level.
fn whoami_batch(extra_headers: &str) -> String {
    format!(
        "--{BOUNDARY}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 9\r\n\r\nGET /api/data/v9.2/WhoAmI HTTP/1.1\r\nAccept: application/json\r\n{extra_headers}\r\n\r\n--{BOUNDARY}--\r\n"
    )
}

/// The same inside a change set, after a harmless part.
fn whoami_in_changeset(extra_headers: &str) -> String {
    format!(
        "--{BOUNDARY}\r\nContent-Type: multipart/mixed; boundary=cs_1\r\n\r\n--cs_1\r\nContent-Type: application/http\r\nContent-ID: 1\r\n\r\nPOST /api/data/v9.2/accounts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{{\"name\":\"harmless\"}}\r\n--cs_1\r\nContent-Type: application/http\r\nContent-ID: 2\r\n\r\nPATCH /api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001) HTTP/1.1\r\nContent-Type: application/json\r\n{extra_headers}\r\n{{\"name\":\"x\"}}\r\n--cs_1--\r\n--{BOUNDARY}--\r\n"
    )
}

/// An environment whose organisation also has the victim; its systemuserid.
async fn env_with_victim() -> (Env, String) {
    let env = env().start().await;
    let victim = DirectoryUser::new(VICTIM_OID, "victim@contoso.example");
    env.dataverse.add_user(victim.clone());
    (env, victim.systemuserid)
}

#[tokio::test]
async fn the_stand_in_runs_a_part_as_whoever_its_own_header_names() {
    // The worst case the gateway must guard against: sent straight to Dataverse with the
    // gateway's token, a part's CallerObjectId (any spelling) wins over the batch's.
    let (env, victim) = env_with_victim().await;
    let token = env.idp.token_for(ALICE_OID);
    assert_eq!(
        support::get(&env.gateway, "/api/data/v9.2/WhoAmI", &token)
            .await
            .status(),
        200
    );
    let s2s = env.idp.issued_s2s_tokens().pop().unwrap();
    for spelling in ["CallerObjectId", "caller_object_id", "MSCRM.CallerObjectId"] {
        let text = support::text_of(
            client()
                .post(format!("{}/api/data/v9.2/$batch", env.dataverse.url()))
                .bearer_auth(&s2s)
                .header("CallerObjectId", ALICE_OID)
                .header(
                    "content-type",
                    format!("multipart/mixed; boundary={BOUNDARY}"),
                )
                .body(whoami_batch(&format!("{spelling}: {VICTIM_OID}\r\n"))),
        )
        .await;
        assert!(text.contains(&victim), "{spelling}: {text}");
        assert!(!text.contains(ALICE_SYSTEMUSERID), "{spelling}: {text}");
    }
}

#[tokio::test]
async fn a_part_with_identity_credentials_cookies_or_overrides_refuses_the_whole_batch() {
    let (env, victim) = env_with_victim().await;
    let token = env.idp.token_for(ALICE_OID);
    let headers = [
        format!("CallerObjectId: {VICTIM_OID}"),
        format!("callerobjectid: {VICTIM_OID}"),
        format!("Caller_Object_Id: {VICTIM_OID}"),
        "MSCRMCallerID: 00000000-0000-0000-0000-0000000000aa".to_string(),
        "MSCRM-CallerID: 00000000-0000-0000-0000-0000000000aa".to_string(),
        "MSCRMCallerObjectID: 00000000-0000-0000-0000-0000000000aa".to_string(),
        "Authorization: Bearer stolen".to_string(),
        "Proxy-Authorization: Basic eDp5".to_string(),
        "Cookie: ARRAffinity=abc".to_string(),
        "X-HTTP-Method: DELETE".to_string(),
        "X-HTTP-Method-Override: DELETE".to_string(),
        "X_Method_Override: DELETE".to_string(),
        "X-Original-URL: /api/data/v9.2/systemusers".to_string(),
        "x_rewrite_url: /api/data/v9.2/systemusers".to_string(),
        // A body the gateway could not read for its pairs and links.
        "Content-Encoding: gzip".to_string(),
    ];
    for header in &headers {
        let name = header.split(':').next().unwrap();
        for (body, part) in [
            (
                whoami_batch(&format!("{header}\r\n")),
                "part 1 (Content-ID 9)",
            ),
            (
                whoami_in_changeset(&format!("{header}\r\n")),
                "part 3 (Content-ID 2)",
            ),
        ] {
            let message = part_refused(&env, &token, body, header).await;
            assert!(message.contains(&format!("`{name}`")), "{message}");
            assert!(message.contains(part), "{message}");
        }
    }
    assert!(batches(&env).is_empty(), "a refused batch reached Dynamics");
    assert!(
        env.dataverse
            .records("accounts")
            .iter()
            .all(|r| r["name"] != "harmless"),
        "a part of a refused batch ran"
    );
    // The same batch without the header goes through and runs as the caller.
    let response = post_batch(&env, &token, whoami_batch("")).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains(ALICE_SYSTEMUSERID), "{text}");
    assert!(!text.contains(&victim), "{text}");
}

const BYPASS_POLICY: &str = "identity:
  mode: caller_object_id
access:
  default: deny
  rules:
    - name: trusted-batch
      when: { scp: [Dynamics.Bypass] }
      allow: { methods: [GET, POST], entity_sets: [\"*\"], batch: true, control_headers: [MSCRM.BypassCustomPluginExecution] }
    - name: plain-batch
      when: {}
      allow: { methods: [GET, POST], entity_sets: [\"*\"], batch: true }
";

#[tokio::test]
async fn control_headers_in_parts_are_decided_by_the_grant_as_at_top_level() {
    // Issue 10: a part's bypass header no rule grants refuses the whole batch with 403
    // naming header and part (it used to be dropped from the part silently), exactly as
    // the same header at top level; harmless control headers pass in parts too.
    let env = env().identity(BYPASS_POLICY).start().await;
    let mut claims = env.idp.claims_for(ALICE_OID);
    let plain = env.idp.sign(claims.clone());
    claims["scp"] = json!("Dynamics.Bypass");
    let trusted = env.idp.sign(claims);
    let granted =
        "MSCRM.BypassCustomPluginExecution: true\r\nMSCRM.SolutionUniqueName: ContosoCore\r\n";
    let never_granted = "MSCRM.BypassBusinessLogicExecution: CustomSync\r\n";
    for (token, part_header, top_header, passes) in [
        (&plain, granted, "MSCRM.BypassCustomPluginExecution", false),
        (&trusted, granted, "MSCRM.BypassCustomPluginExecution", true),
        (
            &trusted,
            never_granted,
            "MSCRM.BypassBusinessLogicExecution",
            false,
        ),
    ] {
        let before = env.dataverse.request_count();
        // Top level: the decision the part must match.
        let top = client()
            .get(format!("{}/api/data/v9.2/headers", env.gateway.url()))
            .bearer_auth(token)
            .header(top_header, "true")
            .send()
            .await
            .unwrap();
        assert_eq!(top.status() == 200, passes, "{top_header}");

        let response = post_batch(&env, token, whoami_batch(part_header)).await;
        if passes {
            assert_eq!(response.status(), 200);
            let seen = batches(&env).pop().unwrap().body_text();
            assert!(
                seen.contains("MSCRM.BypassCustomPluginExecution: true\r\n"),
                "{seen}"
            );
            assert!(
                seen.contains("MSCRM.SolutionUniqueName: ContosoCore\r\n"),
                "{seen}"
            );
            assert!(seen.contains("Accept: application/json\r\n"), "{seen}");
        } else {
            let (status, code, message) = error_body(response).await;
            assert_eq!(status, 403);
            assert_eq!(code, "DynamicsGateway.ControlHeaderNotAllowed");
            let name = part_header.split(':').next().unwrap();
            assert!(message.contains(&format!("`{name}`")), "{message}");
            assert!(message.contains("part 1 (Content-ID 9)"), "{message}");
            assert_eq!(
                env.dataverse.request_count(),
                before,
                "nothing reached Dynamics"
            );
        }
    }
}

#[tokio::test]
async fn parts_naming_another_host_or_a_path_outside_api_data_are_refused() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let gw = env.gateway.url();
    for line in [
        "GET https://evil.example/api/data/v9.2/accounts HTTP/1.1".to_string(),
        format!("GET {}/api/data/v9.2/accounts HTTP/1.1", env.idp.issuer()),
        format!("GET {gw}@evil.example/api/data/v9.2/accounts HTTP/1.1"),
        "GET /XRMServices/2011/Organization.svc HTTP/1.1".to_string(),
        "GET /api/data/v9.2/../../XRMServices/2011/Organization.svc HTTP/1.1".to_string(),
        "GET /api/data/v9.2/.../accounts HTTP/1.1".to_string(),
        format!("GET {gw}/admin HTTP/1.1"),
        "POST /api/data/v9.2/$batch HTTP/1.1".to_string(),
    ] {
        let body = one_part("", &line);
        let message = part_refused(&env, &token, body, &line).await;
        assert!(message.contains("part 1"), "{message}");
    }
    let host = one_part(
        "",
        "GET /api/data/v9.2/accounts HTTP/1.1\r\nHost: evil.example",
    );
    let (status, _, message) = error_body(post_batch(&env, &token, host).await).await;
    assert_eq!(status, 400);
    assert!(message.contains("evil.example"), "{message}");
    // A body to $batch the checks cannot read is refused too.
    let opaque = client()
        .post(format!("{gw}/api/data/v9.2/$batch"))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .body(r#"{"requests":[{"method":"GET","url":"WhoAmI","headers":{"CallerObjectId":"x"}}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(opaque.status(), 400);
    assert!(batches(&env).is_empty());
}

/// A part that is itself a batch, its target encoded so that no literal `$batch` shows:
/// a nested batch would carry requests no rule has seen, whatever Dataverse does with it.
#[tokio::test]
async fn a_nested_batch_in_any_spelling_is_refused_naming_the_part() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let inner = "Content-Type: multipart/mixed; boundary=inner\r\n\r\n--inner\r\nContent-Type: application/http\r\n\r\nGET contacts HTTP/1.1\r\n\r\n\r\n--inner--";
    for target in [
        "contacts/%24batch",
        "%24BATCH",
        "%2524batch/x",
        "%24batchx",
        "/api/data/v9.2/%24batch",
        "accounts/%2524BaTcH",
    ] {
        let line = format!("POST {target} HTTP/1.1\r\n{inner}");
        let message = part_refused(&env, &token, one_part("", &line), target).await;
        assert!(message.contains("part 1"), "{target}: {message}");
    }
    assert!(batches(&env).is_empty(), "nothing forwarded");
}

/// A part's request target with a `#`: RFC 3986 ends the path at it (so
/// `http://host#/api/data/v9.2/accounts` is the service root), a reader looking for the
/// first `/` does not, so the path checks and the access decision could read different
/// strings. A request target never has a fragment: refused, naming the part.
#[tokio::test]
async fn a_part_target_with_a_fragment_is_refused_naming_the_part() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let gw = env.gateway.url();
    let dv = env.dataverse.url();
    for target in [
        format!("{gw}#/api/data/v9.2/accounts"),
        format!("{dv}#/api/data/v9.2/accounts"),
        format!("{gw}#@evil.example/api/data/v9.2/accounts"),
        format!("{gw}/api/data/v9.2/accounts#/../contacts"),
        "/api/data/v9.2/accounts#x".to_string(),
        "accounts?$filter=name eq '#'".to_string(),
    ] {
        let body = one_part("Content-ID: 7\r\n", &format!("GET {target} HTTP/1.1"));
        let message = part_refused(&env, &token, body, &target).await;
        assert!(
            message.contains("part 1 (Content-ID 7)"),
            "{target}: {message}"
        );
        assert!(message.contains("fragment (`#`)"), "{target}: {message}");
    }
    assert!(batches(&env).is_empty(), "no batch reached Dataverse");
}

/// An encoded slash in a part's path is refused as at top level (400, naming the part);
/// in its query it is data.
#[tokio::test]
async fn encoded_slashes_in_part_paths_are_refused_and_in_queries_pass() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let gw = env.gateway.url();
    for target in [
        "/api/data/v9.2/accounts(1)%2Fcontact_customer_accounts".to_string(),
        format!("{gw}/api/data/v9.2/accounts%281%29%2fprimarycontactid"),
        "accounts(1)%2Fcontact_customer_accounts".to_string(),
        "$1%2Fprimarycontactid".to_string(),
        "accounts(1)%252Fcontact_customer_accounts".to_string(),
    ] {
        let body = one_part("", &format!("GET {target} HTTP/1.1"));
        let message = part_refused(&env, &token, body, &target).await;
        assert!(message.contains("part 1"), "{target}: {message}");
        assert!(
            message.contains("encoded slash (`%2F`)"),
            "{target}: {message}"
        );
    }
    assert!(batches(&env).is_empty(), "no batch reached Dataverse");
    let line = "GET /api/data/v9.2/accounts?$filter=name%20eq%20'a%2Fb' HTTP/1.1";
    let body = format!(
        "--{BOUNDARY}\r\nContent-Type: application/http\r\n\r\n{line}\r\n\r\n\r\n--{BOUNDARY}--\r\n"
    );
    let response = post_batch(&env, &token, body).await;
    assert_eq!(response.status(), 200);
    let seen = batches(&env);
    assert_eq!(seen.len(), 1);
    assert!(
        String::from_utf8_lossy(&seen[0].body).contains(line),
        "the part went on as written"
    );
}

/// Two readings of one Content-Type: `boundary` and `boundary*` (RFC 2231), or a quoted
/// boundary with a backslash that one reader unescapes and another keeps. A part hidden
/// under the other reading (impersonating, naming another host) would go unchecked, so
/// such a batch is refused whole.
#[tokio::test]
async fn a_boundary_another_reader_could_read_differently_refuses_the_batch() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    // Under the gateway's reading these parts are preamble; under the other, the batch.
    let hidden = |boundary: &str| {
        format!(
            "--{boundary}\r\nContent-Type: application/http\r\n\r\nGET https://evil.example/api/data/v9.2/WhoAmI HTTP/1.1\r\nCallerObjectId: {VICTIM_OID}\r\n\r\n\r\n--{boundary}--\r\n"
        )
    };
    for (content_type, body) in [
        (
            format!("multipart/mixed; boundary={BOUNDARY}; boundary*=utf-8''Q"),
            format!("{}{}", hidden("Q"), whoami_batch("")),
        ),
        (
            "multipart/mixed; boundary=\"batch\\_7d2f\"".to_string(),
            format!("{}{}", hidden("batch\\_7d2f"), whoami_batch("")),
        ),
    ] {
        let response = client()
            .post(format!("{}/api/data/v9.2/$batch", env.gateway.url()))
            .bearer_auth(&token)
            .header("content-type", &content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{content_type}");
    }
    assert!(batches(&env).is_empty(), "nothing reached Dataverse");
}

/// A batch as .NET's `MultipartContent` + `HttpMessageContent` write it: `Content-Length`
/// on every MIME part (the change set too) and on every inner body, absolute URLs.
fn dotnet_batch(base: &str, host: &str) -> String {
    let body = format!(
        "{{\"name\":\"Contoso via .NET\",\"primarycontactid@odata.bind\":\"{base}/api/data/v9.2/contacts(00000000-0000-0000-0000-0000000000c1)\"}}"
    );
    let create = format!(
        "POST {base}/api/data/v9.2/accounts HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json; type=entry\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let create_part = format!(
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\nContent-Length: {}\r\n\r\n{create}",
        create.len()
    );
    let changeset = format!("--changeset_dotnet\r\n{create_part}\r\n--changeset_dotnet--");
    let get = format!("GET {base}/api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let get_part = format!(
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-Length: {}\r\n\r\n{get}",
        get.len()
    );
    format!(
        "--{BOUNDARY}\r\nContent-Type: multipart/mixed; boundary=changeset_dotnet\r\nContent-Length: {}\r\n\r\n{changeset}\r\n--{BOUNDARY}\r\n{get_part}\r\n--{BOUNDARY}--\r\n",
        changeset.len()
    )
}

fn authority(url: &str) -> &str {
    url.split_once("://").unwrap().1
}

#[tokio::test]
async fn dotnet_style_parts_with_content_length_are_rewritten_with_their_lengths_fixed() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let gw = env.gateway.url();
    let dv = env.dataverse.url();
    let response = post_batch(&env, &token, dotnet_batch(&gw, authority(&gw))).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    // Every part succeeded: the stand-in refuses lengths that do not match.
    assert!(text.contains("HTTP/1.1 204"), "{text}");
    assert!(text.contains(ALICE_SYSTEMUSERID), "{text}");
    assert!(!text.contains("HTTP/1.1 400"), "{text}");
    assert!(
        text.contains(&format!("{gw}/api/data/v9.2/accounts(")),
        "{text}"
    );
    assert!(!text.contains(&dv), "{text}");
    // Dataverse received exactly what the same client writes when it talks to Dataverse.
    let seen = batches(&env).pop().unwrap().body_text();
    assert_eq!(seen, dotnet_batch(&dv, authority(&dv)));
    let created = env.dataverse.records("accounts");
    let account = created
        .iter()
        .find(|r| r["name"] == "Contoso via .NET")
        .expect("the account was created");
    assert_eq!(
        account["primarycontactid@odata.bind"],
        format!("{dv}/api/data/v9.2/contacts(00000000-0000-0000-0000-0000000000c1)"),
        "{account}"
    );
}

#[tokio::test]
async fn a_held_part_over_max_batch_part_is_refused_with_413_naming_the_limit() {
    let env = env().server("  max_batch_part: 64KiB\n").start().await;
    let token = env.idp.token_for(ALICE_OID);
    let gw = env.gateway.url();
    let body = format!("{{\"name\":\"{}\"}}", "x".repeat(70_000));
    let inner = format!(
        "POST {gw}/api/data/v9.2/accounts HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let batch = format!(
        "--{BOUNDARY}\r\nContent-Type: application/http\r\nContent-ID: big\r\nContent-Length: {}\r\n\r\n{inner}\r\n--{BOUNDARY}--\r\n",
        inner.len()
    );
    let (status, code, message) = error_body(post_batch(&env, &token, batch).await).await;
    assert_eq!(
        (status, code.as_str()),
        (413, "DynamicsGateway.BatchPartTooLarge")
    );
    assert!(message.contains("65536 bytes"), "{message}");
    assert!(message.contains("server.max_batch_part"), "{message}");
    assert!(message.contains("Content-ID big"), "{message}");
    assert!(batches(&env)
        .iter()
        .all(|r| r.body_sha256.is_empty() || r.body_len == 0));
    // The same part without Content-Length streams: the bound does not apply.
    let streamed = format!(
        "--{BOUNDARY}\r\nContent-Type: application/http\r\n\r\nPOST {gw}/api/data/v9.2/accounts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{body}\r\n--{BOUNDARY}--\r\n"
    );
    assert_eq!(post_batch(&env, &token, streamed).await.status(), 200);
}

#[tokio::test]
async fn a_bad_part_beyond_the_checked_head_aborts_the_upstream_request_unfinished() {
    let (env, _) = env_with_victim().await;
    let token = env.idp.token_for(ALICE_OID);
    // 200 KB of good parts first, so the request is already streaming upstream.
    let mut body = String::new();
    for i in 0..20 {
        body.push_str(&format!(
            "--{BOUNDARY}\r\nContent-Type: application/http\r\n\r\nPOST /api/data/v9.2/accounts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{{\"name\":\"early-{i}\",\"description\":\"{}\"}}\r\n",
            "d".repeat(10_000)
        ));
    }
    body.push_str(&whoami_batch(&format!("CallerObjectId: {VICTIM_OID}\r\n")));
    let message = part_refused(&env, &token, body, "").await;
    assert!(message.contains("part 21 (Content-ID 9)"), "{message}");
    // Dynamics never received a whole batch, so it ran none of it.
    assert!(batches(&env).iter().all(|r| r.body_sha256.is_empty()));
    assert!(env
        .dataverse
        .records("accounts")
        .iter()
        .all(|r| !r["name"].as_str().unwrap_or_default().starts_with("early-")));
}

#[tokio::test]
async fn top_level_method_overrides_never_reach_dynamics() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let response = client()
        .get(format!("{}/api/data/v9.2/headers", env.gateway.url()))
        .bearer_auth(&token)
        .header("X-HTTP-Method-Override", "DELETE")
        .header("X-HTTP-Method", "DELETE")
        .header("X-Method-Override", "DELETE")
        .header("x_http_method_override", "DELETE")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = env.dataverse.requests().pop().unwrap();
    for (name, _) in &seen.headers {
        let n = name.as_str().replace('_', "-");
        assert!(
            ![
                "x-http-method",
                "x-http-method-override",
                "x-method-override"
            ]
            .contains(&n.as_str()),
            "{name} reached Dynamics"
        );
    }
    assert!(seen.headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn all_dot_segments_are_refused_in_every_encoding() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let before = env.dataverse.request_count();
    for path in [
        "/api/data/v9.2/.../accounts",
        "/api/data/v9.2/..../accounts",
        "/api/data/v9.2/%2e%2e%2e/accounts",
        "/api/data/v9.2/.%2E./accounts",
        "/api/data/v9.2/%252e%252e%252e/accounts",
    ] {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n",
            env.gateway.addr
        );
        let answer = raw_request(env.gateway.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("AmbiguousPath"), "{path}: {answer}");
    }
    assert_eq!(env.dataverse.request_count(), before);
}

/// A `$batch` below a table or a record: its relative parts would be decided against one
/// base and could be served by Dataverse against another (`GET contacts` under an
/// accounts-only grant). Refused with 400; nothing reaches Dataverse.
#[tokio::test]
async fn a_batch_anywhere_but_the_service_root_is_refused() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    let body = format!(
        "--{BOUNDARY}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\nGET contacts HTTP/1.1\r\nAccept: application/json\r\n\r\n--{BOUNDARY}--\r\n"
    );
    for path in [
        "/api/data/v9.2/accounts/$batch",
        "/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)/$batch",
        "/api/data/v9.2/accounts/%24batch",
        "/api/data/$batch",
        "/api/data/v9.2/$batch/",
    ] {
        let response = post_batch_to(&env, path, &token, body.clone()).await;
        let (status, code, message) = error_body(response).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "DynamicsGateway.MisplacedBatch"),
            "{path}"
        );
        assert!(message.contains("/api/data/<version>/$batch"), "{message}");
    }
    assert!(env.dataverse.requests().is_empty(), "nothing was forwarded");
    // The service root's own $batch still goes through.
    let response = post_batch(&env, &token, whoami_batch("")).await;
    assert_eq!(response.status(), 200);
    assert_eq!(batches(&env).len(), 1);
}
