//! The scheduler core's statuses as PostgreSQL enums: which SQL type holds each. The labels are
//! the core's own ([`drover_scheduler::status`]); a test compares them with `enum_range` on a
//! migrated database, so the two can never drift apart.

pub use drover_scheduler::status::{AttemptStatus, BuildStatus, StepStatus};

/// A status stored as a PostgreSQL enum.
pub trait SqlEnum {
    /// The PostgreSQL enum type.
    const SQL_TYPE: &'static str;
}

impl SqlEnum for BuildStatus {
    const SQL_TYPE: &'static str = "build_status";
}

impl SqlEnum for StepStatus {
    const SQL_TYPE: &'static str = "step_status";
}

impl SqlEnum for AttemptStatus {
    const SQL_TYPE: &'static str = "attempt_status";
}
