//! The label sets of the runner's metrics.

use prometheus_client::encoding::EncodeLabelSet;

/// A status (of an attempt or a build), as PostgreSQL's enums spell it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StatusLabels {
    status: &'static str,
}

impl StatusLabels {
    pub const fn new(status: &'static str) -> Self {
        Self { status }
    }
}

/// A binary cache answer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CacheLabels {
    kind: &'static str,
    result: &'static str,
}

impl CacheLabels {
    pub const fn new(kind: &'static str, result: &'static str) -> Self {
        Self { kind, result }
    }
}

/// What builders upload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UploadLabels {
    kind: &'static str,
}

impl UploadLabels {
    pub const fn new(kind: &'static str) -> Self {
        Self { kind }
    }
}

/// A table history pruning deletes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TableLabels {
    table: &'static str,
}

impl TableLabels {
    pub const fn new(table: &'static str) -> Self {
        Self { table }
    }
}

/// A system, such as `x86_64-linux`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SystemLabels {
    pub system: String,
}

/// Steps of a system in a state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StepLabels {
    pub system: String,
    pub state: &'static str,
}

/// Runnable steps of a system that get no builder, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CapacityLabels {
    pub system: String,
    pub reason: &'static str,
}

/// A state, of builders or database connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

/// A builder that takes no new work, and why.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct UnavailableLabels {
    pub builder: String,
    pub reason: &'static str,
}

/// A gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct CodeLabels {
    code: &'static str,
}

impl CodeLabels {
    pub const fn new(code: &'static str) -> Self {
        Self { code }
    }
}
