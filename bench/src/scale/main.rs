//! Scale benchmark of the whole control plane (issue 8): the runner in its own process on a
//! durable PostgreSQL (fsync and synchronous commit on), simulated builders over real mTLS
//! tunnels with the noop executor (build time 0: every step still goes the production path of
//! log upload, output NAR upload into the signed cache, result and acknowledgement).
//!
//! Usage (build the binaries first: `cargo build --release --bins`):
//! `cargo run --release -p drover-bench --bin scale -- [--builders 50] [--jobs 4] [--runs 3]
//!  [--layered-steps 100000] [--baseline-steps 2000] [--idle-builders 1000] [MODE ...]`
//! where MODE is `throughput`, `latency` or `idle` (default: all three).
//!
//! - throughput: a 1k chain, a 10k fan-out, 2.5k diamonds (10k steps) and a layered DAG
//!   (1-5 inputs per derivation from earlier layers, closed by a tree of fan-in <= 64), each
//!   submitted as one build to a fresh runner (`--graph NAME` picks some); the median of
//!   `--runs` runs of each figure. Then the serial dispatcher and the batched database floor on
//!   the same cluster, on the first steps of the last graph.
//! - latency: a 1k chain is the steadiest trickle there is (one runnable step at a time); for
//!   every link, the time from the builder sending one step's result to it receiving the next
//!   step, which bounds "runnable to received" from above.
//! - idle: `--idle-builders` connected builders and no work: the runner's memory and CPU.
//! - job-set (not run by default): a nixpkgs-shaped graph of `--nixpkgs-steps` derivations
//!   queued as one job set of `--nixpkgs-jobs` builds, cold and after a restart
//!   ([`job_set`]).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::cast_precision_loss,
    clippy::print_stdout,
    reason = "a benchmark harness: any failure aborts the measurement"
)]

mod baselines;
mod job_set;
mod timeline;

use std::time::{Duration, Instant};

use clap::Parser;
use drover_bench::farm::{Farm, ProcessStats, raise_open_file_limit};
use test_support::TestPostgres;
use test_support::fake_derivations::{Factory, FakeDrv};
use timeline::Timeline;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

#[derive(Parser)]
struct Args {
    /// Simulated builders for the throughput and latency runs.
    #[arg(long, default_value_t = 50)]
    builders: usize,
    /// Slots per builder.
    #[arg(long, default_value_t = 4)]
    jobs: u32,
    /// Runs per graph; the median of each figure is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Steps of the layered DAG (before its closing tree).
    #[arg(long, default_value_t = 100_000)]
    layered_steps: usize,
    /// Steps the baselines run (the serial one takes about 2 fsyncs per step).
    #[arg(long, default_value_t = 2000)]
    baseline_steps: usize,
    /// Builders connected in the idle run.
    #[arg(long, default_value_t = 1000)]
    idle_builders: usize,
    /// Graphs of the throughput run (chain, fan-out, diamonds, layered); all by default.
    #[arg(long = "graph")]
    graphs: Vec<String>,
    /// Derivations of the nixpkgs-shaped job set.
    #[arg(long, default_value_t = 300_000)]
    nixpkgs_steps: usize,
    /// Jobs (builds) of the nixpkgs-shaped job set.
    #[arg(long, default_value_t = 30_000)]
    nixpkgs_jobs: usize,
    /// What to run: throughput, latency, idle, job-set (the default runs the first three).
    modes: Vec<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let timeline = Timeline::default();
    tracing_subscriber::registry()
        .with(
            timeline.clone().with_filter(
                Targets::new().with_target("drover_builder::tunnel", LevelFilter::DEBUG),
            ),
        )
        .init();
    raise_open_file_limit();
    let modes: Vec<&str> = if args.modes.is_empty() {
        vec!["throughput", "latency", "idle"]
    } else {
        args.modes.iter().map(String::as_str).collect()
    };
    let cluster = TestPostgres::start_durable();
    println!(
        "PostgreSQL 15, durable (fsync=on, synchronous_commit=on); {} builders x {} jobs; runner in its own process",
        args.builders, args.jobs
    );
    for mode in modes {
        match mode {
            "throughput" => throughput(&cluster, &args).await,
            "latency" => latency(&cluster, &args, &timeline).await,
            "idle" => idle(&cluster, &args).await,
            "job-set" => job_set::job_set(&cluster, &args).await,
            other => panic!("unknown mode {other}: throughput, latency, idle or job-set"),
        }
    }
}

/// What one run of one graph measured.
#[derive(Debug, Clone, Copy)]
struct Run {
    ingest: Duration,
    flowing: Duration,
    total: Duration,
    peak_rss_bytes: u64,
    rss_growth_bytes: u64,
    cpu: Duration,
}

async fn throughput(cluster: &TestPostgres, args: &Args) {
    let mut factory = Factory::default();
    let wanted = |name: &str| args.graphs.is_empty() || args.graphs.iter().any(|g| g == name);
    let mut graphs: Vec<(&str, Vec<FakeDrv>)> = Vec::new();
    if wanted("chain") {
        graphs.push(("1k chain", factory.chain("chain", 1000)));
    }
    if wanted("fan-out") {
        graphs.push(("10k fan-out", factory.fan_out("fan", 10_000)));
    }
    if wanted("diamonds") {
        graphs.push(("2.5k diamonds", factory.diamonds("diamond", 2500)));
    }
    if wanted("layered") {
        let layered = factory.layered_dag("layer", args.layered_steps, 2000, 7);
        graphs.push(("layered DAG", layered));
    }
    println!(
        "\n{:<14} {:>7} {:>7} | {:>10} {:>10} {:>9} {:>9} | {:>9} {:>9} {:>9}",
        "graph",
        "steps",
        "edges",
        "ingest ms",
        "flow ms",
        "flow/s",
        "e2e/s",
        "peak RSS",
        "B/step",
        "CPU us/st"
    );
    for (name, drvs) in &graphs {
        let mut runs = Vec::new();
        for _ in 0..args.runs {
            runs.push(one_run(cluster, args, drvs).await);
        }
        let steps = drvs.len() as f64;
        let median = |key: &dyn Fn(&Run) -> f64| -> f64 {
            let mut values: Vec<f64> = runs.iter().map(key).collect();
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let edges: usize = drvs
            .iter()
            .map(|drv| {
                nix_primitives::Derivation::parse(&drv.text)
                    .unwrap()
                    .input_derivations
                    .len()
            })
            .sum();
        println!(
            "{:<14} {:>7} {:>7} | {:>10.0} {:>10.0} {:>9.0} {:>9.0} | {:>6.0} MB {:>9.0} {:>9.0}",
            name,
            drvs.len(),
            edges,
            median(&|r| r.ingest.as_secs_f64() * 1000.0),
            median(&|r| r.flowing.as_secs_f64() * 1000.0),
            median(&|r| steps / r.flowing.as_secs_f64()),
            median(&|r| steps / r.total.as_secs_f64()),
            median(&|r| r.peak_rss_bytes as f64 / 1e6),
            median(&|r| r.rss_growth_bytes as f64 / steps),
            median(&|r| r.cpu.as_secs_f64() * 1e6 / steps),
        );
    }
    let Some((_, largest)) = graphs.last() else {
        return;
    };
    let sample = &largest[..args.baseline_steps.min(largest.len())];
    let serial = baselines::serial(cluster, sample).await;
    let slots = args.builders * usize::try_from(args.jobs).unwrap();
    let floor = baselines::batched_floor(cluster, sample, slots).await;
    let rate = |time: Duration| sample.len() as f64 / time.as_secs_f64();
    println!(
        "baselines on the first {} steps of the last graph: serial dispatcher {:.0} steps/s; batched floor ({} per batch) {:.0} steps/s",
        sample.len(),
        rate(serial),
        slots,
        rate(floor)
    );
}

async fn one_run(cluster: &TestPostgres, args: &Args, drvs: &[FakeDrv]) -> Run {
    let farm = Farm::start(cluster).await;
    farm.start_builders("b", args.builders, args.jobs).await;
    let before = ProcessStats::read(farm.runner_pid());
    let start = Instant::now();
    // The ingest clock starts at the Submit call, not at the build's `submitted_at` (its insert's
    // transaction, after the closure is parsed and verified); runner and bench share a clock,
    // and the farm runs this one build.
    let called = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let build = farm.submit(drvs).await;
    farm.wait_for_success(build).await;
    let total = start.elapsed();
    let after = ProcessStats::read(farm.runner_pid());
    let row = farm
        .db
        .query_one(
            "SELECT extract(epoch FROM min(started_at))::float8 - $1,
                    extract(epoch FROM max(finished_at) - min(started_at))::float8
             FROM step_attempts",
            &[&called],
        )
        .await
        .unwrap();
    farm.stop();
    Run {
        ingest: Duration::from_secs_f64(row.get(0)),
        flowing: Duration::from_secs_f64(row.get(1)),
        total,
        peak_rss_bytes: after.peak_rss_bytes,
        rss_growth_bytes: after.peak_rss_bytes.saturating_sub(before.rss_bytes),
        cpu: after.cpu.saturating_sub(before.cpu),
    }
}

async fn latency(cluster: &TestPostgres, args: &Args, timeline: &Timeline) {
    let drvs = Factory::default().chain("latency", 1000);
    let farm = Farm::start(cluster).await;
    farm.start_builders("l", args.builders, args.jobs).await;
    let build = farm.submit(&drvs).await;
    farm.wait_for_success(build).await;
    let rows = farm
        .db
        .query(
            "SELECT a.id::text, s.drv_path FROM step_attempts a JOIN steps s ON s.id = a.step_id
             WHERE a.status = 'succeeded'",
            &[],
        )
        .await
        .unwrap();
    farm.stop();
    let attempt_of: std::collections::HashMap<String, String> =
        rows.iter().map(|row| (row.get(1), row.get(0))).collect();
    let times = timeline.times();
    let mut latencies: Vec<Duration> = drvs
        .windows(2)
        .map(|pair| {
            let previous = &attempt_of[&pair[0].path.to_absolute()];
            let next = &attempt_of[&pair[1].path.to_absolute()];
            times.received[next].duration_since(times.sent[previous])
        })
        .collect();
    latencies.sort_unstable();
    let percentile = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    println!(
        "\nlatency, 1k chain (one runnable step at a time), result sent -> next step received: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(50).as_secs_f64() * 1000.0,
        percentile(99).as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0
    );
}

async fn idle(cluster: &TestPostgres, args: &Args) {
    let farm = Farm::start(cluster).await;
    let start = Instant::now();
    farm.start_builders("i", args.idle_builders, 4).await;
    println!(
        "\nidle: {} builders joined in {:.1} s",
        args.idle_builders,
        start.elapsed().as_secs_f64()
    );
    // Let the joins settle, then measure a window that spans several ping rounds.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let window = Duration::from_secs(30);
    let before = ProcessStats::read(farm.runner_pid());
    tokio::time::sleep(window).await;
    let after = ProcessStats::read(farm.runner_pid());
    farm.stop();
    println!(
        "idle: runner RSS {:.0} MB (peak {:.0} MB), CPU {:.2} % of a core over {} s",
        after.rss_bytes as f64 / 1e6,
        after.peak_rss_bytes as f64 / 1e6,
        after.cpu.saturating_sub(before.cpu).as_secs_f64() * 100.0 / window.as_secs_f64(),
        window.as_secs()
    );
}
