//! The scheduler's database layer against a real PostgreSQL: the Rust status enums against the
//! SQL ones, a batch of core decisions written as one transaction, and what real failures mean
//! (a serialization conflict is retried, a lost server is fatal).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic in a test is a failed assertion"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use drover_queue_runner::db::status::{AttemptStatus, BuildStatus, SqlEnum as _, StepStatus};
use drover_queue_runner::db::transitions::Transitions;
use drover_queue_runner::db::{self, DbError, queries};
use drover_scheduler::{
    BuildPlan, Capabilities, Command, Core, CoreLimits, Event, Outcome, OutputRecord, PlannedBuild,
    PlannedStep, Report, Requirements, RetryPolicy, StepSpec, ToBuilder,
};
use error_context::{Classify, Severity};
use test_support::TestPostgres;
use test_support::fake_derivations::{Factory, FakeDrv, Spec};

async fn labels(client: &tokio_postgres::Client, sql_type: &str) -> Vec<String> {
    client
        .query_one(&format!("SELECT enum_range(NULL::{sql_type})::text[]"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn the_status_enums_are_the_databases() {
    let (_database, pool) = common::migrated_database().await;
    let client = pool.get().await.unwrap();
    let rust = |all: Vec<&'static str>| all.into_iter().map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(
        labels(&client, BuildStatus::SQL_TYPE).await,
        rust(BuildStatus::ALL.iter().map(|s| s.as_str()).collect())
    );
    assert_eq!(
        labels(&client, StepStatus::SQL_TYPE).await,
        rust(StepStatus::ALL.iter().map(|s| s.as_str()).collect())
    );
    assert_eq!(
        labels(&client, AttemptStatus::SQL_TYPE).await,
        rust(AttemptStatus::ALL.iter().map(|s| s.as_str()).collect())
    );
    for status in StepStatus::ALL {
        assert_eq!(StepStatus::from_label(status.as_str()), Some(*status));
    }
    assert_eq!(StepStatus::from_label("exploded"), None);
}

fn commands_changes(commands: Vec<Command>, transitions: &mut Transitions) -> Vec<ToBuilder> {
    let mut sent = Vec::new();
    for command in commands {
        match command {
            Command::Persist(change) => transitions.add(change),
            Command::Send { message, .. } => sent.push(message),
            Command::EndSession { .. } | Command::Adopt { .. } => {}
        }
    }
    sent
}

/// Queues a build of one fresh derivation, ingested as the ingest task would.
async fn queue_one_step(client: &deadpool_postgres::Client) -> (FakeDrv, i64, queries::StepRow) {
    let drv = Factory::default().make(&Spec::new("batched"));
    let texts = vec![(drv.path.to_absolute(), drv.text.clone())];
    let build = queries::insert_build(
        client,
        &texts,
        &queries::NewBuild {
            top: &texts[0].0,
            priority: 0,
            metadata: &serde_json::json!({}),
            submitted_by: "client/test",
            keep_going: false,
            idempotency_key: None,
            trace_parent: "",
        },
    )
    .await
    .unwrap()
    .0;
    let mut rows = queries::ensure_steps(
        client,
        &[queries::StepSpec {
            drv_path: drv.path.to_absolute(),
            system: "x86_64-linux".to_owned(),
            features: String::new(),
            trace_parent: String::new(),
        }],
    )
    .await
    .unwrap();
    let row = rows.remove(0);
    queries::record_ingested_builds(client, &[build], &[], &[], &[])
        .await
        .unwrap();
    (drv, build, row)
}

/// Five attempts retried at once, a long wait for builders: this test needs no clock.
const LIMITS: CoreLimits = CoreLimits {
    max_builder_losses: 5,
    retry: RetryPolicy {
        max_attempts: 5,
        initial: std::time::Duration::ZERO,
        multiplier: 1.0,
        max: std::time::Duration::ZERO,
    },
    unsupported_grace: std::time::Duration::from_mins(15),
    readoption_grace: std::time::Duration::from_mins(2),
    rejoin_grace: std::time::Duration::from_secs(10),
    learned_durations: true,
    quarantine: drover_scheduler::fleet::QuarantinePolicy {
        after_failures: 3,
        cool_down: std::time::Duration::from_mins(10),
    },
    min_free_disk_bytes: 0,
    max_memory_pressure_percent: 0.0,
};

#[tokio::test]
async fn one_batch_records_a_join_a_dispatch_and_a_success_in_one_transaction() {
    let (_database, pool) = common::migrated_database().await;
    let mut client = pool.get().await.unwrap();
    let (drv, build, row) = queue_one_step(&client).await;
    let step = row.id;
    let mut core = Core::new(LIMITS, Box::new(uuid::Uuid::new_v4));
    let mut batch = Transitions::default();
    let capabilities = Capabilities {
        systems: BTreeSet::from(["x86_64-linux".to_owned()]),
        supported_features: BTreeSet::new(),
        mandatory_features: BTreeSet::new(),
        max_jobs: 1,
        speed_factor: 1.0,
    };
    let spec = Arc::new(StepSpec {
        drv_path: drv.path.clone(),
        outputs: BTreeMap::from([("out".to_owned(), drv.out.clone())]),
        requirements: Requirements {
            system: "x86_64-linux".to_owned(),
            features: BTreeSet::new(),
        },
        input_paths: BTreeSet::new(),
        fixed: None,
    });
    let mut commands = core.handle(Event::BuilderJoined {
        name: "b1".to_owned(),
        session: 1,
        capabilities,
        nix_version: "2.8".to_owned(),
        held: Vec::new(),
    });
    commands.extend(core.handle(Event::BuildPlanned(BuildPlan {
        builds: vec![PlannedBuild {
            build,
            priority: 0,
            global_priority: 0,
            top: step,
            keep_going: false,
        }],
        steps: vec![PlannedStep {
            id: step,
            spec,
            inputs: Vec::new(),
            recorded_status: row.status,
            builder_losses: 0,
            infrastructure_failures: 0,
            visible_in: None,
        }],
        available: Vec::new(),
        snapshot: 0,
    })));
    let dispatched = Instant::now();
    commands.extend(core.dispatch(dispatched));
    let sent = commands_changes(commands, &mut batch);
    let Some(assignment) = sent.iter().find_map(|message| match message {
        ToBuilder::Build(assignment) => Some(assignment),
        _ => None,
    }) else {
        panic!("the step was not dispatched: {sent:?}");
    };
    let attempt = assignment.attempt;
    let finished = core.handle(Event::StepFinished {
        session: 1,
        attempt,
        report: Report {
            outcome: Outcome::Succeeded,
            message: String::new(),
            outputs: vec![OutputRecord {
                name: "out".to_owned(),
                path: drv.out.to_absolute(),
                nar_hash: "sha256:0000000000000000000000000000000000000000000000000000".to_owned(),
                nar_size: 120,
            }],
        },
        at: dispatched + std::time::Duration::from_secs(3),
    });
    let acknowledged = commands_changes(finished, &mut batch);
    assert_eq!(acknowledged, vec![ToBuilder::ResultRecorded { attempt }]);
    batch.write(&mut client).await.unwrap();

    assert_recorded(&client, step, build, attempt).await;
    let learned = client
        .query_one("SELECT system, samples, mean_ms FROM step_durations", &[])
        .await
        .unwrap();
    assert_eq!(
        (
            learned.get::<_, String>(0),
            learned.get::<_, i32>(1),
            learned.get::<_, i64>(2)
        ),
        ("x86_64-linux".to_owned(), 1, 3_000),
        "the success taught its package's duration"
    );
}

/// Asserts that the step, its build and its attempt are recorded as succeeded, with the output
/// and the builder.
async fn assert_recorded(
    client: &tokio_postgres::Client,
    step: i64,
    build: i64,
    attempt: uuid::Uuid,
) {
    let row = client
        .query_one(
            "SELECT s.status::text, s.finished_at IS NOT NULL, s.started_at IS NOT NULL,
                    b.status::text, b.finished_at IS NOT NULL,
                    a.status::text, a.machine, a.finished_at IS NOT NULL,
                    (SELECT nar_size FROM step_outputs WHERE step_id = s.id),
                    (SELECT connected FROM machines WHERE name = 'b1')
             FROM steps s, builds b, step_attempts a
             WHERE s.id = $1 AND b.id = $2 AND a.id = $3",
            &[&step, &build, &attempt],
        )
        .await
        .unwrap();
    let statuses = (
        StepStatus::from_label(row.get(0)),
        BuildStatus::from_label(row.get(3)),
        AttemptStatus::from_label(row.get(5)),
    );
    let succeeded = (
        StepStatus::Succeeded,
        BuildStatus::Succeeded,
        AttemptStatus::Succeeded,
    );
    assert_eq!(
        statuses,
        (Some(succeeded.0), Some(succeeded.1), Some(succeeded.2))
    );
    assert!(row.get::<_, bool>(1) && row.get::<_, bool>(2) && row.get::<_, bool>(4));
    assert_eq!(row.get::<_, String>(6), "b1");
    assert!(row.get::<_, bool>(7));
    assert_eq!(row.get::<_, i64>(8), 120);
    assert!(row.get::<_, bool>(9));
}

#[tokio::test]
async fn a_serialization_conflict_is_retried_and_a_lost_server_is_fatal() {
    let cluster = TestPostgres::start();
    let database = cluster.create_database().await;
    let first = database.connect().await;
    let second = database.connect().await;
    first
        .batch_execute("CREATE TABLE counter (n int); INSERT INTO counter VALUES (0);")
        .await
        .unwrap();
    for client in [&first, &second] {
        client
            .batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT n FROM counter;")
            .await
            .unwrap();
    }
    first
        .batch_execute("UPDATE counter SET n = n + 1; COMMIT;")
        .await
        .unwrap();
    let conflict = second
        .execute("UPDATE counter SET n = n + 1", &[])
        .await
        .map_err(DbError::query("incrementing"))
        .unwrap_err();
    assert_eq!(conflict.severity(), Severity::Step, "{conflict:?}");

    let pool = db::Connector::new(&db::DatabaseConfig::plain(&database.connection_string))
        .unwrap()
        .pool(1)
        .unwrap();
    let client = pool.get().await.unwrap();
    cluster.kill();
    let lost = client
        .execute("SELECT 1", &[])
        .await
        .map_err(DbError::query("selecting"))
        .unwrap_err();
    assert_eq!(lost.severity(), Severity::Fatal, "{lost:?}");
    drop(client);
    let unreachable = pool.get().await.map_err(DbError::Connection).unwrap_err();
    assert_eq!(unreachable.severity(), Severity::Fatal);
}
