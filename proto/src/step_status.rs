//! A step's status on the wire. `StepState` carries it twice for one release: typed in
//! `step_status`, and as its label in the older `status` string, which clients built before the
//! typed field read. [`StepState::typed_status`] reads whichever the runner sent.

use crate::v1::{StepState, StepStatus};

impl StepStatus {
    /// The status's label, as the runner's database and older clients spell it; `None` for
    /// Unknown.
    #[must_use]
    pub fn label(self) -> Option<&'static str> {
        Some(match self {
            Self::Unknown => return None,
            Self::Waiting => "waiting",
            Self::Runnable => "runnable",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::DepFailed => "dep_failed",
            Self::Cancelled => "cancelled",
            Self::Unsupported => "unsupported",
        })
    }

    /// The status labelled `label`; Unknown for a label this client does not know.
    #[must_use]
    pub fn from_label(label: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|status| status.label() == Some(label))
            .unwrap_or(Self::Unknown)
    }

    /// Every known status.
    const ALL: [Self; 8] = [
        Self::Waiting,
        Self::Runnable,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::DepFailed,
        Self::Cancelled,
        Self::Unsupported,
    ];

    /// Whether a step in this status is done for good (for this build at least).
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::DepFailed | Self::Cancelled | Self::Unsupported
        )
    }
}

impl StepState {
    /// The step's status: the typed field, or, from a runner older than it, the label.
    #[must_use]
    pub fn typed_status(&self) -> StepStatus {
        match self.step_status() {
            StepStatus::Unknown => StepStatus::from_label(&self.status),
            known => known,
        }
    }

    /// How a client shows the status: its label, or the runner's own word for one this client
    /// does not know.
    #[must_use]
    pub fn status_label(&self) -> &str {
        self.typed_status().label().unwrap_or(&self.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_and_unknown_labels_read_as_unknown() {
        for status in StepStatus::ALL {
            assert_eq!(StepStatus::from_label(status.label().unwrap()), status);
        }
        assert_eq!(StepStatus::from_label("quarantined"), StepStatus::Unknown);
    }

    #[test]
    fn the_typed_field_wins_and_an_older_runners_label_is_read() {
        let typed = StepState {
            step_status: StepStatus::Running.into(),
            status: "running".to_owned(),
            ..StepState::default()
        };
        assert_eq!(typed.typed_status(), StepStatus::Running);
        let older = StepState {
            status: "dep_failed".to_owned(),
            ..StepState::default()
        };
        assert_eq!(older.typed_status(), StepStatus::DepFailed);
        let newer = StepState {
            step_status: 99,
            status: "quarantined".to_owned(),
            ..StepState::default()
        };
        assert_eq!(newer.typed_status(), StepStatus::Unknown);
        assert_eq!(newer.status_label(), "quarantined");
        assert!(!newer.typed_status().is_terminal());
    }
}
