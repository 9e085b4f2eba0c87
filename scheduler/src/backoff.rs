//! Steps held back from dispatch until a time: a retry waiting out its backoff, or a step
//! postponed (`steps.visible_after`). A held step is runnable in the graph but absent from
//! placement's lines until it is due.
//!
//! Events carry no time, so a delay decided while handling one is kept as a duration until the
//! next dispatch, whose `now` makes it a due time.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::types::StepId;

/// How infrastructure failures of a step are retried: `max_attempts` attempts in all, the
/// retries spaced by a delay that starts at `initial` and grows by `multiplier` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts that may end in infrastructure failures; the last of them fails the step.
    pub max_attempts: u32,
    /// The delay before the first retry.
    pub initial: Duration,
    /// How much each delay grows over the previous one (at least 1).
    pub multiplier: f64,
    /// The longest delay.
    pub max: Duration,
}

impl RetryPolicy {
    /// The delay before the retry that follows the `failures`-th failure (1 for the first).
    #[must_use]
    pub fn delay(&self, failures: u32) -> Duration {
        let exponent = i32::try_from(failures.saturating_sub(1)).unwrap_or(i32::MAX);
        let seconds = self.initial.as_secs_f64() * self.multiplier.max(1.0).powi(exponent);
        if seconds.is_finite() && seconds < self.max.as_secs_f64() {
            Duration::from_secs_f64(seconds)
        } else {
            self.max
        }
    }
}

/// The held steps.
#[derive(Debug, Default)]
pub struct Held {
    /// Every held step, with its due time once dated.
    steps: HashMap<StepId, Option<Instant>>,
    /// Due times made absolute.
    due: BTreeSet<(Instant, StepId)>,
    /// Delays decided since the last dispatch.
    undated: Vec<(StepId, Duration)>,
}

impl Held {
    /// Holds `step` back for `delay` from the next dispatch, replacing an earlier hold.
    pub fn hold(&mut self, step: StepId, delay: Duration) {
        match self.steps.insert(step, None) {
            Some(Some(at)) => {
                self.due.remove(&(at, step));
            }
            Some(None) => self.undated.retain(|(held, _)| *held != step),
            None => {}
        }
        self.undated.push((step, delay));
    }

    /// Whether `step` is held back.
    #[must_use]
    pub fn holds(&self, step: StepId) -> bool {
        self.steps.contains_key(&step)
    }

    /// Dates the delays decided since the last call, and returns the steps due at `now`, no
    /// longer held.
    pub fn release(&mut self, now: Instant) -> Vec<StepId> {
        for (step, delay) in self.undated.drain(..) {
            let at = now + delay;
            self.due.insert((at, step));
            self.steps.insert(step, Some(at));
        }
        let mut released = Vec::new();
        while let Some(&(at, step)) = self.due.first() {
            if at > now {
                break;
            }
            self.due.pop_first();
            self.steps.remove(&step);
            released.push(step);
        }
        released
    }

    /// When the next held step is due, if any.
    #[must_use]
    pub fn next_due(&self) -> Option<Instant> {
        self.due.first().map(|(at, _)| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_by_the_multiplier_up_to_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial: Duration::from_secs(10),
            multiplier: 2.0,
            max: Duration::from_mins(1),
        };
        let delays: Vec<u64> = (1..=5).map(|n| policy.delay(n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 60, 60]);
        assert_eq!(policy.delay(u32::MAX), Duration::from_mins(1));
    }

    #[test]
    fn a_held_step_is_released_once_due_and_only_once() {
        let start = Instant::now();
        let mut held = Held::default();
        held.hold(1, Duration::from_secs(5));
        held.hold(2, Duration::from_secs(1));
        assert!(held.holds(1));
        assert_eq!(held.release(start), Vec::<StepId>::new());
        assert_eq!(held.next_due(), Some(start + Duration::from_secs(1)));
        assert_eq!(held.release(start + Duration::from_secs(1)), [2]);
        assert_eq!(held.release(start + Duration::from_secs(9)), [1]);
        assert!(!held.holds(1));
        assert_eq!(held.next_due(), None);
    }

    #[test]
    fn a_second_hold_replaces_the_first() {
        let start = Instant::now();
        let mut held = Held::default();
        held.hold(1, Duration::from_secs(1));
        held.release(start);
        held.hold(1, Duration::from_secs(10));
        assert!(held.release(start + Duration::from_secs(1)).is_empty());
        assert_eq!(held.release(start + Duration::from_secs(11)), [1]);
    }
}
