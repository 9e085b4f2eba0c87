//! The builder's Prometheus metrics, served at `/metrics` on `[metrics] listen` when enabled
//! (off by default: a builder's operator opts in): its slots and the steps it runs, how they
//! ended, its sessions with the runner, the `nix-store --serve` processes it started, and its
//! store's free space and memory pressure, read at each scrape.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use drover_proto::v1::StepOutcome;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text::{CONTENT_TYPE, encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use tokio_util::sync::CancellationToken;

use crate::health;

/// How a step ended on this builder.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// The builder's metrics, registered.
pub struct BuilderMetrics {
    registry: Registry,
    steps_running: Gauge,
    steps_finished: Family<OutcomeLabels, Counter>,
    connected: Gauge,
    sessions: Counter,
    /// `nix-store --serve` processes started; the Nix executor counts them.
    pub serve_processes_started: Counter,
    store_free: Gauge,
    /// Registered only where the kernel reports memory pressure.
    memory_pressure: Option<Gauge<f64, AtomicU64>>,
}

impl BuilderMetrics {
    /// The metrics of a builder with `max_jobs` slots.
    #[must_use]
    pub fn new(max_jobs: u32) -> Arc<Self> {
        let mut registry = Registry::with_prefix("drover_builder");
        let slots: Gauge = Gauge::default();
        slots.set(i64::from(max_jobs));
        registry.register("slots", "Steps this builder runs at once", slots);
        let mut metrics = Self {
            steps_running: Gauge::default(),
            steps_finished: Family::default(),
            connected: Gauge::default(),
            sessions: Counter::default(),
            serve_processes_started: Counter::default(),
            store_free: Gauge::default(),
            memory_pressure: health::memory_pressure_percent().map(|_| Gauge::default()),
            registry,
        };
        let registry = &mut metrics.registry;
        registry.register(
            "steps_running",
            "Steps running now (their slots in use)",
            metrics.steps_running.clone(),
        );
        registry.register(
            "steps_finished",
            "Steps ended on this builder, by outcome",
            metrics.steps_finished.clone(),
        );
        registry.register(
            "connected",
            "1 while the builder holds a joined tunnel to the runner",
            metrics.connected.clone(),
        );
        registry.register(
            "sessions",
            "Sessions joined with the runner (each reconnect is one more)",
            metrics.sessions.clone(),
        );
        registry.register(
            "serve_processes_started",
            "nix-store --serve processes started",
            metrics.serve_processes_started.clone(),
        );
        registry.register_with_unit(
            "store_free",
            "Free bytes on the Nix store's file system",
            Unit::Bytes,
            metrics.store_free.clone(),
        );
        if let Some(memory_pressure) = &metrics.memory_pressure {
            registry.register(
                "memory_pressure_percent",
                "Share of the last 10 s some task stalled waiting for memory (PSI some avg10)",
                memory_pressure.clone(),
            );
        }
        Arc::new(metrics)
    }

    /// A step started.
    pub fn step_started(&self) {
        self.steps_running.inc();
    }

    /// A step ended with `outcome`.
    pub fn step_finished(&self, outcome: StepOutcome) {
        self.steps_running.dec();
        let outcome = match outcome {
            StepOutcome::Succeeded => "succeeded",
            StepOutcome::Failed => "failed",
            StepOutcome::TimedOut => "timed_out",
            StepOutcome::LogLimitExceeded => "log_limit_exceeded",
            StepOutcome::InfrastructureFailure => "infrastructure_failure",
            StepOutcome::Unspecified => "unknown",
        };
        self.steps_finished
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// A session joined the runner.
    pub fn joined(&self) {
        self.connected.set(1);
        self.sessions.inc();
    }

    /// The session ended.
    pub fn left(&self) {
        self.connected.set(0);
    }

    /// The metrics in Prometheus' text format, with the machine read now.
    fn encode(&self) -> Result<String, std::fmt::Error> {
        let free = health::free_store_bytes().unwrap_or(0);
        self.store_free.set(i64::try_from(free).unwrap_or(i64::MAX));
        if let (Some(gauge), Some(percent)) =
            (&self.memory_pressure, health::memory_pressure_percent())
        {
            gauge.set(percent);
        }
        let mut text = String::new();
        encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

/// Serves `metrics` at `/metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<BuilderMetrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let routes = Router::new()
        .route("/metrics", get(scrape))
        .with_state(metrics);
    axum::serve(listener, routes)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn scrape(State(metrics): State<Arc<BuilderMetrics>>) -> Response {
    match metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed").into_response(),
    }
}
