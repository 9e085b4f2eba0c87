//! What decides whether a connected builder takes work ([`Standing`]), and what operators and
//! failures decided about each builder, by name: drained by an admin, or quarantined after
//! infrastructure failures in a row. It outlives the builder's sessions (a
//! flaky builder that reconnects is still quarantined) and is persisted, so it also outlives
//! the runner.
//!
//! Quarantine: after [`QuarantinePolicy::after_failures`] infrastructure failures in a row a
//! builder gets no work for [`QuarantinePolicy::cool_down`]; then it is on probation, offered one
//! step at a time; that step's success lifts the quarantine, its infrastructure failure starts
//! the cool-down again. Steps that were running when the quarantine began say nothing about it,
//! and a failure of the build's own says nothing about the builder either way.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::types::{AttemptId, Imposed};

/// When builders are quarantined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuarantinePolicy {
    /// Infrastructure failures in a row that quarantine a builder; 0 never does.
    pub after_failures: u32,
    /// How long a quarantined builder gets no work before its probation step.
    pub cool_down: Duration,
}

impl Default for QuarantinePolicy {
    fn default() -> Self {
        Self {
            after_failures: 3,
            cool_down: Duration::from_mins(10),
        }
    }
}

/// Where a quarantined builder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quarantine {
    /// No work until the cool-down ends.
    CoolingDown,
    /// One step at a time; its success lifts the quarantine.
    Probation,
}

/// A reason a connected builder takes no new work, other than a quarantine; each is set and
/// cleared by what knows it (the builder's drain, an admin, its pings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// It said it is shutting down: it finishes what it runs, then leaves.
    ShuttingDown,
    /// An admin drained it: it stays connected and finishes what it runs, but gets nothing new.
    Drained,
    /// Its latest ping reported less free disk than the farm's floor.
    LowDisk,
    /// Its latest ping reported more memory pressure than the farm's limit.
    MemoryPressure,
}

impl Hold {
    const fn bit(self) -> u8 {
        match self {
            Self::ShuttingDown => 1,
            Self::Drained => 2,
            Self::LowDisk => 4,
            Self::MemoryPressure => 8,
        }
    }
}

/// What decides whether a connected builder is offered work, besides its free slots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    /// The [`Hold`]s on it, one bit each.
    holds: u8,
    /// It is quarantined.
    pub quarantine: Option<Quarantine>,
}

impl Standing {
    /// Whether `hold` is on it.
    #[must_use]
    pub const fn has(&self, hold: Hold) -> bool {
        self.holds & hold.bit() != 0
    }

    /// Puts `hold` on it, or takes it off.
    pub fn set(&mut self, hold: Hold, on: bool) {
        if on {
            self.holds |= hold.bit();
        } else {
            self.holds &= !hold.bit();
        }
    }

    /// How many steps it may run at once, given its slots.
    #[must_use]
    pub fn job_limit(&self, max_jobs: u32) -> u32 {
        match self.quarantine {
            _ if self.holds != 0 => 0,
            Some(Quarantine::CoolingDown) => 0,
            Some(Quarantine::Probation) => max_jobs.min(1),
            None => max_jobs,
        }
    }
}

/// A builder's standing as stored, for a runner taking over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredStanding {
    /// The builder's name.
    pub name: String,
    /// Drained by an admin.
    pub drained: bool,
    /// Quarantined, with what is left of its cool-down (zero: on probation).
    pub cool_down_left: Option<Duration>,
}

#[derive(Debug, Default)]
struct Machine {
    drained: bool,
    failures_in_a_row: u32,
    quarantine: Option<Quarantined>,
}

#[derive(Debug)]
struct Quarantined {
    /// When its probation begins.
    probation_from: Instant,
    /// The probation step's attempt, once dispatched: only its outcome judges the builder
    /// (steps that ran before the quarantine, or beside it, say nothing).
    probation_attempt: Option<AttemptId>,
}

/// Every builder's standing, by name.
#[derive(Debug, Default)]
pub struct Fleet {
    machines: HashMap<String, Machine>,
}

impl Fleet {
    /// Takes what a previous runner process stored; `now` is when the stored cool-downs are
    /// counted from.
    pub fn recover(&mut self, stored: impl IntoIterator<Item = StoredStanding>, now: Instant) {
        for standing in stored {
            let machine = self.machines.entry(standing.name).or_default();
            machine.drained = standing.drained;
            machine.quarantine = standing.cool_down_left.map(|left| Quarantined {
                probation_from: now + left,
                probation_attempt: None,
            });
        }
    }

    /// Where the quarantine of the builder `name` stands at `now`, if it has one.
    #[must_use]
    pub fn quarantine(&self, name: &str, now: Instant) -> Option<Quarantine> {
        let quarantined = self.machines.get(name)?.quarantine.as_ref()?;
        Some(if now < quarantined.probation_from {
            Quarantine::CoolingDown
        } else {
            Quarantine::Probation
        })
    }

    /// The standing of the builder `name` as it joins, before the core's clock says whether
    /// its cool-down has ended: cooling down if quarantined ([`Fleet::quarantine`] corrects it
    /// at the next dispatch).
    #[must_use]
    pub fn joining(&self, name: &str) -> Standing {
        let machine = self.machines.get(name);
        let mut standing = Standing {
            quarantine: machine
                .and_then(|machine| machine.quarantine.as_ref())
                .map(|_| Quarantine::CoolingDown),
            ..Standing::default()
        };
        standing.set(
            Hold::Drained,
            machine.is_some_and(|machine| machine.drained),
        );
        standing
    }

    /// When the probation of `name` begins, if it is quarantined.
    #[must_use]
    pub fn probation_from(&self, name: &str) -> Option<Instant> {
        self.machines
            .get(name)?
            .quarantine
            .as_ref()
            .map(|quarantined| quarantined.probation_from)
    }

    /// Drains or enables `name`; returns whether that changed anything.
    pub fn set_drained(&mut self, name: &str, drained: bool) -> bool {
        let machine = self.machines.entry(name.to_owned()).or_default();
        std::mem::replace(&mut machine.drained, drained) != drained
    }

    /// Records an infrastructure failure on `name`; returns the quarantine it starts, if it
    /// does: the policy's count reached, or any failure on probation.
    pub fn infrastructure_failure(
        &mut self,
        name: &str,
        attempt: AttemptId,
        message: &str,
        policy: QuarantinePolicy,
        now: Instant,
    ) -> Option<Imposed> {
        if policy.after_failures == 0 {
            return None;
        }
        let machine = self.machines.entry(name.to_owned()).or_default();
        machine.failures_in_a_row += 1;
        let reason = match &machine.quarantine {
            Some(quarantined) if quarantined.probation_attempt == Some(attempt) => {
                format!("its probation step failed: {message}")
            }
            None if machine.failures_in_a_row >= policy.after_failures => format!(
                "{} infrastructure failures in a row; the last: {message}",
                machine.failures_in_a_row
            ),
            // Not enough yet, or quarantined and not its probation step.
            _ => return None,
        };
        Some(self.impose(name, reason, policy.cool_down, now))
    }

    /// Records a success of `attempt` on `name`; returns whether it lifted a quarantine (it was
    /// the probation step).
    pub fn success(&mut self, name: &str, attempt: AttemptId) -> bool {
        let Some(machine) = self.machines.get_mut(name) else {
            return false;
        };
        machine.failures_in_a_row = 0;
        let on_probation = machine
            .quarantine
            .as_ref()
            .is_some_and(|quarantined| quarantined.probation_attempt == Some(attempt));
        if on_probation {
            machine.quarantine = None;
        }
        on_probation
    }

    /// `attempt` is the probation step of `name`.
    pub fn on_probation(&mut self, name: &str, attempt: AttemptId) {
        if let Some(quarantined) = self
            .machines
            .get_mut(name)
            .and_then(|machine| machine.quarantine.as_mut())
        {
            quarantined.probation_attempt = Some(attempt);
        }
    }

    /// Quarantines `name` for `cool_down` from `now`.
    pub fn impose(
        &mut self,
        name: &str,
        reason: String,
        cool_down: Duration,
        now: Instant,
    ) -> Imposed {
        let machine = self.machines.entry(name.to_owned()).or_default();
        machine.quarantine = Some(Quarantined {
            probation_from: now + cool_down,
            probation_attempt: None,
        });
        Imposed { reason, cool_down }
    }

    /// Lifts the quarantine of `name`; returns whether it had one.
    pub fn lift(&mut self, name: &str) -> bool {
        let Some(machine) = self.machines.get_mut(name) else {
            return false;
        };
        machine.failures_in_a_row = 0;
        machine.quarantine.take().is_some()
    }

    /// The builders quarantined, cooling down or on probation.
    pub fn quarantined(&self) -> impl Iterator<Item = &str> {
        self.machines
            .iter()
            .filter(|(_, machine)| machine.quarantine.is_some())
            .map(|(name, _)| name.as_str())
    }
}
