//! History pruning under load (issue 24): a database holding `--history` old steps (chains of
//! 100, one finished build per chain, an attempt and an output per step, each derivation 1 KB),
//! all past `[history] keep_days`, pruned every `--interval-secs` while `--steps` noop steps
//! are built by 50 × 4 builders. The same build runs first on a farm with the same history that
//! never prunes (the baseline), so the flow ratio is what pruning costs the runner while it
//! builds. Prints how long the deletions ran (from the first batch seen to the last) and both
//! flows.
//!
//! Usage (build the binaries first: `cargo build --release --bins`):
//! `cargo run --release -p drover-bench --bin history-prune -- [--history 100000] [--steps 20000]`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::print_stdout,
    reason = "a benchmark harness: any failure aborts the measurement"
)]

use std::time::{Duration, Instant};

use clap::Parser;
use drover_bench::farm::Farm;
use test_support::TestPostgres;
use test_support::fake_derivations::Factory;

#[derive(Parser)]
struct Args {
    /// Old steps in the database before the farm builds.
    #[arg(long, default_value_t = 100_000)]
    history: i64,
    /// Noop steps built while the runner prunes.
    #[arg(long, default_value_t = 20_000)]
    steps: usize,
    /// Seconds between collections.
    #[arg(long, default_value_t = 5)]
    interval_secs: i64,
}

/// Old steps in chains of 100 (each needs the one before), the top of each a finished build,
/// every one 100 days old, with one attempt and one output each.
const SEED: &str = "
    INSERT INTO machines (name, systems, supported_features, mandatory_features, max_jobs,
                          speed_factor, nix_version, connected)
    VALUES ('seed', '{x86_64-linux}', '{}', '{}', 1, 1, '2.8', false);
    INSERT INTO derivations (path, text, created_at)
    SELECT '/nix/store/' || lpad(i::text, 32, '0') || '-old-' || i || '.drv',
           convert_to(repeat('x', 1000), 'UTF8'), now() - interval '100 days'
    FROM generate_series(0, $1 - 1) i;
    INSERT INTO steps (drv_path, status, system, created_at, finished_at)
    SELECT '/nix/store/' || lpad(i::text, 32, '0') || '-old-' || i || '.drv', 'succeeded',
           'x86_64-linux', now() - interval '100 days', now() - interval '100 days'
    FROM generate_series(0, $1 - 1) i ORDER BY i;
    INSERT INTO step_inputs (step_id, input_id)
    SELECT id, id - 1 FROM steps WHERE (id - (SELECT min(id) FROM steps)) % 100 <> 0;
    INSERT INTO step_attempts (id, step_id, machine, status, started_at, finished_at)
    SELECT gen_random_uuid(), id, 'seed', 'succeeded', finished_at, finished_at FROM steps;
    INSERT INTO step_outputs (step_id, output_name, path)
    SELECT id, 'out', replace(drv_path, '.drv', '') FROM steps;
    INSERT INTO builds (drv_path, status, submitted_at, ingested_at, finished_at)
    SELECT drv_path, 'succeeded', finished_at, finished_at, finished_at FROM steps
    WHERE (id - (SELECT min(id) FROM steps)) % 100 = 99;
";

#[tokio::main]
async fn main() {
    let args = Args::parse();
    drover_bench::farm::raise_open_file_limit();
    let cluster = TestPostgres::start_durable();
    println!(
        "history-prune: {} old steps in chains of 100 (one build each); {} noop steps on 50 x 4 \
         builders; durable PostgreSQL; runner in its own process",
        args.history, args.steps
    );
    let baseline = flow(&cluster, &args, false).await.0;
    let (pruning_flow, deletions) = flow(&cluster, &args, true).await;
    let deletions = deletions.expect("the old history was not pruned");
    println!(
        "deletions ran {:.1} s from the first batch seen to the last",
        deletions.as_secs_f64()
    );
    println!(
        "flow: {baseline:.0} steps/s without pruning, {pruning_flow:.0} steps/s while pruning \
         every {} s ({:.2}x)",
        args.interval_secs,
        pruning_flow / baseline
    );
}

/// Builds `args.steps` noop steps on a fresh farm seeded with old history (pruned every
/// `args.interval_secs`, or never); returns the flow and, when pruning, how long the
/// deletions of the old steps ran.
async fn flow(cluster: &TestPostgres, args: &Args, pruning: bool) -> (f64, Option<Duration>) {
    let farm = Farm::start_with(cluster, |config| {
        config
            .set("gc.enabled", false)
            .set("gc.interval_secs", args.interval_secs)
            .set("history.keep_days", if pruning { 30 } else { 0 })
    })
    .await;
    farm.start_builders("history", 50, 4).await;
    let started = Instant::now();
    farm.db
        .batch_execute(&SEED.replace("$1", &args.history.to_string()))
        .await
        .unwrap();
    println!(
        "seeded {} old steps in {:.1} s",
        args.history,
        started.elapsed().as_secs_f64()
    );
    let drvs = Factory::default().layered_dag("history", args.steps, 100, 3);
    let started = Instant::now();
    let id = farm.submit(&drvs).await;
    let built = async {
        farm.wait_for_success(id).await;
        args.steps as f64 / started.elapsed().as_secs_f64()
    };
    let watched = async {
        if pruning {
            watch_deletions(&farm, args.history).await
        } else {
            None
        }
    };
    let (flow, deletions) = tokio::join!(built, watched);
    farm.stop();
    (flow, deletions)
}

/// Polls the count of old steps: the time from its first fall to zero.
async fn watch_deletions(farm: &Farm, history: i64) -> Option<Duration> {
    let deadline = Instant::now() + Duration::from_mins(15);
    let mut first_fall = None;
    while Instant::now() < deadline {
        let left: i64 = farm
            .db
            .query_one(
                "SELECT count(*) FROM steps WHERE drv_path LIKE '%-old-%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left < history && first_fall.is_none() {
            first_fall = Some(Instant::now());
        }
        if left == 0 {
            return first_fall.map(|first| first.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
