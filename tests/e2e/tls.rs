//! TLS on the app port (`server.tls`): HTTPS over HTTP/1.1 and HTTP/2 by ALPN, plain
//! HTTP refused, a stalled handshake closed at the first-request deadline, certificate
//! rotation without dropping open connections (a broken new pair keeps the old one), and
//! mutual TLS with the client certificate's subject in the audit line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;
use crate::support::binary;
use crate::support::pki;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use binary::{binary_config_with_server, free_port, standins, start_binary};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use pki::{Pair, Pki};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::{config_yaml, ALICE_OID, ALICE_SYSTEMUSERID};
use testkit::Idp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WHOAMI: &str = "/api/data/v9.2/WhoAmI";

/// A client trusting only the test CA.
fn https_client(pki: &Pki) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .tls_certs_only([reqwest::Certificate::from_pem(pki.ca_pem().as_bytes()).unwrap()])
        .tls_info(true)
}

/// GET `url` with `token` as the bearer.
async fn get_as(
    client: &reqwest::Client,
    url: &str,
    token: &str,
) -> reqwest::Result<reqwest::Response> {
    client.get(url).bearer_auth(token).send().await
}

fn https_url(addr: SocketAddr, path: &str) -> String {
    format!("https://127.0.0.1:{}{path}", addr.port())
}

/// The DER of the certificate a response's connection was served with.
fn served_certificate(response: &reqwest::Response) -> Vec<u8> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("TLS info")
        .to_vec()
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A gateway serving TLS with a fresh server pair; reloads every 100 ms.
async fn tls_env(pki: &Pki, client_ca: bool, server_extra: &str) -> support::Env {
    pki.install(&pki.server("gateway one"));
    support::env()
        .server(&format!(
            "{}{server_extra}",
            pki.server_yaml(client_ca, "100ms")
        ))
        .start()
        .await
}

/// A TLS connection made by hand, to see its certificate and keep it open.
async fn tls_connect(pki: &Pki, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(der(&pki.ca_pem()))).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

fn peer_certificate(stream: &tokio_rustls::client::TlsStream<TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// An HTTP/1.1 connection over `stream`; requests on it share the one TLS session.
async fn http1_over(
    stream: tokio_rustls::client::TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>> {
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn whoami_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>,
    token: &str,
) -> u16 {
    sender.ready().await.unwrap();
    let response = sender
        .send_request(
            http::Request::get(WHOAMI)
                .header("host", "localhost")
                .header("authorization", format!("Bearer {token}"))
                .body(Empty::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status().as_u16();
    response.into_body().collect().await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread")]
async fn https_is_served_over_http1_and_over_http2_by_alpn() {
    let pki = Pki::new("alpn");
    let env = tls_env(&pki, false, "").await;
    let token = env.idp.token_for(ALICE_OID);

    let http1 = https_client(&pki).http1_only().build().unwrap();
    let response = get_as(&http1, &https_url(env.gateway.addr, WHOAMI), &token)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_11);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["UserId"], ALICE_SYSTEMUSERID);

    let alpn = https_client(&pki).build().unwrap();
    for _ in 0..3 {
        let response = get_as(&alpn, &https_url(env.gateway.addr, WHOAMI), &token)
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.version(),
            http::Version::HTTP_2,
            "h2 chosen by ALPN"
        );
    }

    // Links the gateway writes name it by the scheme the caller used.
    let response = get_as(
        &alpn,
        &https_url(env.gateway.addr, "/api/data/v9.2/accounts"),
        &token,
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    let context = body["@odata.context"].as_str().unwrap();
    let expected = https_url(env.gateway.addr, "/api/data/v9.2/$metadata#accounts");
    assert!(context.starts_with(&expected), "{context}");
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_and_untrusting_clients_get_nothing_from_the_tls_port() {
    let pki = Pki::new("plain");
    let env = tls_env(&pki, false, "").await;
    let token = env.idp.token_for(ALICE_OID);

    let plain = get_as(
        &support::client(),
        &format!("http://{}{WHOAMI}", env.gateway.addr),
        &token,
    )
    .await;
    assert!(plain.is_err(), "plain HTTP answered: {plain:?}");
    let raw = support::raw_request(
        env.gateway.addr,
        format!("GET {WHOAMI} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(
        !raw.contains("HTTP/1.1") && !raw.contains("UserId"),
        "plain HTTP got an HTTP answer: {raw:?}"
    );

    // A client that does not trust the test CA refuses the gateway's certificate.
    let untrusting = get_as(
        &reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only([
                reqwest::Certificate::from_pem(Pki::new("other").ca_pem().as_bytes()).unwrap(),
            ])
            .build()
            .unwrap(),
        &https_url(env.gateway.addr, WHOAMI),
        &token,
    )
    .await;
    assert!(untrusting.is_err(), "{untrusting:?}");
}

/// Reads until the peer closes; `Ok(bytes read)` on close, `Err` if still open after 10 s.
async fn read_until_closed(stream: &mut TcpStream) -> Result<usize, &'static str> {
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Err(_) => return Err("still open 10s after connecting"),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(total),
            Ok(Ok(n)) => total += n,
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stalls_in_the_handshake_is_closed_at_the_header_read_timeout() {
    let pki = Pki::new("stall");
    let env = tls_env(&pki, false, "  header_read_timeout: 1s\n").await;

    // Opens TCP and sends nothing.
    let mut silent = TcpStream::connect(env.gateway.addr).await.unwrap();
    // Sends the first bytes of a ClientHello (a TLS record header announcing 512 bytes,
    // then a few) and stops.
    let mut partial = TcpStream::connect(env.gateway.addr).await.unwrap();
    partial
        .write_all(&[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ])
        .await
        .unwrap();
    // Trickles the hello one byte every 300 ms: activity is no excuse.
    let mut trickle = TcpStream::connect(env.gateway.addr).await.unwrap();
    let trickling = tokio::spawn(async move {
        for byte in [0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc] {
            if trickle.write_all(&[byte]).await.is_err() {
                return read_until_closed(&mut trickle).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        read_until_closed(&mut trickle).await
    });

    assert_eq!(read_until_closed(&mut silent).await, Ok(0));
    assert_eq!(read_until_closed(&mut partial).await, Ok(0));
    assert!(trickling.await.unwrap().is_ok(), "trickler closed");

    // And the port still serves a client that completes its handshake.
    let mut sender = http1_over(tls_connect(&pki, env.gateway.addr).await).await;
    assert_eq!(
        whoami_on(&mut sender, &env.idp.token_for(ALICE_OID)).await,
        200
    );
}

/// Waits until a new connection is served `expected`, for at most 10 s.
async fn wait_for_certificate(pki: &Pki, addr: SocketAddr, expected: &[u8]) {
    for _ in 0..100 {
        if peer_certificate(&tls_connect(pki, addr).await) == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("new connections were not served the rotated certificate within 10s");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_certificate_serves_new_connections_and_open_ones_keep_working() {
    let pki = Pki::new("rotate");
    let env = tls_env(&pki, false, "").await;
    let token = env.idp.token_for(ALICE_OID);
    let first = der(&std::fs::read_to_string(pki.path("server.pem")).unwrap());

    let old = tls_connect(&pki, env.gateway.addr).await;
    assert_eq!(peer_certificate(&old), first);
    let mut old = http1_over(old).await;
    assert_eq!(whoami_on(&mut old, &token).await, 200);

    // A new pair (new key too) replaces the files.
    let second = pki.server("gateway two");
    pki.install(&second);
    let second_der = der(&second.certificate);
    assert_ne!(first, second_der);
    wait_for_certificate(&pki, env.gateway.addr, &second_der).await;
    let response = get_as(
        &https_client(&pki).build().unwrap(),
        &https_url(env.gateway.addr, WHOAMI),
        &token,
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(served_certificate(&response), second_der);

    // The connection opened before the rotation is still served.
    for _ in 0..3 {
        assert_eq!(whoami_on(&mut old, &token).await, 200);
    }

    // A broken new pair: a certificate with another pair's key, then a file that is not
    // PEM. Each is refused and the second certificate stays in force.
    let third = pki.server("gateway three");
    let fourth = pki.server("gateway four");
    pki.install(&Pair {
        certificate: third.certificate.clone(),
        private_key: fourth.private_key.clone(),
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        peer_certificate(&tls_connect(&pki, env.gateway.addr).await),
        second_der,
        "a certificate with the wrong key is not used"
    );
    std::fs::write(pki.path("server.pem"), "not a certificate\n").unwrap();
    std::fs::remove_file(pki.path("server-key.pem")).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut after = http1_over(tls_connect(&pki, env.gateway.addr).await).await;
    assert_eq!(whoami_on(&mut after, &token).await, 200);
    assert_eq!(whoami_on(&mut old, &token).await, 200);

    // Once the files hold a good pair again, it is used.
    pki.install(&third);
    wait_for_certificate(&pki, env.gateway.addr, &der(&third.certificate)).await;
}

/// Why the gateway would not start on `yaml`, as the binary prints it: the error and its
/// causes.
async fn start_error(yaml: &str) -> String {
    let config = dynamics_gateway::config::Config::from_yaml(yaml, &|_| None).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = dynamics_gateway::run(config, listener, admin, std::future::pending())
        .await
        .unwrap_err();
    dynamics_gateway::error::chain(&error)
}

#[tokio::test]
async fn a_tls_config_whose_files_do_not_load_stops_the_start_naming_the_file() {
    let pki = Pki::new("start");
    let idp = Idp::builder().start().await.unwrap();
    let yaml = config_yaml(
        &idp,
        "https://org.crm.dynamics.com",
        support::CALLER_OBJECT_ID,
        &pki.server_yaml(false, "5s"),
        "",
    );
    let error = start_error(&yaml).await;
    assert!(
        error.contains("server.tls.certificate") && error.contains("server.pem"),
        "{error}"
    );

    // A key that is not the certificate's is named as such.
    let a = pki.server("a");
    let b = pki.server("b");
    pki.install(&Pair {
        certificate: a.certificate,
        private_key: b.private_key,
    });
    let error = start_error(&yaml).await;
    assert!(error.contains("does not fit the certificate"), "{error}");
}

#[test]
fn tls_config_keys_are_checked() {
    let base = "server:\n  listen: 127.0.0.1:1\n  admin_listen: 127.0.0.1:2\n";
    let rest = "inbound:\n  issuers:\n    - issuer: https://login.microsoftonline.com/t/v2.0\n      audiences: [a]\n\
identity:\n  mode: caller_object_id\n\
dynamics:\n  url: https://org.crm.dynamics.com\n  tenant_id: t\n  client_id: c\n  client_secret: s\n";
    let load = |tls: &str| {
        dynamics_gateway::config::Config::from_yaml(&format!("{base}{tls}{rest}"), &|_| None)
            .map_err(|e| e.to_string())
    };
    let plain = load("").unwrap();
    assert!(plain.server.tls.is_none(), "plain HTTP is the default");
    let tls = load("  tls:\n    certificate: /c.pem\n    private_key: /k.pem\n").unwrap();
    let tls = tls.server.tls.unwrap();
    assert_eq!(tls.certificate, PathBuf::from("/c.pem"));
    assert_eq!(tls.client_ca, None);
    assert_eq!(tls.reload_interval, Duration::from_secs(5));
    let error = load("  tls:\n    certificate: /c.pem\n").unwrap_err();
    assert!(error.contains("private_key"), "{error}");
    let error =
        load("  tls:\n    certificate: /c.pem\n    private_key: /k.pem\n    client_cert: /x\n")
            .unwrap_err();
    assert!(error.contains("client_cert"), "{error}");
    let error =
        load("  tls:\n    certificate: /c.pem\n    private_key: /k.pem\n    reload_interval: 0s\n")
            .unwrap_err();
    assert!(error.contains("server.tls.reload_interval"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_refuses_clients_without_a_trusted_certificate_and_audits_the_subject() {
    let pki = Pki::new("mtls");
    pki.install(&pki.server("gateway"));
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let yaml = binary_config_with_server(
        &idp,
        &dataverse,
        support::CALLER_OBJECT_ID,
        &pki.server_yaml(true, "5s"),
        ports,
    );
    let gateway = start_binary(&yaml, ports).await;
    let url = format!("https://127.0.0.1:{}{WHOAMI}", ports.0);
    let token = idp.token_for(ALICE_OID);

    let anonymous = get_as(&https_client(&pki).build().unwrap(), &url, &token).await;
    assert!(anonymous.is_err(), "no client certificate: {anonymous:?}");
    let foreign = pki::foreign_client("intruder");
    let foreign = get_as(
        &https_client(&pki)
            .identity(reqwest::Identity::from_pem(foreign.identity_pem().as_bytes()).unwrap())
            .build()
            .unwrap(),
        &url,
        &token,
    )
    .await;
    assert!(foreign.is_err(), "certificate of another CA: {foreign:?}");

    let client_pair = pki.client("orders-app", "Contoso");
    for http1 in [true, false] {
        let builder = https_client(&pki)
            .identity(reqwest::Identity::from_pem(client_pair.identity_pem().as_bytes()).unwrap());
        let builder = if http1 { builder.http1_only() } else { builder };
        let response = builder
            .build()
            .unwrap()
            .get(&url)
            .bearer_auth(&token)
            .header("x-request-id", format!("mtls-{http1}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let mut log = String::new();
    for _ in 0..50 {
        log = gateway.log();
        if log.contains("mtls-false") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in ["mtls-true", "mtls-false"] {
        let line = log
            .lines()
            .find(|l| l.contains(id) && l.contains("status=200"))
            .unwrap_or_else(|| panic!("no audit line for {id}: {log}"));
        assert!(
            line.contains("client_certificate") && line.contains("CN=orders-app"),
            "{line}"
        );
        assert!(line.contains("O=Contoso"), "{line}");
    }
    assert!(
        !log.contains("intruder"),
        "a refused certificate is not audited as a caller"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_over_the_limit_on_the_tls_port_is_closed_without_plaintext() {
    let pki = Pki::new("over-limit");
    let env = tls_env(
        &pki,
        false,
        "  max_connections: 2\n  max_connections_per_peer: 0\n  header_read_timeout: 30s\n",
    )
    .await;
    let mut held = http1_over(tls_connect(&pki, env.gateway.addr).await).await;
    let _second = tls_connect(&pki, env.gateway.addr).await;

    // A plaintext 503 here would reach a TLS client as a protocol error.
    let mut over = TcpStream::connect(env.gateway.addr).await.unwrap();
    assert_eq!(
        read_until_closed(&mut over).await,
        Ok(0),
        "closed, no bytes"
    );

    assert_eq!(
        whoami_on(&mut held, &env.idp.token_for(ALICE_OID)).await,
        200,
        "the connections within the limit are served"
    );
}
