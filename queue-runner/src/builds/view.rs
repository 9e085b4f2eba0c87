//! How builds look to clients, whichever front end they use: the wire status of each build and
//! step status, and rows as messages.

use drover_proto::v1::{
    BuildStatus, BuildSummary, CancelResponse, GetLogResponse, JobBuild, StageDerivationsResponse,
    StepState, StepStatus, SubmitJobSetResponse,
};

use super::job_set::QueuedJobSet;
use crate::logs::LogText;

use crate::db::queries::{BuildFilter, BuildSummaryRow, StepStateRow};
use crate::db::status::{BuildStatus as QueueBuildStatus, StepStatus as QueueStepStatus};

/// The wire status of a build's status; Unknown for one this runner does not know.
#[must_use]
pub fn wire_status(status: Option<QueueBuildStatus>) -> BuildStatus {
    match status {
        Some(QueueBuildStatus::Queued) => BuildStatus::Queued,
        Some(QueueBuildStatus::Running) => BuildStatus::Running,
        Some(QueueBuildStatus::Succeeded) => BuildStatus::Succeeded,
        Some(QueueBuildStatus::Failed) => BuildStatus::Failed,
        Some(QueueBuildStatus::DepFailed) => BuildStatus::DepFailed,
        Some(QueueBuildStatus::Cancelled) => BuildStatus::Cancelled,
        Some(QueueBuildStatus::CachedFailure) => BuildStatus::CachedFailure,
        None => BuildStatus::Unknown,
    }
}

/// The wire status of a step's status; Unknown for one this runner does not know.
#[must_use]
pub fn wire_step_status(status: Option<QueueStepStatus>) -> StepStatus {
    match status {
        Some(QueueStepStatus::Waiting) => StepStatus::Waiting,
        Some(QueueStepStatus::Runnable) => StepStatus::Runnable,
        Some(QueueStepStatus::Running) => StepStatus::Running,
        Some(QueueStepStatus::Succeeded) => StepStatus::Succeeded,
        Some(QueueStepStatus::Failed) => StepStatus::Failed,
        Some(QueueStepStatus::DepFailed) => StepStatus::DepFailed,
        Some(QueueStepStatus::Cancelled) => StepStatus::Cancelled,
        Some(QueueStepStatus::Unsupported) => StepStatus::Unsupported,
        None => StepStatus::Unknown,
    }
}

/// What a Cancel answers: the status the build had ended with, if it had.
#[must_use]
pub fn cancel_response(ended: Option<QueueBuildStatus>) -> CancelResponse {
    CancelResponse {
        already_ended: ended.is_some(),
        status: ended.map_or(0, |status| wire_status(Some(status)).into()),
    }
}

/// What a `StageDerivations` answers: how many derivations were new.
#[must_use]
pub fn stage_response(stored: u64) -> StageDerivationsResponse {
    StageDerivationsResponse {
        stored: u32::try_from(stored).unwrap_or(u32::MAX),
    }
}

/// What a `GetLog` answers.
#[must_use]
pub fn log_response(log: LogText) -> GetLogResponse {
    GetLogResponse {
        log: log.bytes,
        complete: log.complete,
    }
}

/// What a `SubmitJobSet` answers.
#[must_use]
pub fn job_set_response(queued: QueuedJobSet) -> SubmitJobSetResponse {
    SubmitJobSetResponse {
        job_set_id: queued.id,
        builds: queued
            .builds
            .into_iter()
            .map(|(name, build_id)| JobBuild { name, build_id })
            .collect(),
        existing: queued.existing,
    }
}

/// The page token that continues after `rows`, if the page was full.
#[must_use]
pub fn next_page_token(rows: &[BuildSummaryRow], filter: &BuildFilter) -> String {
    match rows.last() {
        Some(last) if i64::try_from(rows.len()).ok() == Some(filter.limit) => last.id.to_string(),
        _ => String::new(),
    }
}

/// A listed build as a message.
#[must_use]
pub fn summary(row: BuildSummaryRow) -> BuildSummary {
    let status = wire_status(row.status);
    BuildSummary {
        build_id: row.id,
        status: status.into(),
        phase: status.phase().into(),
        top_drv_path: row.drv_path,
        metadata: serde_json::from_value(row.metadata).unwrap_or_default(),
        submitted_at_ms: row.submitted_at_ms,
        finished_at_ms: row.finished_at_ms.unwrap_or(0),
        failure_reason: row.failure_reason.unwrap_or_default(),
    }
}

/// A build's step as a message.
#[must_use]
pub fn step_state(row: StepStateRow) -> StepState {
    let mut state = StepState {
        step_id: row.id,
        drv_path: row.drv_path,
        waiting_reason: row.waiting_reason,
        builder: row.builder,
        failure_reason: row.failure_reason,
        started_at_ms: row.attempt_ms.0.unwrap_or_default(),
        finished_at_ms: row.attempt_ms.1.unwrap_or_default(),
        ..StepState::default()
    };
    set_step_status(&mut state, row.status);
    state
}

/// Sets a step message's status: typed, and as its label for clients older than the typed
/// field.
pub fn set_step_status(state: &mut StepState, status: Option<QueueStepStatus>) {
    state.step_status = wire_step_status(status).into();
    status
        .map_or("unknown", QueueStepStatus::as_str)
        .clone_into(&mut state.status);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_status_has_a_wire_status_of_the_same_label() {
        for status in QueueStepStatus::ALL {
            let wire = wire_step_status(Some(*status));
            assert_eq!(wire.label(), Some(status.as_str()), "{status:?}");
            let mut state = StepState::default();
            set_step_status(&mut state, Some(*status));
            assert_eq!(state.typed_status(), wire);
            assert_eq!(state.status, status.as_str());
        }
        assert_eq!(wire_step_status(None), StepStatus::Unknown);
    }

    #[test]
    fn every_build_status_has_a_wire_status() {
        for status in QueueBuildStatus::ALL {
            assert_ne!(
                wire_status(Some(*status)),
                BuildStatus::Unknown,
                "{status:?}"
            );
        }
    }
}
