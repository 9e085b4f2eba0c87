//! Attempts whose builder is out of reach but probably still building them, waiting for that
//! builder to claim them when it (re)joins: those a previous runner process left running, whose
//! grace starts once the runner has recovered its queue (builders cannot join before), and
//! those of a builder whose connection failed, each waiting the rejoin grace from the moment
//! the core learns of the loss. An orphan nobody claims in time has its step requeued.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::types::{AttemptId, StepId};

/// Why an attempt lost its builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The runner restarted.
    RunnerRestarted,
    /// The builder's connection failed, for this reason.
    ConnectionLost(String),
}

/// Until when an orphan waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The grace starts when the queue is recovered ([`Orphans::start_grace`]).
    Recovery,
    /// This long from the next [`Orphans::arm`].
    For(Duration),
    /// Until then.
    Until(Instant),
}

/// One attempt nobody has claimed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    /// Its step.
    pub step: StepId,
    /// The builder it was given to: only that builder may claim it.
    pub builder: String,
    /// When it started, or when the runner found it after a restart, on the core's clock.
    pub started: Instant,
    /// Why it lost its builder.
    pub cause: Cause,
    /// How long it waits.
    pub wait: Wait,
}

/// The unclaimed attempts.
#[derive(Debug, Default)]
pub struct Orphans {
    by_attempt: HashMap<AttemptId, Orphan>,
    by_step: HashMap<StepId, AttemptId>,
}

impl Orphans {
    /// Remembers an attempt whose builder is out of reach. A second one for the same step
    /// (which a consistent database never has) is returned, to be ended.
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

    /// The step of an orphaned attempt.
    #[must_use]
    pub fn step_of(&self, attempt: &AttemptId) -> Option<StepId> {
        self.by_attempt.get(attempt).map(|orphan| orphan.step)
    }

    /// Removes an orphan: claimed, or no longer wanted.
    pub fn take(&mut self, attempt: &AttemptId) -> Option<Orphan> {
        let orphan = self.by_attempt.remove(attempt)?;
        self.by_step.remove(&orphan.step);
        Some(orphan)
    }

    /// Starts the grace of the attempts a previous runner left: the queue is recovered and
    /// builders may join from `now`.
    pub fn start_grace(&mut self, now: Instant, grace: Duration) {
        for orphan in self.by_attempt.values_mut() {
            if orphan.wait == Wait::Recovery {
                orphan.wait = Wait::Until(now + grace);
            }
        }
    }

    /// Starts the wait of the attempts whose builder was lost since the last call. The core
    /// calls it from every dispatch, which follows every batch of events, so a wait starts
    /// within a batch of the loss; until then [`Orphans::deadline`] does not count it.
    pub fn arm(&mut self, now: Instant) {
        for orphan in self.by_attempt.values_mut() {
            if let Wait::For(grace) = orphan.wait {
                orphan.wait = Wait::Until(now + grace);
            }
        }
    }

    /// When the next wait ends.
    #[must_use]
    pub fn deadline(&self) -> Option<Instant> {
        self.by_attempt
            .values()
            .filter_map(|orphan| match orphan.wait {
                Wait::Until(deadline) => Some(deadline),
                Wait::Recovery | Wait::For(_) => None,
            })
            .min()
    }

    /// The orphans whose wait has ended at `now`, removed.
    pub fn expired(&mut self, now: Instant) -> Vec<(AttemptId, Orphan)> {
        let mut due: Vec<AttemptId> = self
            .by_attempt
            .iter()
            .filter(|(_, orphan)| matches!(orphan.wait, Wait::Until(deadline) if deadline <= now))
            .map(|(attempt, _)| *attempt)
            .collect();
        due.sort_unstable();
        due.into_iter()
            .filter_map(|attempt| Some((attempt, self.take(&attempt)?)))
            .collect()
    }

    /// The orphans of `builder`.
    #[must_use]
    pub fn of_builder(&self, builder: &str) -> Vec<AttemptId> {
        self.by_attempt
            .iter()
            .filter(|(_, orphan)| orphan.builder == builder)
            .map(|(attempt, _)| *attempt)
            .collect()
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
