//! Cancellation, measured by open file descriptors: a caller hanging up, or a request
//! timing out, must close the upstream connection rather than leave it working or pooled.
//! One test in its own file (its own process), so no other test's sockets move the count.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::time::Duration;

use support::{env, ALICE_OID};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ACCOUNTS: &str = "/api/data/v9.2/accounts";

/// Open file descriptors of this test process (the gateway and stand-ins run inside it).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn settle_fds(baseline: usize) -> usize {
    let mut now = open_fds();
    for _ in 0..40 {
        if now <= baseline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = open_fds();
    }
    now
}

#[tokio::test]
async fn hanging_up_or_timing_out_releases_the_upstream_connection() {
    hang_ups().await;
    time_out().await;
}

async fn hang_ups() {
    let env = env().start().await;
    let token = env.idp.token_for(ALICE_OID);
    // One full request first, so the pooled upstream connection is part of the baseline.
    let warm = support::get(&env.gateway, ACCOUNTS, &token).await;
    assert_eq!(warm.status(), 200);
    let baseline = open_fds();

    // Mid-download: read 1 MiB of a 64 MiB answer, then hang up.
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    let request = format!(
        "GET /api/data/v9.2/download?bytes={} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n",
        64 << 20
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < (1 << 20) {
        got += stream.read(&mut buf).await.unwrap();
    }
    drop(stream);
    assert!(
        settle_fds(baseline).await <= baseline,
        "the upstream download connection is closed"
    );

    // Mid-upload: promise 64 MiB, send 1 MiB, hang up.
    let mut stream = TcpStream::connect(env.gateway.addr).await.unwrap();
    let head = format!(
        "POST /api/data/v9.2/echo HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        64 << 20
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&vec![b'u'; 1 << 20]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(stream);
    assert!(
        settle_fds(baseline).await <= baseline,
        "the upstream upload connection is closed"
    );
    let upload = env
        .dataverse
        .requests()
        .into_iter()
        .find(|r| r.path_and_query.ends_with("/echo"))
        .unwrap();
    assert!(
        upload.body_len < 64 << 20,
        "Dataverse never saw a complete body"
    );

    // And the gateway still serves.
    let after = support::get(&env.gateway, ACCOUNTS, &token).await;
    assert_eq!(after.status(), 200);
}

async fn time_out() {
    let env = env().server("  request_timeout: 1s\n").start().await;
    let token = env.idp.token_for(ALICE_OID);
    // The pooled upstream connection (both of its ends live in this process) is in the baseline.
    let warm = support::get(&env.gateway, ACCOUNTS, &token).await;
    assert_eq!(warm.status(), 200);
    let baseline = open_fds();
    env.dataverse.set_delay(Duration::from_millis(2500));
    let response = support::get(&env.gateway, ACCOUNTS, &token).await;
    assert_eq!(response.status(), 504);
    drop(response);
    // Once the stand-in has answered into the void, a cancelled request has taken its
    // connection with it; an uncancelled one would have put it back in the pool.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        open_fds() < baseline,
        "the timed-out upstream connection was closed, not pooled"
    );
    env.dataverse.set_delay(Duration::ZERO);
    let after = support::get(&env.gateway, ACCOUNTS, &token).await;
    assert_eq!(after.status(), 200);
}
