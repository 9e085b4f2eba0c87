//! How builds look to clients: the wire status of each `build_status` label, a List request as
//! a database filter and its page cursor, and rows as messages.

use drover_proto::v1::{BuildStatus, BuildSummary, ListRequest, StepState};
use tonic::Status;

use crate::db::queries::{BuildFilter, BuildSummaryRow, StepStateRow};
use crate::db::status::BuildStatus as QueueBuildStatus;

/// Builds per List page when the request names no size.
const DEFAULT_PAGE_SIZE: u32 = 100;
/// The most builds per List page.
const MAX_PAGE_SIZE: u32 = 1000;

/// The wire status of a `build_status` label; Unknown for a label this runner does not know.
#[must_use]
pub fn wire_status(label: &str) -> BuildStatus {
    match QueueBuildStatus::from_label(label) {
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

/// The `build_status` label of a wire status, if it has one.
fn label(status: BuildStatus) -> Option<&'static str> {
    let status = match status {
        BuildStatus::Unknown => return None,
        BuildStatus::Queued => QueueBuildStatus::Queued,
        BuildStatus::Running => QueueBuildStatus::Running,
        BuildStatus::Succeeded => QueueBuildStatus::Succeeded,
        BuildStatus::Failed => QueueBuildStatus::Failed,
        BuildStatus::DepFailed => QueueBuildStatus::DepFailed,
        BuildStatus::Cancelled => QueueBuildStatus::Cancelled,
        BuildStatus::CachedFailure => QueueBuildStatus::CachedFailure,
    };
    Some(status.as_str())
}

/// The database filter a List request asks for.
pub fn filter(request: &ListRequest) -> Result<BuildFilter, Status> {
    let page_size = match request.page_size {
        0 => DEFAULT_PAGE_SIZE,
        size if size <= MAX_PAGE_SIZE => size,
        size => {
            return Err(Status::invalid_argument(format!(
                "page_size {size} is over {MAX_PAGE_SIZE}"
            )));
        }
    };
    let before_id = match request.page_token.as_str() {
        "" => None,
        token => Some(token.parse::<i64>().map_err(|_| {
            Status::invalid_argument(format!("{token:?} is not a page token List returned"))
        })?),
    };
    let mut statuses = Vec::new();
    for raw in &request.statuses {
        let status = BuildStatus::try_from(*raw)
            .map_err(|_| Status::invalid_argument(format!("unknown build status {raw}")))?;
        let label = label(status)
            .ok_or_else(|| Status::invalid_argument("cannot filter on the Unknown status"))?;
        statuses.push(label.to_owned());
    }
    let bound = |milliseconds: i64| (milliseconds != 0).then_some(milliseconds);
    Ok(BuildFilter {
        statuses,
        metadata: serde_json::json!(request.metadata),
        submitted_after_ms: bound(request.submitted_after_ms),
        submitted_before_ms: bound(request.submitted_before_ms),
        before_id,
        limit: i64::from(page_size),
    })
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
    let status = wire_status(&row.status);
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
    StepState {
        step_id: row.id,
        drv_path: row.drv_path,
        status: row.status,
        waiting_reason: row.waiting_reason,
        builder: row.builder,
        failure_reason: row.failure_reason,
    }
}
