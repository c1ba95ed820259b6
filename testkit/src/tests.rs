//! End-to-end tests of the testkit over real loopback sockets, with a minimal HTTP/1.1
//! client on a raw `TcpStream` (so the testkit needs no HTTP client dependency).

use std::net::SocketAddr;
use std::time::Duration;

use aws_lc_rs::signature::{RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::dataverse::APPLICATION_USER_ID;
use super::*;

/// Characters a careful client encodes in a query value.
const QUERY: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'\'')
    .add(b'&')
    .add(b'+')
    .add(b'%');

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = std::str::from_utf8(&data[..line_end]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        data = &data[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

async fn send(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let body = body.to_vec();
    // Write and read concurrently: the echo route answers while the body is still coming.
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await.unwrap();
        wr.write_all(&body).await.unwrap();
        wr
    });
    let mut buf = Vec::new();
    rd.read_to_end(&mut buf).await.unwrap();
    drop(writer.await.unwrap());
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = std::str::from_utf8(&buf[..split]).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let raw = &buf[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(raw) } else { raw.to_vec() };
    Resp {
        status,
        headers,
        body,
    }
}

async fn get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Resp {
    send(addr, "GET", target, headers, b"").await
}

fn form(fields: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

async fn get_token(idp: &IdpHandle, secret: &str, scope: &str) -> Resp {
    let body = form(&[
        ("grant_type", "client_credentials"),
        ("client_id", &idp.client_id()),
        ("client_secret", secret),
        ("scope", scope),
    ]);
    send(
        idp.addr(),
        "POST",
        &format!("/{}/oauth2/v2.0/token", idp.tenant_id()),
        &[("Content-Type", "application/x-www-form-urlencoded")],
        body.as_bytes(),
    )
    .await
}

/// An IdP and a Dataverse that only accepts its tokens, plus a valid S2S bearer.
async fn pair() -> (IdpHandle, DataverseHandle, String) {
    let idp = Idp::builder().start().await.unwrap();
    let dv = Dataverse::builder()
        .accept_tokens_from(idp.s2s_registry())
        .user(DirectoryUser {
            systemuserid: "aaaaaaaa-0000-0000-0000-000000000001".into(),
            aad_object_id: "0a0a0a0a-1111-2222-3333-444444444444".into(),
            internalemailaddress: "alice@contoso.example".into(),
            domainname: "alice@contoso.example".into(),
            disabled: false,
        })
        .user(
            DirectoryUser::new(
                "0d0d0d0d-1111-2222-3333-444444444444",
                "dave@contoso.example",
            )
            .disabled(true),
        )
        .start()
        .await
        .unwrap();
    let resp = get_token(
        &idp,
        &idp.client_secret(),
        &format!("{}/.default", dv.url()),
    )
    .await;
    let token = resp.json()["access_token"].as_str().unwrap().to_owned();
    (idp, dv, format!("Bearer {token}"))
}

#[tokio::test]
async fn token_endpoint_accepts_right_secret_and_refuses_wrong_one() {
    let idp = Idp::builder().start().await.unwrap();
    let ok = get_token(
        &idp,
        "gateway-secret",
        "https://org.crm.dynamics.com/.default",
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let body = ok.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["ext_expires_in"], 3599);
    let token = body["access_token"].as_str().unwrap();
    assert!(token.starts_with("s2s-"));
    assert_eq!(idp.issued_s2s_tokens(), vec![token.to_owned()]);
    assert!(idp.s2s_registry().is_valid(token));
    assert_eq!(
        idp.s2s_registry().scope_of(token).as_deref(),
        Some("https://org.crm.dynamics.com/.default")
    );
    let sent = idp.last_token_request().unwrap();
    assert_eq!(sent["client_secret"], "gateway-secret");
    assert_eq!(sent["grant_type"], "client_credentials");

    let wrong = get_token(
        &idp,
        "not-the-secret",
        "https://org.crm.dynamics.com/.default",
    )
    .await;
    assert_eq!(wrong.status, 401);
    let err = wrong.json();
    assert_eq!(err["error"], "invalid_client");
    assert!(err["error_description"]
        .as_str()
        .unwrap()
        .starts_with("AADSTS7000215:"));
    assert_eq!(err["error_codes"][0], 7000215);
    assert!(err["trace_id"].is_string() && err["correlation_id"].is_string());

    let scope = get_token(
        &idp,
        "gateway-secret",
        "https://org.crm.dynamics.com/user_impersonation",
    )
    .await;
    assert_eq!(scope.status, 400);
    assert_eq!(scope.json()["error"], "invalid_scope");
    assert_eq!(idp.token_requests(), 3);
    assert_eq!(idp.issued_s2s_tokens().len(), 1);
}

#[tokio::test]
async fn token_endpoint_modes_and_outage() {
    let idp = Idp::builder()
        .s2s_token_lifetime(120)
        .expires_in_as_string(true)
        .start()
        .await
        .unwrap();
    let scope = "https://org.crm.dynamics.com/.default";
    let ok = get_token(&idp, "gateway-secret", scope).await.json();
    assert_eq!(ok["expires_in"], "120");

    idp.set_token_endpoint_mode(TokenEndpointMode::ServerError);
    assert_eq!(get_token(&idp, "gateway-secret", scope).await.status, 500);
    idp.set_token_endpoint_mode(TokenEndpointMode::InvalidClient);
    let r = get_token(&idp, "gateway-secret", scope).await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("invalid_client"))
    );
    idp.set_token_endpoint_mode(TokenEndpointMode::InvalidJson);
    let r = get_token(&idp, "gateway-secret", scope).await;
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());
    idp.set_token_endpoint_mode(TokenEndpointMode::NoExpiresIn);
    let r = get_token(&idp, "gateway-secret", scope).await.json();
    assert!(r["access_token"].is_string() && r.get("expires_in").is_none());
    idp.set_token_endpoint_mode(TokenEndpointMode::Hang);
    let hung = tokio::time::timeout(
        Duration::from_millis(300),
        get_token(&idp, "gateway-secret", scope),
    )
    .await;
    assert!(hung.is_err(), "the Hang mode answered");
    idp.set_token_endpoint_mode(TokenEndpointMode::Ok);

    idp.set_available(false);
    let down = get(
        idp.addr(),
        &idp.jwks_uri().replace(&idp.base_url(), ""),
        &[],
    )
    .await;
    assert_eq!(down.status, 503);
    idp.set_available(true);
    assert_eq!(get_token(&idp, "gateway-secret", scope).await.status, 200);
    assert_eq!(idp.jwks_requests(), 1);

    // A client assertion is verified in place of the secret (this one is not a JWT), and
    // recorded either way.
    let body = form(&[
        ("grant_type", "client_credentials"),
        ("client_id", "gateway-client"),
        (
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        ),
        ("client_assertion", "eyJ.assertion.sig"),
        ("scope", scope),
    ]);
    let r = send(
        idp.addr(),
        "POST",
        &idp.token_url().replace(&idp.base_url(), ""),
        &[],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "invalid_client");
    assert_eq!(r.json()["error_codes"][0], 50027);
    assert_eq!(
        idp.last_token_request().unwrap()["client_assertion"],
        "eyJ.assertion.sig"
    );
}

#[tokio::test]
async fn discovery_and_jwks_follow_rotation() {
    let idp = Idp::builder()
        .tenant_id("11111111-2222-3333-4444-555555555555")
        .start()
        .await
        .unwrap();
    let path = |url: String| url.replace(&idp.base_url(), "");
    let disco = send(idp.addr(), "GET", &path(idp.discovery_url()), &[], b"")
        .await
        .json();
    assert_eq!(disco["issuer"], idp.issuer());
    assert_eq!(disco["jwks_uri"], idp.jwks_uri());
    assert_eq!(disco["token_endpoint"], idp.token_url());
    assert_eq!(
        idp.issuer(),
        format!(
            "http://127.0.0.1:{}/11111111-2222-3333-4444-555555555555/v2.0",
            idp.addr().port()
        )
    );

    let kids = |jwks: &Value| -> Vec<String> {
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    };
    let first = idp.current_key().kid().to_owned();
    let jwks = send(idp.addr(), "GET", &path(idp.jwks_uri()), &[], b"")
        .await
        .json();
    assert_eq!(kids(&jwks), vec![first.clone()]);

    let second = idp.rotate_key(true);
    assert_ne!(first, second);
    let jwks = send(idp.addr(), "GET", &path(idp.jwks_uri()), &[], b"")
        .await
        .json();
    assert_eq!(kids(&jwks), vec![first.clone(), second.clone()]);

    let third = idp.rotate_key(false);
    let jwks = send(idp.addr(), "GET", &path(idp.jwks_uri()), &[], b"")
        .await
        .json();
    assert_eq!(kids(&jwks), vec![third.clone()]);
    assert_eq!(idp.current_key().kid(), third);
    assert_eq!((idp.discovery_requests(), idp.jwks_requests()), (1, 3));

    let common = get(idp.addr(), &path(idp.common_discovery_url()), &[])
        .await
        .json();
    assert_eq!(
        common["issuer"],
        format!("{}/{{tenantid}}/v2.0", idp.base_url())
    );
}

#[tokio::test]
async fn token_for_verifies_with_the_published_jwk() {
    let idp = Idp::builder()
        .audience("api://my-gateway")
        .start()
        .await
        .unwrap();
    let oid = "0a0a0a0a-1111-2222-3333-444444444444";
    let token = idp.token_for(oid);
    let (signing_input, sig) = token.rsplit_once('.').unwrap();
    let (header, claims) = signing_input.split_once('.').unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    assert_eq!(header["alg"], "RS256");

    let jwks = get(
        idp.addr(),
        &idp.jwks_uri().replace(&idp.base_url(), ""),
        &[],
    )
    .await
    .json();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .unwrap();
    let n = URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap();
    let e = URL_SAFE_NO_PAD.decode(jwk["e"].as_str().unwrap()).unwrap();
    let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    RsaPublicKeyComponents { n: &n, e: &e }
        .verify(&RSA_PKCS1_2048_8192_SHA256, signing_input.as_bytes(), &sig)
        .expect("signature verifies with the published JWK");

    assert_eq!(claims["iss"], idp.issuer());
    assert_eq!(claims["aud"], "api://my-gateway");
    assert_eq!(claims["oid"], oid);
    assert_eq!(claims["tid"], idp.tenant_id());
    assert_eq!(claims["ver"], "2.0");
    let exp = claims["exp"].as_u64().unwrap();
    assert_eq!(exp - claims["iat"].as_u64().unwrap(), 3600);
    assert_eq!(claims["nbf"], claims["iat"]);

    // Edited claims are signed with the same key.
    let mut edited = idp.claims_for(oid);
    edited["aud"] = json!("someone-else");
    let other = idp.sign(edited);
    assert_ne!(other, token);
}

fn encoded(filter: &str) -> String {
    utf8_percent_encode(filter, QUERY).to_string()
}

#[tokio::test]
async fn systemusers_filter_matches_literals_only() {
    let (_idp, dv, bearer) = pair().await;
    let auth = [("Authorization", bearer.as_str())];
    let lookup = |filter: &str| {
        format!(
            "/api/data/v9.2/systemusers?$select=systemuserid,isdisabled&$filter={}",
            encoded(filter)
        )
    };

    let r = get(
        dv.addr(),
        &lookup("internalemailaddress eq 'alice@contoso.example'"),
        &auth,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(
        body["@odata.context"],
        format!(
            "{}/api/data/v9.2/$metadata#systemusers(systemuserid,isdisabled)",
            dv.url()
        )
    );
    let value = body["value"].as_array().unwrap();
    assert_eq!(value.len(), 1);
    assert_eq!(
        value[0]["systemuserid"],
        "aaaaaaaa-0000-0000-0000-000000000001"
    );
    assert_eq!(value[0]["isdisabled"], false);
    assert_eq!(value[0]["@odata.etag"], "W/\"1\"");

    let by_oid = get(
        dv.addr(),
        &lookup("azureactivedirectoryobjectid eq 0a0a0a0a-1111-2222-3333-444444444444"),
        &auth,
    )
    .await;
    assert_eq!(by_oid.json()["value"].as_array().unwrap().len(), 1);
    let by_domain = get(
        dv.addr(),
        &lookup("domainname eq 'alice@contoso.example'"),
        &auth,
    )
    .await;
    assert_eq!(by_domain.json()["value"].as_array().unwrap().len(), 1);

    // A correctly escaped injection attempt is one literal and matches nothing.
    let injection = "x' or '1'eq'1";
    let escaped = format!(
        "internalemailaddress eq '{}'",
        injection.replace('\'', "''")
    );
    let r = get(dv.addr(), &lookup(&escaped), &auth).await;
    assert_eq!(r.status, 200);
    assert!(r.json()["value"].as_array().unwrap().is_empty());

    // Unescaped, it would have matched every user: this is what escaping prevents.
    let unescaped = format!("internalemailaddress eq '{injection}'");
    let r = get(dv.addr(), &lookup(&unescaped), &auth).await;
    assert!(r.json()["value"].as_array().unwrap().len() >= 2);

    // A quoted GUID is a type error on Dataverse.
    let r = get(
        dv.addr(),
        &lookup("azureactivedirectoryobjectid eq '0a0a0a0a-1111-2222-3333-444444444444'"),
        &auth,
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "0x80060888");
    assert_eq!(dv.systemuser_lookups(), 6);
}

#[tokio::test]
async fn bearer_and_impersonation_rules() {
    let (_idp, dv, bearer) = pair().await;
    let who = "/api/data/v9.2/WhoAmI";

    let r = get(dv.addr(), who, &[]).await;
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .starts_with("Bearer authorization_uri="));
    assert_eq!(r.header("odata-version"), Some("4.0"));
    assert!(r.header("x-ms-service-request-id").is_some());
    let r = get(dv.addr(), who, &[("Authorization", "Bearer s2s-forged")]).await;
    assert_eq!(r.status, 401);

    let auth = ("Authorization", bearer.as_str());
    let r = get(dv.addr(), who, &[auth]).await;
    assert_eq!(r.json()["UserId"], APPLICATION_USER_ID);
    assert_eq!(
        r.json()["@odata.context"],
        format!(
            "{}/api/data/v9.2/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
            dv.url()
        )
    );
    let r = send(
        dv.addr(),
        "GET",
        "/api/data/v9.1/WhoAmI()",
        &[
            auth,
            ("CallerObjectId", "0a0a0a0a-1111-2222-3333-444444444444"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.json()["UserId"], "aaaaaaaa-0000-0000-0000-000000000001");
    let r = send(
        dv.addr(),
        "GET",
        who,
        &[
            auth,
            ("MSCRMCallerID", "aaaaaaaa-0000-0000-0000-000000000001"),
        ],
        b"",
    )
    .await;
    assert_eq!(r.json()["UserId"], "aaaaaaaa-0000-0000-0000-000000000001");
    for (h, v) in [
        ("CallerObjectId", "99999999-1111-2222-3333-444444444444"),
        ("CallerObjectId", "0d0d0d0d-1111-2222-3333-444444444444"),
        ("MSCRMCallerID", "0a0a0a0a-1111-2222-3333-444444444444"),
    ] {
        let r = get(dv.addr(), who, &[auth, (h, v)]).await;
        assert_eq!(r.status, 403, "{h}: {v}");
        assert_eq!(r.json()["error"]["code"], "0x80040225");
    }

    let r = get(dv.addr(), "/api/data/v9.2/nosuchthing", &[auth]).await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (404, Some("0x80060888"))
    );

    dv.revoke_tokens();
    let r = get(dv.addr(), who, &[auth]).await;
    assert_eq!(r.status, 401);
    let recorded = dv.requests();
    assert_eq!(recorded.len(), dv.request_count());
    assert_eq!(recorded[0].path_and_query, who);
}

/// The `name` of each record in a collection page, in order.
fn names(page: &Value) -> Vec<&str> {
    page["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn paging_next_link_round_trip() {
    let (_idp, dv, bearer) = pair().await;
    let auth = ("Authorization", bearer.as_str());
    let r = get(
        dv.addr(),
        "/api/data/v9.2/accounts?$select=name",
        &[auth, ("Prefer", "odata.maxpagesize=2")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let page1 = r.json();
    assert_eq!(
        page1["@odata.context"],
        format!("{}/api/data/v9.2/$metadata#accounts(name)", dv.url())
    );
    assert_eq!(names(&page1), ["Contoso", "Fabrikam"]);
    assert!(page1["value"][0]["@odata.etag"]
        .as_str()
        .unwrap()
        .starts_with("W/\""));
    assert!(page1["value"][0]["accountid"].is_string());
    let next = page1["@odata.nextLink"].as_str().unwrap();
    let prefix = format!("{}/api/data/v9.2/accounts?$select=name&$skiptoken=%3Ccookie%20pagenumber=%222%22%20pagingcookie=%22%253ccookie%2520page%253d%25221%2522%253e", dv.url());
    assert!(next.starts_with(&prefix), "{next}");
    let path = next.strip_prefix(&dv.url()).unwrap();

    let r = get(dv.addr(), path, &[auth, ("Prefer", "odata.maxpagesize=2")]).await;
    let page2 = r.json();
    assert_eq!(names(&page2), ["Adventure Works"]);
    assert!(page2.get("@odata.nextLink").is_none());
    assert_eq!(dv.requests().last().unwrap().path_and_query, path);

    // Decoding the token once (as a careless proxy might) breaks it.
    let mangled = path.replace("%25", "%");
    let r = get(
        dv.addr(),
        &mangled,
        &[auth, ("Prefer", "odata.maxpagesize=2")],
    )
    .await;
    assert_eq!(r.status, 400);

    let r = get(dv.addr(), "/api/data/v9.2/accounts/$count", &[auth]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "3"));
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let r = send(
        dv.addr(),
        "GET",
        &format!(
            "/api/data/v9.2/accounts?$top=1&$filter={}",
            encoded("name eq 'Fabrikam'")
        ),
        &[auth],
        b"",
    )
    .await;
    assert_eq!(r.json()["value"][0]["name"], "Fabrikam");
}

#[tokio::test]
async fn entity_writes_etags_and_binds() {
    let (_idp, dv, bearer) = pair().await;
    let auth = ("Authorization", bearer.as_str());
    let api = "/api/data/v9.2";
    let accounts = format!("{api}/accounts");

    let r = send(
        dv.addr(),
        "POST",
        &accounts,
        &[auth, ("Content-Type", "application/json")],
        br#"{"name":"Northwind"}"#,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let entity_id = r.header("odata-entityid").unwrap().to_owned();
    assert!(entity_id.starts_with(&format!("{}/api/data/v9.2/accounts(", dv.url())));
    let id = entity_id
        .rsplit_once('(')
        .unwrap()
        .1
        .trim_end_matches(')')
        .to_owned();

    let account = format!("{api}/accounts({id})");

    let bind_ok = format!(
        r#"{{"name":"Child","parentaccountid@odata.bind":"{}/api/data/v9.2/accounts({id})"}}"#,
        dv.url()
    );
    let r = send(
        dv.addr(),
        "POST",
        &format!("{api}/accounts?$select=name"),
        &[auth, ("Prefer", "return=representation")],
        bind_ok.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        r.json()["@odata.context"],
        format!(
            "{}/api/data/v9.2/$metadata#accounts(name)/$entity",
            dv.url()
        )
    );
    assert_eq!(r.json()["name"], "Child");
    let child = dv
        .records("accounts")
        .into_iter()
        .find(|a| a["name"] == "Child")
        .unwrap();
    assert_eq!(
        child["parentaccountid@odata.bind"],
        format!("{}/api/data/v9.2/accounts({id})", dv.url())
    );

    let bind_foreign = r#"{"name":"X","parentaccountid@odata.bind":"https://gateway.example/api/data/v9.2/accounts(00000000-0000-0000-0000-000000000001)"}"#;
    let r = send(
        dv.addr(),
        "POST",
        &accounts,
        &[auth],
        bind_foreign.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 400);

    let r = get(dv.addr(), &account, &[auth]).await;
    let etag = r.json()["@odata.etag"].as_str().unwrap().to_owned();
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    let r = send(
        dv.addr(),
        "PATCH",
        &account,
        &[auth, ("If-Match", &etag)],
        br#"{"name":"Northwind 2"}"#,
    )
    .await;
    assert_eq!(r.status, 204);
    let r = send(
        dv.addr(),
        "PATCH",
        &account,
        &[auth, ("If-Match", &etag)],
        br#"{"name":"stale"}"#,
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (412, Some("0x80060882"))
    );
    let r = send(
        dv.addr(),
        "PATCH",
        &account,
        &[auth, ("If-Match", "*")],
        br#"{"name":"Northwind 3"}"#,
    )
    .await;
    assert_eq!(r.status, 204);
    let r = send(dv.addr(), "DELETE", &account, &[auth], b"").await;
    assert_eq!(r.status, 204);
    let r = get(dv.addr(), &account, &[auth]).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn batch_round_trip_with_get_and_changeset_post() {
    let (_idp, dv, bearer) = pair().await;
    let url = dv.url();
    // Shaped like dynamics-web-api's: leading blank line, no space before boundary=,
    // absolute URLs, a raw space inside the request line.
    let body = format!(
        "\r\n--dwa_batch_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
GET {url}/api/data/v9.2/accounts?$select=name&$filter=name eq 'Contoso' HTTP/1.1\r\nAccept: application/json\r\n\r\n\
--dwa_batch_1\r\nContent-Type: multipart/mixed;boundary=dwa_changeset_2\r\n\r\n\
--dwa_changeset_2\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n\
POST {url}/api/data/v9.2/accounts HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{{\"name\":\"Batched\"}}\r\n\
--dwa_changeset_2\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 2\r\n\r\n\
PATCH $1 HTTP/1.1\r\nContent-Type: application/json\r\n\r\n{{\"description\":\"via reference\"}}\r\n\
--dwa_changeset_2--\r\n--dwa_batch_1--\r\n"
    );
    let r = send(
        dv.addr(),
        "POST",
        "/api/data/v9.2/$batch",
        &[
            ("Authorization", &bearer),
            ("Content-Type", "multipart/mixed;boundary=dwa_batch_1"),
        ],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ct = r.header("content-type").unwrap();
    assert!(
        ct.starts_with("multipart/mixed; boundary=batchresponse_"),
        "{ct}"
    );
    let text = r.text();
    let first_line = text.lines().next().unwrap();
    assert_eq!(
        first_line,
        format!("--{}", ct.split("boundary=").nth(1).unwrap())
    );
    assert!(text.contains("--changesetresponse_"));
    assert!(text.contains("HTTP/1.1 200 OK\r\n"));
    assert!(text.contains("HTTP/1.1 204 No Content\r\n"));
    assert!(text.contains("Content-Transfer-Encoding: binary\r\n"));
    assert!(text.trim_end().ends_with("--"));
    let json_start = text.find('{').unwrap();
    let get_part = &text[json_start..text[json_start..].find("\r\n--").unwrap() + json_start];
    let listed: Value = serde_json::from_str(get_part).unwrap();
    assert_eq!(listed["value"][0]["name"], "Contoso");
    assert_eq!(listed["value"].as_array().unwrap().len(), 1);
    let entity_line = text
        .lines()
        .find(|l| l.starts_with("OData-EntityId: "))
        .unwrap();
    assert!(entity_line.starts_with(&format!("OData-EntityId: {url}/api/data/v9.2/accounts(")));
    assert!(entity_line.ends_with(')'));
    let batched = dv
        .records("accounts")
        .into_iter()
        .find(|a| a["name"] == "Batched")
        .unwrap();
    assert_eq!(batched["description"], "via reference");

    let batch_b = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "multipart/mixed; boundary=b"),
    ];
    // A part naming another host (an unrewritten gateway URL) fails; the outer status is 200.
    let foreign = "--b\r\nContent-Type: application/http\r\n\r\nGET http://gateway.example/api/data/v9.2/WhoAmI HTTP/1.1\r\n\r\n--b--\r\n";
    let r = send(
        dv.addr(),
        "POST",
        "/api/data/v9.2/$batch",
        &batch_b,
        foreign.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("HTTP/1.1 400 Bad Request"));

    // A failing change set is rolled back.
    let before = dv.records("accounts").len();
    let failing = "--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\nContent-Type: application/http\r\n\r\nPOST accounts HTTP/1.1\r\n\r\n{\"name\":\"rolled back\"}\r\n--c\r\nContent-Type: application/http\r\n\r\nPATCH accounts(00000000-0000-0000-0000-0000000000ff) HTTP/1.1\r\nIf-Match: *\r\n\r\n{}\r\n--c--\r\n--b--\r\n";
    let r = send(
        dv.addr(),
        "POST",
        "/api/data/v9.2/$batch",
        &batch_b,
        failing.as_bytes(),
    )
    .await;
    assert!(r.text().contains("HTTP/1.1 404 Not Found"), "{}", r.text());
    assert_eq!(dv.records("accounts").len(), before);
}

#[tokio::test]
async fn echo_download_headers_and_canned_responses() {
    let (_idp, dv, bearer) = pair().await;
    let auth = ("Authorization", bearer.as_str());
    let payload: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(31) % 256) as u8)
        .collect();
    let r = send(
        dv.addr(),
        "POST",
        "/api/data/v9.2/echo",
        &[auth, ("Content-Type", "application/x-test")],
        &payload,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-test"));
    assert!(r.body == payload, "echo altered the body");
    let rec = dv.requests().pop().unwrap();
    assert_eq!(rec.body_len, payload.len() as u64);
    assert_eq!(rec.body.len(), dataverse::RECORDED_BODY_LIMIT);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &payload);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(rec.body_sha256, hex);

    let r = get(dv.addr(), "/api/data/v9.2/download?bytes=300000", &[auth]).await;
    assert_eq!(r.header("content-length"), Some("300000"));
    assert_eq!(r.body.len(), 300_000);
    assert!(r
        .body
        .iter()
        .enumerate()
        .all(|(i, b)| *b == (i % 251) as u8));

    let r = get(
        dv.addr(),
        "/api/data/v9.2/headers",
        &[auth, ("CallerObjectId", "abc")],
    )
    .await;
    assert_eq!(r.json()["callerobjectid"], "abc");

    dv.respond_next(
        1,
        429,
        vec![
            ("Retry-After".into(), "2".into()),
            (
                "x-ms-ratelimit-burst-remaining-xrm-requests".into(),
                "0".into(),
            ),
        ],
        r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit"}}"#,
    );
    let r = get(dv.addr(), "/api/data/v9.2/WhoAmI", &[auth]).await;
    assert_eq!((r.status, r.header("retry-after")), (429, Some("2")));
    assert_eq!(
        r.header("x-ms-ratelimit-burst-remaining-xrm-requests"),
        Some("0")
    );
    assert_eq!(r.header("odata-version"), Some("4.0"));
    assert_eq!(
        dv.requests().last().unwrap().path_and_query,
        "/api/data/v9.2/WhoAmI"
    );
    let r = get(dv.addr(), "/api/data/v9.2/WhoAmI", &[auth]).await;
    assert_eq!(r.status, 200);

    dv.set_delay(Duration::from_millis(200));
    let started = std::time::Instant::now();
    get(dv.addr(), "/api/data/v9.2/WhoAmI", &[auth]).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn large_echo_streams() {
    let dv = Dataverse::builder().start().await.unwrap();
    let payload = vec![7u8; 20 * 1024 * 1024];
    let r = send(
        dv.addr(),
        "POST",
        "/api/data/v9.2/echo",
        &[("Authorization", "Bearer anything")],
        &payload,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), payload.len());
    assert_eq!(dv.requests()[0].body_len, payload.len() as u64);
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_server() {
    let idp = Idp::builder().start().await.unwrap();
    let addr = idp.addr();
    let clone = idp.clone();
    drop(idp);
    assert!(
        TcpStream::connect(addr).await.is_ok(),
        "a clone keeps it running"
    );
    drop(clone);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn recording_can_be_switched_off_for_load_runs() {
    let dv = Dataverse::builder()
        .record_requests(false)
        .start()
        .await
        .unwrap();
    let auth = ("Authorization", "Bearer anything");
    let r = get(dv.addr(), "/api/data/v9.2/WhoAmI", &[auth]).await;
    assert_eq!(r.status, 200);
    let payload = vec![3u8; 200_000];
    let r = send(dv.addr(), "POST", "/api/data/v9.2/echo", &[auth], &payload).await;
    assert_eq!((r.status, r.body.len()), (200, payload.len()));
    assert_eq!(dv.request_count(), 0);
}
