//! The runner's Prometheus metrics: counters and histograms moved as things happen (the
//! scheduler's changes and batches, the cache's answers, uploads), and gauges counted at each
//! scrape (the core's steps, builders and capacity; the database pool), served in Prometheus'
//! text format on a listener of their own ([`routes`]).

mod gc;
mod labels;
mod scrape;
mod serve;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use drover_scheduler::Change;

pub use gc::{GcMetrics, SweepFigures};
use labels::{CacheLabels, CodeLabels, StatusLabels, UploadLabels};
use scrape::ScrapedGauges;
pub use scrape::{CacheSpace, Scrape};
pub use serve::routes;

/// Every metric of the runner, registered once; cloned handles move them.
pub struct Metrics {
    registry: Registry,
    /// Moved by the scheduler's driver.
    pub scheduler: SchedulerMetrics,
    /// Moved by the binary cache's HTTP server.
    pub cache: CacheMetrics,
    /// Moved by builders' uploads.
    pub uploads: UploadMetrics,
    /// Moved by the gRPC services' authentication.
    pub refusals: RefusalMetrics,
    /// Moved by the cache's garbage collection.
    pub gc: GcMetrics,
    /// Set at each scrape.
    scraped: ScrapedGauges,
}

/// What the scheduler's driver moves.
#[derive(Debug, Clone)]
pub struct SchedulerMetrics {
    attempts_started: Counter,
    attempts_ended: Family<StatusLabels, Counter>,
    builds_finished: Family<StatusLabels, Counter>,
    /// Steps planned as done because a cache (the farm's or an upstream) had their outputs.
    pub steps_substituted: Counter,
    /// How long steps waited runnable before they were dispatched.
    pub queue_wait: Histogram,
    /// How long attempts ran, dispatch to result, for attempts a builder reported on.
    pub step_duration: Histogram,
    /// Changes per batch the driver wrote.
    pub batch_changes: Histogram,
    /// How long writing one batch took (the database's round trips and commit).
    pub commit_duration: Histogram,
}

impl SchedulerMetrics {
    /// Counts what `change` says happened.
    pub fn observe(&self, change: &Change) {
        match change {
            Change::AttemptStarted { .. } => {
                self.attempts_started.inc();
            }
            Change::AttemptEnded { status, .. } => {
                self.attempts_ended
                    .get_or_create(&StatusLabels::new(status.as_str()))
                    .inc();
            }
            Change::BuildFinished { status, .. } => {
                self.builds_finished
                    .get_or_create(&StatusLabels::new(status.as_str()))
                    .inc();
            }
            _ => {}
        }
    }
}

/// Calls refused by authentication, by gRPC code (`unauthenticated`: no identity or a revoked
/// certificate; `permission_denied`: a role that may not call the method).
#[derive(Debug, Clone, Default)]
pub struct RefusalMetrics {
    refused: Family<CodeLabels, Counter>,
}

impl RefusalMetrics {
    /// Counts a call refused with `code`.
    pub fn refused(&self, code: tonic::Code) {
        let code = match code {
            tonic::Code::Unauthenticated => "unauthenticated",
            tonic::Code::PermissionDenied => "permission_denied",
            _ => "other",
        };
        self.refused.get_or_create(&CodeLabels::new(code)).inc();
    }
}

/// What the binary cache's HTTP server moves.
#[derive(Debug, Clone)]
pub struct CacheMetrics {
    requests: Family<CacheLabels, Counter>,
    served_bytes: Counter,
}

impl CacheMetrics {
    /// Counts one answer to a request for a `kind` of file (`narinfo`, `nar`, `other`):
    /// whether it was found (`hit`) or not (`miss`).
    pub fn request(&self, kind: &'static str, result: &'static str) {
        self.requests
            .get_or_create(&CacheLabels::new(kind, result))
            .inc();
    }

    /// Counts bytes sent to a client.
    pub fn served(&self, bytes: u64) {
        self.served_bytes.inc_by(bytes);
    }
}

/// What builders' uploads move.
#[derive(Debug, Clone)]
pub struct UploadMetrics {
    bytes: Family<UploadLabels, Counter>,
}

impl UploadMetrics {
    /// Counts `bytes` of a `kind` (`nar`, `log`) received from builders, streamed or inline.
    pub fn received(&self, kind: &'static str, bytes: u64) {
        self.bytes
            .get_or_create(&UploadLabels::new(kind))
            .inc_by(bytes);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered and at zero.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("drover");
        // Queue waits from a millisecond to about 18 hours; steps from 0.1 s to about 15 hours
        // (Nix builds can take that long); batch writes from a millisecond to about an hour.
        let scheduler = SchedulerMetrics {
            attempts_started: Counter::default(),
            attempts_ended: Family::default(),
            builds_finished: Family::default(),
            steps_substituted: Counter::default(),
            queue_wait: Histogram::new(exponential_buckets(0.001, 4.0, 14)),
            step_duration: Histogram::new(exponential_buckets(0.1, 3.0, 13)),
            batch_changes: Histogram::new(exponential_buckets(1.0, 4.0, 7)),
            commit_duration: Histogram::new(exponential_buckets(0.001, 4.0, 12)),
        };
        registry.register(
            "attempts_started",
            "Attempts dispatched to builders",
            scheduler.attempts_started.clone(),
        );
        registry.register(
            "attempts_ended",
            "Attempts ended, by status (infrastructure failures and builder losses are retried)",
            scheduler.attempts_ended.clone(),
        );
        registry.register(
            "builds_finished",
            "Builds the scheduler ended, by status (not those ended at ingest: cached failures, refusals, outputs already cached)",
            scheduler.builds_finished.clone(),
        );
        registry.register_with_unit(
            "step_queue_wait",
            "Time steps waited runnable before dispatch (since this runner started)",
            Unit::Seconds,
            scheduler.queue_wait.clone(),
        );
        registry.register_with_unit(
            "step_duration",
            "Time from dispatch to a builder's result, per attempt",
            Unit::Seconds,
            scheduler.step_duration.clone(),
        );
        registry.register(
            "scheduler_batch_changes",
            "Durable changes per scheduler batch",
            scheduler.batch_changes.clone(),
        );
        registry.register_with_unit(
            "scheduler_commit_duration",
            "Time to write one scheduler batch to PostgreSQL",
            Unit::Seconds,
            scheduler.commit_duration.clone(),
        );
        let cache = CacheMetrics {
            requests: Family::default(),
            served_bytes: Counter::default(),
        };
        registry.register(
            "cache_requests",
            "Binary cache requests, by kind of file and result",
            cache.requests.clone(),
        );
        registry.register_with_unit(
            "cache_served",
            "Bytes the binary cache sent",
            Unit::Bytes,
            cache.served_bytes.clone(),
        );
        let uploads = UploadMetrics {
            bytes: Family::default(),
        };
        registry.register_with_unit(
            "uploaded",
            "Bytes builders uploaded, by kind",
            Unit::Bytes,
            uploads.bytes.clone(),
        );
        registry.register(
            "steps_substituted",
            "Steps not built because a cache (the farm's or an upstream) had their outputs",
            scheduler.steps_substituted.clone(),
        );
        let refusals = RefusalMetrics::default();
        registry.register(
            "rpc_refusals",
            "gRPC calls refused by authentication, by code",
            refusals.refused.clone(),
        );
        let gc = GcMetrics::register(&mut registry);
        let scraped = ScrapedGauges::register(&mut registry);
        Self {
            registry,
            scheduler,
            cache,
            uploads,
            refusals,
            gc,
            scraped,
        }
    }

    /// Sets the gauges from `scrape` and `space` and encodes every metric in Prometheus' text
    /// format.
    ///
    /// # Errors
    /// Only if formatting fails, which writing to a `String` does not.
    pub fn encode(&self, scrape: &Scrape, space: CacheSpace) -> Result<String, std::fmt::Error> {
        self.scraped.set(scrape, space);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
