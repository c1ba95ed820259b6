//! Access rules that see every table a request touches, end to end through the gateway:
//! one table of cases (request -> forwarded, or refused naming the pair no rule grants)
//! under the rules of issue 11 (`GET accounts` only, `POST accounts` only), with the
//! environment's CSDL from `access.metadata_file`; without it, the CSDL fetched from the
//! stand-in's `$metadata` (ETag revalidation, failed, slow and oversize refreshes keeping
//! the last good map) and the fail-closed start while it cannot be had.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use serde_json::json;
use support::{client, env, error_body, expect_error, Env, ALICE_OID};

const ID: &str = "00000000-0000-0000-0000-000000000001";

/// The rules of issue 11; with `metadata`, the CSDL from `access.metadata_file`, else
/// fetched from the stand-in's `$metadata`.
fn policy(metadata: bool) -> String {
    if metadata {
        policy_with(&format!(
            "  metadata_file: {}/tests/fixtures/csdl.xml\n",
            env!("CARGO_MANIFEST_DIR")
        ))
    } else {
        policy_with("")
    }
}

/// The rules, with `access_extra` (two-space indented lines) under `access:`.
fn policy_with(access_extra: &str) -> String {
    format!(
        "identity:
  mode: caller_object_id
access:
  default: deny
{access_extra}  rules:
    - name: account-readers
      when: {{ roles: [Accounts.Read] }}
      allow: {{ methods: [GET], entity_sets: [accounts] }}
    - name: account-creators
      when: {{ roles: [Accounts.Create] }}
      allow: {{ methods: [POST], entity_sets: [accounts] }}
    - name: per-table
      when: {{ roles: [PerTable] }}
      allow:
        tables: {{ accounts: [read], contacts: [read] }}
        functions: [RetrievePrincipalAccess]
    - name: deep-creators
      when: {{ roles: [DeepCreate] }}
      allow:
        tables: {{ accounts: [create], contacts: [create] }}
    - name: batch-envelope
      when: {{ roles: [Batcher, BatchOnly, BatchAll] }}
      allow: {{ batch: true }}
    - name: batch-every-table
      when: {{ roles: [BatchAll] }}
      allow:
        tables: {{ \"*\": [read] }}
    - name: batch-accounts
      when: {{ roles: [Batcher] }}
      allow: {{ methods: [GET, POST], entity_sets: [accounts] }}
"
    )
}

fn token(env: &Env, role: &str) -> String {
    let mut claims = env.idp.claims_for(ALICE_OID);
    claims["roles"] = json!([role]);
    env.idp.sign(claims)
}

/// Requests the stand-in received other than the gateway's own stored-query lookups.
fn forwarded(env: &Env) -> usize {
    env.dataverse
        .requests()
        .iter()
        .filter(|r| !is_view_lookup(&r.path_and_query))
        .count()
}

fn is_view_lookup(path: &str) -> bool {
    path.starts_with("/api/data/v9.2/savedqueries(")
        || path.starts_with("/api/data/v9.2/userqueries(")
}

enum Expect {
    Forwarded,
    /// Refused 403; the message contains this.
    Refused(&'static str),
}
use Expect::{Forwarded, Refused};

async fn check(env: &Env, role: &str, method: &str, path: &str, body: &str, expect: Expect) {
    check_as(env, role, method, path, body, "application/json", expect).await;
}

async fn check_as(
    env: &Env,
    role: &str,
    method: &str,
    path: &str,
    body: &str,
    content_type: &str,
    expect: Expect,
) {
    let token = token(env, role);
    let before = forwarded(env);
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client()
        .request(
            method.clone(),
            format!("{}/api/data/v9.2/{path}", env.gateway.url()),
        )
        .bearer_auth(&token);
    if !body.is_empty() {
        request = request
            .header("content-type", content_type)
            .body(body.to_string());
    }
    let response = request.send().await.unwrap();
    match expect {
        Forwarded => {
            assert_ne!(response.status(), 403, "{role} {method} {path}");
            assert_ne!(response.status(), 503, "{role} {method} {path}");
            assert_eq!(
                forwarded(env),
                before + 1,
                "{role} {method} {path} was not forwarded"
            );
        }
        Refused(pair) => {
            let (status, code, message) = error_body(response).await;
            assert_eq!(
                (status, code.as_str()),
                (403, "DynamicsGateway.AccessDenied"),
                "{role} {method} {path}: {message}"
            );
            assert!(message.contains(pair), "{role} {method} {path}: {message}");
            assert_eq!(
                forwarded(env),
                before,
                "{role} {method} {path} reached Dataverse"
            );
        }
    }
}

#[tokio::test]
async fn every_table_a_request_touches_needs_a_grant() {
    let env = env().identity(&policy(true)).start().await;
    let fetch = "%3Cfetch%3E%3Centity%20name%3D%27account%27%3E%3Clink-entity%20name%3D%27contact%27%20from%3D%27contactid%27%20to%3D%27primarycontactid%27%2F%3E%3C%2Fentity%3E%3C%2Ffetch%3E";
    let ref_body = format!(r#"{{"@odata.id":"contacts({ID})"}}"#);
    let r = "Accounts.Read";
    let c = "Accounts.Create";
    let bind = |key: &str, url: &str| format!(r#"{{"name":"x","{key}":"{url}"}}"#);
    let contact = format!("contacts({ID})");
    let gateway_contact = format!("{}/api/data/v9.2/contacts({ID})", env.gateway.url());
    let cases: Vec<(&str, &str, String, String, Expect)> = vec![
        // Plain reads keep today's meaning.
        (r, "GET", "accounts".into(), String::new(), Forwarded),
        (r, "GET", format!("accounts({ID})?$select=name,revenue"), String::new(), Forwarded),
        (r, "GET", "accounts?$filter=name eq 'a/b'&$orderby=name".into(), String::new(), Forwarded),
        (r, "GET", "accounts?$expand=parentaccountid($select=name)".into(), String::new(), Forwarded),
        // The GET-accounts-only bypasses of issue 11.
        (r, "GET", "accounts?$expand=contact_customer_accounts($select=fullname)".into(), String::new(),
            Refused("no rule allows read on contacts (via $expand=contact_customer_accounts)")),
        (r, "GET", "accounts?$expand=parentaccountid($expand=primarycontactid)".into(), String::new(),
            Refused("read on contacts (via $expand=parentaccountid/primarycontactid)")),
        (r, "GET", "accounts?$expand=*".into(), String::new(), Refused("(via $expand=*)")),
        (r, "GET", format!("accounts({ID})/contact_customer_accounts"), String::new(),
            Refused("read on contacts (via path segment contact_customer_accounts)")),
        (r, "GET", format!("accounts?fetchXml={fetch}"), String::new(),
            Refused("read on contacts (via fetchXml link-entity contact)")),
        (r, "GET", "accounts?$apply=groupby((primarycontactid/fullname))".into(), String::new(),
            Refused("read on contacts (via $apply=primarycontactid/fullname)")),
        (r, "GET", "accounts?$filter=contact_customer_accounts/any(c:c/fullname eq 'x')".into(), String::new(),
            Refused("read on contacts (via $filter=contact_customer_accounts")),
        (r, "GET", format!("accounts?savedQuery={ID}"), String::new(), Refused("(via savedQuery)")),
        (r, "GET", format!("accounts?userQuery={ID}"), String::new(), Refused("(via userQuery)")),
        (r, "GET", format!("accounts({ID})/Microsoft.Dynamics.CRM.RetrievePrincipalAccess(Target=@t)?@t={{'@odata.id':'contacts({ID})'}}"), String::new(),
            Refused("execute on RetrievePrincipalAccess")),
        (r, "GET", "new_projects?$expand=new_accountid".into(), String::new(), Refused("GET on new_projects")),
        // The POST-accounts-only bypasses that the path shows.
        (c, "POST", "accounts".into(), r#"{"name":"x"}"#.into(), Forwarded),
        (c, "POST", format!("accounts({ID})/contact_customer_accounts"), r#"{"lastname":"x"}"#.into(),
            Refused("create on contacts (via path segment contact_customer_accounts)")),
        (c, "POST", format!("accounts({ID})/contact_customer_accounts/$ref"), ref_body.clone(),
            Refused("associate on contacts")),
        (c, "POST", format!("accounts({ID})/Microsoft.Dynamics.CRM.Merge"), "{}".into(),
            Refused("execute on Merge")),
        (c, "POST", "Merge".into(), "{}".into(), Refused("POST on Merge")),
        // Operations per table and functions by name; parameters' tables need grants.
        ("PerTable", "GET", "accounts?$expand=contact_customer_accounts($select=fullname)".into(), String::new(), Forwarded),
        ("PerTable", "GET", "accounts?$expand=owninguser".into(), String::new(),
            Refused("read on systemusers (via $expand=owninguser)")),
        ("PerTable", "POST", "accounts".into(), r#"{"name":"x"}"#.into(), Refused("POST on accounts")),
        ("PerTable", "GET", format!("contacts({ID})/Microsoft.Dynamics.CRM.RetrievePrincipalAccess(Target=@t)?@t={{'@odata.id':'contacts({ID})'}}"), String::new(),
            Refused("read on systemusers (via parameter entityset)")),
        // The POST-accounts-only bypasses in the body: deep inserts, binds, $ref bodies.
        (c, "POST", "accounts".into(), r#"{"name":"x","primarycontactid":{"lastname":"y"}}"#.into(),
            Refused("no rule allows create on contacts (via deep insert primarycontactid)")),
        (c, "POST", "accounts".into(), r#"{"name":"x","contact_customer_accounts":[{"lastname":"y"}]}"#.into(),
            Refused("no rule allows create on contacts (via deep insert contact_customer_accounts)")),
        (c, "POST", "accounts".into(), r#"{"name":"x","parentaccountid":{"name":"p","contact_customer_accounts":[{"lastname":"y"}]}}"#.into(),
            Refused("create on contacts (via deep insert contact_customer_accounts)")),
        (c, "POST", "accounts".into(), r#"{"name":"x","parentaccountid":{"name":"p"},"account_parent_account":[]}"#.into(), Forwarded),
        (c, "POST", "accounts".into(), bind("primarycontactid@odata.bind", &format!("/{contact}")),
            Refused("no rule allows associate on contacts (via primarycontactid@odata.bind)")),
        (c, "POST", "accounts".into(), bind("primarycontactid@odata.bind", &gateway_contact),
            Refused("associate on contacts (via primarycontactid@odata.bind)")),
        (c, "POST", "accounts".into(), bind("primarycontactid\\u0040odata.bind", &contact),
            Refused("associate on contacts (via primarycontactid@odata.bind)")),
        (c, "POST", "accounts".into(), bind("primarycontactid@odata.bind", &format!("\\/{contact}")),
            Refused("associate on contacts (via primarycontactid@odata.bind)")),
        (c, "POST", "accounts".into(), format!(r#"{{"contact_customer_accounts@odata.bind":["accounts({ID})","{contact}"]}}"#),
            Refused("associate on contacts (via contact_customer_accounts@odata.bind)")),
        (c, "POST", "accounts".into(), bind("parentaccountid@odata.bind", &format!("accounts({ID})")), Forwarded),
        (c, "POST", format!("accounts({ID})/parentaccountid/$ref"), ref_body.clone(),
            Refused("no rule allows associate on contacts (via @odata.id)")),
        (c, "POST", format!("accounts({ID})/parentaccountid/$ref"), format!(r#"{{"@odata.id":"accounts({ID})"}}"#), Forwarded),
        (c, "POST", "accounts".into(), format!(r#"{{"name":"{}"}}"#, "[{".repeat(70)), Forwarded),
        (c, "POST", "accounts".into(), format!(r#"{{"a":{}{}}}"#, "[".repeat(70), "]".repeat(70)),
            Refused("(via a body nested deeper than 64 levels)")),
        // Operations per table: a deep insert needs create on its table, a bind associate.
        ("DeepCreate", "POST", "accounts".into(), r#"{"name":"x","contact_customer_accounts":[{"lastname":"y"}]}"#.into(), Forwarded),
        ("DeepCreate", "POST", "accounts".into(), r#"{"name":"x","new_account_new_project":[{"new_name":"y"}]}"#.into(),
            Refused("create on new_projects (via deep insert new_account_new_project)")),
        ("DeepCreate", "POST", "accounts".into(), bind("primarycontactid@odata.bind", &contact),
            Refused("associate on contacts (via primarycontactid@odata.bind)")),
    ];
    for (role, method, path, body, expect) in cases {
        check(&env, role, method, &path, &body, expect).await;
    }
}

#[tokio::test]
async fn spelling_a_path_another_way_does_not_hide_the_table_it_reaches() {
    // Round two of the outside attack: each of these reached Dataverse under a rule that
    // allows only GET (or POST) on accounts.
    let env = env().identity(&policy(true)).start().await;
    let r = "Accounts.Read";
    let c = "Accounts.Create";
    let contacts = "read on contacts";
    let cannot = "a query option the gateway cannot follow";
    let cases: Vec<(&str, &str, String, &str, Expect)> = vec![
        (
            r,
            "GET",
            "accounts?$filter=primarycontactid%0B/fullname%20eq%20'x'".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$filter=primarycontactid%C2%A0/fullname%20eq%20'x'".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$orderby=primarycontactid%E3%80%80/fullname".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$filter=primarycontactid/Microsoft.Dynamics.CRM.Foo()%20eq%201".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$filter=@a/fullname%20eq%20'x'&@a=primarycontactid".into(),
            "",
            Refused(cannot),
        ),
        (
            r,
            "GET",
            "accounts?$filter=primarycontactid%20/fullname%20eq%20'x'".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$filter=primarycontactid/%20fullname%20eq%20'x'".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$filter=primarycontactid%09/fullname%20eq%20'x'".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$filter=primarycontactid+/fullname+eq+'x'".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$orderby=name,primarycontactid%20/fullname".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$apply=groupby((primarycontactid%20/fullname))".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$filter=contact_customer_accounts%20/any(c:c/fullname%20eq%20'x')".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$filter=@f%20eq%20'x'&@f=primarycontactid/fullname".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$orderby=@o&@o=primarycontactid/fullname".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$filter=contact_customer_accounts/$count%20gt%200".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$compute=primarycontactid/fullname%20as%20x".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$filter=$it/primarycontactid/fullname%20eq%20'x'".into(),
            "",
            Refused(contacts),
        ),
        (
            r,
            "GET",
            "accounts?$filter=(primarycontactid)/fullname%20eq%20'x'".into(),
            "",
            Refused(cannot),
        ),
        (
            r,
            "GET",
            "accounts?$filter=$root/contacts(1)/fullname%20eq%20'x'".into(),
            "",
            Refused(cannot),
        ),
        (
            r,
            "GET",
            "accounts?$apply=expand(primarycontactid)".into(),
            "",
            Refused(cannot),
        ),
        (
            r,
            "GET",
            "accounts?$apply=aggregate(contact_customer_accounts(fullname%20with%20max%20as%20m))"
                .into(),
            "",
            Refused(cannot),
        ),
        (
            r,
            "GET",
            "accounts?$expand=parentaccountid($filter=@f)&@f=primarycontactid/fullname%20eq%20'x'"
                .into(),
            "",
            Refused(cannot),
        ),
        // What stays allowed: literals in aliases, chained transformations, namespaced functions.
        (
            r,
            "GET",
            "accounts?$filter=name%20eq%20@n&@n='a/b'".into(),
            "",
            Forwarded,
        ),
        (
            r,
            "GET",
            "accounts?$apply=filter(statecode%20eq%200)/groupby((name))".into(),
            "",
            Forwarded,
        ),
        (
            c,
            "POST",
            "accounts".into(),
            r#"{"name":"x","@odata.type":"Microsoft.Dynamics.CRM.account"}"#,
            Forwarded,
        ),
        // Bodies: a second @odata.type, bind URLs past set(key), OData 4.01 short names.
        (
            c,
            "POST",
            "accounts".into(),
            r#"{"parentaccountid":{"@odata.type":"Microsoft.Dynamics.CRM.account","@odata.type":"Microsoft.Dynamics.CRM.contact"}}"#,
            Refused("contacts"),
        ),
        (
            c,
            "POST",
            "accounts".into(),
            r#"{"name":"x","primarycontactid@odata.bind":"/accounts(00000000-0000-0000-0000-000000000001)/primarycontactid"}"#,
            Refused("associate"),
        ),
        (
            c,
            "POST",
            "accounts".into(),
            r#"{"name":"x","parentaccountid@bind":"/contacts(00000000-0000-0000-0000-000000000001)"}"#,
            Refused("associate on contacts"),
        ),
        (
            c,
            "POST",
            "accounts".into(),
            r#"{"name":"x","parentaccountid":{"@id":"/contacts(00000000-0000-0000-0000-000000000001)"}}"#,
            Refused("contacts"),
        ),
        (
            c,
            "POST",
            "accounts".into(),
            r#"{"name":"x","contact_customer_accounts@odata.delta":[{"lastname":"x"}]}"#,
            Refused("delta"),
        ),
    ];
    for (role, method, path, body, expect) in cases {
        check(&env, role, method, &path, body, expect).await;
    }
}

#[tokio::test]
async fn a_body_is_read_as_dataverse_reads_it_whatever_its_declared_type() {
    let env = env().identity(&policy(true)).start().await;
    let deep = r#"{"name":"x","primarycontactid":{"lastname":"y"}}"#;
    for content_type in [
        "text/plain",
        "application/octet-stream",
        "application/json;odata.metadata=minimal",
    ] {
        check_as(
            &env,
            "Accounts.Create",
            "POST",
            "accounts",
            deep,
            content_type,
            Refused("create on contacts (via deep insert primarycontactid)"),
        )
        .await;
    }
    // A column's value is not read as a record.
    check_as(
        &env,
        "Accounts.Create",
        "POST",
        "accounts",
        r#"{"name":"x"}"#,
        "text/plain",
        Forwarded,
    )
    .await;
}

#[tokio::test]
async fn without_metadata_requests_that_need_it_fail_closed_and_plain_ones_are_decided() {
    // Dataverse's `$metadata` fails from the start: the gateway is ready, and says why
    // the metadata is missing.
    let env = env()
        .identity(&policy(false))
        .dataverse_setup(|dv| dv.set_metadata_failing(Some(503)))
        .start()
        .await;
    support::eventually("the first $metadata fetch fails", || async {
        support::readyz_text(&env.gateway)
            .await
            .contains("default: no metadata yet: Dataverse answered 503")
    })
    .await;
    assert_eq!(env.gateway.readyz().await.status(), 200);
    assert_eq!(metadata_loaded(&env).await, 0.0);
    let token = token(&env, "Accounts.Read");
    let get = |path: String| {
        client()
            .get(format!("{}/api/data/v9.2/{path}", env.gateway.url()))
            .bearer_auth(&token)
            .send()
    };
    let message = expect_error(
        get("accounts?$expand=contact_customer_accounts".into())
            .await
            .unwrap(),
        503,
        "DynamicsGateway.MetadataUnavailable",
    )
    .await;
    assert!(message.contains("$metadata"), "{message}");
    let (status, _, _) = error_body(
        get(format!("accounts({ID})/primarycontactid"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 503);
    assert_eq!(env.dataverse.request_count(), 0);
    // Plain requests need no metadata: decided as before.
    let plain = get(format!("accounts({ID})?$select=name")).await.unwrap();
    assert_ne!(plain.status(), 503);
    assert_ne!(plain.status(), 403);
    let (status, _, _) = error_body(get("contacts?$select=fullname".into()).await.unwrap()).await;
    assert_eq!(status, 403);
    // A body whose records only the metadata can place is refused the same way.
    let creator = self::token(&env, "Accounts.Create");
    let post = |body: &'static str| {
        client()
            .post(format!("{}/api/data/v9.2/accounts", env.gateway.url()))
            .bearer_auth(&creator)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let message = expect_error(
        post(r#"{"name":"x","primarycontactid":{"lastname":"y"}}"#)
            .await
            .unwrap(),
        503,
        "DynamicsGateway.MetadataUnavailable",
    )
    .await;
    assert!(
        message.contains("deep insert primarycontactid"),
        "{message}"
    );
    assert_eq!(env.dataverse.request_count(), 1);
    let plain = post(r#"{"name":"x","parentaccountid@odata.bind":"accounts(1)"}"#)
        .await
        .unwrap();
    assert_ne!(plain.status(), 503);
    assert_ne!(plain.status(), 403);
    // The refusal says when to come back.
    let refused = get("accounts?$expand=contact_customer_accounts".into())
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    // Once Dataverse serves it, the same request is decided on the pairs it touches.
    env.dataverse.set_metadata_failing(None);
    wait_loaded(&env).await;
    check(
        &env,
        "Accounts.Read",
        "GET",
        "accounts?$expand=contact_customer_accounts",
        "",
        Refused("no rule allows read on contacts (via $expand=contact_customer_accounts)"),
    )
    .await;
    assert_eq!(metadata_loaded(&env).await, 1.0);
}

/// Waits until the gateway reports the stand-in's `$metadata` in force.
async fn wait_loaded(env: &Env) {
    support::eventually("the gateway holds the fetched $metadata", || async {
        support::readyz_text(&env.gateway)
            .await
            .contains("default: metadata loaded (")
    })
    .await;
}

/// The gauge saying whether the gateway holds a `$metadata` map (1) or not (0).
async fn metadata_loaded(env: &Env) -> f64 {
    support::metric(
        &env.gateway,
        "dynamics_gateway_access_metadata_loaded{environment=\"default\"}",
    )
    .await
}

/// The series of `$metadata` fetches with this outcome.
async fn fetches(env: &Env, outcome: &str) -> f64 {
    support::metric(
        &env.gateway,
        &format!(
            "dynamics_gateway_access_metadata_refresh_total{{environment=\"default\",outcome=\"{outcome}\"}}"
        ),
    )
    .await
}

/// `$expand` decided on the fetched map: granted for a rule reading both tables, refused
/// naming contacts for one reading accounts only.
async fn expand_is_decided(env: &Env) {
    let expand = "accounts?$expand=contact_customer_accounts($select=fullname)";
    check(env, "PerTable", "GET", expand, "", Forwarded).await;
    check(
        env,
        "Accounts.Read",
        "GET",
        expand,
        "",
        Refused("no rule allows read on contacts (via $expand=contact_customer_accounts)"),
    )
    .await;
}

#[tokio::test]
async fn without_a_file_the_metadata_is_fetched_from_dataverse_with_the_s2s_token() {
    let env = env().identity(&policy(false)).start().await;
    wait_loaded(&env).await;
    expand_is_decided(&env).await;
    let answers = env.dataverse.metadata_answers();
    assert_eq!(answers.served, 1, "{answers:?}");
    assert_eq!(answers.unauthorized, 0, "the fetch carries the S2S token");
    // The first fetch has nothing to revalidate.
    assert_eq!(env.dataverse.metadata_if_none_match(), vec![None]);
    // Plain requests are decided as ever.
    check(
        &env,
        "Accounts.Read",
        "GET",
        &format!("accounts({ID})?$select=name"),
        "",
        Forwarded,
    )
    .await;
}

#[tokio::test]
async fn a_refresh_answered_304_keeps_the_map() {
    let env = env()
        .identity(&policy_with("  metadata_refresh_interval: 50ms\n"))
        .start()
        .await;
    wait_loaded(&env).await;
    support::eventually("two refreshes answered 304", || async {
        env.dataverse.metadata_answers().not_modified >= 2
    })
    .await;
    let etag = env.dataverse.metadata_etag();
    let presented = env.dataverse.metadata_if_none_match();
    assert_eq!(presented[0], None);
    assert!(
        presented[1..]
            .iter()
            .all(|p| p.as_deref() == Some(etag.as_str())),
        "{presented:?}"
    );
    assert_eq!(env.dataverse.metadata_answers().served, 1);
    assert!(fetches(&env, "not_modified").await >= 2.0);
    expand_is_decided(&env).await;
}

#[tokio::test]
async fn a_failed_or_slow_refresh_keeps_the_last_good_map() {
    let env = env()
        .identity(&policy_with(
            "  metadata_refresh_interval: 50ms\n  metadata_timeout: 300ms\n",
        ))
        .start()
        .await;
    wait_loaded(&env).await;
    env.dataverse.set_metadata_failing(Some(500));
    support::eventually("a refresh fails", || async {
        support::readyz_text(&env.gateway)
            .await
            .contains("last refresh failed: Dataverse answered 500")
    })
    .await;
    expand_is_decided(&env).await;
    env.dataverse.set_metadata_failing(None);
    env.dataverse
        .set_metadata_delay(std::time::Duration::from_secs(5));
    support::eventually("a refresh times out", || async {
        support::readyz_text(&env.gateway)
            .await
            .contains("last refresh failed: the fetch took longer than access.metadata_timeout")
    })
    .await;
    expand_is_decided(&env).await;
    assert_eq!(metadata_loaded(&env).await, 1.0);
}

#[tokio::test]
async fn an_oversize_metadata_is_refused_and_the_last_good_map_kept() {
    let env = env()
        .identity(&policy_with(
            "  metadata_refresh_interval: 50ms\n  metadata_max_bytes: 16KiB\n",
        ))
        .start()
        .await;
    wait_loaded(&env).await;
    // A new schema in which contact_customer_accounts leads nowhere, over the cap: were
    // it taken, the $expand below would name a table the gateway cannot name.
    let renamed =
        testkit::CSDL_FIXTURE.replace("\"contact_customer_accounts\"", "\"renamed_relationship\"");
    assert_ne!(renamed, testkit::CSDL_FIXTURE);
    let padding = format!("<!-- {} -->", "x".repeat(20 * 1024));
    let oversize = renamed.replacen("?>", &format!("?>{padding}"), 1);
    assert!(oversize.len() > 16 * 1024 && oversize.contains(&padding));
    env.dataverse.set_metadata_document(oversize);
    support::eventually("the oversize document is refused", || async {
        support::readyz_text(&env.gateway)
            .await
            .contains("larger than access.metadata_max_bytes")
    })
    .await;
    assert!(env.dataverse.metadata_answers().served >= 2);
    expand_is_decided(&env).await;
}

#[tokio::test]
async fn an_unreadable_metadata_file_is_a_config_error_naming_the_key() {
    let yaml = policy(true).replace("csdl.xml", "no-such-file.xml");
    let raw: dynamics_gateway::access::RawAccess = serde_norway::from_str(
        &yaml[yaml.find("access:").unwrap() + "access:\n".len()..]
            .lines()
            .map(|l| l.strip_prefix("  ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let dynamics_gateway::config::ConfigError::Invalid { key, message } =
        dynamics_gateway::access::AccessPolicy::from_raw(raw, "access").unwrap_err()
    else {
        panic!("not a key's error")
    };
    assert_eq!(key, "access.metadata_file");
    assert!(message.contains("no-such-file.xml"), "{message}");
}

const BOUNDARY: &str = "batch_a11";

/// One `application/http` part: its MIME headers, request line, headers and body.
fn part(content_id: Option<&str>, method: &str, url: &str, body: &str) -> String {
    let id = content_id.map_or(String::new(), |id| format!("Content-ID: {id}\r\n"));
    let (headers, body) = if body.is_empty() {
        ("Accept: application/json\r\n", String::new())
    } else {
        ("Content-Type: application/json\r\n", format!("{body}\r\n"))
    };
    format!(
        "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n{id}\r\n{method} {url} HTTP/1.1\r\n{headers}\r\n{body}"
    )
}

/// A batch of top-level parts.
fn batch(parts: &[String]) -> String {
    let mut body = String::new();
    for p in parts {
        body.push_str(&format!("--{BOUNDARY}\r\n{p}"));
    }
    body.push_str(&format!("--{BOUNDARY}--\r\n"));
    body
}

/// One change set holding `parts`, as a top-level part.
fn change_set(parts: &[String]) -> String {
    let mut body = "Content-Type: multipart/mixed; boundary=cs_a11\r\n\r\n".to_string();
    for p in parts {
        body.push_str(&format!("--cs_a11\r\n{p}"));
    }
    body.push_str("--cs_a11--\r\n");
    body
}

/// How many accounts and contacts the stand-in holds.
fn table_sizes(env: &Env) -> (usize, usize) {
    (
        env.dataverse.records("accounts").len(),
        env.dataverse.records("contacts").len(),
    )
}

async fn post_batch(env: &Env, role: &str, body: String) -> reqwest::Response {
    client()
        .post(format!("{}/api/data/v9.2/$batch", env.gateway.url()))
        .bearer_auth(token(env, role))
        .header(
            "content-type",
            format!("multipart/mixed; boundary={BOUNDARY}"),
        )
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn each_batch_part_is_decided_as_a_request_and_one_refused_part_refuses_the_batch() {
    let env = env().identity(&policy(true)).start().await;
    let gw = env.gateway.url();
    let accounts = part(Some("1"), "GET", "/api/data/v9.2/accounts?$select=name", "");
    let create = |id: &str, url: &str, body: &str| part(Some(id), "POST", url, body);
    let refused: Vec<(&str, String, &str)> = vec![
        (
            "Batcher",
            batch(&[accounts.clone(), part(Some("7"), "GET", "/api/data/v9.2/contacts", "")]),
            "$batch part 2 (Content-ID 7): no rule allows GET on contacts",
        ),
        (
            "Batcher",
            batch(&[accounts.clone(), part(None, "GET", &format!("{gw}/api/data/v9.2/accounts({ID})/contact_customer_accounts"), "")]),
            "$batch part 2: no rule allows read on contacts (via path segment contact_customer_accounts)",
        ),
        (
            "Batcher",
            batch(&[part(None, "GET", "accounts?$expand=primarycontactid", "")]),
            "$batch part 1: no rule allows read on contacts (via $expand=primarycontactid)",
        ),
        (
            "Batcher",
            batch(&[change_set(&[
                create("1", "/api/data/v9.2/accounts", r#"{"name":"a"}"#),
                create("2", "$1/contact_customer_accounts", r#"{"lastname":"c"}"#),
            ])]),
            "(Content-ID 2): no rule allows create on contacts (via path segment contact_customer_accounts)",
        ),
        (
            "Batcher",
            batch(&[change_set(&[
                create("1", "/api/data/v9.2/accounts", r#"{"name":"a"}"#),
                create("2", "/api/data/v9.2/accounts", r#"{"name":"b","primarycontactid":{"lastname":"c"}}"#),
            ])]),
            "(Content-ID 2): no rule allows create on contacts (via deep insert primarycontactid)",
        ),
        (
            "Batcher",
            batch(&[create("1", "accounts", &format!(r#"{{"primarycontactid@odata.bind":"contacts({ID})"}}"#))]),
            "(Content-ID 1): no rule allows associate on contacts (via primarycontactid@odata.bind)",
        ),
        (
            "BatchOnly",
            batch(std::slice::from_ref(&accounts)),
            "$batch part 1 (Content-ID 1): no rule allows GET on accounts",
        ),
    ];
    for (role, body, message_part) in refused {
        let (status, code, message) = error_body(post_batch(&env, role, body.clone()).await).await;
        assert_eq!(
            (status, code.as_str()),
            (403, "DynamicsGateway.AccessDenied"),
            "{message}\n{body}"
        );
        assert!(message.contains(message_part), "{message}\n{body}");
        assert_eq!(env.dataverse.request_count(), 0, "{body}");
    }
    // Counted under the first rule for the caller, or, for a pair of a part's body, under
    // the rule that granted the part's line.
    let series = |rule: &str| format!("dynamics_gateway_access_denied_total{{rule=\"{rule}\"}}");
    assert_eq!(
        support::metric(&env.gateway, &series("batch-envelope")).await,
        5.0
    );
    assert_eq!(
        support::metric(&env.gateway, &series("batch-accounts")).await,
        2.0
    );
    // Parts every one of which a rule grants go through, Content-ID references included.
    let allowed = batch(&[
        accounts,
        change_set(&[
            create("2", "/api/data/v9.2/accounts", r#"{"name":"a"}"#),
            create(
                "3",
                "accounts",
                r#"{"name":"b","parentaccountid@odata.bind":"$2"}"#,
            ),
        ]),
    ]);
    let before = env.dataverse.records("accounts").len();
    let response = post_batch(&env, "Batcher", allowed).await;
    assert_eq!(response.status(), 200);
    assert_eq!(env.dataverse.request_count(), 1);
    assert_eq!(env.dataverse.records("accounts").len(), before + 2);
}

#[tokio::test]
async fn a_refused_part_after_the_held_head_aborts_the_batch_unrun() {
    let env = env().identity(&policy(true)).start().await;
    // Past the 64 KiB the gateway decides before connecting: the batch streams.
    let padding = "x".repeat(80 * 1024);
    let body = batch(&[
        part(
            Some("1"),
            "POST",
            "/api/data/v9.2/accounts",
            &format!(r#"{{"name":"a","description":"{padding}"}}"#),
        ),
        part(
            Some("2"),
            "POST",
            "/api/data/v9.2/contacts",
            r#"{"lastname":"c"}"#,
        ),
    ]);
    let before = table_sizes(&env);
    let (status, _, message) = error_body(post_batch(&env, "Batcher", body).await).await;
    assert_eq!(status, 403, "{message}");
    assert!(
        message.contains("(Content-ID 2): no rule allows POST on contacts"),
        "{message}"
    );
    assert_eq!(table_sizes(&env), before, "nothing was written");
}

#[tokio::test]
async fn a_stored_query_is_decided_on_the_table_it_reads() {
    let env = env().identity(&policy(true)).start().await;
    let account_view = env.dataverse.add_stored_query("savedqueries", "account");
    let contact_view = env.dataverse.add_stored_query("savedqueries", "contact");
    let personal_contacts = env.dataverse.add_stored_query("userqueries", "contact");
    let r = "Accounts.Read";
    let lookups = || {
        env.dataverse
            .requests()
            .iter()
            .filter(|q| is_view_lookup(&q.path_and_query))
            .count()
    };
    // The view's table is looked up once, with the gateway's own token, and remembered.
    for _ in 0..2 {
        check(
            &env,
            r,
            "GET",
            &format!("accounts?savedQuery={account_view}"),
            "",
            Forwarded,
        )
        .await;
    }
    assert_eq!(lookups(), 1);
    let lookup = env
        .dataverse
        .requests()
        .into_iter()
        .find(|q| is_view_lookup(&q.path_and_query))
        .unwrap();
    assert_eq!(
        lookup.path_and_query,
        format!("/api/data/v9.2/savedqueries({account_view})?$select=returnedtypecode")
    );
    assert!(lookup.header("callerobjectid").is_none());
    // A view of contacts read through accounts is a read of contacts.
    check(
        &env,
        r,
        "GET",
        &format!("accounts?savedQuery={contact_view}"),
        "",
        Refused("no rule allows read on contacts (via savedQuery)"),
    )
    .await;
    check(
        &env,
        r,
        "GET",
        &format!("accounts?userQuery={personal_contacts}"),
        "",
        Refused("no rule allows read on contacts (via userQuery)"),
    )
    .await;
    check(
        &env,
        "PerTable",
        "GET",
        &format!("accounts?userQuery={personal_contacts}"),
        "",
        Forwarded,
    )
    .await;
    // A view that is not there, an id that is no GUID, or two views name no table.
    for query in [
        format!("savedQuery={ID}"),
        "savedQuery=all-accounts".to_string(),
        format!("savedQuery={account_view}&userQuery={account_view}"),
    ] {
        check(
            &env,
            r,
            "GET",
            &format!("accounts?{query}"),
            "",
            Refused("read on a table the gateway cannot name (via "),
        )
        .await;
    }
}

#[tokio::test]
async fn a_refused_pair_past_the_held_head_aborts_the_body_unrun() {
    let env = env().identity(&policy(true)).start().await;
    let padding = "x".repeat(80 * 1024);
    let body = format!(
        r#"{{"name":"a","description":"{padding}","primarycontactid":{{"lastname":"c"}}}}"#
    );
    let before = table_sizes(&env);
    let response = support::post(
        &env.gateway,
        "/api/data/v9.2/accounts",
        token(&env, "Accounts.Create"),
        "application/json",
        body,
    )
    .await;
    let message = expect_error(response, 403, "DynamicsGateway.AccessDenied").await;
    assert!(
        message.contains("no rule allows create on contacts (via deep insert primarycontactid)"),
        "{message}"
    );
    assert_eq!(table_sizes(&env), before, "nothing was written");
}

#[tokio::test]
async fn a_stored_query_in_a_batch_part_needs_a_grant_on_every_table() {
    let env = env().identity(&policy(true)).start().await;
    // A view of accounts: a request of its own under `GET accounts` is granted...
    let account_view = env.dataverse.add_stored_query("savedqueries", "account");
    let url = format!("/api/data/v9.2/accounts?savedQuery={account_view}");
    check(
        &env,
        "Batcher",
        "GET",
        &url["/api/data/v9.2/".len()..],
        "",
        Forwarded,
    )
    .await;
    // ...but inside a batch its table is not looked up: refused, saying so, unsent.
    let before = env.dataverse.request_count();
    let body = batch(&[part(Some("4"), "GET", &url, "")]);
    let (status, code, message) = error_body(post_batch(&env, "Batcher", body.clone()).await).await;
    assert_eq!(
        (status, code.as_str()),
        (403, "DynamicsGateway.AccessDenied"),
        "{message}"
    );
    assert!(
        message.contains("$batch part 1 (Content-ID 4): a stored query (savedQuery) is not looked up inside $batch"),
        "{message}"
    );
    assert_eq!(env.dataverse.request_count(), before);
    // A rule granting read on every table covers whatever the view reads.
    let response = post_batch(&env, "BatchAll", body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(env.dataverse.request_count(), before + 1);
}
