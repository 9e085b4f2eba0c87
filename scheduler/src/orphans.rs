//! Attempts a previous runner process left running: their builders kept building while the
//! runner was down, and claim them again when they rejoin. An orphan waits for its builder
//! until the re-adoption grace ends, which starts once the runner has recovered its queue
//! (builders cannot join before); then its step is requeued.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::types::{AttemptId, StepId};

/// One attempt nobody has claimed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    /// Its step.
    pub step: StepId,
    /// The builder it was given to: only that builder may claim it.
    pub builder: String,
    /// When the runner found it, on the core's clock.
    pub found: Instant,
}

/// The unclaimed attempts and the end of their grace.
#[derive(Debug, Default)]
pub struct Orphans {
    by_attempt: HashMap<AttemptId, Orphan>,
    by_step: HashMap<StepId, AttemptId>,
    deadline: Option<Instant>,
}

impl Orphans {
    /// Remembers an attempt the database says is running. A second one for the same step (which
    /// a consistent database never has) is returned, to be ended.
    pub fn add(&mut self, attempt: AttemptId, orphan: Orphan) -> Option<AttemptId> {
        if self.by_step.contains_key(&orphan.step) {
            return Some(attempt);
        }
        self.by_step.insert(orphan.step, attempt);
        self.by_attempt.insert(attempt, orphan);
        None
    }

    /// The orphaned attempt of `step`, if it has one.
    #[must_use]
    pub fn of_step(&self, step: StepId) -> Option<AttemptId> {
        self.by_step.get(&step).copied()
    }

    /// Removes an orphan: claimed, or no longer wanted.
    pub fn take(&mut self, attempt: &AttemptId) -> Option<Orphan> {
        let orphan = self.by_attempt.remove(attempt)?;
        self.by_step.remove(&orphan.step);
        Some(orphan)
    }

    /// Starts the grace: the queue is recovered and builders may join from `now`.
    pub fn start_grace(&mut self, now: Instant, grace: Duration) {
        self.deadline = Some(now + grace);
    }

    /// When the grace ends, while orphans remain.
    #[must_use]
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.filter(|_| !self.by_attempt.is_empty())
    }

    /// Every remaining orphan once the grace has ended at `now`; none before.
    pub fn expired(&mut self, now: Instant) -> Vec<(AttemptId, Orphan)> {
        if self.deadline.is_none_or(|deadline| now < deadline) {
            return Vec::new();
        }
        self.by_step.clear();
        self.by_attempt.drain().collect()
    }

    /// Every remaining orphan's attempt and step.
    #[must_use]
    pub fn list(&self) -> Vec<(AttemptId, StepId)> {
        self.by_attempt
            .iter()
            .map(|(attempt, orphan)| (*attempt, orphan.step))
            .collect()
    }
}
