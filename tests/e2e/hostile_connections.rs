//! Hostile callers at the connection level, over raw sockets against the real gateway:
//! connections that send nothing, HTTP/2 that stops after its preface, keep-alive
//! connections left idle, peers that never answer pings, one address opening many
//! connections, and request bodies that stall, trickle or run over the limit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{env, Env, ALICE_OID};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const ACCOUNTS: &str = "/api/data/v9.2/accounts";
/// Longest any test waits for the gateway to close a connection or answer: well above
/// the short limits the tests configure, well below the defaults they replace.
const BOUND: Duration = Duration::from_secs(5);
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame.
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// A connection to the gateway from `ip` (any 127.0.0.0/8 address is loopback on Linux).
async fn connect_from(ip: Ipv4Addr, gateway: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(IpAddr::V4(ip), 0))
        .expect("bind a loopback source address");
    socket.connect(gateway).await.expect("connect")
}

/// Reads until the gateway closes the connection; what it sent, or `None` if it was
/// still open after `BOUND`.
async fn read_until_closed(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(BOUND, read).await.ok()?;
    Some(seen)
}

/// Sends one request head (plus `body`) and reads one response head and its
/// Content-Length body, leaving the connection open.
async fn exchange(stream: &mut TcpStream, head: &str, body: &[u8]) -> String {
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    read_response(stream).await
}

/// One response (head and Content-Length body) from the stream, within `BOUND`.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&seen[..end]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if seen.len() >= end + 4 + length {
                    return;
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(BOUND, read)
        .await
        .expect("a response within the bound");
    String::from_utf8_lossy(&seen).into_owned()
}

/// A GET with Alice's token, keep-alive.
fn get_head(env: &Env) -> String {
    let token = env.idp.token_for(ALICE_OID);
    format!("GET {ACCOUNTS} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n")
}

/// A POST head with Alice's token and the given framing headers.
fn post_head(env: &Env, path: &str, framing: &str) -> String {
    let token = env.idp.token_for(ALICE_OID);
    format!("POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n{framing}\r\n")
}

fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The `error.code` and `error.message` of a gateway error response.
fn error_of(response: &str) -> (String, String) {
    let body = response.split_once("\r\n\r\n").expect("a body").1;
    let json: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("error body is JSON ({e}): {body:?}"));
    (
        json["error"]["code"].as_str().expect("error.code").into(),
        json["error"]["message"]
            .as_str()
            .expect("error.message")
            .into(),
    )
}

const OPEN_APP_CONNECTIONS: &str = "dynamics_gateway_open_connections{listener=\"app\"}";

/// The gateway's count of open app connections once it has settled on `expected`
/// (closing a socket and counting it down are not one step), or what it last was.
async fn open_app_connections(env: &Env, expected: f64) -> f64 {
    let mut last = f64::NAN;
    for _ in 0..50 {
        last = support::metric(&env.gateway, OPEN_APP_CONNECTIONS).await;
        if last == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

/// No request the stand-in received has a completely read body.
fn assert_no_completed_request(env: &Env, case: &str) {
    for r in env.dataverse.requests() {
        assert!(
            r.body_sha256.is_empty(),
            "{case}: Dataverse received a complete request: {} {} ({} bytes)",
            r.method,
            r.path_and_query,
            r.body_len
        );
    }
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_header_read_timeout_and_free_every_slot() {
    let env = env()
        .server(
            "  max_connections: 4\n  max_connections_per_peer: 0\n  header_read_timeout: 500ms\n",
        )
        .start()
        .await;
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(env.gateway.addr).await.unwrap());
    }
    // They hold every slot while open...
    let mut fifth = TcpStream::connect(env.gateway.addr).await.unwrap();
    let refused = read_until_closed(&mut fifth)
        .await
        .expect("refused and closed");
    assert_eq!(status(&String::from_utf8_lossy(&refused)), 503);
    assert_eq!(open_app_connections(&env, 4.0).await, 4.0);
    // ... and the gateway closes each of them, though they never sent a byte.
    for (n, stream) in silent.iter_mut().enumerate() {
        let sent = read_until_closed(stream)
            .await
            .unwrap_or_else(|| panic!("silent connection {n} is still open"));
        assert!(sent.is_empty(), "nothing is answered to nothing: {sent:?}");
    }
    assert_eq!(open_app_connections(&env, 0.0).await, 0.0);
    let mut fresh = TcpStream::connect(env.gateway.addr).await.unwrap();
    let response = exchange(&mut fresh, &get_head(&env), b"").await;
    assert_eq!(status(&response), 200, "{response}");
}

#[tokio::test]
async fn an_http2_connection_that_sends_only_its_preface_and_settings_is_closed() {
    let env = env()
        .server("  header_read_timeout: 500ms\n  idle_timeout: 1h\n")
        .start()
        .await;
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    stream.write_all(H2_PREFACE).await.unwrap();
    stream.write_all(H2_SETTINGS).await.unwrap();
    let sent = read_until_closed(&mut stream)
        .await
        .expect("an h2 connection without a request is closed");
    // The gateway spoke HTTP/2 to it (its own SETTINGS first): the h2 path was under test.
    assert!(sent.len() >= 9 && sent[3] == 4, "{sent:?}");
    assert_eq!(env.dataverse.request_count(), 0);
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed_after_the_idle_timeout() {
    // header_read_timeout is far above the bound, so only idle_timeout can close it.
    let env = env()
        .server("  header_read_timeout: 30s\n  idle_timeout: 300ms\n")
        .start()
        .await;
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    let first = exchange(&mut stream, &get_head(&env), b"").await;
    assert_eq!(status(&first), 200, "{first}");
    // Kept alive: a second request on it is served.
    let second = exchange(&mut stream, &get_head(&env), b"").await;
    assert_eq!(status(&second), 200, "{second}");
    let after = read_until_closed(&mut stream)
        .await
        .expect("the idle keep-alive connection is closed");
    assert!(after.is_empty(), "{after:?}");
}

#[tokio::test]
async fn a_keep_alive_http1_connection_waits_idle_timeout_but_a_started_head_only_header_read_timeout(
) {
    let env = env()
        .server("  header_read_timeout: 300ms\n  idle_timeout: 30s\n")
        .start()
        .await;
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    let first = exchange(&mut stream, &get_head(&env), b"").await;
    assert_eq!(status(&first), 200, "{first}");
    // Idle for several head timeouts, well within the idle timeout: still served.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = exchange(&mut stream, &get_head(&env), b"").await;
    assert_eq!(status(&second), 200, "{second}");
    // A head begun and never finished is cut by the head timeout, not the idle one.
    stream
        .write_all(b"GET /api/data/v9.2/accounts HTTP/1.1\r\nHost: gw\r\n")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut stream).await.is_some(),
        "a started head has header_read_timeout to complete"
    );
    assert_eq!(env.dataverse.request_count(), 2);
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let env = env()
        .server("  header_read_timeout: 30s\n  idle_timeout: 300ms\n")
        .start()
        .await;
    let stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::get(format!("http://gw{ACCOUNTS}"))
        .header(
            "authorization",
            format!("Bearer {}", env.idp.token_for(ALICE_OID)),
        )
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    // The client answers pings, so only the idle timeout can end the connection.
    let ended = tokio::time::timeout(BOUND, connection).await;
    assert!(ended.is_ok(), "the idle h2 connection is still open");
}

/// An h2 GET / (HPACK: :method GET, :scheme http, :path /, :authority gw) on stream 1.
fn h2_get_root() -> Vec<u8> {
    let block = [0x82, 0x86, 0x84, 0x41, 0x02, b'g', b'w'];
    let mut frame = vec![0, 0, block.len() as u8, 1, 0x05, 0, 0, 0, 1];
    frame.extend_from_slice(&block);
    frame
}

/// The (type, flags) of each complete frame in what the server sent after its preface.
fn h2_frames(mut bytes: &[u8]) -> Vec<(u8, u8)> {
    let mut frames = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        frames.push((bytes[3], bytes[4]));
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    frames
}

#[tokio::test]
async fn an_http2_peer_that_never_answers_pings_is_closed() {
    let env = env()
        .server(
            "  header_read_timeout: 30s\n  idle_timeout: 1h\n  http2_keep_alive_interval: 200ms\n  http2_keep_alive_timeout: 200ms\n",
        )
        .start()
        .await;
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    stream.write_all(H2_PREFACE).await.unwrap();
    stream.write_all(H2_SETTINGS).await.unwrap();
    // One request, so the connection is past its first-request deadline.
    stream.write_all(&h2_get_root()).await.unwrap();
    let sent = read_until_closed(&mut stream)
        .await
        .expect("a peer that does not answer pings is closed");
    let frames = h2_frames(&sent);
    assert!(
        frames.contains(&(1, 0x05)) || frames.contains(&(1, 0x04)),
        "the request was answered: {frames:?}"
    );
    assert!(
        frames
            .iter()
            .any(|&(kind, flags)| kind == 6 && flags & 1 == 0),
        "the gateway pinged: {frames:?}"
    );
}

#[tokio::test]
async fn connections_beyond_the_per_peer_cap_get_503_while_other_peers_are_served() {
    let env = env()
        .server(
            "  max_connections: 20\n  max_connections_per_peer: 3\n  header_read_timeout: 30s\n",
        )
        .start()
        .await;
    let gateway = env.gateway.addr;
    let local = Ipv4Addr::new(127, 0, 0, 1);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(connect_from(local, gateway).await);
    }
    let mut ids = Vec::new();
    for n in 0..5 {
        let mut extra = connect_from(local, gateway).await;
        let sent = read_until_closed(&mut extra)
            .await
            .unwrap_or_else(|| panic!("connection {} over the per-peer cap stays open", 3 + n));
        let response = String::from_utf8_lossy(&sent).into_owned();
        assert_eq!(status(&response), 503, "{response}");
        assert_eq!(header(&response, "retry-after"), Some("1"), "{response}");
        assert_eq!(error_of(&response).0, "DynamicsGateway.TooManyConnections");
        ids.push(
            header(&response, "x-request-id")
                .expect("x-request-id")
                .to_string(),
        );
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "each refusal has its own request id: {ids:?}");
    assert_eq!(
        open_app_connections(&env, 3.0).await,
        3.0,
        "the refused connections were never counted as open"
    );
    // Another address is not affected by 127.0.0.1's connections.
    let mut other = connect_from(Ipv4Addr::new(127, 0, 0, 2), gateway).await;
    let response = exchange(&mut other, &get_head(&env), b"").await;
    assert_eq!(status(&response), 200, "{response}");
    // Exactly the three under the cap are open and served.
    for stream in &mut open {
        let response = exchange(stream, &get_head(&env), b"").await;
        assert_eq!(status(&response), 200, "{response}");
    }
    // Closing one frees one slot for that address, and only one.
    drop(open.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect_from(local, gateway).await;
    let response = exchange(&mut again, &get_head(&env), b"").await;
    assert_eq!(status(&response), 200, "{response}");
    let mut over = connect_from(local, gateway).await;
    let sent = read_until_closed(&mut over).await.expect("refused");
    assert_eq!(status(&String::from_utf8_lossy(&sent)), 503);
}

#[tokio::test]
async fn the_503_for_connections_over_max_connections_carries_a_request_id() {
    let env = env()
        .server("  max_connections: 2\n  max_connections_per_peer: 0\n  header_read_timeout: 30s\n")
        .start()
        .await;
    let _held = (
        TcpStream::connect(env.gateway.addr).await.unwrap(),
        TcpStream::connect(env.gateway.addr).await.unwrap(),
    );
    let mut over = TcpStream::connect(env.gateway.addr).await.unwrap();
    let sent = read_until_closed(&mut over)
        .await
        .expect("refused and closed");
    let response = String::from_utf8_lossy(&sent).into_owned();
    assert_eq!(status(&response), 503, "{response}");
    let id = header(&response, "x-request-id").expect("x-request-id on the 503");
    assert!(uuid::Uuid::parse_str(id).is_ok(), "a generated id: {id}");
    let (code, message) = error_of(&response);
    assert_eq!(code, "DynamicsGateway.TooManyConnections");
    assert!(
        message.contains(id),
        "the message names the request id: {message}"
    );
}

#[tokio::test]
async fn a_body_that_stalls_before_forwarding_is_answered_408_and_never_sent() {
    let env = env().server("  body_read_timeout: 300ms\n").start().await;
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    let head = post_head(
        &env,
        ACCOUNTS,
        "Content-Type: application/json\r\nContent-Length: 1000\r\n",
    );
    let response = exchange(&mut stream, &head, b"{").await;
    assert_eq!(status(&response), 408, "{response}");
    assert!(header(&response, "x-request-id").is_some(), "{response}");
    let (code, message) = error_of(&response);
    assert_eq!(code, "DynamicsGateway.RequestBodyTimeout");
    assert!(message.contains("server.body_read_timeout"), "{message}");
    assert!(
        read_until_closed(&mut stream).await.is_some(),
        "the connection with the unread body is closed"
    );
    assert_eq!(env.dataverse.request_count(), 0, "nothing was forwarded");
}

#[tokio::test]
async fn a_body_that_stalls_after_forwarding_started_is_408_and_the_upstream_request_aborted() {
    let env = env().server("  body_read_timeout: 300ms\n").start().await;
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    // More than the gateway holds before connecting, so the upload to Dataverse has begun.
    let head = post_head(
        &env,
        ACCOUNTS,
        "Content-Type: application/octet-stream\r\nContent-Length: 204800\r\n",
    );
    let response = exchange(&mut stream, &head, &vec![b'x'; 80 * 1024]).await;
    assert_eq!(status(&response), 408, "{response}");
    assert_eq!(error_of(&response).0, "DynamicsGateway.RequestBodyTimeout");
    assert_eq!(
        env.dataverse.request_count(),
        1,
        "the upload had reached Dataverse"
    );
    // Give the stand-in time to finish the request, if it had been completed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_no_completed_request(&env, "stalled streaming body");
}

#[tokio::test]
async fn a_body_that_keeps_trickling_past_request_timeout_is_not_cut_with_504() {
    let env = env()
        .server("  request_timeout: 1s\n  body_read_timeout: 2s\n  exchange_timeout: 1m\n")
        .start()
        .await;
    let name = "n".repeat(80 * 1024);
    let body = format!("{{\"name\":\"{name}\"}}");
    let (bulk, tail) = body.as_bytes().split_at(body.len() - 10);
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    let head = post_head(
        &env,
        ACCOUNTS,
        &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ),
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(bulk).await.unwrap();
    // The last 10 bytes over 2.5 s: longer than request_timeout, each pause within
    // body_read_timeout.
    for byte in tail {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if stream.write_all(&[*byte]).await.is_err() {
            break; // answered early: the assertion below shows with what
        }
    }
    let response = read_response(&mut stream).await;
    assert!(
        (200..300).contains(&status(&response)),
        "a slow upload is not Dataverse being slow: {}",
        &response[..response.len().min(400)]
    );
    let seen = env.dataverse.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].body_len,
        body.len() as u64,
        "the whole body arrived"
    );
    assert!(!seen[0].body_sha256.is_empty());
}

#[tokio::test]
async fn a_body_that_never_pauses_long_is_still_bounded_by_the_exchange_timeout() {
    let env = env()
        .server("  request_timeout: 1s\n  body_read_timeout: 1s\n  exchange_timeout: 1500ms\n")
        .start()
        .await;
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    let head = post_head(
        &env,
        ACCOUNTS,
        "Content-Type: application/octet-stream\r\nContent-Length: 1000\r\n",
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // One byte every 200 ms: never idle for body_read_timeout, never finished.
    let trickle = async {
        loop {
            if stream.write_all(b"x").await.is_err() {
                return None;
            }
            let mut buf = [0u8; 4096];
            match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => return Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Ok(_) => return None,
                Err(_) => {}
            }
        }
    };
    let response = tokio::time::timeout(BOUND, trickle)
        .await
        .expect("answered within the bound")
        .expect("an answer before the close");
    assert_eq!(status(&response), 408, "{response}");
    let (code, message) = error_of(&response);
    assert_eq!(code, "DynamicsGateway.RequestBodyTimeout");
    assert!(message.contains("server.exchange_timeout"), "{message}");
    assert_eq!(env.dataverse.request_count(), 0);
}

#[tokio::test]
async fn uploads_trickling_below_the_minimum_rate_cannot_hold_the_budget_slots() {
    let env = env()
        .server("  min_body_rate: 1000\n  min_body_rate_window: 500ms\n")
        .dynamics("  budget: { max_concurrency: 2, queue_timeout: 30s }\n")
        .start()
        .await;
    // Two uploads take both slots to Dataverse: 80 KiB at once (more than the gateway holds
    // before connecting), then a byte every 50 ms, never idle for body_read_timeout.
    let mut uploads = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
        let head = post_head(
            &env,
            ACCOUNTS,
            "Content-Type: application/octet-stream\r\nContent-Length: 1048576\r\n",
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&vec![b'x'; 80 * 1024]).await.unwrap();
        uploads.push(tokio::spawn(async move {
            let trickle = async {
                loop {
                    if stream.write_all(b"x").await.is_err() {
                        return None;
                    }
                    let mut buf = [0u8; 4096];
                    let read = stream.read(&mut buf);
                    match tokio::time::timeout(Duration::from_millis(50), read).await {
                        Ok(Ok(n)) if n > 0 => {
                            return Some(String::from_utf8_lossy(&buf[..n]).into_owned())
                        }
                        Ok(_) => return None,
                        Err(_) => {}
                    }
                }
            };
            tokio::time::timeout(BOUND, trickle).await
        }));
    }
    for upload in uploads {
        let response = upload
            .await
            .unwrap()
            .expect("cut off within the bound")
            .expect("an answer before the close");
        assert_eq!(status(&response), 408, "{response}");
        let (code, message) = error_of(&response);
        assert_eq!(code, "DynamicsGateway.RequestBodyTimeout");
        assert!(message.contains("server.min_body_rate"), "{message}");
    }
    assert_eq!(
        env.dataverse.request_count(),
        2,
        "both uploads had reached Dataverse, each holding a slot"
    );
    assert_no_completed_request(&env, "trickled body");
    let token = env.idp.token_for(ALICE_OID);
    let after = support::get(&env.gateway, ACCOUNTS, token).await;
    assert_eq!(after.status(), 200, "the slots are free again");
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413_even_after_forwarding_started() {
    let env = env().server("  max_request_body: 100KiB\n").start().await;
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    let head = post_head(
        &env,
        ACCOUNTS,
        "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n",
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 16 * 1024];
    let mut response = None;
    for _ in 0..10 {
        let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
        frame.extend_from_slice(&chunk);
        frame.extend_from_slice(b"\r\n");
        if stream.write_all(&frame).await.is_err() {
            break;
        }
        let mut buf = [0u8; 4096];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await
        {
            if n > 0 {
                response = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                break;
            }
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let response = match response {
        Some(r) => r,
        None => read_response(&mut stream).await,
    };
    assert_eq!(status(&response), 413, "{response}");
    assert_eq!(error_of(&response).0, "DynamicsGateway.RequestBodyTooLarge");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_no_completed_request(&env, "chunked body over the limit");
}

#[tokio::test]
async fn first_bytes_that_could_start_the_http2_preface_are_served_whichever_protocol_follows() {
    let env = env().start().await;
    // HTTP/1 whose first bytes could begin HTTP/2's preface, the rest of the head later.
    for split in [1, 2] {
        let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
        let head = post_head(&env, ACCOUNTS, "Content-Length: 2\r\n");
        stream.write_all(&head.as_bytes()[..split]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let response = exchange(&mut stream, &head[split..], b"{}").await;
        assert!(
            response.starts_with("HTTP/1.1 2"),
            "split {split}: {response}"
        );
    }
    assert_eq!(env.dataverse.request_count(), 2);
    // HTTP/2's preface in two writes, then a request.
    for split in [1, 10, H2_PREFACE.len() - 1] {
        let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
        stream.write_all(&H2_PREFACE[..split]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream.write_all(&H2_PREFACE[split..]).await.unwrap();
        stream.write_all(H2_SETTINGS).await.unwrap();
        stream.write_all(&h2_get_root()).await.unwrap();
        let mut sent = Vec::new();
        let mut buf = [0u8; 4096];
        let answered = tokio::time::timeout(BOUND, async {
            // Until a HEADERS frame (type 1) answers stream 1.
            while !h2_frames(&sent).iter().any(|(kind, _)| *kind == 1) {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sent.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(answered.is_ok(), "split {split}: no answer");
        let frames = h2_frames(&sent);
        assert_eq!(
            frames.first().map(|f| f.0),
            Some(4),
            "split {split}: {frames:?}"
        );
        assert!(
            frames.iter().any(|(kind, _)| *kind == 1),
            "split {split}: {frames:?}"
        );
    }
}

#[tokio::test]
async fn a_callers_trailers_never_reach_dataverse_over_either_http_version() {
    let trailers = format!(
        "CallerObjectId: {bob}\r\nMSCRMCallerID: {bob}\r\nAuthorization: Bearer x\r\nHost: evil\r\n\
         X-HTTP-Method-Override: DELETE\r\nCookie: a=b\r\nConnection: close\r\nTransfer-Encoding: x\r\n",
        bob = support::BOB_OID
    );
    for version in ["http1", "http2"] {
        let env = env()
            .dynamics(&format!("  upstream_http: {version}\n"))
            .start()
            .await;
        // Larger than the part of a body the gateway holds, so the rest streams.
        let json = format!("{{\"name\":\"{}\"}}", "a".repeat(200 * 1024));
        let body = format!("{:x}\r\n{json}\r\n0\r\n{trailers}\r\n", json.len());
        let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
        let head = post_head(
            &env,
            ACCOUNTS,
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
        );
        let response = exchange(&mut stream, &head, body.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 2"), "{version}: {response}");
        let seen = env.dataverse.requests().pop().unwrap();
        assert_eq!(seen.body_len, json.len() as u64, "{version}");
        assert!(seen.trailers.is_empty(), "{version}: {:?}", seen.trailers);
        assert_eq!(seen.header("callerobjectid"), Some(ALICE_OID), "{version}");
        assert!(seen.header("mscrmcallerid").is_none(), "{version}");
        // A trailer no reader could take fails the caller's body: never forwarded, and over
        // HTTP/1.1 answered as the caller's error. (Over HTTP/2 hyper's client resets the
        // stream and reports only the reset, so it reads as Dataverse's: 502.)
        let body = format!("{:x}\r\n{json}\r\n0\r\nX-A: a\0b\r\n\r\n", json.len());
        let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
        let response = exchange(&mut stream, &head, body.as_bytes()).await;
        let expected = if version == "http1" { 400 } else { 502 };
        assert_eq!(status(&response), expected, "{version}: {response}");
        assert!(env.dataverse.requests().last().unwrap().trailers.is_empty());
    }
}
