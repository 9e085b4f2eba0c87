//! The Watch benchmark (issues 11 and 25): `--builds` concurrent builds, each a chain of
//! `--steps` steps, on simulated noop builders, each build watched by a client of its own (its
//! own TLS connection and `Watch` stream over gRPC, or with `--transport sse` its own HTTPS
//! connection and server-sent event stream from the web listener). It prints the runner's CPU time and peak memory against a
//! baseline run of the same builds with nobody watching, measured in the same invocation, and
//! the delay from each step's success being committed to its delivery to the watcher.
//!
//! The commit time is the step's `finished_at`, which PostgreSQL stamps at the start of the
//! batch's transaction: the delays include the batch's write, and so are slightly high.
//!
//! Usage (build the binaries first: `cargo build --release --bins`):
//! `cargo run --release -p drover-bench --bin watchers -- [--builds 1000] [--steps 10]
//!  [--builders 10] [--jobs 20] [--transport grpc|sse|sse-http2]`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::cast_precision_loss,
    clippy::print_stdout,
    reason = "a benchmark harness: any failure aborts the measurement"
)]

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use drover_bench::farm::{Farm, ProcessStats, raise_open_file_limit, request};
use drover_proto::v1::WatchRequest;
use drover_proto::v1::watch_event::Event;
use test_support::TestPostgres;
use test_support::fake_derivations::Factory;

#[derive(Parser)]
struct Args {
    /// Concurrent builds, each watched by its own client.
    #[arg(long, default_value_t = 1000)]
    builds: usize,
    /// Steps per build (a chain).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Simulated builders.
    #[arg(long, default_value_t = 10)]
    builders: usize,
    /// Slots per builder.
    #[arg(long, default_value_t = 20)]
    jobs: u32,
    /// How watchers watch.
    #[arg(long, value_enum, default_value_t = Transport::Grpc)]
    transport: Transport,
}

/// A watcher's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    /// `BuildService.Watch` over gRPC.
    Grpc,
    /// `GET /api/v1/builds/{id}/events`, server-sent events over HTTPS (HTTP/1.1).
    Sse,
    /// The same over HTTP/2.
    SseHttp2,
}

/// What one run measured.
struct Run {
    wall: Duration,
    cpu: Duration,
    peak_rss_bytes: u64,
    /// Commit-to-delivery delay of every step success a watcher received.
    delays: Vec<Duration>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    raise_open_file_limit();
    let cluster = TestPostgres::start_durable();
    println!(
        "PostgreSQL, durable; {} builds x {} steps; {} simulated builders x {} jobs in the benchmark process; runner in its own process; watchers over {:?}",
        args.builds, args.steps, args.builders, args.jobs, args.transport
    );
    let baseline = run(&cluster, &args, false).await;
    let watched = run(&cluster, &args, true).await;
    let ratio = |a: f64, b: f64| a / b.max(f64::MIN_POSITIVE);
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    println!("| | nobody watching | {} watchers | ratio |", args.builds);
    println!("|---|---|---|---|");
    println!(
        "| wall time | {:.2} s | {:.2} s | {:.2}x |",
        baseline.wall.as_secs_f64(),
        watched.wall.as_secs_f64(),
        ratio(watched.wall.as_secs_f64(), baseline.wall.as_secs_f64())
    );
    println!(
        "| runner CPU | {:.2} s | {:.2} s | {:.2}x |",
        baseline.cpu.as_secs_f64(),
        watched.cpu.as_secs_f64(),
        ratio(watched.cpu.as_secs_f64(), baseline.cpu.as_secs_f64())
    );
    println!(
        "| runner peak RSS | {:.1} MiB | {:.1} MiB | {:.2}x |",
        mib(baseline.peak_rss_bytes),
        mib(watched.peak_rss_bytes),
        ratio(mib(watched.peak_rss_bytes), mib(baseline.peak_rss_bytes))
    );
    let mut delays = watched.delays;
    delays.sort_unstable();
    let at = |percent: usize| {
        let index = delays.len().saturating_sub(1) * percent / 100;
        delays.get(index).copied().unwrap_or_default()
    };
    println!(
        "commit-to-delivery delay of {} step successes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        delays.len(),
        at(50).as_secs_f64() * 1000.0,
        at(99).as_secs_f64() * 1000.0,
        at(100).as_secs_f64() * 1000.0
    );
}

async fn run(cluster: &TestPostgres, args: &Args, watch: bool) -> Run {
    let farm = Farm::start(cluster).await;
    let mut client = farm.client().await;
    let mut factory = Factory::default();
    let mut builds = Vec::with_capacity(args.builds);
    for index in 0..args.builds {
        let drvs = factory.chain(&format!("watched-{index}"), args.steps);
        let submitted = client.submit(request(&drvs)).await.unwrap();
        builds.push(submitted.into_inner().build_id);
    }
    let planned = i64::try_from(args.builds).unwrap();
    let planned_sql = "SELECT count(*) FROM builds WHERE ingested_at IS NOT NULL";
    wait_for_count(&farm, "every build to be planned", planned_sql, planned).await;
    let mut watchers = Vec::new();
    if watch && args.transport != Transport::Grpc {
        for build in &builds {
            let client = farm.web_client(args.transport == Transport::SseHttp2);
            let url = farm.web_url(&format!("/api/v1/builds/{build}/events"));
            watchers.push(tokio::spawn(async move {
                let mut response = client.get(url).send().await.unwrap();
                let (mut text, mut received) = (String::new(), Vec::new());
                while let Some(chunk) = response.chunk().await.unwrap() {
                    text.push_str(&String::from_utf8_lossy(&chunk));
                    while let Some(end) = text.find("\n\n") {
                        let event: String = text.drain(..end + 2).collect();
                        if let Some(data) = event.strip_prefix("event: step\ndata: ") {
                            let step: serde_json::Value =
                                serde_json::from_str(data.trim()).unwrap();
                            if step["status"] == "succeeded" {
                                let drv = step["drv_path"].as_str().unwrap().to_owned();
                                received.push((drv, SystemTime::now()));
                            }
                        }
                    }
                }
                received
            }));
        }
    } else if watch {
        for build in &builds {
            let mut client = farm.client().await;
            let mut stream = client
                .watch(WatchRequest { build_id: *build })
                .await
                .unwrap()
                .into_inner();
            watchers.push(tokio::spawn(async move {
                let mut received = Vec::new();
                while let Some(event) = stream.message().await.unwrap() {
                    if let Some(Event::Step(step)) = event.event
                        && step.status == "succeeded"
                    {
                        received.push((step.drv_path, SystemTime::now()));
                    }
                }
                received
            }));
        }
    }
    let before = ProcessStats::read(farm.runner_pid());
    let started = Instant::now();
    farm.start_builders("watched", args.builders, args.jobs)
        .await;
    let succeeded_sql = "SELECT count(*) FROM builds WHERE status = 'succeeded'";
    wait_for_count(&farm, "every build to succeed", succeeded_sql, planned).await;
    let wall = started.elapsed();
    let after = ProcessStats::read(farm.runner_pid());
    let mut delays = Vec::new();
    if watch {
        let committed: HashMap<String, f64> = farm
            .db
            .query(
                "SELECT drv_path, extract(epoch FROM finished_at)::float8 FROM steps",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        for watcher in watchers {
            for (drv, at) in watcher.await.unwrap() {
                let delivered = at.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
                let delay = (delivered - committed[&drv]).max(0.0);
                delays.push(Duration::from_secs_f64(delay));
            }
        }
    }
    farm.stop();
    Run {
        wall,
        cpu: after.cpu.saturating_sub(before.cpu),
        peak_rss_bytes: after.peak_rss_bytes,
        delays,
    }
}

/// Waits until a one-number query returns `expected`.
async fn wait_for_count(farm: &Farm, what: &str, sql: &str, expected: i64) {
    test_support::poll_until(Duration::from_mins(30), what, || async {
        let count: i64 = farm.db.query_one(sql, &[]).await.ok()?.get(0);
        (count == expected).then_some(())
    })
    .await;
}
