//! Hostile dependencies (issue 9, points 9-12 and two of "Also seen"): an identity
//! provider, token endpoint or IMDS that streams without end, publishes absurd key sets
//! or absurd numbers, a Dataverse that answers 401 to everything, a token endpoint whose
//! error names the gateway's credentials; and start-up with one environment's first
//! token still in flight. All through the real gateway over 127.0.0.1.

use crate::support;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use support::{env, error_body, metric, ALICE_OID, ALICE_SYSTEMUSERID};
use testkit::{
    Dataverse, DirectoryUser, Idp, Imds, JwksDocument, TokenEndpointMode, ENDLESS_BODY_BYTES,
};

const ACCOUNTS: &str = "/api/data/v9.2/accounts";
const WHOAMI: &str = "/api/data/v9.2/WhoAmI";
/// The gateway's cap on any dependency's body.
const CAP: u64 = 1 << 20;
const JWKS_FAILURES: &str = "dynamics_gateway_jwks_refresh_total{result=\"failure\"}";
const TOKEN_RESTARTS: &str = "dynamics_gateway_refresher_restarts_total{refresher=\"token\"}";

/// The most an endless body can have been handed to the connection when the gateway
/// stops reading at the cap: the cap, plus what the two sockets' kernel buffers take
/// (the largest autotuned receive and send buffers), plus a MiB of HTTP-library buffers.
fn served_bound() -> u64 {
    let max_of = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.split_whitespace().last()?.parse::<u64>().ok())
            .unwrap_or(8 << 20)
    };
    let bound = CAP
        + max_of("/proc/sys/net/ipv4/tcp_rmem")
        + max_of("/proc/sys/net/ipv4/tcp_wmem")
        + (1 << 20);
    assert!(
        bound < ENDLESS_BODY_BYTES / 2,
        "the endless body must be far larger than the bound for the test to mean anything"
    );
    bound
}

/// Waits until `served` stops growing (the stand-in noticed the closed connection).
async fn settled(served: impl Fn() -> u64) -> u64 {
    let mut last = served();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = served();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test]
async fn an_endless_jwks_is_cut_at_the_cap_and_the_last_good_keys_stay() {
    let env = env().start().await;
    let old_token = env.idp.token_for(ALICE_OID);
    env.idp.set_jwks_document(JwksDocument::Endless);
    env.idp.rotate_key(true);
    let failures_before = metric(&env.gateway, JWKS_FAILURES).await;

    // An unknown kid makes the gateway refetch the key set, which never ends.
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 401);
    let served = settled(|| env.idp.absurd_bytes_served()).await;
    assert!(served > CAP, "the stand-in served the key set: {served}");
    assert!(
        served <= served_bound(),
        "the gateway read on past its cap: {served} bytes served"
    );
    assert!(metric(&env.gateway, JWKS_FAILURES).await > failures_before);

    // The last good key set is still in force.
    let response = support::get(&env.gateway, ACCOUNTS, &old_token).await;
    assert_eq!(response.status(), 200);
    assert_eq!(env.gateway.readyz().await.status(), 200);
}

#[tokio::test]
async fn a_jwks_of_ten_thousand_keys_is_refused_and_the_last_good_keys_stay() {
    let env = env().start().await;
    // A few extra keys are fine: the rotated key is found among them.
    env.idp.set_jwks_document(JwksDocument::Padded(50));
    env.idp.rotate_key(true);
    let rotated = env.idp.token_for(ALICE_OID);
    let response = support::get(&env.gateway, ACCOUNTS, &rotated).await;
    assert_eq!(response.status(), 200);

    // Ten thousand (about half a MiB, under the size cap) are refused by the key cap.
    env.idp.set_jwks_document(JwksDocument::Padded(10_000));
    env.idp.rotate_key(true);
    let failures_before = metric(&env.gateway, JWKS_FAILURES).await;
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    let (status, code, _) = error_body(response).await;
    assert_eq!(
        (status, code.as_str()),
        (401, "DynamicsGateway.InvalidToken")
    );
    assert!(metric(&env.gateway, JWKS_FAILURES).await > failures_before);
    let response = support::get(&env.gateway, ACCOUNTS, &rotated).await;
    assert_eq!(response.status(), 200, "the last good set stays in force");
}

#[tokio::test]
async fn an_endless_token_response_is_cut_at_the_cap() {
    let env = env()
        .token_endpoint(TokenEndpointMode::Endless)
        .start_unready()
        .await;
    env.first_token_request().await;
    let served = settled(|| env.idp.absurd_bytes_served()).await;
    assert!(served > CAP, "{served}");
    // The refresher retries meanwhile: the bound holds per request.
    let requests = env.idp.token_requests() as u64;
    assert!(
        served <= served_bound() * requests,
        "{served} bytes served to {requests} requests"
    );
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    let (status, code, _) = error_body(response).await;
    assert_eq!(
        (status, code.as_str()),
        (503, "DynamicsGateway.NoUpstreamToken")
    );
    env.idp.set_token_endpoint_mode(TokenEndpointMode::Ok);
    env.gateway.wait_ready().await;
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn managed_identity_answers_are_capped_and_absurd_lifetimes_clamped() {
    let idp = Idp::builder().start().await.unwrap();
    // Every token IMDS issues claims to live u64::MAX seconds (as a string, IMDS-style).
    let imds = Imds::builder()
        .registry(idp.s2s_registry())
        .token_lifetime(u64::MAX)
        .start()
        .await
        .unwrap();
    imds.set_endless(true);
    let dataverse = Dataverse::builder()
        .accept_tokens_from(idp.s2s_registry())
        .user(DirectoryUser::new(ALICE_OID, "alice@contoso.example"))
        .start()
        .await
        .unwrap();
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:1\n  admin_listen: 127.0.0.1:2\n\
inbound:\n  issuers:\n    - issuer: {issuer}\n      audiences: [{aud}]\n\
dynamics:\n  url: {url}\n  tenant_id: {tenant}\n  managed_identity: {{ endpoint: {imds} }}\n",
        issuer = idp.issuer(),
        aud = idp.audience(),
        url = dataverse.url(),
        tenant = idp.tenant_id(),
        imds = imds.url(),
    );
    let gateway = support::start_gateway(&yaml).await;
    while imds.requests().is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served = settled(|| imds.absurd_bytes_served()).await;
    assert!(served > CAP, "{served}");
    let requests = imds.requests().len() as u64;
    assert!(
        served <= served_bound() * requests,
        "{served} bytes served to {requests} requests"
    );
    assert_eq!(gateway.readyz().await.status(), 503);

    imds.set_endless(false);
    gateway.wait_ready().await;
    let response = support::get(&gateway, WHOAMI, idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(metric(&gateway, TOKEN_RESTARTS).await, 0.0);
}

#[tokio::test]
async fn absurd_token_numbers_neither_panic_nor_stall_the_refresher() {
    // The token endpoint first asks for a wait of u64::MAX seconds, then hands out a
    // token that lives u64::MAX seconds and asks to be refreshed in u64::MAX seconds.
    let env = env()
        .dynamics("  token_retry_max_wait: 1s\n")
        .token_endpoint(TokenEndpointMode::HugeRetryAfter)
        .start_unready()
        .await;
    env.first_token_request().await;
    assert_eq!(env.gateway.readyz().await.status(), 503);
    env.idp
        .set_token_endpoint_mode(TokenEndpointMode::HugeNumbers);
    // Retried within the capped wait, by the same refresher (it never panicked).
    env.gateway.wait_ready().await;
    assert_eq!(metric(&env.gateway, TOKEN_RESTARTS).await, 0.0);
    let response = support::get(&env.gateway, ACCOUNTS, env.idp.token_for(ALICE_OID)).await;
    assert_eq!(response.status(), 200);
    let body = env.gateway.readyz().await.text().await.unwrap();
    assert!(
        body.starts_with("ready") && !body.contains("restarted"),
        "{body}"
    );
}

#[tokio::test]
async fn many_401s_cost_one_token_request_per_interval() {
    let env = env()
        .dynamics("  token_replace_interval: 2s\n")
        .start()
        .await;
    let token = env.idp.token_for(ALICE_OID);
    // Dataverse refuses every token from now on.
    env.dataverse.respond_next(
        500,
        401,
        vec![("content-type".into(), "application/json".into())],
        r#"{"error":{"code":"0x80072560","message":"The user is not a member of the organization."}}"#,
    );
    let before = env.idp.token_requests();
    // Fifteen at once, then fifteen spread out in time.
    let statuses = support::concurrent_gets(&env.gateway, ACCOUNTS, &token, 15).await;
    for _ in 0..15 {
        let response = support::get(&env.gateway, ACCOUNTS, &token).await;
        assert_eq!(response.status(), 401, "Dataverse's 401 is passed on");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(statuses.iter().all(|s| *s == 401), "{statuses:?}");
    let spent = env.idp.token_requests() - before;
    // One replacement; a second only if the thirty took longer than the interval.
    assert!(
        (1..=2).contains(&spent),
        "{spent} token requests for 30 401s"
    );

    // Once the interval has passed, a 401 may replace the token again.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before = env.idp.token_requests();
    let response = support::get(&env.gateway, ACCOUNTS, &token).await;
    assert_eq!(response.status(), 401);
    assert_eq!(env.idp.token_requests() - before, 1);
}

/// Everything the gateways in this test binary log, for the tests that read their logs.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || Capture(sink.clone()))
            .try_init();
        logs
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_refused_client_secret_is_logged_never_shown_to_the_caller() {
    let logs = captured_logs();
    let env = env()
        .token_endpoint(TokenEndpointMode::InvalidClient)
        .start_unready()
        .await;
    env.first_token_request().await;
    let request_id = "hostile-deps-invalid-client-1";
    let response = support::client()
        .get(format!("{}{ACCOUNTS}", env.gateway.url()))
        .bearer_auth(env.idp.token_for(ALICE_OID))
        .header("x-request-id", request_id)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], request_id);
    let (status, code, message) = error_body(response).await;
    assert_eq!(
        (status, code.as_str()),
        (503, "DynamicsGateway.NoUpstreamToken")
    );
    assert!(message.contains(request_id), "{message}");
    for leak in [
        "AADSTS",
        "invalid_client",
        "http",
        "127.0.0.1",
        env.idp.client_id().as_str(),
        env.idp.client_secret().as_str(),
    ] {
        assert!(!message.contains(leak), "{leak:?} in {message}");
    }
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains(request_id))
        .unwrap_or_else(|| panic!("no log line with the request id in:\n{text}"));
    assert!(line.contains("AADSTS7000215"), "{line}");
    assert!(
        !text.contains(&env.idp.client_secret()),
        "a secret was logged"
    );
}

#[tokio::test]
async fn a_request_waits_for_its_environments_first_token_in_flight() {
    let fast = Idp::builder().start().await.unwrap();
    let slow = Idp::builder().start().await.unwrap();
    slow.set_token_delay(Duration::from_millis(1500));
    let alice = DirectoryUser {
        systemuserid: ALICE_SYSTEMUSERID.into(),
        ..DirectoryUser::new(ALICE_OID, "alice@contoso.example")
    };
    let org = |idp: &testkit::IdpHandle| {
        Dataverse::builder()
            .accept_tokens_from(idp.s2s_registry())
            .user(alice.clone())
            .start()
    };
    let (fast_org, slow_org) = (org(&fast).await.unwrap(), org(&slow).await.unwrap());
    let environment = |name: &str, idp: &testkit::IdpHandle, url: &str| {
        format!(
            "    - {{ name: {name}, url: {url}, tenant_id: {tenant}, client_id: {client}, client_secret: {secret}, token_url: {token_url} }}\n",
            tenant = idp.tenant_id(),
            client = idp.client_id(),
            secret = idp.client_secret(),
            token_url = idp.token_url(),
        )
    };
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:1\n  admin_listen: 127.0.0.1:2\n\
inbound:\n  issuers:\n    - issuer: {issuer}\n      audiences: [{aud}]\n      tenants: [{tenant}]\n\
dynamics:\n  routing: {{ by: path_prefix }}\n  environments:\n{a}{b}",
        issuer = fast.issuer(),
        aud = fast.audience(),
        tenant = fast.tenant_id(),
        a = environment("fast", &fast, &fast_org.url()),
        b = environment("slow", &slow, &slow_org.url()),
    );
    let gateway = support::start_gateway(&yaml).await;
    gateway.wait_ready().await;
    let body = gateway.readyz().await.text().await.unwrap();
    assert!(
        body.contains("slow: no S2S token"),
        "the slow environment's first fetch is still in flight: {body}"
    );
    let response = support::get(
        &gateway,
        &format!("/slow{WHOAMI}"),
        fast.token_for(ALICE_OID),
    )
    .await;
    assert_eq!(response.status(), 200, "waited for the first token");
    assert_eq!(slow.token_requests(), 1, "no second fetch for the request");
    assert_eq!(slow_org.request_count(), 1);
}

#[test]
fn consent_url_names_an_unknown_environment() {
    let dir = testkit::Scratch::new("dgw-deps").unwrap();
    let path = dir
        .write(
            "config.yaml",
            br#"
inbound:
  issuers:
    - issuer: https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0
      audiences: [api://dynamics-gateway]
dynamics:
  url: https://contoso.crm.dynamics.com
  tenant_id: 72f988bf-86f1-41af-91ab-2d7cd011db47
  client_id: 11111111-2222-3333-4444-555555555555
  client_secret: x
"#,
        )
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_dynamics-gateway"))
        .args(["consent-url", "--environment", "nowhere", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no environment named \"nowhere\"") && stderr.contains("default"),
        "{stderr}"
    );
}

#[tokio::test]
async fn proxies_named_in_the_environment_never_see_a_request_of_the_gateway() {
    use crate::support::binary::{binary_config, free_port, standins, start_binary_with_env};
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A "proxy" that counts who connects and answers nothing.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let listening = tokio::spawn(async move {
        while let Ok((socket, _)) = proxy.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let mut vars = vec![("NO_PROXY", String::new()), ("no_proxy", String::new())];
    for name in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        vars.push((name, proxy_url.clone()));
    }
    // Ready means keys and an S2S token were fetched: not through the proxy, which answers
    // nothing.
    let gateway =
        start_binary_with_env(&binary_config(&idp, &dataverse, "", ports), ports, &vars).await;
    let response = support::client()
        .get(format!("{}{WHOAMI}", gateway.url))
        .bearer_auth(idp.token_for(ALICE_OID))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "a request of the gateway went to the proxy"
    );
    listening.abort();
}
