//! Garbage collection of a large binary cache (issue 24): `--paths` store paths in chains of 100
//! (each refers to the one before it), the heads of half the chains the outputs of recent builds,
//! so a sweep keeps half the cache through the references and deletes the rest. The runner (its
//! own process, durable PostgreSQL) sweeps every `--interval-secs`; meanwhile `--steps` noop
//! steps are built by 50 × 4 builders. The same build runs first on a farm with the same cache
//! that never sweeps (the baseline), so the flow ratio is what sweeping costs the runner while
//! it builds. It
//! prints the first sweep's time, paths and bytes deleted, and both flows.
//!
//! Usage (build the binaries first: `cargo build --release --bins`):
//! `cargo run --release -p drover-bench --bin cache-gc -- [--paths 100000] [--steps 20000]`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::print_stdout,
    reason = "a benchmark harness: any failure aborts the measurement"
)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use drover_bench::farm::Farm;
use nix_primitives::nar::write_file_nar;
use nix_primitives::narinfo::NarInfo;
use nix_primitives::{ContentAddress, Hash, SecretKey, StorePath};
use test_support::TestPostgres;
use test_support::fake_derivations::Factory;

/// Paths per chain: a root keeps its whole chain through references.
const CHAIN: usize = 100;

#[derive(Parser)]
struct Args {
    /// Store paths in the cache before the first sweep.
    #[arg(long, default_value_t = 100_000)]
    paths: usize,
    /// Noop steps built while the runner sweeps.
    #[arg(long, default_value_t = 20_000)]
    steps: usize,
    /// Seconds between sweeps (the first one this long after the runner starts).
    #[arg(long, default_value_t = 10)]
    interval_secs: i64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    drover_bench::farm::raise_open_file_limit();
    let cluster = TestPostgres::start_durable();
    println!(
        "cache-gc: {} paths in chains of {CHAIN}, half of them rooted; {} noop steps on 50 x 4 \
         builders; durable PostgreSQL; runner in its own process",
        args.paths, args.steps
    );
    let baseline = flow(&cluster, &args, false).await.0;
    let (swept_flow, sweep) = flow(&cluster, &args, true).await;
    let (seconds, deleted, freed, kept) = sweep.expect("no sweep deleted anything");
    println!("first sweep: {seconds:.2} s, {deleted} paths deleted ({freed} bytes), {kept} kept");
    println!(
        "flow: {baseline:.0} steps/s without sweeps, {swept_flow:.0} steps/s while sweeping \
         every {} s ({:.2}x)",
        args.interval_secs,
        swept_flow / baseline
    );
}

/// Builds `args.steps` noop steps on a fresh farm (sweeping every `args.interval_secs` over a
/// cache of `args.paths`, or never); returns the flow and the first sweep's figures.
async fn flow(
    cluster: &TestPostgres,
    args: &Args,
    sweeping: bool,
) -> (f64, Option<(f64, i64, i64, i64)>) {
    let interval = args.interval_secs;
    // Both farms start with the same cache, written before the runner starts; the sweeping
    // one's first sweep comes one interval after start, once the roots below are recorded
    // (builders join in a second or two).
    let populated = tempfile::tempdir().unwrap();
    let cache = populated.path().join("cache");
    let started = Instant::now();
    let heads = populate(&cache, args.paths);
    println!(
        "populated {} paths in {:.1} s",
        args.paths,
        started.elapsed().as_secs_f64()
    );
    let farm = Farm::start_with(cluster, |config| {
        config
            .set("gc.enabled", sweeping)
            .set("gc.interval_secs", interval)
            .set("gc.grace_secs", 0)
            .set("cache.directory", cache.display().to_string())
    })
    .await;
    farm.start_builders("gc", 50, 4).await;
    root(&farm, &heads[..heads.len() / 2]).await;
    let drvs = Factory::default().layered_dag("gc", args.steps, 100, 3);
    let started = Instant::now();
    let build = farm.submit(&drvs).await;
    farm.wait_for_success(build).await;
    let flow = args.steps as f64 / started.elapsed().as_secs_f64();
    let sweep = if sweeping {
        wait_for_sweep(&farm).await
    } else {
        None
    };
    farm.stop();
    drop(populated);
    (flow, sweep)
}

/// Writes `count` signed narinfos and their NARs in chains; returns each chain's head.
fn populate(cache: &Path, count: usize) -> Vec<StorePath> {
    let key = SecretKey::generate("gc-bench-1").unwrap();
    fs_err::create_dir_all(cache.join("nar")).unwrap();
    let mut heads = Vec::new();
    let mut previous: Option<StorePath> = None;
    for index in 0..count {
        if index % CHAIN == 0 {
            heads.extend(previous.take());
        }
        let references: BTreeSet<StorePath> = previous.iter().cloned().collect();
        let contents = format!("path {index} of the gc benchmark, {}", "x".repeat(200));
        let path = ContentAddress::Text(Hash::sha256(contents.as_bytes()))
            .store_path(&format!("gc-{index}"), &references, false)
            .unwrap();
        let mut nar = Vec::new();
        write_file_nar(contents.as_bytes(), false, &mut nar).unwrap();
        let file_hash = Hash::sha256(&nar);
        let size = u64::try_from(nar.len()).unwrap();
        let url = format!("nar/{}.nar", file_hash.to_nix_base32());
        fs_err::write(cache.join(&url), &nar).unwrap();
        let mut info = NarInfo {
            store_path: path.clone(),
            url,
            compression: "none".to_owned(),
            file_hash: Some(file_hash),
            file_size: Some(size),
            nar_hash: Hash::sha256(&nar),
            nar_size: size,
            references,
            deriver: None,
            system: None,
            signatures: Vec::new(),
            content_address: None,
        };
        info.sign(&key);
        fs_err::write(
            cache.join(format!("{}.narinfo", path.hash_part())),
            info.to_string(),
        )
        .unwrap();
        previous = Some(path);
    }
    heads.extend(previous);
    heads
}

/// Records a succeeded build finished now for each path: its derivation's only output.
async fn root(farm: &Farm, outputs: &[StorePath]) {
    for (index, output) in outputs.iter().enumerate() {
        let drv = format!("/nix/store/{}-gc-root-{index}.drv", output.hash_part());
        farm.db
            .execute(
                "WITH d AS (INSERT INTO derivations (path, text) VALUES ($1, '') RETURNING path),
                      v AS (INSERT INTO verified_derivations (path, system, required_features,
                                output_names, output_paths, input_derivations, input_sources,
                                input_outputs, hash_modulo)
                            VALUES ($1, 'x86_64-linux', '{}', '{out}', ARRAY[$2], '{}', '{}',
                                    '{}', decode(repeat('00', 32), 'hex')) RETURNING path)
                 INSERT INTO builds (drv_path, status, finished_at, ingested_at)
                 SELECT path, 'succeeded', now(), now() FROM d",
                &[&drv, &output.to_absolute()],
            )
            .await
            .unwrap();
    }
}

/// The first completed sweep that deleted something: seconds, paths deleted, bytes freed, paths
/// kept.
async fn wait_for_sweep(farm: &Farm) -> Option<(f64, i64, i64, i64)> {
    let deadline = Instant::now() + Duration::from_mins(10);
    while Instant::now() < deadline {
        let row = farm
            .db
            .query_opt(
                "SELECT extract(epoch FROM finished_at - started_at)::float8, paths_deleted,
                        bytes_freed, paths_kept
                 FROM cache_sweeps WHERE paths_deleted > 0 ORDER BY id LIMIT 1",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            return Some((row.get(0), row.get(1), row.get(2), row.get(3)));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}
