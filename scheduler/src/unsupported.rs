//! Runnable steps that no connected builder can take: each class of them waits through a grace
//! period (long enough for a whole fleet to restart) from the moment it has runnable steps and no
//! capable builder, then its runnable steps end `unsupported`. A builder that can run the class
//! joining in time ends the wait.
//!
//! Like a retry's backoff, a wait starts at the dispatch that first sees it (events carry no
//! time).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::placement::Placement;
use super::types::{Capabilities, ClassId, Requirements};

/// Classes waiting for a builder, and every builder's capabilities ever seen.
#[derive(Debug, Default)]
pub struct Unsupported {
    /// Since when each class has waited.
    since: HashMap<ClassId, Instant>,
    /// What builders offered when they joined (this process's and, at start, the database's).
    seen: Vec<Capabilities>,
}

impl Unsupported {
    /// Remembers that some builder offered `capabilities`.
    pub fn remember(&mut self, capabilities: Capabilities) {
        if !self.seen.contains(&capabilities) {
            self.seen.push(capabilities);
        }
    }

    /// Starts and ends waits as `placement` stands at `now`; returns the classes whose wait
    /// has lasted `grace` (their wait ends: the caller ends their runnable steps).
    pub fn expired(
        &mut self,
        now: Instant,
        placement: &Placement,
        grace: Duration,
    ) -> Vec<ClassId> {
        let waiting: Vec<ClassId> = placement.without_a_builder().collect();
        self.since.retain(|class, _| waiting.contains(class));
        let expired: Vec<ClassId> = waiting
            .into_iter()
            .filter(|class| now.duration_since(*self.since.entry(*class).or_insert(now)) >= grace)
            .collect();
        for class in &expired {
            self.since.remove(class);
        }
        expired
    }

    /// When the next wait ends, if any class waits.
    #[must_use]
    pub fn next_deadline(&self, grace: Duration) -> Option<Instant> {
        self.since.values().min().map(|since| *since + grace)
    }

    /// Why steps needing `requirements` end unsupported.
    #[must_use]
    pub fn reason(&self, requirements: &Requirements, grace: Duration) -> String {
        let features = if requirements.features.is_empty() {
            String::new()
        } else {
            let list: Vec<&str> = requirements.features.iter().map(String::as_str).collect();
            format!(" with features {}", list.join(", "))
        };
        let history = if self.seen.iter().any(|seen| seen.can_run(requirements)) {
            "builders that could are not connected"
        } else {
            "no builder has ever offered that"
        };
        format!(
            "no connected builder offered system {}{features} for {grace:?}; {history}",
            requirements.system
        )
    }
}
