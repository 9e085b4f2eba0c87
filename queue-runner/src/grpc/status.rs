//! How errors become gRPC statuses: exactly one `From` per error type (the build API's use
//! cases, and the builder service's refusals), pinned by table tests, so every method that
//! returns an error of a type maps it the same way. Clients and builders act on the codes
//! (`docs/client-api.md`, and [`super::refusals`] for builders).

use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt as _};

use super::list_filter::FilterError;
use super::refusals::{AttemptError, JoinError, LogUploadError, SessionError};
use super::upload::UploadError;
use crate::admin::AdminError;
use crate::builds::control::ControlError;
use crate::builds::job_set::JobSetError;
use crate::builds::read::ReadError;
use crate::builds::submit::ADMISSION_RETRY_AFTER;
use crate::builds::submit::SubmitError;
use crate::cache::CacheError;
use crate::db::DbError;
use crate::tokens::TokenError;
use crate::verify::VerifyError;

/// `UNAVAILABLE` with a database failure's whole chain: the client may retry.
#[must_use]
pub fn unavailable(error: &DbError) -> Status {
    Status::unavailable(error_context::report(error).to_string())
}

impl From<SubmitError> for Status {
    fn from(error: SubmitError) -> Self {
        let message = error_context::report(&error).to_string();
        match error {
            SubmitError::Verify(VerifyError::Unsupported { .. })
            | SubmitError::UnknownSystem { .. } => Status::failed_precondition(message),
            SubmitError::Source(CacheError::Io(_) | CacheError::NarInfo(_)) => {
                Status::internal(message)
            }
            SubmitError::DerivationTooLarge { .. }
            | SubmitError::Verify(_)
            | SubmitError::Metadata(_)
            | SubmitError::Source(_)
            | SubmitError::SourcePath(_) => Status::invalid_argument(message),
            SubmitError::FarmFull { .. } => Status::with_error_details(
                tonic::Code::ResourceExhausted,
                message,
                ErrorDetails::with_retry_info(Some(ADMISSION_RETRY_AFTER)),
            ),
            SubmitError::Database(_) => Status::unavailable(message),
        }
    }
}

impl From<AdminError> for Status {
    fn from(error: AdminError) -> Self {
        let message = error_context::report(&error).to_string();
        match error {
            AdminError::NoSuchMachine(_) | AdminError::NoSuchBuild(_) => Status::not_found(message),
            AdminError::BuildEnded(_) => Status::failed_precondition(message),
            AdminError::Serial(_) | AdminError::Cap(_) => Status::invalid_argument(message),
            AdminError::ShuttingDown | AdminError::Database(_) => Status::unavailable(message),
        }
    }
}

impl From<TokenError> for Status {
    fn from(error: TokenError) -> Self {
        let message = error_context::report(&error).to_string();
        match error {
            TokenError::Name(..) | TokenError::Role(_) => Status::invalid_argument(message),
            TokenError::Exists(_) => Status::already_exists(message),
            TokenError::NoSuchToken(_) => Status::not_found(message),
            TokenError::Random(_) => Status::internal(message),
            TokenError::Database(_) => Status::unavailable(message),
        }
    }
}

impl From<JobSetError> for Status {
    fn from(error: JobSetError) -> Self {
        let message = error_context::report(&error).to_string();
        match error {
            JobSetError::NoJobs | JobSetError::JobName(_) | JobSetError::SupersedeWithoutSeries => {
                Status::invalid_argument(message)
            }
            // The code and details (a retry delay) of the cause, with the whole chain.
            JobSetError::Job { source, .. } => with_message(&Status::from(*source), message),
            JobSetError::Submit(source) => with_message(&Status::from(source), message),
        }
    }
}

/// `status` with another message, its code and details kept.
fn with_message(status: &Status, message: String) -> Status {
    Status::with_details(status.code(), message, status.details().to_vec().into())
}

impl From<ControlError> for Status {
    fn from(error: ControlError) -> Self {
        let message = error_context::report(&error).to_string();
        match error {
            ControlError::NoSuchBuild(_) => Status::not_found(message),
            ControlError::NotOwner { .. } => Status::permission_denied(message),
            ControlError::NotRestartable(_) => Status::failed_precondition(message),
            ControlError::ShuttingDown | ControlError::Database(_) => Status::unavailable(message),
        }
    }
}

impl From<ReadError> for Status {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::NoSuchBuild(_)
            | ReadError::NoLog(_)
            | ReadError::LogExpired { .. }
            | ReadError::LogNotYet(_) => Status::not_found(error.to_string()),
            // The cause stays in the runner's log: it names files on the runner's disk.
            ReadError::ReadLog { .. } => Status::internal(error.to_string()),
            ReadError::Database(error) => unavailable(&error),
        }
    }
}

impl From<FilterError> for Status {
    fn from(error: FilterError) -> Self {
        Status::invalid_argument(error.to_string())
    }
}

impl From<JoinError> for Status {
    fn from(error: JoinError) -> Self {
        let message = error_context::report(&error).to_string();
        match error {
            JoinError::Recovering | JoinError::ShuttingDown => Status::unavailable(message),
            JoinError::NoJoin => Status::deadline_exceeded(message),
            JoinError::ApiVersion { .. } => Status::failed_precondition(message),
            JoinError::NotJoin
            | JoinError::NoSystem
            | JoinError::MaxJobs { .. }
            | JoinError::SpeedFactor
            | JoinError::HeldAttempt(_) => Status::invalid_argument(message),
            JoinError::Stream(status) => status,
        }
    }
}

impl From<SessionError> for Status {
    fn from(error: SessionError) -> Self {
        let message = error_context::report(&error).to_string();
        match error {
            SessionError::Silent => Status::deadline_exceeded(message),
            SessionError::Attempt(error) => error.into(),
            SessionError::Malformed(_)
            | SessionError::Outcome(_)
            | SessionError::Outputs(_)
            | SessionError::ReadCache { .. } => Status::invalid_argument(message),
        }
    }
}

impl From<AttemptError> for Status {
    fn from(error: AttemptError) -> Self {
        let message = error.to_string();
        match error {
            AttemptError::NotAnId(_) => Status::invalid_argument(message),
            AttemptError::NotRunning(_) => Status::not_found(message),
            AttemptError::NotYours { .. } => Status::permission_denied(message),
        }
    }
}

impl From<LogUploadError> for Status {
    fn from(error: LogUploadError) -> Self {
        match error {
            LogUploadError::Empty | LogUploadError::MixedAttempts => {
                Status::invalid_argument(error.to_string())
            }
            LogUploadError::Attempt(error) => error.into(),
            // The cause stays in the runner's log: it names files on the runner's disk.
            LogUploadError::Storing(_) => Status::internal(error.to_string()),
            LogUploadError::Stream(status) => status,
        }
    }
}

impl From<UploadError> for Status {
    fn from(error: UploadError) -> Self {
        let message = error_context::report(&error).to_string();
        match error {
            UploadError::Busy => Status::resource_exhausted(message),
            UploadError::Attempt(error) => error.into(),
            UploadError::Stream(status) => status,
            UploadError::Publisher(_) => Status::internal(message),
            UploadError::InvalidPath { .. } | UploadError::MixedAttempts | UploadError::Empty => {
                Status::invalid_argument(message)
            }
            UploadError::NotAnOutput(_) | UploadError::ReferenceOutsideClosure { .. } => {
                Status::permission_denied(message)
            }
            UploadError::Cache(CacheError::ReferenceNotPublished { .. }) => {
                Status::failed_precondition(message)
            }
            UploadError::Cache(CacheError::Withdrawn(_)) => Status::not_found(message),
            UploadError::Cache(
                CacheError::Nar { .. }
                | CacheError::FixedOutputMismatch { .. }
                | CacheError::NotAFlatFile(_)
                | CacheError::SourceMismatch(_),
            ) => Status::invalid_argument(message),
            UploadError::Cache(CacheError::Io(_) | CacheError::NarInfo(_)) => {
                Status::internal(message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn missing() -> DbError {
        DbError::Missing("the build row")
    }

    #[test]
    fn each_submit_error_has_one_code() {
        let cases = [
            (
                SubmitError::DerivationTooLarge {
                    path: "/nix/store/x.drv".to_owned(),
                    size: 2,
                    limit: 1,
                },
                Code::InvalidArgument,
            ),
            (
                SubmitError::UnknownSystem {
                    drv: "/nix/store/x.drv".to_owned(),
                    system: "riscv64-linux".to_owned(),
                    features: Vec::new(),
                },
                Code::FailedPrecondition,
            ),
            (
                SubmitError::FarmFull {
                    queued: 10,
                    cap: 10,
                    adding: 1,
                },
                Code::ResourceExhausted,
            ),
            (
                SubmitError::Source(CacheError::Io(std::io::Error::other("disk"))),
                Code::Internal,
            ),
            (SubmitError::Database(missing()), Code::Unavailable),
        ];
        for (error, code) in cases {
            let name = format!("{error:?}");
            assert_eq!(Status::from(error).code(), code, "{name}");
        }
    }

    #[test]
    fn a_full_farm_says_when_to_retry() {
        let status = Status::from(SubmitError::FarmFull {
            queued: 10,
            cap: 10,
            adding: 1,
        });
        let retry = status.get_details_retry_info().map(|info| info.retry_delay);
        assert_eq!(retry, Some(Some(ADMISSION_RETRY_AFTER)));
    }

    #[test]
    fn each_control_error_has_one_code() {
        let cases = [
            (ControlError::NoSuchBuild(1), Code::NotFound),
            (
                ControlError::NotOwner {
                    build: 1,
                    submitted_by: "client/alice".to_owned(),
                },
                Code::PermissionDenied,
            ),
            (ControlError::NotRestartable(1), Code::FailedPrecondition),
            (ControlError::ShuttingDown, Code::Unavailable),
            (ControlError::Database(missing()), Code::Unavailable),
        ];
        for (error, code) in cases {
            let name = format!("{error:?}");
            assert_eq!(Status::from(error).code(), code, "{name}");
        }
    }

    #[test]
    fn each_admin_error_has_one_code() {
        let cases = [
            (AdminError::NoSuchMachine("b".to_owned()), Code::NotFound),
            (AdminError::NoSuchBuild(1), Code::NotFound),
            (AdminError::BuildEnded(1), Code::FailedPrecondition),
            (AdminError::Serial("xyz".to_owned()), Code::InvalidArgument),
            (AdminError::Cap(u32::MAX), Code::InvalidArgument),
            (AdminError::ShuttingDown, Code::Unavailable),
            (AdminError::Database(missing()), Code::Unavailable),
        ];
        for (error, code) in cases {
            let name = format!("{error:?}");
            assert_eq!(Status::from(error).code(), code, "{name}");
        }
    }

    #[test]
    fn each_read_error_has_one_code_and_a_log_read_failure_names_no_file() {
        let cases = [
            (ReadError::NoSuchBuild(1), Code::NotFound),
            (ReadError::NoLog("x.drv".to_owned()), Code::NotFound),
            (ReadError::LogNotYet("x.drv".to_owned()), Code::NotFound),
            (
                ReadError::ReadLog {
                    drv_path: "x.drv".to_owned(),
                    source: std::io::Error::other("/var/log/drover/secret-path"),
                },
                Code::Internal,
            ),
            (ReadError::Database(missing()), Code::Unavailable),
        ];
        for (error, code) in cases {
            let name = format!("{error:?}");
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{name}");
            assert!(
                !status.message().contains("secret-path"),
                "{}",
                status.message()
            );
        }
    }

    #[test]
    fn a_list_request_that_cannot_be_served_is_an_invalid_argument() {
        let filters = [
            FilterError::PageSize { size: 5000 },
            FilterError::PageToken("x".to_owned()),
            FilterError::UnknownStatus(99),
            FilterError::FilterOnUnknown,
        ];
        for error in filters {
            assert_eq!(Status::from(error).code(), Code::InvalidArgument);
        }
    }

    #[test]
    fn each_join_refusal_has_one_code_and_a_builder_stops_only_on_what_retrying_cannot_fix() {
        let cases = [
            (JoinError::Recovering, Code::Unavailable),
            (JoinError::ShuttingDown, Code::Unavailable),
            (JoinError::NoJoin, Code::DeadlineExceeded),
            (JoinError::NotJoin, Code::InvalidArgument),
            (
                JoinError::ApiVersion {
                    runner: "a",
                    builder: "b".to_owned(),
                },
                Code::FailedPrecondition,
            ),
            (JoinError::NoSystem, Code::InvalidArgument),
            (JoinError::MaxJobs { limit: 1024 }, Code::InvalidArgument),
            (JoinError::SpeedFactor, Code::InvalidArgument),
            (
                JoinError::HeldAttempt(AttemptError::NotAnId("x".to_owned())),
                Code::InvalidArgument,
            ),
            (
                JoinError::Stream(Status::cancelled("gone")),
                Code::Cancelled,
            ),
        ];
        for (error, code) in cases {
            let name = format!("{error:?}");
            assert_eq!(Status::from(error).code(), code, "{name}");
        }
    }

    #[test]
    fn each_attempt_session_and_upload_refusal_has_one_code() {
        let attempt = uuid::Uuid::nil();
        let codes = [
            (
                Status::from(AttemptError::NotAnId("x".to_owned())).code(),
                Code::InvalidArgument,
            ),
            (
                Status::from(AttemptError::NotRunning(attempt)).code(),
                Code::NotFound,
            ),
            (
                Status::from(AttemptError::NotYours {
                    attempt,
                    builder: "builder/b".to_owned(),
                })
                .code(),
                Code::PermissionDenied,
            ),
            (
                Status::from(SessionError::Silent).code(),
                Code::DeadlineExceeded,
            ),
            (
                Status::from(SessionError::Attempt(AttemptError::NotYours {
                    attempt,
                    builder: "builder/b".to_owned(),
                }))
                .code(),
                Code::PermissionDenied,
            ),
            (
                Status::from(SessionError::Malformed("Join sent twice")).code(),
                Code::InvalidArgument,
            ),
            (
                Status::from(LogUploadError::Empty).code(),
                Code::InvalidArgument,
            ),
            (
                Status::from(LogUploadError::Storing(std::io::Error::other("disk"))).code(),
                Code::Internal,
            ),
            (
                Status::from(LogUploadError::Attempt(AttemptError::NotRunning(attempt))).code(),
                Code::NotFound,
            ),
            (
                Status::from(UploadError::Busy).code(),
                Code::ResourceExhausted,
            ),
            (
                Status::from(UploadError::Empty).code(),
                Code::InvalidArgument,
            ),
            (
                Status::from(UploadError::MixedAttempts).code(),
                Code::InvalidArgument,
            ),
            (
                Status::from(UploadError::Cache(CacheError::Io(std::io::Error::other(
                    "disk",
                ))))
                .code(),
                Code::Internal,
            ),
        ];
        for (index, (code, expected)) in codes.into_iter().enumerate() {
            assert_eq!(code, expected, "case {index}");
        }
    }
}
