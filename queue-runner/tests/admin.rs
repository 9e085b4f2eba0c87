//! `drover admin` against a real farm: a drained builder finishes its step and gets nothing
//! new, across a restart of the runner and of the builder, until enabled; a builder failing in a row is quarantined with
//! its reason and an admin lifts it; a build's global priority moves it ahead of an older one;
//! a client certificate may not steer; a builder below the free disk floor gets no work until
//! it has room.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use common::nix_farm::http_request;
use common::{BuilderSpec, DEADLINE, Farm, Stored};
use drover_tls::Role;
use test_support::fake_derivations::{Factory, Spec};
use test_support::wait::poll_until;

/// Runs `drover admin ARGS` as an admin; fails unless it succeeds; returns what it printed on
/// stdout and stderr.
async fn admin(farm: &Farm, args: &[&str]) -> (String, String) {
    let mut full = vec!["admin"];
    full.extend_from_slice(args);
    let output = farm.run_drover_as(Role::Admin, &full).await;
    let (stdout, stderr) = (
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    );
    assert!(
        output.status.success(),
        "drover admin {args:?}: {stdout}{stderr}"
    );
    (stdout, stderr)
}

/// The state `drover admin machines --json` shows for `name`.
async fn state_of(farm: &Farm, name: &str) -> serde_json::Value {
    let (stdout, _) = admin(farm, &["machines", "--json"]).await;
    let machines: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    machines
        .into_iter()
        .find(|machine| machine["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not listed: {stdout}"))
}

/// Runnable steps the runner's metrics say wait for `reason`.
async fn waiting_for(farm: &Farm, reason: &str) -> u64 {
    let (_, body) = http_request(farm.metrics_address(), "/metrics").await;
    let label = format!("reason=\"{reason}\"");
    String::from_utf8(body)
        .unwrap()
        .lines()
        .filter(|line| line.starts_with("drover_runnable_steps_without_capacity{"))
        .filter(|line| line.contains(&label))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

async fn wait_connected(farm: &Farm, builders: i64) {
    farm.wait_for_count(
        "the builders to be connected",
        "SELECT count(*) FROM machines WHERE connected",
        builders,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_builder_finishes_its_step_and_gets_nothing_new_across_restarts_until_enabled() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec::new("b1"));
    wait_connected(&farm, 1).await;
    let mut factory = Factory::default();
    let slow = factory.make(&Spec::new("slow").env("DROVER_NOOP_SLEEP_MS", "1500"));
    let top = factory.make(&Spec::new("top").inputs(&[&slow]));
    let build = farm.submit(&[&slow, &top]).await;
    farm.wait_for_count(
        "the slow step to run",
        "SELECT count(*) FROM step_attempts WHERE status = 'running'",
        1,
    )
    .await;

    let (_, said) = admin(&farm, &["drain", "b1"]).await;
    assert_eq!(said.trim(), "b1 drained: now drained");
    farm.wait_for_count(
        "the slow step to finish on the drained builder",
        "SELECT count(*) FROM steps WHERE status = 'succeeded'",
        1,
    )
    .await;
    assert_eq!(
        waiting_for(&farm, "drained").await,
        1,
        "the top step waits for the drained builder"
    );
    let listed = state_of(&farm, "b1").await;
    assert_eq!(listed["state"], "drained");
    assert_ne!(listed["drained_at_ms"], 0);
    let waiting = farm.get(build).await;
    let top_step = waiting
        .steps
        .iter()
        .find(|step| step.drv_path.ends_with("-top.drv"))
        .unwrap();
    assert_eq!(
        top_step.waiting_reason,
        "every connected builder that can run it is drained, quarantined, low on disk or under \
         memory pressure (drover admin machines says which)"
    );

    // A restarted runner still keeps it drained once it is back.
    farm.stop_runner().await;
    farm.start_runner().await;
    poll_until(DEADLINE, "the builder to rejoin, drained", || async {
        (waiting_for(&farm, "drained").await == 1).then_some(())
    })
    .await;
    // And so does a restarted builder.
    farm.terminate_builder(0);
    farm.wait_builder_exit(0, DEADLINE).await;
    farm.start_builder(&BuilderSpec::new("b1"));
    poll_until(DEADLINE, "the builder to rejoin, drained", || async {
        let rejoined = state_of(&farm, "b1").await["state"] == "drained";
        (rejoined && waiting_for(&farm, "drained").await == 1).then_some(())
    })
    .await;
    assert_eq!(farm.count("SELECT count(*) FROM step_attempts").await, 1);

    let (_, said) = admin(&farm, &["enable", "b1"]).await;
    assert!(said.starts_with("b1 enabled: now "), "{said}");
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    assert_eq!(state_of(&farm, "b1").await["drained_at_ms"], 0);

    // Only admins steer, and only known builders.
    let refused = farm.run_drover(&["admin", "drain", "b1"]).await;
    assert_eq!(refused.status.code(), Some(64));
    let said = String::from_utf8(refused.stderr).unwrap();
    assert!(
        said.contains("this command needs a certificate with role admin"),
        "{said}"
    );
    let unknown = farm
        .run_drover_as(Role::Admin, &["admin", "drain", "nobody"])
        .await;
    assert_eq!(unknown.status.code(), Some(64));
    let stderr = String::from_utf8(unknown.stderr).unwrap();
    assert!(
        stderr.contains("no builder named \"nobody\" has ever joined"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_failing_in_a_row_is_quarantined_with_its_reason_until_an_admin_lifts_it() {
    let mut farm = Farm::new().await;
    farm.quarantine_after_failures = 3;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec {
        max_jobs: 1,
        ..BuilderSpec::new("flaky")
    });
    wait_connected(&farm, 1).await;
    let mut factory = Factory::default();
    // Every attempt of this step panics on the builder: an infrastructure failure. The farm
    // retries four times; the third failure in a row quarantines the builder.
    let doomed = factory.make(&Spec::new("doomed").env("DROVER_NOOP_PANIC", "1"));
    let fine = factory.make(&Spec::new("fine"));
    let doomed_build = farm.submit(&[&doomed]).await;
    farm.wait_for_count(
        "the builder to be quarantined",
        "SELECT count(*) FROM machines WHERE quarantined_at IS NOT NULL",
        1,
    )
    .await;
    let fine_build = farm.submit(&[&fine]).await;
    farm.wait_for_count(
        "the fine build to be planned",
        "SELECT count(*) FROM steps WHERE status = 'runnable'",
        2,
    )
    .await;
    // The doomed step joins the line once its retry's backoff ends.
    poll_until(
        DEADLINE,
        "both steps to wait for the quarantine",
        || async { (waiting_for(&farm, "quarantined").await == 2).then_some(()) },
    )
    .await;
    let (table, _) = admin(&farm, &["machines"]).await;
    assert!(table.contains("quarantined"), "{table}");
    assert!(
        table.contains("3 infrastructure failures in a row; the last: "),
        "{table}"
    );
    assert_eq!(
        farm.count("SELECT count(*) FROM step_attempts").await,
        3,
        "nothing ran during the cool-down"
    );

    let (_, said) = admin(&farm, &["lift", "flaky"]).await;
    assert!(said.starts_with("flaky out of quarantine: now "), "{said}");
    assert_eq!(farm.wait_for_build(fine_build).await, Stored::Succeeded);
    assert_eq!(farm.wait_for_build(doomed_build).await, Stored::Failed);
    let listed = state_of(&farm, "flaky").await;
    assert_eq!(
        listed["quarantine_reason"], "",
        "one failure after the lift does not quarantine it again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_global_priority_moves_a_queued_build_ahead_of_an_older_one() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec {
        max_jobs: 1,
        ..BuilderSpec::new("b1")
    });
    wait_connected(&farm, 1).await;
    admin(&farm, &["drain", "b1"]).await;
    let mut factory = Factory::default();
    let older = farm.submit(&[&factory.make(&Spec::new("older"))]).await;
    let newer = farm.submit(&[&factory.make(&Spec::new("newer"))]).await;
    farm.wait_for_count(
        "both builds to be planned",
        "SELECT count(*) FROM steps WHERE status = 'runnable'",
        2,
    )
    .await;

    admin(&farm, &["priority", &newer.to_string(), "10"]).await;
    admin(&farm, &["enable", "b1"]).await;
    assert_eq!(farm.wait_for_build(older).await, Stored::Succeeded);
    assert_eq!(farm.wait_for_build(newer).await, Stored::Succeeded);
    let db = farm.db().await;
    let first: String = db
        .query_one(
            "SELECT s.drv_path FROM step_attempts a JOIN steps s ON s.id = a.step_id
             ORDER BY a.started_at LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(first.ends_with("-newer.drv"), "{first} ran first");
    let global: i32 = db
        .query_one(
            "SELECT global_priority FROM builds WHERE id = $1",
            &[&newer],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(global, 10);

    // An ended build has no place in line.
    let ended = farm
        .run_drover_as(Role::Admin, &["admin", "priority", &older.to_string(), "5"])
        .await;
    assert_eq!(ended.status.code(), Some(65), "{ended:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_builder_below_the_free_disk_floor_gets_no_work_until_it_is_above_it() {
    let mut farm = Farm::new().await;
    // A floor above any disk: the builder's real free space is below it.
    farm.min_free_disk_bytes = i64::MAX;
    farm.start_runner().await;
    farm.start_builder(&BuilderSpec::new("b1"));
    wait_connected(&farm, 1).await;
    let mut factory = Factory::default();
    let build = farm.submit(&[&factory.make(&Spec::new("big"))]).await;
    poll_until(DEADLINE, "the step to wait for disk space", || async {
        (waiting_for(&farm, "low_disk").await == 1).then_some(())
    })
    .await;
    let listed = state_of(&farm, "b1").await;
    assert_eq!(listed["state"], "low_disk");
    assert!(
        listed["free_disk_bytes"]
            .as_u64()
            .is_some_and(|free| free > 0)
    );
    let step = &farm.get(build).await.steps[0];
    assert!(
        step.waiting_reason.contains("low on disk"),
        "{}",
        step.waiting_reason
    );
    assert_eq!(farm.count("SELECT count(*) FROM step_attempts").await, 0);

    // With a floor the disk clears, the builder's next ping brings it work.
    farm.stop_runner().await;
    farm.min_free_disk_bytes = 1 << 20;
    farm.start_runner().await;
    assert_eq!(farm.wait_for_build(build).await, Stored::Succeeded);
    assert_eq!(state_of(&farm, "b1").await["state"], "idle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_cap_set_through_the_cli_refuses_a_submission_past_it() {
    let mut farm = Farm::new().await;
    farm.start_runner().await;
    let mut factory = Factory::default();
    let base = factory.make(&Spec::new("base"));
    let top = factory.make(&Spec::new("top").inputs(&[&base]));
    // No builder: the two steps stay queued.
    farm.submit(&[&base, &top]).await;
    farm.wait_for_count(
        "the build to be planned",
        "SELECT count(*) FROM steps WHERE status IN ('waiting', 'runnable')",
        2,
    )
    .await;
    let (_, said) = admin(&farm, &["cap", "2"]).await;
    assert_eq!(
        said.trim(),
        "admission cap 2 steps (was 100000); 2 steps are queued now"
    );
    let other = factory.make(&Spec::new("other"));
    let refused = farm
        .client()
        .await
        .submit(Farm::request(&[&other]))
        .await
        .expect_err("a third step past a cap of two");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.message().contains("the cap is 2"), "{refused:?}");
    admin(&farm, &["cap", "3"]).await;
    farm.submit(&[&other]).await;
}
