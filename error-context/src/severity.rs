//! What a failure means for the process: the one small scale every phase error maps onto.

use std::fmt;

/// How far a failure reaches. Every phase error maps each of its variants onto one of these in a
/// `match`, never by looking at message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Severity {
    /// The process cannot go on (for example the database is gone): exit non-zero so the service
    /// manager restarts it.
    Fatal,
    /// End this builder session or client connection; the process carries on.
    Session,
    /// This step fails, or is retried according to the retry policy.
    Step,
    /// Refuse this input (a malformed message, a bad upload) and carry on.
    Reject,
}

impl Severity {
    /// The lower-case name used in logs and metrics labels.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Fatal => "fatal",
            Self::Session => "session",
            Self::Step => "step",
            Self::Reject => "reject",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A phase error that knows its own [`Severity`].
pub trait Classify {
    /// How far this failure reaches.
    fn severity(&self) -> Severity;
}
