//! Access rules, end to end: each outcome (rule grants, rule does not cover, default deny),
//! `$batch` only where a rule says so, control headers only where a rule allows them, and
//! app-only service callers acting as the application user.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use serde_json::json;
use support::{client, env, error_body, metric, Env, ALICE_OID};

const POLICY: &str = "identity:
  mode: caller_object_id
access:
  default: deny
  rules:
    - name: sales-app-reads
      when: { roles: [Sales.Read] }
      allow: { methods: [GET], entity_sets: [accounts, contacts, WhoAmI] }
    - name: batch-writers
      when: { scp: [Dynamics.Write] }
      allow: { methods: [GET, POST, PATCH, DELETE], entity_sets: [\"*\"], batch: true, control_headers: [MSCRM.BypassCustomPluginExecution] }
    - name: sync-service
      when: { roles: [Service.Sync] }
      allow: { methods: [GET], entity_sets: [accounts] }
      impersonation: app_only
";

/// A user token of Alice with these extra claims.
fn token(env: &Env, extra: serde_json::Value) -> String {
    let mut claims = env.idp.claims_for(ALICE_OID);
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    env.idp.sign(claims)
}

async fn send(env: &Env, method: reqwest::Method, path: &str, token: &str) -> reqwest::Response {
    let mut request = client()
        .request(method.clone(), format!("{}{path}", env.gateway.url()))
        .bearer_auth(token);
    if method == reqwest::Method::POST {
        request = request
            .header("content-type", "application/json")
            .body(r#"{"name":"x"}"#);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn a_rule_grants_what_it_covers_and_nothing_else() {
    let env = env().identity(POLICY).start().await;
    let reader = token(&env, json!({"roles": ["Sales.Read"]}));
    assert_eq!(
        send(
            &env,
            reqwest::Method::GET,
            "/api/data/v9.2/accounts",
            &reader
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        send(
            &env,
            reqwest::Method::GET,
            "/api/data/v9.2/WhoAmI()",
            &reader
        )
        .await
        .status(),
        200
    );
    assert_eq!(env.dataverse.request_count(), 2);

    let (status, code, message) = error_body(
        send(
            &env,
            reqwest::Method::POST,
            "/api/data/v9.2/accounts",
            &reader,
        )
        .await,
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (403, "DynamicsGateway.AccessDenied")
    );
    assert!(
        message.contains("no rule allows POST on accounts for this caller"),
        "{message}"
    );
    let (status, _, message) = error_body(
        send(
            &env,
            reqwest::Method::GET,
            "/api/data/v9.2/systemusers",
            &reader,
        )
        .await,
    )
    .await;
    assert_eq!(status, 403);
    assert!(message.contains("systemusers"), "{message}");
    assert_eq!(
        env.dataverse.request_count(),
        2,
        "denied requests never reach Dynamics"
    );
    assert_eq!(
        metric(
            &env.gateway,
            "dynamics_gateway_access_denied_total{rule=\"sales-app-reads\"}"
        )
        .await,
        2.0
    );

    // No matching rule at all: the default decides.
    let nobody = env.idp.token_for(ALICE_OID);
    let (status, _, _) = error_body(
        send(
            &env,
            reqwest::Method::GET,
            "/api/data/v9.2/accounts",
            &nobody,
        )
        .await,
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(
        metric(
            &env.gateway,
            "dynamics_gateway_access_denied_total{rule=\"default\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn batch_is_allowed_only_by_a_rule_that_says_so() {
    let env = env().identity(POLICY).start().await;
    let batch = "--batch_x\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nGET /api/data/v9.2/accounts HTTP/1.1\r\n\r\n\r\n--batch_x--\r\n";
    let post_batch = |t: String| {
        let url = format!("{}/api/data/v9.2/$batch", env.gateway.url());
        async move {
            client()
                .post(url)
                .bearer_auth(t)
                .header("content-type", "multipart/mixed;boundary=batch_x")
                .body(batch)
                .send()
                .await
                .unwrap()
        }
    };
    let reader = token(&env, json!({"roles": ["Sales.Read"]}));
    let (status, _, message) = error_body(post_batch(reader).await).await;
    assert_eq!(status, 403, "{message}");
    assert_eq!(env.dataverse.request_count(), 0);
    let writer = token(&env, json!({"scp": "user_impersonation Dynamics.Write"}));
    assert_eq!(post_batch(writer).await.status(), 200);
}

#[tokio::test]
async fn control_headers_pass_only_where_a_rule_allows_them() {
    // Issue 10: a bypass header no rule grants is refused with 403 naming it (it used to
    // be dropped silently); harmless control headers pass without a grant.
    let env = env().identity(POLICY).start().await;
    let send_with = |t: String, headers: &'static [(&'static str, &'static str)]| {
        let url = format!("{}/api/data/v9.2/accounts", env.gateway.url());
        async move {
            let mut request = client().get(url).bearer_auth(t);
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            request.send().await.unwrap()
        }
    };
    const BYPASSES: &[(&str, &str)] = &[
        ("MSCRM.BypassCustomPluginExecution", "true"),
        ("MSCRM.BypassBusinessLogicExecution", "CustomSync"),
        ("msCRM.SuppressCallbackRegistrationExpanderJob", "true"),
    ];
    let reader = token(&env, json!({"roles": ["Sales.Read"]}));
    let (status, code, message) = error_body(send_with(reader.clone(), BYPASSES).await).await;
    assert_eq!(status, 403);
    assert_eq!(code, "DynamicsGateway.ControlHeaderNotAllowed");
    assert!(message.contains("`mscrm."), "{message}");
    assert!(message.contains("sales-app-reads"), "{message}");
    assert_eq!(env.dataverse.request_count(), 0);

    let writer = token(&env, json!({"scp": "Dynamics.Write"}));
    let (status, _, message) = error_body(send_with(writer.clone(), BYPASSES).await).await;
    assert_eq!(status, 403);
    assert!(
        message.contains("`mscrm.bypassbusinesslogicexecution`")
            || message.contains("`mscrm.suppresscallbackregistrationexpanderjob`"),
        "{message}"
    );
    assert_eq!(env.dataverse.request_count(), 0);

    const GRANTED: &[(&str, &str)] = &[
        ("MSCRM.BypassCustomPluginExecution", "true"),
        ("MSCRM.SolutionUniqueName", "ContosoCore"),
    ];
    assert_eq!(send_with(writer, GRANTED).await.status(), 200);
    let seen = env.dataverse.requests().pop().unwrap();
    assert_eq!(
        seen.header("mscrm.bypasscustompluginexecution"),
        Some("true")
    );
    assert_eq!(seen.header("mscrm.solutionuniquename"), Some("ContosoCore"));
    const HARMLESS: &[(&str, &str)] = &[("MSCRM.SolutionUniqueName", "ContosoCore")];
    assert_eq!(send_with(reader, HARMLESS).await.status(), 200);
}

#[tokio::test]
async fn app_only_service_callers_act_as_the_application_user() {
    let env = env().identity(POLICY).start().await;
    // An app-only token: roles, no scp, idtyp app, and no user behind it.
    let mut claims = env.idp.claims_for(ALICE_OID);
    let object = claims.as_object_mut().unwrap();
    object.remove("scp");
    object.remove("oid");
    object.insert("idtyp".into(), json!("app"));
    object.insert("roles".into(), json!(["Service.Sync"]));
    let service = env.idp.sign(claims);
    let response = send(
        &env,
        reqwest::Method::GET,
        "/api/data/v9.2/accounts",
        &service,
    )
    .await;
    assert_eq!(response.status(), 200);
    let seen = env.dataverse.requests().pop().unwrap();
    assert!(seen.header("callerobjectid").is_none() && seen.header("mscrmcallerid").is_none());

    // A user holding the same role never gets the application user's identity.
    let user = token(&env, json!({"roles": ["Service.Sync"]}));
    let (status, _, _) =
        error_body(send(&env, reqwest::Method::GET, "/api/data/v9.2/accounts", &user).await).await;
    assert_eq!(status, 403);
    assert_eq!(env.dataverse.request_count(), 1);
}

#[tokio::test]
async fn an_access_section_without_rules_or_default_is_refused() {
    let idp = testkit::Idp::builder().start().await.unwrap();
    let yaml = support::config_yaml(&idp, "http://127.0.0.1:9", "access: {}\n", "", "");
    let err = dynamics_gateway::config::Config::from_yaml(&yaml, &|_| None)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("access"), "{err}");
}
