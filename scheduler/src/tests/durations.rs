//! Learned durations in the core: what a success teaches, the order and placement they give,
//! and the estimate of a build's end.

use super::*;
use crate::durations::{DurationKey, Learned};

/// A step building a derivation named `name`.
fn named(id: StepId, inputs: &[StepId], name: &str) -> PlannedStep {
    let path = format!("/nix/store/{}-{name}.drv", "0".repeat(32));
    PlannedStep {
        spec: Arc::new(StepSpec {
            drv_path: StorePath::from_absolute(&path).unwrap(),
            ..(*spec(id, "x86_64-linux", &[])).clone()
        }),
        ..step(id, inputs)
    }
}

fn learned(package: &str, seconds: u64) -> Learned {
    Learned {
        key: DurationKey {
            package: package.to_owned(),
            system: "x86_64-linux".to_owned(),
        },
        samples: 3,
        mean_ms: seconds * 1_000,
    }
}

/// A chain of ten one-second steps (build 1, top 10) and one two-hour step (build 2).
fn chain_and_long_step(core: &mut Core) {
    core.load_durations([learned("small", 1), learned("big", 7_200)]);
    let chain: Vec<PlannedStep> = (1..=10)
        .map(|id| {
            let inputs: &[StepId] = if id == 1 { &[] } else { &[id - 1] };
            named(id, inputs, &format!("small-{id}"))
        })
        .collect();
    core.handle(plan(1, 0, 10, chain));
    core.handle(plan(2, 0, 20, vec![named(20, &[], "big-1.0")]));
}

#[test]
fn a_long_step_goes_before_a_longer_chain_of_short_steps_unless_learning_is_off() {
    let now = Instant::now();
    let mut core = core();
    chain_and_long_step(&mut core);
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    assert_eq!(
        builds(&core.dispatch(now))[0].2,
        20,
        "two hours of critical path beat ten seconds"
    );

    let mut counting = core_with(CoreLimits {
        learned_durations: false,
        ..LIMITS
    });
    chain_and_long_step(&mut counting);
    counting.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    assert_eq!(
        builds(&counting.dispatch(now))[0].2,
        1,
        "by step count, ten steps beat one"
    );
}

#[test]
fn the_longest_step_goes_to_the_fastest_free_builder() {
    let now = Instant::now();
    let mut core = core();
    chain_and_long_step(&mut core);
    let mut fast = caps(&["x86_64-linux"], &[], &[], 1);
    fast.speed_factor = 4.0;
    core.handle(join("slow", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    core.handle(join("fast", 2, fast));
    let given: HashMap<StepId, SessionId> = builds(&core.dispatch(now))
        .into_iter()
        .map(|(session, _, step)| (step, session))
        .collect();
    assert_eq!(given, HashMap::from([(20, 2), (1, 1)]));
}

#[test]
fn a_success_teaches_its_packages_duration_scaled_to_speed_factor_one() {
    let now = Instant::now();
    let mut core = core();
    let mut fast = caps(&["x86_64-linux"], &[], &[], 1);
    fast.speed_factor = 2.0;
    core.handle(join("fast", 1, fast));
    core.handle(plan(1, 0, 1, vec![named(1, &[], "hello-2.12.1")]));
    let (session, attempt, _) = builds(&core.dispatch(now))[0];
    let Event::StepFinished {
        session, report, ..
    } = finished(session, attempt, Outcome::Succeeded)
    else {
        unreachable!()
    };
    let ended = core.handle(Event::StepFinished {
        session,
        attempt,
        report,
        at: now + Duration::from_secs(10),
    });
    let taught: Vec<&Learned> = changes(&ended)
        .into_iter()
        .filter_map(|change| match change {
            Change::DurationLearned(learned) => Some(learned),
            _ => None,
        })
        .collect();
    assert_eq!(
        taught,
        [&Learned {
            key: DurationKey {
                package: "hello".to_owned(),
                system: "x86_64-linux".to_owned(),
            },
            samples: 1,
            mean_ms: 20_000,
        }],
        "ten seconds on a builder twice as fast is twenty at speed one"
    );

    // A failure teaches nothing: failing builds often end early.
    core.handle(plan(2, 0, 2, vec![named(2, &[], "hello-2.12.2")]));
    let (session, attempt, _) = builds(&core.dispatch(now))[0];
    let failed = core.handle(finished(session, attempt, Outcome::Failed));
    assert!(
        !changes(&failed)
            .iter()
            .any(|change| matches!(change, Change::DurationLearned(_)))
    );
}

#[test]
fn a_builds_estimate_is_its_longest_chain_or_its_work_over_the_slots() {
    let now = Instant::now();
    let mut core = core();
    core.load_durations([learned("base", 10), learned("side", 30), learned("top", 5)]);
    // base ← left, base ← right, {left, right} ← top: chain 10 + 30 + 5, work 75.
    core.handle(plan(
        1,
        0,
        4,
        vec![
            named(1, &[], "base"),
            named(2, &[1], "side-1"),
            named(3, &[1], "side-2"),
            named(4, &[2, 3], "top"),
        ],
    ));
    assert_eq!(core.estimate(1, now), None, "no builder, no estimate");
    core.handle(join("one", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    assert_eq!(
        core.estimate(1, now),
        Some(Duration::from_secs(75)),
        "one slot does all the work in turn"
    );
    core.handle(join("more", 2, caps(&["x86_64-linux"], &[], &[], 3)));
    assert_eq!(
        core.estimate(1, now),
        Some(Duration::from_secs(45)),
        "four slots wait only for the chain"
    );
    builds(&core.dispatch(now));
    assert_eq!(
        core.estimate(1, now + Duration::from_secs(4)),
        Some(Duration::from_secs(41)),
        "a running step counts what is left of it"
    );
    assert_eq!(core.estimate(2, now), None, "an unknown build");

    let mut fresh = core_with(LIMITS);
    fresh.handle(join("one", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    fresh.handle(plan(1, 0, 1, vec![named(1, &[], "base")]));
    assert_eq!(
        fresh.estimate(1, now),
        None,
        "with nothing learned, every prediction is the same guess"
    );
    fresh.load_durations([learned("base", 10)]);
    assert_eq!(
        fresh.estimate(1, now),
        Some(Duration::from_secs(10)),
        "a step planned before anything was learned is estimated from what is known now"
    );
}

#[test]
fn an_attempt_adopted_after_a_restart_teaches_nothing_its_dispatch_time_being_unknown() {
    let now = Instant::now();
    let (mut core, orphan) = super::restarted(now);
    core.handle(super::join_holding("b1", 1, &[orphan]));
    let ended = core.handle(Event::StepFinished {
        session: 1,
        attempt: orphan,
        report: Report {
            outcome: Outcome::Succeeded,
            message: String::new(),
            outputs: Vec::new(),
        },
        at: now + Duration::from_secs(5),
    });
    assert_eq!(step_status(&ended, 1), Some(StepStatus::Succeeded));
    assert!(
        !changes(&ended)
            .iter()
            .any(|change| matches!(change, Change::DurationLearned(_)))
    );
}

#[test]
fn a_package_never_seen_is_predicted_at_the_mean_of_those_known() {
    let mut core = core();
    core.load_durations([learned("a", 10), learned("b", 30)]);
    core.handle(plan(1, 0, 1, vec![named(1, &[], "never-seen-1.0")]));
    assert_eq!(core.graph().step(1).unwrap().predicted_ms(), 20_000);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Every step's critical path is its own predicted duration plus the longest critical
    /// path among the steps above it, whatever the graph and the durations.
    #[test]
    fn critical_paths_are_the_longest_predicted_chains_to_the_top(
        picks in proptest::collection::vec(
            (proptest::collection::vec(any::<prop::sample::Index>(), 0..3), 1u64..5_000),
            2..30,
        )
    ) {
        let mut core = core();
        let count = picks.len();
        let id = |index: usize| i64::try_from(index).unwrap() + 1;
        let mut steps = Vec::new();
        let mut durations = HashMap::new();
        for (index, (inputs, seconds)) in picks.iter().enumerate() {
            let mut inputs: Vec<StepId> = if index == 0 {
                Vec::new()
            } else {
                inputs.iter().map(|pick| id(pick.index(index))).collect()
            };
            inputs.sort_unstable();
            inputs.dedup();
            let package = format!("p{index}");
            core.load_durations([learned(&package, *seconds)]);
            durations.insert(id(index), seconds * 1_000);
            steps.push(named(id(index), &inputs, &format!("{package}-1")));
        }
        // Every step under one top, so all are needed.
        let top = id(count);
        let all: Vec<StepId> = (0..count).map(id).collect();
        durations.insert(top, 1);
        core.load_durations([learned("top", 0)]);
        steps.push(named(top, &all, "top"));
        core.handle(plan(1, 0, top, steps.clone()));

        let mut above: HashMap<StepId, Vec<StepId>> = HashMap::new();
        for planned in &steps {
            for input in &planned.inputs {
                above.entry(*input).or_default().push(planned.id);
            }
        }
        for planned in steps.iter().rev() {
            let longest_above = above
                .get(&planned.id)
                .into_iter()
                .flatten()
                .map(|dependent| core.graph().step(*dependent).unwrap().critical_path())
                .max()
                .unwrap_or(0);
            prop_assert_eq!(
                core.graph().step(planned.id).unwrap().critical_path(),
                durations[&planned.id] + longest_above
            );
        }
    }
}
