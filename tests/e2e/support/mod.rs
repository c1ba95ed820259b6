//! Shared fixtures for the end-to-end tests: a local identity provider, a stand-in
//! Dataverse and the real gateway, each on an ephemeral 127.0.0.1 port, wired together.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod binary;
pub mod client_script;
pub mod pki;

use std::net::SocketAddr;
use std::time::Duration;

use dynamics_gateway::config::Config;
use testkit::{
    gateway_config_yaml, ConfigParts, Dataverse, DataverseHandle, DirectoryUser, Idp, IdpHandle,
    Throttling, TokenEndpointMode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ALICE_OID: &str = "9f2c4c1e-5d7a-4b8e-a6c3-0d1e2f3a4b5c";
pub const BOB_OID: &str = "1b4e28ba-2fa1-41d2-883f-0016d3cca427";
pub const ALICE_EMAIL: &str = "alice@contoso.example";
pub const ALICE_SYSTEMUSERID: &str = "3f2504e0-4f89-11d3-9a0c-0305e82c3301";
/// The `identity:` section that looks each caller up by object id (Alice is in the
/// stand-in's directory).
pub const CALLER_OBJECT_ID: &str = "identity:\n  mode: caller_object_id\n";

/// The time now in seconds since 1970, as JWT claims (`exp`, `iat`, `nbf`) carry it.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An identity provider, and a Dataverse that accepts its tokens, knows Alice (as
/// [`ALICE_SYSTEMUSERID`]) and throttles as `throttling` says.
pub async fn stand_ins(throttling: Throttling) -> (IdpHandle, DataverseHandle) {
    let idp = Idp::builder().start().await.unwrap();
    let alice = DirectoryUser {
        systemuserid: ALICE_SYSTEMUSERID.into(),
        ..DirectoryUser::new(ALICE_OID, ALICE_EMAIL)
    };
    let dataverse = Dataverse::builder()
        .accept_tokens_from(idp.s2s_registry())
        .user(alice)
        .throttling(throttling)
        .start()
        .await
        .unwrap();
    (idp, dataverse)
}

/// Dataverse's concurrency limit: at most `n` requests at once, the rest 429 with a 1 s
/// `Retry-After`.
pub fn at_most(n: usize) -> Throttling {
    Throttling {
        max_concurrent: Some(n),
        concurrency_retry_after: Duration::from_secs(1),
        ..Throttling::default()
    }
}

/// A running identity provider, stand-in Dataverse and gateway.
pub struct Env {
    pub idp: IdpHandle,
    pub dataverse: DataverseHandle,
    pub gateway: GatewayHandle,
    pub alice: DirectoryUser,
    pub bob_disabled: DirectoryUser,
}

impl Env {
    /// Waits until the gateway has asked the identity provider for its first S2S token.
    pub async fn first_token_request(&self) {
        eventually("the first S2S token request", || async {
            self.idp.token_requests() > 0
        })
        .await;
    }
}

/// A running gateway; dropping it shuts the gateway down.
pub struct GatewayHandle {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl GatewayHandle {
    /// `http://127.0.0.1:port`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// GET the admin `/readyz`.
    pub async fn readyz(&self) -> reqwest::Response {
        readyz_at(&self.admin_url()).await.unwrap()
    }

    /// Waits until `/readyz` answers 200 (at most 10 s).
    pub async fn wait_ready(&self) {
        for _ in 0..200 {
            if is_ready(&self.admin_url()).await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway did not become ready within 10s");
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("gateway task");
        }
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// What a test does to the stand-in Dataverse before the gateway starts.
type DataverseSetup = Box<dyn FnOnce(&DataverseHandle)>;

/// Builds an environment; `.identity(...)`/`.edit(...)` change the generated config.
pub struct EnvBuilder {
    identity: String,
    server_extra: String,
    inbound_extra: String,
    dynamics_extra: String,
    idp: Idp,
    token_endpoint: Option<TokenEndpointMode>,
    idp_down: bool,
    dataverse_setup: Option<DataverseSetup>,
}

pub fn env() -> EnvBuilder {
    EnvBuilder {
        identity: CALLER_OBJECT_ID.into(),
        server_extra: String::new(),
        inbound_extra: "  jwks_refetch_interval: 0s\n".into(),
        dynamics_extra: String::new(),
        idp: Idp::builder(),
        token_endpoint: None,
        idp_down: false,
        dataverse_setup: None,
    }
}

impl EnvBuilder {
    /// Replaces the whole `identity:` section.
    pub fn identity(mut self, yaml: &str) -> Self {
        self.identity = yaml.into();
        self
    }

    /// Extra lines under `server:` (two-space indented).
    pub fn server(mut self, yaml: &str) -> Self {
        self.server_extra.push_str(yaml);
        self
    }

    /// Replaces extra lines under `inbound:` (default `jwks_refetch_interval: 0s`).
    pub fn inbound(mut self, yaml: &str) -> Self {
        self.inbound_extra = yaml.into();
        self
    }

    /// Extra lines under `dynamics:` (two-space indented).
    pub fn dynamics(mut self, yaml: &str) -> Self {
        self.dynamics_extra.push_str(yaml);
        self
    }

    /// The token endpoint's behaviour from before the gateway starts.
    pub fn token_endpoint(mut self, mode: TokenEndpointMode) -> Self {
        self.token_endpoint = Some(mode);
        self
    }

    /// The identity provider answers 503 to everything from before the gateway starts.
    pub fn idp_down(mut self) -> Self {
        self.idp_down = true;
        self
    }

    /// Sets the stand-in Dataverse up once it runs, before the gateway starts (e.g. a
    /// failing `$metadata` the gateway meets on its first fetch).
    pub fn dataverse_setup(mut self, f: impl FnOnce(&DataverseHandle) + 'static) -> Self {
        self.dataverse_setup = Some(Box::new(f));
        self
    }

    pub fn idp(mut self, f: impl FnOnce(Idp) -> Idp) -> Self {
        self.idp = f(self.idp);
        self
    }

    /// Starts IdP, Dataverse (with Alice and a disabled Bob) and the gateway, and waits
    /// until the gateway is ready.
    pub async fn start(self) -> Env {
        let env = self.start_unready().await;
        env.gateway.wait_ready().await;
        env
    }

    /// As `start`, without waiting for readiness.
    pub async fn start_unready(self) -> Env {
        let idp = self.idp.start().await.expect("idp");
        if let Some(mode) = self.token_endpoint {
            idp.set_token_endpoint_mode(mode);
        }
        if self.idp_down {
            idp.set_available(false);
        }
        let alice = DirectoryUser {
            systemuserid: ALICE_SYSTEMUSERID.into(),
            ..DirectoryUser::new(ALICE_OID, ALICE_EMAIL)
        };
        let bob_disabled = DirectoryUser::new(BOB_OID, "bob@contoso.example").disabled(true);
        let dataverse = Dataverse::builder()
            .accept_tokens_from(idp.s2s_registry())
            .user(alice.clone())
            .user(bob_disabled.clone())
            .start()
            .await
            .expect("dataverse");
        if let Some(setup) = self.dataverse_setup {
            setup(&dataverse);
        }
        let parts = ConfigParts {
            identity: self.identity,
            server: self.server_extra,
            inbound: self.inbound_extra,
            dynamics: self.dynamics_extra,
        };
        let yaml = gateway_config_yaml(&idp, &dataverse.url(), &parts);
        let gateway = start_gateway(&yaml).await;
        Env {
            idp,
            dataverse,
            gateway,
            alice,
            bob_disabled,
        }
    }
}

/// The config text the tests run with.
pub fn config_yaml(
    idp: &IdpHandle,
    dataverse_url: &str,
    identity: &str,
    server: &str,
    inbound: &str,
) -> String {
    let parts = ConfigParts {
        identity: identity.into(),
        server: server.into(),
        inbound: inbound.into(),
        dynamics: String::new(),
    };
    gateway_config_yaml(idp, dataverse_url, &parts)
}

/// Runs the real gateway (`dynamics_gateway::run`) on ephemeral ports.
pub async fn start_gateway(yaml: &str) -> GatewayHandle {
    let config = Config::from_yaml(yaml, &|_| None).expect("test config is valid");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let addr = listener.local_addr().expect("addr");
    let admin_addr = admin.local_addr().expect("admin addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        dynamics_gateway::run(config, listener, admin, async {
            let _ = rx.await;
        })
        .await
        .expect("gateway run");
    });
    GatewayHandle {
        addr,
        admin_addr,
        shutdown: Some(tx),
        task: Some(task),
    }
}

/// An HTTP client that never uses a proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// Sends raw bytes and returns the raw response (up to the connection closing or 5 s).
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// The `{"error":{"code","message"}}` body of a gateway error, checked for shape.
pub async fn error_body(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let json: serde_json::Value = response.json().await.expect("error body is JSON");
    let code = json["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_string();
    let message = json["error"]["message"]
        .as_str()
        .expect("error.message")
        .to_string();
    (status, code, message)
}

/// Checks that `response` is the gateway's error `status` with `code` (and the error
/// body's shape); returns its message.
pub async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> String {
    let (got_status, got_code, message) = error_body(response).await;
    assert_eq!((got_status, got_code.as_str()), (status, code), "{message}");
    message
}

/// The `WWW-Authenticate` challenge of a response (the test fails if there is none).
pub fn challenge(response: &reqwest::Response) -> String {
    response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string()
}

/// The `Authorization` values of every S2S token `idp` issued, as Dataverse receives them.
pub fn s2s_bearers(idp: &IdpHandle) -> Vec<String> {
    idp.issued_s2s_tokens()
        .iter()
        .map(|t| format!("Bearer {t}"))
        .collect()
}

/// POSTs `body` to `path` on the gateway with a bearer token and a `Content-Type`.
pub async fn post(
    gateway: &GatewayHandle,
    path: &str,
    token: impl std::fmt::Display,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    client()
        .post(format!("{}{path}", gateway.url()))
        .bearer_auth(token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Sends `request` and reads the answer's body as text, whatever its status.
pub async fn text_of(request: reqwest::RequestBuilder) -> String {
    request.send().await.unwrap().text().await.unwrap()
}

/// Sends `request` and reads the answer's body as JSON, whatever its status.
pub async fn json_of(request: reqwest::RequestBuilder) -> serde_json::Value {
    request.send().await.unwrap().json().await.unwrap()
}

/// The Prometheus text an admin listener serves at `/metrics`.
pub async fn metrics_text(admin_url: &str) -> String {
    text_of(client().get(format!("{admin_url}/metrics"))).await
}

/// Polls `condition` until it holds, failing the test after 10 s: for state the gateway
/// reaches in the background (a fetch, a refresh), never as a measure of time.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..400 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what}: not within 10s");
}

/// GET `/readyz` on the admin listener at `admin_url`.
pub async fn readyz_at(admin_url: &str) -> reqwest::Result<reqwest::Response> {
    client().get(format!("{admin_url}/readyz")).send().await
}

/// Whether the admin listener at `admin_url` answers `/readyz` with 200 (not listening
/// yet counts as not ready).
pub async fn is_ready(admin_url: &str) -> bool {
    matches!(readyz_at(admin_url).await, Ok(r) if r.status() == 200)
}

/// The text `/readyz` answers.
pub async fn readyz_text(gateway: &GatewayHandle) -> String {
    gateway.readyz().await.text().await.unwrap()
}

/// The value of one sample in the Prometheus text (`name{labels}` exactly), or 0.
pub async fn metric(gateway: &GatewayHandle, series: &str) -> f64 {
    metric_at(&gateway.admin_url(), series).await
}

/// [`metric`] from the admin listener at `admin_url`.
pub async fn metric_at(admin_url: &str, series: &str) -> f64 {
    let text = metrics_text(admin_url).await;
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// GET `path` on the gateway with a bearer token.
pub async fn get(
    gateway: &GatewayHandle,
    path: &str,
    token: impl std::fmt::Display,
) -> reqwest::Response {
    client()
        .get(format!("{}{path}", gateway.url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// `n` concurrent GETs of `path` with one token; their statuses.
pub async fn concurrent_gets(
    gateway: &GatewayHandle,
    path: &str,
    token: &str,
    n: usize,
) -> Vec<u16> {
    let client = client();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let request = client
                .get(format!("{}{path}", gateway.url()))
                .bearer_auth(token);
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::with_capacity(n);
    for task in tasks {
        statuses.push(task.await.unwrap());
    }
    statuses
}
