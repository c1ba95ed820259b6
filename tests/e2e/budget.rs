//! Dataverse's service-protection budget kept by the gateway, through the real gateway on
//! 127.0.0.1 against a stand-in Dataverse that throttles like the real one.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::time::Duration;

use dynamics_gateway::config::Config;
use support::{at_most, expect_error, metric, GatewayHandle, ALICE_OID};
use testkit::{gateway_config_yaml, ConfigParts, DataverseHandle, IdpHandle, Throttling};

const WHOAMI: &str = "/api/data/v9.2/WhoAmI";
const APP: &str = "{bucket=\"application\",environment=\"default\"}";

struct Setup {
    idp: IdpHandle,
    dataverse: DataverseHandle,
    gateway: GatewayHandle,
}

impl Setup {
    fn token(&self) -> String {
        self.idp.token_for(ALICE_OID)
    }
}

async fn start(throttling: Throttling, dynamics: &str) -> Setup {
    let (idp, dataverse) = support::stand_ins(throttling).await;
    let parts = ConfigParts {
        identity: support::CALLER_OBJECT_ID.into(),
        inbound: "  jwks_refetch_interval: 0s\n".into(),
        dynamics: dynamics.into(),
        ..ConfigParts::default()
    };
    let gateway =
        support::start_gateway(&gateway_config_yaml(&idp, &dataverse.url(), &parts)).await;
    gateway.wait_ready().await;
    Setup {
        idp,
        dataverse,
        gateway,
    }
}

#[tokio::test]
async fn a_burst_of_200_never_has_more_than_the_limit_in_flight_and_sees_no_429() {
    let s = start(
        at_most(5),
        "  budget: { max_concurrency: 5, queue_timeout: 30s }\n",
    )
    .await;
    s.dataverse.set_delay(Duration::from_millis(20));
    let statuses = support::concurrent_gets(&s.gateway, WHOAMI, &s.token(), 200).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        s.dataverse.max_in_flight() <= 5,
        "{}",
        s.dataverse.max_in_flight()
    );
    assert!(
        s.dataverse.max_in_flight() >= 2,
        "the burst never overlapped"
    );
    assert_eq!(s.dataverse.throttled_count(), 0);
    assert_eq!(s.dataverse.request_count(), 200);
    let in_flight = format!("dynamics_gateway_budget_in_flight{APP}");
    assert_eq!(metric(&s.gateway, &in_flight).await, 0.0, "slots leaked");
    let waited = "dynamics_gateway_budget_wait_seconds_count{environment=\"default\"}";
    assert!(metric(&s.gateway, waited).await > 0.0, "nobody queued");
}

#[tokio::test]
async fn without_the_gate_the_same_burst_is_throttled_and_the_limit_halves() {
    // The control for the test above: a gate wider than Dataverse's limit lets 429s through,
    // and their code (read from the body) lowers the limit.
    let s = start(at_most(5), "  budget: { max_concurrency: 40 }\n").await;
    s.dataverse.set_delay(Duration::from_millis(50));
    let statuses = support::concurrent_gets(&s.gateway, WHOAMI, &s.token(), 40).await;
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(s.dataverse.throttled_count() > 0);
    let throttled =
        "dynamics_gateway_upstream_throttled_total{code=\"0x80072326\",environment=\"default\"}";
    assert!(metric(&s.gateway, throttled).await > 0.0);
    let limit = metric(&s.gateway, &format!("dynamics_gateway_budget_limit{APP}")).await;
    assert!((1.0..=20.0).contains(&limit), "limit {limit}");
}

#[tokio::test]
async fn after_a_429_nothing_reaches_dataverse_until_retry_after_has_passed() {
    let s = start(Throttling::default(), "").await;
    s.dataverse.respond_next(
        1,
        429,
        vec![("Retry-After".into(), "2".into())],
        r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}"#,
    );
    let first = support::get(&s.gateway, WHOAMI, s.token()).await;
    assert_eq!(first.status(), 429);
    assert_eq!(first.headers()["retry-after"], "2");
    for _ in 0..10 {
        let r = support::get(&s.gateway, WHOAMI, s.token()).await;
        let retry_after: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=2).contains(&retry_after), "{retry_after}");
        let message = expect_error(r, 429, "0x80072322").await;
        assert!(message.contains("Retry-After"), "{message}");
    }
    assert_eq!(
        s.dataverse.request_count(),
        1,
        "a request was sent into the penalty"
    );
    let refused =
        "dynamics_gateway_budget_refused_total{environment=\"default\",reason=\"throttled\"}";
    assert_eq!(metric(&s.gateway, refused).await, 10.0);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let after = support::get(&s.gateway, WHOAMI, s.token()).await;
    assert_eq!(after.status(), 200);
    assert_eq!(s.dataverse.request_count(), 2);
}

#[tokio::test]
async fn a_retried_429_waits_on_the_same_gate_while_others_are_answered_at_once() {
    let s = start(
        Throttling::default(),
        "  retry_throttled: { enabled: true, max_wait: 5s }\n",
    )
    .await;
    s.dataverse.respond_next(
        1,
        429,
        vec![("Retry-After".into(), "1".into())],
        r#"{"error":{"code":"0x80072321","message":"Combined execution time of incoming requests exceeded limit of 1,200,000 milliseconds over time window of 300 seconds."}}"#,
    );
    let request = support::client()
        .get(format!("{}{WHOAMI}", s.gateway.url()))
        .bearer_auth(s.token());
    let retried = tokio::spawn(async move { request.send().await.unwrap().status() });
    while s.dataverse.request_count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let other = support::get(&s.gateway, WHOAMI, s.token()).await;
    expect_error(other, 429, "0x80072321").await;
    assert_eq!(retried.await.unwrap(), 200);
    assert_eq!(s.dataverse.request_count(), 2);
}

#[tokio::test]
async fn the_queue_deadline_answers_503_with_retry_after() {
    let s = start(
        Throttling::default(),
        "  budget: { max_concurrency: 1, queue_timeout: 200ms }\n",
    )
    .await;
    s.dataverse.set_delay(Duration::from_secs(1));
    let statuses = support::concurrent_gets(&s.gateway, WHOAMI, &s.token(), 3).await;
    let mut sorted = statuses.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![200, 503, 503], "{statuses:?}");
    assert_eq!(s.dataverse.request_count(), 1);
    s.dataverse.set_delay(Duration::from_secs(1));
    let request = support::client()
        .get(format!("{}{WHOAMI}", s.gateway.url()))
        .bearer_auth(s.token());
    let slow = tokio::spawn(async move { request.send().await.unwrap().status() });
    while s.dataverse.request_count() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = support::get(&s.gateway, WHOAMI, s.token()).await;
    assert!(r.headers().contains_key("retry-after"));
    expect_error(r, 503, "DynamicsGateway.BudgetQueueTimeout").await;
    assert_eq!(slow.await.unwrap(), 200);
}

#[tokio::test]
async fn the_dop_hint_lowers_the_limit() {
    let s = start(
        Throttling {
            dop_hint: Some(3),
            ..at_most(3)
        },
        "",
    )
    .await;
    // The first answer carries the hint.
    assert_eq!(
        support::get(&s.gateway, WHOAMI, s.token()).await.status(),
        200
    );
    let limit = format!("dynamics_gateway_budget_limit{APP}");
    assert_eq!(metric(&s.gateway, &limit).await, 3.0);
    s.dataverse.set_delay(Duration::from_millis(20));
    let statuses = support::concurrent_gets(&s.gateway, WHOAMI, &s.token(), 60).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        s.dataverse.max_in_flight() <= 3,
        "{}",
        s.dataverse.max_in_flight()
    );
    assert_eq!(s.dataverse.throttled_count(), 0);
}

#[tokio::test]
async fn dataverse_rate_limit_headers_are_gauges_per_environment() {
    let s = start(Throttling::default(), "").await;
    assert_eq!(
        support::get(&s.gateway, WHOAMI, s.token()).await.status(),
        200
    );
    let burst = "dynamics_gateway_dataverse_burst_remaining_requests{environment=\"default\"}";
    let time = "dynamics_gateway_dataverse_time_remaining_ms{environment=\"default\"}";
    assert_eq!(metric(&s.gateway, burst).await, 5999.0);
    assert_eq!(metric(&s.gateway, time).await, 1_200_000.0);
}

/// A minimal config, needing no stand-in, with `budget` as `dynamics.budget`.
fn with_budget(budget: &str) -> String {
    format!(
        "inbound:\n  issuers:\n    - issuer: https://login.microsoftonline.com/t/v2.0\n      audiences: [api://x]\n\
dynamics:\n  url: https://contoso.crm.dynamics.com\n  tenant_id: t\n  client_id: c\n  client_secret: s\n  budget: {budget}\n"
    )
}

#[test]
fn budget_config_is_checked_and_errors_name_the_key() {
    for (budget, key) in [
        ("{ queue_timeout: 10 }", "dynamics.budget.queue_timeout"),
        ("{ max_concurrency: 0 }", "dynamics.budget.max_concurrency"),
        (
            "{ max_concurrency: 99999999999 }",
            "dynamics.budget.max_concurrency",
        ),
        (
            "{ max_queue: 18446744073709551615 }",
            "dynamics.budget.max_queue",
        ),
        ("{ max_retry_after: 0s }", "dynamics.budget.max_retry_after"),
        ("{ queue_timeout: 1000d }", "dynamics.budget.queue_timeout"),
        ("{ bucket: everyone }", "dynamics.budget.bucket"),
        (
            "{ max_retry_after: soon }",
            "dynamics.budget.max_retry_after",
        ),
    ] {
        let err = Config::from_yaml(&with_budget(budget), &|_| None).unwrap_err();
        assert!(err.to_string().contains(key), "{budget}: {err}");
    }
    let err = Config::from_yaml(&with_budget("{ limit: 3 }"), &|_| None).unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    let ok = Config::from_yaml(
        &with_budget("{ max_concurrency: 7, bucket: impersonated_user, queue_timeout: 2s }"),
        &|_| None,
    )
    .unwrap();
    let b = &ok.dynamics.environments[0].budget;
    assert_eq!(b.max_concurrency, 7);
    assert_eq!(b.queue_timeout, Duration::from_secs(2));
}

#[test]
fn the_shared_store_is_checked_and_its_url_never_appears_in_an_error() {
    let store = |valkey: &str| format!("{{ store: {{ valkey: {valkey} }} }}");
    const PW: &str = "hunter2-store";
    for (valkey, key) in [
        (
            format!("{{ url: \"rediss://:{PW}@cache:6380\", replicas: 2 }}"),
            "dynamics.budget.store.valkey.url",
        ),
        (
            format!("{{ url: \"http://:{PW}@cache\", replicas: 2 }}"),
            "dynamics.budget.store.valkey.url",
        ),
        (
            format!("{{ url: \"redis//:{PW}@cache\", replicas: 2 }}"),
            "dynamics.budget.store.valkey.url",
        ),
        (
            format!("{{ url: \"redis://:{PW}%zz@cache\", replicas: 2 }}"),
            "dynamics.budget.store.valkey.url",
        ),
        (
            format!("{{ url: \"redis://:{PW}%FF%FE@cache\", replicas: 2 }}"),
            "dynamics.budget.store.valkey.url",
        ),
        (
            format!("{{ url: \"redis://:{PW}@cache/first\", replicas: 2 }}"),
            "dynamics.budget.store.valkey.url",
        ),
        (
            format!("{{ url: \"redis://:{PW}@cache\", replicas: 0 }}"),
            "dynamics.budget.store.valkey.replicas",
        ),
        (
            format!("{{ url: \"redis://:{PW}@cache\", replicas: 100 }}"),
            "dynamics.budget.store.valkey.replicas",
        ),
        (
            format!("{{ url: \"redis://:{PW}@cache/0?x=1\", replicas: 2 }}"),
            "dynamics.budget.store.valkey.url",
        ),
        (
            format!("{{ url: \"redis://:{PW}@cache\", replicas: 2, lease_ttl: 100000000000d }}"),
            "dynamics.budget.store.valkey.lease_ttl",
        ),
        (
            format!("{{ url: \"redis://:{PW}@cache\", replicas: 2, lease_ttl: 500ms }}"),
            "dynamics.budget.store.valkey.lease_ttl",
        ),
        (
            format!("{{ url: \"redis://:{PW}@cache\", replicas: 2, lease_ttl: 3s, command_timeout: 1s }}"),
            "dynamics.budget.store.valkey.command_timeout",
        ),
        (
            format!("{{ url: \"redis://:{PW}@cache\", replicas: 2, key_prefix: \"\" }}"),
            "dynamics.budget.store.valkey.key_prefix",
        ),
    ] {
        let err = Config::from_yaml(&with_budget(&store(&valkey)), &|_| None).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(key), "{valkey}: {text}");
        assert!(!text.contains(PW), "the password is in the error: {text}");
        assert!(!format!("{err:?}").contains(PW), "{err:?}");
    }
    let err = Config::from_yaml(&with_budget(&store("{ url: \"redis://cache\" }")), &|_| {
        None
    })
    .unwrap_err();
    assert!(err.to_string().contains("replicas"), "{err}");
    let ok = Config::from_yaml(
        &with_budget(&store(&format!(
            "{{ url: \"redis://:{PW}%25%40@cache:6379/2\", replicas: 3 }}"
        ))),
        &|_| None,
    )
    .unwrap();
    let s = ok.dynamics.budget_store.as_ref().expect("a store");
    assert_eq!(s.replicas, 3);
    assert_eq!(s.lease_ttl, Duration::from_secs(30));
    assert_eq!(s.key_prefix, "dynamics-gateway");
    assert!(
        !format!("{ok:?}").contains(PW),
        "the password is in the config's Debug"
    );
    // One store for every environment: not per environment.
    let per_env = "inbound:\n  issuers:\n    - issuer: https://login.microsoftonline.com/t/v2.0\n      audiences: [api://x]\n\
dynamics:\n  routing: { by: path_prefix }\n  environments:\n    - name: contoso\n      url: https://contoso.crm.dynamics.com\n      tenant_id: t\n      client_id: c\n      client_secret: s\n      budget: { store: { valkey: { url: \"redis://cache\", replicas: 2 } } }\n";
    let err = Config::from_yaml(per_env, &|_| None).unwrap_err();
    assert!(err.to_string().contains("dynamics.budget.store"), "{err}");
}

#[tokio::test]
async fn callers_hanging_up_do_not_free_the_slots_dataverse_is_still_working_on() {
    // Dataverse goes on with a request whose caller hung up (the stand-in, like the real
    // service, finishes each request in its own task): the slot stays taken until its
    // answer's head is in, or a stream of impatient callers would have many times the
    // limit running there.
    let s = start(
        Throttling::default(),
        "  budget: { max_concurrency: 2, queue_timeout: 30s }\n",
    )
    .await;
    s.dataverse.set_delay(Duration::from_millis(800));
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let url = format!("{}{WHOAMI}", s.gateway.url());
    let mut waves = Vec::new();
    for _ in 0..6 {
        for _ in 0..3 {
            let request = impatient.get(&url).bearer_auth(s.token()).send();
            waves.push(tokio::spawn(request));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    for caller in waves {
        assert!(caller.await.unwrap().is_err(), "every caller gave up");
    }
    // Until the stand-in has finished everything it was given and its answers are in.
    let in_flight = format!("dynamics_gateway_budget_in_flight{APP}");
    for _ in 0..100 {
        if s.dataverse.in_flight() == 0 && metric(&s.gateway, &in_flight).await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        s.dataverse.request_count() >= 2,
        "nothing reached Dataverse"
    );
    assert!(
        s.dataverse.max_in_flight() <= 2,
        "{} requests in flight at Dataverse with a limit of 2",
        s.dataverse.max_in_flight()
    );
    assert_eq!(metric(&s.gateway, &in_flight).await, 0.0, "slots leaked");
    let after = support::get(&s.gateway, WHOAMI, s.token()).await;
    assert_eq!(after.status(), 200, "the slots came back");
}

#[tokio::test]
async fn a_429_with_retry_after_zero_or_none_still_closes_the_bucket() {
    for retry_after in [Some("0"), None] {
        let s = start(Throttling::default(), "").await;
        let headers = retry_after
            .map(|v| vec![("Retry-After".to_owned(), v.to_owned())])
            .unwrap_or_default();
        s.dataverse.respond_next(
            1,
            429,
            headers,
            r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}"#,
        );
        let first = support::get(&s.gateway, WHOAMI, s.token()).await;
        assert_eq!(first.status(), 429);
        let next = support::get(&s.gateway, WHOAMI, s.token()).await;
        assert_eq!(next.status(), 429, "{retry_after:?}: sent into the penalty");
        assert_eq!(next.headers()["retry-after"], "1");
        assert_eq!(
            s.dataverse.request_count(),
            1,
            "{retry_after:?}: the next request reached Dataverse"
        );
    }
}
