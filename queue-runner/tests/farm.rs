//! The control plane end to end: real PostgreSQL, real mTLS gRPC, the runner serving on a socket
//! and `drover-builder` processes with the noop executor.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::collections::BTreeMap;

use common::{
    AttemptStatus, BuilderSpec, Farm, StepStatus, Stored, attempt_status, build_status, step_status,
};
use drover_proto::v1::{BuildStatus, GetLogRequest};
use test_support::fake_derivations::{Factory, FakeDrv, Spec};

/// Queues a build of the last derivation with plain SQL, as an evaluator would; returns its id.
async fn enqueue_with_sql(db: &tokio_postgres::Client, drvs: &[(&str, &Vec<u8>)]) -> i64 {
    for (path, text) in drvs {
        db.execute(
            "INSERT INTO derivations (path, text) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[path, text],
        )
        .await
        .unwrap();
    }
    let top = drvs.last().expect("a derivation to build").0;
    db.query_one(
        "INSERT INTO builds (drv_path) VALUES ($1) RETURNING id",
        &[&top],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_dag_of_1000_steps_and_a_diamond_complete_on_three_builders() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let dag = factory.random_dag("dag", 1000, 7);
    let bottom = factory.make(&Spec::new("diamond-bottom"));
    let left = factory.make(&Spec::new("diamond-left").inputs(&[&bottom]));
    let right = factory.make(&Spec::new("diamond-right").inputs(&[&bottom]));
    let top = factory.make(&Spec::new("diamond-top").inputs(&[&left, &right]));

    let dag_build = farm.submit(&dag.iter().collect::<Vec<_>>()).await;
    let diamond_build = farm.submit(&[&bottom, &left, &right, &top]).await;
    for name in ["b1", "b2", "b3"] {
        farm.start_builder(&BuilderSpec {
            max_jobs: 4,
            ..BuilderSpec::new(name)
        });
    }
    assert_eq!(farm.wait_for_build(dag_build).await, Stored::Succeeded);
    assert_eq!(farm.wait_for_build(diamond_build).await, Stored::Succeeded);

    assert_eq!(
        farm.count("SELECT count(*) FROM steps WHERE status = 'succeeded'")
            .await,
        1005
    );
    assert_eq!(farm.count("SELECT count(*) FROM steps").await, 1005);
    assert_eq!(
        farm.count("SELECT count(*) FROM step_attempts").await,
        1005,
        "a step ran twice"
    );
    assert_eq!(
        farm.count("SELECT count(*) FROM step_attempts WHERE status <> 'succeeded'")
            .await,
        0
    );
    assert_eq!(farm.count("SELECT count(*) FROM step_outputs").await, 1005);
    assert_eq!(
        farm.count("SELECT count(DISTINCT machine) FROM step_attempts")
            .await,
        3,
        "every builder should have taken work"
    );
    let ran_before_inputs = farm
        .count(
            "SELECT count(*) FROM step_attempts a
         JOIN steps s ON s.id = a.step_id
         JOIN derivations d ON d.path = s.drv_path
         JOIN steps input ON position(input.drv_path::bytea IN d.text) > 0 AND input.id <> s.id
         WHERE input.finished_at > a.started_at",
        )
        .await;
    assert_eq!(
        ran_before_inputs, 0,
        "a step started before one of its inputs finished"
    );

    farm.wait_for_count(
        "every builder to report its free disk",
        "SELECT count(*) FROM machines WHERE free_disk_bytes > 0 AND last_ping_at IS NOT NULL",
        3,
    )
    .await;

    let diamond = farm.get(diamond_build).await;
    assert_eq!(diamond.status(), BuildStatus::Succeeded);
    assert_eq!(diamond.outputs["out"], top.out.to_absolute());
    assert_eq!(diamond.metadata["origin"], "test");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_that_share_derivations_share_their_steps() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let shared_base = factory.make(&Spec::new("shared-base"));
    let shared_mid = factory.make(&Spec::new("shared-mid").inputs(&[&shared_base]));
    let first = factory.make(&Spec::new("first").inputs(&[&shared_mid]));
    let second = factory.make(&Spec::new("second").inputs(&[&shared_mid]));
    let one = farm.submit(&[&shared_base, &shared_mid, &first]).await;
    let two = farm.submit(&[&second]).await;
    // Both planned before anything is built: a shared step that had already succeeded when
    // the second build was planned would be done for it, not linked to it.
    farm.wait_for_count(
        "both builds to be planned",
        "SELECT count(*) FROM builds WHERE ingested_at IS NOT NULL",
        2,
    )
    .await;
    farm.start_builder(&BuilderSpec::new("b1"));
    assert_eq!(farm.wait_for_build(one).await, Stored::Succeeded);
    assert_eq!(farm.wait_for_build(two).await, Stored::Succeeded);

    assert_eq!(farm.count("SELECT count(*) FROM steps").await, 4);
    assert_eq!(farm.count("SELECT count(*) FROM step_attempts").await, 4);
    let shared: i64 = farm
        .db()
        .await
        .query_one(
            "SELECT count(*) FROM builds b, steps_of_build(b.id) bs
             JOIN steps s ON s.id = bs.step_id
             WHERE s.drv_path = ANY($1) GROUP BY s.id LIMIT 1",
            &[&vec![
                shared_base.path.to_absolute(),
                shared_mid.path.to_absolute(),
            ]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(shared, 2, "both builds must link the shared step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_queued_with_sql_while_the_runner_is_down_runs_when_it_starts() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    farm.stop_runner().await;

    let mut factory = Factory::default();
    let base = factory.make(&Spec::new("sql-base"));
    let top = factory.make(&Spec::new("sql-top").inputs(&[&base]));
    let db = farm.db().await;
    let text = |drv: &FakeDrv| (drv.path.to_absolute(), drv.text.clone());
    let (base_path, base_text) = text(&base);
    let (top_path, top_text) = text(&top);
    let queued_while_down =
        enqueue_with_sql(&db, &[(&base_path, &base_text), (&top_path, &top_text)]).await;

    farm.start_runner().await;
    farm.start_builder(&BuilderSpec::new("b1"));
    assert_eq!(
        farm.wait_for_build(queued_while_down).await,
        Stored::Succeeded
    );

    let later = factory.make(&Spec::new("sql-later").inputs(&[&top]));
    let (later_path, later_text) = text(&later);
    let queued_while_up = enqueue_with_sql(&db, &[(&later_path, &later_text)]).await;
    assert_eq!(
        farm.wait_for_build(queued_while_up).await,
        Stored::Succeeded
    );
    assert_eq!(farm.count("SELECT count(*) FROM step_attempts").await, 3);

    let forged = "/nix/store/00000000000000000000000000000000-forged.drv";
    let forged_build = enqueue_with_sql(&db, &[(forged, &top_text)]).await;
    assert_eq!(farm.wait_for_build(forged_build).await, Stored::Failed);
    let reason: String = db
        .query_one(
            "SELECT failure_reason FROM builds WHERE id = $1",
            &[&forged_build],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("hashes to"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_go_only_to_builders_that_can_run_them() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let builtin = factory.make(&Spec::new("fetch").system("builtin"));
    let kvm = factory.make(&Spec::new("vm-test").env("requiredSystemFeatures", "kvm"));
    let benchmark = factory.make(&Spec::new("bench").env("requiredSystemFeatures", "benchmark"));
    let i686 = factory.make(&Spec::new("i686").system("i686-linux"));
    let arm = factory.make(&Spec::new("arm").system("aarch64-linux"));
    let mut builds = Vec::new();
    for drv in [&builtin, &kvm, &benchmark, &i686, &arm] {
        builds.push(farm.submit(&[drv]).await);
    }
    farm.start_builder(&BuilderSpec {
        systems: &["x86_64-linux", "i686-linux"],
        features: &["kvm"],
        ..BuilderSpec::new("general")
    });
    farm.start_builder(&BuilderSpec {
        mandatory: &["benchmark"],
        ..BuilderSpec::new("dedicated")
    });
    for build in &builds[..4] {
        assert_eq!(farm.wait_for_build(*build).await, Stored::Succeeded);
    }
    let machines: BTreeMap<String, String> = farm
        .db()
        .await
        .query(
            "SELECT s.drv_path, a.machine FROM step_attempts a JOIN steps s ON s.id = a.step_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let machine = |drv: &FakeDrv| machines.get(&drv.path.to_absolute()).cloned();
    assert_eq!(machine(&builtin).as_deref(), Some("general"));
    assert_eq!(machine(&kvm).as_deref(), Some("general"));
    assert_eq!(machine(&i686).as_deref(), Some("general"));
    assert_eq!(machine(&benchmark).as_deref(), Some("dedicated"));
    assert_eq!(machine(&arm), None, "no builder offers aarch64-linux");
    let arm_status: String = farm
        .db()
        .await
        .query_one(
            "SELECT status::text FROM builds WHERE id = $1",
            &[&builds[4]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(build_status(&arm_status), Stored::Queued);
    let arm_step: String = farm
        .db()
        .await
        .query_one(
            "SELECT status::text FROM steps WHERE drv_path = $1",
            &[&arm.path.to_absolute()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(step_status(&arm_step), StepStatus::Runnable);
}

/// A step's status, failure reason and number of attempts.
async fn step_row(farm: &Farm, drv: &FakeDrv) -> (StepStatus, String, i64) {
    let row = farm
        .db()
        .await
        .query_one(
            "SELECT s.status::text, coalesce(s.failure_reason, ''),
                    (SELECT count(*) FROM step_attempts a WHERE a.step_id = s.id)
             FROM steps s WHERE drv_path = $1",
            &[&drv.path.to_absolute()],
        )
        .await
        .unwrap();
    (step_status(row.get(0)), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_dep_fails_dependents_cancels_what_only_they_needed_and_is_cached() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let broken =
        factory.make(&Spec::new("broken").env("DROVER_NOOP_FAIL", "boom: the build exploded"));
    let spared = factory.make(&Spec::new("spared"));
    let dependent = factory.make(&Spec::new("dependent").inputs(&[&broken, &spared]));
    let kept = factory.make(&Spec::new("kept"));
    let keeps_going = factory.make(&Spec::new("keeps-going").inputs(&[&broken, &kept]));
    let failed = farm.submit(&[&broken]).await;
    let dep_failed = farm.submit(&[&broken, &spared, &dependent]).await;
    let mut request = Farm::request(&[&broken, &kept, &keeps_going]);
    request.keep_going = true;
    let kept_going = farm.submit_request(request).await;
    // Every build is planned before anything runs, so the failure propagates through the
    // graph. One slot: broken (the oldest step) runs first.
    farm.wait_for_count(
        "the builds to be ingested",
        "SELECT count(*) FROM builds WHERE ingested_at IS NOT NULL",
        3,
    )
    .await;
    farm.start_builder(&BuilderSpec {
        max_jobs: 1,
        ..BuilderSpec::new("b1")
    });

    assert_eq!(farm.wait_for_build(failed).await, Stored::Failed);
    assert_eq!(farm.wait_for_build(dep_failed).await, Stored::DepFailed);
    assert_eq!(farm.wait_for_build(kept_going).await, Stored::DepFailed);
    assert_eq!(step_row(&farm, &broken).await.0, StepStatus::Failed);
    assert_eq!(step_row(&farm, &dependent).await.0, StepStatus::DepFailed);
    let (status, reason, attempts) = step_row(&farm, &spared).await;
    assert_eq!(
        (status, attempts),
        (StepStatus::Cancelled, 0),
        "only a failed build needed it: {reason}"
    );
    assert!(reason.contains("no build needs it any more"), "{reason}");
    let kept_status =
        test_support::poll_until(common::DEADLINE, "the kept step to end", || async {
            let (status, _, _) = step_row(&farm, &kept).await;
            status.is_terminal().then_some(status)
        })
        .await;
    assert_eq!(
        kept_status,
        StepStatus::Succeeded,
        "a keep-going build builds what it can"
    );

    let response = farm.get(dep_failed).await;
    assert_eq!(response.status(), BuildStatus::DepFailed);
    assert!(
        response.failure_reason.contains("dependency failed"),
        "{}",
        response.failure_reason
    );
    let log = farm
        .client()
        .await
        .get_log(GetLogRequest {
            drv_path: broken.path.to_absolute(),
        })
        .await
        .unwrap()
        .into_inner()
        .log;
    let log = String::from_utf8(log).unwrap();
    assert!(log.contains("boom: the build exploded"), "{log}");

    let again = farm.submit(&[&broken, &spared, &dependent]).await;
    assert_eq!(farm.wait_for_build(again).await, Stored::CachedFailure);
    let response = farm.get(again).await;
    assert_eq!(response.status(), BuildStatus::CachedFailure);
    assert!(
        response.failure_reason.contains(&format!(
            "{} failed in build {failed}: ",
            broken.path.to_absolute()
        )) && response.failure_reason.contains("DROVER_NOOP_FAIL"),
        "names the original build and reason: {}",
        response.failure_reason
    );
    assert_eq!(
        farm.count("SELECT count(*) FROM step_attempts").await,
        2,
        "broken and kept ran once each; nothing ran for the cached failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_killed_mid_step_has_the_step_requeued_without_burning_a_retry() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let slow = factory.make(&Spec::new("slow"));
    let build = farm.submit(&[&slow]).await;
    let doomed = farm.start_builder(&BuilderSpec {
        build_ms: 600_000,
        ..BuilderSpec::new("doomed")
    });
    let db = farm.db().await;
    test_support::poll_until(
        common::DEADLINE,
        "the step to start on the doomed builder",
        || async {
            let running: i64 = db
                .query_one(
                    "SELECT count(*) FROM step_attempts WHERE status = 'running'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (running == 1).then_some(())
        },
    )
    .await;
    farm.kill_builder(doomed);
    farm.start_builder(&BuilderSpec::new("survivor"));
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);

    let attempts: Vec<(String, AttemptStatus)> = farm
        .attempts()
        .await
        .into_iter()
        .map(|(builder, status, _)| (builder, status))
        .collect();
    assert_eq!(
        attempts,
        [
            ("doomed".to_owned(), AttemptStatus::BuilderLost),
            ("survivor".to_owned(), AttemptStatus::Succeeded)
        ]
    );
    let (losses, infrastructure): (i32, i32) = {
        let row = db
            .query_one(
                "SELECT builder_losses, infrastructure_failures FROM steps",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!((losses, infrastructure), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_runner_recovers_its_queue_and_takes_back_what_builders_ran_meanwhile() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let first = factory.make(&Spec::new("before-restart"));
    let second = factory.make(&Spec::new("across-restart").inputs(&[&first]));
    let build = farm.submit(&[&first, &second]).await;
    farm.start_builder(&BuilderSpec {
        build_ms: 1500,
        ..BuilderSpec::new("steady")
    });
    let db = farm.db().await;
    let second_path = second.path.to_absolute();
    test_support::poll_until(common::DEADLINE, "the second step to start", || async {
        let running: i64 = db
            .query_one(
                "SELECT count(*) FROM running_steps WHERE drv_path = $1",
                &[&second_path],
            )
            .await
            .unwrap()
            .get(0);
        (running == 1).then_some(())
    })
    .await;

    farm.stop_runner().await;
    farm.start_runner().await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let attempts: Vec<AttemptStatus> = db
        .query(
            "SELECT a.status::text FROM step_attempts a JOIN steps s ON s.id = a.step_id
             WHERE s.drv_path = $1 ORDER BY a.started_at",
            &[&second_path],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| attempt_status(row.get(0)))
        .collect();
    assert_eq!(
        attempts,
        [AttemptStatus::Succeeded],
        "the builder went on building across the restart, and the runner took the attempt back"
    );
    assert_eq!(
        farm.count("SELECT count(*) FROM steps WHERE status = 'running'")
            .await,
        0
    );
    let first_attempts: i64 = db
        .query_one(
            "SELECT count(*) FROM step_attempts WHERE status = 'succeeded'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(first_attempts, 2, "the finished step was not run again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_builder_loses_its_step_to_another_and_its_late_result_changes_nothing() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let drv = factory.make(&Spec::new("frozen"));
    let frozen = farm.start_builder(&BuilderSpec {
        build_ms: 1500,
        ..BuilderSpec::new("frozen")
    });
    let build = farm.submit(&[&drv]).await;
    farm.wait_for_count(
        "the step to run on the builder about to freeze",
        "SELECT count(*) FROM step_attempts WHERE status = 'running'",
        1,
    )
    .await;
    farm.signal_builder(frozen, "STOP");
    farm.start_builder(&BuilderSpec::new("thawed"));
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    farm.signal_builder(frozen, "CONT");
    farm.wait_for_count(
        "the frozen builder to rejoin",
        "SELECT count(*) FROM machines WHERE connected",
        2,
    )
    .await;
    let attempts: Vec<(String, AttemptStatus)> = farm
        .attempts()
        .await
        .into_iter()
        .map(|(builder, status, _)| (builder, status))
        .collect();
    assert_eq!(
        attempts,
        [
            ("frozen".to_owned(), AttemptStatus::BuilderLost),
            ("thawed".to_owned(), AttemptStatus::Succeeded)
        ]
    );
    assert_eq!(
        farm.count("SELECT builder_losses::bigint FROM steps").await,
        1,
        "a loss, not a failure"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_its_builder_never_claims_after_a_runner_restart_is_requeued_after_the_grace() {
    let mut farm = Farm::new().await;
    farm.readoption_grace_secs = 1;
    farm.start_runner().await;
    let drv = Factory::default().make(&Spec::new("unclaimed"));
    let gone = farm.start_builder(&BuilderSpec {
        build_ms: 60_000,
        ..BuilderSpec::new("gone")
    });
    let build = farm.submit(&[&drv]).await;
    farm.wait_for_count(
        "the step to run",
        "SELECT count(*) FROM step_attempts WHERE status = 'running'",
        1,
    )
    .await;
    farm.stop_runner().await;
    farm.kill_builder(gone);
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec::new("stays"));
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    let attempts = farm.attempts().await;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(
        (attempts[0].0.as_str(), attempts[0].1),
        ("gone", AttemptStatus::BuilderLost)
    );
    assert!(attempts[0].2.contains("did not claim"), "{attempts:?}");
    assert_eq!(
        (attempts[1].0.as_str(), attempts[1].1),
        ("stays", AttemptStatus::Succeeded)
    );
    assert_eq!(
        farm.count("SELECT count(*) FROM steps WHERE status = 'running'")
            .await,
        0
    );
}
