//! The gauges set at each scrape from a [`Scrape`]: what the scheduler core counts, how long
//! the oldest runnable step of each system has waited, and the database pool's use. Families
//! are cleared first, so a system or reason that is gone stops being reported.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use drover_scheduler::gauges::Gauges;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::labels::{CapacityLabels, StateLabels, StepLabels, SystemLabels, UnavailableLabels};

/// What a scrape reports, gathered by the scheduler's driver between two events.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// The core's counts.
    pub gauges: Gauges,
    /// How long the oldest runnable step of each system has waited.
    pub oldest_runnable: BTreeMap<String, Duration>,
    /// The database pool.
    pub pool: deadpool_postgres::Status,
}

/// Space on the file system the binary cache is on.
#[derive(Debug, Clone, Copy, Default)]
pub struct CacheSpace {
    /// Bytes free for the runner (an unprivileged user).
    pub free_bytes: u64,
    /// The file system's size.
    pub size_bytes: u64,
}

impl CacheSpace {
    /// The space of the file system `directory` is on; zero if it cannot be read.
    #[must_use]
    pub fn of(directory: &Path) -> Self {
        rustix::fs::statvfs(directory)
            .map(|stats| Self {
                free_bytes: stats.f_bavail.saturating_mul(stats.f_frsize),
                size_bytes: stats.f_blocks.saturating_mul(stats.f_frsize),
            })
            .unwrap_or_default()
    }
}

/// The gauges, registered.
pub struct ScrapedGauges {
    steps: Family<StepLabels, Gauge>,
    builds: Gauge,
    builders: Family<StateLabels, Gauge>,
    slots: Family<SystemLabels, Gauge>,
    slots_used: Family<SystemLabels, Gauge>,
    without_capacity: Family<CapacityLabels, Gauge>,
    unavailable: Family<UnavailableLabels, Gauge>,
    oldest_runnable: Family<SystemLabels, Gauge<f64, AtomicU64>>,
    connections: Family<StateLabels, Gauge>,
    connections_max: Gauge,
    connection_waiters: Gauge,
    cache_free: Gauge,
    cache_size: Gauge,
}

impl ScrapedGauges {
    /// Registers every gauge in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let gauges = Self {
            steps: Family::default(),
            builds: Gauge::default(),
            builders: Family::default(),
            slots: Family::default(),
            slots_used: Family::default(),
            without_capacity: Family::default(),
            unavailable: Family::default(),
            oldest_runnable: Family::default(),
            connections: Family::default(),
            connections_max: Gauge::default(),
            connection_waiters: Gauge::default(),
            cache_free: Gauge::default(),
            cache_size: Gauge::default(),
        };
        registry.register(
            "steps",
            "Unfinished steps in the scheduler's graph, by system and state",
            gauges.steps.clone(),
        );
        registry.register(
            "builds_unfinished",
            "Builds queued or running",
            gauges.builds.clone(),
        );
        registry.register(
            "builders",
            "Connected builder sessions, by state",
            gauges.builders.clone(),
        );
        registry.register(
            "slots",
            "Job slots of connected builders taking work, by system they offer",
            gauges.slots.clone(),
        );
        registry.register(
            "slots_used",
            "Jobs running on connected builders taking work, by system they offer",
            gauges.slots_used.clone(),
        );
        registry.register(
            "runnable_steps_without_capacity",
            "Runnable steps no connected builder can take now, by system and reason",
            gauges.without_capacity.clone(),
        );
        registry.register(
            "builder_unavailable",
            "1 for each connected builder that takes no new work, by name and reason",
            gauges.unavailable.clone(),
        );
        registry.register_with_unit(
            "oldest_runnable_step_age",
            "How long the oldest runnable step of each system has waited",
            Unit::Seconds,
            gauges.oldest_runnable.clone(),
        );
        registry.register(
            "database_connections",
            "Connections of the runner's PostgreSQL pool, by state",
            gauges.connections.clone(),
        );
        registry.register(
            "database_connections_max",
            "The most connections the runner's PostgreSQL pool opens",
            gauges.connections_max.clone(),
        );
        registry.register(
            "database_connection_waiters",
            "Tasks waiting for a PostgreSQL connection",
            gauges.connection_waiters.clone(),
        );
        registry.register_with_unit(
            "cache_filesystem_free",
            "Bytes free on the binary cache's file system",
            Unit::Bytes,
            gauges.cache_free.clone(),
        );
        registry.register_with_unit(
            "cache_filesystem_size",
            "Size of the binary cache's file system",
            Unit::Bytes,
            gauges.cache_size.clone(),
        );
        gauges
    }

    /// Sets every gauge from `scrape` and `space`.
    pub fn set(&self, scrape: &Scrape, space: CacheSpace) {
        self.cache_free.set(count_value(space.free_bytes));
        self.cache_size.set(count_value(space.size_bytes));
        let gauges = &scrape.gauges;
        self.steps.clear();
        for ((system, state), count) in &gauges.steps {
            let labels = StepLabels {
                system: system.clone(),
                state,
            };
            self.steps.get_or_create(&labels).set(count_value(*count));
        }
        self.builds.set(count_value(gauges.builds));
        self.builders.clear();
        for (state, count) in &gauges.builders {
            let labels = StateLabels {
                state: state.as_str(),
            };
            self.builders
                .get_or_create(&labels)
                .set(count_value(*count));
        }
        self.slots.clear();
        self.slots_used.clear();
        for (system, slots) in &gauges.slots {
            let labels = SystemLabels {
                system: system.clone(),
            };
            self.slots
                .get_or_create(&labels)
                .set(count_value(slots.offered));
            self.slots_used
                .get_or_create(&labels)
                .set(count_value(slots.used));
        }
        self.without_capacity.clear();
        for ((system, reason), count) in &gauges.without_capacity {
            let labels = CapacityLabels {
                system: system.clone(),
                reason: reason.as_str(),
            };
            self.without_capacity
                .get_or_create(&labels)
                .set(count_value(*count));
        }
        self.unavailable.clear();
        for (builder, state) in &gauges.unavailable {
            let labels = UnavailableLabels {
                builder: builder.clone(),
                reason: state.as_str(),
            };
            self.unavailable.get_or_create(&labels).set(1);
        }
        self.oldest_runnable.clear();
        for (system, age) in &scrape.oldest_runnable {
            let labels = SystemLabels {
                system: system.clone(),
            };
            self.oldest_runnable
                .get_or_create(&labels)
                .set(age.as_secs_f64());
        }
        let pool = &scrape.pool;
        self.connections.clear();
        let in_use = pool.size.saturating_sub(pool.available);
        for (state, count) in [("in_use", in_use), ("idle", pool.available)] {
            self.connections
                .get_or_create(&StateLabels { state })
                .set(count_value(count as u64));
        }
        self.connections_max.set(count_value(pool.max_size as u64));
        self.connection_waiters
            .set(count_value(pool.waiting as u64));
    }
}

/// A count as a gauge's value.
fn count_value(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}
