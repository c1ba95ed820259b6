#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;

fn config(max: usize, queue: usize) -> BudgetConfig {
    BudgetConfig {
        max_concurrency: max,
        max_queue: queue,
        queue_timeout: Duration::from_secs(10),
        max_retry_after: Duration::from_secs(300),
        bucket: BudgetBucket::Application,
    }
}

fn gate(max: usize, queue: usize) -> (Gate, Metrics) {
    let metrics = Metrics::new().unwrap();
    (Gate::new(&config(max, queue), "test", &metrics), metrics)
}

fn throttled(retry_after: &str, _code: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("retry-after", retry_after.parse().unwrap());

    h
}

#[tokio::test(start_paused = true)]
async fn at_most_limit_in_flight_and_waiters_served_in_order() {
    let (gate, _m) = gate(2, 10);
    let key = BucketKey::Application;
    let a = gate.acquire(key).await.unwrap();
    let _b = gate.acquire(key).await.unwrap();
    let g = gate.clone();
    let third = tokio::spawn(async move { g.acquire(key).await.map(|_| ()) });
    tokio::task::yield_now().await;
    assert!(
        !third.is_finished(),
        "a third request went past a limit of 2"
    );
    drop(a);
    third.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_queue_deadline_answers_queue_timeout_and_leaves_nothing_queued() {
    let (gate, m) = gate(1, 10);
    let key = BucketKey::Application;
    let _held = gate.acquire(key).await.unwrap();
    let started = Instant::now();
    let err = gate.acquire(key).await.err().unwrap();
    assert!(matches!(err, BudgetError::QueueTimeout { .. }), "{err}");
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    assert_eq!(m.budget_queue_depth.with_label_values(&["test"]).get(), 0);
    assert_eq!(
        m.budget_refused_total
            .with_label_values(&["test", "queue_timeout"])
            .get(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_at_once() {
    let (gate, _m) = gate(1, 2);
    let key = BucketKey::Application;
    let _held = gate.acquire(key).await.unwrap();
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let g = gate.clone();
            tokio::spawn(async move { g.acquire(key).await.map(|_| ()) })
        })
        .collect();
    tokio::task::yield_now().await;
    let err = gate.acquire(key).await.err().unwrap();
    assert!(matches!(err, BudgetError::QueueFull(2)), "{err}");
    for w in waiting {
        w.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_goes_away_leaves_the_queue_and_a_late_grant_is_not_lost() {
    let (gate, m) = gate(1, 10);
    let key = BucketKey::Application;
    let held = gate.acquire(key).await.unwrap();
    let g = gate.clone();
    let gone = tokio::spawn(async move { g.acquire(key).await.map(|_| ()) });
    tokio::task::yield_now().await;
    assert_eq!(m.budget_queue_depth.with_label_values(&["test"]).get(), 1);
    gone.abort();
    let _ = gone.await;
    assert_eq!(m.budget_queue_depth.with_label_values(&["test"]).get(), 0);
    drop(held);
    // The slot is free again: not handed to the departed waiter.
    let again = gate.acquire(key).await.unwrap();
    assert_eq!(
        m.budget_in_flight
            .with_label_values(&["test", "application"])
            .get(),
        1
    );
    drop(again);
    assert_eq!(
        m.budget_in_flight
            .with_label_values(&["test", "application"])
            .get(),
        0
    );
}

#[tokio::test(start_paused = true)]
async fn a_429_closes_the_bucket_until_retry_after_and_answers_the_remaining_time() {
    let (gate, m) = gate(4, 10);
    let key = BucketKey::Application;
    let p = gate.acquire(key).await.unwrap();
    gate.observe(
        key,
        StatusCode::TOO_MANY_REQUESTS,
        &throttled("30", ""),
        Some("0x80072322"),
    );
    drop(p);
    tokio::time::advance(Duration::from_secs(10)).await;
    match gate.acquire(key).await {
        Err(BudgetError::Throttled { retry_after, code }) => {
            assert_eq!(retry_after, Duration::from_secs(20));
            assert_eq!(code, ThrottleCode::Requests);
        }
        other => panic!("expected Throttled, got {:?}", other.map(|_| ())),
    }
    assert_eq!(
        m.upstream_throttled_total
            .with_label_values(&["test", "0x80072322"])
            .get(),
        1
    );
    tokio::time::advance(Duration::from_secs(20)).await;
    gate.acquire(key).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_absurd_retry_after_is_clamped() {
    let (gate, _m) = gate(4, 10);
    let key = BucketKey::Application;
    let p = gate.acquire(key).await.unwrap();
    gate.observe(
        key,
        StatusCode::TOO_MANY_REQUESTS,
        &throttled("99999999", ""),
        None,
    );
    drop(p);
    match gate.acquire(key).await {
        Err(BudgetError::Throttled { retry_after, code }) => {
            assert_eq!(retry_after, Duration::from_secs(300));
            assert_eq!(code, ThrottleCode::Other);
        }
        other => panic!("expected Throttled, got {:?}", other.map(|_| ())),
    }
    tokio::time::advance(Duration::from_secs(300)).await;
    gate.acquire(key).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn waiters_are_answered_at_once_when_the_bucket_closes() {
    let (gate, _m) = gate(1, 10);
    let key = BucketKey::Application;
    let p = gate.acquire(key).await.unwrap();
    let g = gate.clone();
    let waiting = tokio::spawn(async move { g.acquire(key).await.map(|_| ()) });
    tokio::task::yield_now().await;
    let started = Instant::now();
    gate.observe(
        key,
        StatusCode::TOO_MANY_REQUESTS,
        &throttled("5", ""),
        Some("0x80072321"),
    );
    let err = waiting.await.unwrap().err().unwrap();
    assert!(
        matches!(
            err,
            BudgetError::Throttled {
                code: ThrottleCode::ExecutionTime,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
    drop(p);
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_429_halves_the_limit_and_answers_grow_it_back_by_one() {
    let (gate, m) = gate(8, 10);
    let key = BucketKey::Application;
    let p = gate.acquire(key).await.unwrap();
    gate.observe(
        key,
        StatusCode::TOO_MANY_REQUESTS,
        &HeaderMap::new(),
        Some("0x80072326"),
    );
    assert_eq!(gate.limit(key), 4);
    assert_eq!(
        m.budget_limit
            .with_label_values(&["test", "application"])
            .get(),
        4
    );
    for _ in 0..4 {
        gate.observe(key, StatusCode::OK, &HeaderMap::new(), None);
    }
    assert_eq!(gate.limit(key), 5);
    for _ in 0..100 {
        gate.observe(key, StatusCode::OK, &HeaderMap::new(), None);
    }
    assert_eq!(gate.limit(key), 8, "never above the configured maximum");
    drop(p);
}

#[tokio::test(start_paused = true)]
async fn the_dop_hint_lowers_the_limit_and_never_raises_it_past_the_maximum() {
    let (gate, _m) = gate(10, 10);
    let key = BucketKey::Application;
    let p = gate.acquire(key).await.unwrap();
    let mut h = HeaderMap::new();
    h.insert("x-ms-dop-hint", "3".parse().unwrap());
    gate.observe(key, StatusCode::OK, &h, None);
    assert_eq!(gate.limit(key), 3);
    let _b = gate.acquire(key).await.unwrap();
    let _c = gate.acquire(key).await.unwrap();
    let g = gate.clone();
    let fourth = tokio::spawn(async move { g.acquire(key).await.map(|_| ()) });
    tokio::task::yield_now().await;
    assert!(!fourth.is_finished());
    h.insert("x-ms-dop-hint", "500".parse().unwrap());
    gate.observe(key, StatusCode::OK, &h, None);
    assert_eq!(gate.limit(key), 10);
    fourth.await.unwrap().unwrap();
    h.insert("x-ms-dop-hint", "0".parse().unwrap());
    gate.observe(key, StatusCode::OK, &h, None);
    assert_eq!(
        gate.limit(key),
        10,
        "a hint of 0 is ignored, not a closed gate"
    );
    drop(p);
}

#[tokio::test(start_paused = true)]
async fn per_user_buckets_are_separate_and_forgotten_when_idle() {
    let metrics = Metrics::new().unwrap();
    let mut cfg = config(1, 10);
    cfg.bucket = BudgetBucket::ImpersonatedUser;
    let gate = Gate::new(&cfg, "test", &metrics);
    let users: Vec<_> = (0..50u128)
        .map(|i| gate.bucket_for(&Impersonation::CallerObjectId(Uuid::from_u128(i))))
        .collect();
    let permits: Vec<_> = {
        let mut v = Vec::new();
        for u in &users {
            v.push(gate.acquire(*u).await.unwrap());
        }
        v
    };
    assert_eq!(
        metrics
            .budget_in_flight
            .with_label_values(&["test", "users"])
            .get(),
        50
    );
    assert_eq!(
        gate.bucket_for(&Impersonation::ApplicationUser),
        BucketKey::Application
    );
    drop(permits);
    assert_eq!(gate.bucket_count(), 0, "idle user buckets are kept");
    let series = metrics.render();
    assert!(!series.contains(&Uuid::from_u128(1).to_string()));
}

#[test]
fn numbers_are_read_as_dataverse_writes_them() {
    let mut h = HeaderMap::new();
    h.insert(TIME_REMAINING, "1,200,000.00".parse().unwrap());
    h.insert(BURST_REMAINING, "nonsense".parse().unwrap());
    assert_eq!(header_number(&h, TIME_REMAINING), Some(1_200_000.0));
    assert_eq!(header_number(&h, BURST_REMAINING), None);
    assert_eq!(
        ThrottleCode::from_code(Some("0X80072326")),
        ThrottleCode::Concurrency
    );
    assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
}

#[test]
fn a_replicas_share_divides_the_limit_and_is_never_zero() {
    // The dop hint caps first, then the share is taken: 52 by 2 replicas is 26 each.
    assert_eq!(super::effective_limit(52, 52, 2), 26);
    assert_eq!(super::effective_limit(52, 10, 3), 3);
    // A share below one still lets one request through: never "refuse everything".
    assert_eq!(super::effective_limit(52, 3, 4), 1);
    assert_eq!(super::effective_limit(1, 52, 3), 1);
    assert_eq!(super::effective_limit(5, 52, 1), 5);
}

#[test]
fn dataverse_budget_gauges_appear_on_the_first_plausible_report_only() {
    let (gate, metrics) = gate(4, 10);
    let series = "dynamics_gateway_dataverse_burst_remaining_requests{environment=\"test\"}";
    let time = "dynamics_gateway_dataverse_time_remaining_ms{environment=\"test\"}";
    let report = |burst: &str, ms: &str| {
        let mut h = HeaderMap::new();
        h.insert(BURST_REMAINING, burst.parse().unwrap());
        h.insert(TIME_REMAINING, ms.parse().unwrap());
        gate.observe(BucketKey::Application, StatusCode::OK, &h, None);
    };
    assert!(
        !metrics.render().contains(series),
        "no series before Dataverse reported: 0 would read as an exhausted budget"
    );
    report("-5", "1e30");
    report("NaN", "-1");
    assert!(!metrics.render().contains(series), "{}", metrics.render());
    assert!(!metrics.render().contains(time));
    report("5990", "1199000");
    let text = metrics.render();
    assert!(text.contains(&format!("{series} 5990")), "{text}");
    assert!(text.contains(&format!("{time} 1199000")), "{text}");
    report("1e30", "-3");
    let text = metrics.render();
    assert!(
        text.contains(&format!("{series} 5990")),
        "an absurd report keeps the last one"
    );
    assert!(text.contains(&format!("{time} 1199000")));
}
