//! End to end with Microsoft's own client: the Python SDK `powerplatform-dataverse-client`
//! (pinned in tests/e2e-python/requirements.txt) runs an app's workload
//! (tests/e2e-python/workload.py) through the gateway over TLS, and the same workload runs
//! straight against the stand-in Dataverse (behind a TLS front: the SDK refuses `http://`).
//! What the app saw must be the same both ways; what Dataverse saw must be the gateway's
//! S2S token impersonating the caller, never the caller's token or the gateway's URLs.
//!
//! The SDK uses `requests`, which asks for gzip on every call, and the stand-in compresses
//! when asked: this is the proof that compressed answers come back with links the app can
//! follow (`OData-EntityId`, `@odata.nextLink`, `$batch` parts).
//!
//! Python 3 is part of CI's machine, so a missing `python3` fails the test; the SDK is
//! installed here into a virtual environment under the target directory when absent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;
use crate::support::client_script;
use crate::support::pki;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use client_script::{install, run_summary};
use pki::Pki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use support::ALICE_OID;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

/// Longest one workload run may take; it makes a few dozen local requests.
const WORKLOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// Creating the virtual environment and installing the pinned wheels.
const PIP_TIMEOUT: Duration = Duration::from_secs(600);

fn e2e_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e-python")
}

/// The virtual environment with the pinned requirements installed: made once, and again
/// whenever requirements.txt changes (its copy in the environment is the marker).
async fn python_with_sdk() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-sdk-venv");
    let requirements = std::fs::read_to_string(e2e_dir().join("requirements.txt")).unwrap();
    let marker = venv.join("requirements.installed");
    let python = venv.join("bin/python");
    if std::fs::read_to_string(&marker).is_ok_and(|installed| installed == requirements)
        && python.exists()
    {
        return python;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let mut create = Command::new("python3");
    create.arg("-m").arg("venv").arg(&venv);
    install(
        create,
        "`python3 -m venv` (this test needs Python 3 with venv, e.g. `apt-get install python3-venv`)",
        PIP_TIMEOUT,
    )
    .await;
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-input",
        "-r",
    ])
    .arg(e2e_dir().join("requirements.txt"));
    install(
        pip,
        "`pip install -r tests/e2e-python/requirements.txt`",
        PIP_TIMEOUT,
    )
    .await;
    std::fs::write(&marker, requirements).unwrap();
    python
}

async fn run_workload(python: &Path, pki: &Pki, base_url: &str, token: &str) -> Value {
    let mut cmd = Command::new(python);
    cmd.arg("workload.py")
        .current_dir(e2e_dir())
        .env("DATAVERSE_URL", base_url)
        .env("BEARER_TOKEN", token)
        .env("REQUESTS_CA_BUNDLE", pki.path("ca.pem"))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    run_summary(cmd, "workload.py", token, WORKLOAD_TIMEOUT).await
}

/// Terminates TLS on a loopback port and relays each connection to `backend` as is: the
/// stand-in Dataverse over HTTPS, as the SDK insists on, for the run that skips the
/// gateway.
async fn tls_front(pki: &Pki, backend: SocketAddr) -> SocketAddr {
    let pair = pki.server("stand-in front");
    let certificates = CertificateDer::pem_slice_iter(pair.certificate.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pair.private_key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certificates, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(backend).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn microsofts_python_sdk_sees_the_same_dataverse_through_the_gateway_over_tls() {
    let python = python_with_sdk().await;
    let pki = Pki::new("python-sdk");
    pki.install(&pki.server("gateway"));
    let env = support::env()
        .server(&pki.server_yaml(false, "1s"))
        .start()
        .await;
    let gateway_url = format!("https://127.0.0.1:{}", env.gateway.addr.port());
    let caller_token = env.idp.token_for(ALICE_OID);

    let through_gateway = run_workload(&python, &pki, &gateway_url, &caller_token).await;

    // The app only ever called the gateway: every link it followed named the gateway.
    assert_eq!(
        through_gateway["other_origins"],
        serde_json::json!([]),
        "{through_gateway}"
    );
    assert_eq!(through_gateway["asked_for_gzip"], true, "{through_gateway}");
    assert!(
        through_gateway["response_encodings"]
            .as_array()
            .unwrap()
            .contains(&Value::from("gzip")),
        "answers came back compressed, links rewritten inside: {through_gateway}"
    );
    assert_eq!(
        through_gateway["batch"]["errors"], false,
        "{through_gateway}"
    );
    for mode in ["small", "chunk"] {
        let file = &through_gateway["files"][mode];
        assert_eq!(file["status"], 200, "{mode}: {through_gateway}");
        assert_eq!(file["intact"], true, "{mode}: {through_gateway}");
        assert_eq!(file["name"], format!("{mode}.bin"), "{through_gateway}");
    }
    assert!(
        through_gateway["pages"].as_array().unwrap().len() >= 3,
        "paging followed nextLinks: {through_gateway}"
    );

    // What Dataverse saw: the gateway's S2S token impersonating Alice, and never the
    // caller's token or the gateway's address, in any header, URL or body.
    let requests = env.dataverse.requests();
    let s2s = support::s2s_bearers(&env.idp);
    let gateway_authority = format!("127.0.0.1:{}", env.gateway.addr.port());
    assert!(requests.len() >= 15, "{} requests", requests.len());
    for r in &requests {
        let line = format!("{} {}", r.method, r.path_and_query);
        if !r.path_and_query.contains("systemusers") {
            assert_eq!(r.header("callerobjectid"), Some(ALICE_OID), "{line}");
        }
        assert!(
            s2s.iter()
                .any(|t| Some(t.as_str()) == r.header("authorization")),
            "{line}: not an S2S bearer"
        );
        let body = r.body_text();
        assert!(
            !format!("{:?}", r.headers).contains(&caller_token) && !body.contains(&caller_token),
            "{line}: the caller's token reached Dataverse"
        );
        assert!(!r.path_and_query.contains(&gateway_authority), "{line}");
        assert!(!body.contains(&gateway_authority), "{line}: {body}");
    }
    // The chunked upload followed the Location Dataverse named, rewritten to the gateway
    // and back: its session token arrived with every chunk.
    let chunks = requests
        .iter()
        .filter(|r| r.method == http::Method::PATCH && r.path_and_query.contains("sessiontoken="))
        .count();
    assert_eq!(chunks, 3, "9 MiB in 4 MiB chunks");
    // requests asked for gzip; the stand-in answered compressed, so the links above
    // were rewritten inside compressed bodies.
    assert!(
        requests.iter().any(|r| r
            .header("accept-encoding")
            .is_some_and(|a| a.contains("gzip"))),
        "the gateway offered Dataverse no compression"
    );

    // The same workload straight against the stand-in, as the application user.
    let front = tls_front(&pki, env.dataverse.addr()).await;
    let front_url = format!("https://127.0.0.1:{}", front.port());
    env.dataverse.set_link_origin(&front_url);
    let s2s_token = env.idp.issued_s2s_tokens().last().unwrap().clone();
    let direct = run_workload(&python, &pki, &front_url, &s2s_token).await;

    eprintln!("through the gateway: {through_gateway}");
    assert_eq!(
        through_gateway, direct,
        "the app saw a different Dataverse through the gateway"
    );
}
