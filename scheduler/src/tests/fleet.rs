//! Builders drained by an admin and quarantined after failures: who gets work, what is
//! persisted, and how a quarantine ends.

use super::*;
use crate::fleet::{QuarantinePolicy, StoredStanding};
use crate::gauges::{BuilderState, NoCapacity};

const COOL_DOWN: Duration = Duration::from_mins(10);

/// Quarantine after two infrastructure failures in a row; retries enough that no step ends.
fn quarantining() -> Core {
    core_with(CoreLimits {
        retry: RetryPolicy {
            max_attempts: 10,
            ..LIMITS.retry
        },
        quarantine: QuarantinePolicy {
            after_failures: 2,
            cool_down: COOL_DOWN,
        },
        ..LIMITS
    })
}

fn reported(session: SessionId, attempt: AttemptId, outcome: Outcome, at: Instant) -> Event {
    let Event::StepFinished {
        session, report, ..
    } = finished(session, attempt, outcome)
    else {
        unreachable!("finished makes a StepFinished");
    };
    Event::StepFinished {
        session,
        attempt,
        report,
        at,
    }
}

fn quarantines(commands: &[Command]) -> Vec<(&str, Option<&Imposed>)> {
    changes(commands)
        .into_iter()
        .filter_map(|change| match change {
            Change::MachineQuarantined { name, quarantine } => {
                Some((name.as_str(), quarantine.as_ref()))
            }
            _ => None,
        })
        .collect()
}

fn independent_steps(count: StepId) -> Event {
    let builds: Vec<(BuildId, StepId)> = (1..=count).map(|id| (id, id)).collect();
    plan_many(&builds, (1..=count).map(|id| step(id, &[])).collect())
}

#[test]
fn a_drained_builder_keeps_its_steps_gets_nothing_new_and_is_enabled_again() {
    let now = Instant::now();
    let mut core = core();
    core.handle(independent_steps(3));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    let first = builds(&core.dispatch(now));
    assert_eq!(first.len(), 1);

    let commands = core.handle(Event::SetDrained {
        name: "b".to_owned(),
        drained: true,
    });
    assert_eq!(
        changes(&commands),
        [&Change::MachineDrained {
            name: "b".to_owned(),
            drained: true
        }]
    );
    // Its step finishes and is recorded; nothing new is sent.
    let (session, attempt, _) = first[0];
    let commands = core.handle(finished(session, attempt, Outcome::Succeeded));
    assert!(commands.contains(&Command::Send {
        session,
        message: ToBuilder::ResultRecorded { attempt }
    }));
    assert!(builds(&core.dispatch(now)).is_empty());
    let gauges = core.gauges();
    assert_eq!(gauges.builders[&BuilderState::Drained], 1);
    assert_eq!(gauges.unavailable["b"], BuilderState::Drained);
    assert_eq!(
        gauges.without_capacity[&("x86_64-linux".to_owned(), NoCapacity::Drained)],
        2
    );
    // Draining twice changes nothing more.
    let again = core.handle(Event::SetDrained {
        name: "b".to_owned(),
        drained: true,
    });
    assert!(changes(&again).is_empty());

    core.handle(Event::SetDrained {
        name: "b".to_owned(),
        drained: false,
    });
    assert_eq!(builds(&core.dispatch(now)).len(), 1);
}

#[test]
fn a_drained_builder_stays_drained_when_it_reconnects_and_across_a_runner_restart() {
    let now = Instant::now();
    let mut first = core();
    first.handle(independent_steps(2));
    first.handle(Event::SetDrained {
        name: "b".to_owned(),
        drained: true,
    });
    first.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    assert!(
        builds(&first.dispatch(now)).is_empty(),
        "drained before it joined"
    );

    // A new runner process learns it from what was stored.
    let mut restarted = core();
    restarted.recover_machines(
        [StoredStanding {
            name: "b".to_owned(),
            drained: true,
            cool_down_left: None,
        }],
        now,
    );
    restarted.handle(independent_steps(2));
    restarted.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    restarted.handle(join("other", 2, caps(&["x86_64-linux"], &[], &[], 1)));
    let sent = builds(&restarted.dispatch(now));
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, 2, "only the builder not drained gets work");
}

#[test]
fn failures_in_a_row_quarantine_a_builder_until_a_probation_step_succeeds() {
    let start = Instant::now();
    let mut core = quarantining();
    core.handle(independent_steps(4));
    core.handle(join("flaky", 1, caps(&["x86_64-linux"], &[], &[], 1)));

    // Two infrastructure failures in a row: quarantined, with the reason and the cool-down.
    let (_, attempt, _) = builds(&core.dispatch(start))[0];
    let commands = core.handle(reported(1, attempt, Outcome::InfrastructureFailure, start));
    assert!(
        quarantines(&commands).is_empty(),
        "one failure is not enough"
    );
    let (_, attempt, _) = builds(&core.dispatch(start))[0];
    let commands = core.handle(reported(1, attempt, Outcome::InfrastructureFailure, start));
    let imposed = quarantines(&commands);
    assert_eq!(imposed.len(), 1);
    let (name, Some(imposed)) = imposed[0] else {
        panic!("a quarantine begins: {imposed:?}");
    };
    assert_eq!(name, "flaky");
    assert_eq!(imposed.cool_down, COOL_DOWN);
    assert!(
        imposed
            .reason
            .starts_with("2 infrastructure failures in a row"),
        "{}",
        imposed.reason
    );

    // Cooling down: no work, and the core wakes up when the cool-down ends.
    assert!(builds(&core.dispatch(start)).is_empty());
    let gauges = core.gauges();
    assert_eq!(gauges.builders[&BuilderState::Quarantined], 1);
    assert_eq!(gauges.unavailable["flaky"], BuilderState::Quarantined);
    assert_eq!(
        gauges.without_capacity[&("x86_64-linux".to_owned(), NoCapacity::Quarantined)],
        4
    );
    assert_eq!(core.next_wakeup(), Some(start + COOL_DOWN));

    // Probation: one step.
    let later = start + COOL_DOWN;
    let probation = builds(&core.dispatch(later));
    assert_eq!(probation.len(), 1);
    let commands = core.handle(reported(1, probation[0].1, Outcome::Succeeded, later));
    assert_eq!(
        quarantines(&commands),
        [("flaky", None)],
        "success lifts it"
    );
    assert_eq!(core.gauges().builders[&BuilderState::Idle], 1);
    assert_eq!(builds(&core.dispatch(later)).len(), 1);
}

#[test]
fn a_failed_probation_step_starts_the_cool_down_again() {
    let start = Instant::now();
    let mut core = quarantining();
    core.handle(independent_steps(4));
    core.handle(join("flaky", 1, caps(&["x86_64-linux"], &[], &[], 4)));
    core.handle(Event::SetQuarantine {
        name: "flaky".to_owned(),
        quarantined: true,
        by: "admin alice".to_owned(),
        at: start,
    });
    assert!(builds(&core.dispatch(start)).is_empty());

    let later = start + COOL_DOWN;
    let probation = builds(&core.dispatch(later));
    assert_eq!(probation.len(), 1, "one probation step, not four");
    let commands = core.handle(reported(
        1,
        probation[0].1,
        Outcome::InfrastructureFailure,
        later,
    ));
    let imposed = quarantines(&commands);
    assert!(
        matches!(imposed[..], [("flaky", Some(Imposed { reason, .. }))] if reason.starts_with("its probation step failed")),
        "{imposed:?}"
    );
    assert!(builds(&core.dispatch(later)).is_empty());
    assert_eq!(core.next_wakeup(), Some(later + COOL_DOWN));
}

#[test]
fn steps_running_when_a_quarantine_begins_neither_lift_it_nor_fail_its_probation() {
    let start = Instant::now();
    let mut core = quarantining();
    core.handle(independent_steps(6));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 3)));
    let running = builds(&core.dispatch(start));
    assert_eq!(running.len(), 3);
    core.handle(Event::SetQuarantine {
        name: "b".to_owned(),
        quarantined: true,
        by: "admin alice".to_owned(),
        at: start,
    });
    for (index, outcome) in [
        Outcome::Succeeded,
        Outcome::InfrastructureFailure,
        Outcome::Succeeded,
    ]
    .into_iter()
    .enumerate()
    {
        let commands = core.handle(reported(1, running[index].1, outcome, start));
        assert!(
            quarantines(&commands).is_empty(),
            "an earlier step's {outcome:?}"
        );
    }
    assert!(
        builds(&core.dispatch(start)).is_empty(),
        "still cooling down"
    );

    let later = start + COOL_DOWN;
    let probation = builds(&core.dispatch(later));
    assert_eq!(probation.len(), 1, "one probation step, on three slots");
    let commands = core.handle(reported(1, probation[0].1, Outcome::Succeeded, later));
    assert_eq!(
        quarantines(&commands),
        [("b", None)],
        "the probation step's success"
    );
}

#[test]
fn a_build_failure_between_infrastructure_failures_does_not_reset_their_count() {
    let now = Instant::now();
    let mut core = quarantining();
    core.handle(independent_steps(4));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    let mut imposed = Vec::new();
    for outcome in [
        Outcome::InfrastructureFailure,
        Outcome::Failed,
        Outcome::InfrastructureFailure,
    ] {
        let (_, attempt, _) = builds(&core.dispatch(now))[0];
        let commands = core.handle(reported(1, attempt, outcome, now));
        imposed.extend(
            quarantines(&commands)
                .into_iter()
                .map(|(name, _)| name.to_owned()),
        );
    }
    assert_eq!(imposed, ["b"]);
}

#[test]
fn a_build_failure_or_a_success_between_infrastructure_failures_quarantines_nobody() {
    let now = Instant::now();
    let mut core = quarantining();
    core.handle(independent_steps(4));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    for outcome in [
        Outcome::InfrastructureFailure,
        Outcome::Succeeded,
        Outcome::InfrastructureFailure,
        Outcome::Failed,
    ] {
        let (_, attempt, _) = builds(&core.dispatch(now))[0];
        let commands = core.handle(reported(1, attempt, outcome, now));
        assert!(quarantines(&commands).is_empty(), "after {outcome:?}");
    }
}

#[test]
fn an_admin_lifts_a_quarantine_at_once_and_a_stored_one_survives_a_restart() {
    let now = Instant::now();
    let mut core = quarantining();
    core.recover_machines(
        [StoredStanding {
            name: "b".to_owned(),
            drained: false,
            cool_down_left: Some(Duration::from_mins(5)),
        }],
        now,
    );
    core.handle(independent_steps(2));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 2)));
    assert!(builds(&core.dispatch(now)).is_empty(), "still quarantined");
    assert_eq!(core.next_wakeup(), Some(now + Duration::from_mins(5)));

    let commands = core.handle(Event::SetQuarantine {
        name: "b".to_owned(),
        quarantined: false,
        by: "admin alice".to_owned(),
        at: now,
    });
    assert_eq!(quarantines(&commands), [("b", None)]);
    assert_eq!(builds(&core.dispatch(now)).len(), 2, "all its slots again");
    // Lifting what is not there changes nothing.
    let commands = core.handle(Event::SetQuarantine {
        name: "b".to_owned(),
        quarantined: false,
        by: "admin alice".to_owned(),
        at: now,
    });
    assert!(quarantines(&commands).is_empty());
}

#[test]
fn a_builder_below_the_disk_floor_gets_no_work_until_it_reports_more() {
    let now = Instant::now();
    let mut core = core_with(CoreLimits {
        min_free_disk_bytes: 10 << 30,
        ..LIMITS
    });
    core.handle(independent_steps(2));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    let ping = |free_disk_bytes| Event::BuilderPinged {
        session: 1,
        free_disk_bytes,
        memory_pressure_percent: None,
    };
    core.handle(ping(Some(1 << 30)));
    assert!(builds(&core.dispatch(now)).is_empty());
    let gauges = core.gauges();
    assert_eq!(gauges.unavailable["b"], BuilderState::LowDisk);
    assert_eq!(
        gauges.without_capacity[&("x86_64-linux".to_owned(), NoCapacity::LowDisk)],
        2
    );
    // A ping that does not say keeps it where it was.
    core.handle(ping(None));
    assert!(builds(&core.dispatch(now)).is_empty());

    core.handle(ping(Some(20 << 30)));
    assert_eq!(builds(&core.dispatch(now)).len(), 1);
}

#[test]
fn a_builder_under_memory_pressure_gets_no_work_until_the_pressure_falls() {
    let now = Instant::now();
    let mut core = core_with(CoreLimits {
        max_memory_pressure_percent: 60.0,
        ..LIMITS
    });
    core.handle(independent_steps(2));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    let ping = |memory_pressure_percent| Event::BuilderPinged {
        session: 1,
        free_disk_bytes: None,
        memory_pressure_percent,
    };
    let commands = core.handle(ping(Some(75.0)));
    assert!(changes(&commands).iter().any(|change| matches!(
        change,
        Change::MachinePinged {
            under_memory_pressure: true,
            ..
        }
    )));
    assert!(builds(&core.dispatch(now)).is_empty());
    let gauges = core.gauges();
    assert_eq!(gauges.unavailable["b"], BuilderState::MemoryPressure);
    assert_eq!(
        gauges.without_capacity[&("x86_64-linux".to_owned(), NoCapacity::MemoryPressure)],
        2
    );
    // A kernel that does not say keeps it where it was.
    core.handle(ping(None));
    assert!(builds(&core.dispatch(now)).is_empty());

    core.handle(ping(Some(10.0)));
    assert_eq!(builds(&core.dispatch(now)).len(), 1);
}
