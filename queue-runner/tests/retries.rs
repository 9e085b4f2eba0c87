//! Retries under the retry policy, end to end: a step whose attempts keep failing for reasons
//! not its own is retried after a growing backoff until the policy gives up, with the reason
//! stored; and a step postponed with SQL (`visible_after`) waits without using a retry.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use common::{BuilderSpec, DEADLINE, Farm, StepStatus, Stored, step_status};
use test_support::fake_derivations::{Factory, Spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infrastructure_failures_are_retried_after_a_growing_backoff_then_fail_with_the_reason() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec::new("b1"));
    let mut factory = Factory::default();
    // The builder's job for this step panics every time (the noop executor's test hook): an
    // infrastructure failure.
    let doomed = factory.make(&Spec::new("doomed").env("DROVER_NOOP_PANIC", "1"));
    let build = farm.submit(&[&doomed]).await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Failed);

    let db = farm.db().await;
    // The test farm's policy: 4 attempts, 100 ms doubling up to 400 ms.
    let gaps: Vec<f64> = db
        .query(
            "SELECT extract(epoch FROM started_at - lag(finished_at) OVER (ORDER BY started_at))::float8
             FROM step_attempts ORDER BY started_at",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .filter_map(|row| row.get::<_, Option<f64>>(0))
        .collect();
    assert_eq!(gaps.len(), 3, "four attempts: {gaps:?}");
    for (gap, backoff) in gaps.iter().zip([0.1, 0.2, 0.4]) {
        // The delay starts when the failure is handled, a moment before its commit stamps it.
        assert!(
            *gap >= backoff - 0.02,
            "retried after {gap} s, before {backoff} s: {gaps:?}"
        );
    }
    let row = db
        .query_one(
            "SELECT status::text, failure_reason, infrastructure_failures, visible_after IS NOT NULL
             FROM steps",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(step_status(row.get(0)), StepStatus::Cancelled);
    let reason: String = row.get(1);
    assert!(
        reason.starts_with("4 infrastructure failures; the last: ") && reason.contains("panicked"),
        "{reason}"
    );
    assert_eq!(row.get::<_, i32>(2), 4);
    assert!(row.get::<_, bool>(3), "visible_after records the backoff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_postponed_with_sql_waits_without_using_a_retry() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let later = factory.make(&Spec::new("later"));
    let build = farm.submit(&[&later]).await;
    farm.wait_for_count(
        "the step to be ingested",
        "SELECT count(*) FROM steps WHERE status = 'runnable'",
        1,
    )
    .await;
    farm.stop_runner().await;
    let db = farm.db().await;
    db.execute(
        "UPDATE steps SET visible_after = now() + interval '2 seconds'",
        &[],
    )
    .await
    .unwrap();
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec::new("b1"));
    test_support::poll_until(DEADLINE, "the builder to join", || async {
        (farm
            .count("SELECT count(*) FROM machines WHERE connected")
            .await
            == 1)
            .then_some(())
    })
    .await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let row = db
        .query_one(
            "SELECT a.started_at >= s.visible_after, s.infrastructure_failures
             FROM step_attempts a JOIN steps s ON s.id = a.step_id",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "dispatched before its visible_after");
    assert_eq!(row.get::<_, i32>(1), 0, "the postponement used a retry");
}
