//! A read-only view of the running attempts for the gRPC handlers: which builder was given each
//! attempt and what its step may upload, so a builder can only report on, or upload logs and
//! outputs for, attempts it holds. The scheduler core owns the attempts; the driver mirrors its
//! decisions here: an attempt appears once its dispatch is committed (before the builder hears
//! of it) and disappears when the core ends it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use drover_scheduler::{AttemptId, StepId, StepSpec};

/// Who runs an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOwner {
    /// The builder's name.
    pub builder: String,
    /// The step.
    pub step: StepId,
    /// What the step builds: the only outputs the attempt may upload, and their inputs.
    pub spec: Arc<StepSpec>,
}

/// Running attempts by id.
#[derive(Debug, Clone, Default)]
pub struct Attempts {
    inner: Arc<Mutex<HashMap<AttemptId, AttemptOwner>>>,
}

impl Attempts {
    /// Records a dispatch.
    pub fn insert(&self, attempt: AttemptId, owner: AttemptOwner) {
        self.lock().insert(attempt, owner);
    }

    /// Forgets an ended attempt.
    pub fn remove(&self, attempt: &AttemptId) {
        self.lock().remove(attempt);
    }

    /// The owner of a running attempt.
    #[must_use]
    pub fn owner(&self, attempt: &AttemptId) -> Option<AttemptOwner> {
        self.lock().get(attempt).cloned()
    }

    /// Whether `attempt` still runs, on `builder`: checked again just before an upload of it
    /// becomes visible.
    #[must_use]
    pub fn is_owned_by(&self, attempt: &AttemptId, builder: &str) -> bool {
        self.lock()
            .get(attempt)
            .is_some_and(|owner| owner.builder == builder)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AttemptId, AttemptOwner>> {
        // The map stays consistent even if a holder panicked: every operation is one call.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
