//! Why the builder lost or could not get its tunnel, and what each reason means for the builder:
//! a refusal that retrying cannot fix ends it; anything else ends one session, and it dials again.

use error_context::{Classify, Severity};
use tonic::Code;

/// Why the builder lost or could not get its tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// A certificate or key file cannot be read.
    #[error("reading {path}")]
    ReadTls {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The endpoint or TLS settings are unusable, or the connection failed.
    #[error("connecting to the runner")]
    Connect(#[source] tonic::transport::Error),
    /// The runner refused or ended the tunnel.
    #[error("the runner ended the tunnel: {}", .0.message())]
    Status(tonic::Status),
    /// The runner closed the tunnel.
    #[error("the runner closed the tunnel")]
    Closed,
    /// The executor cannot work on this machine (for example, Nix is missing).
    #[error("preparing the executor")]
    Executor(#[source] crate::executor::nix::PrepareError),
    /// The runner did not answer Join with Joined.
    #[error("the runner did not acknowledge Join")]
    NotJoined,
    /// A certificate was refused in the TLS handshake (this builder's by the runner, or the
    /// runner's by this builder): retrying cannot help.
    #[error("{problem}")]
    CertificateRefused {
        /// What was wrong.
        problem: String,
    },
}

impl TunnelError {
    /// This error, or [`TunnelError::CertificateRefused`] if a refused certificate caused it.
    #[must_use]
    pub fn or_certificate_refused(self) -> Self {
        let problem = match &self {
            Self::Connect(error) => drover_tls::refusal::certificate_problem(error),
            Self::Status(status) => drover_tls::refusal::certificate_problem(status),
            _ => None,
        };
        problem.map_or(self, |problem| Self::CertificateRefused { problem })
    }
}

impl TunnelError {
    /// What a fatal error means, for the line the builder exits with: its own files or machine,
    /// or the runner's refusal.
    #[must_use]
    pub const fn fatal_context(&self) -> &'static str {
        match self {
            Self::ReadTls { .. } => "this builder's own TLS files cannot be read",
            Self::Executor(_) => "this machine cannot run the executor",
            Self::CertificateRefused { .. } => "the TLS handshake with the runner cannot succeed",
            _ => "the runner refused this builder",
        }
    }
}

impl Classify for TunnelError {
    /// A refusal retrying cannot fix is fatal; anything else ends this session and is retried.
    fn severity(&self) -> Severity {
        match self {
            Self::ReadTls { .. } | Self::Executor(_) | Self::CertificateRefused { .. } => {
                Severity::Fatal
            }
            // A message this builder could not decode is no refusal: the session is broken.
            Self::Status(status)
                if status.code() == Code::InvalidArgument
                    && status.message().starts_with(drover_proto::codec::MALFORMED) =>
            {
                Severity::Session
            }
            Self::Status(status)
                if matches!(
                    status.code(),
                    Code::Unauthenticated
                        | Code::PermissionDenied
                        | Code::FailedPrecondition
                        | Code::InvalidArgument
                ) =>
            {
                Severity::Fatal
            }
            Self::Connect(_) | Self::Status(_) | Self::Closed | Self::NotJoined => {
                Severity::Session
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_retrying_cannot_fix_are_fatal_and_the_rest_end_a_session() {
        let cases = [
            (
                TunnelError::Status(tonic::Status::unauthenticated("")),
                Severity::Fatal,
            ),
            (
                TunnelError::Status(tonic::Status::permission_denied("")),
                Severity::Fatal,
            ),
            (
                TunnelError::Status(tonic::Status::failed_precondition("")),
                Severity::Fatal,
            ),
            (
                TunnelError::Status(tonic::Status::invalid_argument("")),
                Severity::Fatal,
            ),
            (
                TunnelError::Status(tonic::Status::unavailable("")),
                Severity::Session,
            ),
            (
                TunnelError::Status(tonic::Status::invalid_argument(format!(
                    "{}: invalid wire type",
                    drover_proto::codec::MALFORMED
                ))),
                Severity::Session,
            ),
            (
                TunnelError::Status(tonic::Status::cancelled("")),
                Severity::Session,
            ),
            (TunnelError::Closed, Severity::Session),
            (TunnelError::NotJoined, Severity::Session),
            (
                TunnelError::CertificateRefused {
                    problem: String::new(),
                },
                Severity::Fatal,
            ),
        ];
        for (error, severity) in cases {
            assert_eq!(error.severity(), severity, "{error:?}");
        }
    }
}
