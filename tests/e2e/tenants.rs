//! Several organisations and tenants, end to end: two customer tenants with their own
//! stand-in Dataverse and token endpoint, routing by tenant and by path prefix, the
//! `{tenantid}` issuer template with its allowlist, and one tenant's outage.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use serde_json::json;
use support::{client, error_body, metric, start_gateway, GatewayHandle, ALICE_OID};
use testkit::{Dataverse, DataverseHandle, DirectoryUser, Idp, IdpHandle, TokenEndpointMode};

const TENANT_A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const TENANT_B: &str = "bbbbbbbb-0000-4000-8000-00000000000b";
const TENANT_C: &str = "cccccccc-0000-4000-8000-00000000000c";
const BOB_IN_B: &str = "0b0b0b0b-1111-4111-8111-0000000000b0";
const WHOAMI: &str = "/api/data/v9.2/WhoAmI";

/// Customer tenants A and B: each its own token endpoint (its own IdP) and organisation.
/// Caller tokens come from A's IdP for any tenant, as Azure AD's common endpoint signs for all.
struct Tenants {
    idp_a: IdpHandle,
    idp_b: IdpHandle,
    org_a: DataverseHandle,
    org_b: DataverseHandle,
    gateway: GatewayHandle,
}

impl Tenants {
    /// The `{tenantid}` template of the callers' issuer.
    fn template(idp: &IdpHandle) -> String {
        format!("{}/{{tenantid}}/v2.0", idp.base_url())
    }

    /// A caller token of `tid`, signed by the common keys.
    fn token(&self, oid: &str, tid: &str) -> String {
        let mut claims = self.idp_a.claims_for(oid);
        claims["tid"] = json!(tid);
        claims["iss"] = json!(format!("{}/{tid}/v2.0", self.idp_a.base_url()));
        self.idp_a.sign(claims)
    }

    async fn get(&self, path: &str, token: &str) -> reqwest::Response {
        support::get(&self.gateway, path, token).await
    }
}

/// An organisation taking `idp`'s tokens, with one user in its directory.
async fn organisation(idp: &IdpHandle, oid: &str, email: &str) -> DataverseHandle {
    Dataverse::builder()
        .accept_tokens_from(idp.s2s_registry())
        .user(DirectoryUser::new(oid, email))
        .start()
        .await
        .unwrap()
}

/// One entry of `dynamics.environments`: `org`, reached with `idp`'s app registration.
fn environment(name: &str, idp: &IdpHandle, org: &DataverseHandle, tenant: &str) -> String {
    format!(
        "    - name: {name}\n      url: {}\n      tenant_id: {tenant}\n      client_id: {}\n      client_secret: {}\n      token_url: {}\n",
        org.url(),
        idp.client_id(),
        idp.client_secret(),
        idp.token_url()
    )
}

async fn tenants(routing: &str, identity: &str, b_down: bool) -> Tenants {
    let idp_a = Idp::builder().tenant_id(TENANT_A).start().await.unwrap();
    let idp_b = Idp::builder().tenant_id(TENANT_B).start().await.unwrap();
    if b_down {
        idp_b.set_token_endpoint_mode(TokenEndpointMode::InvalidClient);
    }
    let org_a = organisation(&idp_a, ALICE_OID, "alice@a.example").await;
    let org_b = organisation(&idp_b, BOB_IN_B, "bob@b.example").await;
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:1\n  admin_listen: 127.0.0.1:2\n\
inbound:\n  issuers:\n    - issuer: {template}\n      audiences: [{aud}]\n      tenants: [{TENANT_A}, {TENANT_B}]\n  jwks_refetch_interval: 0s\n\
{identity}\
dynamics:\n  routing: {{ by: {routing} }}\n  environments:\n{a}{b}",
        template = Tenants::template(&idp_a),
        aud = idp_a.audience(),
        a = environment("contoso", &idp_a, &org_a, TENANT_A),
        b = environment("fabrikam", &idp_b, &org_b, TENANT_B),
    );
    let gateway = start_gateway(&yaml).await;
    if b_down {
        // Ready as soon as one environment can be served.
        gateway.wait_ready().await;
    } else {
        for _ in 0..200 {
            let body = gateway.readyz().await.text().await.unwrap();
            if !body.contains("no S2S token") && body.starts_with("ready") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    Tenants {
        idp_a,
        idp_b,
        org_a,
        org_b,
        gateway,
    }
}

#[tokio::test]
async fn routing_by_tenant_sends_each_caller_to_its_own_organisation_with_its_own_token() {
    let t = tenants("tenant", "", false).await;
    assert_eq!(
        t.get(WHOAMI, &t.token(ALICE_OID, TENANT_A)).await.status(),
        200
    );
    assert_eq!(
        t.get(WHOAMI, &t.token(BOB_IN_B, TENANT_B)).await.status(),
        200
    );
    let a = t.org_a.requests();
    let b = t.org_b.requests();
    assert_eq!((a.len(), b.len()), (1, 1));
    assert_eq!(a[0].header("callerobjectid"), Some(ALICE_OID));
    assert_eq!(b[0].header("callerobjectid"), Some(BOB_IN_B));
    assert_eq!(
        a[0].header("authorization"),
        Some(format!("Bearer {}", t.idp_a.issued_s2s_tokens()[0]).as_str())
    );
    assert_eq!(
        b[0].header("authorization"),
        Some(format!("Bearer {}", t.idp_b.issued_s2s_tokens()[0]).as_str())
    );
    // In tenant routing the path cannot pick an environment.
    let response = t
        .get(&format!("/fabrikam{WHOAMI}"), &t.token(ALICE_OID, TENANT_A))
        .await;
    assert_eq!(response.status(), 404);
    assert_eq!(t.org_b.request_count(), 1);
}

#[tokio::test]
async fn a_caller_of_tenant_a_never_reaches_b_by_path_or_header() {
    let t = tenants("path_prefix", "", false).await;
    let alice = t.token(ALICE_OID, TENANT_A);
    assert_eq!(
        t.get(&format!("/contoso{WHOAMI}"), &alice).await.status(),
        200
    );
    let (status, code, message) =
        error_body(t.get(&format!("/fabrikam{WHOAMI}"), &alice).await).await;
    assert_eq!(
        (status, code.as_str()),
        (403, "DynamicsGateway.EnvironmentNotAllowed"),
        "{message}"
    );
    let (status, code, _) = error_body(t.get(&format!("/nowhere{WHOAMI}"), &alice).await).await;
    assert_eq!(
        (status, code.as_str()),
        (404, "DynamicsGateway.UnknownEnvironment")
    );
    let response = client()
        .get(format!("{}/contoso{WHOAMI}", t.gateway.url()))
        .bearer_auth(&alice)
        .header("Host", t.org_b.addr().to_string())
        .header("X-Forwarded-Host", t.org_b.addr().to_string())
        .header("X-MS-Environment", "fabrikam")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(t.org_b.request_count(), 0, "nothing ever reached B");
    assert_eq!(t.org_a.request_count(), 2);
    // Links handed back keep the caller on its environment's prefix.
    let who: serde_json::Value = t
        .get(&format!("/contoso{WHOAMI}"), &alice)
        .await
        .json()
        .await
        .unwrap();
    let context = who["@odata.context"].as_str().unwrap();
    assert!(
        context.starts_with(&format!("{}/contoso/api/data/v9.2/", t.gateway.url())),
        "{context}"
    );
}

#[tokio::test]
async fn each_environment_counts_its_requests_upstream_calls_and_tokens_under_its_name() {
    let t = tenants("path_prefix", "", false).await;
    let alice = t.token(ALICE_OID, TENANT_A);
    let bob = t.token(BOB_IN_B, TENANT_B);
    for _ in 0..2 {
        assert_eq!(
            t.get(&format!("/contoso{WHOAMI}"), &alice).await.status(),
            200
        );
    }
    assert_eq!(
        t.get(&format!("/fabrikam{WHOAMI}"), &bob).await.status(),
        200
    );
    // Refused at routing: an invented environment, and one that does not serve the caller.
    for name in ["nowhere", "contoso-2", "fabrikam"] {
        let status = t.get(&format!("/{name}{WHOAMI}"), &alice).await.status();
        assert!(status == 404 || status == 403, "{name}: {status}");
    }
    let series = |name: &str, labels: &str| format!("dynamics_gateway_{name}{{{labels}}}");
    let gateway = &t.gateway;
    let sample = |name: &str, labels: &str| {
        let series = series(name, labels);
        async move { metric(gateway, &series).await }
    };
    for (environment, answered) in [("contoso", 2.0), ("fabrikam", 1.0)] {
        let labels = format!("environment=\"{environment}\",method=\"GET\"");
        let ok = format!("{labels},status=\"200\"");
        assert_eq!(
            sample("requests_total", &ok).await,
            answered,
            "{environment}"
        );
        assert_eq!(
            sample("request_duration_seconds_count", &labels).await,
            answered,
            "{environment}"
        );
        assert_eq!(
            sample("upstream_duration_seconds_count", &labels).await,
            answered,
            "{environment}: each request reached its own organisation once"
        );
        let token = format!("environment=\"{environment}\",result=\"success\"");
        assert!(
            metric(&t.gateway, &series("token_requests_total", &token)).await >= 1.0,
            "{environment} fetched its own token"
        );
    }
    let refused = |status: &str| {
        series(
            "requests_total",
            &format!("environment=\"none\",method=\"GET\",status=\"{status}\""),
        )
    };
    assert_eq!(
        metric(&t.gateway, &refused("404")).await + metric(&t.gateway, &refused("403")).await,
        3.0,
        "requests refused at routing are counted under none"
    );
    let text = support::metrics_text(&t.gateway.admin_url()).await;
    assert!(
        !text.contains("nowhere") && !text.contains("contoso-2"),
        "{text}"
    );
}

#[tokio::test]
async fn a_token_shared_by_two_environments_is_fetched_once_and_counted_under_each() {
    let idp = Idp::builder().tenant_id(TENANT_A).start().await.unwrap();
    let org = organisation(&idp, ALICE_OID, "alice@a.example").await;
    // Two names for one organisation and app registration: one token serves both.
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:1\n  admin_listen: 127.0.0.1:2\n\
inbound:\n  issuers:\n    - issuer: {issuer}\n      audiences: [{aud}]\n      tenants: [{TENANT_A}]\n  jwks_refetch_interval: 0s\n\
dynamics:\n  routing: {{ by: path_prefix }}\n  environments:\n{a}{b}",
        issuer = idp.issuer(),
        aud = idp.audience(),
        a = environment("sales", &idp, &org, TENANT_A),
        b = environment("service", &idp, &org, TENANT_A),
    );
    let gateway = start_gateway(&yaml).await;
    gateway.wait_ready().await;
    let token = idp.token_for(ALICE_OID);
    for name in ["sales", "service"] {
        let status = support::get(&gateway, &format!("/{name}{WHOAMI}"), &token)
            .await
            .status();
        assert_eq!(status, 200, "{name}");
    }
    assert_eq!(idp.token_requests(), 1, "one token for both");
    for name in ["sales", "service"] {
        let series = format!(
            "dynamics_gateway_token_requests_total{{environment=\"{name}\",result=\"success\"}}"
        );
        assert_eq!(metric(&gateway, &series).await, 1.0, "{name}");
    }
}

#[tokio::test]
async fn template_issuer_accepts_only_listed_tenants_and_matching_iss() {
    let t = tenants("tenant", "", false).await;
    // Correctly signed, from a tenant that is not on the list.
    let response = t.get(WHOAMI, &t.token(ALICE_OID, TENANT_C)).await;
    let www = support::challenge(&response);
    assert_eq!(response.status(), 401);
    assert!(www.contains("tenant"), "{www}");
    // `iss` of one tenant with `tid` of another.
    let mut claims = t.idp_a.claims_for(ALICE_OID);
    claims["tid"] = json!(TENANT_A);
    claims["iss"] = json!(format!("{}/{TENANT_B}/v2.0", t.idp_a.base_url()));
    let response = t.get(WHOAMI, &t.idp_a.sign(claims)).await;
    assert_eq!(response.status(), 401);
    assert_eq!(t.org_a.request_count() + t.org_b.request_count(), 0);
}

#[tokio::test]
async fn caller_object_id_refuses_an_oid_from_another_tenant() {
    // fabrikam serves callers of both tenants, but its organisation lives in tenant B:
    // an object id issued by tenant A names nobody there.
    let idp_a = Idp::builder().tenant_id(TENANT_A).start().await.unwrap();
    let org = Dataverse::builder()
        .accept_tokens_from(idp_a.s2s_registry())
        .start()
        .await
        .unwrap();
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:1\n  admin_listen: 127.0.0.1:2\n\
inbound:\n  issuers:\n    - issuer: {template}\n      audiences: [{aud}]\n      tenants: [{TENANT_A}, {TENANT_B}]\n\
dynamics:\n  url: {url}\n  tenant_id: {TENANT_A}\n  tenants: [{TENANT_A}, {TENANT_B}]\n  client_id: {cid}\n  client_secret: {secret}\n  token_url: {token_url}\n",
        template = Tenants::template(&idp_a),
        aud = idp_a.audience(),
        url = org.url(),
        cid = idp_a.client_id(),
        secret = idp_a.client_secret(),
        token_url = idp_a.token_url(),
    );
    let gateway = start_gateway(&yaml).await;
    gateway.wait_ready().await;
    let mut claims = idp_a.claims_for(ALICE_OID);
    claims["tid"] = json!(TENANT_B);
    claims["iss"] = json!(format!("{}/{TENANT_B}/v2.0", idp_a.base_url()));
    let response = support::get(&gateway, WHOAMI, idp_a.sign(claims)).await;
    let (status, _, message) = error_body(response).await;
    assert_eq!(status, 403);
    assert!(message.contains("another tenant"), "{message}");
    assert_eq!(org.request_count(), 0);
}

#[tokio::test]
async fn one_tenants_token_endpoint_down_leaves_the_other_serving() {
    let t = tenants("tenant", "", true).await;
    let ready = t.gateway.readyz().await;
    assert_eq!(ready.status(), 200);
    let body = ready.text().await.unwrap();
    assert!(
        body.contains("contoso: ready") && body.contains("fabrikam: no S2S token"),
        "{body}"
    );
    assert_eq!(
        t.get(WHOAMI, &t.token(ALICE_OID, TENANT_A)).await.status(),
        200
    );
    let (status, code, message) =
        error_body(t.get(WHOAMI, &t.token(BOB_IN_B, TENANT_B)).await).await;
    assert_eq!(
        (status, code.as_str()),
        (503, "DynamicsGateway.NoUpstreamToken")
    );
    // The cause is for the log, not the caller (issue 9, point 12).
    assert!(!message.contains("AADSTS"), "{message}");
    assert_eq!(t.org_b.request_count(), 0);
    // Each environment's token series tells which one is failing.
    let tokens = |environment: &str, result: &str| {
        format!(
            "dynamics_gateway_token_requests_total{{environment=\"{environment}\",result=\"{result}\"}}"
        )
    };
    assert!(metric(&t.gateway, &tokens("fabrikam", "failure")).await >= 1.0);
    assert_eq!(metric(&t.gateway, &tokens("contoso", "failure")).await, 0.0);
    assert!(metric(&t.gateway, &tokens("contoso", "success")).await >= 1.0);

    t.idp_b.set_token_endpoint_mode(TokenEndpointMode::Ok);
    let mut status = 0;
    for _ in 0..100 {
        status = t
            .get(WHOAMI, &t.token(BOB_IN_B, TENANT_B))
            .await
            .status()
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "B recovers on its own");
}
