//! End to end over sockets: each credential kind asks the stand-in token endpoint (or
//! IMDS) for a token with `Credential::request_token`, and the stand-in Dataverse must
//! accept what comes back. The stand-ins check what Azure AD and IMDS check (assertion
//! signature and claims, replay, federated records, the `Metadata` header), so each kind
//! also has its refusals tested. The last test runs the real gateway with each kind.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use dynamics_gateway::secret::Secret;
use dynamics_gateway::upstream::credential::{
    x5t_s256, Credential, RawCertificate, RawManagedIdentity, RawWorkloadIdentity,
    SigningAlgorithm, JWT_BEARER_ASSERTION_TYPE,
};
use serde_json::{json, Value};
use testkit::keys::RsaSigningKey;
use testkit::{Dataverse, DataverseHandle, DirectoryUser, Idp, IdpHandle, Imds, Scratch};
use url::Url;

const CERT_APP: &str = "0c0ffee0-0000-4000-8000-00000000ce47";
const WI_APP: &str = "0c0ffee0-0000-4000-8000-0000000000a1";
const SA_SUBJECT: &str = "system:serviceaccount:crm:dynamics-gateway";

/// A self-signed RSA-2048 certificate as Azure AD app registrations take them.
struct TestCert {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn test_cert() -> TestCert {
    let key = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        .unwrap();
    let cert = rcgen::CertificateParams::new(vec!["dynamics-gateway".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    TestCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

async fn stand_ins(idp: Idp) -> (IdpHandle, DataverseHandle) {
    stand_ins_knowing(idp, &[]).await
}

/// [`stand_ins`] whose Dataverse has `users` in its directory (the gateway looks callers
/// up there).
async fn stand_ins_knowing(idp: Idp, users: &[DirectoryUser]) -> (IdpHandle, DataverseHandle) {
    let idp = idp.start().await.unwrap();
    let mut dataverse = Dataverse::builder().accept_tokens_from(idp.s2s_registry());
    for user in users {
        dataverse = dataverse.user(user.clone());
    }
    (idp, dataverse.start().await.unwrap())
}

fn scope(dataverse: &DataverseHandle) -> String {
    format!("{}/.default", dataverse.url())
}

/// Status and JSON body of a token response.
async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

/// Asks for a token with `credential`, expects 200, and checks Dataverse accepts it.
async fn token_works(
    credential: &Credential,
    token_url: &str,
    client_id: &str,
    dataverse: &DataverseHandle,
) -> Value {
    let http = reqwest::Client::new();
    let response = credential
        .request_token(
            &http,
            &Url::parse(token_url).unwrap(),
            client_id,
            &scope(dataverse),
        )
        .await
        .unwrap();
    let (status, body) = answer(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    let token = body["access_token"].as_str().unwrap();
    let who = http
        .get(format!("{}/WhoAmI", dataverse.api_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(who.status(), 200, "Dataverse refused the token");
    body
}

async fn refused(
    credential: &Credential,
    token_url: &str,
    client_id: &str,
    scope: &str,
) -> (u16, Value) {
    let response = credential
        .request_token(
            &reqwest::Client::new(),
            &Url::parse(token_url).unwrap(),
            client_id,
            scope,
        )
        .await
        .unwrap();
    answer(response).await
}

fn aadsts(body: &Value) -> u64 {
    body["error_codes"][0].as_u64().unwrap_or(0)
}

fn certificate(scratch: &Scratch, cert: &TestCert, algorithm: SigningAlgorithm) -> Credential {
    Credential::certificate(
        RawCertificate {
            certificate: Some(scratch.write("cert.pem", &cert.cert_pem).unwrap()),
            private_key: Some(scratch.write("key.pem", &cert.key_pem).unwrap()),
            algorithm,
            ..RawCertificate::default()
        },
        "dynamics.certificate",
    )
    .unwrap()
}

#[tokio::test]
async fn client_secret_gets_a_token_dataverse_accepts() {
    let (idp, dataverse) = stand_ins(Idp::builder()).await;
    let good = Credential::client_secret(Secret::new(idp.client_secret()), "k").unwrap();
    token_works(&good, &idp.token_url(), &idp.client_id(), &dataverse).await;
    let sent = idp.last_token_request().unwrap();
    assert_eq!(sent["grant_type"], "client_credentials");
    assert_eq!(sent["scope"], scope(&dataverse));

    let bad = Credential::client_secret(Secret::new("not-the-secret"), "k").unwrap();
    let (status, body) =
        refused(&bad, &idp.token_url(), &idp.client_id(), &scope(&dataverse)).await;
    assert_eq!((status, aadsts(&body)), (401, 7000215));
}

#[tokio::test]
async fn certificate_assertions_ps256_and_rs256_are_accepted() {
    let cert = test_cert();
    let (idp, dataverse) = stand_ins(Idp::builder().certificate(CERT_APP, &cert.der)).await;
    for algorithm in [SigningAlgorithm::PS256, SigningAlgorithm::RS256] {
        let scratch = Scratch::new("dg-cred-e2e").unwrap();
        let credential = certificate(&scratch, &cert, algorithm);
        token_works(&credential, &idp.token_url(), CERT_APP, &dataverse).await;
        let sent = idp.last_token_request().unwrap();
        assert_eq!(sent["client_assertion_type"], JWT_BEARER_ASSERTION_TYPE);
        assert!(!sent.contains_key("client_secret"));
        assert_eq!(sent["client_id"], CERT_APP);
    }
    assert_eq!(idp.issued_s2s_tokens().len(), 2);
}

#[tokio::test]
async fn an_unregistered_certificate_is_refused() {
    let registered = test_cert();
    let ours = test_cert();
    let (idp, dataverse) = stand_ins(Idp::builder().certificate(CERT_APP, &registered.der)).await;
    let scratch = Scratch::new("dg-cred-e2e").unwrap();
    let credential = certificate(&scratch, &ours, SigningAlgorithm::PS256);
    let (status, body) = refused(&credential, &idp.token_url(), CERT_APP, &scope(&dataverse)).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(aadsts(&body), 700027);
    assert!(idp.issued_s2s_tokens().is_empty());
}

#[tokio::test]
async fn a_replayed_or_misdirected_assertion_is_refused() {
    let cert = test_cert();
    let (idp, dataverse) = stand_ins(Idp::builder().certificate(CERT_APP, &cert.der)).await;
    let scratch = Scratch::new("dg-cred-e2e").unwrap();
    let credential = certificate(&scratch, &cert, SigningAlgorithm::PS256);
    token_works(&credential, &idp.token_url(), CERT_APP, &dataverse).await;

    // The same assertion sent again (as a thief who captured it would): refused.
    let sent = idp.last_token_request().unwrap();
    let http = reqwest::Client::new();
    let replay = http.post(idp.token_url()).form(&sent).send().await.unwrap();
    let (status, body) = answer(replay).await;
    assert_eq!((status, aadsts(&body)), (401, 50013), "{body}");

    // An assertion made for another token endpoint (aud) is refused here.
    let other = Idp::builder()
        .certificate(CERT_APP, &cert.der)
        .start()
        .await
        .unwrap();
    token_works(
        &credential,
        &other.token_url(),
        CERT_APP,
        &dataverse_for(&other).await,
    )
    .await;
    let for_other = other.last_token_request().unwrap();
    let misdirected = http
        .post(idp.token_url())
        .form(&for_other)
        .send()
        .await
        .unwrap();
    let (status, body) = answer(misdirected).await;
    assert_eq!((status, aadsts(&body)), (401, 700023), "{body}");

    // A tampered claim breaks the signature.
    let mut tampered = sent.clone();
    let assertion = &sent["client_assertion"];
    let mut parts: Vec<String> = assertion.split('.').map(str::to_owned).collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
    claims["jti"] = json!(uuid::Uuid::new_v4().to_string());
    claims["exp"] = json!(support::now_secs() + 600);
    parts[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
    tampered.insert("client_assertion".into(), parts.join("."));
    let (status, body) = answer(
        http.post(idp.token_url())
            .form(&tampered)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, aadsts(&body)), (401, 700027), "{body}");
}

async fn dataverse_for(idp: &IdpHandle) -> DataverseHandle {
    Dataverse::builder()
        .accept_tokens_from(idp.s2s_registry())
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn rotating_the_certificate_files_takes_effect_on_the_next_request() {
    let old = test_cert();
    let new = test_cert();
    let (idp, dataverse) = stand_ins(Idp::builder().certificate(CERT_APP, &old.der)).await;
    let scratch = Scratch::new("dg-cred-e2e").unwrap();
    let credential = certificate(&scratch, &old, SigningAlgorithm::PS256);
    token_works(&credential, &idp.token_url(), CERT_APP, &dataverse).await;

    // The operator replaces the files; Azure AD does not know the new certificate yet.
    scratch.write("cert.pem", &new.cert_pem).unwrap();
    scratch.write("key.pem", &new.key_pem).unwrap();
    let (status, body) = refused(&credential, &idp.token_url(), CERT_APP, &scope(&dataverse)).await;
    assert_eq!((status, aadsts(&body)), (401, 700027));
    let header = idp.last_token_request().unwrap()["client_assertion"]
        .split('.')
        .next()
        .map(|h| serde_json::from_slice::<Value>(&URL_SAFE_NO_PAD.decode(h).unwrap()).unwrap())
        .unwrap();
    assert_eq!(header["x5t#S256"], x5t_s256(&new.der));

    // Once it is uploaded, the same credential object works: no reload, no restart.
    idp.add_certificate(CERT_APP, &new.der);
    token_works(&credential, &idp.token_url(), CERT_APP, &dataverse).await;
}

/// The Kubernetes service-account issuer: a key and its projected tokens.
struct ServiceAccountIssuer {
    issuer: String,
    key: RsaSigningKey,
}

impl ServiceAccountIssuer {
    fn new() -> Self {
        Self {
            issuer: format!("https://oidc.prod-aks.azure.com/{}/", uuid::Uuid::new_v4()),
            key: RsaSigningKey::generate("sa-key").unwrap(),
        }
    }

    fn token(&self, subject: &str, audience: &str, exp: u64) -> String {
        let now = support::now_secs();
        self.key.sign_jwt(
            &json!({"alg": "RS256", "kid": self.key.kid()}),
            &json!({
                "aud": [audience],
                "iss": self.issuer,
                "sub": subject,
                "iat": now.min(exp.saturating_sub(60)),
                "nbf": now.min(exp.saturating_sub(60)),
                "exp": exp,
                "kubernetes.io": {"namespace": "crm", "serviceaccount": {"name": "dynamics-gateway"}},
            }),
        )
    }
}

#[tokio::test]
async fn workload_identity_federated_token_is_accepted_and_reread() {
    let sa = ServiceAccountIssuer::new();
    let (idp, dataverse) = stand_ins(
        Idp::builder()
            .federated(WI_APP, &sa.issuer, SA_SUBJECT)
            .federated_issuer_key(&sa.issuer, &sa.key),
    )
    .await;
    let scratch = Scratch::new("dg-cred-e2e").unwrap();
    let file = scratch
        .write(
            "azure-identity-token",
            sa.token(
                SA_SUBJECT,
                "api://AzureADTokenExchange",
                support::now_secs() + 3600,
            ),
        )
        .unwrap();
    let credential = Credential::workload_identity(
        RawWorkloadIdentity {
            token_file: Some(file),
            client_id: Some(WI_APP.into()),
            tenant_id: Some(idp.tenant_id()),
            authority_host: Some(idp.base_url()),
        },
        "dynamics.workload_identity",
    )
    .unwrap();
    let token_url = credential.default_token_url(None).unwrap();
    assert_eq!(token_url.as_str(), idp.token_url());
    assert_eq!(credential.default_client_id(), Some(WI_APP));
    token_works(&credential, token_url.as_str(), WI_APP, &dataverse).await;

    // Kubelet rotates the file: the next request sends the new token (the same one may
    // be sent again: federated tokens are not single-use).
    let rotated = sa.token(
        SA_SUBJECT,
        "api://AzureADTokenExchange",
        support::now_secs() + 7200,
    );
    scratch.write("azure-identity-token", &rotated).unwrap();
    token_works(&credential, token_url.as_str(), WI_APP, &dataverse).await;
    assert_eq!(
        idp.last_token_request().unwrap()["client_assertion"],
        rotated
    );

    let cases = [
        // Expired (kubelet stopped rotating it).
        (
            sa.token(
                SA_SUBJECT,
                "api://AzureADTokenExchange",
                support::now_secs() - 10,
            ),
            700024,
        ),
        // Another service account.
        (
            sa.token(
                "system:serviceaccount:crm:other",
                "api://AzureADTokenExchange",
                support::now_secs() + 3600,
            ),
            70021,
        ),
        // Projected for another audience.
        (
            sa.token(
                SA_SUBJECT,
                "https://kubernetes.default.svc",
                support::now_secs() + 3600,
            ),
            700212,
        ),
    ];
    for (token, code) in cases {
        scratch.write("azure-identity-token", &token).unwrap();
        let (status, body) =
            refused(&credential, token_url.as_str(), WI_APP, &scope(&dataverse)).await;
        assert_eq!((status, aadsts(&body)), (401, code), "{body}");
    }

    // Signed by a key that is not the issuer's.
    let forger = ServiceAccountIssuer {
        issuer: sa.issuer.clone(),
        key: RsaSigningKey::generate("sa-key").unwrap(),
    };
    scratch
        .write(
            "azure-identity-token",
            forger.token(
                SA_SUBJECT,
                "api://AzureADTokenExchange",
                support::now_secs() + 3600,
            ),
        )
        .unwrap();
    let (status, body) = refused(&credential, token_url.as_str(), WI_APP, &scope(&dataverse)).await;
    assert_eq!((status, aadsts(&body)), (401, 700027), "{body}");
}

#[tokio::test]
async fn managed_identity_gets_a_token_from_imds() {
    let idp = Idp::builder().start().await.unwrap();
    let dataverse = dataverse_for(&idp).await;
    let imds = Imds::builder()
        .registry(idp.s2s_registry())
        .user_assigned("77777777-0000-4000-8000-000000000001")
        .start()
        .await
        .unwrap();
    let system = Credential::managed_identity(
        RawManagedIdentity {
            endpoint: imds.url(),
            client_id: None,
        },
        "dynamics.managed_identity",
    )
    .unwrap();
    // token_url and client_id are not IMDS's business: they are ignored.
    let body = token_works(
        &system,
        "https://unused.invalid/token",
        "unused",
        &dataverse,
    )
    .await;
    assert_eq!(body["expires_in"], "3599");
    assert_eq!(body["resource"], dataverse.url());
    let request = &imds.requests()[0];
    assert_eq!(request.method, "GET");
    assert_eq!(request.metadata.as_deref(), Some("true"));
    assert_eq!(request.query["api-version"], "2018-02-01");
    assert_eq!(request.query["resource"], dataverse.url());
    assert!(!request.query.contains_key("client_id"));
    assert_eq!(idp.token_requests(), 0);

    let user = Credential::managed_identity(
        RawManagedIdentity {
            endpoint: imds.url(),
            client_id: Some("77777777-0000-4000-8000-000000000001".into()),
        },
        "dynamics.managed_identity",
    )
    .unwrap();
    let body = token_works(&user, "https://unused.invalid/token", "unused", &dataverse).await;
    assert_eq!(body["client_id"], "77777777-0000-4000-8000-000000000001");

    let unknown = Credential::managed_identity(
        RawManagedIdentity {
            endpoint: imds.url(),
            client_id: Some("88888888-0000-4000-8000-000000000001".into()),
        },
        "dynamics.managed_identity",
    )
    .unwrap();
    let (status, body) =
        refused(&unknown, "https://unused.invalid/", "x", &scope(&dataverse)).await;
    assert_eq!(status, 400);
    assert_eq!(body["error_description"], "Identity not found");
}

#[tokio::test]
async fn imds_requires_the_metadata_header_and_its_failures_reach_the_refresher() {
    let imds = Imds::builder().start().await.unwrap();
    let http = reqwest::Client::new();
    let mut url = Url::parse(&imds.url()).unwrap();
    url.query_pairs_mut()
        .append_pair("api-version", "2018-02-01")
        .append_pair("resource", "https://org.crm.dynamics.com");
    let without = http.get(url).send().await.unwrap();
    let (status, body) = answer(without).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_request");
    assert!(imds.issued_tokens().is_empty());

    let credential = Credential::managed_identity(
        RawManagedIdentity {
            endpoint: imds.url(),
            client_id: None,
        },
        "mi",
    )
    .unwrap();
    let ask = || async {
        credential
            .request_token(
                &http,
                &Url::parse("https://unused.invalid/").unwrap(),
                "unused",
                "https://org.crm.dynamics.com/.default",
            )
            .await
            .unwrap()
    };
    // 410: IMDS is being updated; the response carries a Retry-After for the refresher.
    imds.set_status_next(1, 410);
    let gone = ask().await;
    assert_eq!(gone.status(), 410);
    let retry_after: u64 = gone.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=70).contains(&retry_after));
    // 429 and 5xx pass through as they are, for the refresher's backoff.
    imds.set_status_next(2, 429);
    assert_eq!(ask().await.status(), 429);
    assert_eq!(ask().await.status(), 429);
    assert_eq!(ask().await.status(), 200);
    assert_eq!(imds.issued_tokens().len(), 1);
}

/// The gateway with `credential_yaml` (lines under `dynamics:`), serving Alice.
async fn gateway_with(
    idp: &IdpHandle,
    dataverse: &DataverseHandle,
    client_id: &str,
    credential_yaml: &str,
) -> support::GatewayHandle {
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:1\n  admin_listen: 127.0.0.1:2\n\
inbound:\n  issuers:\n    - issuer: {issuer}\n      audiences: [{aud}]\n\
dynamics:\n  url: {url}\n  tenant_id: {tenant}\n  client_id: {client_id}\n  token_url: {token_url}\n{credential_yaml}",
        issuer = idp.issuer(),
        aud = idp.audience(),
        url = dataverse.url(),
        tenant = idp.tenant_id(),
        token_url = idp.token_url(),
    );
    let gateway = support::start_gateway(&yaml).await;
    gateway.wait_ready().await;
    gateway
}

async fn whoami_through(gateway: &support::GatewayHandle, idp: &IdpHandle) -> u16 {
    support::get(
        gateway,
        "/api/data/v9.2/WhoAmI",
        idp.token_for(support::ALICE_OID),
    )
    .await
    .status()
    .as_u16()
}

#[tokio::test]
async fn the_gateway_runs_with_each_secretless_credential() {
    let alice = [DirectoryUser::new(support::ALICE_OID, support::ALICE_EMAIL)];
    let scratch = Scratch::new("dg-cred-e2e").unwrap();

    // Certificate: files re-read at each token request.
    let cert = test_cert();
    let (idp, dataverse) =
        stand_ins_knowing(Idp::builder().certificate(CERT_APP, &cert.der), &alice).await;
    let cert_path = scratch.write("gw-cert.pem", &cert.cert_pem).unwrap();
    let key_path = scratch.write("gw-key.pem", &cert.key_pem).unwrap();
    let gateway = gateway_with(
        &idp,
        &dataverse,
        CERT_APP,
        &format!(
            "  certificate: {{ certificate: {}, private_key: {} }}\n",
            cert_path.display(),
            key_path.display()
        ),
    )
    .await;
    assert_eq!(whoami_through(&gateway, &idp).await, 200);
    let form = idp.last_token_request().unwrap();
    assert_eq!(
        form.get("client_assertion_type").map(String::as_str),
        Some(JWT_BEARER_ASSERTION_TYPE)
    );
    assert!(!form.contains_key("client_secret"));

    // Workload identity: the projected service-account token is the assertion.
    let sa = ServiceAccountIssuer::new();
    let (idp, dataverse) = stand_ins_knowing(
        Idp::builder()
            .federated(WI_APP, &sa.issuer, SA_SUBJECT)
            .federated_issuer_key(&sa.issuer, &sa.key),
        &alice,
    )
    .await;
    let token_file = scratch
        .write(
            "gw-azure-identity-token",
            sa.token(
                SA_SUBJECT,
                "api://AzureADTokenExchange",
                support::now_secs() + 3600,
            ),
        )
        .unwrap();
    let gateway = gateway_with(
        &idp,
        &dataverse,
        WI_APP,
        &format!(
            "  workload_identity: {{ token_file: {} }}\n",
            token_file.display()
        ),
    )
    .await;
    assert_eq!(whoami_through(&gateway, &idp).await, 200);

    // Managed identity: the instance metadata service.
    let (idp, dataverse) = stand_ins_knowing(Idp::builder(), &alice).await;
    let imds = Imds::builder()
        .registry(idp.s2s_registry())
        .start()
        .await
        .unwrap();
    let gateway = gateway_with(
        &idp,
        &dataverse,
        "unused",
        &format!("  managed_identity: {{ endpoint: {} }}\n", imds.url()),
    )
    .await;
    assert_eq!(whoami_through(&gateway, &idp).await, 200);
    assert_eq!(
        idp.token_requests(),
        0,
        "managed identity never calls the token endpoint"
    );
    assert!(!imds.requests().is_empty());
}
