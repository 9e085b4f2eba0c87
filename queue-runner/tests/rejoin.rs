//! A builder whose connection is cut mid-step (a loopback proxy closes it, as a network blip
//! would) dials again within the rejoin grace and keeps its attempt: the step runs once, no
//! builder loss is counted. With the grace at zero the same cut builds the step twice, so the
//! grace is what saves the work.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use common::{AttemptStatus, BuilderSpec, DEADLINE, Farm, Stored};
use test_support::TcpProxy;
use test_support::fake_derivations::{Factory, Spec};

/// Runs one 3-second step on a builder behind a proxy, cuts the connection once the step runs,
/// and returns the attempts the farm recorded and the step's builder losses.
async fn cut_mid_step(rejoin_grace_secs: u64) -> (Vec<(String, AttemptStatus, String)>, i64) {
    let mut farm = Farm::new().await;
    farm.rejoin_grace_secs = rejoin_grace_secs;
    farm.start_runner().await;
    let proxy = TcpProxy::start(([127, 0, 0, 1], farm.grpc_port).into()).await;
    farm.start_builder(&BuilderSpec {
        max_jobs: 1,
        build_ms: 3000,
        runner_port: Some(proxy.port()),
        ..BuilderSpec::new("b1")
    });
    let drv = Factory::default().make(&Spec::new("cut"));
    let build = farm.submit(&[&drv]).await;
    farm.wait_for_count(
        "the step to run",
        "SELECT count(*) FROM steps WHERE status = 'running'",
        1,
    )
    .await;
    proxy.cut();
    assert_eq!(
        tokio::time::timeout(DEADLINE, farm.wait_for_build(build))
            .await
            .expect("the build to end"),
        Stored::Succeeded
    );
    let losses = farm
        .count("SELECT coalesce(sum(builder_losses), 0)::bigint FROM steps")
        .await;
    (farm.attempts().await, losses)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_cut_off_mid_step_rejoins_and_the_step_runs_once() {
    let (attempts, losses) = cut_mid_step(10).await;
    assert_eq!(
        attempts
            .iter()
            .map(|(_, status, _)| *status)
            .collect::<Vec<_>>(),
        [AttemptStatus::Succeeded],
        "one attempt, taken back: {attempts:?}"
    );
    assert_eq!(losses, 0);

    let (attempts, losses) = cut_mid_step(0).await;
    assert_eq!(
        attempts.len(),
        2,
        "without the grace the cut builds it twice: {attempts:?}"
    );
    assert_eq!(attempts[0].1, AttemptStatus::BuilderLost, "{attempts:?}");
    assert_eq!(losses, 1);
}
