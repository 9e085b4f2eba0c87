//! Predicted build ends, remembered for a moment: `Core::estimate` walks a build's unfinished
//! steps, which for a large build is milliseconds of the scheduler's loop, and every Watch
//! stream and Get of a running build asks for it. Within [`FRESH`] of computing one, the driver
//! answers from here (the time left counted down), so a thousand watchers of one build cost one
//! walk per [`FRESH`], not a thousand.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use drover_scheduler::BuildId;

/// How long a computed end is answered again.
const FRESH: Duration = Duration::from_secs(1);

/// Entries kept before the stale ones are dropped.
const PRUNE_AT: usize = 4_096;

/// Recently computed ends, by build: when computed, and the predicted end.
#[derive(Debug, Default)]
pub struct Estimates {
    ends: HashMap<BuildId, (Instant, Option<Instant>)>,
}

impl Estimates {
    /// The time from `now` to `build`'s predicted end, from one computed within [`FRESH`] or
    /// else from `compute` (which gives the time left from `now`).
    pub fn remaining(
        &mut self,
        build: BuildId,
        now: Instant,
        compute: impl FnOnce() -> Option<Duration>,
    ) -> Option<Duration> {
        let end = match self.ends.get(&build) {
            Some((computed, end)) if now.saturating_duration_since(*computed) < FRESH => *end,
            _ => {
                if self.ends.len() >= PRUNE_AT {
                    self.ends.retain(|_, (computed, _)| {
                        now.saturating_duration_since(*computed) < FRESH
                    });
                }
                let end = compute().and_then(|left| now.checked_add(left));
                self.ends.insert(build, (now, end));
                end
            }
        };
        end.map(|end| end.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_computed_within_a_second_is_counted_down_then_computed_again() {
        let mut estimates = Estimates::default();
        let start = Instant::now();
        let ten = Duration::from_secs(10);
        assert_eq!(estimates.remaining(1, start, || Some(ten)), Some(ten));
        let later = start + Duration::from_millis(400);
        assert_eq!(
            estimates.remaining(1, later, || unreachable!("fresh")),
            Some(Duration::from_millis(9_600))
        );
        let stale = start + FRESH;
        assert_eq!(estimates.remaining(1, stale, || None), None);
        assert_eq!(
            estimates.remaining(2, stale, || Some(ten)),
            Some(ten),
            "per build"
        );
    }
}
