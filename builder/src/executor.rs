//! Executors run one step each and describe its outputs; the tunnel uploads them.
//!
//! - [`noop`]: builds nothing: waits, then reports each output as a one-file NAR made in memory,
//!   so the whole control plane (including uploads and the cache) runs without Nix.
//! - [`nix`]: substitutes the step's inputs from the farm's cache, realises the derivation with
//!   `nix-store`, and reports the outputs from the local store.

pub mod nix;
pub mod noop;

use tokio_util::sync::CancellationToken;

use crate::tunnel::Job;

/// How an attempt ended, as reported to the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Built.
    Succeeded,
    /// The build failed (permanent).
    Failed,
    /// The build exceeded its time or silence limit.
    TimedOut,
    /// Something other than the build failed (retried elsewhere).
    InfrastructureFailure,
}

/// Where an output's NAR comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NarSource {
    /// Bytes made in memory.
    Bytes(Vec<u8>),
    /// `nix-store --dump` of the path in the local store.
    LocalStore,
}

/// One output of a successful attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltOutput {
    /// Output name.
    pub name: String,
    /// Output path.
    pub path: String,
    /// Store paths it refers to.
    pub references: Vec<String>,
    /// Its NAR.
    pub nar: NarSource,
}

/// What an attempt produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// How it ended.
    pub outcome: Outcome,
    /// Why, for anything but success.
    pub message: String,
    /// Outputs of a success, each after the outputs it refers to.
    pub outputs: Vec<BuiltOutput>,
    /// Its log.
    pub log: Vec<u8>,
}

impl Report {
    /// A report of a failure with a log.
    #[must_use]
    pub fn failure(outcome: Outcome, message: impl Into<String>, log: Vec<u8>) -> Self {
        Self {
            outcome,
            message: message.into(),
            outputs: Vec::new(),
            log,
        }
    }
}

/// Runs steps.
#[derive(Debug, Clone)]
pub enum Executor {
    /// Builds nothing.
    Noop(noop::NoopExecutor),
    /// Builds with Nix.
    Nix(nix::NixExecutor),
}

impl Executor {
    /// Runs one step until it ends or `abort` is cancelled.
    pub async fn run(&self, job: &Job, abort: &CancellationToken) -> Report {
        match self {
            Self::Noop(executor) => executor.run(job, abort).await,
            Self::Nix(executor) => executor.run(job, abort).await,
        }
    }
}
