//! Learned step durations: how long the steps of each package took on each system, so the core
//! orders runnable steps by the critical path in predicted time rather than in steps, and
//! estimates when builds end.
//!
//! A step is known by its derivation's name without the version, split as Nix's `parseDrvName`
//! splits it (`hello-2.12.1` is `hello`), and its system. Each success moves the estimate: it is
//! the mean of the first five samples, then moves a fifth of the way to each new one (so a
//! package that grows slower is followed). A duration is dispatch to result, the time the step
//! held its slot, scaled to a builder of speed factor 1 (a sample from a builder twice as fast
//! counts double), at most 30 days; an attempt adopted from a previous runner process teaches
//! nothing (its dispatch time is not known). A package never seen is predicted at the mean of every estimate known, and at
//! one second when nothing is known; with learning turned off every step is one second, which is
//! ordering by step count.

use std::collections::HashMap;
use std::time::Duration;

use super::types::StepSpec;
pub use super::types::{DurationKey, Learned};

/// What a package never seen is predicted to take when nothing at all is known.
const UNKNOWN_MS: u64 = 1_000;

/// The longest sample learned, in milliseconds: 30 days.
const LONGEST_MS: f64 = 30.0 * 24.0 * 3_600.0 * 1_000.0;

/// How many samples the mean follows, about.
const WINDOW: u32 = 5;

/// The name of a derivation without its version, as Nix's `parseDrvName` has it: everything up
/// to the first `-` not followed by a letter.
#[must_use]
pub fn package_name(name: &str) -> &str {
    let bytes = name.as_bytes();
    bytes
        .iter()
        .enumerate()
        .find(|(index, byte)| {
            **byte == b'-'
                && bytes
                    .get(index + 1)
                    .is_some_and(|next| !next.is_ascii_alphabetic())
        })
        .map_or(name, |(index, _)| &name[..index])
}

/// The name of the derivation `spec` builds.
fn drv_name(spec: &StepSpec) -> &str {
    let path = &spec.drv_path;
    path.derivation_name().unwrap_or_else(|| path.name())
}

/// The history the core predicts from.
#[derive(Debug)]
pub struct Durations {
    /// Estimates by system, then package.
    estimates: HashMap<String, HashMap<String, (u32, u64)>>,
    /// Sum and number of all estimates, for packages never seen.
    total_ms: u128,
    count: u64,
    /// Whether predictions use the history (off: every step is [`UNKNOWN_MS`]).
    enabled: bool,
}

impl Durations {
    /// An empty history; `enabled` says whether predictions use it.
    #[must_use]
    pub fn new(enabled: bool) -> Self {
        Self {
            estimates: HashMap::new(),
            total_ms: 0,
            count: 0,
            enabled,
        }
    }

    /// Whether nothing has been learned yet: predictions are then the same guess for every step.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Turns the use of the history in predictions on or off (it is learned either way).
    pub fn enable(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// Takes in what earlier runs learned.
    pub fn load(&mut self, learned: impl IntoIterator<Item = Learned>) {
        for row in learned {
            self.set(&row.key.system, &row.key.package, row.samples, row.mean_ms);
        }
    }

    /// The predicted duration of `spec` for ordering, in milliseconds on a builder of speed
    /// factor 1: [`Durations::expected`], or the same second for every step when learning is
    /// turned off.
    #[must_use]
    pub fn predict(&self, spec: &StepSpec) -> u64 {
        if self.enabled {
            self.expected(spec)
        } else {
            UNKNOWN_MS
        }
    }

    /// What the history says `spec` takes now, in milliseconds on a builder of speed factor 1,
    /// whether or not ordering uses it (estimates of builds' ends always do).
    #[must_use]
    pub fn expected(&self, spec: &StepSpec) -> u64 {
        let known = self
            .estimates
            .get(&spec.requirements.system)
            .and_then(|packages| packages.get(package_name(drv_name(spec))));
        let predicted = match known {
            Some((_, mean)) => *mean,
            None if self.count > 0 => {
                u64::try_from(self.total_ms / u128::from(self.count)).unwrap_or(u64::MAX)
            }
            None => UNKNOWN_MS,
        };
        // Never zero: steps predicted alike still count as many as they are.
        predicted.max(1)
    }

    /// Learns that `spec` succeeded after `took` on a builder of `speed_factor`; what to store.
    pub fn learn(&mut self, spec: &StepSpec, took: Duration, speed_factor: f64) -> Learned {
        let system = &spec.requirements.system;
        let package = package_name(drv_name(spec));
        // A builder declares its own speed factor: a sample is bounded, so an absurd one cannot
        // push the history (or the estimates made from it) to the ends of their ranges.
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let sample = (took.as_secs_f64() * 1_000.0 * speed_factor.max(0.0))
            .round()
            .min(LONGEST_MS) as u64;
        let (samples, mean) = match self.estimates.get(system).and_then(|p| p.get(package)) {
            None => (1, sample),
            Some(&(samples, mean)) => {
                let weight = u64::from(samples.saturating_add(1).min(WINDOW));
                let moved = if sample >= mean {
                    mean + (sample - mean) / weight
                } else {
                    mean - (mean - sample) / weight
                };
                (samples.saturating_add(1), moved)
            }
        };
        self.set(system, package, samples, mean);
        Learned {
            key: DurationKey {
                package: package.to_owned(),
                system: system.clone(),
            },
            samples,
            mean_ms: mean,
        }
    }

    fn set(&mut self, system: &str, package: &str, samples: u32, mean: u64) {
        let packages = self.estimates.entry(system.to_owned()).or_default();
        match packages.insert(package.to_owned(), (samples, mean)) {
            Some((_, old)) => self.total_ms -= u128::from(old),
            None => self.count += 1,
        }
        self.total_ms += u128::from(mean);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use nix_primitives::StorePath;

    use super::*;
    use crate::types::Requirements;

    fn spec(name: &str, system: &str) -> StepSpec {
        let path = format!("/nix/store/{}-{name}.drv", "0".repeat(32));
        StepSpec {
            drv_path: StorePath::from_absolute(&path).unwrap(),
            outputs: BTreeMap::new(),
            requirements: Requirements {
                system: system.to_owned(),
                features: BTreeSet::new(),
            },
            input_paths: BTreeSet::new(),
            fixed: None,
        }
    }

    #[test]
    fn the_estimate_is_the_mean_of_the_first_five_then_follows_a_fifth_of_each_change() {
        let mut durations = Durations::new(true);
        let hello = spec("hello-2.12", "x86_64-linux");
        assert_eq!(durations.predict(&hello), UNKNOWN_MS, "nothing known");
        for seconds in [10, 20, 30] {
            durations.learn(
                &spec("hello-2.13", "x86_64-linux"),
                Duration::from_secs(seconds),
                1.0,
            );
        }
        assert_eq!(
            durations.predict(&hello),
            20_000,
            "the mean of 10, 20 and 30 s"
        );
        for _ in 0..2 {
            durations.learn(&hello, Duration::from_secs(20), 1.0);
        }
        let moved = durations.learn(&hello, Duration::from_mins(2), 1.0);
        assert_eq!(
            (moved.samples, moved.mean_ms),
            (6, 40_000),
            "a fifth of 100 s"
        );
        assert_eq!(
            durations.predict(&spec("hello-2.12", "aarch64-linux")),
            40_000,
            "another system has not seen it: the mean of what is known"
        );
        durations.enable(false);
        assert_eq!(durations.predict(&hello), UNKNOWN_MS, "learning turned off");
    }

    #[test]
    fn the_package_name_is_the_name_up_to_the_first_dash_before_a_non_letter() {
        assert_eq!(package_name("hello-2.12.1"), "hello");
        assert_eq!(package_name("gnu-hello-2.12"), "gnu-hello");
        assert_eq!(package_name("perl5.36.0-Moose-2.2201"), "perl5.36.0-Moose");
        assert_eq!(
            package_name("python3.11-requests-2.31.0"),
            "python3.11-requests"
        );
        assert_eq!(package_name("linux-6.1.0-rc1"), "linux");
        assert_eq!(package_name("source"), "source");
        assert_eq!(package_name("trailing-"), "trailing-");
    }
}
