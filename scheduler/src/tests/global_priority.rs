//! An admin setting a build's global priority after it was planned, or before.

use super::*;

/// Builds 1 and 2, one runnable step each (1 and 2), and a builder with one slot.
fn two_builds_one_slot() -> Core {
    let mut core = core();
    core.handle(plan_many(
        &[(1, 1), (2, 2)],
        vec![step(1, &[]), step(2, &[])],
    ));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    core
}

#[test]
fn a_raised_build_goes_first() {
    let mut core = two_builds_one_slot();
    core.handle(Event::SetGlobalPriority {
        build: 2,
        priority: 10,
    });
    let sent = builds(&core.dispatch(Instant::now()));
    assert_eq!(
        sent.iter().map(|(_, _, step)| *step).collect::<Vec<_>>(),
        [2]
    );
}

#[test]
fn a_priority_set_before_the_plan_came_applies_to_it() {
    let mut core = core();
    core.handle(Event::SetGlobalPriority {
        build: 2,
        priority: 10,
    });
    core.handle(plan_many(
        &[(1, 1), (2, 2)],
        vec![step(1, &[]), step(2, &[])],
    ));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    let sent = builds(&core.dispatch(Instant::now()));
    assert_eq!(
        sent.iter().map(|(_, _, step)| *step).collect::<Vec<_>>(),
        [2]
    );
}

#[test]
fn raising_reaches_the_steps_below_the_top() {
    let mut core = core();
    // Build 1 is the chain 1 <- 3 <- 5, whose bottom goes first by its critical path; build 2
    // is 4 on top of 2.
    core.handle(plan_many(
        &[(1, 5), (2, 4)],
        vec![
            step(1, &[]),
            step(2, &[]),
            step(3, &[1]),
            step(4, &[2]),
            step(5, &[3]),
        ],
    ));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    core.handle(Event::SetGlobalPriority {
        build: 2,
        priority: 1,
    });
    let sent = builds(&core.dispatch(Instant::now()));
    assert_eq!(
        sent.iter().map(|(_, _, step)| *step).collect::<Vec<_>>(),
        [2]
    );
}
