//! Why a step's log or outputs could not reach the runner. A running step's job turns any of
//! these into that step's infrastructure failure; none of them ends the builder or its session.

/// Why a step's log or outputs could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The builder stopped while the step waited for a session to upload over.
    #[error("the builder is stopping")]
    Stopping,
    /// The step's log could not be spooled to a temporary file.
    #[error("spooling the log")]
    Spool(#[source] std::io::Error),
    /// The runner refused the upload.
    #[error("the runner refused the upload: {}", .0.message())]
    Refused(tonic::Status),
}
