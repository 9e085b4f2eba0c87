//! The two baselines every throughput figure is a ratio against, measured on the same durable
//! PostgreSQL as the farm, each on a fresh database, writing the same rows with the runner's own
//! statements ([`Transitions`]):
//! - the serial dispatcher, as Hydra's runner works: one step at a time, record the dispatch
//!   (one transaction), hand it to a builder and await its result (an in-process round trip,
//!   cheaper than any network), record the result (another transaction);
//! - the batched floor: the same rows in batches of one dispatch round and one completion round
//!   per `batch` steps, with no network and no scheduling at all.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use drover_queue_runner::db::status::{AttemptStatus, StepStatus};
use drover_queue_runner::db::transitions::Transitions;
use drover_queue_runner::db::{self, queries};
use drover_scheduler::{Capabilities, Change, OutputRecord};
use test_support::TestPostgres;
use test_support::fake_derivations::FakeDrv;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Steps, their outputs, and a pool on a database holding them, queued and ingested.
struct Prepared {
    pool: db::Pool,
    steps: Vec<(i64, String)>,
}

async fn prepare(cluster: &TestPostgres, drvs: &[FakeDrv]) -> Prepared {
    let database = cluster.create_database().await;
    let pool = db::Connector::new(&db::DatabaseConfig::plain(&database.connection_string))
        .unwrap()
        .pool(2)
        .unwrap();
    db::migrate(&pool).await.unwrap();
    let mut client = pool.get().await.unwrap();
    let texts: Vec<(String, Vec<u8>)> = drvs
        .iter()
        .map(|drv| (drv.path.to_absolute(), drv.text.clone()))
        .collect();
    let top = texts.last().unwrap().0.clone();
    let build = queries::insert_build(
        &client,
        &texts,
        &queries::NewBuild {
            top: &top,
            priority: 0,
            metadata: &serde_json::json!({}),
            submitted_by: "client/bench",
            keep_going: false,
            idempotency_key: None,
            trace_parent: "",
        },
    )
    .await
    .unwrap()
    .0;
    let specs: Vec<queries::StepSpec> = drvs
        .iter()
        .map(|drv| queries::StepSpec {
            drv_path: drv.path.to_absolute(),
            system: "x86_64-linux".to_owned(),
            features: String::new(),
            trace_parent: String::new(),
        })
        .collect();
    let rows = queries::ensure_steps(&client, &specs).await.unwrap();
    queries::record_ingested_builds(&client, &[build], &[], &[], &[])
        .await
        .unwrap();
    let mut join = Transitions::default();
    join.add(Change::MachineJoined {
        name: "baseline".to_owned(),
        capabilities: Capabilities {
            systems: BTreeSet::from(["x86_64-linux".to_owned()]),
            supported_features: BTreeSet::new(),
            mandatory_features: BTreeSet::new(),
            max_jobs: 1,
            speed_factor: 1.0,
        },
        nix_version: String::new(),
    });
    join.write(&mut client).await.unwrap();
    let by_path: std::collections::HashMap<&str, i64> = rows
        .iter()
        .map(|row| (row.drv_path.as_str(), row.id))
        .collect();
    let steps = drvs
        .iter()
        .map(|drv| {
            (
                by_path[drv.path.to_absolute().as_str()],
                drv.out.to_absolute(),
            )
        })
        .collect();
    Prepared { pool, steps }
}

fn dispatched(transitions: &mut Transitions, attempt: Uuid, step: i64) {
    transitions.add(Change::AttemptStarted {
        attempt,
        step,
        builder: "baseline".to_owned(),
    });
}

fn succeeded(transitions: &mut Transitions, attempt: Uuid, step: i64, out: &str) {
    transitions.add(Change::AttemptEnded {
        attempt,
        status: AttemptStatus::Succeeded,
        message: None,
    });
    transitions.add(Change::Outputs {
        step,
        outputs: vec![OutputRecord {
            name: "out".to_owned(),
            path: out.to_owned(),
            nar_hash: "sha256:0000000000000000000000000000000000000000000000000000".to_owned(),
            nar_size: 120,
        }],
    });
    transitions.add(Change::StepStatus {
        step,
        status: StepStatus::Succeeded,
        reason: None,
    });
}

/// One step at a time, two transactions and a round trip each; returns the time taken.
pub async fn serial(cluster: &TestPostgres, drvs: &[FakeDrv]) -> Duration {
    let prepared = prepare(cluster, drvs).await;
    let mut client = prepared.pool.get().await.unwrap();
    let (to_builder, mut builder) = mpsc::channel::<(Uuid, oneshot::Sender<Uuid>)>(1);
    tokio::spawn(async move {
        while let Some((attempt, reply)) = builder.recv().await {
            let _ = reply.send(attempt);
        }
    });
    let start = Instant::now();
    for (step, out) in &prepared.steps {
        let attempt = Uuid::new_v4();
        let mut dispatch = Transitions::default();
        dispatched(&mut dispatch, attempt, *step);
        dispatch.write(&mut client).await.unwrap();
        let (reply, result) = oneshot::channel();
        to_builder.send((attempt, reply)).await.unwrap();
        let attempt = result.await.unwrap();
        let mut finish = Transitions::default();
        succeeded(&mut finish, attempt, *step, out);
        finish.write(&mut client).await.unwrap();
    }
    start.elapsed()
}

/// The same rows, `batch` steps per dispatch transaction and per completion transaction.
pub async fn batched_floor(cluster: &TestPostgres, drvs: &[FakeDrv], batch: usize) -> Duration {
    let prepared = prepare(cluster, drvs).await;
    let mut client = prepared.pool.get().await.unwrap();
    let start = Instant::now();
    for chunk in prepared.steps.chunks(batch) {
        let attempts: Vec<Uuid> = chunk.iter().map(|_| Uuid::new_v4()).collect();
        let mut dispatch = Transitions::default();
        for ((step, _), attempt) in chunk.iter().zip(&attempts) {
            dispatched(&mut dispatch, *attempt, *step);
        }
        dispatch.write(&mut client).await.unwrap();
        let mut finish = Transitions::default();
        for ((step, out), attempt) in chunk.iter().zip(&attempts) {
            succeeded(&mut finish, *attempt, *step, out);
        }
        finish.write(&mut client).await.unwrap();
    }
    start.elapsed()
}
