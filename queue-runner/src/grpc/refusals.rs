//! Why the builder service refuses a builder: its Join, a message in its tunnel, an attempt it
//! names, or a log upload. Each is typed here and mapped to a gRPC status once, in
//! [`super::status`], pinned by a table test: a builder acts on the code (on the tunnel,
//! `FAILED_PRECONDITION`, `INVALID_ARGUMENT`, `PERMISSION_DENIED` and `UNAUTHENTICATED` end it and
//! the rest it retries; a refused upload fails that step only).

use error_context::{Classify, Severity};
use uuid::Uuid;

/// Why a builder may not open a tunnel.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The runner has not recovered its queue yet.
    #[error("the runner is still recovering its queue; join again shortly")]
    Recovering,
    /// No Join came within the liveness timeout.
    #[error("no Join within the liveness timeout")]
    NoJoin,
    /// The first message was something else.
    #[error("the first message must be Join")]
    NotJoin,
    /// The builder speaks another version of the protocol.
    #[error("API version mismatch: the runner speaks {runner}, the builder {builder}")]
    ApiVersion {
        /// The runner's protocol version.
        runner: &'static str,
        /// The version the builder sent.
        builder: String,
    },
    /// The builder offers no system.
    #[error("Join names no system")]
    NoSystem,
    /// `max_jobs` is 0 or over the limit.
    #[error("max_jobs must be between 1 and {limit}")]
    MaxJobs {
        /// The most the runner accepts.
        limit: u32,
    },
    /// `speed_factor` is not a positive number.
    #[error("speed_factor must be positive")]
    SpeedFactor,
    /// An attempt the builder says it holds is not an attempt id.
    #[error("the Join names a held attempt that is not an attempt id")]
    HeldAttempt(#[source] AttemptError),
    /// The runner is stopping.
    #[error("the runner is shutting down")]
    ShuttingDown,
    /// The stream failed before the Join was read.
    #[error("reading the Join: {}", .0.message())]
    Stream(tonic::Status),
}

/// Why a builder's message was not passed on as it came.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The builder sent nothing within the liveness timeout.
    #[error("no message within the liveness timeout")]
    Silent,
    /// The message is malformed.
    #[error("{0}")]
    Malformed(&'static str),
    /// The builder reported on an attempt id that is none, or on another builder's attempt.
    #[error(transparent)]
    Attempt(#[from] AttemptError),
    /// The builder named an outcome this runner does not know.
    #[error("a StepResult without a known outcome")]
    Outcome(#[source] drover_proto::UnknownOutcome),
    /// A claimed success does not match what the step must produce or what was uploaded.
    #[error("{0}")]
    Outputs(String),
    /// The cache could not be read to check an output.
    #[error("reading the cache entry of {path}")]
    ReadCache {
        /// The output path.
        path: String,
        /// What the cache said.
        #[source]
        source: crate::cache::CacheError,
    },
}

impl Classify for SessionError {
    /// A malformed or forged message ends the session; a success that cannot be verified fails
    /// that attempt only (its step is retried), as does a cache read error on its files.
    fn severity(&self) -> Severity {
        match self {
            Self::Silent | Self::Malformed(_) | Self::Attempt(_) | Self::Outcome(_) => {
                Severity::Session
            }
            Self::Outputs(_) | Self::ReadCache { .. } => Severity::Step,
        }
    }
}

/// Why a builder may not report or upload for an attempt it names.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The text is not an attempt id.
    #[error("{0:?} is not an attempt id")]
    NotAnId(String),
    /// No such attempt runs (it ended, or was given to someone else after a requeue).
    #[error("attempt {0} is not running")]
    NotRunning(Uuid),
    /// It runs on another builder.
    #[error("attempt {attempt} was not given to {builder}")]
    NotYours {
        /// The attempt.
        attempt: Uuid,
        /// The builder that named it, as its certificate names it (`builder/NAME`).
        builder: String,
    },
}

/// Why a log upload was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum LogUploadError {
    /// The stream carried no chunk.
    #[error("an empty log upload")]
    Empty,
    /// Chunks named different attempts.
    #[error("a log upload must name one attempt")]
    MixedAttempts,
    /// The attempt named is not this builder's.
    #[error(transparent)]
    Attempt(#[from] AttemptError),
    /// The log could not be written to the runner's disk.
    #[error("storing the log failed")]
    Storing(#[source] std::io::Error),
    /// The stream failed.
    #[error("reading the log upload: {}", .0.message())]
    Stream(#[from] tonic::Status),
}

/// The attempt id `text` names.
pub fn parse_attempt(text: &str) -> Result<Uuid, AttemptError> {
    Uuid::parse_str(text).map_err(|_| AttemptError::NotAnId(text.to_owned()))
}
