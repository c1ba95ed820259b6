//! The gateway's in-process request path, without sockets, as far as the code allows.
//!
//! `Pipeline::handle` takes a `Request<hyper::body::Incoming>`, and hyper gives no way to
//! make an `Incoming` outside a connection, so the whole handler cannot run without a
//! socket. These benches therefore run the same public pieces `Pipeline::process` and
//! `Forwarder::forward` call, in the same order, on a real `Gateway`:
//!
//! - `pipeline/in_process_path`: path check -> `Authenticator::authenticate` (RS256, a
//!   repeated token) -> `IdentityResolver::resolve` -> the two `LinkRewrite`s ->
//!   header copy + `prepare_upstream_request` -> upstream URI -> response header rewrite
//!   and the JSON link rewrite of a `WhoAmI` body -> the per-request metrics.
//! - the pieces on their own: `authenticate`, `identity_resolve`,
//!   `prepare_upstream_request`, `metrics`, and `odata_links::rewrite_json` on a
//!   5000-row page (whole buffer and in 16 KiB chunks, as bodies arrive).
//!
//! Run: `cargo bench --bench pipeline`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::hint::black_box;
use std::net::SocketAddr;

use common::{bearer_headers, Alg, Fixture};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dynamics_gateway::identity::Impersonation;
use dynamics_gateway::metrics::Metrics;
use dynamics_gateway::request_target::proxied_path_and_query;
use dynamics_gateway::upstream::headers::{prepare_upstream_request, strip_hop_by_hop};
use dynamics_gateway::upstream::odata_links::{
    rewrite_json, JsonKeys, JsonLinkRewriter, LinkRewrite,
};
use http::{HeaderMap, HeaderValue, Uri};
use serde_json::json;

const ORG: &str = "https://contoso.crm.dynamics.com";
const PUBLIC: &str = "http://127.0.0.1:8080";

/// What an app sends through the gateway: a Web API GET with the usual OData headers.
fn caller_headers(token: &str) -> HeaderMap {
    let mut h = bearer_headers(token);
    for (name, value) in [
        ("host", "127.0.0.1:8080"),
        ("accept", "application/json"),
        ("odata-version", "4.0"),
        ("odata-maxversion", "4.0"),
        ("prefer", "odata.include-annotations=\"*\""),
        ("user-agent", "contoso-app/1.0"),
        ("connection", "keep-alive"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    h
}

/// Response headers of a typical Dataverse answer.
fn dataverse_response_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, value) in [
        ("cache-control", "no-cache"),
        ("content-type", "application/json; odata.metadata=minimal"),
        ("odata-version", "4.0"),
        ("req_id", "3c2a7c2e-8d7e-4a55-9a4c-5d9e1b7e6f10"),
        (
            "x-ms-service-request-id",
            "3c2a7c2e-8d7e-4a55-9a4c-5d9e1b7e6f10",
        ),
        ("x-ms-ratelimit-burst-remaining-xrm-requests", "5999"),
        ("x-ms-ratelimit-time-remaining-xrm-requests", "1,200,000.00"),
        (
            "strict-transport-security",
            "max-age=31536000; includeSubDomains",
        ),
        ("connection", "keep-alive"),
        ("date", "Tue, 25 Nov 2025 15:00:00 GMT"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    h
}

fn whoami_body() -> Vec<u8> {
    json!({
        "@odata.context": format!("{ORG}/api/data/v9.2/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse"),
        "BusinessUnitId": "1d3f5b7a-9c2e-4a6b-8d0f-2e4a6c8e0b13",
        "UserId": "3f2504e0-4f89-11d3-9a0c-0305e82c3301",
        "OrganizationId": "7a9c1e3b-5d2f-4b8a-a6c4-0e2b4d6f8a97",
    })
    .to_string()
    .into_bytes()
}

/// A 5000-row `accounts` page as Dataverse sends it with annotations: each row has an
/// etag, formatted values and a lookup; the page ends with an `@odata.nextLink`.
fn accounts_page(rows: usize) -> Vec<u8> {
    let mut out = format!(
        "{{\"@odata.context\":\"{ORG}/api/data/v9.2/$metadata#accounts(name,revenue,_ownerid_value,createdon)\",\"value\":["
    );
    for i in 0..rows {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!(
            "{{\"@odata.etag\":\"W/\\\"{v}\\\"\",\"accountid\":\"{id}\",\"name\":\"Account {i}\",\
\"revenue@OData.Community.Display.V1.FormattedValue\":\"${i},000.00\",\"revenue\":{i}000.0,\
\"_ownerid_value@Microsoft.Dynamics.CRM.lookuplogicalname\":\"systemuser\",\
\"_ownerid_value\":\"3f2504e0-4f89-11d3-9a0c-0305e82c3301\",\"createdon\":\"2024-05-01T10:00:00Z\"}}",
            v = 468_000 + i,
            id = uuid::Uuid::from_u128(i as u128 + 1),
        ));
    }
    out.push_str(&format!(
        "],\"@odata.nextLink\":\"{ORG}/api/data/v9.2/accounts?$select=name,revenue,_ownerid_value,createdon&$skiptoken=%3Ccookie%20pagenumber=%222%22%20/%3E\"}}"
    ));
    out.into_bytes()
}

/// What every answered request records: its count and its duration.
fn record_request(metrics: &Metrics) {
    metrics
        .requests_total
        .with_label_values(&["default", "GET", "200"])
        .inc();
    metrics
        .request_duration_seconds
        .with_label_values(&["default", "GET"])
        .observe(0.001);
}

fn benches(c: &mut Criterion) {
    let fx = Fixture::new();
    let pipeline = &fx.gateway.pipeline;
    let token = fx.token(Alg::Rs256);
    let request_headers = caller_headers(&token);
    let uri: Uri = "/api/data/v9.2/WhoAmI".parse().unwrap();
    let peer: SocketAddr = "127.0.0.1:50000".parse().unwrap();
    let request_id = HeaderValue::from_static("5b1e2a6c-0f4d-4c3b-9e8a-7d6c5b4a3f21");
    let s2s = HeaderValue::from_static("Bearer eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.s2s-token-stand-in-of-realistic-length-for-the-header-copy.c2lnbmF0dXJl");
    let client = pipeline.router.environments()[0].upstream.client();
    let response_headers = dataverse_response_headers();
    let whoami = whoami_body();
    let caller = fx
        .rt
        .block_on(pipeline.inbound.authenticate(&request_headers))
        .unwrap();
    let impersonation = fx
        .rt
        .block_on(pipeline.router.environments()[0].identity.resolve(&caller))
        .unwrap();
    assert!(matches!(impersonation, Impersonation::CallerObjectId(_)));
    // The upstream header step, for a caller resolved to `impersonation`.
    let prepare = |headers: &mut HeaderMap, impersonation: &Impersonation| {
        prepare_upstream_request(headers, &s2s, impersonation, peer, false, &request_id)
    };

    c.bench_function("pipeline/in_process_path", |b| {
        b.to_async(&fx.rt).iter(|| async {
            let path_and_query = proxied_path_and_query(&uri).unwrap().to_string();
            let caller = pipeline
                .inbound
                .authenticate(&request_headers)
                .await
                .unwrap();
            let who = pipeline.router.environments()[0]
                .identity
                .caller_key(&caller)
                .to_string();
            let impersonation = pipeline.router.environments()[0]
                .identity
                .resolve(&caller)
                .await
                .unwrap();
            let to_upstream = LinkRewrite::new(PUBLIC, client.origin());
            let mut headers = request_headers.clone();
            prepare(&mut headers, &impersonation);
            let upstream_uri = client.uri(&path_and_query).unwrap();
            // Forwarder::forward clones the prepared headers into the request it sends.
            let sent = headers.clone();
            // The answer: hop-by-hop headers out, links pointed at the gateway.
            let mut answer = response_headers.clone();
            strip_hop_by_hop(&mut answer);
            answer.insert("x-request-id", request_id.clone());
            let to_gateway = LinkRewrite::new(client.origin(), PUBLIC);
            let mut body = Vec::with_capacity(whoami.len());
            let mut rw = JsonLinkRewriter::new(to_gateway, JsonKeys::ResponseLinks);
            rw.push(&whoami, &mut body);
            rw.finish(&mut body);
            record_request(&pipeline.metrics);
            pipeline
                .metrics
                .upstream_duration_seconds
                .with_label_values(&["default", "GET"])
                .observe(0.001);
            black_box((who, to_upstream, upstream_uri, sent, answer, body))
        })
    });

    c.bench_function("pipeline/authenticate_RS256_repeated", |b| {
        b.to_async(&fx.rt).iter(|| async {
            pipeline
                .inbound
                .authenticate(&request_headers)
                .await
                .unwrap()
        })
    });
    c.bench_function("pipeline/identity_resolve", |b| {
        b.to_async(&fx.rt).iter(|| async {
            pipeline.router.environments()[0]
                .identity
                .resolve(black_box(&caller))
                .await
                .unwrap()
        })
    });
    c.bench_function("pipeline/prepare_upstream_request", |b| {
        b.iter_batched_ref(
            || request_headers.clone(),
            |headers| prepare(headers, &impersonation),
            criterion::BatchSize::SmallInput,
        )
    });
    c.bench_function("pipeline/metrics", |b| {
        b.iter(|| {
            record_request(&pipeline.metrics);
        })
    });

    let page = accounts_page(5000);
    let rewrite = LinkRewrite::new(ORG, PUBLIC);
    let rewritten = rewrite_json(&rewrite, JsonKeys::ResponseLinks, &page);
    assert!(
        rewritten.starts_with(format!("{{\"@odata.context\":\"{PUBLIC}/").as_bytes()),
        "the page's links are rewritten"
    );
    let mut g = c.benchmark_group("pipeline/rewrite_json_5000_rows");
    g.throughput(Throughput::Bytes(page.len() as u64));
    g.bench_function("whole_buffer", |b| {
        b.iter(|| rewrite_json(&rewrite, JsonKeys::ResponseLinks, black_box(&page)))
    });
    g.bench_function("chunks_16KiB", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(page.len() + 1024);
            let mut rw = JsonLinkRewriter::new(rewrite.clone(), JsonKeys::ResponseLinks);
            for chunk in page.chunks(16 * 1024) {
                rw.push(chunk, &mut out);
            }
            rw.finish(&mut out);
            out
        })
    });
    g.finish();
}

criterion_group!(pipeline, benches);
criterion_main!(pipeline);
