//! Control-plane throughput: a random DAG of noop steps through the whole farm (PostgreSQL,
//! ingest and verification, the scheduler, mTLS gRPC tunnels, log and NAR uploads into the
//! signed cache) with in-process builders, against the database floor measured in the same run:
//! the two statements per step the scheduler cannot avoid (record the dispatch, record the
//! success), executed back to back on the same PostgreSQL.
//!
//! Usage: `cargo run --release -p drover-bench --bin dispatch -- [STEPS] [BUILDERS] [JOBS]`
//! (defaults 2000 steps, 4 builders, 8 jobs each).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    reason = "a benchmark harness: any failure aborts the measurement"
)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use drover_proto::v1::build_service_client::BuildServiceClient;
use drover_proto::v1::{DerivationText, SubmitRequest};
use drover_queue_runner::db::{self, queries};
use drover_tls::{CertificateAuthority, Identity, Role};
use nix_primitives::SecretKey;
use test_support::TestPostgres;
use test_support::fake_derivations::{Factory, FakeDrv};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let steps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let builders: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let jobs: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);

    let cluster = TestPostgres::start();
    let dag = Factory::default().random_dag("bench", steps, 11);
    let farm = cluster.create_database().await;
    let floor = cluster.create_database().await;

    let drover = through_the_farm(&farm.connection_string, &dag, builders, jobs).await;
    let database_floor = database_floor(&floor.connection_string, &dag).await;
    let total = dag.len();
    let per_second =
        |time: Duration| f64::from(u32::try_from(total).unwrap_or(u32::MAX)) / time.as_secs_f64();
    println!("{total} steps (random DAG, noop builds), {builders} builders x {jobs} jobs");
    println!(
        "drover end to end (submit to build succeeded): {:>8.1} ms  {:>7.0} steps/s",
        drover.as_secs_f64() * 1000.0,
        per_second(drover)
    );
    println!(
        "database floor (dispatch + success statements): {:>7.1} ms  {:>7.0} steps/s",
        database_floor.as_secs_f64() * 1000.0,
        per_second(database_floor)
    );
    println!(
        "drover time / floor time: {:.2}",
        drover.as_secs_f64() / database_floor.as_secs_f64()
    );
}

/// Submits the DAG to a real runner with in-process noop builders; returns the time until the
/// build succeeded.
async fn through_the_farm(database: &str, dag: &[FakeDrv], builders: u32, jobs: u32) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ca = CertificateAuthority::generate("bench CA").unwrap();
    ca.write(dir).unwrap();
    let issue = |role, name: &str, dns: &[String], ips: &[IpAddr]| {
        ca.issue(&Identity::new(role, name).unwrap(), dns, ips)
            .unwrap()
            .write(dir)
            .unwrap();
    };
    issue(
        Role::Runner,
        "bench",
        &["localhost".to_owned()],
        &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
    );
    issue(Role::Client, "bench", &[], &[]);
    fs_err::write(
        dir.join("cache.sec"),
        SecretKey::generate("bench-1").unwrap().to_nix_format(),
    )
    .unwrap();
    let runner_toml = format!(
        "[database]\nurl = \"{database}\"\n[grpc]\nlisten = \"127.0.0.1:0\"\n\
         [tls]\nca_certificate = \"{d}/ca.pem\"\ncertificate = \"{d}/runner-bench.pem\"\nkey = \"{d}/runner-bench.key\"\n\
         [logs]\ndirectory = \"{d}/logs\"\n[cache]\ndirectory = \"{d}/cache\"\nlisten = \"127.0.0.1:0\"\nsecret_key_file = \"{d}/cache.sec\"\n",
        d = dir.display()
    );
    let config =
        drover_queue_runner::config::Config::parse(&runner_toml, Path::new("bench.toml")).unwrap();
    let shutdown = CancellationToken::new();
    let runner = drover_queue_runner::app::start(config, shutdown.clone())
        .await
        .unwrap();
    let port = runner.grpc_address.port();
    tokio::spawn(runner.wait());
    for index in 0..builders {
        let name = format!("b{index}");
        issue(Role::Builder, &name, &[], &[]);
        let builder_toml = format!(
            "[runner]\nurl = \"https://localhost:{port}\"\n[tls]\nca_certificate = \"{d}/ca.pem\"\n\
             certificate = \"{d}/builder-{name}.pem\"\nkey = \"{d}/builder-{name}.key\"\n\
             [builder]\nsystems = [\"x86_64-linux\"]\nmax_jobs = {jobs}\n[executor]\nkind = \"noop\"\n",
            d = dir.display()
        );
        let config =
            drover_builder::config::Config::parse(&builder_toml, Path::new("b.toml")).unwrap();
        let token = shutdown.clone();
        tokio::spawn(async move { drover_builder::tunnel::run(&config, &token).await });
    }

    let channel = client_channel(dir, port).await;
    let mut client = BuildServiceClient::new(channel).max_encoding_message_size(256 << 20);
    let (db, connection) = tokio_postgres::connect(database, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    test_support::poll_until(Duration::from_secs(30), "the builders to join", || async {
        let joined: i64 = db
            .query_one("SELECT count(*) FROM machines WHERE connected", &[])
            .await
            .unwrap()
            .get(0);
        (joined == i64::from(builders)).then_some(())
    })
    .await;

    let start = Instant::now();
    let build = client
        .submit(SubmitRequest {
            derivations: dag
                .iter()
                .map(|drv| DerivationText {
                    path: drv.path.to_absolute(),
                    text: drv.text.clone(),
                })
                .collect(),
            top_drv_path: dag.last().unwrap().path.to_absolute(),
            ..SubmitRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .build_id;
    loop {
        let status: String = db
            .query_one("SELECT status::text FROM builds WHERE id = $1", &[&build])
            .await
            .unwrap()
            .get(0);
        match status.as_str() {
            "succeeded" => break,
            "queued" | "running" => tokio::time::sleep(Duration::from_millis(5)).await,
            other => panic!("the benchmark build ended {other}"),
        }
    }
    let elapsed = start.elapsed();
    report_ingest(&db, build).await;
    shutdown.cancel();
    elapsed
}

/// Prints how long the build took from submission to its first dispatch.
async fn report_ingest(db: &tokio_postgres::Client, build: i64) {
    let ingest: f64 = db
        .query_one(
            "SELECT extract(epoch FROM (SELECT min(started_at) FROM step_attempts) - submitted_at)::float8
             FROM builds WHERE id = $1",
            &[&build],
        )
        .await
        .unwrap()
        .get(0);
    println!(
        "of which submit, verification, ingest and publishing the .drv files until the first dispatch: {:.1} ms",
        ingest * 1000.0
    );
}

/// An mTLS channel to the runner with the benchmark's client certificate.
async fn client_channel(dir: &Path, port: u16) -> tonic::transport::Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            fs_err::read(dir.join("ca.pem")).unwrap(),
        ))
        .identity(tonic::transport::Identity::from_pem(
            fs_err::read(dir.join("client-bench.pem")).unwrap(),
            fs_err::read(dir.join("client-bench.key")).unwrap(),
        ))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The scheduler's unavoidable per-step statements, one step after another.
async fn database_floor(database: &str, dag: &[FakeDrv]) -> Duration {
    let pool = db::pool(database, 2).unwrap();
    db::migrate(&pool).await.unwrap();
    let client = pool.get().await.unwrap();
    let texts: Vec<(String, Vec<u8>)> = dag
        .iter()
        .map(|drv| (drv.path.to_absolute(), drv.text.clone()))
        .collect();
    queries::insert_build(
        &client,
        &texts,
        &texts.last().unwrap().0,
        0,
        &serde_json::json!({}),
    )
    .await
    .unwrap();
    let specs: Vec<queries::StepSpec> = dag
        .iter()
        .map(|drv| queries::StepSpec {
            drv_path: drv.path.to_absolute(),
            system: "x86_64-linux".to_owned(),
            features: String::new(),
        })
        .collect();
    let steps = queries::ensure_steps(&client, &specs).await.unwrap();
    let machine = queries::MachineRow {
        name: "floor",
        systems: vec!["x86_64-linux".to_owned()],
        supported_features: Vec::new(),
        mandatory_features: Vec::new(),
        max_jobs: 1,
        speed_factor: 1.0,
        nix_version: "",
    };
    queries::machine_joined(&client, &machine).await.unwrap();
    let start = Instant::now();
    for (step, drv) in steps.iter().zip(dag) {
        let attempt = uuid::Uuid::new_v4();
        queries::record_dispatch(&client, attempt, step.id, "floor")
            .await
            .unwrap();
        let output = queries::OutputRow {
            name: "out".to_owned(),
            path: drv.out.to_absolute(),
            nar_hash: "sha256:floor".to_owned(),
            nar_size: 1,
        };
        queries::record_success(&client, attempt, step.id, &[output], &[], &[])
            .await
            .unwrap();
    }
    start.elapsed()
}
