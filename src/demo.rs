//! `dynamics-gateway demo`: the real gateway, on loopback, in front of the testkit's
//! stand-in Dataverse and local identity provider, with a caller token ready to use. The
//! token is written to a file (mode 0600) rather than printed, like every token.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::net::TcpListener;

use dynamics_gateway::config::Config;
use testkit::{gateway_config_yaml, ConfigParts, Dataverse, DirectoryUser, Idp};

/// The demo's caller: Alice, a user of the stand-in organisation.
pub const DEMO_OID: &str = "9f2c4c1e-5d7a-4b8e-a6c3-0d1e2f3a4b5c";

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot listen on {addr}; pass --port to choose another port")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the stand-in services")]
    Standins(#[source] std::io::Error),
    #[error("cannot write the demo token file {path}")]
    TokenFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("demo config")]
    Config(#[from] dynamics_gateway::config::ConfigError),
    #[error(transparent)]
    Start(#[from] dynamics_gateway::StartError),
}

/// Runs the demo until `shutdown` completes.
pub async fn run(
    port: u16,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DemoError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], port.wrapping_add(1)));
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| DemoError::Bind { addr, source })?;
    let admin = TcpListener::bind(admin_addr)
        .await
        .map_err(|source| DemoError::Bind {
            addr: admin_addr,
            source,
        })?;

    let idp = Idp::builder().start().await.map_err(DemoError::Standins)?;
    let alice = DirectoryUser::new(DEMO_OID, "alice@contoso.example");
    let dataverse = Dataverse::builder()
        .accept_tokens_from(idp.s2s_registry())
        .user(alice.clone())
        .start()
        .await
        .map_err(DemoError::Standins)?;
    let parts = ConfigParts {
        identity: "identity:\n  mode: caller_object_id\n  claim: oid\n".into(),
        ..ConfigParts::default()
    };
    let config = Config::from_yaml(
        &gateway_config_yaml(&idp, &dataverse.url(), &parts),
        &|_| None,
    )?;

    let token_path = write_token(&idp.token_for(DEMO_OID))?;
    let gateway = format!("http://{addr}");
    let token = format!("$(cat {})", token_path.display());
    let (issuer, dataverse_url, path) = (idp.issuer(), dataverse.url(), token_path.display());
    let auth = format!("-H \"Authorization: Bearer {token}\"");
    let lines = [
        String::new(),
        "dynamics-gateway demo: the real gateway in front of a stand-in Dataverse and a local identity provider".into(),
        String::new(),
        format!("  gateway              {gateway}"),
        format!("  admin                http://{admin_addr}/readyz  /metrics  /healthz"),
        format!("  identity provider    {issuer}"),
        format!("  stand-in Dataverse   {dataverse_url}  (it accepts only the gateway's S2S token)"),
        String::new(),
        format!("A caller token for Alice (oid {DEMO_OID}, valid 1 hour) is in {path}. Try:"),
        String::new(),
        format!("  curl -s {gateway}/api/data/v9.2/WhoAmI {auth}"),
        format!("  curl -s '{gateway}/api/data/v9.2/accounts?$select=name' {auth} -H 'Prefer: odata.maxpagesize=2'"),
        format!("  curl -si {gateway}/api/data/v9.2/accounts {auth} -H 'Content-Type: application/json' -d '{{\"name\":\"Demo Ltd\"}}'"),
        format!("  curl -si {gateway}/api/data/v9.2/accounts          # no token: 401"),
        format!("  curl -s http://{admin_addr}/metrics | grep dynamics_gateway_requests_total"),
        String::new(),
        format!(
            "WhoAmI answers Alice's systemuserid ({}) because the gateway sent CallerObjectId. Ctrl-C stops everything.",
            alice.systemuserid
        ),
        String::new(),
    ];
    let text = lines.join("\n");
    let _ = std::io::stdout().write_all(text.as_bytes());
    let _ = std::io::stdout().flush();
    dynamics_gateway::run(config, listener, admin, shutdown).await?;
    Ok(())
}

/// Writes the caller token where only this user can read it.
fn write_token(token: &str) -> Result<PathBuf, DemoError> {
    let dir = std::env::temp_dir().join("dynamics-gateway-demo");
    let path = dir.join("alice.jwt");
    let err = |source| DemoError::TokenFile {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(err)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&path).map_err(err)?;
    file.write_all(token.as_bytes()).map_err(err)?;
    Ok(path)
}
