//! Distributed tracing: OpenTelemetry spans for each stage of a request, exported over
//! OTLP/HTTP when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and the W3C trace context (`traceparent`,
//! `tracestate`) taken from the caller and handed on to Dataverse.
//!
//! The stage spans are `tracing` spans under one target, [`SPAN_TARGET`], which only the
//! export layer listens to: with export off no layer is interested in them, so they cost a
//! callsite check on the hot path and the log output never shows them.

use std::sync::atomic::{AtomicBool, Ordering};

use http::{HeaderMap, HeaderName};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The `tracing` target of every exported span.
pub const SPAN_TARGET: &str = "dynamics_gateway::span";

/// Set once export is on: from then on the stage spans carry the trace, not the headers.
static EXPORTING: AtomicBool = AtomicBool::new(false);

fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Why span export could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OpenTelemetry export (OTEL_EXPORTER_OTLP_*) could not be set up")]
pub struct TelemetryError(#[source] opentelemetry_otlp::ExporterBuildError);

/// Span export in force; [`Telemetry::shutdown`] flushes what is still batched.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Export as the standard environment variables say, or `None` when no endpoint is set.
    pub fn from_env() -> Result<Option<Self>, TelemetryError> {
        let configured = [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .iter()
        .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
        if !configured {
            return Ok(None);
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(TelemetryError)?;
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(env!("CARGO_PKG_NAME"));
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
            .build();
        EXPORTING.store(true, Ordering::Relaxed);
        Ok(Some(Self { provider }))
    }

    /// The layer that turns the stage spans into OpenTelemetry spans.
    pub fn layer<S>(&self) -> impl Layer<S>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer(env!("CARGO_PKG_NAME")))
            .with_filter(Targets::new().with_target(SPAN_TARGET, tracing::Level::TRACE))
    }

    /// Exports what is still batched; called once the last request has drained.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OpenTelemetry spans could not all be exported at shutdown");
        }
    }
}

/// Makes the caller's trace (its `traceparent` / `tracestate`, when well formed) the parent
/// of `span`. Malformed trace headers start a new trace.
pub(crate) fn continue_callers_trace(span: &tracing::Span, headers: &HeaderMap) {
    if !exporting() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(parent);
}

/// The trace this request belongs to, for the audit line: the exported span's trace when
/// export is on, else the trace named by the caller's well-formed `traceparent`.
pub fn trace_id(span: &tracing::Span, headers: &HeaderMap) -> Option<String> {
    let context = if exporting() {
        span.context()
    } else {
        TraceContextPropagator::new().extract(&HeaderExtractor(headers))
    };
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// The trace context Dataverse receives: with export on, the current stage span as the
/// parent (replacing whatever the caller sent); with export off, the caller's headers as
/// they came.
pub(crate) fn hand_on(headers: &mut HeaderMap) {
    if !exporting() {
        return;
    }
    let current = tracing::Span::current();
    headers.remove(TRACEPARENT);
    headers.remove(TRACESTATE);
    TraceContextPropagator::new().inject_context(&current.context(), &mut HeaderInjector(headers));
}
