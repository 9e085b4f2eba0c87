//! A List request as a database filter: its page size, cursor and statuses checked.

use drover_proto::v1::{BuildStatus, ListRequest};
use tonic::Status;

use crate::db::queries::BuildFilter;
use crate::db::status::BuildStatus as QueueBuildStatus;

/// Builds per List page when the request names no size.
const DEFAULT_PAGE_SIZE: u32 = 100;
/// The most builds per List page.
const MAX_PAGE_SIZE: u32 = 1000;

/// The runner's status of a wire status, if it has one.
fn queue_status(status: BuildStatus) -> Option<QueueBuildStatus> {
    Some(match status {
        BuildStatus::Unknown => return None,
        BuildStatus::Queued => QueueBuildStatus::Queued,
        BuildStatus::Running => QueueBuildStatus::Running,
        BuildStatus::Succeeded => QueueBuildStatus::Succeeded,
        BuildStatus::Failed => QueueBuildStatus::Failed,
        BuildStatus::DepFailed => QueueBuildStatus::DepFailed,
        BuildStatus::Cancelled => QueueBuildStatus::Cancelled,
        BuildStatus::CachedFailure => QueueBuildStatus::CachedFailure,
    })
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
        let status = queue_status(status)
            .ok_or_else(|| Status::invalid_argument("cannot filter on the Unknown status"))?;
        statuses.push(status);
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
