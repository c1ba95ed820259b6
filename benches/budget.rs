//! Overhead of the service-protection gate per request (it sits on the hot path): one
//! uncontended acquire + observe + release, and the same with 8 tasks sharing a gate of 4
//! (so requests queue and are handed slots).
//!
//! Run: `cargo bench --bench budget`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use dynamics_gateway::config::BudgetConfig;
use dynamics_gateway::metrics::Metrics;
use dynamics_gateway::upstream::budget::{BucketKey, Gate};
use http::{HeaderMap, HeaderValue, StatusCode};

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

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // 'static, so each iteration's future can borrow them.
    let headers: &'static HeaderMap = Box::leak(Box::new(dataverse_headers()));
    let g: &'static Gate = Box::leak(Box::new(gate(52)));
    c.bench_function("budget/acquire_observe_release", |b| {
        b.to_async(&rt).iter(|| async move {
            let permit = g.acquire(BucketKey::Application).await.unwrap();
            g.observe(BucketKey::Application, StatusCode::OK, headers, None);
            drop(black_box(permit));
        })
    });
    let contended: &'static Gate = Box::leak(Box::new(gate(4)));
    c.bench_function("budget/8_tasks_through_4_slots", |b| {
        b.to_async(&rt).iter(|| async move {
            let tasks: Vec<_> = (0..8)
                .map(|_| {
                    let g = contended.clone();
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

criterion_group!(budget, benches);
criterion_main!(budget);
