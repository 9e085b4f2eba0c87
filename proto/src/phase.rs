//! What a client makes of a build's state. Every status maps onto one of a few phases, and a
//! phase (or status) this client was built without reads as Unknown, which has not ended: a
//! newer runner's states never end a client's wait early.

use crate::v1::{BuildPhase, BuildStatus};

impl BuildPhase {
    /// Whether a build in this phase has ended.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

impl BuildStatus {
    /// The phase this status belongs to.
    #[must_use]
    pub fn phase(self) -> BuildPhase {
        match self {
            Self::Unknown => BuildPhase::Unknown,
            Self::Queued => BuildPhase::Accepted,
            Self::Running => BuildPhase::Running,
            Self::Succeeded => BuildPhase::Succeeded,
            Self::Failed | Self::DepFailed | Self::CachedFailure => BuildPhase::Failed,
            Self::Cancelled => BuildPhase::Cancelled,
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use crate::v1::GetResponse;

    use super::*;

    #[test]
    fn a_phase_and_status_this_client_does_not_know_are_unknown_and_not_ended() {
        // A newer runner's GetResponse: build_id 7, status 42, phase 9 (field numbers 1, 2, 7).
        let wire = [0x08, 7, 0x10, 42, 0x38, 9];
        let response = GetResponse::decode(wire.as_slice()).unwrap();
        assert_eq!(response.build_id, 7);
        assert_eq!(response.status(), BuildStatus::Unknown);
        assert_eq!(response.phase(), BuildPhase::Unknown);
        assert!(!response.phase().is_terminal());
        assert!(!response.status().phase().is_terminal());
    }

    #[test]
    fn every_known_status_has_the_phase_its_name_says() {
        assert_eq!(BuildStatus::Queued.phase(), BuildPhase::Accepted);
        assert_eq!(BuildStatus::CachedFailure.phase(), BuildPhase::Failed);
        assert_eq!(BuildStatus::DepFailed.phase(), BuildPhase::Failed);
        assert!(BuildStatus::Cancelled.phase().is_terminal());
        assert!(!BuildStatus::Running.phase().is_terminal());
    }
}
