//! Executors run one step each. The noop executor builds nothing: it waits, then reports the
//! derivation's outputs with made-up hashes, so the whole control plane can be exercised and
//! benchmarked without Nix. The Nix executor joins it as another variant.

use std::time::Duration;

use nix_primitives::{Derivation, Hash};
use tokio_util::sync::CancellationToken;

use crate::tunnel::Job;

/// The environment variable that makes the noop executor fail a step, with its value as the log.
pub const NOOP_FAIL_VARIABLE: &str = "DROVER_NOOP_FAIL";

/// How an attempt ended, as reported to the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Built.
    Succeeded,
    /// The build failed.
    Failed,
    /// Something other than the build failed.
    InfrastructureFailure,
}

/// One output of a successful attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltOutput {
    /// Output name.
    pub name: String,
    /// Output path.
    pub path: String,
    /// `sha256:<base32>` of its NAR.
    pub nar_hash: String,
    /// Size of its NAR.
    pub nar_size: u64,
}

/// What an attempt produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// How it ended.
    pub outcome: Outcome,
    /// Why, for anything but success.
    pub message: String,
    /// Outputs of a success.
    pub outputs: Vec<BuiltOutput>,
    /// Its log.
    pub log: Vec<u8>,
}

/// Runs steps.
#[derive(Debug, Clone)]
pub enum Executor {
    /// Builds nothing, in a fixed time.
    Noop {
        /// How long each step takes.
        build_time: Duration,
    },
}

impl Executor {
    /// Runs one step until it ends or `abort` is cancelled.
    pub async fn run(&self, job: &Job, abort: &CancellationToken) -> Report {
        match self {
            Self::Noop { build_time } => noop(job, *build_time, abort).await,
        }
    }
}

async fn noop(job: &Job, build_time: Duration, abort: &CancellationToken) -> Report {
    let mut log = format!("noop build of {}\n", job.drv_path).into_bytes();
    let derivation = match Derivation::parse(&job.drv_text) {
        Ok(derivation) => derivation,
        Err(error) => {
            return Report {
                outcome: Outcome::InfrastructureFailure,
                message: format!("the runner sent a malformed derivation: {error}"),
                outputs: Vec::new(),
                log,
            };
        }
    };
    tokio::select! {
        () = abort.cancelled() => {
            return Report {
                outcome: Outcome::InfrastructureFailure,
                message: "aborted".to_owned(),
                outputs: Vec::new(),
                log,
            };
        }
        () = tokio::time::sleep(build_time) => {}
    }
    if let Some(reason) = derivation.env.get(NOOP_FAIL_VARIABLE.as_bytes()) {
        log.extend_from_slice(reason);
        log.push(b'\n');
        return Report {
            outcome: Outcome::Failed,
            message: format!("{NOOP_FAIL_VARIABLE} is set"),
            outputs: Vec::new(),
            log,
        };
    }
    let outputs = job
        .outputs
        .iter()
        .map(|(name, path)| BuiltOutput {
            name: name.clone(),
            path: path.clone(),
            nar_hash: Hash::sha256(path.as_bytes()).to_typed_base32(),
            nar_size: path.len() as u64,
        })
        .collect();
    log.extend_from_slice(b"done\n");
    Report {
        outcome: Outcome::Succeeded,
        message: String::new(),
        outputs,
        log,
    }
}
