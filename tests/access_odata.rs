//! Access rules that see every table a request touches, end to end through the gateway:
//! one table of cases (request -> forwarded, or refused naming the pair no rule grants)
//! under the rules of issue 11 (`GET accounts` only, `POST accounts` only), with the
//! environment's CSDL from `access.metadata_file`; and the fail-closed start without it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::json;
use support::{client, env, error_body, Env, ALICE_OID};

const ID: &str = "00000000-0000-0000-0000-000000000001";

fn policy(metadata: bool) -> String {
    let file = if metadata {
        format!(
            "  metadata_file: {}/tests/fixtures/csdl.xml\n",
            env!("CARGO_MANIFEST_DIR")
        )
    } else {
        String::new()
    };
    format!(
        "identity:
  mode: caller_object_id
access:
  default: deny
{file}  rules:
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
"
    )
}

fn token(env: &Env, role: &str) -> String {
    let mut claims = env.idp.claims_for(ALICE_OID);
    claims["roles"] = json!([role]);
    env.idp.sign(claims)
}

enum Expect {
    Forwarded,
    /// Refused 403; the message contains this.
    Refused(&'static str),
}
use Expect::{Forwarded, Refused};

async fn check(env: &Env, role: &str, method: &str, path: &str, body: &str, expect: Expect) {
    let token = token(env, role);
    let before = env.dataverse.request_count();
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = client()
        .request(
            method.clone(),
            format!("{}/api/data/v9.2/{path}", env.gateway.url()),
        )
        .bearer_auth(&token);
    if !body.is_empty() {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.unwrap();
    match expect {
        Forwarded => {
            assert_ne!(response.status(), 403, "{role} {method} {path}");
            assert_ne!(response.status(), 503, "{role} {method} {path}");
            assert_eq!(
                env.dataverse.request_count(),
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
                env.dataverse.request_count(),
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
    let cases: Vec<(&str, &str, String, &str, Expect)> = vec![
        // Plain reads keep today's meaning.
        (r, "GET", "accounts".into(), "", Forwarded),
        (r, "GET", format!("accounts({ID})?$select=name,revenue"), "", Forwarded),
        (r, "GET", "accounts?$filter=name eq 'a/b'&$orderby=name".into(), "", Forwarded),
        (r, "GET", "accounts?$expand=parentaccountid($select=name)".into(), "", Forwarded),
        // The GET-accounts-only bypasses of issue 11.
        (r, "GET", "accounts?$expand=contact_customer_accounts($select=fullname)".into(), "",
            Refused("no rule allows read on contacts (via $expand=contact_customer_accounts)")),
        (r, "GET", "accounts?$expand=parentaccountid($expand=primarycontactid)".into(), "",
            Refused("read on contacts (via $expand=parentaccountid/primarycontactid)")),
        (r, "GET", "accounts?$expand=*".into(), "", Refused("(via $expand=*)")),
        (r, "GET", format!("accounts({ID})/contact_customer_accounts"), "",
            Refused("read on contacts (via path segment contact_customer_accounts)")),
        (r, "GET", format!("accounts?fetchXml={fetch}"), "",
            Refused("read on contacts (via fetchXml link-entity contact)")),
        (r, "GET", "accounts?$apply=groupby((primarycontactid/fullname))".into(), "",
            Refused("read on contacts (via $apply=primarycontactid/fullname)")),
        (r, "GET", "accounts?$filter=contact_customer_accounts/any(c:c/fullname eq 'x')".into(), "",
            Refused("read on contacts (via $filter=contact_customer_accounts")),
        (r, "GET", format!("accounts?savedQuery={ID}"), "", Refused("(via savedQuery)")),
        (r, "GET", format!("accounts?userQuery={ID}"), "", Refused("(via userQuery)")),
        (r, "GET", format!("accounts({ID})/Microsoft.Dynamics.CRM.RetrievePrincipalAccess(Target=@t)?@t={{'@odata.id':'contacts({ID})'}}"), "",
            Refused("execute on RetrievePrincipalAccess")),
        (r, "GET", "new_projects?$expand=new_accountid".into(), "", Refused("GET on new_projects")),
        // The POST-accounts-only bypasses that the path shows.
        (c, "POST", "accounts".into(), r#"{"name":"x"}"#, Forwarded),
        (c, "POST", format!("accounts({ID})/contact_customer_accounts"), r#"{"lastname":"x"}"#,
            Refused("create on contacts (via path segment contact_customer_accounts)")),
        (c, "POST", format!("accounts({ID})/contact_customer_accounts/$ref"), &ref_body,
            Refused("associate on contacts")),
        (c, "POST", format!("accounts({ID})/Microsoft.Dynamics.CRM.Merge"), "{}",
            Refused("execute on Merge")),
        (c, "POST", "Merge".into(), "{}", Refused("POST on Merge")),
        // Operations per table and functions by name; parameters' tables need grants.
        ("PerTable", "GET", "accounts?$expand=contact_customer_accounts($select=fullname)".into(), "", Forwarded),
        ("PerTable", "GET", "accounts?$expand=owninguser".into(), "",
            Refused("read on systemusers (via $expand=owninguser)")),
        ("PerTable", "POST", "accounts".into(), r#"{"name":"x"}"#, Refused("POST on accounts")),
        ("PerTable", "GET", format!("contacts({ID})/Microsoft.Dynamics.CRM.RetrievePrincipalAccess(Target=@t)?@t={{'@odata.id':'contacts({ID})'}}"), "",
            Refused("read on systemusers (via parameter entityset)")),
    ];
    for (role, method, path, body, expect) in cases {
        check(&env, role, method, &path, body, expect).await;
    }
}

#[tokio::test]
async fn without_metadata_requests_that_need_it_fail_closed_and_plain_ones_are_decided() {
    let env = env().identity(&policy(false)).start().await;
    let token = token(&env, "Accounts.Read");
    let get = |path: String| {
        client()
            .get(format!("{}/api/data/v9.2/{path}", env.gateway.url()))
            .bearer_auth(&token)
            .send()
    };
    let (status, code, message) = error_body(
        get("accounts?$expand=contact_customer_accounts".into())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, code.as_str()),
        (503, "DynamicsGateway.MetadataUnavailable"),
        "{message}"
    );
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
    let (key, message) =
        dynamics_gateway::access::AccessPolicy::from_raw(raw, "access").unwrap_err();
    assert_eq!(key, "access.metadata_file");
    assert!(message.contains("no-such-file.xml"), "{message}");
}
