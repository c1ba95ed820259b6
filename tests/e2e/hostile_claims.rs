//! Hostile callers, round two (claims): no caller chooses who it is. Each test runs the
//! real gateway over 127.0.0.1 against the stand-in identity provider and Dataverse and
//! signs tokens the way an attacker with a valid key of *some* trusted issuer (or a
//! token meant for something else) would.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::time::Duration;

use dynamics_gateway::config::Config;
use serde_json::{json, Value};
use support::{client, env, error_body, start_gateway, GatewayHandle, ALICE_OID, BOB_OID};
use testkit::{
    gateway_config_yaml, ConfigParts, Dataverse, DataverseHandle, DirectoryUser, Idp, IdpHandle,
};

const WHOAMI: &str = "/api/data/v9.2/WhoAmI";
const ACCOUNTS: &str = "/api/data/v9.2/accounts";
const TENANT_A: &str = "aaaaaaaa-0000-4000-8000-00000000000a";
const TENANT_B: &str = "bbbbbbbb-0000-4000-8000-00000000000b";
const BOB_IN_B: &str = "0b0b0b0b-1111-4111-8111-0000000000b0";
const ALICE_IN_A: &str = "alice@a.example";

/// Only `app_only` grants anything: a request that passes acted as the application user.
const APP_ONLY_POLICY: &str = "identity:
  mode: caller_object_id
access:
  default: deny
  rules:
    - name: sync-service
      when: { roles: [Service.Sync] }
      allow: { methods: [GET], entity_sets: [accounts] }
      impersonation: app_only
";

/// The stand-in's claims for `oid` with `edit` applied (`null` removes a claim).
fn claims_with(idp: &IdpHandle, oid: &str, edit: Value) -> Value {
    let mut claims = idp.claims_for(oid);
    let object = claims.as_object_mut().unwrap();
    for (k, v) in edit.as_object().unwrap() {
        if v.is_null() {
            object.remove(k);
        } else {
            object.insert(k.clone(), v.clone());
        }
    }
    claims
}

fn signed(idp: &IdpHandle, oid: &str, edit: Value) -> String {
    idp.sign(claims_with(idp, oid, edit))
}

/// Signs with the IdP's current key and this JOSE header (`kid` added).
fn signed_with_header(idp: &IdpHandle, mut header: Value, claims: &Value) -> String {
    let key = idp.current_key();
    header["kid"] = json!(key.kid());
    key.sign_jwt(&header, claims)
}

/// An IdP, a stand-in Dataverse with Alice, and a gateway whose generated config went
/// through `edit` first.
struct Custom {
    idp: IdpHandle,
    dataverse: DataverseHandle,
    gateway: GatewayHandle,
}

async fn custom(identity: &str, dynamics: &str, edit: impl FnOnce(String) -> String) -> Custom {
    let idp = Idp::builder().start().await.unwrap();
    let dataverse = Dataverse::builder()
        .accept_tokens_from(idp.s2s_registry())
        .user(DirectoryUser::new(ALICE_OID, support::ALICE_EMAIL))
        .start()
        .await
        .unwrap();
    let parts = ConfigParts {
        identity: identity.into(),
        server: String::new(),
        inbound: "  jwks_refetch_interval: 0s\n".into(),
        dynamics: dynamics.into(),
    };
    let yaml = edit(gateway_config_yaml(&idp, &dataverse.url(), &parts));
    let gateway = start_gateway(&yaml).await;
    gateway.wait_ready().await;
    Custom {
        idp,
        dataverse,
        gateway,
    }
}

// ------------------------------------------------------------------ 6: app-only evidence

#[tokio::test]
async fn an_entra_id_token_is_refused_401_even_with_the_app_role() {
    let env = env().identity(APP_ONLY_POLICY).start().await;
    // An ID token: no scp, no idtyp, a nonce, the user's roles; signed by the issuer.
    let id_token = signed(
        &env.idp,
        ALICE_OID,
        json!({ "scp": null, "azp": null, "nonce": "n-0S6_WzA2Mj", "roles": ["Service.Sync"] }),
    );
    let response = support::get(&env.gateway, ACCOUNTS, &id_token).await;
    let www = support::challenge(&response);
    let (status, code, message) = error_body(response).await;
    assert_eq!(
        (status, code.as_str()),
        (401, "DynamicsGateway.InvalidToken")
    );
    assert!(message.contains("ID token"), "{message}");
    assert!(www.contains("invalid_token"), "{www}");
    // A delegated token with a nonce is no access token either.
    let with_nonce = signed(&env.idp, ALICE_OID, json!({ "nonce": "x" }));
    assert_eq!(
        support::get(&env.gateway, WHOAMI, &with_nonce)
            .await
            .status(),
        401
    );
    assert_eq!(env.dataverse.request_count(), 0, "nothing was forwarded");
    // The same ID token without its nonce proves nothing about being an app: oid != sub.
    let no_nonce = signed(
        &env.idp,
        ALICE_OID,
        json!({ "scp": null, "azp": null, "roles": ["Service.Sync"] }),
    );
    let (status, code, _) = error_body(support::get(&env.gateway, ACCOUNTS, &no_nonce).await).await;
    assert_eq!(
        (status, code.as_str()),
        (403, "DynamicsGateway.AccessDenied")
    );
    assert_eq!(env.dataverse.request_count(), 0);
}

#[tokio::test]
async fn a_real_entra_app_token_is_app_only_by_idtyp_or_by_oid_equal_to_sub() {
    let env = env().identity(APP_ONLY_POLICY).start().await;
    let service_principal = "5e5e5e5e-0000-4000-8000-0000000000a1";
    let by_idtyp = signed(
        &env.idp,
        service_principal,
        json!({ "scp": null, "idtyp": "app", "roles": ["Service.Sync"] }),
    );
    // Where the optional idtyp is not issued: Microsoft's test, oid equal to sub, no scp.
    let by_oid_sub = signed(
        &env.idp,
        service_principal,
        json!({ "scp": null, "sub": service_principal, "roles": ["Service.Sync"] }),
    );
    for token in [&by_idtyp, &by_oid_sub] {
        let response = support::get(&env.gateway, ACCOUNTS, token).await;
        assert_eq!(response.status(), 200);
        let seen = env.dataverse.requests().pop().unwrap();
        assert!(
            seen.header("callerobjectid").is_none() && seen.header("mscrmcallerid").is_none(),
            "forwarded as the application user"
        );
    }
    // Neither holds with a scp (delegated), nor with an idtyp of another kind or type.
    for edit in [
        json!({ "idtyp": "app", "roles": ["Service.Sync"] }),
        json!({ "scp": null, "idtyp": "user", "sub": service_principal, "roles": ["Service.Sync"] }),
        json!({ "scp": null, "idtyp": ["app"], "roles": ["Service.Sync"] }),
    ] {
        let token = signed(&env.idp, service_principal, edit.clone());
        let (status, _, _) = error_body(support::get(&env.gateway, ACCOUNTS, &token).await).await;
        assert_eq!(status, 403, "{edit}");
    }
    assert_eq!(env.dataverse.request_count(), 2);
}

/// A Keycloak-style token: `scope` instead of `scp`, no `oid`, no `idtyp`, no `tid`.
fn keycloak_claims(idp: &IdpHandle, extra: Value) -> Value {
    let now = support::now_secs();
    let mut claims = json!({
        "iss": idp.issuer(),
        "aud": idp.audience(),
        "exp": now + 600,
        "iat": now,
        "sub": "f6c1b2a0-7d3e-4c59-9a51-3b0d6e2f1c44",
        "typ": "Bearer",
        "azp": "sync-client",
        "scope": "openid profile email",
        "preferred_username": "alice",
        "roles": ["Service.Sync"],
    });
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    claims
}

#[tokio::test]
async fn a_keycloak_style_token_with_scope_and_the_app_role_is_not_app_only() {
    // The stand-in issuer takes Entra's evidence: a Keycloak-shaped token has none of it.
    let env = env().identity(APP_ONLY_POLICY).start().await;
    let token = env.idp.sign(keycloak_claims(
        &env.idp,
        json!({ "tid": env.idp.tenant_id() }),
    ));
    let (status, code, _) = error_body(support::get(&env.gateway, ACCOUNTS, &token).await).await;
    assert_eq!(
        (status, code.as_str()),
        (403, "DynamicsGateway.AccessDenied")
    );
    assert_eq!(env.dataverse.request_count(), 0);

    // An issuer that is not Entra's proves nothing by default: not even `idtyp: app`.
    let never = custom(APP_ONLY_POLICY, "  tenants: [\"*\"]\n", |yaml| {
        yaml.replace("      app_only_evidence: entra\n", "")
    })
    .await;
    for token in [
        never.idp.sign(keycloak_claims(&never.idp, json!({}))),
        never.idp.sign(keycloak_claims(
            &never.idp,
            json!({ "idtyp": "app", "scope": null }),
        )),
    ] {
        let response = support::get(&never.gateway, ACCOUNTS, &token).await;
        assert_eq!(response.status(), 403);
    }
    assert_eq!(never.dataverse.request_count(), 0);

    // With the issuer's own evidence configured, only a token carrying it is app-only.
    let claim = custom(APP_ONLY_POLICY, "  tenants: [\"*\"]\n", |yaml| {
        yaml.replace(
            "      app_only_evidence: entra\n",
            "      app_only_evidence: { claim: client_kind, value: service }\n",
        )
    })
    .await;
    let user = claim.idp.sign(keycloak_claims(&claim.idp, json!({})));
    assert_eq!(
        support::get(&claim.gateway, ACCOUNTS, &user).await.status(),
        403
    );
    let service = claim.idp.sign(keycloak_claims(
        &claim.idp,
        json!({ "client_kind": "service" }),
    ));
    assert_eq!(
        support::get(&claim.gateway, ACCOUNTS, &service)
            .await
            .status(),
        200
    );
    let seen = claim.dataverse.requests().pop().unwrap();
    assert!(seen.header("callerobjectid").is_none() && seen.header("mscrmcallerid").is_none());
}

#[tokio::test]
async fn token_types_allowlist_refuses_a_jwt_typed_token_when_at_jwt_is_required() {
    let c = custom(support::CALLER_OBJECT_ID, "", |yaml| {
        yaml.replace(
            "      app_only_evidence: entra\n",
            "      app_only_evidence: entra\n      token_types: [at+jwt]\n",
        )
    })
    .await;
    let claims = c.idp.claims_for(ALICE_OID);
    let cases = [
        (json!({ "alg": "RS256", "typ": "JWT" }), 401),
        (json!({ "alg": "RS256" }), 401),
        (json!({ "alg": "RS256", "typ": ["at+jwt"] }), 401),
        (json!({ "alg": "RS256", "typ": "at+jwt" }), 200),
        (json!({ "alg": "RS256", "typ": "application/AT+JWT" }), 200),
    ];
    for (header, expected) in cases {
        let token = signed_with_header(&c.idp, header.clone(), &claims);
        let response = support::get(&c.gateway, WHOAMI, &token).await;
        assert_eq!(response.status(), expected, "{header}");
    }
    assert_eq!(c.dataverse.request_count(), 2);
    let refused = support::metric(
        &c.gateway,
        "dynamics_gateway_auth_failures_total{reason=\"token_type_not_allowed\"}",
    )
    .await;
    // The array `typ` is refused earlier, as a malformed header.
    assert_eq!(refused, 2.0);
}

#[tokio::test]
async fn an_iat_in_the_future_or_not_a_number_is_refused() {
    let env = env().start().await;
    let now = support::now_secs();
    for (iat, expected) in [
        (json!(now + 3600), 401),
        (json!(u64::MAX), 401),
        (json!(1e300), 401),
        (json!(now.to_string()), 401),
        (json!("123"), 401),
        (json!({ "n": now }), 401),
        // Within the 60 s leeway, and in the past: accepted.
        (json!(now + 30), 200),
        (json!(now - 600), 200),
    ] {
        let token = signed(&env.idp, ALICE_OID, json!({ "iat": iat }));
        let response = support::get(&env.gateway, WHOAMI, &token).await;
        assert_eq!(response.status(), expected, "iat {iat}");
    }
    let no_iat = signed(&env.idp, ALICE_OID, json!({ "iat": null }));
    assert_eq!(
        support::get(&env.gateway, WHOAMI, &no_iat).await.status(),
        200
    );
    assert_eq!(env.dataverse.request_count(), 3);
}

// ------------------------------------------------------------- 7: another tenant's user

/// One organisation of tenant A that also serves tenant B's callers, behind a `{tenantid}`
/// issuer for A and B; `identity` and `extra_dynamics` as given.
struct Guests {
    idp: IdpHandle,
    org: DataverseHandle,
    gateway: GatewayHandle,
}

impl Guests {
    fn token(&self, tid: &str, oid: &str, upn: &str) -> String {
        let mut claims = self.idp.claims_for(oid);
        claims["tid"] = json!(tid);
        claims["iss"] = json!(format!("{}/{tid}/v2.0", self.idp.base_url()));
        claims["upn"] = json!(upn);
        // What tenant B's admin (or user) may write: any address at all.
        claims["email"] = json!(upn);
        self.idp.sign(claims)
    }
}

fn guests_yaml(idp: &IdpHandle, org: &DataverseHandle, identity: &str, extra: &str) -> String {
    format!(
        "server:\n  listen: 127.0.0.1:1\n  admin_listen: 127.0.0.1:2\n\
inbound:\n  issuers:\n    - issuer: {base}/{{tenantid}}/v2.0\n      audiences: [{aud}]\n      tenants: [{TENANT_A}, {TENANT_B}]\n\
{identity}\
dynamics:\n  url: {url}\n  tenant_id: {TENANT_A}\n  tenants: [{TENANT_A}, {TENANT_B}]\n  client_id: {cid}\n  client_secret: {secret}\n  token_url: {token_url}\n{extra}",
        base = idp.base_url(),
        aud = idp.audience(),
        url = org.url(),
        cid = idp.client_id(),
        secret = idp.client_secret(),
        token_url = idp.token_url(),
    )
}

/// Tenant A's organisation: a Dataverse taking `idp`'s tokens, with Alice of tenant A.
async fn org_a(idp: &IdpHandle) -> DataverseHandle {
    Dataverse::builder()
        .accept_tokens_from(idp.s2s_registry())
        .user(DirectoryUser {
            systemuserid: support::ALICE_SYSTEMUSERID.into(),
            ..DirectoryUser::new(ALICE_OID, ALICE_IN_A)
        })
        .start()
        .await
        .unwrap()
}

async fn guests(identity: &str, extra: &str) -> Guests {
    let idp = Idp::builder().tenant_id(TENANT_A).start().await.unwrap();
    let org = org_a(&idp).await;
    let gateway = start_gateway(&guests_yaml(&idp, &org, identity, extra)).await;
    gateway.wait_ready().await;
    Guests { idp, org, gateway }
}

const LOOKUP_BY_UPN: &str =
    "identity:\n  mode: lookup\n  claim: upn\n  lookup: { attribute: internalemailaddress }\n";

#[tokio::test]
async fn a_tenant_b_token_naming_a_tenant_a_user_is_refused_in_lookup_and_static_mode() {
    let static_mode = format!(
        "identity:\n  mode: static\n  claim: upn\n  static:\n    \"{ALICE_IN_A}\": {}\n",
        support::ALICE_SYSTEMUSERID
    );
    for identity in [LOOKUP_BY_UPN.to_string(), static_mode] {
        let g = guests(&identity, "").await;
        let lookups = g.org.systemuser_lookups();
        let forged = g.token(TENANT_B, BOB_IN_B, ALICE_IN_A);
        let (status, code, message) =
            error_body(support::get(&g.gateway, WHOAMI, &forged).await).await;
        assert_eq!(
            (status, code.as_str()),
            (403, "DynamicsGateway.CallerNotMapped"),
            "{identity}"
        );
        assert!(message.contains("allow_guest_tenants"), "{message}");
        assert_eq!(g.org.systemuser_lookups(), lookups, "no lookup was made");
        assert_eq!(g.org.request_count(), 0, "nothing reached the organisation");
        // Tenant A's own Alice is still Alice.
        let alice = g.token(TENANT_A, ALICE_OID, ALICE_IN_A);
        let response = support::get(&g.gateway, WHOAMI, &alice).await;
        assert_eq!(response.status(), 200, "{identity}");
        assert_eq!(
            g.org.requests().pop().unwrap().header("mscrmcallerid"),
            Some(support::ALICE_SYSTEMUSERID)
        );
    }
}

#[tokio::test]
async fn guests_are_an_explicit_opt_in_and_their_answers_are_cached_apart() {
    let g = guests(LOOKUP_BY_UPN, "  allow_guest_tenants: true\n").await;
    let guest = g.token(TENANT_B, BOB_IN_B, ALICE_IN_A);
    assert_eq!(support::get(&g.gateway, WHOAMI, &guest).await.status(), 200);
    let alice = g.token(TENANT_A, ALICE_OID, ALICE_IN_A);
    assert_eq!(support::get(&g.gateway, WHOAMI, &alice).await.status(), 200);
    // The same value from another tenant is another cache entry: two lookups.
    assert_eq!(g.org.systemuser_lookups(), 2);
    assert_eq!(support::get(&g.gateway, WHOAMI, &guest).await.status(), 200);
    assert_eq!(g.org.systemuser_lookups(), 2);
}

#[tokio::test]
async fn lookup_on_the_email_claim_is_a_config_error() {
    let idp = Idp::builder().start().await.unwrap();
    for claim in ["email", "Email"] {
        let yaml = support::config_yaml(
            &idp,
            "http://127.0.0.1:9",
            &format!("identity:\n  mode: lookup\n  claim: {claim}\n  lookup: {{ attribute: internalemailaddress }}\n"),
            "",
            "",
        );
        let err = Config::from_yaml(&yaml, &|_| None).unwrap_err().to_string();
        assert!(
            err.starts_with("identity.claim") && err.contains("mutable and unverified"),
            "{err}"
        );
    }
}

// --------------------------------------------------- 8: claims tied to their issuer

/// Until every environment has its S2S token (at most 10 s).
async fn wait_all_ready(gateway: &GatewayHandle) {
    for _ in 0..200 {
        let body = gateway.readyz().await.text().await.unwrap();
        if body.starts_with("ready") && !body.contains("no S2S token") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not every environment became ready");
}

/// Two organisations (A and B, routed by tenant), a `{tenantid}` issuer for A and B, and a
/// second IdP's exact issuer that may assert only `exact_tenants`.
fn two_issuers_yaml(
    common: &IdpHandle,
    exact: &IdpHandle,
    org_a: &DataverseHandle,
    org_b: &DataverseHandle,
    exact_tenants: &str,
) -> String {
    let env = |name: &str, org: &DataverseHandle, tenant: &str| {
        format!(
            "    - name: {name}\n      url: {}\n      tenant_id: {tenant}\n      client_id: {}\n      client_secret: {}\n      token_url: {}\n",
            org.url(),
            common.client_id(),
            common.client_secret(),
            common.token_url()
        )
    };
    format!(
        "server:\n  listen: 127.0.0.1:1\n  admin_listen: 127.0.0.1:2\n\
inbound:\n  issuers:\n    - issuer: {base}/{{tenantid}}/v2.0\n      audiences: [{aud}]\n      tenants: [{TENANT_A}, {TENANT_B}]\n    \
- issuer: {exact_issuer}\n      audiences: [{exact_aud}]\n{exact_tenants}  jwks_refetch_interval: 0s\n\
dynamics:\n  routing: {{ by: tenant }}\n  environments:\n{a}{b}",
        base = common.base_url(),
        aud = common.audience(),
        exact_issuer = exact.issuer(),
        exact_aud = exact.audience(),
        a = env("contoso", org_a, TENANT_A),
        b = env("fabrikam", org_b, TENANT_B),
    )
}

#[tokio::test]
async fn an_issuer_cannot_assert_a_tenant_it_was_not_given() {
    let common = Idp::builder().tenant_id(TENANT_A).start().await.unwrap();
    let exact = Idp::builder().tenant_id(TENANT_B).start().await.unwrap();
    let org = || {
        Dataverse::builder()
            .accept_tokens_from(common.s2s_registry())
            .user(DirectoryUser::new(ALICE_OID, ALICE_IN_A))
            .start()
    };
    let org_a = org().await.unwrap();
    let org_b = org().await.unwrap();

    // Without its list the exact issuer could name any tenant: refused at load, by name.
    let unbound = two_issuers_yaml(&common, &exact, &org_a, &org_b, "");
    let err = Config::from_yaml(&unbound, &|_| None)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("inbound.issuers[1].tenants") && err.contains(&exact.issuer()),
        "{err}"
    );

    let yaml = two_issuers_yaml(
        &common,
        &exact,
        &org_a,
        &org_b,
        &format!("      tenants: [{TENANT_B}]\n"),
    );
    let gateway = start_gateway(&yaml).await;
    wait_all_ready(&gateway).await;
    // The exact issuer's correctly signed token claiming tenant A, as A's Alice.
    let cross = signed(&exact, ALICE_OID, json!({ "tid": TENANT_A }));
    let response = support::get(&gateway, WHOAMI, &cross).await;
    let www = support::challenge(&response);
    assert_eq!(response.status(), 401);
    assert!(www.contains("tenant"), "{www}");
    // Without any tid it is refused as well (its list cannot be checked).
    let no_tid = signed(&exact, ALICE_OID, json!({ "tid": null }));
    assert_eq!(support::get(&gateway, WHOAMI, &no_tid).await.status(), 401);
    assert_eq!(org_a.request_count() + org_b.request_count(), 0);
    // Its own tenant is served.
    let own = signed(&exact, ALICE_OID, json!({}));
    assert_eq!(support::get(&gateway, WHOAMI, &own).await.status(), 200);
    assert_eq!((org_a.request_count(), org_b.request_count()), (0, 1));
}

#[tokio::test]
async fn static_entries_trust_only_the_issuer_they_name() {
    let first = Idp::builder().tenant_id(TENANT_A).start().await.unwrap();
    let second = Idp::builder().tenant_id(TENANT_A).start().await.unwrap();
    let org = org_a(&first).await;
    let yaml = |entry: &str| {
        format!(
            "server:\n  listen: 127.0.0.1:1\n  admin_listen: 127.0.0.1:2\n\
inbound:\n  issuers:\n    - issuer: {i1}\n      audiences: [{aud1}]\n    - issuer: {i2}\n      audiences: [{aud2}]\n\
identity:\n  mode: static\n  claim: oid\n  static:\n    \"{ALICE_OID}\": {entry}\n\
dynamics:\n  url: {url}\n  tenant_id: {TENANT_A}\n  client_id: {cid}\n  client_secret: {secret}\n  token_url: {token_url}\n",
            i1 = first.issuer(),
            aud1 = first.audience(),
            i2 = second.issuer(),
            aud2 = second.audience(),
            url = org.url(),
            cid = first.client_id(),
            secret = first.client_secret(),
            token_url = first.token_url(),
        )
    };
    let err = Config::from_yaml(&yaml(support::ALICE_SYSTEMUSERID), &|_| None)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("identity.static.{ALICE_OID}"))
            && err.contains("name the one it trusts"),
        "{err}"
    );

    let named = format!(
        "{{ systemuserid: {}, issuer: \"{}\" }}",
        support::ALICE_SYSTEMUSERID,
        first.issuer()
    );
    let gateway = start_gateway(&yaml(&named)).await;
    gateway.wait_ready().await;
    // The second issuer's token with the same oid names nobody.
    let (status, code, _) =
        error_body(support::get(&gateway, WHOAMI, second.token_for(ALICE_OID)).await).await;
    assert_eq!(
        (status, code.as_str()),
        (403, "DynamicsGateway.CallerNotMapped")
    );
    assert_eq!(org.request_count(), 0);
    assert_eq!(
        support::get(&gateway, WHOAMI, first.token_for(ALICE_OID))
            .await
            .status(),
        200
    );
    assert_eq!(
        org.requests().pop().unwrap().header("mscrmcallerid"),
        Some(support::ALICE_SYSTEMUSERID)
    );
}

// ------------------------------------------------------ issue 10, 7: alternate-key lookup

const CAROL_OID: &str = "ca201ca2-0000-4000-8000-0000000000c1";

/// What a `$filter` lookup of `oid` straight at the stand-in finds (with the gateway's token).
async fn filter_finds(env: &support::Env, oid: &str) -> usize {
    let token = env.idp.issued_s2s_tokens().pop().unwrap();
    let url = format!(
        "{}/api/data/v9.2/systemusers?$select=systemuserid&$filter=azureactivedirectoryobjectid%20eq%20{oid}",
        env.dataverse.url()
    );
    let answer = support::json_of(client().get(url).bearer_auth(token)).await;
    answer["value"].as_array().unwrap().len()
}

#[tokio::test]
async fn alternate_key_lookup_provisions_a_group_team_member_just_in_time() {
    let env = env()
        .identity("identity:\n  mode: lookup\n  claim: oid\n")
        .start()
        .await;
    let carol = DirectoryUser::new(CAROL_OID, "carol@contoso.example");
    env.dataverse.add_group_team_member(carol.clone());
    // The old query form would find nobody: Carol is not a systemuser yet.
    assert_eq!(filter_finds(&env, CAROL_OID).await, 0);

    let response = support::get(&env.gateway, WHOAMI, env.idp.token_for(CAROL_OID)).await;
    assert_eq!(response.status(), 200);
    let seen = env.dataverse.requests();
    let lookup = &seen[seen.len() - 2];
    assert_eq!(
        lookup.path_and_query,
        format!("/api/data/v9.2/systemusers(azureactivedirectoryobjectid={CAROL_OID})?$select=systemuserid,isdisabled")
    );
    assert_eq!(
        seen.last().unwrap().header("mscrmcallerid"),
        Some(carol.systemuserid.as_str())
    );
    // Dataverse created her on that lookup.
    assert_eq!(filter_finds(&env, CAROL_OID).await, 1);
    // A disabled user found by the alternate key is still refused.
    let (status, _, message) =
        error_body(support::get(&env.gateway, WHOAMI, env.idp.token_for(BOB_OID)).await).await;
    assert_eq!(status, 403);
    assert!(message.contains("disabled"), "{message}");
}

#[tokio::test]
async fn an_unknown_user_is_remembered_for_the_short_ttl_only() {
    let env = env()
        .identity(
            "identity:\n  mode: lookup\n  claim: oid\n  cache_ttl: 1h\n  unknown_user_cache_ttl: 2s\n",
        )
        .start()
        .await;
    let carol = env.idp.token_for(CAROL_OID);
    let alice = env.idp.token_for(ALICE_OID);
    for _ in 0..3 {
        assert_eq!(
            support::get(&env.gateway, WHOAMI, &carol).await.status(),
            403
        );
        assert_eq!(
            support::get(&env.gateway, WHOAMI, &alice).await.status(),
            200
        );
    }
    assert_eq!(env.dataverse.systemuser_lookups(), 2, "both answers cached");

    // Carol joins a group team; once "unknown" has expired she gets in.
    env.dataverse
        .add_group_team_member(DirectoryUser::new(CAROL_OID, "carol@contoso.example"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        support::get(&env.gateway, WHOAMI, &carol).await.status(),
        200
    );
    assert_eq!(
        support::get(&env.gateway, WHOAMI, &alice).await.status(),
        200
    );
    assert_eq!(
        env.dataverse.systemuser_lookups(),
        3,
        "only the unknown answer was looked up again; Alice's is still cached"
    );
}
