//! Overhead of the service-protection gate per request (it sits on the hot path): one
//! uncontended acquire + observe + release, and the same with 8 tasks sharing a gate of 4
//! (so requests queue and are handed slots). With `redis-server` installed (Debian's
//! `redis-server` package), the same two with the budget shared through a local store: the
//! cost of the lease's round trip (and, contended, of asking again while the bucket is full).
//!
//! Run: `cargo bench --bench budget`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use dynamics_gateway::config::{BudgetConfig, BudgetStoreConfig};
use dynamics_gateway::metrics::Metrics;
use dynamics_gateway::secret::Secret;
use dynamics_gateway::upstream::budget::store::Store;
use dynamics_gateway::upstream::budget::{BucketKey, Gate};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio_util::sync::CancellationToken;

fn dataverse_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "x-ms-ratelimit-burst-remaining-xrm-requests",
        HeaderValue::from_static("5999"),
    );
    h.insert(
        "x-ms-ratelimit-time-remaining-xrm-requests",
        HeaderValue::from_static("1,200,000.00"),
    );
    h
}

fn gate(max: usize) -> Gate {
    let metrics = Metrics::new().unwrap();
    let config = BudgetConfig {
        max_concurrency: max,
        ..BudgetConfig::default()
    };
    Gate::new(&config, "bench", &metrics)
}

/// A `redis-server` on a free loopback port, killed on drop; `None` when not installed.
struct RedisServer(std::process::Child, u16);

impl RedisServer {
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        Some(Self(child, port))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A gate of `max` shared through the store at `port`, once the store has answered.
async fn shared_gate(port: u16, max: usize, prefix: &str) -> Gate {
    let metrics = Metrics::new().unwrap();
    let store = Store::new(
        &BudgetStoreConfig {
            url: Secret::new(format!("redis://127.0.0.1:{port}")),
            replicas: 2,
            lease_ttl: Duration::from_secs(30),
            command_timeout: Duration::from_millis(250),
            key_prefix: prefix.into(),
        },
        &metrics,
    )
    .unwrap();
    tokio::spawn(store.clone().probe(CancellationToken::new()));
    while !store.is_up() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let config = BudgetConfig {
        max_concurrency: max,
        ..BudgetConfig::default()
    };
    Gate::shared(&config, "bench", &metrics, store)
}

/// The two cases for one kind of gate: an uncontended acquire + observe + release through
/// `one`, and 8 tasks through `four` (a gate of 4 slots).
fn gate_cases(
    c: &mut Criterion,
    rt: &tokio::runtime::Runtime,
    prefix: &str,
    one: &'static Gate,
    four: &'static Gate,
    headers: &'static HeaderMap,
) {
    c.bench_function(&format!("{prefix}/acquire_observe_release"), |b| {
        b.to_async(rt).iter(|| async move {
            let permit = one.acquire(BucketKey::Application).await.unwrap();
            one.observe(BucketKey::Application, StatusCode::OK, headers, None);
            drop(black_box(permit));
        })
    });
    c.bench_function(&format!("{prefix}/8_tasks_through_4_slots"), |b| {
        b.to_async(rt).iter(|| async move {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let g = four.clone();
                    tokio::spawn(async move {
                        let permit = g.acquire(BucketKey::Application).await.unwrap();
                        tokio::task::yield_now().await;
                        drop(permit);
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        })
    });
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // 'static, so each iteration's future can borrow them.
    let headers: &'static HeaderMap = Box::leak(Box::new(dataverse_headers()));
    let one: &'static Gate = Box::leak(Box::new(gate(52)));
    let four: &'static Gate = Box::leak(Box::new(gate(4)));
    gate_cases(c, &rt, "budget", one, four, headers);
    let Some(server) = RedisServer::start() else {
        eprintln!("redis-server is not installed: skipping the shared-store cases");
        return;
    };
    let one: &'static Gate = Box::leak(Box::new(rt.block_on(shared_gate(server.1, 52, "one"))));
    let four: &'static Gate = Box::leak(Box::new(rt.block_on(shared_gate(server.1, 4, "four"))));
    gate_cases(c, &rt, "budget/shared", one, four, headers);
    drop(server);
}

criterion_group!(budget, benches);
criterion_main!(budget);
