//! The transparency table: every case is sent straight to the stand-in Dataverse, with an
//! S2S token and Alice's `CallerObjectId` as the gateway would send it, and through the
//! gateway with Alice's own token. The answers must be the same apart from what the README
//! says the gateway changes ("What is forwarded, and what is not"): links name the gateway,
//! `x-request-id` is added, `Set-Cookie` is not passed, and per-connection or per-request
//! headers (`date`, `content-length`, `req_id`, ...) are the service's own each time.

use crate::support;

use std::collections::BTreeMap;

use support::{env, ALICE_OID};

/// Headers whose value is new on every answer, or belongs to one connection.
const PER_ANSWER: &[&str] = &[
    "date",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "req_id",
    "x-ms-service-request-id",
];

/// What the gateway documents it adds or removes.
const ADDED_BY_THE_GATEWAY: &[&str] = &["x-request-id"];
const REMOVED_BY_THE_GATEWAY: &[&str] = &["set-cookie"];

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: Option<&'static str>,
}

const CASES: &[Case] = &[
    Case {
        name: "WhoAmI",
        method: "GET",
        path: "/api/data/v9.2/WhoAmI",
        headers: &[],
        body: None,
    },
    Case {
        name: "a page of accounts with a next link",
        method: "GET",
        path: "/api/data/v9.2/accounts?$select=name&$orderby=name",
        headers: &[("prefer", "odata.maxpagesize=1")],
        body: None,
    },
    Case {
        name: "a filtered query",
        method: "GET",
        path: "/api/data/v9.2/accounts?$select=name&$filter=name%20eq%20'Contoso'",
        headers: &[],
        body: None,
    },
    Case {
        name: "one record that does not exist",
        method: "GET",
        path: "/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)",
        headers: &[],
        body: None,
    },
    Case {
        name: "a table that does not exist",
        method: "GET",
        path: "/api/data/v9.2/nosuchtables",
        headers: &[],
        body: None,
    },
    Case {
        name: "a count",
        method: "GET",
        path: "/api/data/v9.2/accounts/$count",
        headers: &[],
        body: None,
    },
    Case {
        name: "an update of a record that does not exist",
        method: "PATCH",
        path: "/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)",
        // Not an upsert: each run must find the table as the other left it.
        headers: &[("if-match", "*")],
        body: Some(r#"{"name":"nobody"}"#),
    },
    Case {
        name: "a delete of a record that does not exist",
        method: "DELETE",
        path: "/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)",
        headers: &[],
        body: None,
    },
    Case {
        name: "a malformed body",
        method: "POST",
        path: "/api/data/v9.2/accounts",
        headers: &[],
        body: Some(r#"{"name":"#),
    },
];

struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

async fn send(url: String, case: &Case, auth: &[(&str, String)]) -> Answer {
    let method = reqwest::Method::from_bytes(case.method.as_bytes()).unwrap();
    // Identity on the wire, so the two answers are compared byte for byte.
    let mut request = support::client()
        .request(method, url)
        .header("accept-encoding", "identity");
    for (name, value) in auth {
        request = request.header(*name, value);
    }
    for (name, value) in case.headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = case.body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let mut headers = BTreeMap::new();
    for (name, value) in response.headers() {
        let value = value.to_str().unwrap_or("(not text)").to_owned();
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|v: &mut String| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    Answer {
        status,
        headers,
        body: response.text().await.unwrap(),
    }
}

/// An S2S token from the stand-in identity provider, as the gateway gets its own.
async fn s2s_token(env: &support::Env) -> String {
    let response = support::client()
        .post(env.idp.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &env.idp.client_id()),
            ("client_secret", &env.idp.client_secret()),
            ("scope", &format!("{}/.default", env.dataverse.url())),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the stand-in gives S2S tokens");
    let json: serde_json::Value = response.json().await.unwrap();
    json["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn answers_through_the_gateway_equal_dataverse_s_own_but_for_the_documented_changes() {
    let env = env().start().await;
    let direct_auth = [
        ("authorization", format!("Bearer {}", s2s_token(&env).await)),
        ("callerobjectid", ALICE_OID.to_owned()),
    ];
    let gateway_auth = [(
        "authorization",
        format!("Bearer {}", env.idp.token_for(ALICE_OID)),
    )];
    let (dataverse, gateway) = (env.dataverse.url(), env.gateway.url());
    let mut compared = 0;
    for case in CASES {
        let direct = send(format!("{dataverse}{}", case.path), case, &direct_auth).await;
        let through = send(format!("{gateway}{}", case.path), case, &gateway_auth).await;
        let name = case.name;
        assert_eq!(
            through.status, direct.status,
            "{name}: status (through: {}; direct: {})",
            through.body, direct.body
        );
        assert_eq!(
            through.body,
            direct.body.replace(&dataverse, &gateway),
            "{name}: body, links aside"
        );
        assert!(
            !through.body.contains(&dataverse),
            "{name}: a link to Dataverse"
        );
        if case.headers.iter().any(|(n, _)| *n == "prefer") {
            assert!(
                through.body.contains("@odata.nextLink"),
                "{name}: the page has a next link to compare"
            );
        }
        for (header, value) in &direct.headers {
            if PER_ANSWER.contains(&header.as_str()) {
                continue;
            }
            if REMOVED_BY_THE_GATEWAY.contains(&header.as_str()) {
                assert!(
                    !through.headers.contains_key(header),
                    "{name}: {header} passed"
                );
                continue;
            }
            assert_eq!(
                through.headers.get(header),
                Some(&value.replace(&dataverse, &gateway)),
                "{name}: header {header}"
            );
        }
        for header in through.headers.keys() {
            assert!(
                direct.headers.contains_key(header)
                    || PER_ANSWER.contains(&header.as_str())
                    || ADDED_BY_THE_GATEWAY.contains(&header.as_str()),
                "{name}: the gateway added {header}, which the README does not say"
            );
        }
        compared += 1;
    }
    assert_eq!(compared, CASES.len());
}
