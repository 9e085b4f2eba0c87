//! What a failed call to the runner means: the runner's own refusal (a status it sent, with no
//! cause on this side), the runner out of reach (a status made here, with the transport's
//! failure as its cause), or a certificate refused in the TLS handshake.

use error_context::{Classify, Severity};

use crate::exit::{Exit, ExitStatus};

/// Why a call to the runner failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The runner refused the request.
    #[error("the runner refused: {}", .0.message())]
    Refused(tonic::Status),
    /// The runner could not be reached (the request may never have arrived).
    #[error("could not reach the runner: {}", .0.message())]
    Unreachable(tonic::Status),
    /// A certificate was refused in the TLS handshake.
    #[error("{0}")]
    CertificateRefused(String),
}

impl From<tonic::Status> for CallError {
    fn from(status: tonic::Status) -> Self {
        if let Some(problem) = drover_tls::refusal::certificate_problem(&status) {
            Self::CertificateRefused(problem)
        } else if std::error::Error::source(&status).is_some() {
            Self::Unreachable(status)
        } else {
            Self::Refused(status)
        }
    }
}

impl Classify for CallError {
    /// The caller's request was wrong (exit 64), the runner is out of reach or failing (exit
    /// 69), or the call failed otherwise (exit 1).
    fn severity(&self) -> Severity {
        match self {
            Self::Refused(status)
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::NotFound
                        | tonic::Code::PermissionDenied
                ) =>
            {
                Severity::Reject
            }
            // The runner out of reach, or failing: the builds are safe, try again later.
            Self::Unreachable(_) => Severity::Session,
            Self::Refused(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Internal | tonic::Code::Unknown
                ) =>
            {
                Severity::Session
            }
            _ => Severity::Fatal,
        }
    }
}

impl ExitStatus for CallError {
    fn exit(&self) -> Exit {
        match self {
            Self::CertificateRefused(_) => Exit::Config,
            Self::Unreachable(_) => Exit::Unavailable,
            Self::Refused(status) => match status.code() {
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => Exit::Data,
                tonic::Code::NotFound
                | tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated => Exit::Usage,
                tonic::Code::Unavailable
                | tonic::Code::ResourceExhausted
                | tonic::Code::Internal
                | tonic::Code::Unknown
                | tonic::Code::DeadlineExceeded => Exit::Unavailable,
                _ => Exit::Failed,
            },
        }
    }
}
