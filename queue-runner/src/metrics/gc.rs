//! What garbage collection moves: the cache's sweeps, what they deleted and kept, how long
//! they took, and whether live and pinned builds alone exceed the size bound; the rows history
//! pruning deleted.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::labels::TableLabels;
use crate::history::Pruned;

/// Moved by each completed sweep.
#[derive(Debug, Clone)]
pub struct GcMetrics {
    sweeps: Counter,
    deleted_paths: Counter,
    freed_bytes: Counter,
    duration: Histogram,
    roots: Gauge,
    kept_bytes: Gauge,
    protected_over_bound: Gauge,
    pruned_rows: Family<TableLabels, Counter>,
}

/// One sweep, as the metrics see it.
#[derive(Debug, Clone, Copy)]
pub struct SweepFigures {
    /// Narinfos deleted.
    pub deleted_paths: u64,
    /// NAR bytes deleted.
    pub freed_bytes: u64,
    /// Seconds from marking to the last deletion.
    pub seconds: f64,
    /// Roots kept.
    pub roots: usize,
    /// NAR bytes left.
    pub kept_bytes: u64,
    /// Whether live and pinned builds alone exceed the bound.
    pub protected_over_bound: bool,
}

impl GcMetrics {
    /// Registers every metric in `registry`, at zero. Sweeps of a tenth of a second to about half
    /// an hour.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            sweeps: Counter::default(),
            deleted_paths: Counter::default(),
            freed_bytes: Counter::default(),
            duration: Histogram::new(exponential_buckets(0.1, 3.0, 10)),
            roots: Gauge::default(),
            kept_bytes: Gauge::default(),
            protected_over_bound: Gauge::default(),
            pruned_rows: Family::default(),
        };
        registry.register(
            "cache_gc_sweeps",
            "Completed garbage collections of the binary cache",
            metrics.sweeps.clone(),
        );
        registry.register(
            "cache_gc_deleted_paths",
            "Store paths garbage collection deleted from the binary cache",
            metrics.deleted_paths.clone(),
        );
        registry.register_with_unit(
            "cache_gc_freed",
            "NAR bytes garbage collection deleted from the binary cache",
            Unit::Bytes,
            metrics.freed_bytes.clone(),
        );
        registry.register_with_unit(
            "cache_gc_sweep_duration",
            "Time one garbage collection took, marking and deleting",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        registry.register(
            "cache_gc_roots",
            "Builds whose paths the last sweep kept (live builds counted as one)",
            metrics.roots.clone(),
        );
        registry.register_with_unit(
            "cache_gc_kept",
            "NAR bytes the last sweep left in the binary cache",
            Unit::Bytes,
            metrics.kept_bytes.clone(),
        );
        registry.register(
            "cache_gc_protected_over_bound",
            "1 when live and pinned builds alone need more than gc.max_bytes",
            metrics.protected_over_bound.clone(),
        );
        registry.register(
            "history_pruned_rows",
            "Rows history pruning deleted, by table (builds, steps, derivations)",
            metrics.pruned_rows.clone(),
        );
        metrics
    }

    /// Counts what a pruning run deleted.
    pub fn pruned(&self, pruned: &Pruned) {
        for (table, rows) in [
            ("builds", pruned.builds),
            ("steps", pruned.steps),
            ("derivations", pruned.derivations),
        ] {
            self.pruned_rows
                .get_or_create(&TableLabels::new(table))
                .inc_by(rows);
        }
    }

    /// Counts a completed sweep.
    pub fn swept(&self, figures: &SweepFigures) {
        let gauge = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        self.sweeps.inc();
        self.deleted_paths.inc_by(figures.deleted_paths);
        self.freed_bytes.inc_by(figures.freed_bytes);
        self.duration.observe(figures.seconds);
        self.roots
            .set(gauge(u64::try_from(figures.roots).unwrap_or(u64::MAX)));
        self.kept_bytes.set(gauge(figures.kept_bytes));
        self.protected_over_bound
            .set(i64::from(figures.protected_over_bound));
    }
}
