//! [`Outcome`]: how an attempt ended, the one type builders report and the runner decides on.
//! The wire carries it as [`StepOutcome`]; this enum has no "unspecified" case, so code past the
//! decoding boundary never has to handle one.

use crate::v1::StepOutcome;

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Built; the outputs are uploaded.
    Succeeded,
    /// The build itself failed: permanent, never retried.
    Failed,
    /// The build exceeded its time or silence limit: permanent.
    TimedOut,
    /// Something other than the build failed (store, disk, transfer): retried.
    InfrastructureFailure,
    /// The build printed more log than its limit allows: permanent.
    LogLimitExceeded,
}

impl From<Outcome> for StepOutcome {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Succeeded => Self::Succeeded,
            Outcome::Failed => Self::Failed,
            Outcome::TimedOut => Self::TimedOut,
            Outcome::InfrastructureFailure => Self::InfrastructureFailure,
            Outcome::LogLimitExceeded => Self::LogLimitExceeded,
        }
    }
}

/// A wire outcome that names no outcome (unspecified, or a number this version does not know).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownOutcome(pub i32);

impl std::fmt::Display for UnknownOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step outcome {} is not a known outcome", self.0)
    }
}

impl std::error::Error for UnknownOutcome {}

impl TryFrom<i32> for Outcome {
    type Error = UnknownOutcome;

    fn try_from(wire: i32) -> Result<Self, UnknownOutcome> {
        match StepOutcome::try_from(wire) {
            Ok(StepOutcome::Succeeded) => Ok(Self::Succeeded),
            Ok(StepOutcome::Failed) => Ok(Self::Failed),
            Ok(StepOutcome::TimedOut) => Ok(Self::TimedOut),
            Ok(StepOutcome::InfrastructureFailure) => Ok(Self::InfrastructureFailure),
            Ok(StepOutcome::LogLimitExceeded) => Ok(Self::LogLimitExceeded),
            Ok(StepOutcome::Unspecified) | Err(_) => Err(UnknownOutcome(wire)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_survives_the_wire_and_unknown_numbers_are_refused() {
        for outcome in [
            Outcome::Succeeded,
            Outcome::Failed,
            Outcome::TimedOut,
            Outcome::InfrastructureFailure,
            Outcome::LogLimitExceeded,
        ] {
            let wire = StepOutcome::from(outcome) as i32;
            assert_eq!(Outcome::try_from(wire), Ok(outcome));
        }
        assert_eq!(Outcome::try_from(0), Err(UnknownOutcome(0)));
        assert_eq!(Outcome::try_from(99), Err(UnknownOutcome(99)));
    }
}
