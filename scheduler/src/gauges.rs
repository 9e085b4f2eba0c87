//! The farm counted for metrics: steps by system and state, builders by state, slots by system,
//! and why runnable steps get no builder. Counted on demand (a metrics scrape) from the core's
//! state; nothing here changes it.

use std::collections::BTreeMap;

use super::fleet::{Hold, Standing};
use super::graph::{StepGraph, StepState};
use super::placement::{Builder, Placement};
use super::types::ClassId;

/// Why the runnable steps of a class get no builder now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NoCapacity {
    /// Every connected builder that can run them has all its slots taken.
    Busy,
    /// Every connected builder that can run them is shutting down.
    Draining,
    /// Every connected builder that can run them and is not shutting down was drained by an
    /// admin.
    Drained,
    /// Every connected builder that can run them and is not drained or shutting down is
    /// quarantined.
    Quarantined,
    /// Every connected builder that can run them and takes work otherwise has less free disk
    /// than the farm's floor.
    LowDisk,
    /// Every connected builder that can run them and takes work otherwise is under more
    /// memory pressure than the farm's limit.
    MemoryPressure,
    /// Builders offer their system, but none of them the features they need.
    MissingFeature,
    /// No connected builder offers their system.
    NoBuilder,
}

impl NoCapacity {
    /// Its label in metrics.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Busy => "busy",
            Self::Draining => "draining",
            Self::Drained => "drained",
            Self::Quarantined => "quarantined",
            Self::LowDisk => "low_disk",
            Self::MemoryPressure => "memory_pressure",
            Self::MissingFeature => "missing_feature",
            Self::NoBuilder => "no_builder",
        }
    }
}

/// What a connected builder session is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BuilderState {
    /// Taking work, running nothing.
    Idle,
    /// Taking work, some slots in use.
    Busy,
    /// Every slot in use.
    Full,
    /// Shutting down: finishing what it runs, then leaving.
    Draining,
    /// Drained by an admin: connected, finishing what it runs, taking nothing new.
    Drained,
    /// Quarantined after infrastructure failures: cooling down, or on probation.
    Quarantined,
    /// Less free disk than the farm's floor, at its latest ping.
    LowDisk,
    /// More memory pressure than the farm's limit, at its latest ping.
    MemoryPressure,
}

impl BuilderState {
    /// Every state, so a metric shows the ones no builder is in as zero.
    pub const ALL: [Self; 8] = [
        Self::Idle,
        Self::Busy,
        Self::Full,
        Self::Draining,
        Self::Drained,
        Self::Quarantined,
        Self::LowDisk,
        Self::MemoryPressure,
    ];

    /// Its label in metrics.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Busy => "busy",
            Self::Full => "full",
            Self::Draining => "draining",
            Self::Drained => "drained",
            Self::Quarantined => "quarantined",
            Self::LowDisk => "low_disk",
            Self::MemoryPressure => "memory_pressure",
        }
    }

    /// The states of a builder that takes no new work, in the order one closed for several
    /// reasons shows them.
    pub const CLOSED: [Self; 5] = [
        Self::Draining,
        Self::Drained,
        Self::Quarantined,
        Self::LowDisk,
        Self::MemoryPressure,
    ];

    /// What `builder` is doing; a builder closed for several reasons shows the first of
    /// [`BuilderState::CLOSED`].
    #[must_use]
    pub fn of(builder: &Builder) -> Self {
        if let Some(closed) = Self::closed(builder.standing) {
            closed
        } else if builder.running == 0 {
            Self::Idle
        } else if builder.running >= builder.capabilities.max_jobs {
            Self::Full
        } else {
            Self::Busy
        }
    }

    /// Why a builder standing so takes no work (or only a probation step), if it does not.
    fn closed(standing: Standing) -> Option<Self> {
        if standing.has(Hold::ShuttingDown) {
            Some(Self::Draining)
        } else if standing.has(Hold::Drained) {
            Some(Self::Drained)
        } else if standing.quarantine.is_some() {
            Some(Self::Quarantined)
        } else if standing.has(Hold::LowDisk) {
            Some(Self::LowDisk)
        } else if standing.has(Hold::MemoryPressure) {
            Some(Self::MemoryPressure)
        } else {
            None
        }
    }
}

/// Job slots offered for one system.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Slots {
    /// Slots of the builders offering it that take work (one for a builder on probation).
    pub offered: u64,
    /// Jobs running on builders offering it that take work.
    pub used: u64,
}

/// The farm, counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gauges {
    /// Steps in the graph by system and state (`waiting`, `runnable`, `running`).
    pub steps: BTreeMap<(String, &'static str), u64>,
    /// Connected builder sessions by state.
    pub builders: BTreeMap<BuilderState, u64>,
    /// Slots by system. A builder offering several systems counts in each.
    pub slots: BTreeMap<String, Slots>,
    /// Runnable steps that no builder can take now, by system and reason.
    pub without_capacity: BTreeMap<(String, NoCapacity), u64>,
    /// Connected builders that take no new work (or only a probation step), by name, and why:
    /// draining, drained, quarantined, low on disk or under memory pressure.
    pub unavailable: BTreeMap<String, BuilderState>,
    /// Builds queued or running.
    pub builds: u64,
}

impl Gauges {
    /// Counts `graph` and `placement`.
    #[must_use]
    pub fn count(graph: &StepGraph, placement: &Placement) -> Self {
        let mut gauges = Self {
            builds: graph.build_count() as u64,
            ..Self::default()
        };
        for (_, step) in graph.steps() {
            let state = match step.state {
                StepState::Waiting(_) => "waiting",
                StepState::Runnable => "runnable",
                StepState::Running(_) => "running",
            };
            *gauges
                .steps
                .entry((step.spec.requirements.system.clone(), state))
                .or_default() += 1;
        }
        for state in BuilderState::ALL {
            gauges.builders.insert(state, 0);
        }
        for (_, builder) in placement.builders() {
            let state = BuilderState::of(builder);
            *gauges.builders.entry(state).or_default() += 1;
            if BuilderState::closed(builder.standing).is_some() {
                gauges.unavailable.insert(builder.name.clone(), state);
            }
            for system in &builder.capabilities.systems {
                let slots = gauges.slots.entry(system.clone()).or_default();
                let limit = builder.standing.job_limit(builder.capabilities.max_jobs);
                if limit > 0 {
                    slots.offered += u64::from(limit);
                    slots.used += u64::from(builder.running.min(limit));
                }
            }
        }
        for (class, runnable) in placement.waiting_classes() {
            if let Some((system, reason)) = why_no_capacity(placement, class) {
                *gauges.without_capacity.entry((system, reason)).or_default() += runnable;
            }
        }
        gauges
    }
}

/// Why the runnable steps of `class` get no builder, with their system; `None` when a builder
/// has a free slot for them.
fn why_no_capacity(placement: &Placement, class: ClassId) -> Option<(String, NoCapacity)> {
    let requirements = placement.requirements(class)?;
    let capable: Vec<&Builder> = placement.capable_builders(class).collect();
    let reason = if capable.is_empty() {
        let offers_system = placement.builders().any(|(_, builder)| {
            requirements.system == "builtin"
                || builder.capabilities.systems.contains(&requirements.system)
        });
        if offers_system {
            NoCapacity::MissingFeature
        } else {
            NoCapacity::NoBuilder
        }
    } else if capable
        .iter()
        .any(|builder| builder.running < builder.standing.job_limit(builder.capabilities.max_jobs))
    {
        return None;
    } else if capable
        .iter()
        .any(|builder| builder.standing.job_limit(builder.capabilities.max_jobs) > 0)
    {
        NoCapacity::Busy
    } else {
        // Every capable builder is closed: the first reason in the order a builder's own state
        // takes them.
        let states: Vec<BuilderState> = capable.iter().map(|b| BuilderState::of(b)).collect();
        let first = BuilderState::CLOSED
            .into_iter()
            .find(|state| states.contains(state))?;
        match first {
            BuilderState::Drained => NoCapacity::Drained,
            BuilderState::Quarantined => NoCapacity::Quarantined,
            BuilderState::LowDisk => NoCapacity::LowDisk,
            BuilderState::MemoryPressure => NoCapacity::MemoryPressure,
            _ => NoCapacity::Draining,
        }
    };
    Some((requirements.system.clone(), reason))
}
