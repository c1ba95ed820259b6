//! Headers as real Dataverse and real clients send them, through the real gateway over
//! 127.0.0.1 (issue 10, points 3, 4 and 6): affinity cookies kept between the gateway and
//! Dataverse unless an environment opts in, control headers passed when harmless and
//! refused with 403 when they bypass logic no rule grants, and links naming any of the
//! organisation's host names pointed back at the gateway.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use dynamics_gateway::config::Config;
use serde_json::{json, Value};
use support::{client, error_body, start_gateway, GatewayHandle, ALICE_OID};
use testkit::{gateway_config_yaml, ConfigParts, DataverseHandle, Throttling};

const BOUNDARY: &str = "batch_real_headers";

struct Setup {
    idp: testkit::IdpHandle,
    dataverse: DataverseHandle,
    gateway: GatewayHandle,
}

impl Setup {
    fn token(&self) -> String {
        self.idp.token_for(ALICE_OID)
    }

    fn api(&self) -> String {
        format!("{}/api/data/v9.2", self.gateway.url())
    }
}

/// IdP, stand-in Dataverse and gateway; `dynamics` gives the extra lines under `dynamics:`
/// once the stand-in's address is known.
async fn start(dynamics: impl FnOnce(&DataverseHandle) -> String) -> Setup {
    let (idp, dataverse) = support::stand_ins(Throttling::default()).await;
    let parts = ConfigParts {
        identity: support::CALLER_OBJECT_ID.into(),
        inbound: "  jwks_refetch_interval: 0s\n".into(),
        dynamics: dynamics(&dataverse),
        ..ConfigParts::default()
    };
    let gateway = start_gateway(&gateway_config_yaml(&idp, &dataverse.url(), &parts)).await;
    gateway.wait_ready().await;
    Setup {
        idp,
        dataverse,
        gateway,
    }
}

fn batch_body(api: &str) -> String {
    format!(
        "--{BOUNDARY}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nGET {api}/accounts?$top=1 HTTP/1.1\r\nAccept: application/json\r\n\r\n\r\n--{BOUNDARY}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nPOST {api}/accounts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{{\"name\":\"in batch\"}}\r\n--{BOUNDARY}--\r\n"
    )
}

async fn post_batch(setup: &Setup, body: String, cookie: Option<&str>) -> reqwest::Response {
    let mut request = client()
        .post(format!("{}/$batch", setup.api()))
        .bearer_auth(setup.token())
        .header(
            "content-type",
            format!("multipart/mixed; boundary={BOUNDARY}"),
        )
        .body(body);
    if let Some(cookie) = cookie {
        request = request.header("cookie", cookie);
    }
    request.send().await.unwrap()
}

fn set_cookies(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

// ------------------------------------------------------------------------------ cookies

#[tokio::test]
async fn the_stand_in_sets_affinity_cookies_like_dataverse() {
    let setup = start(|_| String::new()).await;
    // Straight to the stand-in: the cookies the gateway must keep from callers exist.
    let direct = client()
        .get(format!("{}/accounts", setup.dataverse.api_url()))
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    let cookies = set_cookies(&direct);
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    assert!(cookies[0].starts_with("ARRAffinity="), "{cookies:?}");
    assert!(
        cookies[0].ends_with("; path=/; secure; HttpOnly"),
        "{cookies:?}"
    );
    assert!(cookies[1].starts_with("ReqClientId="), "{cookies:?}");
}

#[tokio::test]
async fn affinity_cookies_never_reach_callers_and_caller_cookies_never_reach_dynamics() {
    let setup = start(|_| String::new()).await;
    let api = setup.api();
    let checks = [
        ("GET", format!("{api}/accounts"), 200),
        (
            "GET",
            format!("{api}/accounts(00000000-0000-0000-0000-0000000000ff)"),
            404,
        ),
        ("POST", format!("{api}/accounts"), 204),
        ("GET", format!("{api}/WhoAmI"), 200),
    ];
    for (method, url, status) in checks {
        let before = setup.dataverse.request_count();
        let mut request = client()
            .request(method.parse().unwrap(), &url)
            .bearer_auth(setup.token())
            .header("cookie", "session=app-secret; ARRAffinity=pinned")
            .header("cookie", "ReqClientId=other-app");
        if method == "POST" {
            request = request
                .header("content-type", "application/json")
                .body(r#"{"name":"cookie test"}"#);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), status, "{url}");
        assert!(
            set_cookies(&response).is_empty(),
            "{url}: {:?}",
            response.headers()
        );
        let requests = setup.dataverse.requests();
        assert_eq!(requests.len(), before + 1);
        let seen = requests.last().unwrap();
        assert!(
            seen.headers.get_all("cookie").iter().next().is_none(),
            "{url}: {:?}",
            seen.headers
        );
    }
    // $batch: the outer response carries the cookies too.
    let response = post_batch(&setup, batch_body(&api), Some("session=app-secret")).await;
    assert_eq!(response.status(), 200);
    assert!(set_cookies(&response).is_empty());
    let seen = setup.dataverse.requests().pop().unwrap();
    assert!(!seen.headers.contains_key("cookie"));
    assert!(!seen.body_text().to_ascii_lowercase().contains("cookie"));
}

#[tokio::test]
async fn with_forward_cookies_both_directions_pass() {
    let setup = start(|_| "  forward_cookies: true\n".into()).await;
    let response = client()
        .get(format!("{}/accounts", setup.api()))
        .bearer_auth(setup.token())
        .header("cookie", "ARRAffinity=pinned")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cookies = set_cookies(&response);
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    assert!(cookies.iter().any(|c| c.starts_with("ARRAffinity=")));
    assert!(cookies.iter().any(|c| c.starts_with("ReqClientId=")));
    let seen = setup.dataverse.requests().pop().unwrap();
    assert_eq!(seen.header("cookie"), Some("ARRAffinity=pinned"));
}

// ---------------------------------------------------------------------- control headers

#[tokio::test]
async fn without_access_rules_harmless_control_headers_pass_and_bypass_headers_are_refused() {
    let setup = start(|_| String::new()).await;
    let url = format!("{}/accounts", setup.api());
    let response = client()
        .post(&url)
        .bearer_auth(setup.token())
        .header("content-type", "application/json")
        .header("MSCRM.SolutionUniqueName", "ContosoCore")
        .header("MSCRM.SuppressDuplicateDetection", "false")
        .header("MSCRM.MergeLabels", "true")
        .header("MSCRM.tag", "import-42")
        .body(r#"{"name":"harmless"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    let seen = setup.dataverse.requests().pop().unwrap();
    assert_eq!(seen.header("mscrm.solutionuniquename"), Some("ContosoCore"));
    assert_eq!(
        seen.header("mscrm.suppressduplicatedetection"),
        Some("false")
    );
    assert_eq!(seen.header("mscrm.mergelabels"), Some("true"));
    assert_eq!(seen.header("mscrm.tag"), Some("import-42"));

    for bypass in [
        "MSCRM.BypassCustomPluginExecution",
        "MSCRM.BypassBusinessLogicExecution",
        "MSCRM.BypassBusinessLogicExecutionStepIds",
        "MSCRM.SuppressCallbackRegistrationExpanderJob",
        "MSCRM.SomethingMicrosoftAddsNext",
        "MSCRM_BypassCustomPluginExecution",
        "mscrm-solutionuniquename",
    ] {
        let before = setup.dataverse.request_count();
        let response = client()
            .post(&url)
            .bearer_auth(setup.token())
            .header("content-type", "application/json")
            .header("MSCRM.SolutionUniqueName", "ContosoCore")
            .header(bypass, "true")
            .body(r#"{"name":"bypass"}"#)
            .send()
            .await
            .unwrap();
        let (status, code, message) = error_body(response).await;
        assert_eq!(status, 403, "{bypass}");
        assert_eq!(code, "DynamicsGateway.ControlHeaderNotAllowed");
        assert!(
            message.contains(&format!("`{}`", bypass.to_ascii_lowercase())),
            "{message}"
        );
        assert!(message.contains("request id"), "{message}");
        assert_eq!(
            setup.dataverse.request_count(),
            before,
            "{bypass} reached Dynamics"
        );
    }

    // The same decision inside a $batch part: the batch is refused, naming header and part.
    let api = setup.api();
    let part = |header: &str| {
        format!(
            "--{BOUNDARY}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 4\r\n\r\nPOST {api}/accounts HTTP/1.1\r\nContent-Type: application/json\r\n{header}\r\n{{\"name\":\"part\"}}\r\n--{BOUNDARY}--\r\n"
        )
    };
    let before = setup.dataverse.request_count();
    let refused = post_batch(
        &setup,
        part("MSCRM.BypassCustomPluginExecution: true\r\n"),
        None,
    )
    .await;
    let (status, code, message) = error_body(refused).await;
    assert_eq!(status, 403);
    assert_eq!(code, "DynamicsGateway.ControlHeaderNotAllowed");
    assert!(
        message.contains("`MSCRM.BypassCustomPluginExecution`"),
        "{message}"
    );
    assert!(message.contains("part 1 (Content-ID 4)"), "{message}");
    assert_eq!(setup.dataverse.request_count(), before);
    let passed = post_batch(
        &setup,
        part(
            "MSCRM.SolutionUniqueName: ContosoCore\r\nMSCRM.SuppressDuplicateDetection: false\r\n",
        ),
        None,
    )
    .await;
    assert_eq!(passed.status(), 200);
    let seen = setup.dataverse.requests().pop().unwrap().body_text();
    assert!(
        seen.contains("MSCRM.SolutionUniqueName: ContosoCore\r\n"),
        "{seen}"
    );
    assert!(
        seen.contains("MSCRM.SuppressDuplicateDetection: false\r\n"),
        "{seen}"
    );
}

// ---------------------------------------------------------------------- alias host names

fn alias_config(dataverse: &DataverseHandle) -> String {
    format!("  url_aliases: [\"{}\"]\n", dataverse.alias_url())
}

/// Every absolute URL in `text` names the gateway: none names the stand-in by either name.
fn assert_only_gateway_links(text: &str, setup: &Setup) {
    let lower = text.to_ascii_lowercase();
    let port = setup.dataverse.addr().port();
    assert!(!lower.contains(&format!("localhost:{port}")), "{text}");
    assert!(!lower.contains(&format!("127.0.0.1:{port}")), "{text}");
}

#[tokio::test]
async fn links_naming_an_alias_host_come_back_naming_the_gateway_in_any_case() {
    let setup = start(alias_config).await;
    let port = setup.dataverse.addr().port();
    let gw_api = setup.api();
    for origin in [
        format!("http://localhost:{port}"),
        format!("http://LOCALHOST:{port}"),
        format!("HTTP://LocalHost:{port}"),
    ] {
        setup.dataverse.set_link_origin(&origin);

        // JSON bodies: @odata.context and a nextLink that is then followed.
        let response = client()
            .get(format!("{gw_api}/accounts?$select=name"))
            .bearer_auth(setup.token())
            .header("prefer", "odata.maxpagesize=1")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        assert_only_gateway_links(&text, &setup);
        let page: Value = serde_json::from_str(&text).unwrap();
        let next = page["@odata.nextLink"].as_str().unwrap();
        assert!(next.starts_with(&gw_api), "{next}");
        assert!(page["@odata.context"]
            .as_str()
            .unwrap()
            .starts_with(&gw_api));
        let second = client()
            .get(next)
            .bearer_auth(setup.token())
            .header("prefer", "odata.maxpagesize=1")
            .send()
            .await
            .unwrap();
        assert_eq!(second.status(), 200, "{next}");
        assert_only_gateway_links(&second.text().await.unwrap(), &setup);

        // Headers: OData-EntityId of a create.
        let created = client()
            .post(format!("{gw_api}/accounts"))
            .bearer_auth(setup.token())
            .header("content-type", "application/json")
            .body(r#"{"name":"alias"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 204);
        let entity_id = created.headers()["odata-entityid"].to_str().unwrap();
        assert!(
            entity_id.starts_with(&format!("{gw_api}/accounts(")),
            "{entity_id}"
        );

        // $batch bodies: part headers and JSON inside parts.
        let response = post_batch(&setup, batch_body(&gw_api), None).await;
        assert_eq!(response.status(), 200);
        let text = response.text().await.unwrap();
        assert!(text.contains(&gw_api), "{text}");
        assert_only_gateway_links(&text, &setup);
    }
}

#[tokio::test]
async fn alias_links_are_left_alone_without_url_aliases_and_requests_still_name_the_configured_origin(
) {
    let setup = start(|_| String::new()).await;
    let alias = setup.dataverse.alias_url();
    setup.dataverse.set_link_origin(&alias);
    let text = support::text_of(
        client()
            .get(format!("{}/accounts", setup.api()))
            .bearer_auth(setup.token()),
    )
    .await;
    // The proof the alias test depends on the setting: unlisted, the alias stays.
    assert!(text.contains(&alias), "{text}");

    // Request direction, with aliases configured: links naming the gateway reach Dynamics
    // naming the configured origin, not an alias.
    let setup = start(alias_config).await;
    setup
        .dataverse
        .set_link_origin(&setup.dataverse.alias_url());
    let contact = format!(
        "{}/contacts(00000000-0000-0000-0000-000000000001)",
        setup.api()
    );
    let response = client()
        .post(format!("{}/accounts", setup.api()))
        .bearer_auth(setup.token())
        .header("content-type", "application/json")
        .body(json!({"name": "bound", "primarycontactid@odata.bind": contact}).to_string())
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let stored = setup.dataverse.records("accounts");
    let bound = stored
        .iter()
        .find(|r| r["name"] == "bound")
        .expect("created");
    assert_eq!(
        bound["primarycontactid@odata.bind"],
        format!(
            "{}/contacts(00000000-0000-0000-0000-000000000001)",
            setup.dataverse.api_url()
        )
    );
}

#[tokio::test]
async fn batch_parts_naming_an_alias_host_reach_dynamics_naming_the_configured_origin() {
    let setup = start(alias_config).await;
    let alias = setup.dataverse.alias_url();
    let dataverse_api = format!("{}/api/data/v9.2", setup.dataverse.url());
    let last_batch = |setup: &Setup| {
        setup
            .dataverse
            .requests()
            .into_iter()
            .rev()
            .find(|r| r.path_and_query.ends_with("$batch"))
            .map(|r| r.body_text())
            .unwrap_or_default()
    };

    // Absolute part URLs naming the alias, in any case.
    for origin in [alias.clone(), alias.replace("localhost", "LocalHost")] {
        let response =
            post_batch(&setup, batch_body(&format!("{origin}/api/data/v9.2")), None).await;
        assert_eq!(response.status(), 200, "{origin}");
        let body = last_batch(&setup);
        assert!(
            body.contains(&format!("GET {dataverse_api}/accounts?$top=1")),
            "{body}"
        );
        assert!(!body.to_ascii_lowercase().contains("localhost"), "{body}");
    }

    // A relative part URL with a Host naming the alias.
    let host = alias.trim_start_matches("http://").to_owned();
    let body = format!(
        "--{BOUNDARY}\r\nContent-Type: application/http\r\n\r\nGET /api/data/v9.2/accounts?$top=1 HTTP/1.1\r\nHost: {host}\r\n\r\n\r\n--{BOUNDARY}--\r\n"
    );
    assert_eq!(post_batch(&setup, body, None).await.status(), 200);
    let seen = last_batch(&setup);
    let dataverse_host = setup
        .dataverse
        .url()
        .trim_start_matches("http://")
        .to_owned();
    assert!(seen.contains(&format!("Host: {dataverse_host}")), "{seen}");

    // Without url_aliases the alias is just another host.
    let plain = start(|_| String::new()).await;
    let response = post_batch(
        &plain,
        batch_body(&format!("{}/api/data/v9.2", plain.dataverse.alias_url())),
        None,
    )
    .await;
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn url_aliases_must_be_origins() {
    let idp = testkit::Idp::builder().start().await.unwrap();
    for (alias, wanted) in [
        (
            "https://contoso.api.crm.dynamics.com/api",
            "must be an origin only",
        ),
        ("http://contoso.api.crm.dynamics.com", "only https://"),
        ("http://127.0.0.1:9", "already the environment's url"),
        ("not a url", "not an absolute URL"),
    ] {
        let parts = ConfigParts {
            dynamics: format!("  url_aliases: [\"{alias}\"]\n"),
            ..ConfigParts::default()
        };
        let yaml = gateway_config_yaml(&idp, "http://127.0.0.1:9", &parts);
        let error = Config::from_yaml(&yaml, &|_| None).unwrap_err().to_string();
        assert!(error.contains("dynamics.url_aliases[0]"), "{error}");
        assert!(error.contains(wanted), "{alias}: {error}");
    }
    let parts = ConfigParts {
        dynamics:
            "  url_aliases: [\"https://Contoso.API.crm.dynamics.com\"]\n  forward_cookies: true\n"
                .into(),
        ..ConfigParts::default()
    };
    let yaml = gateway_config_yaml(&idp, "http://127.0.0.1:9", &parts);
    let config = Config::from_yaml(&yaml, &|_| None).unwrap();
    let env = &config.dynamics.environments[0];
    assert_eq!(env.url_aliases, ["https://contoso.api.crm.dynamics.com"]);
    assert!(env.forward_cookies);
}
