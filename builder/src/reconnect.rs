//! When the builder dials the runner again after losing its tunnel: exponential backoff with
//! jitter, so that a whole fleet does not reconnect in lockstep after a runner restart. The loss
//! of a joined session starts the backoff and the budget afresh; a builder that has had no
//! session for the whole budget gives up (and exits non-zero, for systemd to restart or an
//! operator to see).

use std::time::Duration;

use backon::ExponentialBackoff;
use tokio::time::Instant;

use crate::backoff;
use crate::config::ReconnectPolicy;

/// The builder's reconnect policy in force, with its clock.
#[derive(Debug)]
pub struct Reconnect {
    policy: ReconnectPolicy,
    delays: ExponentialBackoff,
    /// When the builder last had a session: its start, or the loss of the last joined one.
    since: Instant,
    /// Whether a session is joined now.
    joined: bool,
}

impl Reconnect {
    /// A policy whose budget starts now.
    #[must_use]
    pub fn new(policy: &ReconnectPolicy) -> Self {
        Self {
            policy: policy.clone(),
            delays: backoff::jittered(policy.initial, policy.max),
            since: Instant::now(),
            joined: false,
        }
    }

    /// A session joined: when it is lost, the delays and the budget start afresh.
    pub fn joined(&mut self) {
        self.joined = true;
    }

    /// How long to wait before dialling again, now that a session was lost or could not be
    /// opened; `None` once the builder has had no session for the whole budget.
    pub fn after_loss(&mut self) -> Option<Duration> {
        if std::mem::take(&mut self.joined) {
            self.delays = backoff::jittered(self.policy.initial, self.policy.max);
            self.since = Instant::now();
        }
        if self.since.elapsed() >= self.policy.budget {
            return None;
        }
        self.delays.next()
    }

    /// The budget: how long the builder tries without a Join.
    #[must_use]
    pub fn budget(&self) -> Duration {
        self.policy.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ReconnectPolicy {
        ReconnectPolicy {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(2),
            budget: Duration::from_secs(30),
        }
    }

    /// The delay before jitter of the `index`th try: doubling from the first, up to the longest.
    fn base(index: u32) -> Duration {
        (Duration::from_millis(200) * 2u32.pow(index.min(10))).min(Duration::from_secs(2))
    }

    #[tokio::test(start_paused = true)]
    async fn delays_double_up_to_the_longest_each_with_jitter() {
        let mut reconnect = Reconnect::new(&policy());
        let delays: Vec<Duration> = (0..8).map(|_| reconnect.after_loss().unwrap()).collect();
        for (index, delay) in (0u32..).zip(&delays) {
            assert!(
                *delay >= base(index) && *delay < base(index) * 2,
                "delay {index} is {delay:?}, outside [{:?}, {:?})",
                base(index),
                base(index) * 2
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_fleet_does_not_retry_in_lockstep() {
        let firsts: std::collections::BTreeSet<Duration> = (0..20)
            .map(|_| Reconnect::new(&policy()).after_loss().unwrap())
            .collect();
        assert!(
            firsts.len() > 10,
            "20 builders drew only {} distinct first delays",
            firsts.len()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_once_no_session_joined_for_the_budget() {
        let mut reconnect = Reconnect::new(&policy());
        let started = Instant::now();
        let mut tries = 0;
        while let Some(delay) = reconnect.after_loss() {
            tokio::time::sleep(delay).await;
            tries += 1;
        }
        let waited = started.elapsed();
        assert!(waited >= policy().budget, "gave up after {waited:?}");
        assert!(
            waited < policy().budget + 2 * policy().max,
            "went on {waited:?}, past the budget and one longest delay"
        );
        assert!(tries > 8, "only {tries} tries in the budget");
    }

    #[tokio::test(start_paused = true)]
    async fn losing_a_joined_session_restarts_the_delays_and_the_budget() {
        let mut reconnect = Reconnect::new(&policy());
        for _ in 0..6 {
            let delay = reconnect.after_loss().unwrap();
            tokio::time::sleep(delay).await;
        }
        reconnect.joined();
        // A session longer than the budget still leaves the whole budget after its loss.
        tokio::time::sleep(policy().budget * 3).await;
        let first = reconnect
            .after_loss()
            .expect("the loss of a session restarts the budget");
        assert!(
            first < base(0) * 2,
            "the first delay after a loss is {first:?}"
        );
    }
}
