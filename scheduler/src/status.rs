//! The statuses of builds, steps and attempts, each with the label it has everywhere outside
//! the core: in PostgreSQL's enums (`build_status`, `step_status`, `attempt_status`, mapped in
//! the runner's `db::status`), in logs and in the CLI. A runner test compares the labels with
//! `enum_range` on a migrated database, so the two can never drift apart.

use std::fmt;

/// Declares a status enum with its labels, in the order of PostgreSQL's enum.
macro_rules! status_enum {
    ($(#[$meta:meta])* $name:ident, { $($(#[$vmeta:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every status, in the order of PostgreSQL's enum.
            pub const ALL: &'static [Self] = &[$(Self::$variant,)+];

            /// Its label.
            #[must_use]
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $label,)+
                }
            }

            /// The status labelled `label`, if any.
            #[must_use]
            pub fn from_label(label: &str) -> Option<Self> {
                match label {
                    $($label => Some(Self::$variant),)+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

status_enum!(
    /// Where a build is in its lifecycle.
    BuildStatus, {
        /// Waiting for its first step to run.
        Queued => "queued",
        /// At least one of its steps has run.
        Running => "running",
        /// Its top-level step succeeded.
        Succeeded => "succeeded",
        /// Its top-level step failed.
        Failed => "failed",
        /// A step it needs failed.
        DepFailed => "dep_failed",
        /// Cancelled by a client. (A step out of retries for faults that were not its own ends
        /// `cancelled`; the builds needing it end `failed` or `dep_failed`.)
        Cancelled => "cancelled",
        /// It needs a derivation that failed on its own in an earlier build; nothing was built.
        CachedFailure => "cached_failure",
    }
);

status_enum!(
    /// Where a step is in its lifecycle.
    StepStatus, {
        /// Waiting for its inputs.
        Waiting => "waiting",
        /// Ready for a builder.
        Runnable => "runnable",
        /// Given to a builder.
        Running => "running",
        /// Built; its outputs are in the cache.
        Succeeded => "succeeded",
        /// The build itself failed: remembered, later builds of it fail at once.
        Failed => "failed",
        /// A step it needs failed.
        DepFailed => "dep_failed",
        /// Ran out of retries for faults that were not its own; the next build needing it tries
        /// again.
        Cancelled => "cancelled",
        /// No connected builder offered its system and features for the whole grace period;
        /// the next build needing it tries again.
        Unsupported => "unsupported",
    }
);

status_enum!(
    /// How one dispatch of a step ended.
    AttemptStatus, {
        /// On a builder now.
        Running => "running",
        /// Built.
        Succeeded => "succeeded",
        /// The build failed.
        Failed => "failed",
        /// The build exceeded its time or silence limit.
        TimedOut => "timed_out",
        /// The build printed more log than its limit allows.
        LogLimit => "log_limit",
        /// Something other than the build failed.
        InfrastructureFailure => "infrastructure_failure",
        /// The builder left or went silent mid-step.
        BuilderLost => "builder_lost",
        /// The runner stopped it: its build was cancelled, its builder drained and handed it
        /// back, or a previous runner process left it running and no build needs it any more.
        Aborted => "aborted",
    }
);

impl BuildStatus {
    /// Whether the build has ended.
    #[must_use]
    pub const fn is_terminal(self) -> bool {
        !matches!(self, Self::Queued | Self::Running)
    }
}

impl StepStatus {
    /// Whether the step is done for good (for this build at least).
    #[must_use]
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::DepFailed | Self::Cancelled | Self::Unsupported
        )
    }
}
