//! Cancel and restart, end to end: cancelling a build stops its running step on the builder and
//! spares a step another build still needs; only the submitter (or an admin) may cancel; a
//! restart queues a cancelled build again, and clears a failure that later builds would
//! otherwise inherit.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use common::{BuilderSpec, DEADLINE, Farm, StepStatus, Stored, step_status};
use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::{BuildStatus, CancelRequest, RestartRequest};
use drover_tls::Role;
use test_support::fake_derivations::{Factory, Spec};

/// A restart of `build_id` alone.
fn restart_of(build_id: i64) -> RestartRequest {
    RestartRequest {
        build_id,
        ..RestartRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_what_only_that_build_needs_and_restart_queues_it_again() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec {
        max_jobs: 2,
        build_ms: 3000,
        ..BuilderSpec::new("b1")
    });
    let mut factory = Factory::default();
    let alone = factory.make(&Spec::new("alone"));
    let shared = factory.make(&Spec::new("shared"));
    let on_top = factory.make(&Spec::new("on-top").inputs(&[&shared]));
    let c = farm.submit(&[&alone]).await;
    let a = farm.submit(&[&shared, &on_top]).await;
    let b = farm.submit(&[&shared]).await;
    farm.wait_for_count(
        "both runnable steps to run",
        "SELECT count(*) FROM step_attempts WHERE status = 'running'",
        2,
    )
    .await;

    let mut client = farm.client().await;
    client.cancel(CancelRequest { build_id: c }).await.unwrap();
    client.cancel(CancelRequest { build_id: a }).await.unwrap();
    assert_eq!(farm.wait_for_build(c).await, Stored::Cancelled);
    assert_eq!(farm.wait_for_build(a).await, Stored::Cancelled);
    farm.wait_for_count(
        "the cancelled build's running step to be stopped",
        "SELECT count(*) FROM step_attempts a JOIN steps s ON s.id = a.step_id
         WHERE s.drv_path LIKE '%-alone.drv' AND a.status = 'aborted'",
        1,
    )
    .await;

    let mut mallory = BuildServiceClient::new(farm.channel(Role::Client, "mallory").await);
    let refused = mallory
        .cancel(CancelRequest { build_id: b })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    assert_eq!(
        farm.wait_for_build(b).await,
        Stored::Succeeded,
        "the shared step went on"
    );
    // Cancelling an ended build is not an error: it says how the build ended.
    for (build, ended) in [(b, BuildStatus::Succeeded), (c, BuildStatus::Cancelled)] {
        farm.wait_for_build(build).await;
        let again = client
            .cancel(CancelRequest { build_id: build })
            .await
            .unwrap()
            .into_inner();
        assert!(again.already_ended, "build {build}");
        assert_eq!(again.status(), ended, "build {build}");
    }
    let statuses: Vec<(String, StepStatus)> = farm
        .db()
        .await
        .query(
            "SELECT s.drv_path, s.status::text FROM steps s ORDER BY s.id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| {
            let drv: String = row.get(0);
            (
                drv.split_once('-').unwrap().1.to_owned(),
                step_status(row.get(1)),
            )
        })
        .collect();
    assert!(
        statuses.contains(&("shared.drv".to_owned(), StepStatus::Succeeded)),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&("on-top.drv".to_owned(), StepStatus::Cancelled)),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&("alone.drv".to_owned(), StepStatus::Cancelled)),
        "{statuses:?}"
    );
    assert_eq!(
        farm.count("SELECT count(*) FROM step_attempts WHERE status = 'builder_lost'")
            .await,
        0
    );

    client.restart(restart_of(c)).await.unwrap();
    assert_eq!(farm.wait_for_build(c).await, Stored::Succeeded);
    let finished = client.restart(restart_of(c)).await.unwrap_err();
    assert_eq!(finished.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_clears_the_failure_later_builds_would_inherit() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec::new("b1"));
    let mut factory = Factory::default();
    let broken = factory.make(&Spec::new("broken").env("DROVER_NOOP_FAIL", "on purpose"));
    let first = farm.submit(&[&broken]).await;
    assert_eq!(farm.wait_for_build(first).await, Stored::Failed);
    // A later build needing it fails at once, without building it again.
    let second = farm.submit(&[&broken]).await;
    assert_eq!(farm.wait_for_build(second).await, Stored::CachedFailure);
    assert_eq!(farm.count("SELECT count(*) FROM step_attempts").await, 1);

    // Restarting the cached failure clears the failure it inherited: it is built again.
    farm.client()
        .await
        .restart(restart_of(second))
        .await
        .unwrap();
    test_support::poll_until(DEADLINE, "the restarted build to build again", || async {
        (farm
            .count("SELECT count(*) FROM step_attempts WHERE status = 'failed'")
            .await
            == 2)
            .then_some(())
    })
    .await;
    assert_eq!(farm.wait_for_build(second).await, Stored::Failed);

    // A build that needs it now is a cached failure of `second`. Restarting `second` with its
    // dependents queues both again, and the step is built once more for both.
    let third = farm.submit(&[&broken]).await;
    assert_eq!(farm.wait_for_build(third).await, Stored::CachedFailure);
    let restarted = farm
        .client()
        .await
        .restart(RestartRequest {
            build_id: second,
            dependents: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restarted.dependents, [third]);
    test_support::poll_until(DEADLINE, "both builds to build again", || async {
        (farm
            .count("SELECT count(*) FROM step_attempts WHERE status = 'failed'")
            .await
            == 3)
            .then_some(())
    })
    .await;
    assert_eq!(farm.wait_for_build(second).await, Stored::Failed);
    assert_ne!(farm.wait_for_build(third).await, Stored::CachedFailure);
}
