//! The farm counted for metrics: steps by system and state, builders by state, slots, and why
//! runnable steps get no builder.

use super::*;
use crate::gauges::{BuilderState, Gauges, NoCapacity, Slots};

fn without_capacity(gauges: &Gauges) -> Vec<(&str, NoCapacity, u64)> {
    gauges
        .without_capacity
        .iter()
        .map(|((system, reason), count)| (system.as_str(), *reason, *count))
        .collect()
}

#[test]
fn steps_builders_and_slots_are_counted_by_system_and_state() {
    let now = Instant::now();
    let mut core = core();
    // Two independent steps and one above both: two runnable, one waiting.
    core.handle(plan(
        1,
        0,
        3,
        vec![step(1, &[]), step(2, &[]), step(3, &[1, 2])],
    ));
    core.handle(join("one-slot", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    core.handle(join(
        "two-slots",
        2,
        caps(&["x86_64-linux", "i686-linux"], &[], &[], 2),
    ));
    assert_eq!(builds(&core.dispatch(now)).len(), 2);

    let gauges = core.gauges();
    let linux = |state: &'static str| gauges.steps.get(&("x86_64-linux".to_owned(), state));
    assert_eq!(linux("running"), Some(&2));
    assert_eq!(linux("waiting"), Some(&1));
    assert_eq!(linux("runnable"), None);
    assert_eq!(gauges.builds, 1);
    assert_eq!(
        gauges.slots["x86_64-linux"],
        Slots {
            offered: 3,
            used: 2
        }
    );
    assert_eq!(gauges.slots["i686-linux"].offered, 2);
    // One of the two builders got a step: which one is placement's choice.
    assert_eq!(gauges.builders[&BuilderState::Idle], 0);
    assert_eq!(
        gauges.builders[&BuilderState::Full] + gauges.builders[&BuilderState::Busy],
        2
    );
    assert_eq!(gauges.builders[&BuilderState::Draining], 0);
    assert!(without_capacity(&gauges).is_empty());
}

#[test]
fn runnable_steps_without_a_builder_say_why() {
    let now = Instant::now();
    let mut core = core();
    core.handle(join("busy", 1, caps(&["x86_64-linux"], &["kvm"], &[], 1)));
    core.handle(join("arm", 2, caps(&["aarch64-linux"], &[], &[], 1)));
    let mut big = step(4, &[]);
    big.spec = spec(4, "aarch64-linux", &["big-parallel"]);
    let mut riscv = step(5, &[]);
    riscv.spec = spec(5, "riscv64-linux", &[]);
    core.handle(plan_many(
        &[(1, 1), (2, 2), (4, 4), (5, 5)],
        vec![step(1, &[]), step(2, &[]), big, riscv],
    ));
    assert_eq!(builds(&core.dispatch(now)).len(), 1, "one slot for x86_64");

    let gauges = core.gauges();
    assert_eq!(
        without_capacity(&gauges),
        [
            ("aarch64-linux", NoCapacity::MissingFeature, 1),
            ("riscv64-linux", NoCapacity::NoBuilder, 1),
            ("x86_64-linux", NoCapacity::Busy, 1),
        ]
    );

    core.handle(Event::BuilderDraining { session: 1 });
    core.handle(join("idle", 3, caps(&["x86_64-linux"], &[], &[], 1)));
    core.handle(Event::BuilderDraining { session: 3 });
    let gauges = core.gauges();
    assert_eq!(
        without_capacity(&gauges)[2],
        ("x86_64-linux", NoCapacity::Draining, 1),
        "every builder that could take it drains"
    );
    assert_eq!(gauges.builders[&BuilderState::Draining], 2);
    assert_eq!(gauges.slots["x86_64-linux"].offered, 0);
    assert_eq!(
        gauges.slots["x86_64-linux"].used, 0,
        "a step running on a builder shutting down uses no slot offered"
    );
}
