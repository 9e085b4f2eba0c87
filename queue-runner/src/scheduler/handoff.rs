//! Closures Submit has verified, handed to ingest so that it does not load and verify them a
//! second time. A build queued by other means (SQL from an evaluator, a runner restarted before
//! ingest) is not here, and ingest loads and verifies it from the database as always. Also the
//! gate both hold while they read and name rows, which history pruning respects.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::history::PlanGate;
use crate::verify::VerifiedClosure;

/// Most closures waiting at once; past it Submit keeps none (ingest reloads those), so a flood
/// of submissions while ingest is busy cannot pile up in memory.
const MAX_WAITING: usize = 16;

/// Verified closures by build id, from Submit to ingest.
#[derive(Debug, Clone, Default)]
pub struct Handoff {
    waiting: Arc<Mutex<HashMap<i64, VerifiedClosure>>>,
    gate: Arc<PlanGate>,
}

impl Handoff {
    /// What submissions and plans hold from their first read to their commit.
    #[must_use]
    pub const fn gate(&self) -> &Arc<PlanGate> {
        &self.gate
    }

    /// Offers the closure of a build about to be committed; returns whether it was kept.
    #[must_use]
    pub fn offer(&self, build: i64, closure: VerifiedClosure) -> bool {
        let mut waiting = self.lock();
        if waiting.len() >= MAX_WAITING {
            return false;
        }
        waiting.insert(build, closure);
        true
    }

    /// Takes back an offer whose build was not committed.
    pub fn withdraw(&self, build: i64) {
        self.lock().remove(&build);
    }

    /// The verified closure of `build`, if Submit left it.
    #[must_use]
    pub fn take(&self, build: i64) -> Option<VerifiedClosure> {
        self.lock().remove(&build)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, VerifiedClosure>> {
        // Each operation is one map call: a panicking holder leaves the map consistent.
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> VerifiedClosure {
        VerifiedClosure::default()
    }

    #[test]
    fn a_closure_is_taken_once_withdrawn_on_failure_and_the_waiting_room_is_bounded() {
        let handoff = Handoff::default();
        assert!(handoff.offer(1, empty()));
        assert!(handoff.take(1).is_some());
        assert!(handoff.take(1).is_none(), "taken twice");
        assert!(handoff.offer(2, empty()));
        handoff.withdraw(2);
        assert!(handoff.take(2).is_none());
        for build in 0..i64::try_from(MAX_WAITING).unwrap() {
            assert!(handoff.offer(build, empty()));
        }
        assert!(!handoff.offer(99, empty()), "past the bound");
        assert!(handoff.take(99).is_none());
    }
}
