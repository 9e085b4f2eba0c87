//! The makespan benchmark (issue 22): one random graph of steps, each with a seeded duration of
//! its own (`DROVER_NOOP_SLEEP_MS`), on fewer slots than the graph is wide. Two farms in the
//! same invocation, identical but for `[builders] learned_durations`: one orders runnable steps
//! by their critical path in learned durations, the other by step count (as Hydra does). Each
//! first builds the graph once, which teaches its history; then each builds new versions of the
//! same packages (new derivations, so nothing is already built), alternately. Every makespan is
//! reported against the ideal lower bound of its graph: the larger of the longest chain of real
//! durations and the total work over the slots. While the learned farm builds, the build's
//! predicted end is sampled every 250 ms and compared with its real end.
//!
//! Usage (build the binaries first: `cargo build --release --bins`):
//! `cargo run --release -p drover-bench --bin makespan -- [--steps 300] [--runs 3]
//!  [--builders 4] [--jobs 2] [--seed 7]`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::cast_precision_loss,
    clippy::print_stdout,
    reason = "a benchmark harness: any failure aborts the measurement"
)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use drover_bench::farm::Farm;
use drover_proto::v1::GetRequest;
use test_support::TestPostgres;
use test_support::fake_derivations::{Factory, FakeDrv, Spec, XorShift};

#[derive(Parser)]
struct Args {
    /// Steps in the graph (a top-level step depending on every sink comes on top).
    #[arg(long, default_value_t = 300)]
    steps: usize,
    /// Measured runs per ordering (after one warm-up each).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Simulated builders per farm.
    #[arg(long, default_value_t = 4)]
    builders: usize,
    /// Slots per builder.
    #[arg(long, default_value_t = 2)]
    jobs: u32,
    /// Seed of the graph and its durations.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// How many chains the heavy steps form.
const HEAVY_CHAINS: usize = 8;

/// The graph: each step's inputs (earlier steps) and duration in milliseconds.
struct Graph {
    inputs: Vec<Vec<usize>>,
    durations_ms: Vec<u64>,
}

impl Graph {
    /// A farm's usual mix: one step in twelve is heavy (1.5 to 4 s: a compiler, a browser), in
    /// [`HEAVY_CHAINS`] chains of them (a toolchain bootstrapping itself) that nothing else
    /// depends on; the rest are light (30 to 300 ms), each with one or two inputs among the 30 light steps
    /// before it, so they form deep, wide trees of small packages.
    fn random(steps: usize, seed: u64) -> Self {
        let mut random = XorShift::new(seed);
        let mut inputs = Vec::with_capacity(steps);
        let mut durations_ms = Vec::with_capacity(steps);
        let mut light: Vec<usize> = Vec::new();
        let mut heavy_chains: [Option<usize>; HEAVY_CHAINS] = [None; HEAVY_CHAINS];
        let mut heavy = 0;
        for index in 0..steps {
            if random.below(12) == 0 {
                let chain = &mut heavy_chains[heavy % HEAVY_CHAINS];
                inputs.push(chain.iter().copied().collect());
                durations_ms.push(u64::try_from(1_500 + random.below(2_500)).unwrap());
                *chain = Some(index);
                heavy += 1;
                continue;
            }
            let recent = &light[light.len().saturating_sub(30)..];
            let mut chosen: Vec<usize> = if recent.is_empty() {
                Vec::new()
            } else {
                (0..=random.below(2))
                    .map(|_| recent[random.below(recent.len())])
                    .collect()
            };
            chosen.sort_unstable();
            chosen.dedup();
            inputs.push(chosen);
            durations_ms.push(u64::try_from(30 + random.below(270)).unwrap());
            light.push(index);
        }
        Self {
            inputs,
            durations_ms,
        }
    }

    /// The larger of the longest chain and all the work over `slots`, in milliseconds.
    fn lower_bound_ms(&self, slots: u64) -> u64 {
        let mut chain = vec![0_u64; self.inputs.len()];
        for (index, inputs) in self.inputs.iter().enumerate() {
            let below = inputs.iter().map(|input| chain[*input]).max().unwrap_or(0);
            chain[index] = below + self.durations_ms[index];
        }
        let longest = chain.iter().copied().max().unwrap_or(0);
        let work: u64 = self.durations_ms.iter().sum();
        longest.max(work.div_ceil(slots))
    }

    /// The derivations of version `version` of every package, the top-level one last.
    fn derivations(&self, factory: &mut Factory, version: usize) -> Vec<FakeDrv> {
        let mut drvs: Vec<FakeDrv> = Vec::with_capacity(self.inputs.len() + 1);
        let mut has_dependents = vec![false; self.inputs.len()];
        for (index, inputs) in self.inputs.iter().enumerate() {
            let name = format!("pkg{index}-{version}");
            let sleep = self.durations_ms[index].to_string();
            let input_drvs: Vec<&FakeDrv> = inputs.iter().map(|input| &drvs[*input]).collect();
            for input in inputs {
                has_dependents[*input] = true;
            }
            let drv = factory.make(
                &Spec::new(&name)
                    .inputs(&input_drvs)
                    .env("DROVER_NOOP_SLEEP_MS", &sleep),
            );
            drvs.push(drv);
        }
        let sinks: Vec<&FakeDrv> = (0..self.inputs.len())
            .filter(|index| !has_dependents[*index])
            .map(|index| &drvs[index])
            .collect();
        let name = format!("all-{version}");
        let top = factory.make(
            &Spec::new(&name)
                .inputs(&sinks)
                .env("DROVER_NOOP_SLEEP_MS", "0"),
        );
        drvs.push(top);
        drvs
    }
}

fn unix_ms() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since.as_millis()).unwrap()
}

/// One build of the graph: its makespan, and (when sampled) the relative errors of its
/// predicted ends.
struct Run {
    makespan_ms: i64,
    estimate_errors: Vec<f64>,
}

/// Builds `drvs` on `farm`; samples the predicted end every 250 ms when `sample`.
async fn build(farm: &Farm, drvs: &[FakeDrv], sample: bool) -> Run {
    let mut client = farm.client().await;
    let submitted = unix_ms();
    let id = farm.submit(drvs).await;
    let mut samples = Vec::new();
    let finished = loop {
        let state = client
            .get(GetRequest { build_id: id })
            .await
            .unwrap()
            .into_inner();
        if state.finished_at_ms > 0 {
            assert_eq!(state.failure_reason, "", "the benchmark build failed");
            break state.finished_at_ms;
        }
        if sample && state.estimated_end_ms > 0 {
            samples.push((unix_ms(), state.estimated_end_ms));
        }
        tokio::time::sleep(Duration::from_millis(if sample { 250 } else { 50 })).await;
    };
    let estimate_errors = samples
        .into_iter()
        .filter(|(at, _)| finished - at >= 1_000)
        .map(|(at, predicted)| (predicted - finished).abs() as f64 / (finished - at) as f64)
        .collect();
    Run {
        makespan_ms: finished - submitted,
        estimate_errors,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let cluster = TestPostgres::start_durable();
    let graph = Graph::random(args.steps, args.seed);
    let slots = args.builders as u64 * u64::from(args.jobs);
    let bound = graph.lower_bound_ms(slots) as f64;
    let work: u64 = graph.durations_ms.iter().sum();
    println!(
        "PostgreSQL, durable; {} steps (seed {}), {:.1} s of work; {} simulated builders x {} jobs per farm; runners in their own processes",
        args.steps,
        args.seed,
        work as f64 / 1000.0,
        args.builders,
        args.jobs
    );
    println!("ideal lower bound: {:.2} s", bound / 1000.0);
    let learned = Farm::start(&cluster).await;
    let counting = Farm::start_with(&cluster, |config| {
        config.set("builders.learned_durations", false)
    })
    .await;
    learned
        .start_builders("learned", args.builders, args.jobs)
        .await;
    counting
        .start_builders("counting", args.builders, args.jobs)
        .await;

    let mut factory = Factory::default();
    for farm in [&learned, &counting] {
        build(farm, &graph.derivations(&mut factory, 0), false).await;
    }
    let mut by_learned = Vec::new();
    let mut by_count = Vec::new();
    let mut errors = Vec::new();
    for run in 1..=args.runs {
        let drvs = graph.derivations(&mut factory, run);
        // Alternate which goes first, so drift over the invocation falls on both.
        let order = if run % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_learning in order {
            if with_learning {
                let measured = build(&learned, &drvs, true).await;
                errors.push(median(&mut measured.estimate_errors.clone()));
                by_learned.push(measured.makespan_ms as f64);
            } else {
                by_count.push(build(&counting, &drvs, false).await.makespan_ms as f64);
            }
        }
        println!(
            "run {run}: learned durations {:.2} s, step count {:.2} s",
            by_learned[run - 1] / 1000.0,
            by_count[run - 1] / 1000.0
        );
    }
    let learned_ms = median(&mut by_learned);
    let count_ms = median(&mut by_count);
    println!(
        "| ordering | makespan (median of {}) | / lower bound |",
        args.runs
    );
    println!("|---|---|---|");
    println!(
        "| critical path in learned durations | {:.2} s | {:.2}x |",
        learned_ms / 1000.0,
        learned_ms / bound
    );
    println!(
        "| critical path in steps | {:.2} s | {:.2}x |",
        count_ms / 1000.0,
        count_ms / bound
    );
    println!(
        "learned durations are {:.1} % shorter; median error of the predicted end (samples >= 1 s before it): {:.1} %",
        (1.0 - learned_ms / count_ms) * 100.0,
        median(&mut errors) * 100.0
    );
    learned.stop();
    counting.stop();
}
