//! The scheduler under load and faults, end to end: a builder that stops reading its tunnel,
//! a big build ingested while others run, a job that panics on its builder.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use common::{AttemptStatus, BuilderSpec, DEADLINE, Farm, Stored, attempt_status};
use drover_proto::API_VERSION;
use drover_proto::v1::builder_message::Message as Outbound;
use drover_proto::v1::{BuilderMessage, Join, StepOutcome, StepResult};
use test_support::fake_derivations::{Factory, Spec};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[expect(
    clippy::disallowed_methods,
    reason = "the stuck builder's chatter runs on a task of its own, aborted at the end"
)]
async fn a_builder_that_stops_reading_its_tunnel_is_ended_and_delays_nobody() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let first = factory.make(&Spec::new("held-by-the-stuck-builder"));
    let held = farm.submit(&[&first]).await;

    // The stuck builder joins, is given the step, and never reads its tunnel again; it keeps
    // talking (so it is not silent), each result drawing an acknowledgement it never reads.
    let (outbox, receiver) = mpsc::channel(64);
    outbox
        .send(BuilderMessage {
            message: Some(Outbound::Join(Join {
                api_version: API_VERSION.to_owned(),
                systems: vec!["x86_64-linux".to_owned()],
                max_jobs: 1,
                speed_factor: 100.0,
                ..Join::default()
            })),
        })
        .await
        .unwrap();
    let _unread = farm
        .builder_client("stuck")
        .await
        .open_tunnel(ReceiverStream::new(receiver))
        .await
        .unwrap();
    let db = farm.db().await;
    farm.wait_for_count(
        "the stuck builder to be given the step",
        "SELECT count(*) FROM step_attempts WHERE machine = 'stuck' AND status = 'running'",
        1,
    )
    .await;
    let spam = tokio::spawn(async move {
        let stale = uuid::Uuid::new_v4().to_string();
        loop {
            let result = StepResult {
                attempt_id: stale.clone(),
                outcome: StepOutcome::Failed.into(),
                message: "x".repeat(64),
                ..StepResult::default()
            };
            let message = BuilderMessage {
                message: Some(Outbound::StepResult(result)),
            };
            if outbox.send(message).await.is_err() {
                return;
            }
        }
    });

    // A healthy builder builds another build meanwhile, and the held step too once the stuck
    // builder's session is ended.
    farm.start_builder(&BuilderSpec::new("healthy"));
    let chain = factory.chain("flowing", 20);
    let flowing = farm.submit(&chain.iter().collect::<Vec<_>>()).await;
    assert_eq!(farm.wait_for_build(flowing).await, Stored::Succeeded);
    assert_eq!(farm.wait_for_build(held).await, Stored::Succeeded);
    spam.abort();
    let stuck = db
        .query_one(
            "SELECT connected, (SELECT status::text FROM step_attempts WHERE machine = 'stuck')
             FROM machines WHERE name = 'stuck'",
            &[],
        )
        .await
        .unwrap();
    assert!(
        !stuck.get::<_, bool>(0),
        "the stuck builder is still connected"
    );
    assert_eq!(attempt_status(stuck.get(1)), AttemptStatus::BuilderLost);
    assert_eq!(
        farm.count(
            "SELECT count(*) FROM step_attempts WHERE machine = 'healthy' AND status <> 'succeeded'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_recorded_while_a_big_build_is_ingested() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec {
        build_ms: 40,
        ..BuilderSpec::new("b1")
    });
    let mut factory = Factory::default();
    let chain = factory.chain("small", 60);
    let small = farm.submit(&chain.iter().collect::<Vec<_>>()).await;
    let db = farm.db().await;
    farm.wait_for_count(
        "the small build to start",
        "SELECT least(count(*), 1) FROM step_attempts WHERE status = 'succeeded'",
        1,
    )
    .await;
    // A big build, queued with SQL as an evaluator would, at a lower priority so it never
    // holds up the small one: ingest takes a while, and the small build must keep going.
    let big = factory.layered_dag("big", 8000, 1000, 3);
    let paths: Vec<String> = big.iter().map(|drv| drv.path.to_absolute()).collect();
    let texts: Vec<&[u8]> = big.iter().map(|drv| drv.text.as_slice()).collect();
    db.execute(
        "INSERT INTO derivations (path, text) SELECT * FROM unnest($1::text[], $2::bytea[])",
        &[&paths, &texts],
    )
    .await
    .unwrap();
    let big_build: i64 = db
        .query_one(
            "INSERT INTO builds (drv_path, priority) VALUES ($1, -1) RETURNING id",
            &[paths.last().unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(farm.wait_for_build(small).await, Stored::Succeeded);
    test_support::poll_until(DEADLINE, "the big build to be ingested", || async {
        let ingested: bool = db
            .query_one(
                "SELECT ingested_at IS NOT NULL FROM builds WHERE id = $1",
                &[&big_build],
            )
            .await
            .unwrap()
            .get(0);
        ingested.then_some(())
    })
    .await;
    let during: i64 = db
        .query_one(
            "SELECT count(*) FROM step_attempts a, builds b
             WHERE b.id = $1 AND a.finished_at > b.submitted_at AND a.finished_at < b.ingested_at",
            &[&big_build],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        during > 0,
        "no result was recorded while the big build was being ingested"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_panics_fails_its_step_only_and_the_session_goes_on() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let doomed = factory.make(&Spec::new("doomed").env("DROVER_NOOP_PANIC", "1"));
    let fine: Vec<_> = (0..3)
        .map(|index| factory.make(&Spec::new(&format!("fine-{index}"))))
        .collect();
    let doomed_build = farm.submit(&[&doomed]).await;
    let fine_builds: Vec<i64> = {
        let mut ids = Vec::new();
        for drv in &fine {
            ids.push(farm.submit(&[drv]).await);
        }
        ids
    };
    farm.start_builder(&BuilderSpec {
        max_jobs: 4,
        build_ms: 200,
        ..BuilderSpec::new("b1")
    });
    for build in fine_builds {
        assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    }
    assert_eq!(farm.wait_for_build(doomed_build).await, Stored::Failed);
    assert_eq!(
        farm.count(
            "SELECT count(*) FROM step_attempts WHERE status = 'infrastructure_failure'
             AND message LIKE '%panicked%'"
        )
        .await,
        4,
        "the panicking step is retried up to the farm's cap of 3, each attempt an infrastructure failure"
    );
    assert_eq!(
        farm.count("SELECT count(*) FROM step_attempts WHERE status = 'builder_lost'")
            .await,
        0,
        "a job's panic ended the builder's session"
    );
}
