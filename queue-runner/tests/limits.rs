//! Bad input stays contained: a derivation over the farm's size limit is refused at submit with
//! a typed error and leaves nothing behind, while a build already running carries on; one under
//! the limit but over gRPC's default message size reaches its builder and builds, because both
//! ends of the builder tunnel use the same, larger limit.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use common::{BuilderSpec, Farm, Stored};
use drover_proto::v1::{DerivationText, SubmitRequest};
use test_support::fake_derivations::{Factory, Spec};

/// Bytes of a derivation whose environment holds `size` bytes.
fn blob(size: usize) -> String {
    "x".repeat(size)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_derivation_is_refused_at_submit_and_disturbs_nothing() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec {
        build_ms: 1500,
        ..BuilderSpec::new("b1")
    });
    let mut factory = Factory::default();
    let running = factory.make(&Spec::new("running-meanwhile"));
    let running_build = farm.submit(&[&running]).await;
    test_support::poll_until(common::DEADLINE, "the first build to run", || async {
        (farm
            .count("SELECT count(*) FROM step_attempts WHERE status = 'running'")
            .await
            == 1)
            .then_some(())
    })
    .await;
    let rows = "SELECT (SELECT count(*) FROM builds) + (SELECT count(*) FROM derivations)
                + (SELECT count(*) FROM steps)";
    let before = farm.count(rows).await;

    // Over the default limit of 8 MiB.
    let value = blob(9 * 1024 * 1024);
    let huge = factory.make(&Spec::new("huge").env("blob", &value));
    let refused = farm
        .client()
        .await
        .submit(SubmitRequest {
            derivations: vec![DerivationText {
                path: huge.path.to_absolute(),
                text: huge.text.clone(),
            }],
            top_drv_path: huge.path.to_absolute(),
            ..SubmitRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("over this farm's limit of 8388608")
            && refused
                .message()
                .contains("submissions.max_derivation_bytes"),
        "{}",
        refused.message()
    );
    assert_eq!(
        farm.count(rows).await,
        before,
        "the refused submit wrote rows"
    );

    assert_eq!(farm.wait_for_build(running_build).await, Stored::Succeeded);
    assert_eq!(
        farm.count("SELECT count(*) FROM step_attempts WHERE status <> 'succeeded'")
            .await,
        0,
        "the running build was disturbed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_derivation_over_grpcs_default_message_size_reaches_its_builder() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec::new("b1"));
    let mut factory = Factory::default();
    // tonic refuses messages over 4 MiB unless told otherwise.
    let value = blob(6 * 1024 * 1024);
    let large = factory.make(&Spec::new("large").env("blob", &value));
    let build = farm.submit(&[&large]).await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    assert_eq!(
        farm.count("SELECT count(*) FROM step_attempts").await,
        1,
        "the step was dispatched more than once"
    );
}
