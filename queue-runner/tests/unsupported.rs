//! A step no connected builder can take waits through the grace period, visible in SQL, then
//! ends `unsupported`, saying what it needs and whether any builder ever offered it; its build
//! fails, and the farm's other work goes on.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use common::{BuilderSpec, Farm, StepStatus, Stored, step_status};
use test_support::fake_derivations::{Factory, Spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_nobody_can_build_ends_unsupported_after_the_grace_saying_why() {
    let mut farm = Farm::new().await;
    farm.unsupported_grace_secs = 2;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec::new("linux"));
    let mut factory = Factory::default();
    let vm_test = factory.make(&Spec::new("vm-test").env("requiredSystemFeatures", "kvm"));
    let plain = factory.make(&Spec::new("plain"));
    let stuck = farm.submit(&[&vm_test]).await;
    let fine = farm.submit(&[&plain]).await;

    farm.wait_for_count(
        "the step to show as waiting for a builder",
        "SELECT count(*) FROM steps_without_a_builder
         WHERE drv_path LIKE '%-vm-test.drv' AND NOT a_builder_ever_could",
        1,
    )
    .await;
    assert_eq!(farm.wait_for_build(fine).await, Stored::Succeeded);
    assert_eq!(farm.wait_for_build(stuck).await, Stored::Failed);
    let row = farm
        .db()
        .await
        .query_one(
            "SELECT s.status::text, s.failure_reason, b.failure_reason,
                    extract(epoch FROM s.finished_at - b.submitted_at)::float8
             FROM steps s, builds b WHERE s.drv_path LIKE '%-vm-test.drv' AND b.id = $1",
            &[&stuck],
        )
        .await
        .unwrap();
    assert_eq!(step_status(row.get(0)), StepStatus::Unsupported);
    let reason: String = row.get(1);
    assert!(
        reason.contains("system x86_64-linux with features kvm")
            && reason.ends_with("no builder has ever offered that"),
        "{reason}"
    );
    assert_eq!(row.get::<_, String>(2), reason, "the build says why too");
    assert!(row.get::<_, f64>(3) >= 2.0, "ended before its grace period");
    assert_eq!(
        farm.count("SELECT count(*) FROM step_attempts WHERE status <> 'succeeded'")
            .await,
        0
    );
}
