//! Which builder each running attempt was given to. Shared between the scheduler (which writes
//! it) and the gRPC handlers (which read it), so a builder can only report on, or upload logs
//! for, attempts it was given.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use nix_primitives::{Hash, IngestionMethod, StorePath};
use uuid::Uuid;

use super::graph::StepId;

/// What the builder of an attempt may upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadPolicy {
    /// The derivation being built: the outputs' deriver.
    pub deriver: StorePath,
    /// Its outputs, the only paths the attempt may upload.
    pub outputs: BTreeMap<String, StorePath>,
    /// The step's inputs (input sources and the outputs of input derivations it uses); outputs
    /// may refer only to their runtime closure and to each other.
    pub input_paths: BTreeSet<StorePath>,
    /// For a fixed-output derivation, how its output is hashed and the hash it must have.
    pub fixed: Option<(IngestionMethod, Hash)>,
}

/// Who runs an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOwner {
    /// The builder's name.
    pub builder: String,
    /// The step.
    pub step: StepId,
    /// What it may upload.
    pub policy: Arc<UploadPolicy>,
}

/// Running attempts by id.
#[derive(Debug, Clone, Default)]
pub struct Attempts {
    inner: Arc<Mutex<HashMap<Uuid, AttemptOwner>>>,
}

impl Attempts {
    /// Records a dispatch.
    pub fn insert(&self, attempt: Uuid, owner: AttemptOwner) {
        self.lock().insert(attempt, owner);
    }

    /// Forgets a finished attempt.
    #[expect(
        clippy::must_use_candidate,
        reason = "callers forget attempts without needing the owner"
    )]
    pub fn remove(&self, attempt: &Uuid) -> Option<AttemptOwner> {
        self.lock().remove(attempt)
    }

    /// The owner of a running attempt.
    #[must_use]
    pub fn owner(&self, attempt: &Uuid) -> Option<AttemptOwner> {
        self.lock().get(attempt).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, AttemptOwner>> {
        // The map stays consistent even if a holder panicked: every operation is one call.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
