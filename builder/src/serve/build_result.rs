//! Nix's answer to BuildDerivation, and the one table that turns each of its statuses into a
//! drover outcome. Nix's own statuses tell a derivation's fault (it exited non-zero, made no
//! output, missed its fixed hash) from the machine's (an input that could not be made valid),
//! which `nix-store --realise`'s exit codes cannot.

use drover_proto::Outcome;

/// Nix's `BuildResult::Status`, in wire order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStatus {
    /// Built now.
    Built,
    /// Substituted instead of built.
    Substituted,
    /// The outputs were valid already (another process built them meanwhile).
    AlreadyValid,
    /// The builder failed (non-zero exit).
    PermanentFailure,
    /// An input was refused.
    InputRejected,
    /// An output was refused: missing, or a fixed output with the wrong hash.
    OutputRejected,
    /// A failure Nix itself says may pass.
    TransientFailure,
    /// Nix's own cache of failures said no.
    CachedFailure,
    /// Over the time or silence limit.
    TimedOut,
    /// Anything else, such as an input path that is not valid.
    MiscFailure,
    /// A dependency failed (only when Nix builds the dependency itself).
    DependencyFailed,
    /// Over the log limit.
    LogLimitExceeded,
    /// Repeated builds gave different outputs.
    NotDeterministic,
    /// A content-addressed derivation resolved to outputs that were valid.
    ResolvesToAlreadyValid,
    /// Nothing could substitute the outputs.
    NoSubstituters,
}

impl BuildStatus {
    /// Every status, in wire order.
    pub const ALL: [Self; 15] = [
        Self::Built,
        Self::Substituted,
        Self::AlreadyValid,
        Self::PermanentFailure,
        Self::InputRejected,
        Self::OutputRejected,
        Self::TransientFailure,
        Self::CachedFailure,
        Self::TimedOut,
        Self::MiscFailure,
        Self::DependencyFailed,
        Self::LogLimitExceeded,
        Self::NotDeterministic,
        Self::ResolvesToAlreadyValid,
        Self::NoSubstituters,
    ];

    /// The status a wire number names, if any.
    #[must_use]
    pub fn from_wire(number: u64) -> Option<Self> {
        usize::try_from(number)
            .ok()
            .and_then(|index| Self::ALL.get(index).copied())
    }

    /// What drover makes of it. Documented, row by row, in `docs/reliability.md`.
    #[must_use]
    pub const fn outcome(self) -> Outcome {
        match self {
            Self::Built | Self::Substituted | Self::AlreadyValid | Self::ResolvesToAlreadyValid => {
                Outcome::Succeeded
            }
            Self::PermanentFailure
            | Self::OutputRejected
            | Self::InputRejected
            | Self::NotDeterministic => Outcome::Failed,
            Self::TimedOut => Outcome::TimedOut,
            Self::LogLimitExceeded => Outcome::LogLimitExceeded,
            Self::CachedFailure
            | Self::DependencyFailed
            | Self::TransientFailure
            | Self::MiscFailure
            | Self::NoSubstituters => Outcome::InfrastructureFailure,
        }
    }
}

/// The reply to BuildDerivation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    /// How it ended.
    pub status: BuildStatus,
    /// Nix's message for anything but success (with its colour codes).
    pub error_message: String,
    /// How many times the derivation was built (more with repeats).
    pub times_built: u64,
    /// Whether repeated builds differed.
    pub non_deterministic: bool,
}

impl BuildResult {
    /// The outcome and the message a user reads.
    #[must_use]
    pub fn outcome(&self) -> (Outcome, String) {
        let message = crate::ansi::strip_ansi(self.error_message.trim().as_bytes());
        let message = String::from_utf8_lossy(&message).into_owned();
        let message = match self.status {
            BuildStatus::NotDeterministic if message.is_empty() => {
                "the derivation is not deterministic: repeated builds differ".to_owned()
            }
            BuildStatus::NotDeterministic => {
                format!("the derivation is not deterministic: {message}")
            }
            _ if message.is_empty() && self.status.outcome() != Outcome::Succeeded => {
                format!("Nix reported {:?}", self.status)
            }
            _ => message,
        };
        (self.status.outcome(), message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_number_names_its_status_and_the_table_is_the_documented_one() {
        for (number, status) in BuildStatus::ALL.iter().enumerate() {
            assert_eq!(BuildStatus::from_wire(number as u64), Some(*status));
        }
        assert_eq!(BuildStatus::from_wire(15), None);
        let table: Vec<(BuildStatus, Outcome)> = BuildStatus::ALL
            .iter()
            .map(|status| (*status, status.outcome()))
            .collect();
        let documented = include_str!("../../../docs/reliability.md");
        for (status, outcome) in table {
            let row = format!("| {status:?} | {} |", outcome_name(outcome));
            assert!(
                documented.contains(&row),
                "docs/reliability.md lacks the row `{row}`"
            );
        }
    }

    fn outcome_name(outcome: Outcome) -> &'static str {
        match outcome {
            Outcome::Succeeded => "success",
            Outcome::Failed => "`failed`",
            Outcome::TimedOut => "`timed_out`",
            Outcome::LogLimitExceeded => "`log_limit`",
            Outcome::InfrastructureFailure => "infrastructure failure, retried",
        }
    }

    #[test]
    fn a_non_deterministic_build_says_so_and_colour_codes_are_removed() {
        let result = BuildResult {
            status: BuildStatus::NotDeterministic,
            error_message: "\u{1b}[31;1merror:\u{1b}[0m outputs differ".to_owned(),
            times_built: 2,
            non_deterministic: true,
        };
        assert_eq!(
            result.outcome(),
            (
                Outcome::Failed,
                "the derivation is not deterministic: error: outputs differ".to_owned()
            )
        );
    }
}
