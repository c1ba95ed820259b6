//! OpenTelemetry: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the real binary exports a span
//! per stage of a request over OTLP/HTTP to a receiver in the test, in the caller's trace
//! (`traceparent`) with the stages as children of the request span, and Dataverse gets a
//! `traceparent` naming the gateway's call span. Unset, nothing is exported and the
//! caller's trace context reaches Dataverse as sent. The audit line names the trace.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;
use crate::support::binary;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use binary::{binary_config, free_port, standins, start_binary_with_env, Binary};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use support::{client, ALICE_OID};
use testkit::{DataverseHandle, IdpHandle, RecordedRequest};
use tokio::net::TcpListener;

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
const WHOAMI: &str = "/api/data/v9.2/WhoAmI";

/// An OTLP/HTTP trace receiver: decodes every export and counts connections.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
    service_names: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start(&self) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                me.connections.fetch_add(1, Ordering::SeqCst);
                let me = me.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let me = me.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            if path == "/v1/traces" {
                                me.take(&body);
                            }
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        format!("http://{addr}")
    }

    fn take(&self, body: &[u8]) {
        let export = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
        for resource_spans in export.resource_spans {
            if let Some(resource) = resource_spans.resource {
                for attribute in resource.attributes {
                    if attribute.key == "service.name" {
                        let value = format!("{:?}", attribute.value);
                        self.service_names.lock().unwrap().push(value);
                    }
                }
            }
            for scope in resource_spans.scope_spans {
                self.spans.lock().unwrap().extend(scope.spans);
            }
        }
    }

    /// Waits (bounded) until spans with all of `names` have arrived.
    async fn spans_named(&self, names: &[&str]) -> Vec<Span> {
        for _ in 0..200 {
            let spans = self.spans.lock().unwrap().clone();
            if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got: Vec<String> = self
            .spans
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.name.clone())
            .collect();
        panic!("spans {names:?} did not all arrive; got {got:?}");
    }
}

struct Standins {
    idp: IdpHandle,
    dataverse: DataverseHandle,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn gateway(vars: &[(&str, String)]) -> (Binary, Standins) {
    let (idp, dataverse) = standins().await;
    let ports = (free_port(), free_port());
    let yaml = binary_config(&idp, &dataverse, support::CALLER_OBJECT_ID, ports);
    let binary = start_binary_with_env(&yaml, ports, vars).await;
    (binary, Standins { idp, dataverse })
}

async fn whoami(binary: &Binary, standins: &Standins, traceparent: &str) -> u16 {
    client()
        .get(format!("{}{WHOAMI}", binary.url))
        .bearer_auth(standins.idp.token_for(ALICE_OID))
        .header("traceparent", traceparent)
        .header("tracestate", "vendor=caller")
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// The WhoAmI request the stand-in Dataverse received from the gateway.
fn forwarded_whoami(dataverse: &DataverseHandle) -> RecordedRequest {
    dataverse
        .requests()
        .into_iter()
        .find(|r| r.path_and_query.ends_with("WhoAmI"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_stage_is_a_span_in_the_callers_trace_and_dataverse_is_handed_the_call_span() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let (mut binary, standins) = gateway(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        ("OTEL_SERVICE_NAME", "dgw-under-test".into()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
    ])
    .await;

    let status = whoami(
        &binary,
        &standins,
        &format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01"),
    )
    .await;
    assert_eq!(status, 200);

    let stages = [
        "request",
        "inbound.validate",
        "routing.access",
        "identity.resolve",
        "upstream",
        "s2s_token",
        "budget.wait",
        "dataverse.call",
    ];
    // The start-up token fetch is a trace of its own.
    let spans = receiver
        .spans_named(&[&stages[..], &["s2s_token.fetch"]].concat())
        .await;
    let by_name: HashMap<&str, &Span> = spans.iter().map(|s| (s.name.as_str(), s)).collect();
    for span in spans.iter().filter(|s| stages.contains(&s.name.as_str())) {
        assert_eq!(
            hex(&span.trace_id),
            CALLER_TRACE,
            "{} in the caller's trace",
            span.name
        );
    }
    assert_ne!(hex(&by_name["s2s_token.fetch"].trace_id), CALLER_TRACE);
    let id = |name: &str| hex(&by_name[name].span_id);
    let parent = |name: &str| hex(&by_name[name].parent_span_id);
    assert_eq!(
        parent("request"),
        CALLER_SPAN,
        "the caller's span is the parent"
    );
    for stage in [
        "inbound.validate",
        "routing.access",
        "identity.resolve",
        "upstream",
    ] {
        assert_eq!(parent(stage), id("request"), "{stage} under the request");
    }
    for step in ["s2s_token", "budget.wait", "dataverse.call"] {
        assert_eq!(
            parent(step),
            id("upstream"),
            "{step} under the upstream stage"
        );
    }
    assert!(
        receiver
            .service_names
            .lock()
            .unwrap()
            .iter()
            .all(|n| n.contains("dgw-under-test")),
        "OTEL_SERVICE_NAME names the service"
    );

    // Dataverse was handed the gateway's call span in the caller's trace, not the
    // caller's own span id, and not the caller's tracestate verbatim as a parent.
    let forwarded = forwarded_whoami(&standins.dataverse);
    assert_eq!(
        forwarded.header("traceparent").unwrap(),
        format!("00-{CALLER_TRACE}-{}-01", id("dataverse.call"))
    );

    // A malformed traceparent starts a new trace; Dataverse gets a well-formed one.
    let status = whoami(&binary, &standins, "00-not-a-trace-01").await;
    assert_eq!(status, 200);
    let latest = standins.dataverse.requests().last().unwrap().clone();
    let traceparent = latest.header("traceparent").unwrap().to_owned();
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[1].len(), 32, "{traceparent}");
    assert_ne!(parts[1], CALLER_TRACE);

    // The audit line names the trace.
    binary.signal("TERM");
    let _ = tokio::time::timeout(Duration::from_secs(15), binary.child.wait()).await;
    let log = binary.log();
    assert!(
        log.lines().any(|l| l.contains("request_id")
            && l.contains(&format!("trace_id=\"{CALLER_TRACE}\""))
            || l.contains(&format!("trace_id={CALLER_TRACE}"))),
        "{log}"
    );
    assert!(!log.contains("dataverse.call"), "spans stay out of the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_endpoint_nothing_is_exported_and_the_callers_trace_context_passes_as_sent() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    // The receiver is there, but only the standard variable would point the gateway at it.
    let (mut binary, standins) = gateway(&[("UNRELATED_ENDPOINT", endpoint)]).await;

    let sent = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    assert_eq!(whoami(&binary, &standins, &sent).await, 200);
    let forwarded = forwarded_whoami(&standins.dataverse);
    assert_eq!(
        forwarded.header("traceparent"),
        Some(sent.as_str()),
        "{:?}",
        forwarded.headers
    );
    assert_eq!(forwarded.header("tracestate"), Some("vendor=caller"));

    binary.signal("TERM");
    let _ = tokio::time::timeout(Duration::from_secs(15), binary.child.wait()).await;
    assert_eq!(receiver.connections.load(Ordering::SeqCst), 0);
    let log = binary.log();
    assert!(
        log.contains(&format!("trace_id={CALLER_TRACE}"))
            || log.contains(&format!("trace_id=\"{CALLER_TRACE}\"")),
        "the audit line names the caller's trace: {log}"
    );
}
