//! SIGTERM drains a builder: it takes no new steps, lets the running ones finish and report, and
//! exits 0; at its drain deadline it stops what is left and the runner hands those steps to
//! another builder without counting a loss.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::time::Duration;

use common::{AttemptStatus, BuilderSpec, Farm, Stored};
use test_support::fake_derivations::{Factory, Spec};

/// Waits until the builder really runs a step: its log has reached the runner (the runner marks
/// the attempt running when it sends the step, a moment before the builder has it).
async fn wait_until_started(farm: &Farm) {
    let db = farm.db().await;
    test_support::poll_until(
        common::DEADLINE,
        "the builder to start the step",
        || async {
            let file: String = db
                .query_one(
                    "SELECT log_file FROM step_attempts WHERE status = 'running'",
                    &[],
                )
                .await
                .ok()?
                .get(0);
            farm.dir
                .path()
                .join("logs")
                .join(file)
                .exists()
                .then_some(())
        },
    )
    .await;
}

/// Attempt statuses and messages, and the builder losses counted on any step.
async fn outcome(farm: &Farm) -> (Vec<(AttemptStatus, String)>, i64) {
    let attempts = farm
        .attempts()
        .await
        .into_iter()
        .map(|(_, status, message)| (status, message))
        .collect();
    let losses = farm
        .count("SELECT coalesce(sum(builder_losses), 0)::bigint FROM steps")
        .await;
    (attempts, losses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_running_step_finish_and_the_builder_exits_0() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let b1 = farm.start_builder(&BuilderSpec {
        max_jobs: 1,
        build_ms: 1500,
        ..BuilderSpec::new("b1")
    });
    let mut factory = Factory::default();
    let first = factory.make(&Spec::new("first"));
    let second = factory.make(&Spec::new("second"));
    let first_build = farm.submit(&[&first]).await;
    let second_build = farm.submit(&[&second]).await;
    wait_until_started(&farm).await;
    farm.terminate_builder(b1);
    let status = farm.wait_builder_exit(b1, Duration::from_secs(20)).await;
    assert!(status.success(), "a drained builder exits 0: {status}");
    let (attempts, losses) = outcome(&farm).await;
    assert_eq!(
        attempts,
        [(AttemptStatus::Succeeded, String::new())],
        "the running step finished; nothing new started"
    );
    assert_eq!(losses, 0);

    farm.start_builder(&BuilderSpec::new("b2"));
    assert_eq!(farm.wait_for_build(first_build).await, Stored::Succeeded);
    assert_eq!(farm.wait_for_build(second_build).await, Stored::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_drain_deadline_the_rest_is_handed_back_without_a_loss() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let b1 = farm.start_builder(&BuilderSpec {
        max_jobs: 1,
        build_ms: 60_000,
        drain_deadline_secs: 1,
        ..BuilderSpec::new("b1")
    });
    let mut factory = Factory::default();
    let slow = factory.make(&Spec::new("slow"));
    let build = farm.submit(&[&slow]).await;
    wait_until_started(&farm).await;
    farm.terminate_builder(b1);
    let status = farm.wait_builder_exit(b1, Duration::from_secs(20)).await;
    assert!(status.success(), "a drained builder exits 0: {status}");
    farm.wait_for_count(
        "the step to be handed back",
        "SELECT count(*) FROM step_attempts WHERE status = 'aborted'",
        1,
    )
    .await;
    farm.start_builder(&BuilderSpec::new("b2"));
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let (attempts, losses) = outcome(&farm).await;
    assert_eq!(
        attempts,
        [
            (AttemptStatus::Aborted, "builder left: draining".to_owned()),
            (AttemptStatus::Succeeded, String::new())
        ]
    );
    assert_eq!(losses, 0, "a hand-back is not a loss");
}
