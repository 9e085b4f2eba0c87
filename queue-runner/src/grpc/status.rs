//! How the build API's errors become gRPC statuses: exactly one `From` per error type, pinned by
//! a table test, so every method that returns an error of a type maps it the same way.

use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::builds::submit::ADMISSION_RETRY_AFTER;
use crate::builds::{ControlError, ReadError, SubmitError};
use crate::cache::CacheError;
use crate::db::DbError;
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

impl From<ControlError> for Status {
    fn from(error: ControlError) -> Self {
        let message = error_context::report(&error).to_string();
        match error {
            ControlError::NoSuchBuild(_) => Status::not_found(message),
            ControlError::NotOwner { .. } => Status::permission_denied(message),
            ControlError::AlreadyEnded { .. } | ControlError::NotRestartable(_) => {
                Status::failed_precondition(message)
            }
            ControlError::ShuttingDown | ControlError::Database(_) => Status::unavailable(message),
        }
    }
}

impl From<ReadError> for Status {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::NoSuchBuild(_) | ReadError::NoLog(_) | ReadError::LogNotYet(_) => {
                Status::not_found(error.to_string())
            }
            // The cause stays in the runner's log: it names files on the runner's disk.
            ReadError::ReadLog { .. } => Status::internal(error.to_string()),
            ReadError::Database(error) => unavailable(&error),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::db::status::BuildStatus;

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
            (
                ControlError::AlreadyEnded {
                    build: 1,
                    status: BuildStatus::Succeeded,
                },
                Code::FailedPrecondition,
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
}
