//! The cost of a Nix step through the farm (issue 9): a chain of trivial derivations (each reads
//! its predecessor's output), built through the farm (the runner as a process on a durable
//! PostgreSQL, one `drover-builder` process with the Nix executor and a private store, all on this
//! host) against the same chain built locally with one `nix-store --realise` per derivation, and
//! with one `nix-store --realise` for the whole chain. Every run uses a fresh nonce, so nothing is
//! ever already built.
//!
//! Usage (build the binaries first: `cargo build --release --bins`):
//! `cargo run --release -p drover-bench --bin nix-chain -- [--length 100] [--runs 3]`
//!
//! The per-step breakdown comes from the builder's debug log: `step timings` (taking a serve
//! process, making inputs valid, BuildDerivation, QueryPathInfos, the executor in all, uploading
//! outputs, the whole step until its log is uploaded too) and `round trip`, from the builder
//! sending a step's result to it receiving the next step: the runner recording the result and
//! dispatching the next step (one transaction), and both transfers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_precision_loss,
    clippy::print_stdout,
    reason = "a benchmark harness: any failure aborts the measurement"
)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use drover_bench::farm::{Farm, NIX_CONFIG};
use drover_proto::v1::{DerivationText, SubmitRequest};
use test_support::{TestPostgres, private_store_command};

#[derive(Parser)]
struct Args {
    /// Derivations in the chain.
    #[arg(long, default_value_t = 100)]
    length: usize,
    /// Runs; the median of each figure is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

/// The chain: `length` derivations, each reading its predecessor's output.
const CHAIN: &str = r#"{ length, nonce }:
let
  step = i: derivation ({
    name = "chain-${toString i}";
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" (if i == 0 then "echo ${nonce} > $out" else "read x < $prev; echo $x ${toString i} > $out") ];
  } // (if i == 0 then { } else { prev = step (i - 1); }));
in step (length - 1)
"#;

/// One run's figures.
struct Run {
    farm: Duration,
    separate: Duration,
    single: Duration,
    /// Per phase, one duration per step.
    phases: BTreeMap<String, Vec<Duration>>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let chain = dir.path().join("chain.nix");
    fs_err::write(&chain, CHAIN).unwrap();
    let cluster = TestPostgres::start_durable();
    let mut runs = Vec::new();
    for run in 0..args.runs {
        let nonce = format!("{}-{run}", std::process::id());
        let (farm, phases) =
            through_the_farm(&cluster, dir.path(), &chain, args.length, &nonce).await;
        let separate = locally(
            dir.path(),
            &chain,
            args.length,
            &format!("{nonce}-separate"),
            true,
        );
        let single = locally(
            dir.path(),
            &chain,
            args.length,
            &format!("{nonce}-single"),
            false,
        );
        println!(
            "run {run}: farm {:.2} s ({:.1} ms/step), {} separate realises {:.2} s ({:.1} ms each), one realise {:.2} s",
            farm.as_secs_f64(),
            per_step(farm, args.length),
            args.length,
            separate.as_secs_f64(),
            per_step(separate, args.length),
            single.as_secs_f64(),
        );
        runs.push(Run {
            farm,
            separate,
            single,
            phases,
        });
    }
    report(&runs, args.length);
}

fn per_step(total: Duration, length: usize) -> f64 {
    total.as_secs_f64() * 1000.0 / length as f64
}

fn median(mut values: Vec<Duration>) -> Duration {
    assert!(!values.is_empty(), "no figures to take the median of");
    values.sort();
    values[values.len() / 2]
}

fn report(runs: &[Run], length: usize) {
    let farm = median(runs.iter().map(|run| run.farm).collect());
    let separate = median(runs.iter().map(|run| run.separate).collect());
    let single = median(runs.iter().map(|run| run.single).collect());
    println!(
        "median of {} runs, chain of {length}: farm {:.2} s ({:.1} ms/step); {length} separate realises {:.2} s ({:.1} ms each); one realise {:.2} s ({:.1} ms/step)",
        runs.len(),
        farm.as_secs_f64(),
        per_step(farm, length),
        separate.as_secs_f64(),
        per_step(separate, length),
        single.as_secs_f64(),
        per_step(single, length),
    );
    println!(
        "farm / separate realises = {:.2}x; farm / one realise = {:.2}x",
        farm.as_secs_f64() / separate.as_secs_f64(),
        farm.as_secs_f64() / single.as_secs_f64(),
    );
    let mut phases: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for run in runs {
        for (phase, durations) in &run.phases {
            phases.entry(phase).or_default().extend(durations);
        }
    }
    let order = [
        "process",
        "inputs",
        "build",
        "outputs",
        "executor",
        "upload",
        "step",
        "round trip",
    ];
    let line: Vec<String> = order
        .iter()
        .filter_map(|phase| {
            let durations = phases.remove(phase)?;
            Some(format!(
                "{phase} {:.2} ms",
                median(durations).as_secs_f64() * 1000.0
            ))
        })
        .collect();
    println!(
        "per step, median over all steps of all runs: {}",
        line.join(" | ")
    );
}

/// Builds the chain through a fresh farm; returns the time from Submit to the build's success,
/// and the phases of every step.
async fn through_the_farm(
    cluster: &TestPostgres,
    dir: &Path,
    chain: &Path,
    length: usize,
    nonce: &str,
) -> (Duration, BTreeMap<String, Vec<Duration>>) {
    let mut farm = Farm::start(cluster).await;
    let run_dir = dir.join(format!("farm-{nonce}"));
    let builder_log = run_dir.join("builder.log");
    farm.start_nix_builder(
        "nix-1",
        1,
        &run_dir.join("builder-store"),
        &builder_log,
        "warn,drover_builder::tunnel=debug,drover_builder::jobs=debug",
    )
    .await;
    let submitter = run_dir.join("submitter-store");
    let top = instantiate(&submitter, chain, length, nonce);
    let requisites = in_store(&submitter, &["nix-store", "--query", "--requisites", &top]);
    let derivations: Vec<DerivationText> = requisites
        .lines()
        .map(|path| DerivationText {
            path: path.to_owned(),
            text: fs_err::read(submitter.join(path.trim_start_matches("/nix/"))).unwrap(),
        })
        .collect();
    assert_eq!(derivations.len(), length, "the chain's closure");
    let mut client = farm.client().await;
    let started = Instant::now();
    let build = client
        .submit(SubmitRequest {
            derivations,
            top_drv_path: top.clone(),
            ..SubmitRequest::default()
        })
        .await
        .unwrap()
        .into_inner()
        .build_id;
    farm.wait_for_success(build).await;
    let elapsed = started.elapsed();
    let log = fs_err::read_to_string(&builder_log).unwrap();
    let mut phases = builder_phases(&log);
    phases.insert("round trip".to_owned(), round_trips(&log));
    farm.stop();
    (elapsed, phases)
}

/// The phases of every `step timings` line of the builder's log.
fn builder_phases(log: &str) -> BTreeMap<String, Vec<Duration>> {
    let mut phases: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    for line in log.lines().filter(|line| line.contains("step timings")) {
        let Some((_, list)) = line.split_once("phases=") else {
            continue;
        };
        for pair in list.split_whitespace() {
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            let Some(milliseconds) = value.strip_suffix("ms").and_then(|v| v.parse::<f64>().ok())
            else {
                continue;
            };
            phases
                .entry(name.to_owned())
                .or_default()
                .push(Duration::from_secs_f64(milliseconds / 1000.0));
        }
    }
    phases
}

/// Seconds since midnight of a log line's timestamp (`2026-12-01T17:10:00.123456Z ...`).
fn timestamp(line: &str) -> Option<f64> {
    let time = line
        .split_whitespace()
        .next()?
        .split_once('T')?
        .1
        .trim_end_matches('Z');
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// For every step after the first: from the builder sending the previous step's result to it
/// receiving the next step, as its log shows (the runner's whole share of a chain link).
fn round_trips(log: &str) -> Vec<Duration> {
    let mut sent = None;
    let mut trips = Vec::new();
    for line in log.lines() {
        if line.contains("result sent") {
            sent = timestamp(line);
        } else if line.contains("step received")
            && let (Some(sent), Some(received)) = (sent.take(), timestamp(line))
        {
            trips.push(Duration::from_secs_f64((received - sent).max(0.0)));
        }
    }
    trips
}

/// Runs `arguments` with `store` as `/nix`; returns stdout.
fn in_store(store: &Path, arguments: &[&str]) -> String {
    fs_err::create_dir_all(store).unwrap();
    let output = private_store_command(store)
        .args(arguments)
        .env("NIX_CONFIG", NIX_CONFIG)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Instantiates the chain in `store`; returns the top `.drv`.
fn instantiate(store: &Path, chain: &Path, length: usize, nonce: &str) -> String {
    let length = length.to_string();
    in_store(
        store,
        &[
            "nix-instantiate",
            chain.to_str().unwrap(),
            "--arg",
            "length",
            &length,
            "--argstr",
            "nonce",
            nonce,
        ],
    )
    .trim()
    .to_owned()
}

/// Builds the chain in a fresh local store, one realise per derivation (`separate`) or one for
/// all; returns the time the realises took, measured inside the store's namespace so neither
/// instantiation nor the namespace's set-up counts.
fn locally(dir: &Path, chain: &Path, length: usize, nonce: &str, separate: bool) -> Duration {
    let store = dir.join(format!("local-{nonce}"));
    let top = instantiate(&store, chain, length, nonce);
    let script = if separate {
        r#"drvs=$(nix-store --query --requisites "$1")
start=$(date +%s%N)
for drv in $drvs; do nix-store --realise "$drv" > /dev/null 2>&1 || exit 2; done
echo $(( $(date +%s%N) - start ))"#
    } else {
        r#"start=$(date +%s%N)
nix-store --realise "$1" > /dev/null 2>&1 || exit 2
echo $(( $(date +%s%N) - start ))"#
    };
    let nanoseconds: u64 = in_store(&store, &["sh", "-c", script, "chain", &top])
        .trim()
        .parse()
        .unwrap();
    Duration::from_nanos(nanoseconds)
}
