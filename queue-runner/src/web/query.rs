//! A List request from a URL's query, as `curl` users write it:
//! `?status=failed&status=running&metadata.branch=main&page_size=50&page_token=…`, with
//! `submitted_after_ms` and `submitted_before_ms`. A status is its name (`failed`) or the
//! protocol's (`BUILD_STATUS_FAILED`); anything else is a 400 naming the parameter.

use drover_proto::v1::{BuildStatus, ListRequest};
use tonic::Status;

/// The List request `query` (the part of the URL after `?`) asks for.
pub fn list_request(query: Option<&str>) -> Result<ListRequest, Status> {
    let mut request = ListRequest::default();
    let pairs = form_urlencoded::parse(query.unwrap_or_default().as_bytes());
    for (key, value) in pairs {
        let number = |what: &str| -> Result<i64, Status> {
            value
                .parse()
                .map_err(|_| Status::invalid_argument(format!("{what}={value:?} is not a number")))
        };
        match key.as_ref() {
            "status" => request.statuses.push(status(&value)?.into()),
            "submitted_after_ms" => request.submitted_after_ms = number("submitted_after_ms")?,
            "submitted_before_ms" => request.submitted_before_ms = number("submitted_before_ms")?,
            "page_size" => {
                request.page_size = u32::try_from(number("page_size")?).map_err(|_| {
                    Status::invalid_argument(format!("page_size={value:?} is out of range"))
                })?;
            }
            "page_token" => request.page_token = value.into_owned(),
            other => match other.strip_prefix("metadata.") {
                Some(name) if !name.is_empty() => {
                    request.metadata.insert(name.to_owned(), value.into_owned());
                }
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "unknown query parameter {other:?}: status, metadata.KEY, \
                         submitted_after_ms, submitted_before_ms, page_size, page_token"
                    )));
                }
            },
        }
    }
    Ok(request)
}

fn status(name: &str) -> Result<BuildStatus, Status> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("BUILD_STATUS_") {
        upper
    } else {
        format!("BUILD_STATUS_{upper}")
    };
    BuildStatus::from_str_name(&full)
        .filter(|status| *status != BuildStatus::Unknown)
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "status={name:?} is not a build status: queued, running, succeeded, failed, \
                 dep_failed, cancelled, cached_failure"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_names_statuses_metadata_and_a_page() {
        let request = list_request(Some(
            "status=failed&status=BUILD_STATUS_RUNNING&metadata.branch=main&page_size=5&page_token=abc",
        ))
        .unwrap_or_default();
        assert_eq!(
            request.statuses,
            [BuildStatus::Failed as i32, BuildStatus::Running as i32]
        );
        assert_eq!(request.metadata["branch"], "main");
        assert_eq!((request.page_size, request.page_token.as_str()), (5, "abc"));
    }

    #[test]
    fn what_is_not_a_parameter_is_refused_by_name() {
        for query in ["status=done", "page_size=-1", "limit=5", "metadata.=x"] {
            let refused = list_request(Some(query)).err();
            assert_eq!(
                refused.map(|status| status.code()),
                Some(tonic::Code::InvalidArgument),
                "{query}"
            );
        }
    }
}
