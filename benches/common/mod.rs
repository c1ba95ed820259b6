//! Shared fixtures of the criterion benches: three signing keys (RS256, PS256, ES256), a
//! JWKS served on 127.0.0.1 by a tiny hyper server, and a real `Gateway` configured to
//! trust it, with its key cache loaded, so the benches run the gateway's own code paths.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use dynamics_gateway::config::Config;
use dynamics_gateway::Gateway;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use testkit::keys::{EcSigningKey, RsaSigningKey};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

pub const AUDIENCE: &str = "api://dynamics-gateway";
pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
pub const CALLER_OID: &str = "9f2c4c1e-5d7a-4b8e-a6c3-0d1e2f3a4b5c";

/// The three algorithms the benches compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Ps256,
    Es256,
}

impl Alg {
    pub const ALL: [Alg; 3] = [Alg::Rs256, Alg::Ps256, Alg::Es256];

    pub fn name(self) -> &'static str {
        match self {
            Alg::Rs256 => "RS256",
            Alg::Ps256 => "PS256",
            Alg::Es256 => "ES256",
        }
    }

    fn kid(self) -> &'static str {
        match self {
            Alg::Rs256 => "bench-rs256",
            Alg::Ps256 => "bench-ps256",
            Alg::Es256 => "bench-es256",
        }
    }
}

/// One key per algorithm, each published with its JWK `alg` pinned.
pub struct Keys {
    pub rs256: RsaSigningKey,
    pub ps256: RsaSigningKey,
    pub es256: EcSigningKey,
}

impl Keys {
    pub fn generate() -> Self {
        Self {
            rs256: RsaSigningKey::generate(Alg::Rs256.kid()).unwrap(),
            ps256: RsaSigningKey::generate(Alg::Ps256.kid()).unwrap(),
            es256: EcSigningKey::generate(Alg::Es256.kid()).unwrap(),
        }
    }

    pub fn jwks(&self) -> Value {
        json!({"keys": [
            self.rs256.jwk_for_alg("RS256"),
            self.ps256.jwk_for_alg("PS256"),
            self.es256.jwk(),
        ]})
    }

    /// A caller token like Entra ID's v2 access tokens; `uti` makes each one unique.
    pub fn token(&self, alg: Alg, issuer: &str) -> String {
        let header = json!({"alg": alg.name(), "typ": "JWT", "kid": alg.kid()});
        let claims = claims(issuer);
        match alg {
            Alg::Rs256 => self.rs256.sign_jwt(&header, &claims),
            Alg::Ps256 => self.ps256.sign_jwt_ps256(&header, &claims),
            Alg::Es256 => self.es256.sign_jwt(&header, &claims),
        }
    }
}

fn claims(issuer: &str) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({
        "aud": AUDIENCE,
        "iss": issuer,
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "azp": "00000000-0000-0000-0000-00000000ca11",
        "azpacr": "0",
        "name": "Alice Bench",
        "oid": CALLER_OID,
        "preferred_username": "alice@contoso.example",
        "scp": "user_impersonation",
        "sub": "l3_roISQU222bULS9yi2k0XpqpOiMz5H3ZACo1GeXA",
        "tid": TENANT,
        "uti": uuid::Uuid::new_v4().simple().to_string(),
        "ver": "2.0",
    })
}

/// Request headers carrying `Authorization: Bearer <token>`.
pub fn bearer_headers(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    headers
}

/// A gateway whose only issuer's keys come from a local JWKS, ready to verify tokens.
pub struct Fixture {
    pub rt: Runtime,
    pub keys: Keys,
    pub issuer: String,
    pub gateway: Gateway,
    stop: CancellationToken,
}

impl Fixture {
    pub fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let keys = Keys::generate();
        let jwks = Bytes::from(keys.jwks().to_string());
        let addr = rt.block_on(serve_static(jwks));
        let issuer = format!("http://{addr}/{TENANT}/v2.0");
        let yaml = format!(
            "server:\n  listen: 127.0.0.1:1\n  admin_listen: 127.0.0.1:2\n\
inbound:\n  issuers:\n    - issuer: {issuer}\n      audiences: [{AUDIENCE}]\n      algorithms: [RS256, PS256, ES256]\n      jwks_uri: http://{addr}/keys\n\
identity:\n  mode: caller_object_id\n\
dynamics:\n  url: https://contoso.crm.dynamics.com\n  tenant_id: {TENANT}\n  client_id: bench\n  client_secret: bench-secret\n  token_url: http://127.0.0.1:9/token\n"
        );
        let config = Config::from_yaml(&yaml, &|_| None).unwrap();
        let stop = CancellationToken::new();
        let gateway = rt.block_on(async {
            let metrics = dynamics_gateway::metrics::Metrics::new().unwrap();
            let draining = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let gateway = Gateway::new(&config, metrics, draining).unwrap();
            for cache in gateway.pipeline.inbound.caches() {
                tokio::spawn(cache.clone().run(stop.clone()));
            }
            let started = std::time::Instant::now();
            while !gateway.pipeline.inbound.caches().all(|c| c.is_ready()) {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "JWKS not loaded"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            gateway
        });
        Self {
            rt,
            keys,
            issuer,
            gateway,
            stop,
        }
    }

    pub fn token(&self, alg: Alg) -> String {
        self.keys.token(alg, &self.issuer)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves `body` as `application/json` for any request, on an ephemeral loopback port.
async fn serve_static(body: Bytes) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        let mut resp = Response::new(Full::new(body));
                        resp.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}
