//! The nixpkgs-shaped job set (issue 20): a seeded graph of `--nixpkgs-steps` derivations about
//! 60 deep with heavy-tailed fan-in and texts of nixpkgs size, staged in 16 MiB chunks and
//! queued as one job set of `--nixpkgs-jobs` builds. Two runs on fresh databases: a cold one
//! with the builders connected (submit to first Build, to fully planned, the flow, the runner's
//! memory, PostgreSQL's bytes per step), and a restart with the whole job set queued (restart to
//! first Build).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use drover_bench::farm::{Farm, ProcessStats};
use test_support::TestPostgres;
use test_support::fake_derivations::{Factory, FakeDrv};

use super::Args;

/// Runs both job-set runs and prints their figures.
pub async fn job_set(cluster: &TestPostgres, args: &Args) {
    let generated = Instant::now();
    let (drvs, jobs) =
        Factory::default().nixpkgs_shaped("pkg", args.nixpkgs_steps, 60, args.nixpkgs_jobs, 11);
    let mut dependents: HashMap<usize, usize> = HashMap::new();
    let mut edges = 0;
    let index: HashMap<&nix_primitives::StorePath, usize> = drvs
        .iter()
        .enumerate()
        .map(|(index, drv)| (&drv.path, index))
        .collect();
    for drv in &drvs {
        let derivation = nix_primitives::Derivation::parse(&drv.text).unwrap();
        edges += derivation.input_derivations.len();
        for input in derivation.input_derivations.keys() {
            *dependents.entry(index[input]).or_default() += 1;
        }
    }
    let text_bytes: usize = drvs.iter().map(|drv| drv.text.len()).sum();
    println!(
        "\nnixpkgs-shaped job set: {} steps, {} edges, {} jobs, largest fan-in {} dependents, \
         {:.1} KB per derivation text ({:.2} GB), generated in {:.0} s",
        drvs.len(),
        edges,
        jobs.len(),
        dependents.values().max().unwrap_or(&0),
        text_bytes as f64 / drvs.len() as f64 / 1000.0,
        text_bytes as f64 / 1e9,
        generated.elapsed().as_secs_f64()
    );
    cold(cluster, args, &drvs, &jobs).await;
    restart(cluster, args, &drvs, &jobs).await;
}

/// Seconds since the epoch on the database's clock.
async fn database_now(farm: &Farm) -> f64 {
    farm.db
        .query_one("SELECT extract(epoch FROM clock_timestamp())::float8", &[])
        .await
        .unwrap()
        .get(0)
}

/// Waits until a one-number query returns zero.
async fn wait_for_zero(farm: &Farm, sql: &str) {
    loop {
        let left: i64 = farm.db.query_one(sql, &[]).await.unwrap().get(0);
        if left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn cold(cluster: &TestPostgres, args: &Args, drvs: &[FakeDrv], jobs: &[usize]) {
    let farm = Farm::start(cluster).await;
    farm.start_builders("j", args.builders, args.jobs).await;
    let before = ProcessStats::read(farm.runner_pid());
    let start = database_now(&farm).await;
    let call = Instant::now();
    let builds = farm.submit_job_set(drvs, jobs).await;
    let submitted = call.elapsed();
    wait_for_zero(
        &farm,
        "SELECT count(*) FROM builds WHERE finished_at IS NULL",
    )
    .await;
    let total = call.elapsed();
    let after = ProcessStats::read(farm.runner_pid());
    let row = farm
        .db
        .query_one(
            "SELECT (SELECT extract(epoch FROM min(started_at))::float8 FROM step_attempts) - $1,
                    (SELECT extract(epoch FROM max(ingested_at))::float8 FROM builds) - $1,
                    (SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8
                     FROM step_attempts),
                    (SELECT count(*) FROM builds WHERE status <> 'succeeded'),
                    (SELECT count(*) FROM steps)",
            &[&start],
        )
        .await
        .unwrap();
    let (first_build, planned, flowing): (f64, f64, f64) = (row.get(0), row.get(1), row.get(2));
    let (unsucceeded, steps): (i64, i64) = (row.get(3), row.get(4));
    let sizes = farm
        .db
        .query_one(
            "SELECT (pg_total_relation_size('steps') + pg_total_relation_size('step_inputs')
                     + pg_total_relation_size('step_outputs')
                     + pg_total_relation_size('step_attempts'))::float8,
                    (pg_total_relation_size('builds') + pg_total_relation_size('job_sets'))::float8,
                    pg_total_relation_size('derivations')::float8,
                    pg_total_relation_size('step_inputs')::float8,
                    pg_total_relation_size('verified_derivations')::float8",
            &[],
        )
        .await
        .unwrap();
    let (graph, build_rows, texts, edges, verified): (f64, f64, f64, f64, f64) = (
        sizes.get(0),
        sizes.get(1),
        sizes.get(2),
        sizes.get(3),
        sizes.get(4),
    );
    farm.stop();
    assert_eq!(unsucceeded, 0, "every build of the job set succeeds");
    let steps = steps as f64;
    println!(
        "cold: {} builds; staged and submitted in {:.1} s; submit -> first Build {:.1} s; \
         submit -> fully planned {:.1} s; flow {:.0} steps/s; end to end {:.0} s",
        builds.len(),
        submitted.as_secs_f64(),
        first_build,
        planned,
        steps / flowing,
        total.as_secs_f64()
    );
    println!(
        "cold: runner peak RSS {:.0} MB ({:.0} B per step over the idle runner), CPU {:.0} s",
        after.peak_rss_bytes as f64 / 1e6,
        after.peak_rss_bytes.saturating_sub(before.rss_bytes) as f64 / steps,
        after.cpu.saturating_sub(before.cpu).as_secs_f64()
    );
    println!(
        "cold: PostgreSQL per step: {:.0} B of step rows, edges, outputs and attempts \
         ({:.0} B of it edges), {:.0} B of derivation text, {:.0} B of verified derivation; \
         {:.0} B per build row",
        graph / steps,
        edges / steps,
        texts / steps,
        verified / steps,
        build_rows / builds.len() as f64
    );
}

async fn restart(cluster: &TestPostgres, args: &Args, drvs: &[FakeDrv], jobs: &[usize]) {
    let mut farm = Farm::start(cluster).await;
    farm.submit_job_set(drvs, jobs).await;
    wait_for_zero(
        &farm,
        "SELECT count(*) FROM builds WHERE ingested_at IS NULL",
    )
    .await;
    let queued = ProcessStats::read(farm.runner_pid());
    farm.restart_runner();
    let start = database_now(&farm).await;
    farm.start_builders("r", args.builders, args.jobs).await;
    wait_for_zero(
        &farm,
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM step_attempts) THEN 0 ELSE 1 END::bigint",
    )
    .await;
    let first_build: f64 = farm
        .db
        .query_one(
            "SELECT extract(epoch FROM min(started_at))::float8 - $1 FROM step_attempts",
            &[&start],
        )
        .await
        .unwrap()
        .get(0);
    let recovered = ProcessStats::read(farm.runner_pid());
    farm.stop();
    println!(
        "restart: with the job set queued the runner held {:.0} MB ({:.0} B per step); \
         restart -> first Build {:.1} s; the restarted runner peaked at {:.0} MB",
        queued.rss_bytes as f64 / 1e6,
        queued.rss_bytes as f64 / drvs.len() as f64,
        first_build,
        recovered.peak_rss_bytes as f64 / 1e6
    );
}
