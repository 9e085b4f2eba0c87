//! The builder's one backoff shape, for dialling the runner again and for uploads a busy runner
//! turned away: delays doubling from a first to a longest, each lengthened by a random part of
//! up to its own length, so that builders that failed together (a runner restart, a full upload
//! queue) do not all try again in the same instant.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};

/// Endless jittered delays from `first`, doubling up to `longest` (before the jitter).
#[must_use]
pub fn jittered(first: Duration, longest: Duration) -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(first)
        .with_max_delay(longest)
        .with_jitter()
        .without_max_times()
        .build()
}
