//! The real binary's life: graceful shutdown on SIGTERM with a request in flight, and
//! configuration reload on SIGHUP (a bad config rejected, the old one kept; the fetched
//! `$metadata` carried over).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;
use crate::support::binary;

use std::time::Duration;

use binary::{
    binary_config, free_port, standins, start_binary, start_binary_with_closed_stderr,
    start_binary_with_unread_stderr, Binary,
};
use support::{client, ALICE_OID, ALICE_SYSTEMUSERID};
use testkit::IdpHandle;

const WHOAMI: &str = "/api/data/v9.2/WhoAmI";

/// GETs `path` with `token` and an `x-request-id` to find its audit line by; it must be 200.
async fn get_tagged(gateway: &Binary, path: &str, token: &str, request_id: &str) {
    let response = client()
        .get(format!("{}{path}", gateway.url))
        .bearer_auth(token)
        .header("x-request-id", request_id)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// Sends one more (audited) request and waits for its audit line: one thread writes the
/// log in order, so every line of the requests before it is in the log by then.
async fn flush_log(gateway: &Binary, idp: &IdpHandle) {
    get_tagged(
        gateway,
        WHOAMI,
        &idp.token_for(ALICE_OID),
        "log-flush-marker",
    )
    .await;
    support::eventually("the marker's audit line is written", || async {
        gateway.log().contains("log-flush-marker")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_the_in_flight_request_then_exits_zero() {
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let mut gateway = start_binary(&binary_config(&idp, &dataverse, "", ports), ports).await;
    // Long enough for the drain to be seen while the request is still held.
    dataverse.set_delay(Duration::from_millis(1000));
    let (url, token) = (format!("{}{WHOAMI}", gateway.url), idp.token_for(ALICE_OID));
    let in_flight = tokio::spawn(async move { client().get(url).bearer_auth(token).send().await });
    // The request is in flight once Dataverse holds it (not after a guess at how long that
    // takes on a loaded machine).
    support::eventually("the request reaches Dataverse", || async {
        dataverse.in_flight() > 0
    })
    .await;
    assert_eq!(dataverse.in_flight(), 1, "the request reached Dataverse");
    gateway.signal("TERM");
    let readyz = || async { gateway.readyz().await.status() };
    support::eventually("the gateway is draining", || async {
        readyz().await == 503
    })
    .await;
    assert_eq!(
        dataverse.in_flight(),
        1,
        "drained with the request still held"
    );
    let refused = || async {
        tokio::net::TcpStream::connect(gateway.url.trim_start_matches("http://"))
            .await
            .is_err()
    };
    support::eventually("no new connections while draining", refused).await;
    assert_eq!(readyz().await, 503, "not ready while draining");
    let response = in_flight
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(response.status(), 200);
    let who: serde_json::Value = response.json().await.unwrap();
    assert_eq!(who["UserId"], ALICE_SYSTEMUSERID);
    let status = tokio::time::timeout(Duration::from_secs(10), gateway.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", gateway.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_the_config_and_a_bad_one_is_rejected_without_dropping_requests() {
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let gateway = start_binary(&binary_config(&idp, &dataverse, "", ports), ports).await;
    let whoami = |token: String| {
        let url = format!("{}{WHOAMI}", gateway.url);
        async move {
            client()
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(whoami(idp.token_for(ALICE_OID)).await, 200);

    // New config: static mode in which Alice is not mapped. A slow request spans the reload.
    dataverse.set_delay(Duration::from_millis(1500));
    let in_flight = tokio::spawn(whoami(idp.token_for(ALICE_OID)));
    support::eventually("the slow request reaches Dataverse", || async {
        dataverse.in_flight() > 0
    })
    .await;
    let static_mode = "identity:\n  mode: static\n  static:\n    someone-else: 3f2504e0-4f89-11d3-9a0c-0305e82c3399\n";
    std::fs::write(
        &gateway.config,
        binary_config(&idp, &dataverse, static_mode, ports),
    )
    .unwrap();
    gateway.signal("HUP");
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the in-flight request finished on the old config"
    );
    dataverse.set_delay(Duration::ZERO);
    let mut status = 0;
    for _ in 0..100 {
        status = whoami(idp.token_for(ALICE_OID)).await;
        if status == 403 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status,
        403,
        "the reloaded static map applies: {}",
        gateway.log()
    );

    // A bad config is rejected with a log line and the reloaded one stays in force.
    std::fs::write(&gateway.config, "inbound: [not, a, config]\n").unwrap();
    gateway.signal("HUP");
    support::eventually("the bad config is rejected", || async {
        gateway.log().contains("reload rejected")
    })
    .await;
    assert_eq!(whoami(idp.token_for(ALICE_OID)).await, 403);
    let ready = gateway.readyz().await;
    assert_eq!(ready.status(), 200, "still serving");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_keeps_deciding_with_the_fetched_metadata_while_dataverse_cannot_serve_it() {
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let access = |rule: &str| {
        format!(
            "identity:\n  mode: caller_object_id\naccess:\n  rules:\n    - name: {rule}\n      when: {{}}\n      allow: {{ tables: {{ accounts: [read], contacts: [read] }} }}\n"
        )
    };
    let gateway = start_binary(
        &binary_config(&idp, &dataverse, &access("readers"), ports),
        ports,
    )
    .await;
    let readyz = || async { gateway.readyz().await.text().await.unwrap() };
    support::eventually("the $metadata is fetched", || async {
        readyz().await.contains("default: metadata loaded")
    })
    .await;
    let expand = || async {
        client()
            .get(format!(
                "{}/api/data/v9.2/accounts?$expand=contact_customer_accounts",
                gateway.url
            ))
            .bearer_auth(idp.token_for(ALICE_OID))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(expand().await, 200);
    // Dataverse stops serving $metadata; the reloaded configuration starts with the map
    // the running one holds, not with nothing.
    dataverse.set_metadata_failing(Some(503));
    std::fs::write(
        &gateway.config,
        binary_config(&idp, &dataverse, &access("readers-reloaded"), ports),
    )
    .unwrap();
    gateway.signal("HUP");
    support::eventually("the reload is applied", || async {
        gateway.log().contains("configuration reloaded")
    })
    .await;
    assert_eq!(expand().await, 200, "{}", gateway.log());
    support::eventually("the reloaded gateway's own refresh fails", || async {
        readyz()
            .await
            .contains("last refresh failed: Dataverse answered 503")
    })
    .await;
    assert_eq!(expand().await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_leaves_one_audit_line_and_refusals_are_rate_limited() {
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let gateway = start_binary(&binary_config(&idp, &dataverse, "", ports), ports).await;
    let token = idp.token_for(ALICE_OID);
    let query = format!("{WHOAMI}?$select=fullname&$filter=fullname%20eq%20'Alice'");
    get_tagged(&gateway, &query, &token, "audit-me-1").await;
    // A flood of bad tokens: each is answered, but only 20 refusals a second are logged.
    let flood_started = std::time::Instant::now();
    let http = client();
    let flood: Vec<_> = (0..100)
        .map(|_| {
            let request = http
                .get(format!("{}{WHOAMI}", gateway.url))
                .bearer_auth("not.a.token");
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    for answer in flood {
        assert_eq!(answer.await.unwrap(), 401);
    }
    let windows = flood_started.elapsed().as_secs() + 2;
    flush_log(&gateway, &idp).await;
    let log = gateway.log();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("audit-me-1")).collect();
    assert_eq!(audit.len(), 1, "one audit line per request: {log}");
    let line = audit[0];
    for expected in [
        "status=200",
        "method=GET",
        ALICE_OID,
        "subject=",
        &idp.issuer(),
    ] {
        assert!(line.contains(expected), "{expected} missing from {line}");
    }
    assert!(
        line.contains("fullname"),
        "query kept unless redact_query: {line}"
    );
    assert!(!log.contains(&token), "a token never reaches the log");
    assert!(
        !log.contains(&idp.client_secret()),
        "the client secret never reaches the log"
    );
    let refusals = log
        .lines()
        .filter(|l| l.contains("request refused"))
        .count();
    assert!(refusals >= 1, "refusals are logged");
    assert!(
        refusals as u64 <= 20 * windows,
        "{refusals} refusal lines for 100 refusals within {windows} one-second windows"
    );
}

/// A log collector that stops reading (a full pipe) must not stop the gateway: before the
/// log writer had its own thread, each audit line was a blocking `write` on a request's
/// worker thread, and the gateway froze once the pipe's 64 KiB were full.
#[tokio::test(flavor = "multi_thread")]
async fn a_stderr_nobody_reads_does_not_hold_up_requests() {
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let mut gateway =
        start_binary_with_unread_stderr(&binary_config(&idp, &dataverse, "", ports), ports).await;
    let token = idp.token_for(ALICE_OID);
    // Long paths make each audit line about 1 KiB: 2,000 of them are 30 pipe buffers.
    let url = format!(
        "{}{WHOAMI}?$select=fullname&$filter=fullname%20eq%20'{}'",
        gateway.url,
        "a".repeat(900)
    );
    let http = client();
    let mut answered = 0;
    for batch in 0..40 {
        let requests: Vec<_> = (0..50)
            .map(|_| {
                let request = http.get(&url).bearer_auth(&token).send();
                tokio::spawn(async move { request.await.map(|r| r.status().as_u16()) })
            })
            .collect();
        for request in requests {
            match request.await.unwrap() {
                Ok(200) => answered += 1,
                other => panic!("batch {batch}: {other:?} after {answered} answered"),
            }
        }
    }
    assert_eq!(answered, 2000);
    let metrics = support::metrics_text(&gateway.admin_url).await;
    assert!(
        metrics.contains("dynamics_gateway_log_lines_dropped_total "),
        "dropped lines are counted: {metrics}"
    );
    // The writer is stuck on the full pipe; SIGTERM must still end the process.
    gateway.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(20), gateway.child.wait())
        .await
        .expect("the gateway exits on SIGTERM although its stderr is stuck")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn lines_a_closed_stderr_loses_are_counted() {
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let gateway =
        start_binary_with_closed_stderr(&binary_config(&idp, &dataverse, "", ports), ports).await;
    let token = idp.token_for(ALICE_OID);
    let http = client();
    for _ in 0..100 {
        let response = http
            .get(format!("{}{WHOAMI}", gateway.url))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // Each request's audit line is lost, and counted once the writer has tried it.
    let admin = gateway.admin_url.clone();
    support::eventually("the 100 lost audit lines are counted", || {
        let admin = admin.clone();
        async move {
            support::metric_at(&admin, "dynamics_gateway_log_lines_dropped_total").await >= 100.0
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redact_query_keeps_query_values_out_of_the_audit_log() {
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let yaml = format!(
        "{}audit:\n  redact_query: true\n",
        binary_config(&idp, &dataverse, "", ports)
    );
    let gateway = start_binary(&yaml, ports).await;
    let response = client()
        .get(format!(
            "{}{WHOAMI}?$filter=emailaddress1%20eq%20'secret-person@example.com'",
            gateway.url
        ))
        .bearer_auth(idp.token_for(ALICE_OID))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    support::eventually("the request's audit line is written", || async {
        gateway.log().contains("WhoAmI?$filter=")
    })
    .await;
    let log = gateway.log();
    assert!(!log.contains("secret-person"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_token_less_requests_with_huge_queries_cannot_fill_the_log() {
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let gateway = start_binary(&binary_config(&idp, &dataverse, "", ports), ports).await;
    // An authenticated request with a huge query: audited, but its path is cut to the bound.
    let huge_query = format!("{WHOAMI}?$filter={}", "a".repeat(60_000));
    get_tagged(
        &gateway,
        &huge_query,
        &idp.token_for(ALICE_OID),
        "huge-authenticated",
    )
    .await;
    let log_before = gateway.log().len();
    // 2,000 token-less requests, each naming 60 KB of query: 120 MB if each were logged.
    let flood_started = std::time::Instant::now();
    let http = client();
    let url = format!("{}{huge_query}", gateway.url);
    let mut statuses = Vec::new();
    for batch in 0..50 {
        let tasks: Vec<_> = (0..40)
            .map(|i| {
                let request = http
                    .get(&url)
                    .header("x-request-id", format!("flood-{batch}-{i}"));
                tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
            })
            .collect();
        for task in tasks {
            statuses.push(task.await.unwrap());
        }
    }
    assert!(
        statuses.iter().all(|s| *s == 401),
        "every flood request is answered 401"
    );
    let windows = flood_started.elapsed().as_secs() + 2;
    flush_log(&gateway, &idp).await;
    let log = gateway.log();
    let authenticated: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("huge-authenticated"))
        .collect();
    assert_eq!(
        authenticated.len(),
        1,
        "an authenticated request is always audited"
    );
    assert!(
        authenticated[0].len() < 4096 && authenticated[0].contains("...[cut "),
        "its path is cut to 2 KiB and marked: {} bytes",
        authenticated[0].len()
    );
    let flood_lines = log
        .lines()
        .filter(|l| l.contains("flood-"))
        .collect::<Vec<_>>();
    assert!(
        flood_lines.iter().all(|l| l.len() < 4096),
        "every line is bounded"
    );
    // Each admitted refusal writes two lines (the warning and the audit line).
    assert!(
        flood_lines.len() as u64 <= 2 * 20 * windows,
        "{} flood lines within {windows} one-second windows",
        flood_lines.len()
    );
    let written = (log.len() - log_before) as u64;
    assert!(
        written <= 2 * 20 * windows * 4096 + 4096,
        "the flood wrote {written} bytes of log for 120 MB of requests"
    );
    assert!(
        log.contains("refused requests not logged in the last second"),
        "the suppressed lines are counted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_names_the_keys_it_cannot_apply_and_applies_the_rest() {
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let config =
        |server: &str| binary::binary_config_with_server(&idp, &dataverse, "", server, ports);
    let gateway = start_binary(
        &config("  idle_timeout: 5s\n  header_read_timeout: 3s\n  max_request_body: 1MiB\n"),
        ports,
    )
    .await;
    let post = |bytes: usize| {
        let url = format!("{}/api/data/v9.2/accounts", gateway.url);
        let token = idp.token_for(ALICE_OID);
        async move {
            client()
                .post(url)
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(format!("{{\"name\":\"{}\"}}", "a".repeat(bytes)))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_ne!(post(2048).await, 413);

    std::fs::write(
        &gateway.config,
        config("  idle_timeout: 2s\n  header_read_timeout: 1s\n  max_request_body: 1KiB\n"),
    )
    .unwrap();
    gateway.signal("HUP");
    support::eventually("the reload is applied", || async {
        gateway.log().contains("configuration reloaded")
    })
    .await;
    let log = gateway.log();
    let warning = log
        .lines()
        .find(|line| line.contains("change only on restart"))
        .unwrap_or_else(|| panic!("a warning names what is not applied: {log}"));
    assert!(
        warning.contains("server.header_read_timeout, server.idle_timeout"),
        "{warning}"
    );
    assert!(!warning.contains("max_request_body"), "{warning}");
    assert_eq!(post(2048).await, 413, "the body limit is applied: {log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_a_caller_puts_in_the_url_or_the_request_id_never_reaches_the_log() {
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let gateway = start_binary(&binary_config(&idp, &dataverse, "", ports), ports).await;
    let bearer = idp.token_for(ALICE_OID);
    let leaked = idp.token_for(ALICE_OID);
    let query = format!("{WHOAMI}?$select=fullname&access_token={leaked}&client_secret=hunter2");
    let authenticated = client()
        .get(format!("{}{query}", gateway.url))
        .bearer_auth(&bearer)
        .header("x-request-id", &leaked)
        .send()
        .await
        .unwrap();
    assert_eq!(authenticated.status(), 200);
    let echoed = authenticated.headers()["x-request-id"].to_str().unwrap();
    assert!(
        uuid::Uuid::parse_str(echoed).is_ok(),
        "a token is no request id; a generated one stands in: {echoed}"
    );
    // Refused before authentication: its line is written too, and must not carry it either.
    let refused = client()
        .get(format!("{}{WHOAMI}?token={leaked}", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    // A refused batch part: its warning quotes the part's target.
    let batch = "--b\r\nContent-Type: application/http\r\n\r\nPOST $batch?access_token=opaque-secret-42 HTTP/1.1\r\n\r\n\r\n--b--\r\n".to_string();
    let part_refused = client()
        .post(format!("{}/api/data/v9.2/$batch", gateway.url))
        .bearer_auth(&bearer)
        .header("content-type", "multipart/mixed; boundary=b")
        .body(batch)
        .send()
        .await
        .unwrap();
    assert_eq!(part_refused.status(), 400);
    flush_log(&gateway, &idp).await;
    let log = gateway.log();
    for secret in [
        leaked.as_str(),
        bearer.as_str(),
        "hunter2",
        "opaque-secret-42",
    ] {
        assert!(!log.contains(secret), "{secret} in the log: {log}");
    }
    assert!(
        log.contains("$batch?access_token=[redacted]"),
        "the refused part is still named: {log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("client_secret="))
        .unwrap_or_else(|| panic!("the request's audit line: {log}"));
    assert!(
        line.contains("$select=fullname&access_token=[redacted]&client_secret=[redacted]"),
        "the rest of the query is kept: {line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_half_sent_request_head_does_not_hold_the_shutdown_for_the_grace() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let yaml = binary::binary_config_with_server(
        &idp,
        &dataverse,
        "",
        "  shutdown_grace: 60s\n  header_read_timeout: 60s\n",
        ports,
    );
    let mut gateway = start_binary(&yaml, ports).await;
    let mut trickler = tokio::net::TcpStream::connect(gateway.url.trim_start_matches("http://"))
        .await
        .unwrap();
    trickler
        .write_all(b"GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: gw\r\n")
        .await
        .unwrap();
    get_tagged(
        &gateway,
        WHOAMI,
        &idp.token_for(ALICE_OID),
        "before-the-shutdown",
    )
    .await;
    gateway.signal("TERM");
    // Far below the 60 s grace and header_read_timeout: only closing it at once fits.
    let status = tokio::time::timeout(Duration::from_secs(20), gateway.child.wait())
        .await
        .expect("exited without waiting out the grace")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", gateway.log());
    let mut rest = Vec::new();
    let _ = trickler.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "closed without an answer: {rest:?}");
}
