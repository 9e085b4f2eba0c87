//! When each runnable step became runnable, for metrics: how long it waited when it is
//! dispatched, and the age of the oldest runnable step of each system. Observation only: the
//! core decides nothing from it. Steps runnable before this runner started are not timed.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use drover_scheduler::status::StepStatus;
use drover_scheduler::{Change, Core, StepId};
use prometheus_client::metrics::histogram::Histogram;

/// Runnable steps, with when they became runnable.
#[derive(Debug, Default)]
pub struct QueueClock {
    since: HashMap<StepId, Instant>,
}

impl QueueClock {
    /// Follows `change`: a step that became runnable starts waiting (a step held back by a
    /// retry's backoff, once the backoff ends); a dispatched one has waited, which `waited` is
    /// told; any other status stops its clock.
    pub fn observe(&mut self, change: &Change, now: Instant, waited: &Histogram) {
        match change {
            Change::StepHeld { step, delay } => {
                self.since.insert(*step, now + *delay);
            }
            Change::StepStatus {
                step,
                status: StepStatus::Runnable,
                ..
            } => {
                self.since.entry(*step).or_insert(now);
            }
            Change::StepStatus { step, .. } => {
                self.since.remove(step);
            }
            Change::AttemptStarted { step, .. } => {
                if let Some(since) = self.since.remove(step) {
                    waited.observe(now.saturating_duration_since(since).as_secs_f64());
                }
            }
            _ => {}
        }
    }

    /// How long the oldest runnable step of each system has waited; steps the core no longer
    /// has are forgotten.
    pub fn oldest(&mut self, core: &Core, now: Instant) -> BTreeMap<String, Duration> {
        let graph = core.graph();
        self.since.retain(|step, _| graph.step(*step).is_some());
        let mut oldest: BTreeMap<String, Duration> = BTreeMap::new();
        for (step, since) in &self.since {
            let Some(node) = graph.step(*step) else {
                continue;
            };
            let waited = now.saturating_duration_since(*since);
            let system = &node.spec.requirements.system;
            match oldest.get_mut(system) {
                Some(longest) => *longest = (*longest).max(waited),
                None => {
                    oldest.insert(system.clone(), waited);
                }
            }
        }
        oldest
    }
}
