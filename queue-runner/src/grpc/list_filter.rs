//! A List request as a database filter: its page size, cursor and statuses checked.

use drover_proto::v1::{BuildStatus, ListRequest};

use crate::db::queries::BuildFilter;
use crate::db::status::BuildStatus as QueueBuildStatus;

/// Builds per List page when the request names no size.
const DEFAULT_PAGE_SIZE: u32 = 100;
/// The most builds per List page.
const MAX_PAGE_SIZE: u32 = 1000;

/// Why a List request cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// More builds per page than a page holds.
    #[error("page_size {size} is over {MAX_PAGE_SIZE}")]
    PageSize {
        /// The size asked for.
        size: u32,
    },
    /// The token is not one List returned.
    #[error("{0:?} is not a page token List returned")]
    PageToken(String),
    /// A status number this runner does not know.
    #[error("unknown build status {0}")]
    UnknownStatus(i32),
    /// Unknown names no build.
    #[error("cannot filter on the Unknown status")]
    FilterOnUnknown,
}

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
pub fn filter(request: &ListRequest) -> Result<BuildFilter, FilterError> {
    let page_size = match request.page_size {
        0 => DEFAULT_PAGE_SIZE,
        size if size <= MAX_PAGE_SIZE => size,
        size => return Err(FilterError::PageSize { size }),
    };
    let before_id = match request.page_token.as_str() {
        "" => None,
        token => Some(
            token
                .parse::<i64>()
                .map_err(|_| FilterError::PageToken(token.to_owned()))?,
        ),
    };
    let mut statuses = Vec::new();
    for raw in &request.statuses {
        let status = BuildStatus::try_from(*raw).map_err(|_| FilterError::UnknownStatus(*raw))?;
        statuses.push(queue_status(status).ok_or(FilterError::FilterOnUnknown)?);
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
