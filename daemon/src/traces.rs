//! OpenTelemetry traces, exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the
//! standard variable; off otherwise), and the W3C `traceparent` that carries a trace from one
//! process to the next: in gRPC metadata from a client, in a build's row, in a step's Build
//! message and its result. `tracing` spans become OpenTelemetry spans through
//! `tracing-opentelemetry`, so a span is made the usual way and [`set_parent`] /
//! [`traceparent`] connect it across processes.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The variable that turns export on: the collector's base URL (`http://collector:4318`).
const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The name of W3C trace context's header and field.
pub const TRACEPARENT: &str = "traceparent";

/// A running exporter: call [`Traces::shutdown`] before the process exits, so the last spans
/// are sent.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Sends what is buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "sending the last trace spans");
        }
    }
}

/// The layer that exports spans of `service`, and the exporter's handle, if
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
#[must_use]
pub fn layer<S>(service: &'static str) -> Option<(impl tracing_subscriber::Layer<S>, Traces)>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let endpoint = std::env::var(ENDPOINT).ok().filter(|url| !url.is_empty())?;
    let traces_url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    // The blocking HTTP client must not be made on an async runtime's thread.
    let exporter = std::thread::spawn(move || {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(traces_url)
            .build()
    })
    .join()
    .ok()?;
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("{service}: traces are not exported: {error}");
            return None;
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let tracer = provider.tracer(service);
    Some((
        tracing_opentelemetry::layer().with_tracer(tracer),
        Traces { provider },
    ))
}

/// The W3C `traceparent` of `span`; empty if traces are not exported (the span is not
/// recorded).
#[must_use]
pub fn traceparent(span: &tracing::Span) -> String {
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT).unwrap_or_default()
}

/// Makes `span` a child of the remote span `traceparent` names; an empty or malformed one
/// leaves it a root.
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let parent = TraceContextPropagator::new().extract(&carrier);
    // A span that is not recorded (export off) has nothing to attach.
    let _ = span.set_parent(parent);
}
