//! Traces of one real build, read from a local OTLP/HTTP receiver: the runner and the builder
//! (both processes, exporting because `OTEL_EXPORTER_OTLP_ENDPOINT` is set) continue the trace
//! the client sent with its Submit, from the Submit through planning, dispatch and the
//! builder's phases to the result.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::{BuilderSpec, DEADLINE, Farm, Stored};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;
use test_support::fake_derivations::{Factory, Spec};
use test_support::wait::poll_until;

/// A span as the receiver keeps it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

type Spans = Arc<Mutex<Vec<Received>>>;

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

async fn receive(State(spans): State<Spans>, body: Bytes) -> &'static str {
    let request = ExportTraceServiceRequest::decode(body).unwrap();
    let mut kept = spans.lock().unwrap();
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|resource| &resource.attributes)
            .find(|attribute| attribute.key == "service.name")
            .and_then(|attribute| match &attribute.value.as_ref()?.value {
                Some(Value::StringValue(name)) => Some(name.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for span in resource
            .scope_spans
            .into_iter()
            .flat_map(|scope| scope.spans)
        {
            kept.push(Received {
                service: service.clone(),
                name: span.name,
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
            });
        }
    }
    ""
}

/// A local OTLP/HTTP receiver (served while the returned task set lives); its base URL and
/// what it received.
async fn otlp_receiver() -> (String, Spans, tokio::task::JoinSet<()>) {
    let spans = Spans::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let routes = axum::Router::new()
        .route("/v1/traces", post(receive))
        .with_state(spans.clone());
    let mut server = tokio::task::JoinSet::new();
    server.spawn(async move {
        let _ = axum::serve(listener, routes).await;
    });
    (format!("http://{address}"), spans, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_build_is_one_trace_from_submit_through_the_builders_phases_to_the_result() {
    let (endpoint, spans, _receiver) = otlp_receiver().await;
    let mut farm = Farm::new().await;
    farm.otlp_endpoint = Some(endpoint);
    let mut runner = farm
        .spawn_runner_process(&farm.database.connection_string.clone(), "runner.log")
        .await;
    let builder = farm.start_builder(&BuilderSpec::new("b1"));

    // The client's own trace: Submit continues it.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(Farm::request(&[
        &Factory::default().make(&Spec::new("traced"))
    ]));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{client_span}-01").parse().unwrap(),
    );
    let build = farm
        .client()
        .await
        .submit(request)
        .await
        .unwrap()
        .into_inner()
        .build_id;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    // Both processes send what they hold when they stop.
    farm.terminate_builder(builder);
    farm.wait_builder_exit(builder, DEADLINE).await;
    runner.terminate(DEADLINE).unwrap();

    let wanted = [
        "submit", "plan", "dispatch", "step", "build", "upload", "result",
    ];
    let by_name: HashMap<String, Received> =
        poll_until(DEADLINE, "every span of the build to arrive", || async {
            let spans = spans.lock().unwrap();
            let by_name: HashMap<String, Received> = spans
                .iter()
                .filter(|span| span.trace_id == trace_id)
                .map(|span| (span.name.clone(), span.clone()))
                .collect();
            wanted
                .iter()
                .all(|name| by_name.contains_key(*name))
                .then_some(by_name)
        })
        .await;
    let parent_of = |name: &str| by_name[name].parent_span_id.clone();
    let id_of = |name: &str| by_name[name].span_id.clone();
    assert_eq!(parent_of("submit"), client_span);
    assert_eq!(parent_of("plan"), id_of("submit"));
    assert_eq!(parent_of("dispatch"), id_of("plan"));
    assert_eq!(parent_of("step"), id_of("dispatch"));
    assert_eq!(parent_of("build"), id_of("step"));
    assert_eq!(parent_of("upload"), id_of("step"));
    assert_eq!(parent_of("result"), id_of("step"));
    for name in ["submit", "plan", "dispatch", "result"] {
        assert_eq!(by_name[name].service, "drover-queue-runner", "{name}");
    }
    for name in ["step", "build", "upload"] {
        assert_eq!(by_name[name].service, "drover-builder", "{name}");
    }
}
