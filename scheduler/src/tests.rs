//! The core's decisions, event by event, on an injected clock and counted attempt ids; and
//! property tests over random DAGs, builders and event orders.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix_primitives::StorePath;
use proptest::prelude::*;
use uuid::Uuid;

use super::*;

/// Two attempts for infrastructure failures, retried at once, and no quarantine: the tests of
/// other policies need no clock.
const LIMITS: CoreLimits = CoreLimits {
    max_builder_losses: 2,
    retry: RetryPolicy {
        max_attempts: 2,
        initial: Duration::ZERO,
        multiplier: 1.0,
        max: Duration::ZERO,
    },
    unsupported_grace: Duration::from_mins(15),
    readoption_grace: Duration::from_mins(2),
    rejoin_grace: Duration::from_secs(10),
    learned_durations: true,
    quarantine: QuarantinePolicy {
        after_failures: 0,
        cool_down: Duration::from_mins(10),
    },
    min_free_disk_bytes: 0,
    max_memory_pressure_percent: 0.0,
};

fn core() -> Core {
    core_with(LIMITS)
}

fn core_with(limits: CoreLimits) -> Core {
    let mut next = 0u128;
    Core::new(
        limits,
        Box::new(move || {
            next += 1;
            Uuid::from_u128(next)
        }),
    )
}

fn spec(id: StepId, system: &str, features: &[&str]) -> Arc<StepSpec> {
    let path = format!("/nix/store/{}-s{id}.drv", "0".repeat(32));
    Arc::new(StepSpec {
        drv_path: StorePath::from_absolute(&path).unwrap(),
        outputs: BTreeMap::new(),
        requirements: Requirements {
            system: system.to_owned(),
            features: features.iter().map(|f| (*f).to_owned()).collect(),
        },
        input_paths: BTreeSet::new(),
        fixed: None,
    })
}

fn step(id: StepId, inputs: &[StepId]) -> PlannedStep {
    PlannedStep {
        id,
        spec: spec(id, "x86_64-linux", &[]),
        inputs: inputs.to_vec(),
        recorded_status: StepStatus::Waiting,
        builder_losses: 0,
        infrastructure_failures: 0,
        visible_in: None,
    }
}

fn planned_build(build: BuildId, priority: i32, top: StepId) -> PlannedBuild {
    PlannedBuild {
        build,
        priority,
        global_priority: 0,
        top,
        keep_going: false,
    }
}

fn plan(build: BuildId, priority: i32, top: StepId, steps: Vec<PlannedStep>) -> Event {
    Event::BuildPlanned(BuildPlan {
        builds: vec![planned_build(build, priority, top)],
        steps,
        available: Vec::new(),
        snapshot: 0,
    })
}

/// One plan for several builds sharing `steps`, as ingest sends a job set's: (build, top) each.
fn plan_many(builds: &[(BuildId, StepId)], steps: Vec<PlannedStep>) -> Event {
    Event::BuildPlanned(BuildPlan {
        builds: builds
            .iter()
            .map(|(build, top)| planned_build(*build, 0, *top))
            .collect(),
        steps,
        available: Vec::new(),
        snapshot: 0,
    })
}

fn caps(systems: &[&str], supported: &[&str], mandatory: &[&str], jobs: u32) -> Capabilities {
    let set = |items: &[&str]| items.iter().map(|i| (*i).to_owned()).collect();
    Capabilities {
        systems: set(systems),
        supported_features: set(supported),
        mandatory_features: set(mandatory),
        max_jobs: jobs,
        speed_factor: 1.0,
    }
}

fn join(name: &str, session: SessionId, capabilities: Capabilities) -> Event {
    Event::BuilderJoined {
        name: name.to_owned(),
        session,
        capabilities,
        nix_version: String::new(),
        held: Vec::new(),
    }
}

fn finished(session: SessionId, attempt: AttemptId, outcome: Outcome) -> Event {
    Event::StepFinished {
        session,
        attempt,
        report: Report {
            outcome,
            message: format!("{outcome:?}"),
            outputs: Vec::new(),
        },
        at: Instant::now(),
    }
}

/// (session, attempt, step) of every Build sent.
fn builds(commands: &[Command]) -> Vec<(SessionId, AttemptId, StepId)> {
    commands
        .iter()
        .filter_map(|command| match command {
            Command::Send {
                session,
                message: ToBuilder::Build(assignment),
            } => Some((*session, assignment.attempt, assignment.step)),
            _ => None,
        })
        .collect()
}

fn changes(commands: &[Command]) -> Vec<&Change> {
    commands
        .iter()
        .filter_map(|command| match command {
            Command::Persist(change) => Some(change),
            _ => None,
        })
        .collect()
}

fn build_finished(commands: &[Command]) -> Vec<(BuildId, BuildStatus)> {
    changes(commands)
        .into_iter()
        .filter_map(|change| match change {
            Change::BuildFinished { build, status, .. } => Some((*build, *status)),
            _ => None,
        })
        .collect()
}

fn step_status(commands: &[Command], wanted: StepId) -> Option<StepStatus> {
    changes(commands)
        .into_iter()
        .rev()
        .find_map(|change| match change {
            Change::StepStatus { step, status, .. } if *step == wanted => Some(*status),
            _ => None,
        })
}

fn builds_started(commands: &[Command]) -> Vec<BuildId> {
    changes(commands)
        .into_iter()
        .filter_map(|change| match change {
            Change::BuildStarted { build } => Some(*build),
            _ => None,
        })
        .collect()
}

/// 1 ← 2, 1 ← 3, {2, 3} ← 4: a diamond with 4 on top.
fn diamond() -> Vec<PlannedStep> {
    vec![step(1, &[]), step(2, &[1]), step(3, &[1]), step(4, &[2, 3])]
}

#[test]
fn a_diamond_runs_bottom_up_and_its_build_succeeds_with_the_top() {
    let now = Instant::now();
    let mut core = core();
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 4)));
    let planned = core.handle(plan(10, 0, 4, diamond()));
    assert_eq!(step_status(&planned, 1), Some(StepStatus::Runnable));
    assert_eq!(
        step_status(&planned, 4),
        None,
        "new rows are already waiting"
    );
    let first = builds(&core.dispatch(now));
    assert_eq!(first.iter().map(|b| b.2).collect::<Vec<_>>(), vec![1]);
    let done = core.handle(finished(1, first[0].1, Outcome::Succeeded));
    assert!(done.contains(&Command::Send {
        session: 1,
        message: ToBuilder::ResultRecorded {
            attempt: first[0].1
        }
    }));
    let second = builds(&core.dispatch(now));
    assert_eq!(second.iter().map(|b| b.2).collect::<Vec<_>>(), vec![2, 3]);
    for (_, attempt, _) in &second {
        core.handle(finished(1, *attempt, Outcome::Succeeded));
    }
    let top = builds(&core.dispatch(now));
    let done = core.handle(finished(1, top[0].1, Outcome::Succeeded));
    assert_eq!(build_finished(&done), vec![(10, BuildStatus::Succeeded)]);
    assert!(core.graph().is_empty());
}

#[test]
fn a_build_runs_from_its_first_steps_start_and_that_is_said_once() {
    let now = Instant::now();
    let mut core = core();
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    let planned = core.handle(plan(10, 0, 4, diamond()));
    core.handle(plan(11, 0, 5, vec![step(1, &[]), step(5, &[1])]));
    assert!(
        builds_started(&planned).is_empty(),
        "a planned build is still queued"
    );
    let first = core.dispatch(now);
    assert_eq!(
        builds(&first).iter().map(|b| b.2).collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(
        builds_started(&first),
        vec![10, 11],
        "both builds need the shared step that started"
    );
    let started_at = |commands: &[Command]| {
        changes(commands)
            .iter()
            .position(|change| matches!(change, Change::BuildStarted { .. }))
    };
    let attempt_at = changes(&first)
        .iter()
        .position(|change| matches!(change, Change::AttemptStarted { .. }));
    assert!(
        attempt_at < started_at(&first),
        "the attempt is stated first"
    );
    core.handle(finished(1, builds(&first)[0].1, Outcome::Succeeded));
    let next = core.dispatch(now);
    assert_eq!(builds(&next).len(), 1);
    assert!(
        builds_started(&next).is_empty(),
        "a running build does not start again"
    );
}

#[test]
fn a_build_needing_a_step_that_already_runs_runs_from_its_plan() {
    let now = Instant::now();
    let mut core = core();
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    core.handle(plan(10, 0, 1, vec![step(1, &[])]));
    let first = core.dispatch(now);
    assert_eq!(builds_started(&first), vec![10]);
    let planned = core.handle(plan(11, 0, 2, vec![step(1, &[]), step(2, &[1])]));
    assert_eq!(
        builds_started(&planned),
        vec![11],
        "its first step is already running"
    );
    let later = core.handle(plan(12, 0, 3, vec![step(3, &[])]));
    assert!(builds_started(&later).is_empty(), "nothing it needs runs");
}

#[test]
fn a_failure_fails_its_dependents_and_every_build_that_needs_them() {
    let now = Instant::now();
    let mut core = core();
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 4)));
    core.handle(plan(10, 0, 4, diamond()));
    core.handle(plan(11, 0, 2, vec![step(1, &[]), step(2, &[1])]));
    core.handle(plan(12, 0, 6, vec![step(6, &[])]));
    let first = builds(&core.dispatch(now));
    let one = first.iter().find(|b| b.2 == 1).unwrap();
    core.handle(finished(1, one.1, Outcome::Succeeded));
    let two = builds(&core.dispatch(now))
        .into_iter()
        .find(|b| b.2 == 2)
        .unwrap();
    let failed = core.handle(finished(1, two.1, Outcome::Failed));
    assert_eq!(step_status(&failed, 2), Some(StepStatus::Failed));
    assert_eq!(step_status(&failed, 4), Some(StepStatus::DepFailed));
    let mut ended = build_finished(&failed);
    ended.sort_unstable();
    assert_eq!(
        ended,
        vec![(10, BuildStatus::DepFailed), (11, BuildStatus::Failed)]
    );
    assert_eq!(
        step_status(&failed, 3),
        Some(StepStatus::Cancelled),
        "a branch only the failed builds need is not built"
    );
    assert!(core.graph().step(6).is_some(), "another build goes on");
}

#[test]
fn a_failed_builds_other_steps_stop_unless_another_build_needs_them_or_it_keeps_going() {
    let now = Instant::now();
    let mut core = core();
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 8)));
    // Build 10: 3 ← {1, 2, 9}; build 12 needs 9 alone; build 11 keeps going: 6 ← {4, 5}.
    core.handle(plan(
        10,
        0,
        3,
        vec![
            step(1, &[]),
            step(2, &[]),
            step(9, &[]),
            step(3, &[1, 2, 9]),
        ],
    ));
    core.handle(plan(12, 0, 9, vec![step(9, &[])]));
    let Event::BuildPlanned(mut keeps_going) =
        plan(11, 0, 6, vec![step(4, &[]), step(5, &[]), step(6, &[4, 5])])
    else {
        unreachable!()
    };
    keeps_going.builds[0].keep_going = true;
    core.handle(Event::BuildPlanned(keeps_going));
    let running: HashMap<StepId, AttemptId> = builds(&core.dispatch(now))
        .into_iter()
        .map(|(_, attempt, step)| (step, attempt))
        .collect();
    assert_eq!(running.len(), 5);

    let failed = core.handle(finished(1, running[&1], Outcome::Failed));
    assert_eq!(build_finished(&failed), vec![(10, BuildStatus::DepFailed)]);
    assert_eq!(step_status(&failed, 2), Some(StepStatus::Cancelled));
    assert!(
        failed.contains(&Command::Send {
            session: 1,
            message: ToBuilder::Abort {
                attempt: running[&2],
                reason: "no build needs it any more: the builds that did failed: Failed".to_owned()
            }
        }),
        "{failed:?}"
    );
    assert!(core.graph().step(9).is_some(), "build 12 still needs it");

    let kept = core.handle(finished(1, running[&4], Outcome::Failed));
    assert_eq!(build_finished(&kept), vec![(11, BuildStatus::DepFailed)]);
    assert_eq!(step_status(&kept, 5), None, "a keep-going build builds on");
    let done = core.handle(finished(1, running[&5], Outcome::Succeeded));
    assert_eq!(step_status(&done, 5), Some(StepStatus::Succeeded));
}

#[test]
fn global_priority_beats_build_priority_which_beats_critical_path_which_beats_age() {
    let now = Instant::now();
    let mut core = core();
    // Build 1: a long chain 1 ← 2 ← 3 (step 1 has critical path 3), priority 0.
    core.handle(plan(
        1,
        0,
        3,
        vec![step(1, &[]), step(2, &[1]), step(3, &[2])],
    ));
    // Build 2: a lone step 5, older id than nothing, priority 0: loses to the chain's head.
    core.handle(plan(2, 0, 5, vec![step(5, &[])]));
    // Build 3: step 6, priority 7: beats both.
    core.handle(plan(3, 7, 6, vec![step(6, &[])]));
    // Build 4: step 7, priority 0 but global priority 1: beats everything.
    let Event::BuildPlanned(mut global) = plan(4, 0, 7, vec![step(7, &[])]) else {
        unreachable!()
    };
    global.builds[0].global_priority = 1;
    core.handle(Event::BuildPlanned(global));
    let mut order = Vec::new();
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    for _ in 0..4 {
        let sent = builds(&core.dispatch(now));
        assert_eq!(sent.len(), 1);
        order.push(sent[0].2);
        core.handle(finished(1, sent[0].1, Outcome::Succeeded));
    }
    // After 1 succeeds, 2 (critical path 2) competes with 5 (path 1).
    assert_eq!(order, vec![7, 6, 1, 2]);
}

#[test]
fn a_later_build_raises_the_priority_and_critical_path_of_shared_steps() {
    let now = Instant::now();
    let mut core = core();
    core.handle(plan(1, 0, 1, vec![step(1, &[])]));
    core.handle(plan(2, 0, 2, vec![step(2, &[])]));
    // Build 3 needs step 2 under a chain: 2 ← 8 ← 9, priority 0: a critical path of three steps
    // (of the second a step nothing is known of is predicted to take) puts 2 first.
    core.handle(plan(
        3,
        0,
        9,
        vec![step(2, &[]), step(8, &[2]), step(9, &[8])],
    ));
    assert_eq!(core.graph().step(2).unwrap().critical_path(), 3_000);
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    assert_eq!(builds(&core.dispatch(now))[0].2, 2);
}

#[test]
fn the_fastest_then_least_loaded_builder_wins() {
    let now = Instant::now();
    let mut core = core();
    let mut fast = caps(&["x86_64-linux"], &[], &[], 2);
    fast.speed_factor = 2.0;
    core.handle(join("slow-a", 1, caps(&["x86_64-linux"], &[], &[], 2)));
    core.handle(join("slow-b", 2, caps(&["x86_64-linux"], &[], &[], 2)));
    core.handle(join("fast", 3, fast));
    let tops: Vec<(BuildId, StepId)> = (1..=5).map(|id| (id, id)).collect();
    core.handle(plan_many(&tops, (1..=5).map(|id| step(id, &[])).collect()));
    let sessions: Vec<SessionId> = builds(&core.dispatch(now)).iter().map(|b| b.0).collect();
    // The fast builder fills first; then the two slow ones alternate (least loaded first).
    assert_eq!(sessions, vec![3, 3, 1, 2, 1]);
}

#[test]
fn steps_go_only_to_builders_with_their_system_and_features() {
    let now = Instant::now();
    let mut core = core();
    let mut kvm = step(1, &[]);
    kvm.spec = spec(1, "x86_64-linux", &["kvm"]);
    let mut arm = step(2, &[]);
    arm.spec = spec(2, "aarch64-linux", &[]);
    let mut bench = step(3, &[]);
    bench.spec = spec(3, "x86_64-linux", &["benchmark"]);
    let mut builtin = step(4, &[]);
    builtin.spec = spec(4, "builtin", &[]);
    core.handle(plan(
        1,
        0,
        5,
        vec![kvm, arm, bench, builtin, step(5, &[1, 2, 3, 4])],
    ));
    core.handle(join("plain", 1, caps(&["x86_64-linux"], &[], &[], 4)));
    let sent = builds(&core.dispatch(now));
    assert_eq!(
        sent.iter().map(|b| (b.0, b.2)).collect::<Vec<_>>(),
        vec![(1, 4)]
    );
    // A builder with a mandatory feature takes only steps that require it.
    core.handle(join(
        "special",
        2,
        caps(&["x86_64-linux"], &["kvm"], &["benchmark"], 4),
    ));
    let sent = builds(&core.dispatch(now));
    assert_eq!(
        sent.iter().map(|b| (b.0, b.2)).collect::<Vec<_>>(),
        vec![(2, 3)]
    );
    core.handle(join("kvm", 3, caps(&["x86_64-linux"], &["kvm"], &[], 4)));
    let sent = builds(&core.dispatch(now));
    assert_eq!(
        sent.iter().map(|b| (b.0, b.2)).collect::<Vec<_>>(),
        vec![(3, 1)]
    );
    assert!(
        core.graph()
            .step(2)
            .is_some_and(|n| n.state == StepState::Runnable)
    );
}

#[test]
fn a_lost_builder_requeues_its_steps_without_a_failure_until_the_cap() {
    let now = Instant::now();
    let mut core = core();
    core.handle(plan(1, 0, 1, vec![step(1, &[])]));
    for session in 1..=3 {
        core.handle(join("b", session, caps(&["x86_64-linux"], &[], &[], 1)));
        assert_eq!(builds(&core.dispatch(now)).len(), 1);
        let left = core.handle(Event::BuilderLeft {
            session,
            reason: "gone".to_owned(),
            departure: Departure::Ended,
        });
        assert!(changes(&left).iter().any(|change| matches!(
            change,
            Change::AttemptEnded {
                status: AttemptStatus::BuilderLost,
                ..
            }
        )));
        if session <= 2 {
            assert_eq!(step_status(&left, 1), Some(StepStatus::Runnable));
            assert!(build_finished(&left).is_empty());
        } else {
            assert_eq!(step_status(&left, 1), Some(StepStatus::Cancelled));
            assert_eq!(build_finished(&left), vec![(1, BuildStatus::Failed)]);
        }
    }
}

#[test]
fn an_infrastructure_failure_is_retried_and_a_reconnect_replaces_the_old_session() {
    let now = Instant::now();
    let mut core = core();
    core.handle(plan(1, 0, 1, vec![step(1, &[])]));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    let first = builds(&core.dispatch(now));
    let retried = core.handle(finished(1, first[0].1, Outcome::InfrastructureFailure));
    assert_eq!(step_status(&retried, 1), Some(StepStatus::Runnable));
    let second = builds(&core.dispatch(now));
    assert_eq!(second.len(), 1);
    let rejoined = core.handle(join("b", 2, caps(&["x86_64-linux"], &[], &[], 1)));
    assert!(rejoined.contains(&Command::EndSession {
        session: 1,
        reason: "replaced by a newer session of the same builder".to_owned()
    }));
    assert_eq!(step_status(&rejoined, 1), Some(StepStatus::Runnable));
    // The old session's late result is acknowledged but changes nothing.
    let late = core.handle(finished(1, second[0].1, Outcome::Succeeded));
    assert!(changes(&late).is_empty());
    let third = builds(&core.dispatch(now));
    assert_eq!(third[0].0, 2);
    let failed = core.handle(finished(2, third[0].1, Outcome::InfrastructureFailure));
    assert_eq!(step_status(&failed, 1), Some(StepStatus::Cancelled));
}

#[test]
fn infrastructure_failures_wait_out_a_growing_backoff_then_fail_with_the_reason() {
    let start = Instant::now();
    let seconds = |n: u64| start + Duration::from_secs(n);
    let mut core = core_with(CoreLimits {
        max_builder_losses: 2,
        retry: RetryPolicy {
            max_attempts: 3,
            initial: Duration::from_secs(10),
            multiplier: 2.0,
            max: Duration::from_mins(1),
        },
        ..LIMITS
    });
    core.handle(plan(1, 0, 1, vec![step(1, &[])]));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    let first = builds(&core.dispatch(seconds(1)));
    let failed = core.handle(finished(1, first[0].1, Outcome::InfrastructureFailure));
    assert!(changes(&failed).contains(&&Change::StepHeld {
        step: 1,
        delay: Duration::from_secs(10)
    }));
    assert!(
        builds(&core.dispatch(seconds(1))).is_empty(),
        "held for 10 s"
    );
    assert_eq!(core.next_wakeup(), Some(seconds(11)));
    let second = builds(&core.dispatch(seconds(11)));
    assert_eq!(second.len(), 1, "due after its backoff");
    core.handle(finished(1, second[0].1, Outcome::InfrastructureFailure));
    // The driver dispatches right after every batch: that dates the new delay.
    assert!(builds(&core.dispatch(seconds(11))).is_empty());
    assert!(
        builds(&core.dispatch(seconds(30))).is_empty(),
        "20 s the second time"
    );
    let third = builds(&core.dispatch(seconds(31)));
    assert_eq!(third.len(), 1);
    let last = core.handle(finished(1, third[0].1, Outcome::InfrastructureFailure));
    assert_eq!(step_status(&last, 1), Some(StepStatus::Cancelled));
    let reason = changes(&last).iter().find_map(|change| match change {
        Change::StepStatus {
            step: 1,
            reason: Some(reason),
            ..
        } => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(
        reason.as_deref(),
        Some("3 infrastructure failures; the last: InfrastructureFailure")
    );
    assert_eq!(core.next_wakeup(), None);
}

#[test]
fn a_retry_prefers_another_builder_and_a_builder_loss_is_retried_at_once() {
    let now = Instant::now();
    let mut core = core_with(CoreLimits {
        max_builder_losses: 2,
        retry: RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_secs(1),
            multiplier: 1.0,
            max: Duration::from_secs(1),
        },
        ..LIMITS
    });
    core.handle(plan(1, 0, 1, vec![step(1, &[])]));
    // The faster builder gets the first attempt.
    core.handle(join(
        "fast",
        1,
        Capabilities {
            speed_factor: 2.0,
            ..caps(&["x86_64-linux"], &[], &[], 1)
        },
    ));
    core.handle(join("slow", 2, caps(&["x86_64-linux"], &[], &[], 1)));
    let first = builds(&core.dispatch(now));
    assert_eq!(first[0].0, 1);
    core.handle(finished(1, first[0].1, Outcome::InfrastructureFailure));
    assert!(builds(&core.dispatch(now)).is_empty());
    let retry = builds(&core.dispatch(now + Duration::from_secs(1)));
    assert_eq!(retry[0].0, 2, "the retry goes to the other builder");
    let lost = core.handle(Event::BuilderLeft {
        session: 2,
        reason: "gone".to_owned(),
        departure: Departure::Ended,
    });
    assert!(
        !changes(&lost)
            .iter()
            .any(|change| matches!(change, Change::StepHeld { .. })),
        "a builder loss is not held back"
    );
    assert_eq!(
        builds(&core.dispatch(now + Duration::from_secs(1))).len(),
        1
    );
}

#[test]
fn a_draining_builder_gets_no_new_work_and_what_it_hands_back_is_nobodys_fault() {
    let now = Instant::now();
    let mut core = core();
    core.handle(plan_many(
        &[(1, 1), (5, 2)],
        vec![step(1, &[]), step(2, &[])],
    ));
    core.handle(join("draining", 1, caps(&["x86_64-linux"], &[], &[], 2)));
    let first = builds(&core.dispatch(now));
    assert_eq!(first.len(), 2);
    core.handle(Event::BuilderDraining { session: 1 });
    // One step finishes; the slot it frees is not filled again.
    core.handle(finished(1, first[0].1, Outcome::Succeeded));
    core.handle(plan(2, 0, 3, vec![step(3, &[])]));
    assert!(
        builds(&core.dispatch(now)).is_empty(),
        "a draining builder took work"
    );
    let left = core.handle(Event::BuilderLeft {
        session: 1,
        reason: "drained".to_owned(),
        departure: Departure::Ended,
    });
    assert!(changes(&left).contains(&&Change::AttemptEnded {
        attempt: first[1].1,
        status: AttemptStatus::Aborted,
        message: Some("builder left: draining".to_owned()),
    }));
    assert!(
        !changes(&left).iter().any(|change| matches!(
            change,
            Change::StepCounters { .. } | Change::StepHeld { .. }
        )),
        "a hand-back counts as nothing"
    );
    core.handle(join("other", 2, caps(&["x86_64-linux"], &[], &[], 2)));
    let next: BTreeSet<StepId> = builds(&core.dispatch(now)).iter().map(|b| b.2).collect();
    assert_eq!(next, BTreeSet::from([first[1].2, 3]), "handed back at once");
}

fn join_holding(name: &str, session: SessionId, held: &[AttemptId]) -> Event {
    Event::BuilderJoined {
        name: name.to_owned(),
        session,
        capabilities: caps(&["x86_64-linux"], &[], &[], 2),
        nix_version: String::new(),
        held: held.to_vec(),
    }
}

fn attempt_ended(commands: &[Command], wanted: AttemptId) -> Option<AttemptStatus> {
    changes(commands)
        .into_iter()
        .find_map(|change| match change {
            Change::AttemptEnded {
                attempt, status, ..
            } if *attempt == wanted => Some(*status),
            _ => None,
        })
}

/// A core restarted while attempt 100 of step 1 ran on `b1`: 1 ← 2 in build 10, recovered.
fn restarted(now: Instant) -> (Core, AttemptId) {
    let mut core = core();
    let orphan = Uuid::from_u128(100);
    core.recover_attempts([(orphan, 1, "b1".to_owned())], now);
    let mut running = step(1, &[]);
    running.recorded_status = StepStatus::Running;
    let planned = core.handle(plan(10, 0, 2, vec![running, step(2, &[1])]));
    assert_eq!(step_status(&planned, 1), None, "its row stays running");
    core.recovered(now);
    (core, orphan)
}

#[test]
fn a_restarted_runner_takes_back_what_a_builder_holds_and_accepts_its_result() {
    let now = Instant::now();
    let (mut core, orphan) = restarted(now);
    let joined = core.handle(join_holding("b1", 1, &[orphan]));
    let adopted: Vec<(SessionId, AttemptId)> = joined
        .iter()
        .filter_map(|command| match command {
            Command::Adopt {
                session,
                assignment,
            } => Some((*session, assignment.attempt)),
            _ => None,
        })
        .collect();
    assert_eq!(adopted, [(1, orphan)]);
    let welcome = joined.iter().position(|c| {
        *c == Command::Send {
            session: 1,
            message: ToBuilder::Joined,
        }
    });
    let adoption = joined
        .iter()
        .position(|c| matches!(c, Command::Adopt { .. }));
    assert!(
        adoption < welcome,
        "taken back before the builder hears it joined"
    );
    assert!(
        builds(&core.dispatch(now)).is_empty(),
        "nothing is built again"
    );
    let done = core.handle(finished(1, orphan, Outcome::Succeeded));
    assert_eq!(attempt_ended(&done, orphan), Some(AttemptStatus::Succeeded));
    let next: Vec<StepId> = builds(&core.dispatch(now)).iter().map(|b| b.2).collect();
    assert_eq!(next, [2]);
}

#[test]
fn an_attempt_nobody_claims_is_requeued_when_the_grace_ends() {
    let now = Instant::now();
    let (mut core, orphan) = restarted(now);
    let grace = LIMITS.readoption_grace;
    assert_eq!(core.next_wakeup(), Some(now + grace));
    let other = core.handle(join_holding("b2", 1, &[orphan]));
    assert!(
        other.contains(&Command::Send {
            session: 1,
            message: ToBuilder::Abort {
                attempt: orphan,
                reason: "the runner no longer runs this attempt".to_owned()
            }
        }),
        "another builder cannot claim it"
    );
    assert!(builds(&core.dispatch(now + grace / 2)).is_empty());
    let expired = core.dispatch(now + grace);
    assert_eq!(
        attempt_ended(&expired, orphan),
        Some(AttemptStatus::BuilderLost)
    );
    let rebuilt: Vec<StepId> = builds(&expired).iter().map(|b| b.2).collect();
    assert_eq!(rebuilt, [1]);
    let late = core.handle(join_holding("b1", 2, &[orphan]));
    assert!(
        late.iter().any(|c| matches!(
            c,
            Command::Send { session: 2, message: ToBuilder::Abort { attempt, .. } } if *attempt == orphan
        )),
        "its own builder, come too late, stops it"
    );
}

#[test]
fn an_attempt_no_unfinished_build_needs_ends_at_recovery() {
    let now = Instant::now();
    let mut core = core();
    let orphan = Uuid::from_u128(100);
    core.recover_attempts([(orphan, 7, "b1".to_owned())], now);
    let recovered = core.recovered(now);
    assert_eq!(
        attempt_ended(&recovered, orphan),
        Some(AttemptStatus::Aborted)
    );
    assert_eq!(core.next_wakeup(), None);
}

#[test]
fn a_reconnect_before_the_old_session_ended_keeps_the_attempts_it_holds() {
    let now = Instant::now();
    let mut core = core();
    core.handle(join("b1", 1, caps(&["x86_64-linux"], &[], &[], 2)));
    core.handle(plan_many(
        &[(10, 1), (11, 2)],
        vec![step(1, &[]), step(2, &[])],
    ));
    let sent = builds(&core.dispatch(now));
    let (kept, dropped) = (sent[0].1, sent[1].1);
    let rejoined = core.handle(join_holding("b1", 2, &[kept]));
    assert_eq!(attempt_ended(&rejoined, kept), None);
    assert_eq!(
        attempt_ended(&rejoined, dropped),
        Some(AttemptStatus::BuilderLost)
    );
    assert_eq!(core.attempt(&kept).map(|a| a.session), Some(2));
    let done = core.handle(finished(2, kept, Outcome::Succeeded));
    assert_eq!(attempt_ended(&done, kept), Some(AttemptStatus::Succeeded));
}

#[test]
fn steps_no_builder_can_take_wait_out_the_grace_then_end_unsupported_saying_why() {
    let start = Instant::now();
    let minutes = |n: u64| start + Duration::from_mins(n);
    let mut core = core();
    // Seen once (say, before a restart): a darwin builder.
    core.remember_builder(caps(&["aarch64-darwin"], &[], &[], 1));
    let darwin = PlannedStep {
        spec: spec(1, "aarch64-darwin", &[]),
        ..step(1, &[])
    };
    let kvm = PlannedStep {
        spec: spec(2, "x86_64-linux", &["kvm"]),
        ..step(2, &[])
    };
    core.handle(plan(1, 0, 1, vec![darwin]));
    core.handle(plan(2, 0, 2, vec![kvm]));
    core.handle(join("linux", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    assert!(builds(&core.dispatch(minutes(0))).is_empty());
    assert_eq!(core.next_wakeup(), Some(minutes(15)));
    assert!(
        changes(&core.dispatch(minutes(14))).is_empty(),
        "still in its grace"
    );
    // A darwin builder comes back in time; nobody ever offered kvm.
    core.handle(join("mac", 2, caps(&["aarch64-darwin"], &[], &[], 1)));
    let ended = core.dispatch(minutes(15));
    assert_eq!(builds(&ended).iter().map(|b| b.2).collect::<Vec<_>>(), [1]);
    assert_eq!(step_status(&ended, 2), Some(StepStatus::Unsupported));
    let reason = changes(&ended).iter().find_map(|change| match change {
        Change::StepStatus {
            step: 2,
            reason: Some(reason),
            ..
        } => Some(reason.clone()),
        _ => None,
    });
    assert_eq!(
        reason.as_deref(),
        Some(
            "no connected builder offered system x86_64-linux with features kvm for 900s; \
             no builder has ever offered that"
        )
    );
    assert_eq!(build_finished(&ended), vec![(2, BuildStatus::Failed)]);
    assert_eq!(core.next_wakeup(), None);
}

#[test]
fn cancelling_a_build_stops_the_steps_only_it_needs_and_spares_the_shared_ones() {
    let now = Instant::now();
    let mut core = core();
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 4)));
    // Build 1 needs 1 (shared with build 2) and 2 (its own); 3 waits on both.
    core.handle(plan(
        1,
        0,
        3,
        vec![step(1, &[]), step(2, &[]), step(3, &[1, 2])],
    ));
    core.handle(plan(2, 0, 1, vec![step(1, &[])]));
    let running = builds(&core.dispatch(now));
    let own = running.iter().find(|b| b.2 == 2).unwrap().1;
    let cancelled = core.handle(Event::CancelBuild {
        build: 1,
        by: "client/alice".to_owned(),
    });
    assert!(cancelled.iter().any(|command| matches!(
        command,
        Command::Send { session: 1, message: ToBuilder::Abort { attempt, .. } } if *attempt == own
    )));
    assert_eq!(
        cancelled
            .iter()
            .filter(|command| matches!(
                command,
                Command::Send {
                    message: ToBuilder::Abort { .. },
                    ..
                }
            ))
            .count(),
        1,
        "the shared step keeps running"
    );
    assert_eq!(step_status(&cancelled, 2), Some(StepStatus::Cancelled));
    assert_eq!(step_status(&cancelled, 3), Some(StepStatus::Cancelled));
    assert_eq!(step_status(&cancelled, 1), None);
    assert_eq!(
        build_finished(&cancelled),
        vec![(1, BuildStatus::Cancelled)]
    );
    assert!(core.graph().step(1).is_some() && core.graph().step(2).is_none());
}

#[test]
fn a_cancelled_attempt_holds_its_slot_until_the_builder_says_it_stopped() {
    let now = Instant::now();
    let mut core = core();
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    core.handle(plan(1, 0, 1, vec![step(1, &[])]));
    let first = builds(&core.dispatch(now));
    core.handle(Event::CancelBuild {
        build: 1,
        by: "client/alice".to_owned(),
    });
    core.handle(plan(2, 0, 2, vec![step(2, &[])]));
    assert!(
        builds(&core.dispatch(now)).is_empty(),
        "the slot is free before the cancelled build stopped"
    );
    let stopped = core.handle(finished(1, first[0].1, Outcome::InfrastructureFailure));
    assert!(stopped.contains(&Command::Send {
        session: 1,
        message: ToBuilder::ResultRecorded {
            attempt: first[0].1
        }
    }));
    assert!(
        changes(&stopped).is_empty(),
        "its end was recorded at the cancel"
    );
    assert_eq!(builds(&core.dispatch(now))[0].2, 2);
}

#[test]
fn a_build_cancelled_before_its_plan_ignores_the_plan_until_restarted() {
    let now = Instant::now();
    let mut core = core();
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 4)));
    let cancelled = core.handle(Event::CancelBuild {
        build: 1,
        by: "admin/root".to_owned(),
    });
    assert_eq!(
        build_finished(&cancelled),
        vec![(1, BuildStatus::Cancelled)]
    );
    core.handle(plan(1, 0, 1, vec![step(1, &[])]));
    assert!(
        builds(&core.dispatch(now)).is_empty(),
        "a stale plan was taken"
    );
    core.handle(Event::RestartBuild { build: 1 });
    core.handle(plan(1, 0, 1, vec![step(1, &[])]));
    assert_eq!(builds(&core.dispatch(now)).len(), 1);
}

#[test]
fn a_step_postponed_in_its_row_waits_without_using_a_retry() {
    let now = Instant::now();
    let mut core = core();
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    let mut postponed = step(1, &[]);
    postponed.visible_in = Some(Duration::from_mins(1));
    let planned = core.handle(plan(1, 0, 1, vec![postponed]));
    assert!(
        !changes(&planned).iter().any(|change| matches!(
            change,
            Change::StepHeld { .. } | Change::StepCounters { .. }
        )),
        "the row already says so, and no counter moves"
    );
    assert!(builds(&core.dispatch(now)).is_empty());
    assert_eq!(
        builds(&core.dispatch(now + Duration::from_mins(1))).len(),
        1
    );
}

#[test]
fn a_plan_corrects_for_steps_that_finished_after_ingest_read_them() {
    let now = Instant::now();
    let mut core = core();
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 2)));
    core.handle(plan(1, 0, 1, vec![step(1, &[])]));
    core.handle(plan(2, 0, 2, vec![step(2, &[])]));
    let sent = builds(&core.dispatch(now));
    let snapshot = core.completions();
    core.handle(finished(1, sent[0].1, Outcome::Succeeded));
    core.handle(finished(1, sent[1].1, Outcome::Failed));
    // Ingest read both as unfinished before those completions were committed.
    let late = |build, top, steps| {
        Event::BuildPlanned(BuildPlan {
            builds: vec![planned_build(build, 0, top)],
            steps,
            available: Vec::new(),
            snapshot,
        })
    };
    let reuse = core.handle(late(3, 3, vec![step(1, &[]), step(3, &[1])]));
    assert_eq!(
        step_status(&reuse, 3),
        Some(StepStatus::Runnable),
        "step 1 is done"
    );
    assert!(
        core.graph().step(1).is_none(),
        "a finished step is not built again"
    );
    let cached = core.handle(late(
        4,
        4,
        vec![step(2, &[]), step(5, &[]), step(4, &[2, 5])],
    ));
    assert_eq!(build_finished(&cached), vec![(4, BuildStatus::DepFailed)]);
    assert_eq!(step_status(&cached, 4), Some(StepStatus::DepFailed));
    assert!(core.graph().step(4).is_none() && core.graph().step(2).is_none());
    assert_eq!(
        step_status(&cached, 5),
        Some(StepStatus::Cancelled),
        "a step only the failed build needed is not built"
    );
    // Once ingest caught up past them, the core forgets them.
    core.handle(Event::IngestCaughtUp {
        snapshot: core.completions(),
    });
    assert!(core.recent.by_step.is_empty());
}

#[test]
fn steps_available_in_a_cache_succeed_without_building() {
    let now = Instant::now();
    let mut core = core();
    core.handle(plan(1, 0, 2, vec![step(1, &[]), step(2, &[1])]));
    let available = core.handle(Event::BuildPlanned(BuildPlan {
        builds: vec![planned_build(2, 0, 3)],
        steps: vec![step(3, &[])],
        available: vec![1],
        snapshot: 0,
    }));
    assert_eq!(step_status(&available, 2), Some(StepStatus::Runnable));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 4)));
    let sent: Vec<StepId> = builds(&core.dispatch(now)).iter().map(|b| b.2).collect();
    assert_eq!(sent, vec![2, 3]);
}

#[test]
fn the_attempt_records_when_it_started_on_the_injected_clock() {
    let start = Instant::now() + Duration::from_hours(1);
    let mut core = core();
    core.handle(plan(1, 0, 1, vec![step(1, &[])]));
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 1)));
    let sent = builds(&core.dispatch(start));
    assert_eq!(core.attempt(&sent[0].1).unwrap().started, start);
}

/// A random scenario: a DAG over `steps` steps split among builds, builders with random
/// systems, features and slots, and a random order of joins, departures and results.
#[derive(Debug, Clone)]
struct Scenario {
    inputs: Vec<Vec<usize>>,
    systems: Vec<usize>,
    features: Vec<bool>,
    builders: Vec<(usize, bool, bool, u32)>,
    actions: Vec<(u8, usize, u8)>,
}

const SYSTEMS: [&str; 3] = ["x86_64-linux", "aarch64-linux", "builtin"];

fn scenario() -> impl Strategy<Value = Scenario> {
    (2usize..24).prop_flat_map(|steps| {
        (
            proptest::collection::vec(
                proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
                steps,
            ),
            proptest::collection::vec(0usize..3, steps),
            proptest::collection::vec(proptest::bool::weighted(0.2), steps),
            proptest::collection::vec(
                (
                    0usize..2,
                    any::<bool>(),
                    proptest::bool::weighted(0.2),
                    1u32..4,
                ),
                1..4,
            ),
            proptest::collection::vec((0u8..6, any::<usize>(), 0u8..4), 0..120),
        )
            .prop_map(
                move |(inputs, systems, features, builders, actions)| Scenario {
                    inputs: inputs
                        .into_iter()
                        .enumerate()
                        .map(|(i, picks)| {
                            let mut chosen: Vec<usize> = if i == 0 {
                                Vec::new()
                            } else {
                                picks.iter().map(|p| p.index(i)).collect()
                            };
                            chosen.sort_unstable();
                            chosen.dedup();
                            chosen
                        })
                        .collect(),
                    systems,
                    features,
                    builders,
                    actions,
                },
            )
    })
}

/// Checks every invariant after each step of a scenario.
struct Checker {
    succeeded: HashSet<StepId>,
    failed: HashSet<StepId>,
    inputs: HashMap<StepId, Vec<StepId>>,
    requirements: HashMap<StepId, Requirements>,
    builders: HashMap<SessionId, Capabilities>,
}

impl Checker {
    fn check(&mut self, core: &Core, commands: &[Command]) {
        for change in changes(commands) {
            if let Change::StepStatus { step, status, .. } = change {
                match status {
                    StepStatus::Succeeded => {
                        self.succeeded.insert(*step);
                    }
                    StepStatus::Failed | StepStatus::DepFailed | StepStatus::Cancelled => {
                        self.failed.insert(*step);
                    }
                    _ => {}
                }
            }
        }
        for (session, _, step) in builds(commands) {
            for input in &self.inputs[&step] {
                assert!(
                    self.succeeded.contains(input),
                    "step {step} dispatched before input {input} succeeded"
                );
            }
            let capabilities = &self.builders[&session];
            assert!(
                capabilities.can_run(&self.requirements[&step]),
                "step {step} sent to a builder that cannot run it"
            );
        }
        let mut per_step: HashMap<StepId, usize> = HashMap::new();
        let mut per_session: HashMap<SessionId, u32> = HashMap::new();
        for (_, attempt) in core.attempts() {
            *per_step.entry(attempt.step).or_default() += 1;
            *per_session.entry(attempt.session).or_default() += 1;
        }
        assert!(
            per_step.values().all(|count| *count == 1),
            "a step has two live attempts"
        );
        for (session, running) in per_session {
            let builder = core
                .placement()
                .builder(session)
                .expect("attempts only on connected builders");
            assert!(running <= builder.capabilities.max_jobs);
            assert_eq!(running, builder.running);
        }
        for (id, node) in core.graph().steps() {
            assert!(!self.succeeded.contains(&id) && !self.failed.contains(&id));
            if let StepState::Running(attempt) = node.state {
                let step = core
                    .attempt(&attempt)
                    .map(|a| a.step)
                    .or_else(|| core.orphaned(&attempt));
                assert_eq!(
                    step,
                    Some(id),
                    "a running step's attempt is live or awaits its builder"
                );
            }
            assert!(
                core.graph().wanted(node),
                "step {id} stays in the graph though no build needs it"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn no_decision_ever_breaks_an_invariant(scenario in scenario()) {
        let now = Instant::now();
        let mut core = core();
        let count = scenario.inputs.len();
        let id = |index: usize| i64::try_from(index).unwrap() + 1;
        let planned: Vec<PlannedStep> = (0..count)
            .map(|i| {
                let features: &[&str] = if scenario.features[i] { &["kvm"] } else { &[] };
                PlannedStep {
                    spec: spec(id(i), SYSTEMS[scenario.systems[i]], features),
                    ..step(id(i), &scenario.inputs[i].iter().map(|&j| id(j)).collect::<Vec<_>>())
                }
            })
            .collect();
        let mut checker = Checker {
            succeeded: HashSet::new(),
            failed: HashSet::new(),
            inputs: planned.iter().map(|p| (p.id, p.inputs.clone())).collect(),
            requirements: planned.iter().map(|p| (p.id, p.spec.requirements.clone())).collect(),
            builders: HashMap::new(),
        };
        // Two builds: the whole DAG with the last step on top, and the first half's last step.
        let commands = core.handle(plan(1, 0, id(count - 1), planned.clone()));
        checker.check(&core, &commands);
        let half = count / 2;
        let Event::BuildPlanned(mut second) = plan(2, 3, id(half), planned[..=half].to_vec()) else {
            unreachable!()
        };
        // Keeps going in some scenarios, so failures leave kept steps behind.
        second.builds[0].keep_going = scenario.features[0];
        let commands = core.handle(Event::BuildPlanned(second));
        checker.check(&core, &commands);
        let mut next_session = 1;
        for (kind, pick, outcome) in scenario.actions {
            let commands = match kind {
                0 => {
                    let (system, kvm, mandatory, jobs) = scenario.builders[pick % scenario.builders.len()];
                    let features: &[&str] = if kvm { &["kvm"] } else { &[] };
                    let mandatory_features: &[&str] = if mandatory { &["kvm"] } else { &[] };
                    let capabilities = caps(&[SYSTEMS[system]], features, mandatory_features, jobs);
                    checker.builders.insert(next_session, capabilities.clone());
                    next_session += 1;
                    core.handle(join(&format!("b{}", pick % 3), next_session - 1, capabilities))
                }
                1 => {
                    let sessions: Vec<SessionId> = core.placement().builders().map(|(s, _)| s).collect();
                    if sessions.is_empty() { continue; }
                    {
                        // Half the departures are lost connections, whose attempts wait for their
                        // builder; a builder of the same name joining without them ends them.
                        let departure = if outcome % 2 == 0 { Departure::Ended } else { Departure::ConnectionLost };
                        core.handle(Event::BuilderLeft { session: sessions[pick % sessions.len()], reason: "gone".to_owned(), departure })
                    }
                }
                _ => {
                    let mut running: Vec<(AttemptId, SessionId)> = core.attempts().map(|(a, r)| (*a, r.session)).collect();
                    running.sort_unstable();
                    if running.is_empty() { continue; }
                    let (attempt, session) = running[pick % running.len()];
                    let outcome = [Outcome::Succeeded, Outcome::Succeeded, Outcome::Failed, Outcome::InfrastructureFailure][usize::from(outcome)];
                    core.handle(finished(session, attempt, outcome))
                }
            };
            checker.check(&core, &commands);
            let commands = core.dispatch(now);
            checker.check(&core, &commands);
        }
        // Past the rejoin grace no attempt waits for a builder any more.
        let commands = core.dispatch(now + LIMITS.rejoin_grace);
        checker.check(&core, &commands);
        for (_, node) in core.graph().steps() {
            if let StepState::Running(attempt) = node.state {
                prop_assert!(core.attempt(&attempt).is_some(), "an orphan outlived the grace");
            }
        }
        // Every unfinished step is runnable, running, or waits on an unfinished input.
        for (id, node) in core.graph().steps() {
            if let StepState::Waiting(missing) = node.state {
                prop_assert!(missing > 0);
                prop_assert!(checker.inputs[&id].iter().any(|input| core.graph().step(*input).is_some()));
            }
        }
        prop_assert_eq!(core.placement().runnable_len(), core.graph().steps().filter(|(_, n)| n.state == StepState::Runnable).count());
    }
}

/// Step 1 of build 1 runs on `b1` (session 1) when its connection fails at `now`.
fn connection_lost(now: Instant) -> (Core, AttemptId, Vec<Command>) {
    let mut core = core();
    core.handle(plan(1, 0, 1, vec![step(1, &[])]));
    core.handle(join_holding("b1", 1, &[]));
    let started = builds(&core.dispatch(now));
    assert_eq!(started.len(), 1);
    let lost = core.handle(Event::BuilderLeft {
        session: 1,
        reason: "the tunnel failed: connection reset".to_owned(),
        departure: Departure::ConnectionLost,
    });
    (core, started[0].1, lost)
}

#[test]
fn a_builder_back_within_the_rejoin_grace_keeps_its_attempt_and_nothing_runs_twice() {
    let now = Instant::now();
    let (mut core, attempt, lost) = connection_lost(now);
    assert_eq!(attempt_ended(&lost, attempt), None, "nothing ends yet");
    assert!(
        builds(&core.dispatch(now)).is_empty(),
        "the step waits for its builder"
    );
    assert_eq!(core.next_wakeup(), Some(now + LIMITS.rejoin_grace));
    let back = core.handle(join_holding("b1", 2, &[attempt]));
    assert!(back.iter().any(|command| matches!(
        command,
        Command::Adopt { session: 2, assignment } if assignment.attempt == attempt
    )));
    assert!(builds(&core.dispatch(now + LIMITS.rejoin_grace)).is_empty());
    let done = core.handle(finished(2, attempt, Outcome::Succeeded));
    assert_eq!(
        attempt_ended(&done, attempt),
        Some(AttemptStatus::Succeeded)
    );
}

#[test]
fn an_attempt_whose_builder_does_not_come_back_is_requeued_as_a_builder_loss() {
    let now = Instant::now();
    let (mut core, attempt, _) = connection_lost(now);
    core.handle(join_holding("b2", 2, &[]));
    assert!(builds(&core.dispatch(now)).is_empty());
    let late = now + LIMITS.rejoin_grace;
    let expired = core.dispatch(late);
    assert_eq!(
        attempt_ended(&expired, attempt),
        Some(AttemptStatus::BuilderLost)
    );
    assert!(changes(&expired).iter().any(|change| matches!(
        change,
        Change::AttemptEnded { message: Some(message), .. }
            if message.contains("did not come back within 10s") && message.contains("connection reset")
    )));
    assert_eq!(
        builds(&expired).iter().map(|b| b.2).collect::<Vec<_>>(),
        [1]
    );
}

#[test]
fn a_builder_back_without_its_attempt_or_a_silent_one_loses_it_at_once() {
    let now = Instant::now();
    let (mut core, attempt, _) = connection_lost(now);
    let back = core.handle(join_holding("b1", 2, &[]));
    assert_eq!(
        attempt_ended(&back, attempt),
        Some(AttemptStatus::BuilderLost),
        "it came back without the attempt"
    );
    assert_eq!(builds(&core.dispatch(now)).len(), 1, "built again at once");

    let mut other = self::core();
    other.handle(plan(1, 0, 1, vec![step(1, &[])]));
    other.handle(join_holding("b1", 1, &[]));
    let started = builds(&other.dispatch(now));
    let silent = other.handle(Event::BuilderLeft {
        session: 1,
        reason: "silent past the liveness timeout".to_owned(),
        departure: Departure::Ended,
    });
    assert_eq!(
        attempt_ended(&silent, started[0].1),
        Some(AttemptStatus::BuilderLost),
        "a liveness timeout is no connection loss"
    );
}

#[test]
fn a_job_sets_builds_share_one_plan_and_each_holds_only_its_top() {
    let now = Instant::now();
    let mut core = core();
    // Build 1 is 3 ← 2 ← 1; build 2 is 4 ← 1; build 3's top is build 1's input 2.
    let shared = vec![step(1, &[]), step(2, &[1]), step(3, &[2]), step(4, &[1])];
    core.handle(plan_many(&[(1, 3), (2, 4), (3, 2)], shared));
    assert_eq!(core.graph().len(), 4, "each shared step joins once");
    assert_eq!(core.graph().build_count(), 3);
    assert_eq!(
        core.graph().step(1).unwrap().critical_path(),
        3_000,
        "the longest chain above it, three steps of a second"
    );

    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 4)));
    let started = core.dispatch(now);
    assert_eq!(builds(&started).len(), 1);
    assert_eq!(
        builds_started(&started),
        vec![1, 2, 3],
        "every build above step 1 runs"
    );

    let cancelled = core.handle(Event::CancelBuild {
        build: 1,
        by: "client/alice".to_owned(),
    });
    assert_eq!(step_status(&cancelled, 3), Some(StepStatus::Cancelled));
    assert_eq!(step_status(&cancelled, 2), None, "build 3 still needs it");
    let cancelled = core.handle(Event::CancelBuild {
        build: 3,
        by: "client/alice".to_owned(),
    });
    assert_eq!(step_status(&cancelled, 2), Some(StepStatus::Cancelled));
    assert!(core.graph().step(1).is_some(), "build 2 still needs it");

    let attempt = builds(&started)[0].1;
    let done = core.handle(finished(1, attempt, Outcome::Succeeded));
    assert_eq!(step_status(&done, 4), Some(StepStatus::Runnable));
    let last = builds(&core.dispatch(now))[0].1;
    let done = core.handle(finished(1, last, Outcome::Succeeded));
    assert_eq!(build_finished(&done), vec![(2, BuildStatus::Succeeded)]);
    assert!(core.graph().is_empty());
}

#[test]
fn a_failed_keep_going_build_keeps_its_buildable_steps_until_it_is_cancelled() {
    let now = Instant::now();
    let mut core = core();
    core.handle(join("b", 1, caps(&["x86_64-linux"], &[], &[], 4)));
    // 5 ← {3, 4}, 3 ← 1, 4 ← 2: when 1 fails, 2 and then 4 are still worth building.
    let Event::BuildPlanned(mut keeps_going) = plan(
        7,
        0,
        5,
        vec![
            step(1, &[]),
            step(2, &[]),
            step(3, &[1]),
            step(4, &[2]),
            step(5, &[3, 4]),
        ],
    ) else {
        unreachable!()
    };
    keeps_going.builds[0].keep_going = true;
    core.handle(Event::BuildPlanned(keeps_going));
    let running: HashMap<StepId, AttemptId> = builds(&core.dispatch(now))
        .into_iter()
        .map(|(_, attempt, step)| (step, attempt))
        .collect();
    let failed = core.handle(finished(1, running[&1], Outcome::Failed));
    assert_eq!(build_finished(&failed), vec![(7, BuildStatus::DepFailed)]);
    assert_eq!(step_status(&failed, 2), None, "kept");
    let done = core.handle(finished(1, running[&2], Outcome::Succeeded));
    assert_eq!(
        step_status(&done, 4),
        Some(StepStatus::Runnable),
        "kept too"
    );
    let cancelled = core.handle(Event::CancelBuild {
        build: 7,
        by: "client/alice".to_owned(),
    });
    assert_eq!(step_status(&cancelled, 4), Some(StepStatus::Cancelled));
    assert!(core.graph().is_empty());
}

mod durations;
mod fleet;
mod gauges;
mod global_priority;
mod history;
mod retention;
