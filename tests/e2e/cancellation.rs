//! Cancellation, measured on the stand-in Dataverse's own sockets: a caller hanging up, or
//! a request timing out, must close the upstream connection rather than leave it working
//! or pooled.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::time::Duration;

use support::{env, ALICE_OID};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ACCOUNTS: &str = "/api/data/v9.2/accounts";

/// Established connections the stand-in Dataverse has accepted (its side of each socket,
/// by its port, from the kernel's table): the gateway's upstream connections, whatever
/// else runs in this process.
fn upstream_connections(dataverse_url: &str) -> usize {
    let port = url::Url::parse(dataverse_url)
        .unwrap()
        .port()
        .expect("the stand-in has a port");
    let established = |table: &str| {
        std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local_port = fields
                    .get(1)
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| u16::from_str_radix(p, 16).ok());
                local_port == Some(port) && fields.get(3) == Some(&"01")
            })
            .count()
    };
    established("/proc/net/tcp") + established("/proc/net/tcp6")
}

/// Waits for the stand-in's connections to drop to `at_most`, and returns how many are left.
async fn settle(dataverse_url: &str, at_most: usize) -> usize {
    let mut now = upstream_connections(dataverse_url);
    for _ in 0..40 {
        if now <= at_most {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = upstream_connections(dataverse_url);
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
    // One full request first: the download then finds a pooled connection or opens one.
    let warm = support::get(&env.gateway, ACCOUNTS, &token).await;
    assert_eq!(warm.status(), 200);
    let dataverse = env.dataverse.url();

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
    let downloading = upstream_connections(&dataverse);
    drop(stream);
    assert!(
        settle(&dataverse, downloading - 1).await < downloading,
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
    support::eventually("the upload reaches Dataverse", || async {
        let requests = env.dataverse.requests();
        requests.iter().any(|r| r.path_and_query.ends_with("/echo"))
    })
    .await;
    let uploading = upstream_connections(&dataverse);
    drop(stream);
    assert!(
        settle(&dataverse, uploading - 1).await < uploading,
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
    let dataverse = env.dataverse.url();
    assert!(
        upstream_connections(&dataverse) >= 1,
        "the warm-up connection is pooled"
    );
    env.dataverse.set_delay(Duration::from_millis(2500));
    let url = format!("{}{ACCOUNTS}", env.gateway.url());
    let slow_token = token.clone();
    let slow = tokio::spawn(async move {
        support::client()
            .get(url)
            .bearer_auth(slow_token)
            .send()
            .await
    });
    // Each request thread pools its own connections: count while the slow request holds
    // one, whichever pool it came from.
    let stand_in = env.dataverse.clone();
    support::eventually("Dataverse holds the slow request", || {
        let held = stand_in.in_flight() == 1;
        async move { held }
    })
    .await;
    let during = upstream_connections(&dataverse);
    let response = slow.await.unwrap().unwrap();
    assert_eq!(response.status(), 504);
    drop(response);
    // A cancelled request takes its connection with it; an uncancelled one keeps it open
    // until the stand-in answers (at 2.5 s) and then puts it back in the pool, so the
    // count would not drop below `during` within `settle`'s 2 s.
    assert!(
        settle(&dataverse, during - 1).await < during,
        "the timed-out upstream connection was closed, not pooled"
    );
    env.dataverse.set_delay(Duration::ZERO);
    let after = support::get(&env.gateway, ACCOUNTS, &token).await;
    assert_eq!(after.status(), 200);
}
